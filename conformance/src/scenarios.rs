//! The load generator's scenarios beyond steady live traffic (`load --scenario`): many
//! idle connected devices, a large stored history, a large queue behind a partition, and
//! a cold start on a full database. Each builds its state through the protocol, as users
//! would, then measures; each report is printed as text or one JSON object.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use missive_spec::{Content, UserId};
use serde::Serialize;

use crate::implementation::{password_of, ImplFile};
use crate::load::{stamped_body, sync_head, usage, Bench, LoadOptions, LoadReport, Mode, Percentiles, Watch};
use crate::wire::{client_endpoint, new_client_msg_id, Client, Subscription};

/// What `load --scenario` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Steady live traffic (the default).
    Live,
    Idle,
    History,
    Partition,
    ColdStart,
}

impl Scenario {
    pub fn parse(s: &str) -> Option<Scenario> {
        Some(match s {
            "live" => Scenario::Live,
            "idle" => Scenario::Idle,
            "history" => Scenario::History,
            "partition" => Scenario::Partition,
            "cold-start" => Scenario::ColdStart,
            _ => return None,
        })
    }
}

/// The sizes the scenarios build.
#[derive(Clone, Debug)]
pub struct ScenarioOptions {
    /// The live traffic measured alongside (rate, seconds, users, body).
    pub live: LoadOptions,
    /// `idle`: connections, each a device's live subscription ...
    pub devices: usize,
    /// ... of this many users' devices.
    pub device_users: usize,
    /// `history`, `cold-start`: messages stored before measuring.
    pub stored: u64,
    /// `partition`, `cold-start`: messages queued for a peer that is down.
    pub queued: u64,
    /// Sends in flight while filling.
    pub fill_concurrency: usize,
    /// `cold-start`: restarts measured.
    pub restarts: usize,
}

/// How a fill went: messages acknowledged and how fast.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Fill {
    pub messages: u64,
    pub seconds: f64,
    pub rate: f64,
    /// Sends answered with an error and sent again (same client_msg_id).
    pub retries: u64,
}

/// Sends `n` messages numbered `first..first + n`, stamped with `tag`, over `pairs`
/// round robin, `concurrency` at a time. A failed send is retried with its client_msg_id
/// (idempotent, §6.4), so every message is acknowledged exactly once or the fill fails.
pub async fn fill(pairs: &[(Client, UserId)], tag: &str, first: u64, n: u64, body: usize, concurrency: usize) -> anyhow::Result<Fill> {
    if pairs.is_empty() {
        bail!("no sender to fill with");
    }
    let t0 = Instant::now();
    let retries = Arc::new(AtomicU64::new(0));
    let mut inflight = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    while sent < n || !inflight.is_empty() {
        while sent < n && inflight.len() < concurrency.max(1) {
            let k = first + sent;
            let (c, to) = pairs[(k as usize) % pairs.len()].clone();
            let content = Content { body: stamped_body(tag, k, body), kind: "bench".into() };
            let retries = retries.clone();
            inflight.spawn(async move {
                let id = new_client_msg_id();
                let mut attempt = 0u32;
                loop {
                    match c.send(&to, content.clone(), id).await {
                        Ok(_) => return Ok(()),
                        Err(_) if attempt < 20 => {
                            attempt += 1;
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt.min(10)))).await;
                        }
                        Err(e) => return Err(anyhow::anyhow!("message {k} not acknowledged after {attempt} retries: {e}")),
                    }
                }
            });
            sent += 1;
        }
        if let Some(r) = inflight.join_next().await {
            r.context("fill task")??;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Fill { messages: n, seconds, rate: n as f64 / seconds.max(1e-9), retries: retries.load(Ordering::Relaxed) })
}

fn new_tag() -> String {
    format!("{:x}", rand::random::<u32>())
}

fn server_rss_mib(bench: &Bench, i: usize) -> f64 {
    bench.servers[i].pid().and_then(usage).map_or(0.0, |(rss, _)| rss)
}

fn server_cpu_s(bench: &Bench, i: usize) -> f64 {
    bench.servers[i].pid().and_then(usage).map_or(0.0, |(_, cpu)| cpu)
}

// ---------------------------------------------------------------------------------------
// idle

