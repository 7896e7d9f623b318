//! Cluster mode with real processes: a 3-node NATS JetStream cluster on loopback and
//! `missived` nodes serving one server name over it (README, "Running a cluster").

mod common;

use std::time::Duration;

use common::cluster::*;
use common::nats::NatsCluster;
use common::*;
use missive_conformance::harness::ServerProcess;
use missive_spec::{ClientMsgId, Content};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_the_same_users_and_sends_survive_the_loss_of_any_nats_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(&dir.path().join("nats"), 3).await;
    let nodes = nodes(dir.path(), &nats, 3).await;
    let alice = register(&nodes[0], "alice").await;
    register(&nodes[1], "bob").await;
    // An account made through node 1 logs in on node 3, and follows live there.
    let bob = login(&nodes[2], "bob").await;
    let (mut sub, _, _) = bob.subscribe(0).await.unwrap();
    let to_bob = uid("bob", &nodes[0]);
    let first = alice.send_text(&to_bob, "through node 1").await.unwrap();
    let got = messages(&collect(&mut sub, Vec::new(), 1).await);
    assert_eq!(got, vec![first.clone()], "node 3 delivers what node 1 accepted, as node 1 numbered it");

    let mut sent = vec![first];
    for k in 0..3 {
        nats.nodes[k].kill9().await;
        let m = alice.send_text(&to_bob, &format!("without nats-{}", k + 1)).await.unwrap();
        let got = messages(&collect(&mut sub, Vec::new(), 1).await);
        assert_eq!(got, vec![m.clone()], "live delivery with nats-{} down", k + 1);
        sent.push(m);
        nats.nodes[k].restart();
        replicas_current(&nats).await;
    }
    // Every node holds the same conversation, in the same order.
    for node in &nodes {
        let c = login(node, "bob").await;
        let mut history = full_history(&c, &uid("alice", node), 2).await;
        history.reverse();
        assert_eq!(history, sent, "history on {}", node.addr);
    }
    assert_eq!(sent.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);

    // `missived cluster status` sees the three nodes caught up, and the log's replicas.
    let config = nodes[1].config.clone();
    let status = eventually("every node to report it applied the whole log", || {
        let config = config.clone();
        async move {
            let out = tokio::process::Command::new(missived()).args(["cluster", "status", "--json", "--config"]).arg(&config).output().await.ok()?;
            assert!(out.status.success(), "cluster status: {}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let nodes = v["nodes"].as_array()?;
            (nodes.len() == 3 && nodes.iter().all(|n| n["lag"] == 0)).then_some(v)
        }
    })
    .await;
    assert_eq!(status["replicas"], 3);
    assert!(status["entries"].as_u64().unwrap() >= 4, "{status}");
    let names: Vec<&str> = status["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(names, ["node-1", "node-2", "node-3"]);
    assert_eq!(status["nodes"][2]["client"], nodes[2].addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_node_dies_is_retried_on_another_and_answered_as_first_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(&dir.path().join("nats"), 3).await;
    let mut nodes = nodes(dir.path(), &nats, 3).await;
    let alice = register(&nodes[0], "alice").await;
    register(&nodes[0], "bob").await;
    let to_bob = uid("bob", &nodes[0]);
    let token = alice.token().map(str::to_owned);
    let on = |node: &ServerProcess| {
        let token = token.clone();
        let addr = node.addr;
        async move {
            let mut c = missive_cli::client::Client::connect(addr, &missive_spec::ServerName::parse(NAME).unwrap(), missive_federation::tls::Pin::FirstUse)
                .await
                .unwrap();
            c.set_token(token);
            c
        }
    };

    // Acknowledged by node 1, which then dies: the retry on node 2 gets the same answer.
    let id = ClientMsgId::from_slice(&[1; 16]).unwrap();
    let first = alice.send(&to_bob, Content::text("m0"), id).await.unwrap();
    nodes[0].kill9().await;
    let alice2 = on(&nodes[1]).await;
    assert_eq!(alice2.send(&to_bob, Content::text("m0"), id).await.unwrap(), first);

    // Twenty sends in flight on node 2 when it is killed, after the first answer.
    let ids: Vec<ClientMsgId> = (2..22u8).map(|i| ClientMsgId::from_slice(&[i; 16]).unwrap()).collect();
    let (answered_tx, mut answered) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (c, to, id, tx) = (alice2.clone(), to_bob.clone(), *id, answered_tx.clone());
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(20), c.send(&to, Content::text(&format!("m{}", i + 1)), id)).await;
            let _ = tx.send(());
            r.ok().and_then(Result::ok)
        }));
    }
    answered.recv().await.unwrap();
    nodes[1].kill9().await;
    let mut originals = Vec::new();
    for t in tasks {
        originals.push(t.await.unwrap());
    }
    assert!(originals.iter().any(Option::is_some), "node 2 answered none");

    // Retried on node 3 with the same ids: an answered send gets its answer again, and
    // every message is stored exactly once, numbered without a gap.
    let alice3 = on(&nodes[2]).await;
    for (i, (id, original)) in ids.iter().zip(&originals).enumerate() {
        let again = alice3.send(&to_bob, Content::text(&format!("m{}", i + 1)), *id).await.unwrap();
        if let Some(original) = original {
            assert_eq!(&again, original, "retry of m{}", i + 1);
        }
    }
    let mut history = full_history(&alice3, &to_bob, 50).await;
    history.reverse();
    let mut texts: Vec<String> = history.iter().map(text).collect();
    assert_eq!(history.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=21).collect::<Vec<u64>>());
    texts.sort_by_key(|t| t[1..].parse::<u32>().unwrap());
    assert_eq!(texts, (0..21).map(|i| format!("m{i}")).collect::<Vec<_>>(), "each message once");

    // The killed nodes replay the log from where their stores stopped, and agree.
    for k in 0..2 {
        nodes[k].restart().await.unwrap();
        let mut replayed = full_history(&on(&nodes[k]).await, &to_bob, 50).await;
        replayed.reverse();
        assert_eq!(replayed, history, "node {} after its restart", k + 1);
    }
}

/// The seeded chaos run of `common::cluster::chaos`, short; `MISSIVE_CLUSTER_CHAOS_SEED`
/// and `MISSIVE_CLUSTER_CHAOS_SECONDS` make another or a longer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_chaos_loses_duplicates_and_reorders_nothing() {
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let f = chaos(env("MISSIVE_CLUSTER_CHAOS_SEED", 7), env("MISSIVE_CLUSTER_CHAOS_SECONDS", 12)).await;
    assert!(f.faults.len() >= 3, "the schedule made too few faults: {:?}", f.faults);
    assert!(f.acked >= 30, "too few sends acknowledged ({}) for the run to mean much", f.acked);
    assert_eq!((f.lost, f.duplicates, f.gaps, f.differ, f.out_of_order, f.retries_differ), (0, 0, 0, 0, 0, 0), "{f:?}");
    assert!(f.stores_differ.is_empty(), "{f:?}");
}
