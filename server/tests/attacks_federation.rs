//! Attacks from a pinned peer that misbehaves: presence updates about users nobody here
//! talks to, and a flood of units behind a gap. Each is bounded, and a well-behaved peer
//! and the server's own users are served meanwhile, with nothing lost.

mod common;

use std::time::Instant;

use common::*;
use missive_conformance::harness::ServerProcess;
use missive_conformance::mock_peer::MockPeer;
use missive_spec::federation::{FedRequest, FedResponse, UnitResult};
use missive_spec::{PresenceUpdate, ServerName, UserId};

/// alpha and beta federating (both real), plus a mock peer pinned on alpha.
async fn alpha_beta_and_mock(edit: impl Fn(String) -> String) -> (tempfile::TempDir, Vec<ServerProcess>, MockPeer) {
    let (dir, mut servers) = federated(&["alpha.test", "beta.test"]).await;
    let cfg = &servers[0].config;
    std::fs::write(cfg, edit(std::fs::read_to_string(cfg).unwrap())).unwrap();
    servers[0].restart().await.unwrap();
    let mock = MockPeer::start("mock.test", [127, 0, 0, 9].into()).unwrap();
    servers[0].pin_peer_raw("mock.test", &mock.addr.to_string(), &mock.public().to_text()).await.unwrap();
    (dir, servers, mock)
}

#[tokio::test]
async fn presence_about_strangers_is_not_kept_and_contacts_are_still_told() {
    let (_d, servers, mock) = alpha_beta_and_mock(|c| c).await;
    let (alpha, beta) = (&servers[0], &servers[1]);
    let alice = register(alpha, "alice").await;
    let bob = register(beta, "bob").await;
    let (a, b) = (uid("alice", alpha), uid("bob", beta));
    // alice and bob share a conversation (both wrote in it): bob's presence reaches alice.
    alice.send_text(&b, "hi bob").await.unwrap();
    eventually("alice's message at beta", || async { (!bob.sync(0, None).await.unwrap().1.is_empty()).then_some(()) }).await;
    bob.send_text(&a, "hi alice").await.unwrap();
    eventually("bob's answer at alpha", || async { messages(&alice.sync(0, None).await.unwrap().1).iter().any(|m| m.from == b).then_some(()) }).await;
    let conn = mock.connect(&alpha.name, alpha.federation, &alpha.key).await.unwrap();
    let before = alpha.rss_kib().unwrap();
    // 300 requests of 1 000 updates each, about users nobody on alpha talks to.
    let flood = async {
        let mut answered = 0;
        for r in 0..300 {
            let presence = (0..1000)
                .map(|i| PresenceUpdate { user: UserId::parse(&format!("@stranger{r}x{i}:mock.test")).unwrap(), online: true, last_seen: None })
                .collect();
            if let Ok(FedResponse::Ok {}) = MockPeer::request(&conn, FedRequest::Edu { typing: Vec::new(), presence }).await {
                answered += 1;
            }
        }
        answered
    };
    let served = async {
        let (mut live, _, backlog) = alice.subscribe(0).await.unwrap();
        let (_bob_live, _, _) = bob.subscribe(0).await.unwrap();
        // bob came online: alice is told, through beta, during the flood.
        eventually("bob online at alice", || async {
            match alice.presence(&b).await {
                Ok(p) if p.online => Some(()),
                _ => None,
            }
        })
        .await;
        bob.send_text(&a, "served during the flood").await.unwrap();
        collect(&mut live, backlog, 3).await
    };
    let (peak, (answered, got)) = peak_rss_while(alpha, async { tokio::join!(flood, served) }).await;
    println!("{answered} of 300 presence floods answered; peak RSS +{} KiB over {before} KiB", peak.saturating_sub(before));
    assert!(answered > 0, "no flood request was even answered");
    assert!(peak < before + RSS_BOUND_KIB, "RSS grew from {before} to {peak} KiB");
    assert!(texts(&messages(&got)).iter().any(|t| t == "served during the flood"), "bob's message did not arrive during the flood");
    // A stranger's presence is nobody's business here.
    let stranger = UserId::parse("@stranger0x0:mock.test").unwrap();
    assert_eq!(alice.presence(&stranger).await.unwrap_err().code(), Some(missive_spec::ErrorCode::UnknownUser));
}

