//! Chaos run with an independent checker: several homeservers of the implementation
//! under test, every federation link through a [`Proxy`], users sending across every pair
//! of servers while a seeded schedule partitions links, injects loss, duplication,
//! reordering and delay, and kill -9s servers and restarts them. Then everything heals,
//! queues drain, and the checker — which knows only what clients were answered, what
//! `history` returns on every server and what each user's event stream shows — reports, Jepsen-style: acknowledged sends lost,
//! duplicates, unexpected messages, sends of unknown outcome (and whether they arrived),
//! and whether each conversation shows one gap-free order on both servers.
//!
//! Clients retry a send whose outcome they do not know with the same `client_msg_id`, as
//! the `missive` outbox does, so idempotency is exercised too.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use missive_federation::PublicKey;
use missive_spec::{Content, ErrorCode, Message, ServerName, UserId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::implementation::{ImplFile, PeerInfo, Sut};
use crate::proxy::{Faults, Proxy};
use crate::suite::history_all;
use crate::wire::{new_client_msg_id, Client, ClientError};

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    pub servers: usize,
    pub users_per_server: usize,
    pub messages: usize,
    pub seconds: u64,
    pub seed: u64,
    /// How long queues may take to drain after healing.
    pub drain_seconds: u64,
}

/// The checker's findings.
#[derive(Debug, Default, Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    pub servers: usize,
    pub users: usize,
    pub seconds: u64,
    pub events: Vec<String>,
    pub datagrams: DatagramCounts,
    pub attempted: usize,
    pub acknowledged: usize,
    /// Definitely not accepted: the server was unreachable or answered an error.
    pub refused: usize,
    pub unknown: usize,
    pub unknown_arrived: usize,
    /// Sends that needed a retry with the same client message id.
    pub retried: usize,
    pub lost: usize,
    pub lost_examples: Vec<String>,
    pub duplicates: usize,
    pub duplicate_examples: Vec<String>,
    pub unexpected: usize,
    pub unexpected_examples: Vec<String>,
    pub conversations: usize,
    pub order_mismatches: usize,
    pub gaps: usize,
    pub send_order_violations: usize,
    pub drained_in_ms: Option<u64>,
    pub passed: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct DatagramCounts {
    pub forwarded: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub cut_by_partitions: u64,
}

/// How a client saw one send end.
#[derive(Debug, Clone)]
enum Outcome {
    Acked(Box<Message>),
    /// Never accepted: unreachable, or an error answer.
    Refused,
    /// Sent, but no answer came (timeout, lost connection).
    Unknown,
}

#[derive(Clone)]
struct ServerAddr {
    name: ServerName,
    client: SocketAddr,
    key: PublicKey,
}

struct User {
    id: UserId,
    server: usize,
    token: Option<String>,
}

/// One planned send.
#[derive(Clone, Debug)]
struct Plan {
    from: usize,
    to: usize,
    text: String,
    at: Duration,
}

