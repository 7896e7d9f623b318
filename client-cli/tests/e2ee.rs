//! End-to-end encryption (spec e2ee.md) with two real servers, real RocksDB directories
//! and the `missive` CLI: every device of both users reads what was sent, the servers hold
//! only ciphertext, keys run out and come back, devices come and go.

use std::path::{Path, PathBuf};

use missive_cli::e2ee::recipients;
use missive_conformance::harness::ServerProcess;
use missive_spec::{ServerName, UserId};

mod common;

use common::*;

pub struct Pair {
    pub tmp: tempfile::TempDir,
    pub servers: Vec<ServerProcess>,
}

/// alpha.test (alice) and beta.test (bob), pinned to each other.
pub async fn pair() -> Pair {
    let (tmp, servers) = two_servers().await;
    Pair { tmp, servers }
}

impl Pair {
    /// A profile logged in as alice (on alpha) or bob (on beta): a device of its own.
    async fn device(&self, name: &str) -> PathBuf {
        let profile = self.tmp.path().join(name);
        let (user, srv, pw) = match name.starts_with('a') {
            true => ("@alice:alpha.test", &self.servers[0], "alice-password\n"),
            false => ("@bob:beta.test", &self.servers[1], "bob-password\n"),
        };
        ok(&profile, &["login", user, "--server", &srv.addr.to_string(), "--password-stdin"], Some(pw)).await;
        profile
    }
}

fn texts(out: &str) -> Vec<String> {
    json_lines(out).iter().filter(|v| v["type"] == "message").filter_map(|v| v["text"].as_str().map(str::to_owned)).collect()
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
                found.push(p);
            }
        }
    }
    found
}

/// A deadline for polling: each command the loop runs takes a round trip or more, so a
/// loop polls at that pace, and fails after a minute.
struct Deadline(std::time::Instant);

fn deadline() -> Deadline {
    Deadline(std::time::Instant::now() + std::time::Duration::from_secs(60))
}

