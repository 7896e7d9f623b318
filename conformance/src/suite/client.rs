//! Client protocol tests (spec §5, §6, §10–§13), spoken directly over QUIC.

use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context};
use missive_spec::wire::RequestFrame;
use missive_spec::{
    codec, limits, ClientMsgId, Content, ConversationId, ConversationSummary, Cursor, Ephemeral, ErrorCode, EventKind, ReceiptKind, Request,
    Response, ResponseFrame, UserId, Watermark, PROTOCOL_VERSION,
};

use super::{check_canonical, collect, eventually, history_all, messages, sync_all, test, text, Ctx, Test};
use crate::wire::framing::{self, MAX_REQUEST_BODY};
use crate::wire::{new_client_msg_id, Client, ClientError};

pub fn tests() -> Vec<Test> {
    vec![
        test!("c2s.info", Required, ["C2S-INFO-1", "CORE-CBOR-1"], [], info),
        test!("c2s.frame.unsupported_version", Required, ["C2S-FRAME-3"], [], unsupported_version),
        test!("c2s.frame.too_large", Required, ["C2S-FRAME-1", "C2S-FRAME-4"], [], too_large),
        test!("c2s.frame.tolerant_decoding", Required, ["CORE-CBOR-2", "CORE-CBOR-4"], [], tolerant_decoding),
        test!("c2s.frame.bad_frame", Required, ["C2S-FRAME-2", "C2S-FRAME-4", "C2S-FRAME-5"], [], bad_frame),
        test!("c2s.auth.unauthorized", Required, ["C2S-AUTH-2"], [], unauthorized),
        test!("c2s.register", Required, ["C2S-REG-1", "C2S-REG-2", "CORE-ID-1", "CORE-ID-2"], [], register),
        test!("c2s.login", Required, ["C2S-LOGIN-1", "C2S-LOGIN-2"], [], login),
        test!("c2s.login.rate_limited", Required, ["C2S-LOGIN-3"], [], login_rate_limited),
        test!("c2s.login.concurrent_guesses", Required, ["C2S-LOGIN-5"], [], login_concurrent),
        test!("c2s.auth.logout", Required, ["C2S-AUTH-1"], [], logout),
        test!("c2s.send.basic", Required, ["C2S-SEND-2", "C2S-SEND-5", "CORE-MSG-2", "CORE-MSG-3", "CORE-MSG-4", "CORE-CBOR-3"], [], send_basic),
        test!("c2s.send.errors", Required, ["C2S-SEND-6"], [], send_errors),
        test!("c2s.send.idempotent", Required, ["C2S-SEND-3", "C2S-SEND-4"], [], send_idempotent),
        test!("c2s.send.idempotent_after_restart", Required, ["C2S-SEND-3"], [], send_idempotent_restart),
        test!("c2s.send.durable", Required, ["C2S-SEND-1"], [], send_durable),
        test!("c2s.send.remote_queued", Required, ["C2S-SEND-7"], [Federation], send_remote),
        test!("c2s.sync.positions", Required, ["C2S-SYNC-1", "C2S-SYNC-2", "C2S-SYNC-3"], [], sync_positions),
        test!("c2s.subscribe.live", Required, ["C2S-SYNC-4", "C2S-SYNC-5"], [], subscribe_live),
        test!("c2s.sync.frame_size", Required, ["C2S-SYNC-6", "C2S-SYNC-4"], [], sync_frame_size),
        test!("c2s.history.paging", Required, ["C2S-HIST-1", "C2S-HIST-2", "CORE-ORDER-1"], [], history_paging),
        test!("c2s.history.errors", Required, ["C2S-HIST-3", "C2S-HIST-4"], [], history_errors),
        test!("c2s.conversations", Required, ["C2S-CONV-1", "C2S-CONV-2", "C2S-CONV-4", "C2S-CONV-5"], [], conversations),
        test!("c2s.conversations.read_presence", Required, ["C2S-CONV-2", "C2S-CONV-3"], [Receipts, Presence], conversations_read_presence),
        test!("c2s.receipts", Required, ["C2S-RCPT-1", "C2S-RCPT-2", "C2S-RCPT-3", "C2S-RCPT-5", "C2S-RCPT-6"], [Receipts], receipts),
        test!("c2s.receipts.devices", Required, ["C2S-RCPT-4"], [Receipts], receipts_devices),
        test!("c2s.devices", Required, ["C2S-DEV-1", "C2S-DEV-2"], [Devices], devices),
        test!("c2s.change_password", Required, ["C2S-PASS-1", "C2S-PASS-3"], [Devices], change_password),
        test!("c2s.change_password.rate_limited", Required, ["C2S-PASS-2"], [], change_password_rate_limited),
        test!("c2s.keys", Required, ["C2S-KEYS-1"], [], keys),
        test!("c2s.block", Required, ["C2S-BLOCK-1", "C2S-BLOCK-2", "C2S-BLOCK-3", "C2S-BLOCK-4"], [Presence], block),
        test!("c2s.presence", Required, ["C2S-PRES-2", "C2S-PRES-3", "C2S-PRES-4", "C2S-PRES-5"], [Presence], presence),
        test!("c2s.presence.silent_client", Required, ["C2S-PRES-1"], [Presence], presence_silent_client),
        test!("c2s.typing", Required, ["C2S-TYPE-1", "C2S-TYPE-2", "C2S-TYPE-3"], [Typing], typing),
    ]
}

/// Fails unless `r` is the server error `code`.
pub fn expect_code<T: std::fmt::Debug>(r: Result<T, ClientError>, code: ErrorCode, what: &str) -> anyhow::Result<()> {
    match r {
        Err(ClientError::Server { code: got, .. }) if got == code => Ok(()),
        Err(e) => bail!("{what}: expected {code}, got error {e}"),
        Ok(v) => bail!("{what}: expected {code}, got success {v:?}"),
    }
}

/// Sends raw bytes; returns the decoded response frame, checking that it is deterministic.
async fn raw(c: &Client, bytes: &[u8]) -> anyhow::Result<Response> {
    let body = c.raw(bytes).await?;
    let f: ResponseFrame = codec::decode(&body).context("the response is not a response frame")?;
    ensure!(f.v == PROTOCOL_VERSION, "response frame has version {}", f.v);
    ensure!(codec::encode(&f) == body, "the response frame is not deterministic CBOR (§1.1)");
    Ok(f.res)
}