/// Runs the whole chaos run and checks it.
pub async fn run(imp: Arc<ImplFile>, opts: &ChaosOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<ChaosReport> {
    let work = tempfile::Builder::new().prefix("missive-chaos-").tempdir()?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let n = opts.servers.max(2);

    // Servers, and a proxy on every directed link.
    let mut suts = Vec::new();
    for i in 0..n {
        suts.push(Sut::init(imp.clone(), work.path(), &format!("c{}.chaos.test", i + 1)).await?);
    }
    let mut proxies: BTreeMap<(usize, usize), Proxy> = BTreeMap::new();
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let p = Proxy::start([127, 0, 0, 1].into(), suts[j].federation, rng.gen()).await?;
                suts[i].pin(&PeerInfo { name: suts[j].name.clone(), federation: p.addr, key: suts[j].key }).await?;
                proxies.insert((i, j), p);
            }
        }
    }
    for s in &mut suts {
        s.start().await?;
    }
    let addrs: Vec<ServerAddr> = suts.iter().map(|s| ServerAddr { name: s.name.clone(), client: s.client, key: s.key }).collect();
    let mut users = Vec::new();
    for (i, s) in suts.iter_mut().enumerate() {
        for _ in 0..opts.users_per_server.max(1) {
            let (id, c) = s.new_user("chaos").await?;
            users.push(User { id, server: i, token: c.token().map(str::to_owned) });
            c.close().await;
        }
    }
    let suts: Arc<Vec<Mutex<Sut>>> = Arc::new(suts.into_iter().map(Mutex::new).collect());
    let proxies = Arc::new(proxies);
    progress(&format!("{n} servers and {} users up; sending {} messages over {} s", users.len(), opts.messages, opts.seconds));

    // The plan: random pairs on different servers, spread evenly over the run.
    let span = Duration::from_secs(opts.seconds.max(1));
    let plans: Vec<Plan> = (0..opts.messages)
        .map(|k| {
            let from = rng.gen_range(0..users.len());
            let to = loop {
                let t = rng.gen_range(0..users.len());
                if users[t].server != users[from].server {
                    break t;
                }
            };
            Plan { from, to, text: format!("chaos-{}-{k}", opts.seed), at: span.mul_f64(k as f64 / opts.messages.max(1) as f64) }
        })
        .collect();

    let start = Instant::now();
    let faults = tokio::spawn(schedule(suts.clone(), proxies.clone(), span, rng.gen(), start));
    let mut senders = Vec::new();
    for (u, user) in users.iter().enumerate() {
        let mine: Vec<Plan> = plans.iter().filter(|p| p.from == u).cloned().collect();
        let to_ids: Vec<UserId> = mine.iter().map(|p| users[p.to].id.clone()).collect();
        senders.push(tokio::spawn(send_all(addrs[user.server].clone(), user.token.clone(), mine, to_ids, start)));
    }
    let mut outcomes: HashMap<String, (Outcome, bool)> = HashMap::new();
    for s in senders {
        for (text, outcome, retried) in s.await? {
            outcomes.insert(text, (outcome, retried));
        }
    }
    let events = faults.await?;
    progress("sending done; healing every link and restarting every server that is down");

    // Heal, and make sure every server runs.
    for p in proxies.values() {
        p.partition(false);
        p.set_faults(Faults::default());
    }
    for s in suts.iter() {
        let mut s = s.lock().await;
        if !s.is_running() {
            s.start().await?;
        }
    }

    // Drain: wait until every acknowledged message is on both ends, or the deadline.
    let mut convs: BTreeMap<(usize, usize), Vec<&Plan>> = BTreeMap::new();
    for p in &plans {
        convs.entry((p.from.min(p.to), p.from.max(p.to))).or_default().push(p);
    }
    let acked_texts = |c: &[&Plan]| -> Vec<String> {
        c.iter().filter(|p| matches!(outcomes.get(&p.text), Some((Outcome::Acked(_), _)))).map(|p| p.text.clone()).collect()
    };
    let drain_start = Instant::now();
    let deadline = drain_start + Duration::from_secs(opts.drain_seconds);
    let mut histories: BTreeMap<(usize, usize), (Vec<Message>, Vec<Message>)> = BTreeMap::new();
    let mut drained = None;
    let mut readers = Readers { addrs: &addrs, conns: vec![None; n] };
    loop {
        let mut complete = true;
        for (&(a, b), c) in &convs {
            let ha = readers.history(&users[a], &users[b].id).await;
            let hb = readers.history(&users[b], &users[a].id).await;
            let want = acked_texts(c);
            let has = |h: &[Message], t: &String| h.iter().any(|m| m.content.as_text() == Some(t.as_str()));
            if !want.iter().all(|t| has(&ha, t) && has(&hb, t)) || ha.len() != hb.len() {
                complete = false;
            }
            histories.insert((a, b), (ha, hb));
        }
        if complete {
            drained = Some(drain_start.elapsed().as_millis() as u64);
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    progress(&match drained {
        Some(ms) => format!("drained in {ms} ms; checking"),
        None => format!("not drained after {} s; checking what is there", opts.drain_seconds),
    });

    // The checker.
    let mut r = ChaosReport {
        seed: opts.seed,
        servers: n,
        users: users.len(),
        seconds: opts.seconds,
        events,
        attempted: plans.len(),
        conversations: convs.len(),
        drained_in_ms: drained,
        ..Default::default()
    };
    for p in proxies.values() {
        use std::sync::atomic::Ordering::Relaxed;
        r.datagrams.forwarded += p.counters.forwarded.load(Relaxed);
        r.datagrams.dropped += p.counters.dropped.load(Relaxed);
        r.datagrams.duplicated += p.counters.duplicated.load(Relaxed);
        r.datagrams.reordered += p.counters.reordered.load(Relaxed);
        r.datagrams.cut_by_partitions += p.counters.partitioned.load(Relaxed);
    }
    let sent: HashMap<&str, &Plan> = plans.iter().map(|p| (p.text.as_str(), p)).collect();
    for (o, retried) in outcomes.values() {
        match o {
            Outcome::Acked(_) => r.acknowledged += 1,
            Outcome::Refused => r.refused += 1,
            Outcome::Unknown => r.unknown += 1,
        }
        r.retried += usize::from(*retried);
    }
    for (&(a, b), c) in &convs {
        let (ha, hb) = &histories[&(a, b)];
        for (side, h) in [(&users[a].id, ha), (&users[b].id, hb)] {
            let mut count: HashMap<&str, usize> = HashMap::new();
            for m in h {
                let t = m.content.as_text().unwrap_or("");
                *count.entry(t).or_default() += 1;
                let expected = match sent.get(t).and_then(|p| outcomes.get(&p.text)) {
                    Some((Outcome::Refused, _)) | None => false,
                    Some(_) => sent[t].from.min(sent[t].to) == a && sent[t].from.max(sent[t].to) == b,
                };
                if !expected {
                    r.unexpected += 1;
                    push_example(&mut r.unexpected_examples, format!("{t:?} in {side}'s history"));
                }
            }
            for (t, k) in &count {
                if *k > 1 {
                    r.duplicates += k - 1;
                    push_example(&mut r.duplicate_examples, format!("{t:?} {k} times in {side}'s history"));
                }
            }
            for t in acked_texts(c) {
                if !count.contains_key(t.as_str()) {
                    r.lost += 1;
                    push_example(&mut r.lost_examples, format!("{t:?} acknowledged but missing from {side}'s history"));
                }
            }
            // Gap-free: each origin's messages are numbered 1..=n with none missing.
            let mut seqs: BTreeMap<&ServerName, Vec<u64>> = BTreeMap::new();
            for m in h {
                seqs.entry(&m.origin).or_default().push(m.seq);
            }
            if seqs.values().any(|s| *s != (1..=s.len() as u64).collect::<Vec<_>>()) {
                r.gaps += 1;
            }
        }
        let ids = |h: &[Message]| h.iter().map(|m| (m.origin.clone(), m.seq)).collect::<Vec<_>>();
        if ids(ha) != ids(hb) {
            r.order_mismatches += 1;
        }
        // Each sender's acknowledged messages in the order it sent them.
        for u in [a, b] {
            let mine: Vec<u64> = c
                .iter()
                .filter(|p| p.from == u)
                .filter_map(|p| match outcomes.get(&p.text) {
                    Some((Outcome::Acked(m), _)) => Some(m.seq),
                    _ => None,
                })
                .collect();
            if mine.windows(2).any(|w| w[0] >= w[1]) {
                r.send_order_violations += 1;
            }
        }
        for p in c {
            if matches!(outcomes.get(&p.text), Some((Outcome::Unknown, _)))
                && ha.iter().any(|m| m.content.as_text() == Some(p.text.as_str()))
            {
                r.unknown_arrived += 1;
            }
        }
    }
    // What each user's devices were shown: their event stream, from the start.
    for u in &users {
        let Some(c) = readers.as_user(u).await else {
            r.lost += 1;
            push_example(&mut r.lost_examples, format!("{}'s server cannot be reached to read the stream", u.id));
            continue;
        };
        let stream = crate::suite::sync_all(&c).await.map(|e| crate::suite::messages(&e)).unwrap_or_default();
        let mut count: HashMap<&str, usize> = HashMap::new();
        for m in &stream {
            *count.entry(m.content.as_text().unwrap_or("")).or_default() += 1;
        }
        for (t, k) in &count {
            if *k > 1 {
                r.duplicates += k - 1;
                push_example(&mut r.duplicate_examples, format!("{t:?} {k} times in {}'s event stream", u.id));
            }
        }
        let me = users.iter().position(|x| x.id == u.id);
        for p in plans.iter().filter(|p| Some(p.to) == me || Some(p.from) == me) {
            if matches!(outcomes.get(&p.text), Some((Outcome::Acked(_), _))) && !count.contains_key(p.text.as_str()) {
                r.lost += 1;
                push_example(&mut r.lost_examples, format!("{:?} acknowledged but missing from {}'s event stream", p.text, u.id));
            }
        }
    }
    r.passed = r.lost == 0
        && r.duplicates == 0
        && r.unexpected == 0
        && r.order_mismatches == 0
        && r.gaps == 0
        && r.send_order_violations == 0
        && drained.is_some();
    // Stop every server before the working directory goes.
    for s in suts.iter() {
        s.lock().await.kill9().await;
    }
    Ok(r)
}

fn push_example(v: &mut Vec<String>, s: String) {
    if v.len() < 5 {
        v.push(s);
    }
}

async fn connect(addr: &ServerAddr, token: Option<String>) -> Result<Client, ClientError> {
    let mut c = Client::connect_within(addr.client, &addr.name, addr.key, Duration::from_secs(1)).await?;
    c.set_token(token);
    Ok(c)
}

/// The checker's connections, one per server, each user reading with their own token.
struct Readers<'a> {
    addrs: &'a [ServerAddr],
    conns: Vec<Option<Client>>,
}

