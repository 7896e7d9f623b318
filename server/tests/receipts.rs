//! Receipts and multi-device state across two real homeservers: sent → delivered → read,
//! identical on every device of both users, surviving restarts, never moving backwards.

mod common;

use common::*;
use missive_cli::client::message_state;
use missive_conformance::mock_peer::MockPeer;
use missive_spec::federation::{Unit, UnitResult};
use missive_spec::{EventKind, ReceiptKind, ServerName, UserId, Watermark};

fn states(page: &missive_cli::Page, me: &UserId) -> Vec<&'static str> {
    page.messages.iter().filter(|m| m.from == *me).map(|m| message_state(m, &page.read, &page.delivered)).collect()
}

async fn states_of(c: &missive_cli::Client, with: &UserId, me: &UserId) -> Vec<&'static str> {
    states(&c.history(with, Some(50), None, None).await.unwrap(), me)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_delivered_read_across_servers_on_every_device_and_after_restarts() {
    let (_d, mut s) = federated(&["alpha.test", "beta.test"]).await;
    let alice1 = register(&s[0], "alice").await;
    let alice2 = login(&s[0], "alice").await;
    let bob_phone = register(&s[1], "bob").await;
    let (alice, bob) = (uid("alice", &s[0]), uid("bob", &s[1]));
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(alice1.send_text(&bob, &format!("m{i}")).await.unwrap());
    }
    assert_eq!(states_of(&alice1, &bob, &alice).await, vec!["sent"; 3]);

    // bob's phone gets the messages and acknowledges them.
    let got = eventually("bob to receive 3", || async {
        let (_, evs) = bob_phone.sync(0, None).await.unwrap();
        (messages(&evs).len() == 3).then(|| messages(&evs))
    })
    .await;
    let newest = Watermark(got.last().unwrap().order_key());
    bob_phone.receipt(&alice, ReceiptKind::Delivered, newest.clone()).await.unwrap();
    for c in [&alice1, &alice2] {
        let st = eventually("alice's devices to see delivered", || async {
            let st = states_of(c, &bob, &alice).await;
            (st == vec!["delivered"; 3]).then_some(st)
        })
        .await;
        assert_eq!(st, vec!["delivered"; 3]);
    }
    // bob reads the first two only: states are per message, over the canonical order.
    bob_phone.receipt(&alice, ReceiptKind::Read, Watermark(sent[1].order_key())).await.unwrap();
    for c in [&alice1, &alice2] {
        eventually("alice's devices to see read on two", || async {
            (states_of(c, &bob, &alice).await == vec!["delivered", "read", "read"]).then_some(())
        })
        .await;
    }
    // Both of alice's devices were told through their event streams too.
    for c in [&alice1, &alice2] {
        let (_, evs) = c.sync(0, None).await.unwrap();
        let kinds: Vec<ReceiptKind> = evs
            .iter()
            .filter_map(|e| match &e.event {
                EventKind::Receipt(r) if r.user == bob => Some(r.kind),
                _ => None,
            })
            .collect();
        assert_eq!(kinds, vec![ReceiptKind::Delivered, ReceiptKind::Read]);
    }
    // Stale and repeated receipts change nothing.
    bob_phone.receipt(&alice, ReceiptKind::Read, Watermark(sent[0].order_key())).await.unwrap();
    bob_phone.receipt(&alice, ReceiptKind::Read, Watermark(sent[1].order_key())).await.unwrap();
    bob_phone.receipt(&alice, ReceiptKind::Delivered, Watermark(sent[0].order_key())).await.unwrap();

    // bob's laptop, opened after the phone read: highest cursor wins.
    let laptop = login(&s[1], "bob").await;
    let page = laptop.history(&alice, None, None, None).await.unwrap();
    assert_eq!(page.seen, Some(Watermark(sent[1].order_key())), "the laptop shows what the phone read");
    laptop.receipt(&alice, ReceiptKind::Read, newest.clone()).await.unwrap();
    assert_eq!(bob_phone.history(&alice, None, None, None).await.unwrap().seen, Some(newest.clone()));

    // Restart both servers: every state survives.
    for srv in s.iter_mut() {
        srv.kill9().await;
        srv.restart().await.unwrap();
    }
    let alice1 = login(&s[0], "alice").await;
    let alice2 = login(&s[0], "alice").await;
    for c in [&alice1, &alice2] {
        let st = eventually("read on all three", || async {
            let st = states_of(c, &bob, &alice).await;
            (st == vec!["read"; 3]).then_some(st)
        })
        .await;
        assert_eq!(st, vec!["read"; 3]);
    }
    let bob_again = login(&s[1], "bob").await;
    assert_eq!(bob_again.history(&alice, None, None, None).await.unwrap().seen, Some(newest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_from_a_peer_out_of_order_or_twice_never_move_back() {
    let (_d, s) = federated(&["alpha.test"]).await;
    let gamma = MockPeer::start("gamma.test", [127, 0, 0, 9].into()).unwrap();
    s[0].pin_peer_raw("gamma.test", &gamma.addr.to_string(), &gamma.public().to_text()).await.unwrap();
    let alice_c = register(&s[0], "alice").await;
    let (alice, carol) = (uid("alice", &s[0]), UserId::parse("@carol:gamma.test").unwrap());
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(alice_c.send_text(&carol, &format!("to carol {i}")).await.unwrap());
    }
    eventually("alpha to deliver to gamma", || async { (gamma.received_texts().len() == 3).then_some(()) }).await;
    let conn = gamma.connect("alpha.test", s[0].federation, &s[0].key).await.unwrap();
    let receipt = |kind, i: usize| {
        gamma.key_sign(&Unit::Receipt(missive_spec::Receipt {
            conv: sent[0].conv,
            kind,
            peer: alice.clone(),
            user: carol.clone(),
            up_to: Watermark(sent[i].order_key()),
        }))
    };
    // read 2 arrives before delivered 1; then stale and repeated ones.
    let results = MockPeer::send_txn(
        &conn,
        vec![receipt(ReceiptKind::Read, 2), receipt(ReceiptKind::Delivered, 1), receipt(ReceiptKind::Read, 0), receipt(ReceiptKind::Read, 2)],
    )
    .await
    .unwrap();
    assert_eq!(results, vec![UnitResult::Accepted, UnitResult::Accepted, UnitResult::Duplicate, UnitResult::Duplicate]);
    assert_eq!(states_of(&alice_c, &carol, &alice).await, vec!["read"; 3]);
    // A receipt claiming to speak for a user of another server is refused.
    let forged = gamma.key_sign(&Unit::Receipt(missive_spec::Receipt {
        conv: missive_spec::ConversationId::one_to_one(&alice, &UserId::parse("@bob:beta.test").unwrap()),
        kind: ReceiptKind::Read,
        peer: alice.clone(),
        user: UserId::parse("@bob:beta.test").unwrap(),
        up_to: Watermark(sent[0].order_key()),
    }));
    assert_eq!(MockPeer::send_txn(&conn, vec![forged]).await.unwrap(), vec![UnitResult::WrongOrigin]);
    // alice reads carol's side: the receipt crosses to gamma.
    let reply = gamma.record(&gamma.message(&carol, &alice, 1, &[(&ServerName::parse("gamma.test").unwrap(), 1), (&ServerName::parse("alpha.test").unwrap(), 3)], "hi alice"));
    assert_eq!(MockPeer::send_txn(&conn, vec![reply]).await.unwrap(), vec![UnitResult::Accepted]);
    let page = alice_c.history(&carol, None, None, None).await.unwrap();
    alice_c.receipt(&carol, ReceiptKind::Read, Watermark(page.messages[0].order_key())).await.unwrap();
    eventually("alice's read receipt to reach gamma", || async {
        gamma.received_receipts().iter().any(|r| r.user == alice && r.kind == ReceiptKind::Read).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_added_after_500_messages_gets_the_whole_history_with_states() {
    let (_d, s) = federated(&["alpha.test", "beta.test"]).await;
    let alice_c = register(&s[0], "alice").await;
    let bob_c = register(&s[1], "bob").await;
    let (alice, bob) = (uid("alice", &s[0]), uid("bob", &s[1]));
    let mut sent = Vec::new();
    for i in 0..500 {
        sent.push(alice_c.send_text(&bob, &format!("n{i}")).await.unwrap());
    }
    let h = eventually("bob to have 500", || async {
        let h = full_history(&bob_c, &alice, 200).await;
        (h.len() == 500).then_some(h)
    })
    .await;
    bob_c.receipt(&alice, ReceiptKind::Delivered, Watermark(h[0].order_key())).await.unwrap();
    bob_c.receipt(&alice, ReceiptKind::Read, Watermark(sent[299].order_key())).await.unwrap();

    let tablet = login(&s[0], "alice").await;
    let mut all = Vec::new();
    let mut before = None;
    loop {
        let page = eventually("receipts to arrive", || {
            let before = before.clone();
            let tablet = &tablet;
            let bob = &bob;
            async move {
                let p = tablet.history(bob, Some(200), before, None).await.unwrap();
                (p.read.is_some() && p.delivered.is_some()).then_some(p)
            }
        })
        .await;
        all.extend(page.messages.iter().map(|m| message_state(m, &page.read, &page.delivered)));
        match page.older {
            Some(o) => before = Some(o),
            None => break,
        }
    }
    assert_eq!(all.len(), 500);
    // Newest first: 200 delivered (n499..n300), then 300 read (n299..n0).
    assert!(all[..200].iter().all(|s| *s == "delivered"));
    assert!(all[200..].iter().all(|s| *s == "read"));
}
