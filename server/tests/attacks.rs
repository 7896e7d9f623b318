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