impl Deadline {
    fn check(&self, what: &str) {
        assert!(std::time::Instant::now() < self.0, "timed out waiting until {what}");
    }
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = deadline();
    while !check().await {
        until.check(what);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_of_both_users_reads_every_message_and_the_servers_hold_only_ciphertext() {
    let mut p = pair().await;
    let (a1, a2) = (p.device("a1").await, p.device("a2").await);
    // Bob's devices log in and go away: keys are claimed while he is offline.
    let (b1, b2) = (p.device("b1").await, p.device("b2").await);
    let sent: Vec<String> = (0..50).map(|i| format!("e2ee-marker-{i:02}")).collect();
    for t in &sent {
        ok(&a1, &["send", "@bob:beta.test", t], None).await;
    }
    // A control: the same scan finds a marker sent in plaintext, so it would find these.
    ok(&a1, &["send", "--plaintext", "@bob:beta.test", "plain-control-marker"], None).await;
    let mut expected = sent.clone();
    expected.push("plain-control-marker".into());

    for (name, dev) in [("b1", &b1), ("b2", &b2)] {
        let (mut got, until) = (Vec::new(), deadline());
        while got.len() < expected.len() {
            until.check(&format!("{name} has every message"));
            got.extend(texts(&ok(dev, &["--json", "sync"], None).await));
        }
        assert_eq!(got, expected, "{name} read them in order, once each");
        // Read again later, from its own store: the history shows the same, decrypted.
        let history = ok(dev, &["--json", "history", "@alice:alpha.test", "--limit", "100"], None).await;
        let mut h = texts(&history);
        h.reverse();
        assert_eq!(h, expected, "{name}'s history");
        let lines = json_lines(&history);
        assert!(lines.iter().filter(|v| v["type"] == "message").skip(1).take(50).all(|v| v["encrypted"] == true), "{history}");
    }
    // Alice's other device reads what her first one sent; the sender shows its own.
    for (name, dev) in [("a2", &a2), ("a1", &a1)] {
        let got = texts(&ok(dev, &["--json", "sync"], None).await);
        assert_eq!(got, expected, "{name} reads alice's messages");
    }

    for srv in p.servers.iter_mut() {
        srv.terminate().await.unwrap();
    }
    for srv in &p.servers {
        let leaked = files_containing(&srv.dir, b"e2ee-marker");
        assert!(leaked.is_empty(), "plaintext on {}'s disk: {leaked:?}", srv.name);
        assert!(!files_containing(&srv.dir, b"plain-control-marker").is_empty(), "the scan of {} cannot see plaintext", srv.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_keys_run_out_the_fallback_key_serves_and_new_ones_come() {
    let p = pair().await;
    let b1 = p.device("b1").await;
    let bob = UserId::parse("@bob:beta.test").unwrap();
    let b1_device = json_lines(&ok(&b1, &["--json", "devices"], None).await);
    let b1_id = b1_device.iter().find(|v| v["current"] == true).and_then(|v| v["id"].as_str()).unwrap().to_owned();
    let device = missive_spec::DeviceId::parse(&b1_id).unwrap();

    // Someone on alpha claims every one-time key of bob's device, across federation.
    let alpha = &p.servers[0];
    let mut c = missive_cli::Client::connect(alpha.addr, &ServerName::parse("alpha.test").unwrap(), missive_federation::tls::Pin::FirstUse).await.unwrap();
    c.login(&UserId::parse("@alice:alpha.test").unwrap(), "alice-password", None).await.unwrap();
    let claim = |c: &missive_cli::Client| {
        let (bob, device) = (bob.clone(), device.clone());
        let c = c.clone();
        async move {
            match c.request(missive_spec::Request::KeysClaim { user: bob, devices: vec![device] }).await.unwrap() {
                missive_spec::Response::Claimed { keys } => keys,
                r => panic!("{r:?}"),
            }
        }
    };
    let mut ids = std::collections::HashSet::new();
    for _ in 0..missive_cli::e2ee::ONE_TIME_TARGET {
        let keys = claim(&c).await;
        assert_eq!(keys.len(), 1);
        assert!(!keys[0].fallback);
        assert!(ids.insert(keys[0].key.key.clone()), "a one-time key was handed out twice");
    }
    let fallback = claim(&c).await;
    assert!(fallback[0].fallback, "with none left, the fallback key: {fallback:?}");

    // Alice's new device can only use the fallback key; bob reads it all the same.
    let a1 = p.device("a1").await;
    ok(&a1, &["send", "@bob:beta.test", "over the fallback key"], None).await;
    let (mut got, until) = (Vec::new(), deadline());
    while got.is_empty() {
        until.check("b1 reads the message");
        got.extend(texts(&ok(&b1, &["--json", "sync"], None).await));
    }
    assert_eq!(got, ["over the fallback key"]);
    // Reading it made bob's device publish new one-time keys.
    let again = claim(&c).await;
    assert!(!again[0].fallback && !ids.contains(&again[0].key.key), "one-time keys were not replenished: {again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_is_announced_reads_what_follows_and_a_revoked_one_is_left_out() {
    let p = pair().await;
    let (a1, b1, b2) = (p.device("a1").await, p.device("b1").await, p.device("b2").await);
    ok(&a1, &["send", "@bob:beta.test", "before the new device"], None).await;
    wait_for("b1 has it", || async { !texts(&ok(&b1, &["--json", "sync"], None).await).is_empty() }).await;
    ok(&b1, &["send", "@alice:alpha.test", "hello alice"], None).await;
    wait_for("a1 has bob's reply", || async { texts(&ok(&a1, &["--json", "sync"], None).await).contains(&"hello alice".to_owned()) }).await;

    // Bob adds a third device: alice hears of it (a devices event), loudly.
    let b3 = p.device("b3").await;
    let (mut said, until) = (String::new(), deadline());
    while !said.contains("@bob:beta.test's devices changed: new device") {
        until.check(&format!("alice is told of bob's new device; she was told: {said}"));
        let out = run(&a1, &["sync"], None).await;
        said.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    ok(&a1, &["send", "@bob:beta.test", "after the new device"], None).await;
    let (mut got, until) = (Vec::new(), deadline());
    while !got.iter().any(|v: &serde_json::Value| v["text"] == "after the new device") {
        until.check("b3 has the new message");
        got = json_lines(&ok(&b3, &["--json", "history", "@alice:alpha.test"], None).await);
    }
    // The rule for earlier messages (E7): not readable on a device added later.
    let earlier = got.iter().find(|v| v["seq"] == 1 && v["origin"] == "alpha.test").expect("the first message is listed");
    assert_eq!(earlier["encrypted"], true);
    assert!(earlier["undecryptable"].as_str().is_some_and(|w| w.contains("not encrypted for this device")), "{earlier}");

    // Bob revokes b2 from b1: what alice sends afterwards is not encrypted to it.
    let devices = json_lines(&ok(&b2, &["--json", "devices"], None).await);
    let b2_id = devices.iter().find(|v| v["current"] == true).and_then(|v| v["id"].as_str()).unwrap().to_owned();
    ok(&b1, &["revoke", &b2_id], None).await;
    ok(&a1, &["send", "@bob:beta.test", "after the revocation"], None).await;
    let beta = &p.servers[1];
    let mut c = missive_cli::Client::connect(beta.addr, &ServerName::parse("beta.test").unwrap(), missive_federation::tls::Pin::FirstUse).await.unwrap();
    c.login(&UserId::parse("@bob:beta.test").unwrap(), "bob-password", None).await.unwrap();
    let (mut last, until) = (None::<missive_spec::Message>, deadline());
    while !last.as_ref().is_some_and(|m| m.seq == 3 && m.origin.as_str() == "alpha.test") {
        until.check("beta stores the last message");
        let page = c.history(&UserId::parse("@alice:alpha.test").unwrap(), Some(1), None, None).await.unwrap();
        last = page.messages.into_iter().next();
    }
    let to = recipients(&last.unwrap().content).expect("an encrypted message");
    assert!(!to.iter().any(|(_, d)| *d == b2_id), "encrypted to the revoked device: {to:?}");
    assert!(to.iter().filter(|(u, _)| u == "@bob:beta.test").count() == 2, "b1 and b3: {to:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_peers_new_device_stops_sending_until_verified_again() {
    let p = pair().await;
    let (a1, _b1) = (p.device("a1").await, p.device("b1").await);
    let shown = json_lines(&ok(&a1, &["--json", "verify", "--show", "@bob:beta.test"], None).await);
    let compared = shown[0]["number"].as_str().unwrap().to_owned();
    assert_eq!(shown[0]["verified"], false);
    ok(&a1, &["verify", "@bob:beta.test", "--number", &compared], None).await;
    ok(&a1, &["send", "@bob:beta.test", "to the verified devices"], None).await;

    // Bob adds a device: alice's next message does not go, and says why.
    let _b2 = p.device("b2").await;
    let err = fails(&a1, &["send", "@bob:beta.test", "must wait"], None).await;
    assert!(err.contains("changed since you verified") && err.contains("new device"), "{err}");
    assert!(run(&a1, &["outbox"], None).await.stdout.is_empty(), "a refused message must not wait to go out later");
    // The number compared before is no longer the number: verifying with it is refused.
    let stale = fails(&a1, &["verify", "@bob:beta.test", "--number", &compared], None).await;
    assert!(stale.contains("compare again"), "{stale}");
    let fresh = json_lines(&ok(&a1, &["--json", "verify", "@bob:beta.test"], None).await);
    assert_ne!(fresh[0]["number"], compared.as_str());
    ok(&a1, &["send", "@bob:beta.test", "after verifying again"], None).await;
}
