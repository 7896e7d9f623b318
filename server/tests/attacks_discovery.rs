//! Attacks through discovery: anyone may open a QUIC connection to the federation port
//! with a self-made certificate naming any server, and the server then looks that name
//! up (spec F3.2). Here the named servers publish endless key documents. The server must
//! read no more of one than its limit (F2.2), share one lookup among the connections that
//! name the same server (F2.6), and keep serving its own users meanwhile.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use missive_federation::tls::{self, Pin, PinnedServerVerifier};
use missive_federation::{PublicKey, ServerKey};
use missive_spec::federation::FEDERATION_ALPN;

/// Rounds of the attack (at least), each a fresh server name named by `CONNECTIONS`
/// connections at once.
const ROUNDS: usize = 8;
const CONNECTIONS: usize = 3;
/// Messages a user sends, and another receives, while the attack runs.
const USER_MESSAGES: usize = 5;
/// How much the server's resident memory may grow while under attack.
const RSS_BUDGET: u64 = 64 << 20;

/// Resident memory of process `pid`, in bytes (`VmRSS` of `/proc/PID/status`).
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim();
    kib.parse::<u64>().ok().map(|k| k * 1024)
}

/// One attacker connection with a fresh key and a certificate naming `claimed`; returns
/// how the server closed it.
async fn attack(endpoint: &quinn::Endpoint, server: SocketAddr, server_key: PublicKey, claimed: &str) -> quinn::ConnectionError {
    let key = ServerKey::generate();
    let cfg = tls::federation_client_config(PinnedServerVerifier::new(Pin::Key(server_key)), &key, claimed, FEDERATION_ALPN).unwrap();
    let conn = endpoint.connect_with(cfg, server, "alpha.test").unwrap().await.expect("attacker handshake");
    tokio::time::timeout(DEADLINE, conn.closed()).await.expect("the server kept an unverifiable peer's connection open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_key_documents_cost_the_server_no_more_than_their_limit() {
    tls::install_provider();
    // Every *.evil.localhost serves its key document as an endless stream of bytes.
    // (`*.localhost` resolves to loopback without any DNS server, hence the test-only
    // flag that lets discovery connect there.)
    let evil = https::start(vec!["*.evil.localhost".into()], |_, _| https::Reply::Endless).await;
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, &evil.ca_pem).unwrap();
    let (_dir, srv) = server_with_config("alpha.test", "open", |c| {
        c.replace("https_port = 443", &format!("https_port = {}\nca_file = \"{}\"", evil.port, ca_file.display()))
            .replace("allow_special_addresses = false", "allow_special_addresses = true")
    })
    .await;
    let pid = srv.pid().unwrap();
    let server_key = PublicKey::parse(&srv.key).unwrap();

    // The server's own users, warmed up before the baseline is taken.
    let bob = register(&srv, "bob").await;
    let alice = register(&srv, "alice").await;
    alice.send_text(&uid("bob", &srv), "before").await.unwrap();
    let bob_history = |with: &'static str, n: usize| {
        let (bob, with) = (&bob, uid(with, &srv));
        async move { (full_history(bob, &with, 50).await.len() == n).then_some(()) }
    };
    eventually("bob to receive alice's message", || bob_history("alice", 1)).await;
    let start = rss(pid).unwrap();
    let peak = Arc::new(AtomicU64::new(start));
    let over = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (peak, over) = (peak.clone(), over.clone());
        async move {
            while !over.load(Ordering::SeqCst) {
                if let Some(r) = rss(pid) {
                    peak.fetch_max(r, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    // Attack rounds go on until the users below are done, and at least ROUNDS of them.
    let users_done = AtomicBool::new(false);
    let attackers = async {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut rounds = 0;
        while rounds < ROUNDS || !users_done.load(Ordering::SeqCst) {
            let claimed = format!("r{rounds}.evil.localhost");
            let one = || attack(&endpoint, srv.federation, server_key, &claimed);
            let (a, b, c) = tokio::join!(one(), one(), one());
            for close in [a, b, c] {
                match close {
                    quinn::ConnectionError::ApplicationClosed(a) => {
                        assert_eq!(&a.reason[..], b"cannot discover your keys", "round {rounds}: {a:?}")
                    }
                    other => panic!("round {rounds}: attacker connection ended with {other}"),
                }
            }
            rounds += 1;
        }
        rounds
    };
    // A user registers, sends and is read while the attack runs. (Registering hashes a
    // password with argon2id, 19 MiB, which the allocator may keep: part of the budget.)
    let users = async {
        let carol = register(&srv, "carol").await;
        for i in 0..USER_MESSAGES {
            tokio::time::timeout(Duration::from_secs(5), carol.send_text(&uid("bob", &srv), &format!("during the attack {i}")))
                .await
                .expect("a send took over 5 s during the attack")
                .unwrap();
            eventually("bob to receive carol's message", || bob_history("carol", i + 1)).await;
        }
        users_done.store(true, Ordering::SeqCst);
    };
    let (rounds, ()) = tokio::join!(attackers, users);
    over.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let peak = peak.load(Ordering::SeqCst).max(rss(pid).expect("the server died"));
    println!(
        "RSS {} MiB before, {} MiB at most during {rounds}x{CONNECTIONS} attacker connections and {USER_MESSAGES} messages; {} KiB of key documents sent",
        start >> 20,
        peak >> 20,
        evil.body_bytes() >> 10
    );
    assert!(peak < start + RSS_BUDGET, "RSS grew from {} MiB to {} MiB", start >> 20, peak >> 20);
    // One lookup per claimed name, however many connections named it.
    assert_eq!(evil.requests(), rounds, "key documents fetched");
}