impl Readers<'_> {
    async fn as_user(&mut self, u: &User) -> Option<Client> {
        let slot = &mut self.conns[u.server];
        if slot.is_none() {
            *slot = connect(&self.addrs[u.server], None).await.ok();
        }
        slot.as_ref().map(|c| c.as_device(u.token.clone()))
    }

    /// `u`'s whole conversation with `with`; empty (and a new connection next time) when
    /// the server cannot be read.
    async fn history(&mut self, u: &User, with: &UserId) -> Vec<Message> {
        let Some(c) = self.as_user(u).await else { return Vec::new() };
        match history_all(&c, with).await {
            Ok(h) => h,
            Err(_) => {
                self.conns[u.server] = None;
                Vec::new()
            }
        }
    }
}

/// One user's sends, each at its planned time; a send of unknown outcome is retried with
/// the same client message id.
async fn send_all(addr: ServerAddr, token: Option<String>, plans: Vec<Plan>, to: Vec<UserId>, start: Instant) -> Vec<(String, Outcome, bool)> {
    let mut out = Vec::new();
    let mut client: Option<Client> = None;
    for (p, to) in plans.into_iter().zip(to) {
        tokio::time::sleep_until((start + p.at).into()).await;
        let id = new_client_msg_id();
        let mut outcome = Outcome::Refused;
        let mut retried = false;
        for attempt in 0..8 {
            if attempt > 0 {
                retried = true;
                tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
            }
            if client.is_none() {
                client = connect(&addr, token.clone()).await.ok();
            }
            let Some(c) = client.take() else {
                // Unreachable: nothing was sent by this attempt.
                continue;
            };
            let r = tokio::time::timeout(Duration::from_secs(5), c.send(&to, Content::text(&p.text), id)).await;
            match r {
                Ok(Ok(m)) => {
                    outcome = Outcome::Acked(Box::new(m));
                    client = Some(c);
                    break;
                }
                // No connection at all, or a passing refusal: this attempt stored nothing.
                Ok(Err(e)) if e.is_unreachable() => {}
                Ok(Err(ClientError::Server { code, .. })) => {
                    if !matches!(code, ErrorCode::ShuttingDown | ErrorCode::Internal | ErrorCode::RateLimited) {
                        break;
                    }
                }
                // Sent, no answer: it may or may not be stored.
                Ok(Err(_)) | Err(_) => outcome = Outcome::Unknown,
            }
        }
        out.push((p.text, outcome, retried));
    }
    out
}

