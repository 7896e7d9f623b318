//! Local messaging through real `missived` processes: live delivery, history paging,
//! offline sync, multiple devices and many concurrent senders.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use common::*;
use missive_spec::{ConversationId, Message};

#[tokio::test]
async fn live_delivery_exactly_once_in_order_and_paged_history() {
    let (_d, srv) = server("alpha.test", "open").await;
    let alice = register(&srv, "alice").await;
    let bob = register(&srv, "bob").await;
    let (alice_id, bob_id) = (uid("alice", &srv), uid("bob", &srv));

    let (mut sub, _, backlog) = bob.subscribe(0).await.unwrap();
    assert!(backlog.is_empty());
    let mut acks = Vec::new();
    for i in 0..100 {
        acks.push(alice.send_text(&bob_id, &format!("m{i}")).await.unwrap());
    }
    assert_eq!(acks.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=100).collect::<Vec<_>>());

    let events = collect(&mut sub, Vec::new(), 100).await;
    let got = messages(&events);
    let want: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
    assert_eq!(texts(&got), want, "live events out of order or incomplete");
    assert_eq!(got, acks, "live events differ from the acknowledged messages");
    let positions: Vec<u64> = events.iter().map(|e| e.pos).collect();
    assert_eq!(positions, (1..=100).collect::<Vec<_>>());
    // Exactly once: the whole stream holds each message once and nothing else.
    let (next, all) = bob.sync(0, None).await.unwrap();
    assert_eq!(next, 100);
    assert_eq!(messages(&all), acks);

    // Newest first, 30 per page, no gap and no repeat.
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = bob.history(&alice_id, Some(30), before.clone(), None).await.unwrap();
        assert_eq!(page.newer.is_some(), before.is_some(), "newer cursor only after the first page");
        pages.push(page.messages.len());
        for w in page.messages.windows(2) {
            assert!(w[0].order_key() > w[1].order_key());
        }
        let done = page.older.is_none();
        before = page.older.clone();
        if done {
            break;
        }
    }
    assert_eq!(pages, vec![30, 30, 30, 10]);
    let hist = full_history(&bob, &alice_id, 30).await;
    let mut rev = want.clone();
    rev.reverse();
    assert_eq!(texts(&hist), rev);
    // alice sees the same conversation.
    assert_eq!(full_history(&alice, &bob_id, 7).await, hist);

    // `after` pages toward newer messages and still lists newest first.
    let page = bob.history(&alice_id, Some(10), None, None).await.unwrap(); // m99..m90
    let older = bob.history(&alice_id, Some(10), page.older.clone(), None).await.unwrap(); // m89..m80
    let back = bob.history(&alice_id, Some(5), None, older.newer.clone()).await.unwrap();
    assert_eq!(texts(&back.messages), vec!["m94", "m93", "m92", "m91", "m90"]);
    assert!(back.newer.is_some() && back.older.is_some());
}

