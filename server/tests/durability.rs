//! Nothing acknowledged is lost: kill -9 right after acknowledgements, restarts, retries
//! with the same client_msg_id, graceful SIGTERM, and operator commands offline.

mod common;

use common::*;
use missive_cli::client::new_client_msg_id;
use missive_spec::{Content, ErrorCode};

#[tokio::test]
async fn acknowledged_messages_survive_kill_9_and_retries_do_not_duplicate() {
    let (_d, mut srv) = server("alpha.test", "open").await;
    let alice = register(&srv, "alice").await;
    let _bob = register(&srv, "bob").await;
    let (alice_id, bob_id) = (uid("alice", &srv), uid("bob", &srv));
    let alice_token = alice.token().unwrap().to_owned();

    let mut sent = Vec::new();
    for i in 0..50 {
        let id = new_client_msg_id();
        let ack = alice.send(&bob_id, Content::text(&format!("durable {i}")), id).await.unwrap();
        sent.push((id, ack));
    }
    // No grace period: the process dies right after the last acknowledgement.
    srv.kill9().await;
    srv.restart().await.unwrap();

    let bob = login(&srv, "bob").await;
    let hist = full_history(&bob, &alice_id, 200).await;
    let mut want: Vec<_> = sent.iter().map(|(_, m)| m.clone()).collect();
    want.reverse();
    assert_eq!(hist, want, "acknowledged messages lost or changed by kill -9");

    // The same device retries after the restart: the original acknowledgement comes back
    // and nothing is stored twice, whatever the retried body says.
    let mut alice = connect(&srv).await;
    alice.set_token(Some(alice_token));
    for idx in [49, 0, 17] {
        let (id, ack) = &sent[idx];
        let again = alice.send(&bob_id, Content::text("a different body is ignored"), *id).await.unwrap();
        assert_eq!(&again, ack, "retry of message {idx} changed its acknowledgement");
    }
    assert_eq!(full_history(&bob, &alice_id, 200).await.len(), 50);
    // Another device using the same client_msg_id sends a new message (ids are per device).
    let alice2 = login(&srv, "alice").await;
    let other = alice2.send(&bob_id, Content::text("second device"), sent[0].0).await.unwrap();
    assert_eq!(other.seq, 51);
    let next = alice.send_text(&bob_id, "after restart").await.unwrap();
    assert_eq!(next.seq, 52);
    assert_eq!(bob.sync(0, None).await.unwrap().1.len(), 52);
}

#[tokio::test]
async fn concurrent_retries_of_one_send_store_it_once() {
    let (_d, srv) = server("alpha.test", "open").await;
    let alice = std::sync::Arc::new(register(&srv, "alice").await);
    let _bob = register(&srv, "bob").await;
    let bob_id = uid("bob", &srv);
    let id = new_client_msg_id();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (a, to) = (alice.clone(), bob_id.clone());
        tasks.spawn(async move { a.send(&to, Content::text("once"), id).await.unwrap() });
    }
    let mut acks = Vec::new();
    while let Some(r) = tasks.join_next().await {
        acks.push(r.unwrap());
    }
    assert!(acks.windows(2).all(|w| w[0] == w[1]), "retries got different acknowledgements");
    assert_eq!(full_history(&alice, &bob_id, 200).await.len(), 1);
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_operator_adds_users_offline_and_online() {
    let (_d, mut srv) = server("alpha.test", "closed").await;
    // While running, through the admin socket.
    srv.add_user("alice", &password("alice")).await.unwrap();
    let alice = login(&srv, "alice").await;
    assert!(srv.add_user("alice", &password("alice")).await.unwrap_err().to_string().contains("already exists"));
    let mut c = connect(&srv).await;
    let e = c.register(&uid("mallory", &srv), "pw-mallory-x", None, None).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RegistrationClosed));
    drop(alice);

    assert_eq!(srv.terminate().await.unwrap(), Some(0), "SIGTERM must exit cleanly; log:\n{}", srv.log());
    // While stopped, straight into the database.
    srv.add_user("bob", &password("bob")).await.unwrap();
    srv.restart().await.unwrap();
    let alice = login(&srv, "alice").await;
    let bob = login(&srv, "bob").await;
    let m = alice.send_text(&uid("bob", &srv), "hello after restart").await.unwrap();
    assert_eq!(messages(&bob.sync(0, None).await.unwrap().1), vec![m]);
    assert!(srv.log().contains("stopped"), "graceful shutdown not logged");
}
