//! Federation between real `missived` processes on their own loopback addresses:
//! exactly-once delivery, identical order on both ends, peer outages and crashes.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use missive_spec::{Message, UserId};

/// Waits until `reader`'s history with `with` has `n` messages; returns it, newest first.
async fn history_of(reader: &missive_cli::Client, with: &UserId, n: usize) -> Vec<Message> {
    eventually(&format!("{n} messages with {with}"), || async {
        let h = full_history(reader, with, 200).await;
        (h.len() >= n).then_some(h)
    })
    .await
}

fn assert_exactly_once_gap_free(h: &[Message], origins: &[&str], per_origin: u64) {
    let ids: HashSet<_> = h.iter().map(|m| (m.origin.clone(), m.seq)).collect();
    assert_eq!(ids.len(), h.len(), "a message appears twice");
    for o in origins {
        let mut seqs: Vec<u64> = h.iter().filter(|m| m.origin.as_str() == *o).map(|m| m.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=per_origin).collect::<Vec<_>>(), "messages from {o} missing or doubled");
    }
    for w in h.windows(2) {
        assert!(w[0].order_key() > w[1].order_key(), "history not in canonical order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_exchange_200_each_way_exactly_once_in_one_order() {
    let (_d, s) = federated(&["alpha.test", "beta.test", "gamma.test"]).await;
    let users = ["alice", "bob", "carol"];
    let mut clients = Vec::new();
    for (srv, u) in s.iter().zip(users) {
        clients.push(Arc::new(register(srv, u).await));
    }
    let ids: Vec<UserId> = s.iter().zip(users).map(|(srv, u)| uid(u, srv)).collect();
    const N: usize = 200;
    let mut tasks = tokio::task::JoinSet::new();
    for (a, b) in [(0, 1), (1, 2), (0, 2)] {
        for (from, to) in [(a, b), (b, a)] {
            let c = clients[from].clone();
            let to = ids[to].clone();
            tasks.spawn(async move {
                for i in 0..N {
                    c.send_text(&to, &format!("{} -> {to} #{i}", from)).await.unwrap();
                }
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    for (a, b) in [(0, 1), (1, 2), (0, 2)] {
        let on_a = history_of(&clients[a], &ids[b], 2 * N).await;
        let on_b = history_of(&clients[b], &ids[a], 2 * N).await;
        assert_eq!(on_a.len(), 2 * N);
        assert_eq!(on_a, on_b, "{} and {} show different histories", s[a].name, s[b].name);
        assert_exactly_once_gap_free(&on_a, &[&s[a].name, &s[b].name], N as u64);
        // Each recipient's event stream got each remote message exactly once.
        let mut events = Vec::new();
        let mut pos = 0;
        loop {
            let (next, evs) = clients[b].sync(pos, None).await.unwrap();
            if evs.is_empty() {
                break;
            }
            events.extend(evs);
            pos = next;
        }
        let from_a: Vec<_> = messages(&events).into_iter().filter(|m| m.from == ids[a]).collect();
        assert_eq!(from_a.len(), N);
        assert_eq!(from_a.iter().map(|m| m.seq).collect::<HashSet<_>>().len(), N);
    }
    for srv in &s {
        for other in &s {
            if srv.name != other.name {
                let depth = eventually("queues to drain", || async {
                    let d = queue_depth(srv, &other.name).await;
                    (d == 0).then_some(d)
                })
                .await;
                assert_eq!(depth, 0);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_down_for_a_while_gets_everything_in_order_and_the_queue_drains() {
    let (_d, mut s) = federated(&["alpha.test", "beta.test"]).await;
    let alice = register(&s[0], "alice").await;
    let bob = register(&s[1], "bob").await;
    let (alice_id, bob_id) = (uid("alice", &s[0]), uid("bob", &s[1]));
    for i in 0..10 {
        alice.send_text(&bob_id, &format!("before {i}")).await.unwrap();
    }
    history_of(&bob, &alice_id, 10).await;

    s[1].kill9().await;
    for i in 0..40 {
        alice.send_text(&bob_id, &format!("while beta is down {i}")).await.unwrap();
    }
    let waiting = queue_depth(&s[0], "beta.test").await;
    assert!(waiting > 0, "sends while beta is down must wait in alpha's queue");
    // The operator view reports the link down (after the attempt in flight times out).
    eventually("alpha to report the link down", || async {
        let status = s[0].peers_json().await.unwrap().join("\n");
        status.contains("\"up\":false").then_some(())
    })
    .await;

    s[1].restart().await.unwrap();
    let bob = login(&s[1], "bob").await;
    let on_beta = history_of(&bob, &alice_id, 50).await;
    let on_alpha = full_history(&alice, &bob_id, 200).await;
    assert_eq!(on_beta, on_alpha);
    assert_exactly_once_gap_free(&on_beta, &["alpha.test"], 50);
    eventually("alpha's queue to drain", || async { (queue_depth(&s[0], "beta.test").await == 0).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_killed_with_a_full_queue_resumes_it_exactly() {
    let (_d, mut s) = federated(&["alpha.test", "beta.test"]).await;
    let alice = register(&s[0], "alice").await;
    let _ = register(&s[1], "bob").await;
    let (alice_id, bob_id) = (uid("alice", &s[0]), uid("bob", &s[1]));
    s[1].kill9().await;
    let mut acks = Vec::new();
    for i in 0..30 {
        acks.push(alice.send_text(&bob_id, &format!("queued {i}")).await.unwrap());
    }
    assert_eq!(queue_depth(&s[0], "beta.test").await, 30);
    s[0].kill9().await;
    s[1].restart().await.unwrap();
    s[0].restart().await.unwrap();
    let bob = login(&s[1], "bob").await;
    let got = history_of(&bob, &alice_id, 30).await;
    let mut want = acks.clone();
    want.reverse();
    assert_eq!(got, want, "the resumed queue lost, doubled or changed messages");
    eventually("alpha's queue to drain", || async { (queue_depth(&s[0], "beta.test").await == 0).then_some(()) }).await;
    // And the conversation goes on both ways.
    let reply = bob.send_text(&alice_id, "got them all").await.unwrap();
    let alice = login(&s[0], "alice").await;
    let h = history_of(&alice, &bob_id, 31).await;
    assert_eq!(h[0], reply);
}

/// Two servers, alpha with long retry delays; beta is killed after a message to it was
/// sent, and alpha has backed off. Returns the servers, that message, and how long
/// alpha's backoff had left (more than 10 s).
async fn alpha_backing_off_toward_beta(dir: &std::path::Path) -> (Vec<missive_conformance::harness::ServerProcess>, Message, u64) {
    let mut s = Vec::new();
    for (i, name) in ["alpha.test", "beta.test"].iter().enumerate() {
        let data = dir.join(name);
        missive_conformance::harness::ServerProcess::init_on(missived(), &data, name, "open", [127, 0, 0, 2 + i as u8].into())
            .await
            .unwrap();
        if i == 0 {
            // Long retry delays: only a reset can explain a prompt delivery.
            let cfg = data.join("missived.toml");
            let text = std::fs::read_to_string(&cfg).unwrap().replace("retry_base_ms = 200", "retry_base_ms = 30000");
            std::fs::write(&cfg, text).unwrap();
        }
        s.push(missive_conformance::harness::ServerProcess::start(missived(), &data, name).await.unwrap());
    }
    s[0].pin_peer(&s[1]).await.unwrap();
    s[1].pin_peer(&s[0]).await.unwrap();
    let alice = register(&s[0], "alice").await;
    let _ = register(&s[1], "bob").await;

    s[1].kill9().await;
    let m = alice.send_text(&uid("bob", &s[1]), "waiting for beta").await.unwrap();
    // The attempt fails and alpha backs off for 15 to 30 s.
    let retry_in = eventually("alpha to back off", || async {
        s[0].peers_json().await.unwrap().into_iter().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            (v["name"] == "beta.test" && v["failures"].as_u64() >= Some(1)).then(|| v["next_retry_in_ms"].as_u64().unwrap_or(0))
        })
    })
    .await;
    assert!(retry_in > 10_000, "expected a long backoff, got {retry_in} ms");
    (s, m, retry_in)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_resets_the_moment_the_peer_contacts_us() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, m, retry_in) = alpha_backing_off_toward_beta(dir.path()).await;
    let alice_id = uid("alice", &s[0]);
    s[1].restart().await.unwrap();
    let bob = login(&s[1], "bob").await;
    // beta connects to alpha (at its start, FED-SEND-9, and for bob's message), which
    // resets alpha's backoff toward beta: alpha sends at once instead of waiting it out.
    let sent_at = tokio::time::Instant::now();
    bob.send_text(&alice_id, "hello alpha").await.unwrap();
    eventually("alice's message to reach bob", || async {
        let h = full_history(&bob, &alice_id, 10).await;
        h.contains(&m).then_some(())
    })
    .await;
    let waited = sent_at.elapsed();
    println!("delivered {waited:?} after beta contacted alpha (backoff had {retry_in} ms left)");
    assert!(waited.as_millis() < u128::from(retry_in) - 5_000, "alpha waited out its backoff ({waited:?})");
}

/// A restarted server connects to its peers (FED-SEND-9): what they queued while it was
/// down arrives at once, not after their backoff, although nobody on it writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_tells_its_peers_and_their_queues_resume_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, m, retry_in) = alpha_backing_off_toward_beta(dir.path()).await;
    // Nobody logs in to beta until alpha's queue is empty: a login would send presence,
    // and that contact alone would reset alpha's backoff.
    let started = tokio::time::Instant::now();
    s[1].restart().await.unwrap();
    eventually("alpha's queue for beta to drain", || async {
        s[0].peers_json().await.unwrap().into_iter().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            (v["name"] == "beta.test" && v["queue_depth"].as_u64() == Some(0)).then_some(())
        })
    })
    .await;
    let waited = started.elapsed();
    println!("delivered {waited:?} after beta started (alpha's backoff had {retry_in} ms left)");
    assert!(waited.as_millis() < u128::from(retry_in) - 5_000, "alpha waited out its backoff ({waited:?})");
    let bob = login(&s[1], "bob").await;
    assert!(full_history(&bob, &uid("alice", &s[0]), 10).await.contains(&m));
    // beta remembered alpha, with which it had an authenticated connection, for its next
    // start.
    s[1].terminate().await.unwrap();
    use missive_server::store::Store;
    let db = missive_server::store::rocks::RocksStore::open(&dir.path().join("beta.test").join("db")).unwrap();
    let known = db.get(missive_server::store::Cf::Meta, b"known_peers").unwrap().expect("the remembered peers were written");
    let known: Vec<missive_spec::ServerName> = missive_core::records::decode("meta", &known).unwrap();
    assert_eq!(known, vec![missive_spec::ServerName::parse("alpha.test").unwrap()]);
}

/// A queue that drains right after a restart must still take, and deliver, what comes
/// next: queue positions are never handed out again in one process, even for a lane the
/// writer first touches after its sender has emptied it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_drained_after_a_restart_still_delivers_what_comes_next() {
    let (_d, mut s) = federated(&["alpha.test", "beta.test"]).await;
    let alice = register(&s[0], "alice").await;
    let bob = register(&s[1], "bob").await;
    let bob_id = uid("bob", &s[1]);
    let alice_id = uid("alice", &s[0]);
    // Queue three while beta is down, then restart alpha with them queued.
    s[1].kill9().await;
    for i in 0..3 {
        alice.send_text(&bob_id, &format!("queued {i}")).await.unwrap();
    }
    let (a_token, b_token) = (alice.token().map(str::to_owned), bob.token().map(str::to_owned));
    drop((alice, bob));
    s[0].restart().await.unwrap();
    s[1].restart().await.unwrap();
    let mut alice = connect(&s[0]).await;
    alice.set_token(a_token);
    let mut bob = connect(&s[1]).await;
    bob.set_token(b_token);
    history_of(&bob, &alice_id, 3).await;
    eventually("alpha's queue to drain", || async { (queue_depth(&s[0], "beta.test").await == 0).then_some(()) }).await;
    // The first message after the drain, in the same conversation and lane.
    alice.send_text(&bob_id, "after the drain").await.unwrap();
    let h = history_of(&bob, &alice_id, 4).await;
    assert_eq!(h[0].content.as_text(), Some("after the drain"));
}

/// Spec §10.5: a message the recipient's server refuses for good (no such user there)
/// turns into an `undeliverable` event on every device of the sender, within seconds;
/// the next message to a real user still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_an_unknown_remote_user_fails_on_every_device_of_the_sender() {
    use missive_spec::{EventKind, Undeliverable};
    let (_d, s) = federated(&["alpha.test", "beta.test"]).await;
    let alice = register(&s[0], "alice").await;
    let phone = login(&s[0], "alice").await;
    let bob = register(&s[1], "bob").await;
    let (mut subs, mut backlog) = (Vec::new(), Vec::new());
    for c in [&alice, &phone] {
        let (sub, _, got) = c.subscribe(0).await.unwrap();
        subs.push(sub);
        backlog.push(got);
    }
    let nobody = uid("nobody", &s[1]);
    let sent = alice.send_text(&nobody, "anyone there?").await.unwrap();
    for (sub, got) in subs.iter_mut().zip(backlog) {
        let failed = tokio::time::timeout(DEADLINE, async {
            let mut got = got;
            loop {
                for e in got.drain(..) {
                    if let EventKind::Undeliverable(u) = e.event {
                        return u;
                    }
                }
                got = sub.next().await.unwrap().expect("subscription ended").1;
            }
        })
        .await
        .expect("no undeliverable event in time");
        assert_eq!(failed, Undeliverable { seq: sent.seq, conv: sent.conv, origin: sent.origin.clone(), reason: "unknown_recipient".into() });
    }
    // The refusal is recorded once: a later sync shows one event for it.
    let (_, events) = phone.sync(0, None).await.unwrap();
    assert_eq!(events.iter().filter(|e| matches!(e.event, EventKind::Undeliverable(_))).count(), 1);
    // A device logged in afterwards reads it from history (spec §6.6).
    let laptop = login(&s[0], "alice").await;
    let page = laptop.history(&nobody, None, None, None).await.unwrap();
    assert_eq!(page.failed, vec![Undeliverable { seq: sent.seq, conv: sent.conv, origin: sent.origin.clone(), reason: "unknown_recipient".into() }]);
    alice.send_text(&uid("bob", &s[1]), "hello bob").await.unwrap();
    assert_eq!(texts(&history_of(&bob, &uid("alice", &s[0]), 1).await), vec!["hello bob"]);
}

/// A message queued for a server not yet pinned leaves as soon as `missived peer add` pins
/// it, not when the backoff it entered ends: here that backoff is at least 60 s, longer
/// than the test waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_a_peer_sends_what_waited_for_it_at_once() {
    use missive_conformance::harness::ServerProcess;
    let dir = tempfile::tempdir().unwrap();
    let mut s = Vec::new();
    for (i, name) in ["alpha.test", "beta.test"].into_iter().enumerate() {
        let data = dir.path().join(name);
        ServerProcess::init_on(missived(), &data, name, "open", [127, 0, 0, 2 + i as u8].into()).await.unwrap();
        let cfg = data.join("missived.toml");
        let text = std::fs::read_to_string(&cfg).unwrap().replace("retry_base_ms = 200", "retry_base_ms = 120000").replace("retry_cap_ms = 60000", "retry_cap_ms = 120000");
        std::fs::write(&cfg, text).unwrap();
        s.push(ServerProcess::start(missived(), &data, name).await.unwrap());
    }
    s[1].pin_peer(&s[0]).await.unwrap();
    let alice = register(&s[0], "alice").await;
    let bob = register(&s[1], "bob").await;
    alice.send_text(&uid("bob", &s[1]), "waited for a pin").await.unwrap();
    // The first attempt fails (no pin, no discovery on loopback): alpha backs off.
    eventually("a failed attempt toward beta", || async {
        let lines = s[0].peers_json().await.ok()?;
        lines.iter().any(|l| l.contains("\"beta.test\"") && !l.contains("\"failures\":0")).then_some(())
    })
    .await;
    s[0].pin_peer(&s[1]).await.unwrap();
    assert_eq!(texts(&history_of(&bob, &uid("alice", &s[0]), 1).await), vec!["waited for a pin"]);
}

/// A peer that dies shows as down in `missived peers` within seconds, with nothing to
/// send: the link's keep-alives stop being answered and the connection's end marks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_shows_down_within_seconds() {
    let (_d, mut s) = federated(&["alpha.test", "beta.test"]).await;
    let alice = register(&s[0], "alice").await;
    let bob = register(&s[1], "bob").await;
    alice.send_text(&uid("bob", &s[1]), "are you up?").await.unwrap();
    history_of(&bob, &uid("alice", &s[0]), 1).await;
    let up = |lines: Vec<String>| lines.iter().any(|l| l.contains("\"beta.test\"") && l.contains("\"up\":true"));
    assert!(up(s[0].peers_json().await.unwrap()), "the link is not up after a delivery");
    s[1].kill9().await;
    let killed = std::time::Instant::now();
    // The idle timeout is 4 s; allow twice that for a loaded machine.
    while up(s[0].peers_json().await.unwrap()) {
        assert!(killed.elapsed() < std::time::Duration::from_secs(8), "beta still shows up {:?} after it died", killed.elapsed());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Replaces `[federation]` allow/deny of a running server and reloads it (F3.5).
async fn set_policy(srv: &missive_conformance::harness::ServerProcess, original: &str, lists: &str) {
    std::fs::write(&srv.config, original.replace("[federation]\n", &format!("[federation]\n{lists}\n"))).unwrap();
    let loaded = missive_server::config::Config::load(&srv.config).unwrap();
    let answer = missive_server::admin::call(&loaded.admin_socket(), &missive_server::admin::AdminRequest::Reload {}).await.unwrap();
    assert!(
        !matches!(answer, Some(missive_server::admin::AdminResponse::Error { .. }) | None),
        "reload failed: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_server_is_refused_both_ways_and_its_units_wait_until_it_is_allowed() {
    let (_d, s) = federated(&["alpha.test", "beta.test"]).await;
    let alice = register(&s[0], "alice").await;
    let bob = register(&s[1], "bob").await;
    let (alice_id, bob_id) = (uid("alice", &s[0]), uid("bob", &s[1]));
    let before = bob.send_text(&alice_id, "before").await.unwrap();
    eventually("the first message at alpha", || async { full_history(&alice, &bob_id, 10).await.contains(&before).then_some(()) }).await;
    let original = std::fs::read_to_string(&s[0].config).unwrap();

    set_policy(&s[0], &original, "deny = [\"beta.test\"]").await;
    let e = alice.send_text(&bob_id, "to a denied server").await.unwrap_err();
    assert_eq!(e.code(), Some(missive_spec::ErrorCode::RemoteUnavailable), "{e}");
    // bob's message waits at beta: alpha answers the open connection `forbidden`, then
    // refuses new ones at the handshake.
    let waiting = bob.send_text(&alice_id, "while denied").await.unwrap();
    let status = eventually("beta to report alpha refusing", || async {
        s[1].peers_json().await.unwrap().into_iter().find(|l| l.contains("alpha.test") && (l.contains("federation_refused") || l.contains("Forbidden")))
    })
    .await;
    assert!(status.contains("\"queue_depth\":1"), "{status}");
    assert!(!full_history(&alice, &bob_id, 10).await.contains(&waiting));
    eventually("a reconnection refused at the handshake", || async {
        s[1].peers_json().await.unwrap().into_iter().find(|l| l.contains("alpha.test") && l.contains("federation_refused"))
    })
    .await;

    // An allow list without beta refuses it too; with beta, what waited arrives.
    set_policy(&s[0], &original, "allow = [\"gamma.test\"]").await;
    assert!(alice.send_text(&bob_id, "not allowed").await.is_err());
    set_policy(&s[0], &original, "allow = [\"beta.test\"]").await;
    eventually("the waiting message at alpha", || async { full_history(&alice, &bob_id, 10).await.contains(&waiting).then_some(()) }).await;
    let sent = alice.send_text(&bob_id, "allowed again").await.unwrap();
    eventually("alice's message at beta", || async { full_history(&bob, &alice_id, 10).await.contains(&sent).then_some(()) }).await;
}