/// The fault schedule: returns what it did, with times.
async fn schedule(suts: Arc<Vec<Mutex<Sut>>>, proxies: Arc<BTreeMap<(usize, usize), Proxy>>, span: Duration, seed: u64, start: Instant) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = suts.len();
    let mut events = Vec::new();
    let log = |events: &mut Vec<String>, what: String| events.push(format!("{:>6.2}s {what}", start.elapsed().as_secs_f64()));
    let mut killed_once = false;
    let mut restarts = Vec::new();
    // The newest cut of each link: a heal ends only the cut that scheduled it, so two
    // overlapping cuts of one link last until the later one ends.
    let cuts: Arc<std::sync::Mutex<HashMap<(usize, usize), u64>>> = Arc::default();
    while start.elapsed() < span {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(400..1500))).await;
        if start.elapsed() >= span {
            break;
        }
        // At least one kill -9 per run, at about 40% of it.
        let roll = if !killed_once && start.elapsed() > span.mul_f64(0.4) { 0.9 } else { rng.gen::<f64>() };
        match roll {
            r if r < 0.35 => {
                let a = rng.gen_range(0..n);
                let b = (a + rng.gen_range(1..n)) % n;
                let cut_for = Duration::from_millis(rng.gen_range(500..3000));
                log(&mut events, format!("partition c{} <-> c{} for {:.1}s", a + 1, b + 1, cut_for.as_secs_f64()));
                let p = proxies.clone();
                p[&(a, b)].partition(true);
                p[&(b, a)].partition(true);
                let link = (a.min(b), a.max(b));
                let epoch = {
                    let mut c = cuts.lock().unwrap_or_else(|e| e.into_inner());
                    let e = c.entry(link).or_default();
                    *e += 1;
                    *e
                };
                let cuts = cuts.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(cut_for).await;
                    if cuts.lock().unwrap_or_else(|e| e.into_inner()).get(&link) == Some(&epoch) {
                        p[&(a, b)].partition(false);
                        p[&(b, a)].partition(false);
                    }
                });
            }
            r if r < 0.65 => {
                let f = Faults {
                    drop: rng.gen_range(0.0..0.15),
                    duplicate: rng.gen_range(0.0..0.1),
                    reorder: rng.gen_range(0.0..0.1),
                    max_delay: Duration::from_millis(rng.gen_range(0..30)),
                };
                let lasts = Duration::from_millis(rng.gen_range(1000..4000));
                log(
                    &mut events,
                    format!(
                        "network: drop {:.0}%, duplicate {:.0}%, reorder {:.0}%, delay up to {} ms, for {:.1}s",
                        f.drop * 100.0,
                        f.duplicate * 100.0,
                        f.reorder * 100.0,
                        f.max_delay.as_millis(),
                        lasts.as_secs_f64()
                    ),
                );
                for p in proxies.values() {
                    p.set_faults(f);
                }
                let p = proxies.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(lasts).await;
                    for x in p.values() {
                        x.set_faults(Faults::default());
                    }
                });
            }
            r if r < 0.95 => {
                let i = rng.gen_range(0..n);
                let down_for = Duration::from_millis(rng.gen_range(200..1500));
                let mut s = suts[i].lock().await;
                if !s.is_running() {
                    continue;
                }
                killed_once = true;
                log(&mut events, format!("kill -9 c{}, restart after {:.1}s", i + 1, down_for.as_secs_f64()));
                s.kill9().await;
                drop(s);
                let suts = suts.clone();
                restarts.push(tokio::spawn(async move {
                    tokio::time::sleep(down_for).await;
                    let mut s = suts[i].lock().await;
                    s.start().await.with_context(|| format!("restarting c{}", i + 1))
                }));
            }
            _ => {}
        }
    }
    for r in restarts {
        match r.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log(&mut events, format!("restart failed: {e:#}")),
            Err(e) => log(&mut events, format!("restart task failed: {e}")),
        }
    }
    events
}

