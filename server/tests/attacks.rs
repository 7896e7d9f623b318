//! Attacks from clients: idle connections squatting on slots, a stranger prying into a
//! conversation, requests without a valid token. Each is refused with its spec'd error,
//! and the server keeps serving the users it has, with nothing of theirs lost.

mod common;

use std::net::SocketAddr;

use common::*;
use missive_cli::client::{Client, ClientError};
use missive_federation::tls::Pin;
use missive_spec::{ClientMsgId, Content, ErrorCode, ReceiptKind, Request, ServerName, Watermark};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Option<ErrorCode> {
    r.unwrap_err().code()
}

/// Opens `n` connections from a runtime that then stops dead: no close frames, no
/// keep-alives, as if the attacker's machine vanished with the sockets open.
fn squat(addr: SocketAddr, name: ServerName, n: usize) -> usize {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return 0 };
        let held = rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..n {
                if let Ok(c) = Client::connect(addr, &name, Pin::FirstUse).await {
                    v.push(c);
                }
            }
            v
        });
        let got = held.len();
        std::mem::forget(held);
        rt.shutdown_background();
        got
    })
    .join()
    .unwrap_or(0)
}

#[tokio::test]
async fn idle_connections_holding_slots_are_reclaimed_by_the_idle_timeout() {
    let (_d, srv) = server_with_config("alpha.test", "open", |c| c.replace("max_connections_per_address = 64", "max_connections_per_address = 6")).await;
    let alice = register(&srv, "alice").await;
    let bob = register(&srv, "bob").await;
    let name = ServerName::parse("alpha.test").unwrap();
    // alice and bob hold two slots; the attacker takes the other four and goes silent.
    assert_eq!(squat(srv.addr, name.clone(), 4), 4);
    let refused = Client::connect(srv.addr, &name, Pin::FirstUse).await;
    assert!(matches!(refused, Err(ClientError::Connect { .. })), "a connection over the per-address cap was accepted");
    alice.send_text(&uid("bob", &srv), "served while the slots are squatted").await.unwrap();
    // The silent connections time out and give their slots back.
    let started = std::time::Instant::now();
    let c = eventually("a squatted slot to be reclaimed", || async { Client::connect(srv.addr, &name, Pin::FirstUse).await.ok() }).await;
    println!("slots reclaimed {:.1} s after the squatters went silent", started.elapsed().as_secs_f64());
    assert!(matches!(c.info().await, Ok(missive_spec::Response::Info { .. })));
    assert_eq!(bob.sync(0, None).await.unwrap().1.len(), 1, "bob lost the message sent during the attack");
}

#[tokio::test]
async fn a_stranger_learns_nothing_of_a_conversation() {
    let (_d, srv) = server("alpha.test", "open").await;
    let alice = register(&srv, "alice").await;
    let bob = register(&srv, "bob").await;
    let carol = register(&srv, "carol").await;
    let (a, b) = (uid("alice", &srv), uid("bob", &srv));
    let m = alice.send_text(&b, "for bob only").await.unwrap();
    bob.send_text(&a, "for alice only").await.unwrap();
    // History is always the caller's own conversation: carol's with either is empty.
    for with in [&a, &b] {
        let page = carol.history(with, None, None, None).await.unwrap();
        assert!(page.messages.is_empty() && page.read.is_none() && page.delivered.is_none(), "carol saw a page {page:?}");
    }
    assert!(carol.sync(0, None).await.unwrap().1.is_empty(), "carol's stream carries others' events");
    assert_eq!(code(carol.presence(&a).await), Some(ErrorCode::UnknownUser));
    assert_eq!(code(carol.typing(&a).await), Some(ErrorCode::UnknownUser));
    // A receipt naming a message of someone else's conversation does not apply.
    assert_eq!(code(carol.receipt(&a, ReceiptKind::Read, Watermark(m.order_key())).await), Some(ErrorCode::InvalidRequest));
    let page = alice.history(&b, None, None, None).await.unwrap();
    assert!(page.read.is_none(), "carol's receipt moved bob's read mark");
    assert_eq!(page.messages.len(), 2);
}

