//! Presence and typing across servers: online within the propagation goal, offline with
//! last-seen, invisible to strangers, coalesced across federation, typing never stored.

mod common;

use std::time::{Duration, Instant};

use common::*;
use missive_cli::Subscription;
use missive_conformance::mock_peer::MockPeer;
use missive_spec::federation::UnitResult;
use missive_spec::{Ephemeral, ErrorCode, PresenceUpdate, ServerName, UserId};

/// Waits for the next ephemeral update matching `want` on a subscription.
async fn next_ephemeral(sub: &mut Subscription, want: impl Fn(&Ephemeral) -> bool) -> Ephemeral {
    let wait = async {
        loop {
            let f = sub.next_frame().await.unwrap().expect("subscription ended");
            if let Some(e) = f.ephemeral.into_iter().find(|e| want(e)) {
                return e;
            }
        }
    };
    tokio::time::timeout(DEADLINE, wait).await.expect("no ephemeral update in time")
}

fn is_presence(user: &UserId, online: bool) -> impl Fn(&Ephemeral) -> bool + '_ {
    move |e| matches!(e, Ephemeral::Presence(p) if p.user == *user && p.online == online)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_crosses_servers_quickly_and_only_to_contacts() {
    let (_d, s) = federated(&["alpha.test", "beta.test"]).await;
    let alice = register(&s[0], "alice").await;
    let carol = register(&s[0], "carol").await;
    let bob = register(&s[1], "bob").await;
    let (alice_id, bob_id) = (uid("alice", &s[0]), uid("bob", &s[1]));
    alice.send_text(&bob_id, "hi bob").await.unwrap();
    eventually("bob to get the message", || async { (!full_history(&bob, &alice_id, 5).await.is_empty()).then_some(()) }).await;
    // Both write: they share the conversation (§12).
    bob.send_text(&alice_id, "hi alice").await.unwrap();
    eventually("alice to get the answer", || async { (full_history(&alice, &bob_id, 5).await.len() == 2).then_some(()) }).await;
    let (mut alice_sub, _, _) = alice.subscribe(0).await.unwrap();

    let t0 = Instant::now();
    let (bob_sub, _, _) = bob.subscribe(0).await.unwrap();
    next_ephemeral(&mut alice_sub, is_presence(&bob_id, true)).await;
    let online_after = t0.elapsed();
    println!("bob online at alice's device {online_after:?} after bob subscribed (goal: under 500 ms)");
    assert!(online_after < Duration::from_secs(2), "presence took {online_after:?}");
    assert!(alice.presence(&bob_id).await.unwrap().online);

    let t1 = Instant::now();
    drop(bob_sub);
    let off = next_ephemeral(&mut alice_sub, is_presence(&bob_id, false)).await;
    println!("bob offline at alice's device {:?} after his last subscription ended", t1.elapsed());
    let Ephemeral::Presence(PresenceUpdate { last_seen: Some(seen), .. }) = off else { panic!("no last-seen: {off:?}") };
    let p = alice.presence(&bob_id).await.unwrap();
    assert_eq!((p.online, p.last_seen), (false, Some(seen)));

    // A stranger gets the same answer as for a user who does not exist.
    let e1 = carol.presence(&bob_id).await.unwrap_err();
    let e2 = carol.presence(&uid("nobody", &s[1])).await.unwrap_err();
    assert_eq!((e1.code(), e2.code()), (Some(ErrorCode::UnknownUser), Some(ErrorCode::UnknownUser)));
    let bob_as_stranger = bob.presence(&uid("carol", &s[0])).await.unwrap_err();
    assert_eq!(bob_as_stranger.code(), Some(ErrorCode::UnknownUser));

    // The same between two users of one server: carol comes online for alice.
    let carol_id = uid("carol", &s[0]);
    alice.send_text(&carol_id, "hi carol").await.unwrap();
    carol.send_text(&alice_id, "hi alice").await.unwrap();
    let t2 = Instant::now();
    let (carol_sub, _, _) = carol.subscribe(0).await.unwrap();
    next_ephemeral(&mut alice_sub, is_presence(&carol_id, true)).await;
    println!("carol (same server) online at alice's device after {:?}", t2.elapsed());
    drop(carol_sub);
    next_ephemeral(&mut alice_sub, is_presence(&carol_id, false)).await;

    // bob hides his last-seen time.
    bob.set_hide_last_seen(true).await.unwrap();
    let hidden = next_ephemeral(&mut alice_sub, is_presence(&bob_id, false)).await;
    assert!(matches!(hidden, Ephemeral::Presence(PresenceUpdate { last_seen: None, .. })), "{hidden:?}");
    assert_eq!(alice.presence(&bob_id).await.unwrap().last_seen, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_flaps_cross_federation_as_a_handful_of_updates() {
    let (_d, s) = federated(&["beta.test"]).await;
    let gamma = MockPeer::start("gamma.test", [127, 0, 0, 9].into()).unwrap();
    s[0].pin_peer_raw("gamma.test", &gamma.addr.to_string(), &gamma.public().to_text()).await.unwrap();
    let bob = register(&s[0], "bob").await;
    let (bob_id, carol) = (uid("bob", &s[0]), UserId::parse("@carol:gamma.test").unwrap());
    let g = ServerName::parse("gamma.test").unwrap();
    let conn = gamma.connect("beta.test", s[0].federation, &s[0].key).await.unwrap();
    let hello = gamma.record(&gamma.message(&carol, &bob_id, 1, &[(&g, 1)], "hello bob"));
    assert_eq!(MockPeer::send_txn(&conn, vec![hello]).await.unwrap(), vec![UnitResult::Accepted]);
    // bob answers: the two share the conversation (§12), so bob's presence is gamma's business.
    bob.send_text(&carol, "hi carol").await.unwrap();

    for _ in 0..50 {
        let (sub, _, _) = bob.subscribe(0).await.unwrap();
        drop(sub);
    }
    let updates = eventually("the final offline state to reach gamma", || async {
        let edus = gamma.observed.lock().unwrap().edus.clone();
        let all: Vec<PresenceUpdate> = edus.into_iter().flatten().filter(|p| p.user == bob_id).collect();
        all.last().is_some_and(|p| !p.online).then_some(all)
    })
    .await;
    let requests = gamma.observed.lock().unwrap().edus.len();
    println!("50 connect/disconnect flaps crossed federation as {} presence updates in {requests} requests", updates.len());
    assert!(updates.len() <= 10, "flaps were not coalesced: {} updates", updates.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_crosses_servers_is_rate_limited_and_never_stored() {
    let (_d, s) = federated(&["alpha.test", "beta.test"]).await;
    let alice = register(&s[0], "alice").await;
    let bob = register(&s[1], "bob").await;
    let (alice_id, bob_id) = (uid("alice", &s[0]), uid("bob", &s[1]));
    // No conversation yet: typing to a stranger is refused like an unknown user.
    assert_eq!(alice.typing(&bob_id).await.unwrap_err().code(), Some(ErrorCode::UnknownUser));
    alice.send_text(&bob_id, "hi").await.unwrap();
    eventually("bob to get the message", || async { (!full_history(&bob, &alice_id, 5).await.is_empty()).then_some(()) }).await;
    // One message makes no shared conversation (§12): typing to bob is still refused.
    assert_eq!(alice.typing(&bob_id).await.unwrap_err().code(), Some(ErrorCode::UnknownUser));
    bob.send_text(&alice_id, "hello").await.unwrap();
    eventually("alice to get the answer", || async { (full_history(&alice, &bob_id, 5).await.len() == 2).then_some(()) }).await;
    let (_, head) = bob.sync(0, None).await.map(|(n, e)| (e, n)).unwrap();
    let (mut bob_sub, _, _) = bob.subscribe(head).await.unwrap();

    alice.typing(&bob_id).await.unwrap();
    let e = next_ephemeral(&mut bob_sub, |e| matches!(e, Ephemeral::Typing(t) if t.user == alice_id)).await;
    let Ephemeral::Typing(t) = e else { unreachable!() };
    assert!(t.until > 0 && t.peer == bob_id);
    assert_eq!(alice.typing(&bob_id).await.unwrap_err().code(), Some(ErrorCode::RateLimited));
    let (next, events) = bob.sync(head, None).await.unwrap();
    assert!(events.is_empty() && next == head, "typing must not be stored: {events:?}");
}