fn error_code(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

/// A CBOR text string header and bytes.
fn cbor_text(s: &str) -> Vec<u8> {
    codec::encode(&s)
}

async fn info(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = ctx.server().await?;
    let c = s.connect().await?;
    let frame = RequestFrame { v: PROTOCOL_VERSION, req: Request::Info {}, auth: None };
    match raw(&c, &framing::frame(&codec::encode(&frame))).await? {
        Response::Info { version, server_name, .. } => {
            ensure!(version == PROTOCOL_VERSION, "info says version {version}");
            ensure!(server_name == s.name, "info says server {server_name}, expected {}", s.name);
        }
        r => bail!("info answered {r:?}"),
    }
    Ok(())
}

async fn unsupported_version(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, _b) = s.new_user("bob").await?;
    // A well-formed send, but version 1: it must not be acted on.
    let frame = RequestFrame {
        v: 1,
        req: Request::Send { to: bob.clone(), content: Content::text("v1"), client_msg_id: new_client_msg_id() },
        auth: a.token().map(str::to_owned),
    };
    let r = raw(&a, &framing::frame(&codec::encode(&frame))).await?;
    ensure!(error_code(&r) == Some(ErrorCode::UnsupportedVersion), "a version-1 send was answered {r:?}");
    // A version the server cannot even parse the rest of: {"v": 7, "req": 5}.
    let mut body = vec![0xa2];
    body.extend(cbor_text("v"));
    body.push(0x07);
    body.extend(cbor_text("req"));
    body.push(0x05);
    let r = raw(&a, &framing::frame(&body)).await?;
    ensure!(error_code(&r) == Some(ErrorCode::UnsupportedVersion), "{{v: 7, req: 5}} was answered {r:?}");
    ensure!(history_all(&a, &bob).await?.is_empty(), "{alice}'s version-1 send was stored");
    Ok(())
}

async fn too_large(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = ctx.server().await?;
    let c = s.connect().await?;
    let len = MAX_REQUEST_BODY + 1;
    let mut bytes = (len as u32).to_be_bytes().to_vec();
    bytes.extend(vec![0u8; 4096]);
    let r = raw(&c, &bytes).await?;
    ensure!(error_code(&r) == Some(ErrorCode::FrameTooLarge), "a {len}-byte frame was answered {r:?}");
    // The connection still serves other streams.
    ensure!(matches!(c.info().await?, Response::Info { .. }), "info after an oversized frame failed");
    Ok(())
}

async fn bad_frame(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = ctx.server().await?;
    let c = s.connect().await?;
    let info = codec::encode(&RequestFrame { v: PROTOCOL_VERSION, req: Request::Info {}, auth: None });
    let mut trailing = info.clone();
    trailing.push(0x00);
    let mut unknown = vec![0xa2];
    unknown.extend(cbor_text("v"));
    unknown.push(0x00);
    unknown.extend(cbor_text("req"));
    unknown.push(0xa1);
    unknown.extend(cbor_text("teleport"));
    unknown.push(0xa0);
    let cases: [(&str, Vec<u8>); 4] = [
        ("not CBOR", vec![0xff, 0xfe, 0xfd]),
        ("a CBOR item and trailing bytes", trailing),
        ("an unknown request", unknown),
        ("a truncated item", info[..info.len() - 1].to_vec()),
    ];
    for (what, body) in cases {
        let r = raw(&c, &framing::frame(&body)).await.with_context(|| what.to_owned())?;
        ensure!(error_code(&r) == Some(ErrorCode::BadFrame), "{what} was answered {r:?}");
    }
    ensure!(matches!(c.info().await?, Response::Info { .. }), "info on the same connection after bad frames failed");
    Ok(())
}

async fn tolerant_decoding(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (_alice, a) = s.new_user("alice").await?;
    let token = a.token().map(str::to_owned).unwrap_or_default();
    // {"req": {"info": {"later": 1}}, "v": 0 (as a two-byte integer), "future": "x"}:
    // keys out of order, a long integer form, unknown keys in the frame and the arguments.
    let mut info = vec![0xa3];
    info.extend(cbor_text("req"));
    info.push(0xa1);
    info.extend(cbor_text("info"));
    info.push(0xa1);
    info.extend(cbor_text("later"));
    info.push(0x01);
    info.extend(cbor_text("v"));
    info.extend([0x18, 0x00]);
    info.extend(cbor_text("future"));
    info.extend(cbor_text("x"));
    let r = raw(&a, &framing::frame(&info)).await?;
    ensure!(matches!(r, Response::Info { .. }), "a loosely encoded info request was answered {r:?}");
    // {"auth": T, "req": {"sync": {"since": 0, "hint": true}}, "v": 0} with an
    // indefinite-length arguments map.
    let mut sync = vec![0xa3];
    sync.extend(cbor_text("req"));
    sync.push(0xa1);
    sync.extend(cbor_text("sync"));
    sync.push(0xbf);
    sync.extend(cbor_text("since"));
    sync.push(0x00);
    sync.extend(cbor_text("hint"));
    sync.push(0xf5);
    sync.push(0xff);
    sync.extend(cbor_text("auth"));
    sync.extend(cbor_text(&token));
    sync.extend(cbor_text("v"));
    sync.push(0x00);
    let r = raw(&a, &framing::frame(&sync)).await?;
    ensure!(matches!(r, Response::Events { .. }), "a loosely encoded sync request was answered {r:?}");
    Ok(())
}

async fn unauthorized(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (bob, _) = s.new_user("bob").await?;
    let mut c = s.connect().await?;
    for token in [None, Some("not-a-token".to_owned())] {
        c.set_token(token.clone());
        let what = if token.is_some() { "a made-up token" } else { "no token" };
        expect_code(c.send_text(&bob, "hi").await, ErrorCode::Unauthorized, &format!("send with {what}"))?;
        expect_code(c.sync(0, None).await, ErrorCode::Unauthorized, &format!("sync with {what}"))?;
        expect_code(c.history(&bob, None, None, None).await, ErrorCode::Unauthorized, &format!("history with {what}"))?;
        expect_code(c.subscribe(0).await.map(|(_, next, _)| next), ErrorCode::Unauthorized, &format!("subscribe with {what}"))?;
    }
    let b2 = s.login(&bob).await?;
    ensure!(sync_all(&b2).await?.is_empty(), "an unauthorized send reached {bob}");
    Ok(())
}

async fn register(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = ctx.server().await?;
    let mut c = s.connect().await?;
    let carol = s.user_id("carol");
    let session = c.register(&carol, "long enough password", None, None).await.context("register carol")?;
    ensure!(session.user == carol, "register answered for {}", session.user);
    let mut again = s.connect().await?;
    expect_code(again.register(&carol, "another password", None, None).await, ErrorCode::UserExists, "registering carol twice")?;
    let foreign = UserId::parse("@dave:elsewhere.example")?;
    expect_code(again.register(&foreign, "long enough password", None, None).await, ErrorCode::InvalidRequest, "registering a user of another server")?;
    let erin = s.user_id("erin");
    expect_code(again.register(&erin, "short", None, None).await, ErrorCode::InvalidRequest, "a 5-byte password")?;
    let long = "x".repeat(limits::MAX_PASSWORD_LEN + 1);
    expect_code(again.register(&erin, &long, None, None).await, ErrorCode::InvalidRequest, "a 1025-byte password")?;
    let name = Some("n".repeat(limits::MAX_DEVICE_NAME_LEN + 1));
    expect_code(again.register(&erin, "long enough password", None, name).await, ErrorCode::InvalidRequest, "a 129-byte device name")?;
    // Upper case is rejected, never folded (§2.1, §2.2).
    let upper = format!("@Frank:{}", s.name);
    let mut body = vec![0xa2];
    body.extend(cbor_text("v"));
    body.push(0x00);
    body.extend(cbor_text("req"));
    body.push(0xa1);
    body.extend(cbor_text("register"));
    body.push(0xa2);
    body.extend(cbor_text("user"));
    body.extend(cbor_text(&upper));
    body.extend(cbor_text("password"));
    body.extend(cbor_text("long enough password"));
    let r = raw(&again, &framing::frame(&body)).await?;
    ensure!(
        matches!(error_code(&r), Some(ErrorCode::BadFrame | ErrorCode::InvalidRequest)),
        "registering {upper} was answered {r:?}"
    );
    // The registered account works.
    ensure!(c.sync(0, None).await.is_ok(), "the new session cannot sync");
    Ok(())
}