#[tokio::test]
async fn every_request_without_a_valid_token_is_unauthorized_and_changes_nothing() {
    let (_d, srv) = server("alpha.test", "open").await;
    let alice = register(&srv, "alice").await;
    let bob = register(&srv, "bob").await;
    let (a, b) = (uid("alice", &srv), uid("bob", &srv));
    let m = alice.send_text(&b, "hello").await.unwrap();
    let revoked = {
        let c = login(&srv, "bob").await;
        let t = c.token().unwrap().to_owned();
        c.logout().await.unwrap();
        t
    };
    let bob_device = bob.devices().await.unwrap()[0].id.clone();
    let requests = || {
        vec![
            Request::Logout {},
            Request::Send { to: a.clone(), content: Content::text("forged"), client_msg_id: ClientMsgId([7; 16]) },
            Request::History { with: a.clone(), after: None, limit: None, before: None },
            Request::Sync { limit: None, since: 0 },
            Request::Receipt { kind: ReceiptKind::Read, with: a.clone(), up_to: Watermark(m.order_key()) },
            Request::Devices {},
            Request::RevokeDevice { device: bob_device.clone() },
            Request::Presence { user: a.clone() },
            Request::Settings { hide_last_seen: true },
            Request::Typing { with: a.clone() },
        ]
    };
    let mut anon = connect(&srv).await;
    for token in [None, Some("made-up-token".to_owned()), Some(revoked)] {
        anon.set_token(token.clone());
        for req in requests() {
            let name = format!("{req:?}");
            assert_eq!(code(anon.request(req).await), Some(ErrorCode::Unauthorized), "{name} with token {token:?}");
        }
        assert_eq!(code(anon.subscribe(0).await.map(|(_, n, _)| n)), Some(ErrorCode::Unauthorized), "subscribe with {token:?}");
    }
    // Nothing changed: bob's device lives, no forged message, no receipt.
    assert_eq!(bob.devices().await.unwrap().len(), 1, "a device was revoked without a token");
    assert_eq!(bob.devices().await.unwrap()[0].id, bob_device);
    let page = alice.history(&b, None, None, None).await.unwrap();
    assert_eq!(page.messages.len(), 1, "a message was stored without a token");
    assert!(page.read.is_none());
}

#[tokio::test]
async fn concurrent_wrong_passwords_count_before_any_is_hashed() {
    let (_d, srv) = server("alpha.test", "open").await;
    let alice = register(&srv, "alice").await;
    let bob = register(&srv, "bob").await;
    let (a, b) = (uid("alice", &srv), uid("bob", &srv));
    let (mut bob_live, _, _) = bob.subscribe(0).await.unwrap();
    let before = srv.rss_kib().unwrap();
    // One connection, every guess on a stream of its own.
    let attacker = connect(&srv).await;
    let guess = |user: missive_spec::UserId| {
        let mut c = attacker.as_device(None);
        async move { c.login(&user, "not-the-password", None).await.unwrap_err().code() }
    };
    // 100 at once against alice, then 250 at once against users who do not exist (as many
    // at a time as the connection's stream limit lets in).
    let attack = async {
        let on_alice = all_at_once((0..100).map(|_| guess(a.clone()))).await;
        let on_nobody = all_at_once((0..250).map(|i| guess(uid(&format!("nobody{i}"), &srv)))).await;
        (on_alice, on_nobody)
    };
    let served = async {
        // alice's session, opened before the attack, keeps working meanwhile.
        alice.send_text(&b, "sent while the guessing goes on").await.unwrap();
        collect(&mut bob_live, Vec::new(), 1).await
    };
    let (peak, ((on_alice, on_nobody), got)) = peak_rss_while(&srv, async { tokio::join!(attack, served) }).await;
    let count = |v: &[Option<ErrorCode>], code| v.iter().filter(|c| **c == Some(code)).count();
    println!("peak RSS +{} KiB over {before} KiB", peak.saturating_sub(before));
    assert_eq!(count(&on_alice, ErrorCode::BadCredentials), 5, "the account allows 5 failures a minute: {on_alice:?}");
    assert_eq!(count(&on_alice, ErrorCode::RateLimited), 95);
    // The address allows 20 failures in all: 5 were spent on alice.
    assert_eq!(count(&on_nobody, ErrorCode::BadCredentials), 15, "{on_nobody:?}");
    assert_eq!(count(&on_nobody, ErrorCode::RateLimited), 235);
    assert!(peak < before + RSS_BOUND_KIB, "RSS grew from {before} to {peak} KiB");
    assert_eq!(messages(&got).len(), 1, "bob was not served during the attack");
}

#[tokio::test]
async fn a_flood_of_large_messages_never_makes_an_events_frame_over_the_limit() {
    let (_d, srv) = server("alpha.test", "open").await;
    let eve = register(&srv, "eve").await;
    let bob = register(&srv, "bob").await;
    let b = uid("bob", &srv);
    // 300 bodies of 16 KiB: about 5 MB of events, more than one 4 MiB frame holds.
    let body = vec![b'x'; missive_spec::limits::MAX_CONTENT_BODY];
    for _ in 0..300 {
        let content = Content { body: body.clone(), kind: "text".into() };
        eve.send(&b, content, missive_cli::client::new_client_msg_id()).await.unwrap();
    }
    // sync pages by size, saying there is more.
    let first = bob.sync_page(0, None).await.expect("sync failed on a large backlog");
    assert!(first.more && first.events.len() < 300, "one page held {} events with more = {}", first.events.len(), first.more);
    let mut got = first.events.len();
    let mut since = first.next;
    loop {
        let page = bob.sync_page(since, None).await.unwrap();
        got += page.events.len();
        since = page.next;
        if !page.more {
            break;
        }
    }
    assert_eq!(got, 300, "sync lost or repeated events");
    // A live subscription from 0 gets the same backlog over several frames.
    let (mut live, _, first) = bob.subscribe(0).await.expect("subscribe failed on a large backlog");
    let all = collect(&mut live, first, 300).await;
    assert_eq!(messages(&all).len(), 300);
    let positions: Vec<u64> = all.iter().map(|e| e.pos).collect();
    assert_eq!(positions, (1..=300).collect::<Vec<_>>(), "positions skipped or repeated");
}