#[tokio::test]
async fn units_behind_a_gap_are_held_up_to_the_limit_then_refused_for_a_retry_and_none_is_lost() {
    let limits = |c: String| c.replace("held_per_conversation = 1000", "held_per_conversation = 300").replace("held_per_peer = 10000", "held_per_peer = 400").replace("held_release_batch = 256", "held_release_batch = 50");
    let (_d, servers, mock) = alpha_beta_and_mock(limits).await;
    let (alpha, beta) = (&servers[0], &servers[1]);
    let alice = register(alpha, "alice").await;
    let carol = register(alpha, "carol").await;
    let bob = register(beta, "bob").await;
    let (a, c, b) = (uid("alice", alpha), uid("carol", alpha), uid("bob", beta));
    let mallory = UserId::parse("@mallory:mock.test").unwrap();
    let origin = ServerName::parse("mock.test").unwrap();
    let conn = mock.connect(&alpha.name, alpha.federation, &alpha.key).await.unwrap();
    let unit = |to: &UserId, seq: u64| mock.sign(&mock.message(&mallory, to, seq, &[(&origin, seq)], &format!("m{seq}")));
    let send_range = |to: UserId, seqs: std::ops::RangeInclusive<u64>| {
        let units: Vec<_> = seqs.map(|s| unit(&to, s)).collect();
        let conn = conn.clone();
        async move {
            let mut results = Vec::new();
            for chunk in units.chunks(100) {
                results.extend(MockPeer::send_txn(&conn, chunk.to_vec()).await.unwrap());
            }
            results
        }
    };
    let count = |rs: &[UnitResult], r: UnitResult| rs.iter().filter(|x| **x == r).count();
    let before = alpha.rss_kib().unwrap();
    // Seq 1 is missing in both conversations; 1 000 units follow it to alice, 200 to carol.
    let (peak, (to_alice, to_carol)) = peak_rss_while(alpha, async {
        let to_alice = send_range(a.clone(), 2..=1001).await;
        let to_carol = send_range(c.clone(), 2..=201).await;
        (to_alice, to_carol)
    })
    .await;
    println!("peak RSS +{} KiB over {before} KiB", peak.saturating_sub(before));
    assert_eq!(count(&to_alice, UnitResult::Held), 300, "held beyond the per-conversation limit");
    assert_eq!(count(&to_alice, UnitResult::Retry), 700);
    assert_eq!(count(&to_carol, UnitResult::Held), 100, "held beyond the per-peer limit");
    assert_eq!(count(&to_carol, UnitResult::Retry), 100);
    assert!(peak < before + RSS_BOUND_KIB, "RSS grew from {before} to {peak} KiB");

    // The gap fills: the held units are released in steps while a local user and a
    // well-behaved peer are served.
    let (mut bob_live, _, _) = bob.subscribe(0).await.unwrap();
    assert_eq!(MockPeer::send_txn(&conn, vec![unit(&a, 1)]).await.unwrap(), vec![UnitResult::Accepted]);
    let t = Instant::now();
    alice.send_text(&b, "sent while held units are released").await.unwrap();
    println!("a send during the release was acknowledged in {:?}", t.elapsed());
    assert_eq!(messages(&collect(&mut bob_live, Vec::new(), 1).await).len(), 1);
    eventually("the 300 held units released", || async { (full_history(&alice, &mallory, 200).await.len() >= 301).then_some(()) }).await;
    // The origin sends again what was answered retry, as its queue would.
    let again = send_range(a.clone(), 302..=1001).await;
    assert!(again.iter().all(|r| r.delivered()), "a retried unit was refused: {again:?}");
    let history = eventually("all 1 001 units in alice's history", || async {
        let h = full_history(&alice, &mallory, 200).await;
        (h.len() >= 1001).then_some(h)
    })
    .await;
    let mut seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
    seqs.reverse();
    assert_eq!(seqs, (1..=1001).collect::<Vec<_>>(), "lost, repeated or out of order");
    let _ = carol;
}