async fn login(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, _a) = s.new_user("alice").await?;
    let mut c1 = s.connect().await?;
    let d1 = c1.login(&alice, &crate::implementation::password_of(alice.localpart()), None).await?;
    let mut c2 = s.connect().await?;
    let d2 = c2.login(&alice, &crate::implementation::password_of(alice.localpart()), None).await?;
    ensure!(d1.device != d2.device, "two logins gave the same device {}", d1.device);
    ensure!(d1.token != d2.token, "two logins gave the same token");
    let mut x = s.connect().await?;
    expect_code(x.login(&alice, "wrong password!", None).await, ErrorCode::BadCredentials, "a wrong password")?;
    let nobody = s.user_id("nobody");
    expect_code(x.login(&nobody, "wrong password!", None).await, ErrorCode::BadCredentials, "an unknown user")?;
    Ok(())
}

async fn login_rate_limited(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let mut x = s.connect().await?;
    let mut limited_after = None;
    for i in 1..=50 {
        match x.login(&alice, "wrong password!", None).await {
            Err(e) if e.code() == Some(ErrorCode::BadCredentials) => {}
            Err(e) if e.code() == Some(ErrorCode::RateLimited) => {
                limited_after = Some(i);
                break;
            }
            other => bail!("wrong password {i} was answered {other:?}"),
        }
    }
    let n = limited_after.ok_or_else(|| anyhow!("50 wrong passwords in a row were never rate-limited"))?;
    let right = crate::implementation::password_of(alice.localpart());
    expect_code(x.login(&alice, &right, None).await, ErrorCode::RateLimited, &format!("the right password after {n} failures"))?;
    ensure!(a.sync(0, None).await.is_ok(), "a device logged in before the guessing was locked out too");
    Ok(())
}

/// Wrong passwords sent all at once count as they arrive: no more of them are answered
/// `bad_credentials` than the limit the server applies one at a time.
async fn login_concurrent(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, _) = s.new_user("alice").await?;
    let (bob, _) = s.new_user("bob").await?;
    let mut x = s.connect().await?;
    let mut limit = None;
    for i in 0..50 {
        match x.login(&alice, "wrong password!", None).await {
            Err(e) if e.code() == Some(ErrorCode::BadCredentials) => {}
            Err(e) if e.code() == Some(ErrorCode::RateLimited) => {
                limit = Some(i);
                break;
            }
            other => bail!("wrong password {} was answered {other:?}", i + 1),
        }
    }
    let limit = limit.ok_or_else(|| anyhow!("50 wrong passwords in a row were never rate-limited"))?;
    let guesses: Vec<_> = (0..50)
        .map(|_| {
            let mut c = x.as_device(None);
            let bob = bob.clone();
            async move { c.login(&bob, "wrong password!", None).await.err().and_then(|e| e.code()) }
        })
        .collect();
    let answers = join_all(guesses).await;
    let bad = answers.iter().filter(|c| **c == Some(ErrorCode::BadCredentials)).count();
    let limited = answers.iter().filter(|c| **c == Some(ErrorCode::RateLimited)).count();
    ensure!(bad + limited == 50, "50 concurrent wrong passwords were answered {answers:?}");
    ensure!(bad <= limit, "{bad} of 50 concurrent wrong passwords were checked; one at a time only {limit} were");
    Ok(())
}

async fn logout(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a1) = s.new_user("alice").await?;
    let a2 = s.login(&alice).await?;
    let (mut sub, _, _) = a1.subscribe(0).await?;
    a1.logout().await?;
    expect_code(a1.sync(0, None).await, ErrorCode::Unauthorized, "sync after logout")?;
    let end = tokio::time::timeout(super::DEADLINE, sub.next()).await.map_err(|_| anyhow!("the subscription outlived its logout"))?;
    match end {
        Err(e) if e.code() == Some(ErrorCode::Unauthorized) => {}
        other => bail!("the logged-out device's subscription ended with {other:?}, expected unauthorized"),
    }
    ensure!(a2.sync(0, None).await.is_ok(), "logging out one device logged out another");
    Ok(())
}

async fn send_basic(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    let a2 = s.login(&alice).await?;
    let conv = ConversationId::one_to_one(&alice, &bob);
    let mut sent = Vec::new();
    for i in 1..=3u64 {
        let m = a.send_text(&bob, &format!("m{i}")).await?;
        ensure!(m.seq == i, "message {i} has seq {}", m.seq);
        ensure!(m.conv == conv, "message {i} has conversation {}, expected {}", m.conv, conv);
        ensure!(m.from == alice && m.to == bob && m.origin == s.name, "message {i} has from/to/origin {}/{}/{}", m.from, m.to, m.origin);
        ensure!(m.deps.get(&s.name) == i, "message {i}: deps[origin] is {}", m.deps.get(&s.name));
        ensure!(m.deps.len() == 1, "message {i}: deps {:?} has entries other than the origin's", m.deps);
        ensure!(text(&m) == format!("m{i}"), "message {i} came back with content {:?}", m.content);
        sent.push(m);
    }
    let reply = b.send_text(&alice, "r1").await?;
    ensure!(reply.seq == 4, "bob's reply has seq {} in a conversation of one server, expected 4", reply.seq);
    ensure!(reply.deps.get(&s.name) == 4, "bob's reply: deps[origin] is {}", reply.deps.get(&s.name));
    sent.push(reply);
    for (who, c) in [("bob", &b), ("alice's other device", &a2), ("alice", &a)] {
        let got = messages(&sync_all(c).await?);
        ensure!(got == sent, "{who}'s stream has {:?}, expected the messages exactly as sent", got.iter().map(text).collect::<Vec<_>>());
    }
    ensure!(history_all(&b, &alice).await? == sent, "history differs from what send answered");
    Ok(())
}