/// The report as a table for people.
pub fn table(r: &ChaosReport) -> String {
    let mut s = format!(
        "chaos run: seed {}, {} servers, {} users, {} sends over {} s\n",
        r.seed, r.servers, r.users, r.attempted, r.seconds
    );
    for e in &r.events {
        s.push_str(&format!("  {e}\n"));
    }
    let d = &r.datagrams;
    s.push_str(&format!(
        "datagrams: {} forwarded, {} dropped, {} duplicated, {} reordered, {} cut by partitions\n",
        d.forwarded, d.dropped, d.duplicated, d.reordered, d.cut_by_partitions
    ));
    s.push_str(&format!(
        "sends: {} acknowledged, {} refused or unreachable, {} unknown outcome ({} of them arrived), {} needed a retry\n",
        r.acknowledged, r.refused, r.unknown, r.unknown_arrived, r.retried
    ));
    s.push_str(&match r.drained_in_ms {
        Some(ms) => format!("drained {ms} ms after healing\n"),
        None => "NOT drained before the deadline\n".to_owned(),
    });
    let rows: [(&str, usize, &[String]); 6] = [
        ("acknowledged sends lost", r.lost, &r.lost_examples),
        ("duplicates", r.duplicates, &r.duplicate_examples),
        ("unexpected messages", r.unexpected, &r.unexpected_examples),
        ("conversations ordered differently on the two servers", r.order_mismatches, &[]),
        ("conversation views with a gap in an origin's sequence", r.gaps, &[]),
        ("senders whose messages left their send order", r.send_order_violations, &[]),
    ];
    s.push_str(&format!("{:<56} {:>6}  (must be 0)\n", "check", "found"));
    for (what, n, ex) in rows {
        s.push_str(&format!("{what:<56} {n:>6}\n"));
        for e in ex {
            s.push_str(&format!("    e.g. {e}\n"));
        }
    }
    s.push_str(&format!("conversations: {}; verdict: {}", r.conversations, if r.passed { "PASS" } else { "FAIL" }));
    s
}