#[tokio::test]
async fn offline_user_syncs_everything_on_every_device() {
    let (_d, srv) = server("alpha.test", "open").await;
    let alice = register(&srv, "alice").await;
    let bob_first = register(&srv, "bob").await;
    bob_first.logout().await.unwrap();
    drop(bob_first);
    let (alice_id, bob_id) = (uid("alice", &srv), uid("bob", &srv));

    let mut acks = Vec::new();
    for i in 0..50 {
        acks.push(alice.send_text(&bob_id, &format!("offline {i}")).await.unwrap());
    }

    let phone = login(&srv, "bob").await;
    let (next, events) = phone.sync(0, None).await.unwrap();
    assert_eq!(messages(&events), acks);
    assert_eq!(next, 50);
    // Sync from a position returns only what follows it.
    let (_, tail) = phone.sync(45, None).await.unwrap();
    assert_eq!(messages(&tail), acks[45..].to_vec());
    let (_, limited) = phone.sync(0, Some(10)).await.unwrap();
    assert_eq!(messages(&limited), acks[..10].to_vec());

    let laptop = login(&srv, "bob").await;
    assert_eq!(messages(&laptop.sync(0, None).await.unwrap().1), acks);

    // alice's second device sees what she sent from the first.
    let alice2 = login(&srv, "alice").await;
    assert_eq!(messages(&alice2.sync(0, None).await.unwrap().1), acks);

    // Live: both of bob's devices and alice's other device get the next message.
    let (mut s_phone, _, b1) = phone.subscribe(50).await.unwrap();
    let (mut s_laptop, _, b2) = laptop.subscribe(50).await.unwrap();
    let (mut s_alice2, _, b3) = alice2.subscribe(50).await.unwrap();
    assert!(b1.is_empty() && b2.is_empty() && b3.is_empty());
    let m = alice.send_text(&bob_id, "live to all").await.unwrap();
    for sub in [&mut s_phone, &mut s_laptop, &mut s_alice2] {
        assert_eq!(messages(&collect(sub, Vec::new(), 1).await), vec![m.clone()]);
    }
    assert_eq!(full_history(&laptop, &alice_id, 200).await.len(), 51);

    // Logging out one device revokes only that device.
    phone.logout().await.unwrap();
    assert_eq!(phone.sync(0, None).await.unwrap_err().code(), Some(missive_spec::ErrorCode::Unauthorized));
    assert_eq!(laptop.sync(50, None).await.unwrap().1.len(), 1);
}

#[tokio::test]
async fn twenty_concurrent_clients_store_every_message_once_without_gaps() {
    let (_d, srv) = server("alpha.test", "open").await;
    const USERS: usize = 20;
    const PER_USER: usize = 15;
    let mut clients = Vec::new();
    for i in 0..USERS {
        clients.push(std::sync::Arc::new(register(&srv, &format!("u{i}")).await));
    }
    let ids: Vec<_> = (0..USERS).map(|i| uid(&format!("u{i}"), &srv)).collect();

    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        for k in 0..PER_USER {
            let c = c.clone();
            let to = ids[(i + [1, 2, 7][k % 3]) % USERS].clone();
            tasks.spawn(async move { c.send_text(&to, &format!("from u{i} #{k}")).await.unwrap() });
        }
    }
    let mut acks: Vec<Message> = Vec::new();
    while let Some(r) = tasks.join_next().await {
        acks.push(r.unwrap());
    }
    assert_eq!(acks.len(), USERS * PER_USER);

    let mut by_conv: HashMap<ConversationId, Vec<Message>> = HashMap::new();
    for m in &acks {
        by_conv.entry(m.conv).or_default().push(m.clone());
    }
    for (conv, sent) in &by_conv {
        let a = &sent[0].from;
        let b = &sent[0].to;
        let reader = &clients[ids.iter().position(|x| x == a).unwrap()];
        let hist = full_history(reader, b, 200).await;
        assert_eq!(hist.len(), sent.len(), "conversation {conv} stored a different number of messages");
        let mut seqs: Vec<u64> = hist.iter().map(|m| m.seq).collect();
        seqs.reverse();
        assert_eq!(seqs, (1..=sent.len() as u64).collect::<Vec<_>>(), "origin_seq not gap-free in {conv}");
        let stored: HashSet<_> = hist.iter().map(|m| (m.seq, m.content.clone())).collect();
        for m in sent {
            assert!(stored.contains(&(m.seq, m.content.clone())), "acknowledged message missing");
        }
    }
    // Every user's stream holds each of their messages exactly once.
    for (i, c) in clients.iter().enumerate() {
        let (_, events) = c.sync(0, None).await.unwrap();
        let mut seen: BTreeMap<(ConversationId, u64), usize> = BTreeMap::new();
        for m in messages(&events) {
            *seen.entry((m.conv, m.seq)).or_default() += 1;
        }
        let mine = acks.iter().filter(|m| m.from == ids[i] || m.to == ids[i]).count();
        assert_eq!(seen.len(), mine);
        assert!(seen.values().all(|n| *n == 1), "duplicate event in u{i}'s stream");
    }
}