async fn send_errors(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, _b) = s.new_user("bob").await?;
    expect_code(a.send_text(&alice, "me").await, ErrorCode::SelfMessage, "a message to oneself")?;
    expect_code(a.send_text(&s.user_id("ghost"), "boo").await, ErrorCode::UnknownUser, "a message to a local user that does not exist")?;
    let body = |n: usize, kind: &str| Content { body: vec![b'x'; n], kind: kind.to_owned() };
    let send = |c: Content| a.send(&bob, c, new_client_msg_id());
    expect_code(send(body(limits::MAX_CONTENT_BODY + 1, "text")).await, ErrorCode::ContentTooLarge, "a 16 385-byte body")?;
    expect_code(send(body(1, "")).await, ErrorCode::ContentTooLarge, "an empty content type")?;
    expect_code(send(body(1, &"t".repeat(65))).await, ErrorCode::ContentTooLarge, "a 65-byte content type")?;
    let max = send(body(limits::MAX_CONTENT_BODY, &"t".repeat(64))).await.context("a body and type of exactly the limits")?;
    ensure!(max.seq == 1, "the first accepted message has seq {}", max.seq);
    Ok(())
}

async fn send_idempotent(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    let id = new_client_msg_id();
    let first = a.send(&bob, Content::text("once"), id).await?;
    let again = a.send(&bob, Content::text("a different text"), id).await?;
    ensure!(again == first, "a repeated send was answered {again:?}, not the first message");
    // Concurrent repeats of a fresh id.
    let id2 = new_client_msg_id();
    let answers = concurrent_repeats(&a, &bob, id2, 10).await?;
    ensure!(answers.iter().all(|m| *m == answers[0]), "concurrent repeats got different messages");
    // The same id from another device is another message.
    let a2 = s.login(&alice).await?;
    let other = a2.send(&bob, Content::text("other device"), id).await?;
    ensure!(other.seq != first.seq, "the same client_msg_id from another device was taken as a repeat");
    let got = messages(&sync_all(&b).await?);
    let texts: Vec<String> = got.iter().map(text).collect();
    ensure!(texts == ["once", "concurrent", "other device"], "bob received {texts:?}");
    Ok(())
}

/// `n` concurrent sends with one client message id.
async fn concurrent_repeats(a: &Client, to: &UserId, id: ClientMsgId, n: usize) -> anyhow::Result<Vec<missive_spec::Message>> {
    let sends: Vec<_> = (0..n).map(|_| a.send(to, Content::text("concurrent"), id)).collect();
    Ok(join_all(sends).await.into_iter().collect::<Result<_, _>>()?)
}

/// Awaits futures concurrently (they share the connection's streams).
pub async fn join_all<F: std::future::Future>(fs: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = fs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future finished")).collect()
}

async fn send_idempotent_restart(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, _) = s.new_user("bob").await?;
    let token = a.token().map(str::to_owned);
    let id = new_client_msg_id();
    let first = a.send(&bob, Content::text("before the crash"), id).await?;
    drop(a);
    s.restart_after_kill9().await?;
    let mut a = s.connect().await?;
    a.set_token(token);
    let again = a.send(&bob, Content::text("after the crash"), id).await.context("the repeat after a restart")?;
    ensure!(again == first, "after kill -9 and restart, a repeat was answered {again:?}");
    let h = history_all(&a, &bob).await?;
    ensure!(h.len() == 1, "{alice}'s conversation holds {} messages after one send and its repeat", h.len());
    Ok(())
}

async fn send_durable(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (_alice, a) = s.new_user("alice").await?;
    let (bob, _) = s.new_user("bob").await?;
    let token = a.token().map(str::to_owned);
    let texts: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
    let sends: Vec<_> = texts.iter().map(|t| a.send_text(&bob, t)).collect();
    let acked: Vec<_> = join_all(sends).await.into_iter().collect::<Result<_, _>>()?;
    // Every answer above promises the message is on stable storage: kill at once.
    drop(a);
    s.restart_after_kill9().await?;
    let mut a = s.connect().await?;
    a.set_token(token);
    let h = history_all(&a, &bob).await.context("history after kill -9 (is the session itself lost?)")?;
    let lost: Vec<String> = acked.iter().filter(|m| !h.contains(m)).map(text).collect();
    ensure!(lost.is_empty(), "{} acknowledged messages are gone after kill -9: {lost:?}", lost.len());
    ensure!(h.len() == acked.len(), "history holds {} messages, {} were sent", h.len(), acked.len());
    let b = s.login(&bob).await?;
    let got = messages(&sync_all(&b).await?);
    ensure!(got.len() == acked.len(), "bob's stream holds {} of the {} messages", got.len(), acked.len());
    Ok(())
}

async fn send_remote(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (_alice, a) = s.new_user("alice").await?;
    let far = UserId::parse("@zed:unreachable.conformance.test")?;
    let m = a.send_text(&far, "queued").await.context("a message to a user of an unreachable server")?;
    ensure!(m.seq == 1 && m.to == far, "the queued message came back as {m:?}");
    ensure!(history_all(&a, &far).await? == vec![m], "the queued message is not in history");
    Ok(())
}

async fn sync_positions(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (_bob, b) = s.new_user("bob").await?;
    for i in 0..30 {
        b.send_text(&alice, &format!("s{i}")).await?;
    }
    let all = sync_all(&a).await?;
    let pos: Vec<u64> = all.iter().map(|e| e.pos).collect();
    ensure!(pos == (1..=30).collect::<Vec<_>>(), "positions are {pos:?}, expected 1..=30");
    let mut since = 0;
    let mut paged = Vec::new();
    loop {
        let (next, evs) = a.sync(since, Some(7)).await?;
        ensure!(evs.len() <= 7, "sync with limit 7 returned {}", evs.len());
        let expect_next = evs.last().map_or(since, |e| e.pos);
        ensure!(next == expect_next, "sync after {since} answered next {next}, expected {expect_next}");
        let n = evs.len();
        paged.extend(evs);
        if n < 7 {
            break;
        }
        since = next;
    }
    ensure!(paged == all, "paging sync by 7 gave other events than one sync");
    let (next, evs) = a.sync(1000, None).await?;
    ensure!(evs.is_empty() && next == 1000, "sync past the end answered next {next} with {} events", evs.len());
    expect_code(a.sync(0, Some(0)).await, ErrorCode::InvalidRequest, "sync with limit 0")?;
    expect_code(a.sync(0, Some(501)).await, ErrorCode::InvalidRequest, "sync with limit 501")?;
    Ok(())
}

/// More events than one response frame holds: `sync` stops before the frame limit and
/// says `more`; paging by `more` and a subscription both deliver every event once.
async fn sync_frame_size(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (_bob, b) = s.new_user("bob").await?;
    let body = vec![b'x'; missive_spec::limits::MAX_CONTENT_BODY];
    let n = 300;
    for _ in 0..n {
        b.send(&alice, Content { body: body.clone(), kind: "text".into() }, new_client_msg_id()).await?;
    }
    // The client reads frames only up to the response frame limit.
    let first = a.sync_page(0, None).await.context("sync of a backlog larger than one frame")?;
    ensure!(first.more, "a page of {} of {n} events did not say more", first.events.len());
    let all = sync_all(&a).await?;
    let pos: Vec<u64> = all.iter().map(|e| e.pos).collect();
    ensure!(pos == (1..=n as u64).collect::<Vec<_>>(), "paging by more gave positions {:?}..", pos.iter().take(5).collect::<Vec<_>>());
    let (mut sub, _, backlog) = a.subscribe(0).await.context("subscribe to a backlog larger than one frame")?;
    let live = collect(&mut sub, backlog, n).await?;
    ensure!(live == all, "the subscription's events differ from sync's");
    Ok(())
}

