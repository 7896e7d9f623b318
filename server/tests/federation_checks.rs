//! Every check a receiving server makes, exercised by a mock peer ("gamma.test") that the
//! server under test pins: replays, forgeries, impersonation, wrong recipients,
//! equivocation, an unpinned key, and a gap filled by asking the origin.

mod common;

use common::*;
use missive_conformance::mock_peer::MockPeer;
use missive_federation::ServerKey;
use missive_spec::federation::{FedErrorCode, FedRequest, FedResponse, UnitResult};
use missive_spec::{ServerName, UserId};

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_checks_replays_forgeries_and_fills_gaps() {
    let (_d, s) = federated(&["alpha.test"]).await;
    let alpha = &s[0];
    let gamma = MockPeer::start("gamma.test", [127, 0, 0, 9].into()).unwrap();
    alpha.pin_peer_raw("gamma.test", &gamma.addr.to_string(), &gamma.public().to_text()).await.unwrap();
    let alice_client = register(alpha, "alice").await;
    let (alice, carol) = (uid("alice", alpha), user("@carol:gamma.test"));
    let g = ServerName::parse("gamma.test").unwrap();
    let a = ServerName::parse("alpha.test").unwrap();
    let conn = gamma.connect("alpha.test", alpha.federation, &alpha.key).await.unwrap();

    // A transaction replayed 5 times stores its units once.
    let units: Vec<_> = (1..=3).map(|i| gamma.record(&gamma.message(&carol, &alice, i, &[(&g, i)], &format!("hi {i}")))).collect();
    assert_eq!(MockPeer::send_txn(&conn, units.clone()).await.unwrap(), vec![UnitResult::Accepted; 3]);
    for _ in 0..4 {
        assert_eq!(MockPeer::send_txn(&conn, units.clone()).await.unwrap(), vec![UnitResult::Duplicate; 3]);
    }
    assert_eq!(full_history(&alice_client, &carol, 200).await.len(), 3);

    // Bad units next to a good one: each gets its own answer, the good one is stored.
    let good = gamma.record(&gamma.message(&carol, &alice, 4, &[(&g, 4)], "good"));
    let mut tampered = gamma.sign(&gamma.message(&carol, &alice, 5, &[(&g, 5)], "tampered"));
    let last = tampered.unit.len() - 1;
    tampered.unit[last] ^= 0x20;
    let impostor_key = ServerKey::generate();
    let mut wrong_key = missive_federation::envelope::sign(&impostor_key, &missive_spec::federation::Unit::Message(gamma.message(&carol, &alice, 5, &[(&g, 5)], "x")));
    wrong_key.key = gamma.public().key_id();
    let unknown_key = missive_federation::envelope::sign(&impostor_key, &missive_spec::federation::Unit::Message(gamma.message(&carol, &alice, 5, &[(&g, 5)], "x")));
    // A sender of beta.test arriving from gamma.test, honestly signed by gamma.
    let mut from_beta = gamma.message(&user("@bob:beta.test"), &alice, 1, &[], "spoofed");
    from_beta.origin = ServerName::parse("beta.test").unwrap();
    from_beta.deps.set(from_beta.origin.clone(), 1);
    let spoofed = gamma.sign(&from_beta);
    let not_hosted = gamma.sign(&gamma.message(&carol, &uid("nobody", alpha), 1, &[(&g, 1)], "to nobody"));
    let elsewhere = gamma.sign(&gamma.message(&carol, &user("@dave:beta.test"), 1, &[(&g, 1)], "wrong server"));
    let mut wrong_conv = gamma.message(&carol, &alice, 5, &[(&g, 5)], "wrong conversation");
    wrong_conv.conv = missive_spec::ConversationId::one_to_one(&carol, &user("@zed:alpha.test"));
    let wrong_conv = gamma.sign(&wrong_conv);
    let equivocation = gamma.sign(&gamma.message(&carol, &alice, 2, &[(&g, 2)], "a different second message"));
    let claims_unsent = gamma.sign(&gamma.message(&carol, &alice, 5, &[(&g, 5), (&a, 40)], "claims to have seen 40 of ours"));
    let oversized = {
        let mut m = gamma.message(&carol, &alice, 5, &[(&g, 5)], "");
        m.content.body = vec![b'x'; missive_spec::limits::MAX_CONTENT_BODY + 1];
        gamma.sign(&m)
    };
    let results = MockPeer::send_txn(
        &conn,
        vec![tampered, wrong_key, unknown_key, good, spoofed, not_hosted, elsewhere, wrong_conv, equivocation, claims_unsent, oversized],
    )
    .await
    .unwrap();
    assert_eq!(
        results,
        vec![
            UnitResult::BadSignature,
            UnitResult::BadSignature,
            UnitResult::UnknownKey,
            UnitResult::Accepted,
            UnitResult::WrongOrigin,
            UnitResult::UnknownRecipient,
            UnitResult::UnknownRecipient,
            UnitResult::ConvMismatch,
            UnitResult::Equivocation,
            UnitResult::InvalidUnit,
            UnitResult::InvalidUnit,
        ]
    );
    let h = full_history(&alice_client, &carol, 200).await;
    assert_eq!(texts(&h), vec!["good", "hi 3", "hi 2", "hi 1"], "only the good unit was added; equivocation changed nothing");

    // A transaction whose id does not match its units is refused whole.
    let u5 = gamma.record(&gamma.message(&carol, &alice, 5, &[(&g, 5)], "five"));
    let bad_id = MockPeer::request(&conn, FedRequest::Txn { id: vec![0; 32], units: vec![u5] }).await.unwrap();
    assert!(matches!(bad_id, FedResponse::Error { code: FedErrorCode::BadTxnId, .. }), "{bad_id:?}");

    // A gap: 7 arrives before 5 and 6. It is held, alpha asks gamma for 5..6, and the
    // conversation comes out complete and in order.
    gamma.record(&gamma.message(&carol, &alice, 6, &[(&g, 6)], "six"));
    let seven = gamma.record(&gamma.message(&carol, &alice, 7, &[(&g, 7)], "seven"));
    assert_eq!(MockPeer::send_txn(&conn, vec![seven.clone()]).await.unwrap(), vec![UnitResult::Held]);
    assert_eq!(MockPeer::send_txn(&conn, vec![seven]).await.unwrap(), vec![UnitResult::Duplicate], "a held unit is not stored twice");
    let h = eventually("the gap to be filled", || async {
        let h = full_history(&alice_client, &carol, 200).await;
        (h.len() == 7).then_some(h)
    })
    .await;
    assert_eq!(texts(&h), vec!["seven", "six", "five", "good", "hi 3", "hi 2", "hi 1"]);
    let conv = missive_spec::ConversationId::one_to_one(&carol, &alice);
    assert_eq!(gamma.observed.lock().unwrap().backfills.first().copied(), Some((conv, 5, 6)));

    // Good traffic still flows both ways: alice's reply is delivered to gamma.
    alice_client.send_text(&carol, "thanks").await.unwrap();
    eventually("alpha to deliver to gamma", || async { gamma.received_texts().contains(&"thanks".to_owned()).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_conversation_does_not_hold_up_another() {
    let (_d, s) = federated(&["alpha.test"]).await;
    let alpha = &s[0];
    let gamma = MockPeer::start("gamma.test", [127, 0, 0, 9].into()).unwrap();
    alpha.pin_peer_raw("gamma.test", &gamma.addr.to_string(), &gamma.public().to_text()).await.unwrap();
    let alice = register(alpha, "alice").await;
    let alice_id = uid("alice", alpha);
    // Two gamma users whose conversations with alice fall in different lanes.
    let lane = |u: &UserId| missive_server::store::keys::lane_of(&missive_spec::ConversationId::one_to_one(&alice_id, u));
    let slow = user("@slow:gamma.test");
    let fast = (0..100).map(|i| user(&format!("@fast{i}:gamma.test"))).find(|u| lane(u) != lane(&slow)).unwrap();
    gamma.stalled.lock().unwrap().insert(missive_spec::ConversationId::one_to_one(&alice_id, &slow));

    alice.send_text(&slow, "stuck at a slow receiver").await.unwrap();
    for i in 0..5 {
        alice.send_text(&fast, &format!("not stuck {i}")).await.unwrap();
    }
    eventually("the other conversation to be delivered", || async {
        let got = gamma.received_texts();
        (0..5).all(|i| got.contains(&format!("not stuck {i}"))).then_some(())
    })
    .await;
    assert!(!gamma.received_texts().contains(&"stuck at a slow receiver".to_owned()));
    assert_eq!(queue_depth(alpha, "gamma.test").await, 1, "the stalled unit stays queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_presenting_a_key_discovery_did_not_return_is_refused() {
    let (_d, s) = federated(&["alpha.test"]).await;
    let alpha = &s[0];
    let _ = register(alpha, "alice").await;
    let gamma = MockPeer::start("gamma.test", [127, 0, 0, 9].into()).unwrap();
    alpha.pin_peer_raw("gamma.test", &gamma.addr.to_string(), &gamma.public().to_text()).await.unwrap();
    // Someone else claiming to be gamma.test, with its own key.
    let impostor = MockPeer::start("gamma.test", [127, 0, 0, 9].into()).unwrap();
    let conn = impostor.connect("alpha.test", alpha.federation, &alpha.key).await.unwrap();
    let carol = user("@carol:gamma.test");
    let g = ServerName::parse("gamma.test").unwrap();
    let u = impostor.sign(&impostor.message(&carol, &uid("alice", alpha), 1, &[(&g, 1)], "let me in"));
    let r = MockPeer::send_txn(&conn, vec![u]).await;
    assert!(r.is_err(), "an unpinned key must not get a transaction through: {r:?}");
    assert!(conn.closed().await.to_string().contains("key not pinned"));
    // The other direction: alpha pins delta.test's key, but the server answering at
    // delta.test's address has another one. The TLS check fails, nothing is delivered,
    // the unit stays queued and the link is reported down.
    let wrong = MockPeer::start("delta.test", [127, 0, 0, 9].into()).unwrap();
    let pinned = ServerKey::generate().public().to_text();
    alpha.pin_peer_raw("delta.test", &wrong.addr.to_string(), &pinned).await.unwrap();
    let alice = login(alpha, "alice").await;
    alice.send_text(&user("@dan:delta.test"), "for the real delta").await.unwrap();
    let status = eventually("alpha to report delta.test down", || async {
        alpha.peers_json().await.unwrap().into_iter().find(|l| l.contains("delta.test") && l.contains("\"up\":false"))
    })
    .await;
    assert!(status.contains("\"queue_depth\":1"), "{status}");
    assert!(wrong.observed.lock().unwrap().txns.is_empty(), "a server with an unpinned key received units");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_units_survive_a_restart_and_their_gap_is_filled_after_it() {
    let (_d, mut s) = federated(&["alpha.test"]).await;
    let gamma = MockPeer::start("gamma.test", [127, 0, 0, 9].into()).unwrap();
    s[0].pin_peer_raw("gamma.test", &gamma.addr.to_string(), &gamma.public().to_text()).await.unwrap();
    let _ = register(&s[0], "alice").await;
    let (alice, carol) = (uid("alice", &s[0]), user("@carol:gamma.test"));
    let g = ServerName::parse("gamma.test").unwrap();
    let conn = gamma.connect("alpha.test", s[0].federation, &s[0].key).await.unwrap();
    let first: Vec<_> = (1..=2).map(|i| gamma.record(&gamma.message(&carol, &alice, i, &[(&g, i)], &format!("m{i}")))).collect();
    assert_eq!(MockPeer::send_txn(&conn, first).await.unwrap(), vec![UnitResult::Accepted; 2]);
    // 5 arrives; gamma cannot answer for 3 and 4 yet.
    let five = gamma.record(&gamma.message(&carol, &alice, 5, &[(&g, 5)], "m5"));
    assert_eq!(MockPeer::send_txn(&conn, vec![five]).await.unwrap(), vec![UnitResult::Held]);
    eventually("alpha to ask for 3..4", || async { (!gamma.observed.lock().unwrap().backfills.is_empty()).then_some(()) }).await;

    s[0].kill9().await;
    for i in 3..=4 {
        gamma.record(&gamma.message(&carol, &alice, i, &[(&g, i)], &format!("m{i}")));
    }
    let asked_before = gamma.observed.lock().unwrap().backfills.len();
    s[0].restart().await.unwrap();
    let alice_client = login(&s[0], "alice").await;
    let h = eventually("the gap to be filled after the restart", || async {
        let h = full_history(&alice_client, &carol, 200).await;
        (h.len() == 5).then_some(h)
    })
    .await;
    assert_eq!(texts(&h), vec!["m5", "m4", "m3", "m2", "m1"]);
    assert!(gamma.observed.lock().unwrap().backfills.len() > asked_before, "the restarted server asked again");
}
