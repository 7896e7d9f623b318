//! Bad input gets a typed error on its own stream; the connection, other clients and
//! stored data are unaffected.

mod common;

use common::*;
use missive_spec::codec;
use missive_spec::{limits, Content, Cursor, ErrorCode, Request, RequestFrame, Response, ResponseFrame};

fn error_code(body: &[u8]) -> ErrorCode {
    match codec::decode::<ResponseFrame>(body).unwrap().res {
        Response::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, missive_cli::ClientError>) -> Option<ErrorCode> {
    r.unwrap_err().code()
}

#[tokio::test]
async fn malformed_frames_bad_tokens_and_limits_get_typed_errors_while_others_are_served() {
    let (_d, srv) = server("alpha.test", "open").await;
    let alice = register(&srv, "alice").await;
    let bob = register(&srv, "bob").await;
    let (alice_id, bob_id) = (uid("alice", &srv), uid("bob", &srv));
    let (mut bob_live, _, _) = bob.subscribe(0).await.unwrap();
    let before = alice.send_text(&bob_id, "before the noise").await.unwrap();

    // A raw QUIC client speaking garbage, on alice's own connection.
    assert_eq!(error_code(&alice.raw(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).await.unwrap()), ErrorCode::BadFrame);
    assert_eq!(error_code(&alice.raw(b"hi").await.unwrap()), ErrorCode::BadFrame, "truncated header");
    assert_eq!(error_code(&alice.raw(&[0, 0, 0, 9, 1, 2]).await.unwrap()), ErrorCode::BadFrame, "truncated body");
    let not_a_request = codec::frame(&codec::encode(&"just a string"));
    assert_eq!(error_code(&alice.raw(&not_a_request).await.unwrap()), ErrorCode::BadFrame);
    // Oversized: a length prefix over the limit, and a real oversized frame.
    assert_eq!(error_code(&alice.raw(&(64u32 << 20).to_be_bytes()).await.unwrap()), ErrorCode::FrameTooLarge);
    let big = codec::frame(&vec![0x40; limits::MAX_REQUEST_FRAME + 1]);
    assert_eq!(error_code(&alice.raw(&big).await.unwrap()), ErrorCode::FrameTooLarge);
    // Another protocol version.
    let v9 = RequestFrame { v: 9, req: Request::Info {}, auth: None };
    assert_eq!(error_code(&alice.raw(&codec::frame(&codec::encode(&v9))).await.unwrap()), ErrorCode::UnsupportedVersion);

    // Bad and missing tokens.
    let mut stranger = connect(&srv).await;
    assert_eq!(code(stranger.send_text(&bob_id, "x").await), Some(ErrorCode::Unauthorized));
    stranger.set_token(Some("mt_not-a-real-token".into()));
    assert_eq!(code(stranger.send_text(&bob_id, "x").await), Some(ErrorCode::Unauthorized));
    assert_eq!(code(stranger.history(&alice_id, None, None, None).await), Some(ErrorCode::Unauthorized));
    assert_eq!(code(stranger.sync(0, None).await), Some(ErrorCode::Unauthorized));
    assert!(matches!(
        stranger.subscribe(0).await.map(|_| ()).unwrap_err().code(),
        Some(ErrorCode::Unauthorized)
    ));
    let mut guesser = connect(&srv).await;
    assert_eq!(code(guesser.login(&alice_id, "wrong-password", None).await), Some(ErrorCode::BadCredentials));
    assert_eq!(code(guesser.login(&uid("nobody", &srv), "whatever-pw", None).await), Some(ErrorCode::BadCredentials));
    assert_eq!(code(guesser.register(&alice_id, "pw-alice-again", None, None).await), Some(ErrorCode::UserExists));
    assert_eq!(code(guesser.register(&uid("shorty", &srv), "short", None, None).await), Some(ErrorCode::InvalidRequest));
    let foreign = missive_spec::UserId::parse("@eve:elsewhere.test").unwrap();
    assert_eq!(code(guesser.register(&foreign, "pw-eve-secret", None, None).await), Some(ErrorCode::InvalidRequest));

    // Requests that are well formed but not allowed.
    assert_eq!(code(alice.send_text(&alice_id, "me").await), Some(ErrorCode::SelfMessage));
    assert_eq!(code(alice.send_text(&uid("nobody", &srv), "x").await), Some(ErrorCode::UnknownUser));
    // A user of another server is never refused for being remote: the message is queued
    // for that server, reachable or not.
    assert_eq!(alice.send_text(&foreign, "queued for elsewhere").await.unwrap().to, foreign);
    let huge = Content { body: vec![b'a'; limits::MAX_CONTENT_BODY + 1], kind: "text".into() };
    assert_eq!(code(alice.send(&bob_id, huge, missive_cli::client::new_client_msg_id()).await), Some(ErrorCode::ContentTooLarge));
    let untyped = Content { body: b"x".to_vec(), kind: String::new() };
    assert_eq!(code(alice.send(&bob_id, untyped, missive_cli::client::new_client_msg_id()).await), Some(ErrorCode::ContentTooLarge));
    assert_eq!(code(alice.history(&bob_id, Some(0), None, None).await), Some(ErrorCode::InvalidRequest));
    assert_eq!(code(alice.history(&bob_id, Some(201), None, None).await), Some(ErrorCode::InvalidRequest));
    assert_eq!(code(alice.history(&bob_id, None, Some(Cursor("!!".into())), None).await), Some(ErrorCode::InvalidRequest));
    let c = Cursor("AAAAAAAAAAJhbHBoYS50ZXN0AAAAAAAAAAAC".into());
    assert_eq!(code(alice.history(&bob_id, None, Some(c.clone()), Some(c)).await), Some(ErrorCode::InvalidRequest));
    assert_eq!(code(alice.sync(0, Some(100_000)).await), Some(ErrorCode::InvalidRequest));

    // The same connection and everyone else carry on; nothing stored was disturbed.
    let after = alice.send_text(&bob_id, "after the noise").await.unwrap();
    assert_eq!(after.seq, before.seq + 1);
    let got = messages(&collect(&mut bob_live, Vec::new(), 2).await);
    assert_eq!(got, vec![before, after]);
    match alice.info().await.unwrap() {
        Response::Info { server_name, .. } => assert_eq!(server_name.as_str(), "alpha.test"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_connection_that_floods_garbage_does_not_stall_another_client() {
    let (_d, srv) = server("alpha.test", "open").await;
    let alice = register(&srv, "alice").await;
    let bob = register(&srv, "bob").await;
    let noisy = std::sync::Arc::new(connect(&srv).await);
    let mut junk = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let n = noisy.clone();
        junk.spawn(async move {
            let len = (i % 7) as u8;
            let mut b = vec![0, 0, 0, len];
            b.extend((0..len).map(|x| x.wrapping_mul(37).wrapping_add(i as u8)));
            n.raw(&b).await
        });
    }
    let bob_id = uid("bob", &srv);
    let mut acks = Vec::new();
    for i in 0..20 {
        acks.push(alice.send_text(&bob_id, &format!("through the flood {i}")).await.unwrap());
    }
    while let Some(r) = junk.join_next().await {
        let body = r.unwrap().expect("every junk stream gets an answer");
        assert!(matches!(codec::decode::<ResponseFrame>(&body).unwrap().res, Response::Error { .. }));
    }
    assert_eq!(messages(&bob.sync(0, None).await.unwrap().1), acks);
}

#[tokio::test]
async fn password_guessing_is_rate_limited_per_account_and_per_address() {
    let (_d, srv) = server("alpha.test", "open").await;
    let alice = register(&srv, "alice").await;
    let _bob = register(&srv, "bob").await;
    let alice_id = uid("alice", &srv);
    let mut guesser = connect(&srv).await;
    for i in 0..5 {
        assert_eq!(code(guesser.login(&alice_id, &format!("guess-{i}-xx"), None).await), Some(ErrorCode::BadCredentials));
    }
    // The account is locked for the window: even the right password is turned away.
    assert_eq!(code(guesser.login(&alice_id, "guess-5-xx", None).await), Some(ErrorCode::RateLimited));
    assert_eq!(code(guesser.login(&alice_id, &password("alice"), None).await), Some(ErrorCode::RateLimited));
    // Another account from the same address still works (5 of 20 address failures used).
    let mut bob2 = connect(&srv).await;
    bob2.login(&uid("bob", &srv), &password("bob"), None).await.unwrap();
    // Spraying other accounts from the same address: 15 more failures use up the address.
    for i in 0..15 {
        assert_eq!(code(guesser.login(&uid(&format!("u{i}"), &srv), "wrong-password", None).await), Some(ErrorCode::BadCredentials));
    }
    let mut bob3 = connect(&srv).await;
    assert_eq!(code(bob3.login(&uid("bob", &srv), &password("bob"), None).await), Some(ErrorCode::RateLimited));
    // Devices already logged in are not affected.
    let m = alice.send_text(&uid("bob", &srv), "still here").await.unwrap();
    assert_eq!(m.seq, 1);
    assert!(bob2.sync(0, None).await.unwrap().1.len() == 1);
}

#[tokio::test]
async fn a_connection_flood_is_refused_at_the_limit_and_slots_come_back() {
    let (_d, srv) = server_with_config("alpha.test", "open", |c| c.replace("max_connections_per_address = 64", "max_connections_per_address = 4")).await;
    let alice = register(&srv, "alice").await;
    let _bob = register(&srv, "bob").await;
    let mut others = Vec::new();
    for _ in 0..2 {
        others.push(connect(&srv).await);
    }
    // alice, bob and two more hold the four slots of 127.0.0.1: the fifth is refused.
    let name = missive_spec::ServerName::parse("alpha.test").unwrap();
    let refused = missive_cli::Client::connect(srv.addr, &name, missive_federation::tls::Pin::FirstUse).await;
    assert!(matches!(refused, Err(missive_cli::ClientError::Connect { .. })), "the fifth connection must be refused");
    // Those holding slots are served as before.
    alice.send_text(&uid("bob", &srv), "still served").await.unwrap();
    // A slot freed is a slot reusable.
    others.pop().unwrap().close().await;
    eventually("a slot to come back", || async {
        missive_cli::Client::connect(srv.addr, &name, missive_federation::tls::Pin::FirstUse).await.ok().map(|_| ())
    })
    .await;
}