async fn subscribe_live(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (_bob, b) = s.new_user("bob").await?;
    for i in 0..5 {
        b.send_text(&alice, &format!("old{i}")).await?;
    }
    let (mut sub, _, backlog) = a.subscribe(0).await?;
    ensure!(backlog.len() == 5, "the first subscription frame held {} of 5 stored events", backlog.len());
    let sender = async {
        for i in 0..20 {
            b.send_text(&alice, &format!("live{i}")).await?;
        }
        Ok::<_, ClientError>(())
    };
    let (sent, got) = tokio::join!(sender, collect(&mut sub, backlog, 25));
    sent?;
    let got = got?;
    let pos: Vec<u64> = got.iter().map(|e| e.pos).collect();
    ensure!(pos == (1..=25).collect::<Vec<_>>(), "the subscription delivered positions {pos:?}");
    // A device resumes from its own position.
    let (_sub2, _, resumed) = a.subscribe(10).await?;
    let first = resumed.first().map(|e| e.pos);
    ensure!(first == Some(11), "subscribing since 10 started at {first:?}");
    ensure!(resumed.iter().map(|e| e.pos).eq(11..=25), "resuming since 10 did not give 11..=25 in order");
    Ok(())
}

async fn history_paging(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    for i in 0..75 {
        let (from, to) = if i % 3 == 0 { (&b, &alice) } else { (&a, &bob) };
        from.send_text(to, &format!("h{i}")).await?;
    }
    let default = a.history(&bob, None, None, None).await?;
    ensure!(default.messages.len() == 50, "a page without a limit held {} messages, expected 50", default.messages.len());
    // Back in time by 20, with new messages arriving in between.
    let mut seen = Vec::new();
    let mut before: Option<Cursor> = None;
    let mut pages = 0;
    loop {
        let page = a.history(&bob, Some(20), before.clone(), None).await?;
        ensure!(page.messages.len() <= 20, "a page of limit 20 held {}", page.messages.len());
        let mut asc = page.messages.clone();
        asc.reverse();
        check_canonical(&asc, "a history page (listed newest first)")?;
        seen.extend(page.messages);
        pages += 1;
        if pages == 2 {
            for i in 0..5 {
                b.send_text(&alice, &format!("late{i}")).await?;
            }
        }
        match page.older {
            Some(o) => before = Some(o),
            None => break,
        }
    }
    seen.reverse();
    let texts: Vec<String> = seen.iter().map(text).collect();
    let expected: Vec<String> = (0..75).map(|i| format!("h{i}")).collect();
    ensure!(texts == expected, "paging back gave {} messages {:?}…, expected h0..h74 once each in order", texts.len(), &texts[..texts.len().min(5)]);
    check_canonical(&seen, "history paged back")?;
    // Forward from the oldest page, by 30.
    let mut first_page = a.history(&bob, Some(30), None, None).await?;
    while let Some(o) = first_page.older.clone() {
        first_page = a.history(&bob, Some(30), Some(o), None).await?;
    }
    let mut forward: Vec<_> = first_page.messages.iter().rev().cloned().collect();
    let mut after = first_page.newer.clone();
    while let Some(n) = after {
        let p = a.history(&bob, Some(30), None, Some(n)).await?;
        forward.extend(p.messages.iter().rev().cloned());
        after = p.newer.clone();
    }
    let fwd: Vec<String> = forward.iter().map(text).collect();
    let mut all = expected.clone();
    all.extend((0..5).map(|i| format!("late{i}")));
    ensure!(fwd == all, "paging forward gave {} messages, expected all 80 once each in order", fwd.len());
    Ok(())
}

async fn history_errors(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, _b) = s.new_user("bob").await?;
    for i in 0..3 {
        a.send_text(&bob, &format!("e{i}")).await?;
    }
    let page = a.history(&bob, Some(1), None, None).await?;
    let older = page.older.ok_or_else(|| anyhow!("a page of 1 of 3 messages has no older cursor"))?;
    expect_code(a.history(&bob, None, Some(older.clone()), Some(older)).await, ErrorCode::InvalidRequest, "both cursors")?;
    expect_code(a.history(&bob, None, Some(Cursor("not a cursor".into())), None).await, ErrorCode::InvalidRequest, "a made-up cursor")?;
    expect_code(a.history(&bob, Some(0), None, None).await, ErrorCode::InvalidRequest, "limit 0")?;
    expect_code(a.history(&bob, Some(201), None, None).await, ErrorCode::InvalidRequest, "limit 201")?;
    expect_code(a.history(&alice, None, None, None).await, ErrorCode::SelfMessage, "history with oneself")?;
    expect_code(a.history(&s.user_id("ghost"), None, None, None).await, ErrorCode::UnknownUser, "history with a user that does not exist")?;
    Ok(())
}

fn watermark(m: &missive_spec::Message) -> Watermark {
    Watermark(m.order_key())
}

async fn receipts(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    let mut sent = Vec::new();
    for i in 0..4 {
        sent.push(a.send_text(&bob, &format!("r{i}")).await?);
    }
    b.receipt(&alice, ReceiptKind::Delivered, watermark(&sent[3])).await?;
    b.receipt(&alice, ReceiptKind::Read, watermark(&sent[1])).await?;
    // Late and repeated receipts never move a state back.
    b.receipt(&alice, ReceiptKind::Read, watermark(&sent[0])).await?;
    b.receipt(&alice, ReceiptKind::Delivered, watermark(&sent[2])).await?;
    let page = a.history(&bob, None, None, None).await?;
    ensure!(page.delivered == Some(watermark(&sent[3])), "alice's page shows delivered {:?}, expected up to r3", page.delivered);
    ensure!(page.read == Some(watermark(&sent[1])), "alice's page shows read {:?}, expected up to r1", page.read);
    let bobs = b.history(&alice, None, None, None).await?;
    ensure!(bobs.seen == Some(watermark(&sent[1])), "bob's own read position is {:?}, expected r1", bobs.seen);
    // Errors.
    let mut bogus = sent[3].clone();
    bogus.seq = 99;
    expect_code(b.receipt(&alice, ReceiptKind::Read, watermark(&bogus)).await, ErrorCode::InvalidRequest, "a receipt up to a message that does not exist")?;
    expect_code(b.receipt(&bob, ReceiptKind::Read, watermark(&sent[0])).await, ErrorCode::SelfMessage, "a receipt about oneself")?;
    // Both users' streams carry the receipts that moved a watermark.
    for (who, c) in [("alice", &a), ("bob", &b)] {
        let evs = sync_all(c).await?;
        let rs: Vec<_> = evs
            .iter()
            .filter_map(|e| match &e.event {
                EventKind::Receipt(r) => Some((r.kind, r.up_to.clone())),
                _ => None,
            })
            .collect();
        let want = vec![(ReceiptKind::Delivered, watermark(&sent[3])), (ReceiptKind::Read, watermark(&sent[1]))];
        ensure!(rs == want, "{who}'s stream has receipts {rs:?}, expected delivered r3 then read r1 and nothing for the late ones");
    }
    Ok(())
}