#[derive(Clone, Debug, Serialize)]
pub struct IdleReport {
    pub scenario: Scenario,
    pub devices: usize,
    pub device_users: usize,
    /// Registering the device users, then opening the connections and subscriptions.
    pub register_seconds: f64,
    pub connect_seconds: f64,
    pub server_rss_mib_before: f64,
    pub server_rss_mib_connected: f64,
    /// (connected − before) / devices.
    pub rss_kib_per_device: f64,
    /// Server CPU while the devices only keep their connections alive (no traffic).
    pub idle_cpu_cores: f64,
    pub idle_seconds: f64,
    /// Connections the server closed during the run (should be 0).
    pub dropped: u64,
    /// Live traffic before the devices connected, then with them connected.
    pub live_before: LoadReport,
    pub live_connected: LoadReport,
}

pub async fn idle(imp: Arc<ImplFile>, o: &ScenarioOptions, say: impl Fn(&str)) -> anyhow::Result<IdleReport> {
    let device_users = o.device_users.clamp(1, o.devices.max(1));
    let allow = o.devices + o.live.connections + 64;
    let bench = Bench::setup_allowing(imp, Mode::Local, o.live.users, o.live.connections, Some(allow)).await?;
    say("live traffic before the devices connect");
    let live_before = bench.run(&o.live).await?;

    say(&format!("registering {device_users} users"));
    let sut = &bench.servers[0];
    let t0 = Instant::now();
    let tokens = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let endpoint = client_endpoint(sut.client)?;
    for i in 0..device_users {
        let (endpoint, addr, name, key, tokens) = (endpoint.clone(), sut.client, sut.name.clone(), sut.key, tokens.clone());
        let user = sut.user_id(&format!("idle{i}"));
        tasks.spawn(async move {
            let mut c = Client::connect_via(&endpoint, addr, &name, key, Duration::from_secs(30)).await?;
            let s = c.register(&user, &password_of(user.localpart()), None, Some("idle".into())).await?;
            c.connection().close(0u32.into(), b"bye");
            tokens.lock().await.push(s.token);
            anyhow::Ok(())
        });
        while tasks.len() >= 8 {
            tasks.join_next().await.expect("tasks running").context("register task")??;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.context("register task")??;
    }
    let register_seconds = t0.elapsed().as_secs_f64();
    let tokens = Arc::new(std::mem::take(&mut *tokens.lock().await));
    // After the registrations, whose password hashes leave their memory behind.
    let server_rss_mib_before = server_rss_mib(&bench, 0);

    say(&format!("connecting {} devices", o.devices));
    let t0 = Instant::now();
    // A UDP socket per thousand connections, as a NAT would spread many devices.
    let endpoints: Vec<quinn::Endpoint> = (0..o.devices.div_ceil(1000).max(1)).map(|_| client_endpoint(sut.client)).collect::<Result<_, _>>()?;
    let mut held: Vec<(Client, Subscription)> = Vec::with_capacity(o.devices);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..o.devices {
        let (endpoint, addr, name, key, tokens) = (endpoints[i % endpoints.len()].clone(), sut.client, sut.name.clone(), sut.key, tokens.clone());
        tasks.spawn(async move {
            let c = Client::connect_via(&endpoint, addr, &name, key, Duration::from_secs(30)).await?;
            let c = c.as_device(Some(tokens[i % tokens.len()].clone()));
            let (sub, _, _) = c.subscribe(0).await?;
            anyhow::Ok((c, sub))
        });
        while tasks.len() >= 64 {
            held.push(tasks.join_next().await.expect("tasks running").context("connect task")??);
        }
    }
    while let Some(r) = tasks.join_next().await {
        held.push(r.context("connect task")??);
    }
    let connect_seconds = t0.elapsed().as_secs_f64();

    let idle_seconds = o.live.seconds.max(5.0);
    say(&format!("{} devices connected; {idle_seconds:.0} s idle", held.len()));
    let (cpu0, w0) = (server_cpu_s(&bench, 0), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(idle_seconds)).await;
    let idle_cpu_cores = (server_cpu_s(&bench, 0) - cpu0) / w0.elapsed().as_secs_f64();
    let server_rss_mib_connected = server_rss_mib(&bench, 0);

    say("live traffic with the devices connected");
    let live_connected = bench.run(&o.live).await?;
    let dropped = held.iter().filter(|(c, _)| c.connection().close_reason().is_some()).count() as u64;
    for (c, _) in &held {
        c.connection().close(0u32.into(), b"bye");
    }
    Ok(IdleReport {
        scenario: Scenario::Idle,
        devices: held.len(),
        device_users,
        register_seconds,
        connect_seconds,
        server_rss_mib_before,
        server_rss_mib_connected,
        rss_kib_per_device: (server_rss_mib_connected - server_rss_mib_before) * 1024.0 / held.len().max(1) as f64,
        idle_cpu_cores,
        idle_seconds,
        dropped,
        live_before,
        live_connected,
    })
}

// ---------------------------------------------------------------------------------------
// history

/// History pages of one conversation, measured at one size of the database.
#[derive(Clone, Debug, Serialize)]
pub struct Pages {
    /// Messages stored on the server in all, and in the conversation paged.
    pub stored: u64,
    pub conversation: u64,
    /// The newest page, asked for again and again (opening a chat).
    pub newest: Percentiles,
    /// Every page, walking back from the newest to the first message.
    pub walk: Percentiles,
    pub messages_walked: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct HistoryReport {
    pub scenario: Scenario,
    pub page_size: u32,
    pub fill: Fill,
    pub small: Pages,
    pub large: Pages,
    pub data_dir_mib: f64,
}

const PAGE: u32 = 50;

async fn pages(c: &Client, with: &UserId, stored: u64, conversation: u64, newest_repeats: usize) -> anyhow::Result<Pages> {
    let new_hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut newest = new_hist();
    for _ in 0..newest_repeats {
        let t = Instant::now();
        let p = c.history(with, Some(PAGE), None, None).await?;
        newest.record((t.elapsed().as_micros() as u64).max(1))?;
        anyhow::ensure!(!p.messages.is_empty(), "the newest page of a conversation with {conversation} messages is empty");
    }
    let mut walk = new_hist();
    let mut before = None;
    let mut walked = 0u64;
    loop {
        let t = Instant::now();
        let p = c.history(with, Some(PAGE), before, None).await?;
        walk.record((t.elapsed().as_micros() as u64).max(1))?;
        walked += p.messages.len() as u64;
        match p.older {
            Some(cursor) if !p.messages.is_empty() => before = Some(cursor),
            _ => break,
        }
    }
    anyhow::ensure!(walked == conversation, "walking the history gave {walked} messages of the {conversation} sent");
    Ok(Pages { stored, conversation, newest: Percentiles::of(&newest), walk: Percentiles::of(&walk), messages_walked: walked })
}

pub async fn history(imp: Arc<ImplFile>, o: &ScenarioOptions, say: impl Fn(&str)) -> anyhow::Result<HistoryReport> {
    let bench = Bench::setup(imp, Mode::Local, o.live.users, o.live.connections).await?;
    let pairs = bench.pairs();
    let (reader, with) = (&bench.recipients[0].1, &bench.senders[0].0);
    // Message k goes to pair k mod pairs: pair 0's conversation holds every pairs-th.
    let in_first = |n: u64| n.div_ceil(pairs.len() as u64);
    let tag = new_tag();
    let small_n = o.stored.min(1000);
    say(&format!("storing {small_n} messages"));
    let mut fill_total = fill(&pairs, &tag, 0, small_n, o.live.body, o.fill_concurrency).await?;
    let small = pages(reader, with, small_n, in_first(small_n), 500).await?;
    say(&format!("storing {} more messages", o.stored - small_n));
    let more = fill(&pairs, &tag, small_n, o.stored - small_n, o.live.body, o.fill_concurrency).await?;
    fill_total.messages += more.messages;
    fill_total.seconds += more.seconds;
    fill_total.retries += more.retries;
    fill_total.rate = fill_total.messages as f64 / fill_total.seconds.max(1e-9);
    say("paging");
    let large = pages(reader, with, o.stored, in_first(o.stored), 500).await?;
    Ok(HistoryReport { scenario: Scenario::History, page_size: PAGE, fill: fill_total, small, large, data_dir_mib: dir_mib(&bench.servers[0].data_dir) })
}

fn dir_mib(p: &std::path::Path) -> f64 {
    fn walk(p: &std::path::Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else { return 0 };
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(_) => e.metadata().map_or(0, |m| m.len()),
                Err(_) => 0,
            })
            .sum()
    }
    walk(p) as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------------------
// partition

#[derive(Clone, Debug, Serialize)]
pub struct PartitionReport {
    pub scenario: Scenario,
    /// Messages sent while the recipients' server was down (queued at the sender's).
    pub queued: u64,
    pub fill: Fill,
    /// From the recipients' server answering again to the first, and to the last, queued
    /// message reaching a recipient's live subscription (the first includes the sender's
    /// retry delay).
    pub first_drained_seconds: Option<f64>,
    pub drain_seconds: Option<f64>,
    pub drain_rate: Option<f64>,
    pub drained: u64,
    pub duplicates: u64,
    /// Live traffic before the partition, then while the queue drains.
    pub live_before: LoadReport,
    pub live_draining: LoadReport,
}

pub async fn partition(imp: Arc<ImplFile>, o: &ScenarioOptions, say: impl Fn(&str)) -> anyhow::Result<PartitionReport> {
    let live = LoadOptions { mode: Mode::Federated, ..o.live.clone() };
    let mut bench = Bench::setup(imp, Mode::Federated, live.users, live.connections).await?;
    say("live traffic before the partition");
    let live_before = bench.run(&live).await?;
    let mut heads = Vec::new();
    for (_, c) in &bench.recipients {
        heads.push(sync_head(c).await?);
    }
    say("stopping the recipients' server");
    bench.servers[1].stop().await?;
    let pairs = bench.pairs();
    let tag = new_tag();
    say(&format!("queueing {} messages", o.queued));
    let fill = fill(&pairs, &tag, 0, o.queued, live.body, o.fill_concurrency).await?;
    say("starting the recipients' server; live traffic while the queue drains");
    bench.servers[1].start().await?;
    let up = Instant::now();
    bench.reconnect(1).await?;
    let watch = Watch::new(&tag, o.queued, heads);
    // Whatever the live run's length, wait for the queue up to ten times the time it took
    // to fill, and at least a minute.
    let watch_for = Duration::from_secs_f64((fill.seconds * 10.0).max(60.0));
    let live_draining = bench.run_watching(&live, Some(watch.clone()), watch_for).await?;
    let (drained, duplicates) = watch.counts();
    let drain_seconds = watch.done_at().map(|t| t.duration_since(up).as_secs_f64());
    let first_drained_seconds = watch.first_at().map(|t| t.duration_since(up).as_secs_f64());
    Ok(PartitionReport {
        scenario: Scenario::Partition,
        queued: o.queued,
        fill,
        first_drained_seconds,
        drain_seconds,
        drain_rate: drain_seconds.map(|s| o.queued as f64 / s.max(1e-9)),
        drained,
        duplicates,
        live_before,
        live_draining,
    })
}

// ---------------------------------------------------------------------------------------
// cold start

#[derive(Clone, Debug, Serialize)]
pub struct Restart {
    /// Killed with SIGKILL (its WAL replayed at start) rather than stopped with SIGTERM.
    pub after_kill: bool,
    /// From spawning the server to its first answer to `info`.
    pub ready_ms: f64,
    /// From spawning to a device's first `sync` page and newest history page answered.
    pub serving_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ColdStartReport {
    pub scenario: Scenario,
    /// Messages between local users, and messages queued for a peer that stays down.
    pub stored: u64,
    pub queued: u64,
    pub fill_local: Fill,
    pub fill_queued: Fill,
    pub data_dir_mib: f64,
    pub restarts: Vec<Restart>,
}

pub async fn cold_start(imp: Arc<ImplFile>, o: &ScenarioOptions, say: impl Fn(&str)) -> anyhow::Result<ColdStartReport> {
    let mut bench = Bench::setup(imp, Mode::Federated, o.live.users, o.live.connections).await?;
    bench.servers[1].stop().await?;
    // Local conversations: each sender writes to the next sender.
    let n = bench.senders.len();
    let local: Vec<(Client, UserId)> = (0..n).map(|i| (bench.senders[i].1.clone(), bench.senders[(i + 1) % n].0.clone())).collect();
    let remote = bench.pairs();
    let tag = new_tag();
    let local_n = o.stored.saturating_sub(o.queued);
    say(&format!("storing {local_n} local messages"));
    let fill_local = fill(&local, &tag, 0, local_n, o.live.body, o.fill_concurrency).await?;
    say(&format!("queueing {} messages for the stopped peer", o.queued));
    let fill_queued = fill(&remote, &tag, local_n, o.queued, o.live.body, o.fill_concurrency).await?;
    let (reader, with) = (bench.senders[1 % n].0.clone(), bench.senders[0].0.clone());
    let token = bench.senders[1 % n].1.token().map(str::to_owned);
    let mut restarts = Vec::new();
    // The first restart follows a clean stop; the others a kill -9.
    for r in 0..o.restarts.max(1) {
        let after_kill = r > 0;
        if after_kill {
            bench.servers[0].kill9().await;
        } else {
            bench.servers[0].stop().await?;
        }
        let t0 = Instant::now();
        bench.servers[0].start().await?;
        let ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let sut = &bench.servers[0];
        let c = Client::connect(sut.client, &sut.name, sut.key).await?.as_device(token.clone());
        c.sync(0, Some(PAGE)).await.with_context(|| format!("sync as {reader} after restart {r}"))?;
        let page = c.history(&with, Some(PAGE), None, None).await?;
        let serving_ms = t0.elapsed().as_secs_f64() * 1000.0;
        anyhow::ensure!(local_n == 0 || !page.messages.is_empty(), "no history after restart {r}");
        c.close().await;
        let how = if after_kill { "after kill -9" } else { "after SIGTERM" };
        say(&format!("restart {} ({how}): ready in {ready_ms:.0} ms, serving in {serving_ms:.0} ms", r + 1));
        restarts.push(Restart { after_kill, ready_ms, serving_ms });
    }
    bench.reconnect(0).await?;
    Ok(ColdStartReport {
        scenario: Scenario::ColdStart,
        stored: o.stored,
        queued: o.queued,
        fill_local,
        fill_queued,
        data_dir_mib: dir_mib(&bench.servers[0].data_dir),
        restarts,
    })
}

// ---------------------------------------------------------------------------------------
// text

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn live_line(name: &str, r: &LoadReport) -> String {
    format!(
        "{name}: {:.0} msg/s offered, {}/{} delivered, delivery p50 {:.2} ms p99 {:.2} ms, server CPU {:.2} cores",
        r.offered_rate,
        r.delivered,
        r.offered,
        ms(r.delivery.p50_us),
        ms(r.delivery.p99_us),
        r.servers.iter().map(|s| s.cpu_cores).sum::<f64>()
    )
}

fn fill_line(name: &str, f: &Fill) -> String {
    format!("{name}: {} messages in {:.1} s ({:.0} msg/s, {} retries)", f.messages, f.seconds, f.rate, f.retries)
}

pub fn idle_text(r: &IdleReport) -> String {
    [
        format!(
            "idle: {} devices connected ({} users) in {:.1} s after {:.1} s registering; {} dropped",
            r.devices, r.device_users, r.connect_seconds, r.register_seconds, r.dropped
        ),
        format!(
            "server RSS {:.0} MiB before, {:.0} MiB connected: {:.1} KiB per device; idle CPU {:.3} cores over {:.0} s",
            r.server_rss_mib_before, r.server_rss_mib_connected, r.rss_kib_per_device, r.idle_cpu_cores, r.idle_seconds
        ),
        live_line("live before", &r.live_before),
        live_line("live connected", &r.live_connected),
    ]
    .join("\n")
}

fn pages_line(p: &Pages) -> String {
    format!(
        "{} stored ({} in the conversation): newest page p50 {:.2} ms p99 {:.2} ms; walk of {} messages p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        p.stored,
        p.conversation,
        ms(p.newest.p50_us),
        ms(p.newest.p99_us),
        p.messages_walked,
        ms(p.walk.p50_us),
        ms(p.walk.p99_us),
        ms(p.walk.max_us)
    )
}

pub fn history_text(r: &HistoryReport) -> String {
    [
        fill_line("fill", &r.fill),
        format!("history pages of {}:", r.page_size),
        format!("  {}", pages_line(&r.small)),
        format!("  {}", pages_line(&r.large)),
        format!("data directory {:.0} MiB", r.data_dir_mib),
    ]
    .join("\n")
}

pub fn partition_text(r: &PartitionReport) -> String {
    let drain = match (r.drain_seconds, r.drain_rate) {
        (Some(s), Some(rate)) => format!(
            "drained {} queued messages in {s:.1} s ({rate:.0} msg/s; the first after {:.1} s), {} duplicates",
            r.drained,
            r.first_drained_seconds.unwrap_or(0.0),
            r.duplicates
        ),
        _ => format!("NOT drained: {} of {} queued messages arrived, {} duplicates", r.drained, r.queued, r.duplicates),
    };
    [fill_line("queued while the peer was down", &r.fill), drain, live_line("live before", &r.live_before), live_line("live draining", &r.live_draining)].join("\n")
}

pub fn cold_start_text(r: &ColdStartReport) -> String {
    let mut lines = vec![
        fill_line("local messages", &r.fill_local),
        fill_line("queued for the stopped peer", &r.fill_queued),
        format!("data directory {:.0} MiB", r.data_dir_mib),
    ];
    for (i, s) in r.restarts.iter().enumerate() {
        let how = if s.after_kill { "after kill -9" } else { "after SIGTERM" };
        lines.push(format!("restart {} ({how}): ready {:.0} ms, serving {:.0} ms", i + 1, s.ready_ms, s.serving_ms));
    }
    lines.join("\n")
}
