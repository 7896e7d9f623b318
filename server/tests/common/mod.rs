//! Helpers shared by the integration tests: real `missived` processes on loopback.
#![allow(dead_code)]

pub mod https;
pub mod nats;
pub mod cluster;

use std::path::Path;
use std::time::Duration;

use missive_cli::client::{Client, Subscription};
use missive_conformance::harness::ServerProcess;
use missive_federation::tls::Pin;
use missive_spec::{Event, Message, ServerName, UserId};

pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn missived() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_missived"))
}

/// A fresh server in its own temporary data directory.
pub async fn server(name: &str, registration: &str) -> (tempfile::TempDir, ServerProcess) {
    let dir = tempfile::tempdir().unwrap();
    let srv = ServerProcess::create(missived(), &dir.path().join("data"), name, registration).await.unwrap();
    (dir, srv)
}

/// A fresh server whose config is first passed through `edit`.
pub async fn server_with_config(name: &str, registration: &str, edit: impl FnOnce(String) -> String) -> (tempfile::TempDir, ServerProcess) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ServerProcess::init(missived(), &data, name, registration).await.unwrap();
    let cfg = data.join("missived.toml");
    std::fs::write(&cfg, edit(std::fs::read_to_string(&cfg).unwrap())).unwrap();
    let srv = ServerProcess::start(missived(), &data, name).await.unwrap();
    (dir, srv)
}

pub fn uid(local: &str, srv: &ServerProcess) -> UserId {
    UserId::parse(&format!("@{local}:{}", srv.name)).unwrap()
}

pub fn password(local: &str) -> String {
    format!("pw-{local}-secret")
}

pub async fn connect(srv: &ServerProcess) -> Client {
    Client::connect(srv.addr, &ServerName::parse(&srv.name).unwrap(), Pin::FirstUse).await.unwrap()
}

/// Registers `local` (the server must allow open registration) and returns its first device.
pub async fn register(srv: &ServerProcess, local: &str) -> Client {
    let mut c = connect(srv).await;
    c.register(&uid(local, srv), &password(local), None, None).await.unwrap();
    c
}

/// Logs `local` in as a new device.
pub async fn login(srv: &ServerProcess, local: &str) -> Client {
    let mut c = connect(srv).await;
    c.login(&uid(local, srv), &password(local), None).await.unwrap();
    c
}

#[allow(unused_imports)]
pub use missive_conformance::suite::messages;

/// Reads the subscription until `n` messages arrived (failing after the deadline).
pub async fn collect(sub: &mut Subscription, mut got: Vec<Event>, n: usize) -> Vec<Event> {
    let wait = async {
        while got.len() < n {
            match sub.next().await.unwrap() {
                Some((_, evs)) => got.extend(evs),
                None => panic!("subscription ended after {} events", got.len()),
            }
        }
        got
    };
    tokio::time::timeout(DEADLINE, wait).await.expect("events did not arrive in time")
}

pub fn texts(ms: &[Message]) -> Vec<String> {
    ms.iter().map(|m| m.content.as_text().unwrap().to_owned()).collect()
}

/// Every message of the conversation with `with`, newest first, paging by `limit`.
pub async fn full_history(c: &Client, with: &UserId, limit: u32) -> Vec<Message> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = c.history(with, Some(limit), before, None).await.unwrap();
        out.extend(page.messages);
        match page.older {
            Some(o) => before = Some(o),
            None => return out,
        }
    }
}

/// Waits until `check` returns `Some`, polling every 50 ms, failing after `DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Servers on their own loopback addresses (127.0.0.2, .3, …), each pinning all others.
pub async fn federated(names: &[&str]) -> (tempfile::TempDir, Vec<ServerProcess>) {
    let dir = tempfile::tempdir().unwrap();
    let servers = started(dir.path(), names).await;
    for a in &servers {
        for b in &servers {
            if a.name != b.name {
                a.pin_peer(b).await.unwrap();
            }
        }
    }
    (dir, servers)
}

/// Servers named `names`, open for registration, the i-th on 127.0.0.(2+i) with its data
/// in `dir/NAME`, started; they know nothing of each other.
pub async fn started(dir: &Path, names: &[&str]) -> Vec<ServerProcess> {
    let mut servers = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ip = std::net::IpAddr::from([127, 0, 0, 2 + i as u8]);
        let data = dir.join(name);
        ServerProcess::init_on(missived(), &data, name, "open", ip).await.unwrap();
        servers.push(ServerProcess::start(missived(), &data, name).await.unwrap());
    }
    servers
}

/// The queue depth toward `peer` that `missived peers --json` reports.
pub async fn queue_depth(srv: &ServerProcess, peer: &str) -> u64 {
    for line in srv.peers_json().await.unwrap() {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["name"] == peer {
            return v["queue_depth"].as_u64().unwrap();
        }
    }
    0
}

/// Samples the server's resident memory every 50 ms until `done` resolves; returns the
/// highest figure seen (KiB) with what `done` returned.
pub async fn peak_rss_while<T>(srv: &ServerProcess, done: impl std::future::Future<Output = T>) -> (u64, T) {
    let mut peak = srv.rss_kib().unwrap_or(0);
    tokio::pin!(done);
    loop {
        tokio::select! {
            v = &mut done => return (peak.max(srv.rss_kib().unwrap_or(0)), v),
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => peak = peak.max(srv.rss_kib().unwrap_or(0)),
        }
    }
}

/// The bound every memory attack test holds the server to, over its figure before.
pub const RSS_BOUND_KIB: u64 = 64 * 1024;

/// Runs every future at once as its own task; the outputs, in completion order.
pub async fn all_at_once<T: Send + 'static>(fs: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>) -> Vec<T> {
    let mut set = tokio::task::JoinSet::new();
    for f in fs {
        set.spawn(f);
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("attack task panicked"));
    }
    out
}