async fn receipts_devices(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b1) = s.new_user("bob").await?;
    let b2 = s.login(&bob).await?;
    let mut sent = Vec::new();
    for i in 0..6 {
        sent.push(a.send_text(&bob, &format!("d{i}")).await?);
    }
    b1.receipt(&alice, ReceiptKind::Read, watermark(&sent[4])).await?;
    b2.receipt(&alice, ReceiptKind::Read, watermark(&sent[2])).await?;
    let page = a.history(&bob, None, None, None).await?;
    ensure!(page.read == Some(watermark(&sent[4])), "read is {:?}: the user's read position must be the highest of their devices", page.read);
    for (who, c) in [("bob's first device", &b1), ("bob's second device", &b2)] {
        let p = c.history(&alice, None, None, None).await?;
        ensure!(p.seen == Some(watermark(&sent[4])), "{who} sees its user's read position as {:?}", p.seen);
    }
    Ok(())
}

async fn devices(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a1) = s.new_user("alice").await?;
    let a2 = s.login(&alice).await?;
    let list = a1.devices().await?;
    ensure!(list.len() == 2, "alice has {} devices after two logins", list.len());
    let current: Vec<_> = list.iter().filter(|d| d.current).collect();
    ensure!(current.len() == 1, "{} devices are marked current", current.len());
    let other = list.iter().find(|d| !d.current).ok_or_else(|| anyhow!("no other device"))?.id.clone();
    a1.revoke_device(other).await?;
    expect_code(a2.sync(0, None).await, ErrorCode::Unauthorized, "the revoked device")?;
    ensure!(a1.sync(0, None).await.is_ok(), "revoking another device logged out the caller");
    let ghost = missive_spec::DeviceId::parse("NOSUCHDEVICE")?;
    expect_code(a1.revoke_device(ghost).await, ErrorCode::InvalidRequest, "revoking a device the caller does not have")?;
    Ok(())
}

async fn change_password(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a1) = s.new_user("alice").await?;
    let a2 = s.login(&alice).await?;
    let a3 = s.login(&alice).await?;
    let old = crate::implementation::password_of(alice.localpart());
    let mut x = s.connect().await?;
    expect_code(a1.change_password("not the password", "a new password", false).await, ErrorCode::BadCredentials, "a wrong current password")?;
    expect_code(a1.change_password(&old, "short", false).await, ErrorCode::InvalidRequest, "a new password of 5 bytes")?;
    expect_code(a1.change_password(&old, &"x".repeat(1025), false).await, ErrorCode::InvalidRequest, "a new password of 1025 bytes")?;
    ensure!(x.login(&alice, &old, None).await.is_ok(), "a refused change changed the password");
    a1.change_password(&old, "a new password", false).await?;
    expect_code(x.login(&alice, &old, None).await, ErrorCode::BadCredentials, "the old password after the change")?;
    ensure!(x.login(&alice, "a new password", None).await.is_ok(), "the new password does not log in");
    ensure!(a2.sync(0, None).await.is_ok(), "a change without logout_others logged out another device");
    a1.change_password("a new password", "another password", true).await?;
    expect_code(a2.sync(0, None).await, ErrorCode::Unauthorized, "another device after logout_others")?;
    expect_code(a3.sync(0, None).await, ErrorCode::Unauthorized, "a third device after logout_others")?;
    ensure!(a1.sync(0, None).await.is_ok(), "logout_others logged out the calling device");
    let left = a1.devices().await?;
    ensure!(left.len() == 1 && left[0].current, "after logout_others the caller has {} devices", left.len());
    Ok(())
}

/// A stolen token is no way to guess the password: wrong current passwords count like
/// failed logins, and once limited even the right one is refused for a while.
async fn change_password_rate_limited(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let mut limited_after = None;
    for i in 1..=50 {
        match a.change_password("wrong password!", "a new password", false).await {
            Err(e) if e.code() == Some(ErrorCode::BadCredentials) => {}
            Err(e) if e.code() == Some(ErrorCode::RateLimited) => {
                limited_after = Some(i);
                break;
            }
            other => bail!("wrong password {i} was answered {other:?}"),
        }
    }
    let n = limited_after.ok_or_else(|| anyhow!("50 wrong current passwords in a row were never rate-limited"))?;
    let right = crate::implementation::password_of(alice.localpart());
    let what = format!("the right current password after {n} failures");
    expect_code(a.change_password(&right, "a new password", false).await, ErrorCode::RateLimited, &what)?;
    let mut x = s.connect().await?;
    expect_code(x.login(&alice, &right, None).await, ErrorCode::RateLimited, "a login after the guessing")?;
    Ok(())
}

/// `keys` answers, without a token, the key the handshake presented, and a chain whose
/// statements are each signed by the key they replace and end at it.
async fn keys(mut ctx: Ctx) -> anyhow::Result<()> {
    let sut = ctx.server().await?;
    let c = sut.connect().await?;
    let (current, chain) = c.keys().await?;
    let presented = crate::wire::key_text(&c.server_key());
    ensure!(current == presented, "keys names {current}, the handshake presented {presented}");
    // Each statement (federation.md F2.7) signed by its `old` key, each taking over from
    // the one before, the last naming the current key.
    let mut at: Option<String> = None;
    for (i, s) in chain.iter().enumerate() {
        let st: missive_spec::rotation::RotationStatement = missive_spec::codec::decode(&s.statement).context("a rotation statement")?;
        ensure!(st.server == sut.name, "statement {i} names {}", st.server);
        ensure!(at.as_ref().is_none_or(|a| *a == st.old), "statement {i} hands over from {}, not from {at:?}", st.old);
        let old = crate::wire::parse_key_text(&st.old).ok_or_else(|| anyhow!("statement {i}: {} is no key", st.old))?;
        let sig = ed25519_dalek::Signature::from_slice(&s.sig).map_err(|_| anyhow!("statement {i}: not a signature"))?;
        old.verify_strict(&missive_spec::rotation::SignedRotation::signed_bytes(&s.statement), &sig)
            .map_err(|_| anyhow!("statement {i} is not signed by its old key"))?;
        at = Some(st.new);
    }
    ensure!(at.is_none_or(|a| a == current), "the chain ends at another key than the current one");
    Ok(())
}