#[tokio::test]
async fn request_frames_that_never_finish_are_cut_at_the_deadline_within_a_memory_bound() {
    let (_d, srv) = server_with_config("alpha.test", "open", |c| c.replace("request_read_timeout_ms = 10000", "request_read_timeout_ms = 3000")).await;
    let alice = register(&srv, "alice").await;
    let bob = register(&srv, "bob").await;
    let b = uid("bob", &srv);
    let (mut bob_live, _, _) = bob.subscribe(0).await.unwrap();
    let before = srv.rss_kib().unwrap();
    // 16 connections × 64 streams (as many as a client connection may have open), each
    // announcing a 64 KiB request and sending all but its last byte.
    let max = missive_spec::limits::MAX_REQUEST_FRAME;
    let mut almost = (max as u32).to_be_bytes().to_vec();
    almost.extend(std::iter::repeat_n(0x40, max - 1));
    let almost = std::sync::Arc::new(almost);
    let mut conns = Vec::new();
    for _ in 0..16 {
        conns.push(connect(&srv).await);
    }
    let streams = conns.iter().flat_map(|c| (0..64).map(move |_| c.connection().clone())).map(|conn| {
        let almost = almost.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            // The server stops reading at its deadline; the write may fail then.
            let _ = send.write_all(&almost).await;
            let body = missive_federation::framing::read_frame(&mut recv, missive_spec::limits::MAX_RESPONSE_FRAME).await.ok()??;
            match missive_spec::codec::decode::<missive_spec::ResponseFrame>(&body).ok()?.res {
                missive_spec::Response::Error { code, .. } => Some(code),
                _ => None,
            }
        }
    });
    let attack = all_at_once(streams);
    let served = async {
        alice.send_text(&b, "sent while 1024 streams hang").await.unwrap();
        collect(&mut bob_live, Vec::new(), 1).await
    };
    let wait = async { tokio::time::timeout(std::time::Duration::from_secs(60), async { tokio::join!(attack, served) }).await };
    let (peak, outcome) = peak_rss_while(&srv, wait).await;
    let (answers, got) = outcome.expect("hanging request streams were never cut off");
    println!("peak RSS +{} KiB over {before} KiB", peak.saturating_sub(before));
    assert_eq!(answers.len(), 1024);
    assert!(answers.iter().all(|c| *c == Some(ErrorCode::BadFrame)), "not every hanging stream was answered bad_frame: {:?}", answers.iter().filter(|c| **c != Some(ErrorCode::BadFrame)).take(3).collect::<Vec<_>>());
    assert!(peak < before + RSS_BOUND_KIB, "RSS grew from {before} to {peak} KiB");
    assert_eq!(messages(&got).len(), 1, "bob was not served during the attack");
    drop(conns);
}

#[tokio::test]
async fn a_send_to_an_ip_literal_server_is_refused_at_once_and_queues_nothing() {
    let (_d, srv) = server("alpha.test", "open").await;
    let alice = register(&srv, "alice").await;
    // What a client that does not check ids would send: the frame is well formed CBOR,
    // but `to` is not a user id (§2.1: an IP literal is no server name).
    #[derive(serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Req {
        Send { to: String, content: Content, client_msg_id: serde_bytes::ByteBuf },
    }
    #[derive(serde::Serialize)]
    struct Frame {
        v: u64,
        req: Req,
        auth: String,
    }
    let frame = Frame {
        v: 0,
        req: Req::Send { to: "@x:127.0.0.31".into(), content: Content::text("hi"), client_msg_id: serde_bytes::ByteBuf::from(vec![7; 16]) },
        auth: alice.token().unwrap().to_owned(),
    };
    let body = alice.raw(&missive_spec::codec::frame(&missive_spec::codec::encode(&frame))).await.unwrap();
    match missive_spec::codec::decode::<missive_spec::ResponseFrame>(&body).unwrap().res {
        // A request frame whose `to` is no user id: its arguments are invalid (§5.2).
        missive_spec::Response::Error { code, .. } => assert_eq!(code, ErrorCode::InvalidRequest),
        other => panic!("a send to an IP literal was answered {other:?}"),
    }
    assert!(srv.peers_json().await.unwrap().is_empty(), "a destination was queued for an IP literal");
}
