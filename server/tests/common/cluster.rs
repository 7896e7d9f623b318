//! Cluster mode's test fixtures: `missived` nodes of one server name over a NATS cluster,
//! and a seeded chaos run over them with its checker.

use std::path::Path;
use std::time::Duration;

use missive_conformance::harness::ServerProcess;
use missive_spec::{ClientMsgId, Content, Message};

use super::nats::NatsCluster;
use super::*;

pub const NAME: &str = "alpha.test";

/// `n` nodes of `alpha.test`, one key, each with its own store under `dir`.
pub async fn nodes(dir: &Path, nats: &NatsCluster, n: usize) -> Vec<ServerProcess> {
    let mut nodes = Vec::new();
    for i in 1..=n {
        let data = dir.join(format!("node-{i}"));
        ServerProcess::init(missived(), &data, NAME, "open").await.unwrap();
        if i > 1 {
            std::fs::copy(dir.join("node-1/server.key"), data.join("server.key")).unwrap();
        }
        let config = data.join("missived.toml");
        let text = std::fs::read_to_string(&config).unwrap() + &nats.section(&format!("node-{i}"));
        std::fs::write(&config, text).unwrap();
        nodes.push(ServerProcess::start(missived(), &data, NAME).await.unwrap());
    }
    nodes
}

/// Waits until every replica of the server's log is current again (after a NATS node
/// came back), so that losing the next node leaves a quorum that holds everything.
pub async fn replicas_current(nats: &NatsCluster) {
    let (stream, _) = missive_server::cluster::names(&missive_spec::ServerName::parse(NAME).unwrap());
    let urls: Vec<async_nats::ServerAddr> = nats.urls().iter().map(|u| u.parse().unwrap()).collect();
    eventually("every replica of the log to be current", || {
        let (stream, urls) = (stream.clone(), urls.clone());
        async move {
            let js = async_nats::jetstream::new(async_nats::connect(urls).await.ok()?);
            let s = js.get_stream(&stream).await.ok()?;
            let cluster = s.cached_info().cluster.clone()?;
            let all = cluster.leader.is_some() && cluster.replicas.len() == 2 && cluster.replicas.iter().all(|r| r.current && !r.offline);
            all.then_some(())
        }
    })
    .await;
}

pub fn text(m: &Message) -> String {
    m.content.as_text().unwrap().to_owned()
}

/// What became of one send in the chaos run.
pub enum Outcome {
    Acked(Message),
    /// Never answered, although retried on every node until the run's end.
    Unknown,
}