/// A block keeps everything of the blocked user from the blocker, for good, and tells the
/// blocked user nothing.
async fn block(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    let (_carol, c) = s.new_user("carol").await?;
    b.send_text(&alice, "before the block").await?;
    let hi = a.send_text(&bob, "hi bob").await?;
    expect_code(a.block(&alice).await, ErrorCode::InvalidRequest, "blocking oneself")?;
    a.block(&bob).await?;
    a.block(&bob).await.context("blocking twice")?;
    let stranger = s.user_id("nobody");
    a.block(&stranger).await.context("blocking a user who does not exist")?;
    let mut listed = a.blocked().await?;
    listed.sort();
    let mut want = vec![bob.clone(), stranger.clone()];
    want.sort();
    ensure!(listed == want, "blocked lists {listed:?}, not {want:?}");
    a.unblock(&stranger).await?;
    a.unblock(&stranger).await.context("unblocking someone not blocked")?;

    let (mut sub, _, backlog) = a.subscribe(a.sync(0, None).await?.0).await?;
    ensure!(backlog.is_empty(), "a subscription from the head has a backlog");
    // Bob is told nothing; carol's later message shows where bob's message and read
    // receipt would have been.
    b.send_text(&alice, "while blocked").await.context("a blocked user's send")?;
    b.receipt(&alice, ReceiptKind::Read, Watermark(hi.order_key())).await.context("a blocked user's receipt")?;
    c.send_text(&alice, "from carol").await?;
    let events = collect(&mut sub, Vec::new(), 1).await?;
    ensure!(
        !events.iter().any(|e| matches!(&e.event, EventKind::Receipt(r) if r.user == bob)),
        "the blocker received bob's receipt"
    );
    let got = messages(&events);
    ensure!(got.iter().all(|m| m.from != bob), "the blocker received {:?} from bob", got.iter().map(text).collect::<Vec<_>>());
    ensure!(got.iter().any(|m| text(m) == "from carol"), "carol's message did not arrive: {:?}", got.iter().map(text).collect::<Vec<_>>());
    let shown: Vec<String> = history_all(&a, &bob).await?.iter().map(text).collect();
    ensure!(shown == ["before the block", "hi bob"], "the blocker's history with bob is {shown:?}");
    let bobs: Vec<String> = history_all(&b, &alice).await?.iter().map(text).collect();
    ensure!(bobs.contains(&"while blocked".to_owned()), "the blocked sender's history lacks its message: {bobs:?}");
    let (convs, _) = a.conversations(None, None).await?;
    let with_bob = convs.iter().find(|c| c.with == bob).ok_or_else(|| anyhow!("no conversation with bob listed"))?;
    ensure!(with_bob.last.as_ref().map(text).as_deref() == Some("hi bob"), "the blocker's conversation with bob ends {:?}", with_bob.last.as_ref().map(text));
    ensure!(with_bob.unread == 1, "{} unread from bob, not 1", with_bob.unread);
    let p = a.presence(&bob).await?;
    ensure!(!p.online && p.last_seen.is_none(), "a blocked user's presence shows {p:?}");

    // Unblocked: new messages arrive; the one sent while blocked never does.
    a.unblock(&bob).await?;
    ensure!(a.blocked().await?.is_empty(), "blocked is not empty after unblock");
    b.send_text(&alice, "after the unblock").await?;
    let got = messages(&collect(&mut sub, Vec::new(), 1).await?);
    ensure!(got.iter().map(text).collect::<Vec<_>>() == ["after the unblock"], "after the unblock the blocker received {:?}", got.iter().map(text).collect::<Vec<_>>());
    let shown: Vec<String> = history_all(&a, &bob).await?.iter().map(text).collect();
    ensure!(shown == ["before the block", "hi bob", "after the unblock"], "after the unblock the history is {shown:?}");
    Ok(())
}

async fn presence(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    let (carol, _c) = s.new_user("carol").await?;
    // Strangers learn nothing, not even that the user exists.
    expect_code(a.presence(&bob).await, ErrorCode::UnknownUser, "presence of a stranger")?;
    expect_code(a.presence(&s.user_id("ghost")).await, ErrorCode::UnknownUser, "presence of nobody")?;
    a.send_text(&bob, "hello").await?;
    b.send_text(&alice, "hello alice").await?;
    let p = a.presence(&bob).await?;
    ensure!(!p.online, "bob is online with no subscription");
    let (mut asub, _, _) = a.subscribe(1000).await?;
    let (bsub, _, _) = b.subscribe(0).await?;
    let online = eventually("bob online in a presence query", || async { a.presence(&bob).await.ok().filter(|p| p.online) }).await?;
    ensure!(online.user == bob, "presence answered for {}", online.user);
    wait_ephemeral(&mut asub, |e| matches!(e, Ephemeral::Presence(p) if p.user == bob && p.online), "bob online pushed to alice").await?;
    drop(bsub);
    b.close().await;
    wait_ephemeral(&mut asub, |e| matches!(e, Ephemeral::Presence(p) if p.user == bob && !p.online), "bob offline pushed to alice").await?;
    let p = a.presence(&bob).await?;
    ensure!(!p.online && p.last_seen.is_some(), "after bob left: {p:?}, expected offline with last_seen");
    let b2 = s.login(&bob).await?;
    b2.set_hide_last_seen(true).await?;
    let p = a.presence(&bob).await?;
    ensure!(p.last_seen.is_none(), "last_seen {:?} shown although bob hides it", p.last_seen);
    expect_code(b2.presence(&carol).await, ErrorCode::UnknownUser, "bob asking about carol, a stranger")?;
    let _ = alice;
    Ok(())
}

