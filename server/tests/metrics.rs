//! The operators' HTTP listener of real `missived` processes: `/metrics` read by an
//! independent Prometheus text parser while messages flow, `/health` and `/ready`.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use missive_conformance::harness::ServerProcess;
use missive_conformance::wire::new_client_msg_id;
use missive_spec::Content;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One `GET path` over a fresh TCP connection: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: missive\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut raw)).await.expect("no answer in time").unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// Every sample of a scrape, parsed by `prometheus-parse`, by metric name and labels.
struct Scrape(HashMap<(String, Vec<(String, String)>), f64>);

impl Scrape {
    async fn of(srv: &ServerProcess) -> Scrape {
        Scrape::at(srv.metrics.expect("no metrics listener")).await
    }

    async fn at(addr: SocketAddr) -> Scrape {
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        let lines = body.lines().map(|l| Ok(l.to_owned()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("the Prometheus parser refused /metrics");
        let mut out = HashMap::new();
        for s in parsed.samples {
            let mut labels: Vec<(String, String)> = s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            labels.sort();
            let value = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
                prometheus_parse::Value::Summary(_) => continue,
            };
            out.insert((s.metric, labels), value);
        }
        Scrape(out)
    }

    /// The sample `name{labels}`, 0 when absent (a counter not yet incremented).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut l: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        l.sort();
        self.0.get(&(name.to_owned(), l)).copied().unwrap_or(0.0)
    }
}

const SENDERS: usize = 4;
const EACH: usize = 60;
const REMOTE_EACH: usize = 10;