/// Sends from one user, one at a time, each to the next of `to` in turn, until `until`;
/// a send that fails (its node died, the log was briefly out of reach) is retried with the
/// same id on the next node, as the `missive` outbox does.
pub async fn chaos_sender(addrs: Vec<std::net::SocketAddr>, token: String, me: usize, to: Vec<missive_spec::UserId>, until: tokio::time::Instant) -> Vec<(String, Outcome, Option<Message>)> {
    let name = missive_spec::ServerName::parse(NAME).unwrap();
    let mut node = me % addrs.len();
    let mut client: Option<missive_cli::client::Client> = None;
    let mut out = Vec::new();
    let mut k = 0;
    while tokio::time::Instant::now() < until {
        let text = format!("u{me}-{k}");
        let id = ClientMsgId::from_slice(&rand::random::<[u8; 16]>()).unwrap();
        let recipient = &to[k % to.len()];
        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
        let outcome = loop {
            if tokio::time::Instant::now() > give_up {
                break Outcome::Unknown;
            }
            if client.is_none() {
                match tokio::time::timeout(Duration::from_secs(3), missive_cli::client::Client::connect(addrs[node], &name, missive_federation::tls::Pin::FirstUse)).await {
                    Ok(Ok(mut c)) => {
                        c.set_token(Some(token.clone()));
                        client = Some(c);
                    }
                    _ => {
                        node = (node + 1) % addrs.len();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            let c = client.as_ref().unwrap();
            match tokio::time::timeout(Duration::from_secs(20), c.send(recipient, Content::text(&text), id)).await {
                Ok(Ok(m)) => break Outcome::Acked(m),
                _ => {
                    client = None;
                    node = (node + 1) % addrs.len();
                }
            }
        };
        // Every fifth acknowledged send is sent again with its id, on the next node, as a
        // client that did not hear the answer would: it must get the same answer.
        let again = match (&outcome, k % 5 == 4, &client) {
            (Outcome::Acked(_), true, Some(_)) => {
                node = (node + 1) % addrs.len();
                let c = tokio::time::timeout(Duration::from_secs(3), missive_cli::client::Client::connect(addrs[node], &name, missive_federation::tls::Pin::FirstUse)).await;
                match c {
                    Ok(Ok(mut c)) => {
                        c.set_token(Some(token.clone()));
                        let r = tokio::time::timeout(Duration::from_secs(20), c.send(recipient, Content::text(&text), id)).await;
                        client = Some(c);
                        r.ok().and_then(Result::ok)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        out.push((text, outcome, again));
        k += 1;
    }
    out
}

/// A seeded schedule of kill -9s of `missived` nodes and NATS nodes, each restarted after
/// a moment; at most one of each kind down at once, and a NATS node killed only while
/// every replica of the log is current (a quorum of two then still holds everything).
pub async fn chaos_faults(nodes: &mut [ServerProcess], nats: &mut NatsCluster, seed: u64, until: tokio::time::Instant) -> Vec<String> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut done = Vec::new();
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1500))).await;
        if rng.gen_bool(0.5) {
            let i = rng.gen_range(0..nodes.len());
            nodes[i].kill9().await;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
            nodes[i].restart().await.unwrap();
            done.push(format!("kill -9 node-{}, restarted", i + 1));
        } else {
            replicas_current(nats).await;
            let i = rng.gen_range(0..nats.nodes.len());
            nats.nodes[i].kill9().await;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(200..2000))).await;
            nats.nodes[i].restart();
            done.push(format!("kill -9 nats-{}, restarted", i + 1));
        }
    }
    done
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Findings {
    pub faults: Vec<String>,
    pub acked: usize,
    pub unknown: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub gaps: usize,
    /// Conversations whose copy on some node differs from node 1's.
    pub differ: usize,
    /// A sender's acknowledged sends numbered out of the order it sent them.
    pub out_of_order: usize,
    /// Deliberate retries answered otherwise than the first time.
    pub retries_differ: usize,
    /// Column families of a node's store that differ from node 1's.
    pub stores_differ: Vec<String>,
}

/// Users on three nodes send to each other for `seconds` while nodes of both kinds are
/// killed (seeded); then, healed, the checker, which knows only what clients were
/// answered and what `history` shows on every node, counts acknowledged sends lost,
/// duplicates, and conversations whose order differs between nodes or has a gap.
pub async fn chaos(seed: u64, seconds: u64) -> Findings {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(&dir.path().join("nats"), 3).await;
    let mut nodes = nodes(dir.path(), &nats, 3).await;
    let users = 6;
    let mut tokens = Vec::new();
    for u in 0..users {
        tokens.push(register(&nodes[u % 3], &format!("u{u}")).await.token().unwrap().to_owned());
    }
    let ids: Vec<_> = (0..users).map(|u| uid(&format!("u{u}"), &nodes[0])).collect();
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let senders: Vec<_> = (0..users)
        .map(|u| {
            let to: Vec<_> = ids.iter().enumerate().filter(|(v, _)| *v != u).map(|(_, id)| id.clone()).collect();
            tokio::spawn(chaos_sender(addrs.clone(), tokens[u].clone(), u, to, until))
        })
        .collect();
    let faults = chaos_faults(&mut nodes, &mut nats, seed, until).await;
    let mut sent = Vec::new();
    for s in senders {
        sent.push(s.await.unwrap());
    }

    // Healed (every process runs again): each node's copy of each conversation.
    replicas_current(&nats).await;
    let mut histories = Vec::new();
    for node in &nodes {
        let mut per_node = std::collections::BTreeMap::new();
        for (u, token) in tokens.iter().enumerate() {
            let mut c = connect(node).await;
            c.set_token(Some(token.clone()));
            for (v, other) in ids.iter().enumerate().skip(u + 1) {
                let mut h = full_history(&c, other, 50).await;
                h.reverse();
                per_node.insert((u, v), h);
            }
        }
        histories.push(per_node);
    }
    let (mut acked, mut unknown, mut lost, mut duplicates, mut gaps, mut differ, mut out_of_order) = (0, 0, 0, 0, 0, 0, 0);
    for (pair, h) in &histories[0] {
        differ += histories[1..].iter().filter(|other| other[pair] != *h).count();
        gaps += usize::from(h.iter().map(|m| m.seq).collect::<Vec<_>>() != (1..=h.len() as u64).collect::<Vec<_>>());
        let mut texts: Vec<String> = h.iter().map(text).collect();
        texts.sort();
        duplicates += texts.len() - { texts.dedup(); texts.len() };
    }
    let mut retries_differ = 0;
    for (u, sends) in sent.iter().enumerate() {
        let mut last_seq = std::collections::HashMap::new();
        for (t, outcome, again) in sends {
            match outcome {
                Outcome::Acked(m) => {
                    acked += 1;
                    retries_differ += usize::from(again.as_ref().is_some_and(|a| a != m));
                    let other = ids.iter().position(|id| *id == m.to).unwrap();
                    let h = &histories[0][&(u.min(other), u.max(other))];
                    if !h.iter().any(|s| s == m && text(s) == *t) {
                        lost += 1;
                    }
                    let last = last_seq.entry(other).or_insert(0);
                    out_of_order += usize::from(m.seq <= *last);
                    *last = m.seq;
                }
                Outcome::Unknown => unknown += 1,
            }
        }
    }
    // Every node's whole store, family by family, stopped and opened. Presence records and
    // the applied position are left out: a client's last disconnect is logged while the
    // nodes stop, so a node stopped first may miss that tail.
    for node in nodes.iter_mut() {
        node.terminate().await.unwrap();
    }
    let dump = |dir: &Path| {
        use missive_server::store::{Cf, Direction, Store};
        let s = missive_server::store::rocks::RocksStore::open(&dir.join("db")).unwrap();
        Cf::ALL
            .iter()
            .filter(|cf| **cf != Cf::Presence)
            .map(|cf| {
                let rows = s.scan(*cf, &[], None, Direction::Forward, usize::MAX).unwrap();
                (*cf, rows.into_iter().filter(|(k, _)| !(*cf == Cf::Meta && k == missive_server::cluster::APPLIED_KEY)).collect::<Vec<_>>())
            })
            .collect::<Vec<_>>()
    };
    let first = dump(&nodes[0].dir);
    let mut stores_differ = Vec::new();
    for node in &nodes[1..] {
        for ((cf, a), (_, b)) in first.iter().zip(dump(&node.dir)) {
            if *a != b {
                stores_differ.push(format!("{} on {}", cf.name(), node.dir.display()));
            }
        }
    }
    println!("cluster chaos, seed {seed}, {seconds} s: {}", faults.join("; "));
    let f = Findings { faults, acked, unknown, lost, duplicates, gaps, differ, out_of_order, retries_differ, stores_differ };
    println!("{f:?}");
    f
}