async fn presence_silent_client(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    b.send_text(&alice, "hi").await?;
    a.send_text(&bob, "hi bob").await?;
    let token = b.token().map(str::to_owned);
    drop(b);
    // Bob subscribes from a runtime that then stops dead: no close, no keep-alives, as if
    // his machine lost power.
    let (addr, name, key) = (s.client, s.name.clone(), s.key);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        let subscribed = rt.block_on(async {
            let mut c = Client::connect(addr, &name, key).await?;
            c.set_token(token);
            let sub = c.subscribe(0).await?;
            Ok::<_, ClientError>((c, sub))
        });
        let ok = subscribed.is_ok();
        std::mem::forget(subscribed);
        let _ = tx.send(ok);
        rt.shutdown_background();
    });
    ensure!(rx.await.unwrap_or(false), "the silent client could not subscribe");
    eventually("bob online while subscribed", || async { a.presence(&bob).await.ok().filter(|p| p.online) }).await?;
    let wait = async {
        loop {
            if a.presence(&bob).await.is_ok_and(|p| !p.online) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .map_err(|_| anyhow!("bob still online 60 s after his client went silent: the server must end a silent subscription"))?;
    Ok(())
}

/// Reads `sub` until an ephemeral update matching `want` arrives.
async fn wait_ephemeral(sub: &mut crate::wire::Subscription, want: impl Fn(&Ephemeral) -> bool, what: &str) -> anyhow::Result<Ephemeral> {
    let wait = async {
        loop {
            match sub.next_frame().await? {
                Some(f) => {
                    if let Some(e) = f.ephemeral.into_iter().find(|e| want(e)) {
                        return Ok(e);
                    }
                }
                None => bail!("subscription ended waiting for {what}"),
            }
        }
    };
    tokio::time::timeout(super::DEADLINE, wait).await.map_err(|_| anyhow!("{what} did not arrive within {:?}", super::DEADLINE))?
}

async fn typing(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    let (carol, _) = s.new_user("carol").await?;
    expect_code(a.typing(&carol).await, ErrorCode::UnknownUser, "typing to a stranger")?;
    a.send_text(&bob, "hi").await?;
    b.send_text(&alice, "hello").await?;
    let (mut bsub, _, _) = b.subscribe(1000).await?;
    let before = now_ms();
    a.typing(&bob).await?;
    let e = wait_ephemeral(&mut bsub, |e| matches!(e, Ephemeral::Typing(t) if t.user == alice), "alice typing pushed to bob").await?;
    let Ephemeral::Typing(t) = e else { unreachable!() };
    ensure!(t.peer == bob && t.conv == ConversationId::one_to_one(&alice, &bob), "typing update {t:?} names the wrong conversation");
    let ahead = t.until.saturating_sub(before);
    ensure!((3_000..=7_000).contains(&ahead), "typing shown until {ahead} ms from now, expected about 5 s");
    expect_code(a.typing(&bob).await, ErrorCode::RateLimited, "a second typing notification within a second")?;
    // The limit is per user and conversation: bob may answer at once. (That the limit
    // lifts after a second is tested on injected time, in the reference core.)
    b.typing(&alice).await.context("bob typing back while alice is rate-limited")?;
    Ok(())
}

/// Now, in ms since the epoch (typing `until` is in the server's clock; loopback shares it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Every conversation of `c`, page by page of `limit`; fails on a repeat.
async fn all_conversations(c: &Client, limit: u32) -> anyhow::Result<Vec<ConversationSummary>> {
    let mut all: Vec<ConversationSummary> = Vec::new();
    let mut before = None;
    loop {
        let (page, older) = c.conversations(Some(limit), before).await?;
        ensure!(page.len() <= limit as usize, "a conversations page of limit {limit} held {}", page.len());
        for s in page {
            ensure!(!all.iter().any(|a| a.conv == s.conv), "conversation with {} listed twice while paging", s.with);
            all.push(s);
        }
        match older {
            Some(o) => before = Some(o),
            None => return Ok(all),
        }
    }
}

fn find<'a>(list: &'a [ConversationSummary], with: &UserId) -> anyhow::Result<&'a ConversationSummary> {
    list.iter().find(|s| s.with == *with).ok_or_else(|| anyhow!("no conversation with {with} listed"))
}

async fn conversations(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    let (carol, c) = s.new_user("carol").await?;
    let (dave, d) = s.new_user("dave").await?;
    let (empty, _) = a.conversations(None, None).await?;
    ensure!(empty.is_empty(), "a new user lists {} conversations", empty.len());
    for i in 0..3 {
        b.send_text(&alice, &format!("b{i}")).await?;
    }
    let c0 = c.send_text(&alice, "c0").await?;
    let a0 = a.send_text(&dave, "a0").await?;
    let list = all_conversations(&a, 50).await?;
    let order: Vec<&UserId> = list.iter().map(|s| &s.with).collect();
    ensure!(list.len() == 3, "alice lists {order:?}, expected her 3 conversations");
    // Most recently active first: by activity time, ties by conversation id, descending.
    for w in list.windows(2) {
        ensure!((w[0].active_ms, w[0].conv) > (w[1].active_ms, w[1].conv), "alice's conversations are not most recent first: {order:?}");
    }
    let (sb, sc, sd) = (find(&list, &bob)?, find(&list, &carol)?, find(&list, &dave)?);
    ensure!(sb.active_ms <= sc.active_ms && sc.active_ms <= sd.active_ms, "activity times do not follow the order messages were stored in");
    ensure!(sb.conv == ConversationId::one_to_one(&alice, &bob), "the conversation with bob has the wrong id");
    ensure!(sb.last.as_ref().map(text).as_deref() == Some("b2"), "the last message with bob is {:?}, expected b2", sb.last.as_ref().map(text));
    ensure!(sc.last.as_ref() == Some(&c0) && sd.last.as_ref() == Some(&a0), "`last` is not the newest message exactly as stored");
    ensure!((sb.unread, sc.unread, sd.unread) == (3, 1, 0), "alice's unread counts (bob, carol, dave) are {:?}, expected (3, 1, 0)", (sb.unread, sc.unread, sd.unread));
    let (dl, _) = d.conversations(None, None).await?;
    ensure!(dl.len() == 1 && dl[0].with == alice && dl[0].unread == 1, "dave, written to once, lists {dl:?}");
    // A conversation active again moves to the front.
    b.send_text(&alice, "b3").await?;
    let list = all_conversations(&a, 50).await?;
    let (front, sb) = (&list[0], find(&list, &bob)?);
    ensure!(
        sb.active_ms == front.active_ms && sb.active_ms >= find(&list, &dave)?.active_ms,
        "after bob wrote again alice's first conversation is with {} (active {}), bob's active {}",
        front.with,
        front.active_ms,
        sb.active_ms
    );
    // Paging by one lists each once.
    let paged = all_conversations(&a, 1).await?;
    ensure!(paged.len() == 3, "paging by 1 listed {} conversations, expected 3", paged.len());
    // The count stops at 100.
    for i in 0..100 {
        b.send_text(&alice, &format!("more{i}")).await?;
    }
    let list = all_conversations(&a, 50).await?;
    ensure!(find(&list, &bob)?.unread == 100, "104 unread messages are counted as {}, expected 100", find(&list, &bob)?.unread);
    expect_code(a.conversations(Some(0), None).await, ErrorCode::InvalidRequest, "conversations limit 0")?;
    expect_code(a.conversations(Some(101), None).await, ErrorCode::InvalidRequest, "conversations limit 101")?;
    expect_code(a.conversations(None, Some(Cursor("not a cursor".into()))).await, ErrorCode::InvalidRequest, "a made-up conversations cursor")?;
    Ok(())
}

async fn conversations_read_presence(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(b.send_text(&alice, &format!("r{i}")).await?);
    }
    let (list, _) = a.conversations(None, None).await?;
    let sb = find(&list, &bob)?;
    ensure!(sb.presence.is_none(), "alice sees bob's presence before she wrote to him: {:?}", sb.presence);
    a.receipt(&bob, ReceiptKind::Read, watermark(&sent[1])).await?;
    let (list, _) = a.conversations(None, None).await?;
    ensure!(find(&list, &bob)?.unread == 1, "after reading 2 of 3, alice's unread count is {}", find(&list, &bob)?.unread);
    // Alice's own reply does not count, and now they share the conversation.
    a.send_text(&bob, "reply").await?;
    let (list, _) = a.conversations(None, None).await?;
    let sb = find(&list, &bob)?;
    ensure!(sb.unread == 1, "alice's own message changed her unread count to {}", sb.unread);
    let p = sb.presence.as_ref().ok_or_else(|| anyhow!("alice does not see bob's presence once both have written"))?;
    ensure!(p.user == bob, "the presence listed with bob is {}'s", p.user);
    let asked = a.presence(&bob).await?;
    ensure!(p.online == asked.online, "the listed presence says online={}, `presence` says {}", p.online, asked.online);
    let (bl, _) = b.conversations(None, None).await?;
    ensure!(bl.first().map(|s| s.unread) == Some(1), "bob, answered once, lists {bl:?}");
    Ok(())
}