/// During a run of concurrent senders, `/metrics` parses and its counters only grow; at
/// the end they moved by exactly what was sent, on both servers of a federated pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_a_load_run_sent() {
    let (_dir, servers) = federated(&["alpha.test", "beta.test"]).await;
    let (alpha, beta) = (&servers[0], &servers[1]);
    let alpha_addr = alpha.metrics.expect("alpha has no metrics listener");
    assert_eq!(get(alpha_addr, "/health").await, (200, "ok\n".to_owned()));
    assert_eq!(get(alpha_addr, "/ready").await, (200, "ready\n".to_owned()));
    assert_eq!(get(alpha_addr, "/nothing").await.0, 404);

    let recipient = register(alpha, "rita").await;
    let remote = register(beta, "rolf").await;
    let (mut sub, _, backlog) = recipient.subscribe(0).await.unwrap();
    assert!(backlog.is_empty());
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(Arc::new(register(alpha, &format!("sam{i}")).await));
    }

    let before = Scrape::of(alpha).await;
    let beta_before = Scrape::of(beta).await;
    let sends = ("missive_client_requests_total", [("kind", "send"), ("code", "ok")]);
    let (rita, rolf) = (uid("rita", alpha), uid("rolf", beta));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Scrapes while the senders run: each parses, and no counter goes down.
    let scraper = {
        let running = running.clone();
        tokio::spawn(async move {
            let mut last = Scrape::at(alpha_addr).await;
            let mut scrapes = 1;
            while running.load(std::sync::atomic::Ordering::SeqCst) || scrapes < 3 {
                let now = Scrape::at(alpha_addr).await;
                for name in ["missive_messages_accepted_total", "missive_writer_commit_seconds_count", "missive_store_wal_syncs_total"] {
                    assert!(now.get(name, &[]) >= last.get(name, &[]), "{name} went down");
                }
                last = now;
                scrapes += 1;
            }
            scrapes
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for s in &senders {
        let (s, rita, rolf) = (s.clone(), rita.clone(), rolf.clone());
        tasks.spawn(async move {
            for i in 0..EACH {
                s.send_text(&rita, &format!("local {i}")).await.unwrap();
                if i < REMOTE_EACH {
                    s.send_text(&rolf, &format!("remote {i}")).await.unwrap();
                }
            }
            // An idempotent retry is answered but is no new message.
            let id = new_client_msg_id();
            let first = s.send(&rita, Content::text("once"), id).await.unwrap();
            assert_eq!(s.send(&rita, Content::text("once"), id).await.unwrap(), first);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(scraper.await.unwrap() >= 3);

    let local = SENDERS * (EACH + 1);
    let remote_n = SENDERS * REMOTE_EACH;
    collect(&mut sub, Vec::new(), local).await;
    let after = eventually("the recipient's events counted and beta's queue drained", || async {
        let s = Scrape::of(alpha).await;
        let delivered = s.get("missive_events_delivered_total", &[("kind", "message")]) - before.get("missive_events_delivered_total", &[("kind", "message")]);
        let queued = s.get("missive_federation_queue_depth", &[("peer", "beta.test")]);
        (delivered as usize >= local && queued == 0.0).then_some(s)
    })
    .await;
    let moved = |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    assert_eq!(moved("missive_messages_accepted_total", &[]) as usize, local + remote_n);
    assert_eq!(moved(sends.0, &sends.1) as usize, local + remote_n + SENDERS, "each retry is a request too");
    assert_eq!(moved("missive_events_delivered_total", &[("kind", "message")]) as usize, local);
    assert!(moved("missive_writer_commit_seconds_count", &[]) >= 1.0);
    assert!(moved("missive_store_wal_syncs_total", &[]) >= 1.0);
    assert!(after.get("missive_client_subscriptions", &[]) >= 1.0);
    assert!(after.get("missive_client_connections", &[]) >= (SENDERS + 1) as f64);
    assert!(moved("missive_federation_transactions_total", &[("peer", "beta.test"), ("outcome", "ok")]) >= 1.0);
    assert_eq!(after.get("missive_federation_peer_up", &[("peer", "beta.test")]), 1.0);
    assert!(after.get("missive_rocksdb", &[("figure", "estimated_keys"), ("cf", "messages")]) >= 1.0);
    let rss = alpha.rss_kib().unwrap() as f64 * 1024.0;
    let reported = after.get("process_resident_memory_bytes", &[]);
    assert!(reported > rss / 2.0 && reported < rss * 2.0, "resident memory {reported} B, /proc says {rss} B");
    assert!(after.get("process_cpu_seconds_total", &[]) > 0.0);

    // The peer stored exactly the remote messages, once each.
    let beta_after = eventually("beta stored the remote messages", || async {
        let s = Scrape::of(beta).await;
        let key = [("peer", "alpha.test"), ("result", "accepted")];
        let n = s.get("missive_federation_units_received_total", &key) - beta_before.get("missive_federation_units_received_total", &key);
        (n as usize >= remote_n).then_some(s)
    })
    .await;
    let key = [("peer", "alpha.test"), ("result", "accepted")];
    assert_eq!((beta_after.get("missive_federation_units_received_total", &key) - beta_before.get("missive_federation_units_received_total", &key)) as usize, remote_n);
    assert_eq!(beta_after.get("missive_federation_units_received_total", &[("peer", "alpha.test"), ("result", "equivocation")]), 0.0);
    drop(remote);

    // Every series the sample dashboard draws exists.
    let dashboard = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/grafana-missived.json")).unwrap();
    let names: std::collections::BTreeSet<&str> = after.0.keys().chain(beta_after.0.keys()).map(|(n, _)| n.as_str()).collect();
    for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("missive_") || word.starts_with("process_") {
            let base = word.strip_suffix("_bucket").unwrap_or(word);
            assert!(names.contains(word) || names.contains(base), "the dashboard draws {word}, which /metrics lacks");
        }
    }


    // A bad request is counted under its code.
    let bad = senders[0].send_text(&uid("nobody", alpha), "hello?").await;
    assert!(bad.is_err());
    let s = Scrape::of(alpha).await;
    assert_eq!(s.get(sends.0, &[("kind", "send"), ("code", "unknown_user")]), after.get(sends.0, &[("kind", "send"), ("code", "unknown_user")]) + 1.0);
}

/// `enabled = false` binds no listener.
#[tokio::test]
async fn the_listener_can_be_switched_off() {
    let (_dir, srv) = server_with_config("alpha.test", "open", |t| t.replace("enabled = true", "enabled = false")).await;
    assert!(srv.metrics.is_none(), "a disabled listener was announced");
}