#[tokio::test]
async fn a_peer_over_its_request_rate_is_answered_rate_limited_and_others_are_not() {
    let rate = |c: String| c.replace("federation_requests_per_second = 10000", "federation_requests_per_second = 20");
    let (_d, servers, mock) = alpha_beta_and_mock(rate).await;
    let (alpha, beta) = (&servers[0], &servers[1]);
    let alice = register(alpha, "alice").await;
    let bob = register(beta, "bob").await;
    let conn = mock.connect(&alpha.name, alpha.federation, &alpha.key).await.unwrap();
    let edu = || FedRequest::Edu { typing: Vec::new(), presence: Vec::new() };
    // 100 requests at once: a bucket of 20 takes 20 of them (and the few it refills).
    let answers = all_at_once((0..100).map(|_| {
        let (conn, req) = (conn.clone(), edu());
        async move { MockPeer::request(&conn, req).await.ok() }
    }))
    .await;
    let limited = answers.iter().filter(|a| matches!(a, Some(FedResponse::Error { code: missive_spec::federation::FedErrorCode::RateLimited, .. }))).count();
    let ok = answers.iter().filter(|a| matches!(a, Some(FedResponse::Ok {}))).count();
    println!("{ok} answered, {limited} rate-limited");
    assert_eq!(ok + limited, 100, "{answers:?}");
    assert!((20..40).contains(&ok), "a bucket of 20 per second let {ok} of 100 through");
    // beta, another peer, has a bucket of its own: its units reach alpha meanwhile.
    let (mut live, _, _) = alice.subscribe(0).await.unwrap();
    for i in 0..10 {
        bob.send_text(&uid("alice", alpha), &format!("m{i}")).await.unwrap();
    }
    assert_eq!(messages(&collect(&mut live, Vec::new(), 10).await).len(), 10);
    // The bucket refills.
    eventually("the mock's bucket to refill", || async { matches!(MockPeer::request(&conn, edu()).await, Ok(FedResponse::Ok {})).then_some(()) }).await;
}

/// `high_water` reads up to 1 000 stored conversations per request (F12.1): a peer gets
/// 600 a minute and is answered `rate_limited` after, while beta's answers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_asking_high_water_without_end_is_limited_and_others_are_not() {
    let (_d, servers, mock) = alpha_beta_and_mock(|c| c).await;
    let alpha = &servers[0];
    let alice = register(alpha, "alice").await;
    alice.send_text(&UserId::parse("@someone:mock.test").unwrap(), "hello").await.unwrap();
    let conn = mock.connect(&alpha.name, alpha.federation, &alpha.key).await.unwrap();
    let mut answered = 0;
    let limited = loop {
        match MockPeer::request(&conn, FedRequest::HighWater { after: None }).await.unwrap() {
            FedResponse::HighWater { convs, .. } => {
                assert_eq!(convs.len(), 1, "the mock shares one conversation with alpha");
                answered += 1;
            }
            FedResponse::Error { code: missive_spec::federation::FedErrorCode::RateLimited, message } => break message,
            other => panic!("unexpected answer {other:?}"),
        }
        assert!(answered <= 600, "more than 600 high_water requests answered in a minute");
    };
    assert_eq!(answered, 600, "{limited}");
    assert!(limited.contains("a minute"), "{limited}");
    // Other requests of the same peer, and other peers, are served meanwhile.
    assert!(matches!(MockPeer::request(&conn, FedRequest::Edu { typing: Vec::new(), presence: Vec::new() }).await, Ok(FedResponse::Ok {})));
    let other = MockPeer::start("other.test", [127, 0, 0, 10].into()).unwrap();
    alpha.pin_peer_raw("other.test", &other.addr.to_string(), &other.public().to_text()).await.unwrap();
    let other_conn = other.connect(&alpha.name, alpha.federation, &alpha.key).await.unwrap();
    let answer = MockPeer::request(&other_conn, FedRequest::HighWater { after: None }).await.unwrap();
    assert!(matches!(answer, FedResponse::HighWater { .. }), "another peer's high_water was answered {answer:?}");
}
