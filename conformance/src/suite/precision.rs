//! Where the client protocol once left an implementer guessing (spec §5, §6.2, §6.5, §10,
//! §12): which error a frame gets, how nesting is counted, what an empty stream gets, how a
//! subscription ends, how `read` and `delivered` relate, and when two users share a
//! conversation. Frames are written byte by byte where a typed encoder could not write them.

use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context};
use crate::wire::Client;
use missive_spec::wire::RequestFrame;
use missive_spec::{codec, limits, ErrorCode, EventKind, ReceiptKind, Request, Response, ResponseFrame, Watermark, PROTOCOL_VERSION};

use super::client::expect_code;
use super::{eventually, history_all, sync_all, test, Ctx, Test};

pub fn tests() -> Vec<Test> {
    vec![
        test!("c2s.frame.not_a_request_frame", Required, ["C2S-FRAME-2", "CORE-CBOR-2"], [], not_a_request_frame),
        test!("c2s.frame.invalid_arguments", Required, ["C2S-FRAME-9", "C2S-RCPT-2"], [Receipts], invalid_arguments),
        test!("c2s.frame.nesting_depth", Required, ["C2S-FRAME-8"], [], nesting_depth),
        test!("c2s.frame.empty_stream", Required, ["C2S-FRAME-10", "C2S-FRAME-4"], [], empty_stream),
        test!("c2s.tls.server_name", Required, ["C2S-TLS-1"], [], tls_server_name),
        test!("c2s.login.invalid", Required, ["C2S-LOGIN-7"], [], login_invalid),
        test!("c2s.receipts.read_apart_from_delivered", Required, ["C2S-RCPT-7", "C2S-RCPT-5"], [Receipts], read_apart_from_delivered),
        test!("c2s.subscribe.stop", Required, ["C2S-SYNC-8"], [Presence], subscribe_stop),
        test!("c2s.presence.shared_by_both", Required, ["C2S-PRES-6", "C2S-PRES-3", "C2S-TYPE-3"], [Presence, Typing, Receipts], shared_by_both),
    ]
}

/// CBOR items written by hand: definite lengths, shortest heads, keys in the order given.
mod cbor {
    fn head(major: u8, n: u64) -> Vec<u8> {
        let m = major << 5;
        match n {
            0..=23 => vec![m | n as u8],
            24..=0xff => vec![m | 24, n as u8],
            0x100..=0xffff => [vec![m | 25], (n as u16).to_be_bytes().to_vec()].concat(),
            0x1_0000..=0xffff_ffff => [vec![m | 26], (n as u32).to_be_bytes().to_vec()].concat(),
            _ => [vec![m | 27], n.to_be_bytes().to_vec()].concat(),
        }
    }
    pub fn uint(n: u64) -> Vec<u8> {
        head(0, n)
    }
    pub fn bytes(b: &[u8]) -> Vec<u8> {
        [head(2, b.len() as u64), b.to_vec()].concat()
    }
    pub fn text(s: &str) -> Vec<u8> {
        [head(3, s.len() as u64), s.as_bytes().to_vec()].concat()
    }
    pub fn array(items: &[Vec<u8>]) -> Vec<u8> {
        [head(4, items.len() as u64), items.concat()].concat()
    }
    pub fn map(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = head(5, entries.len() as u64);
        for (k, v) in entries {
            out.extend(text(k));
            out.extend_from_slice(v);
        }
        out
    }
    /// A version-0 request frame body: `{"v": 0, "req": {name: args}, "auth"?: token}`.
    pub fn request(name: &str, args: Vec<u8>, auth: Option<&str>) -> Vec<u8> {
        let mut entries = vec![("v", uint(0)), ("req", map(&[(name, args)]))];
        if let Some(t) = auth {
            entries.push(("auth", text(t)));
        }
        map(&entries)
    }
}

/// Writes `bytes` (length prefix included, or not, as the test wants) on a new stream and
/// returns the response, which must be a deterministic version-0 frame.
async fn answer_raw(c: &Client, bytes: &[u8]) -> anyhow::Result<Response> {
    let body = c.raw(bytes).await?;
    let f: ResponseFrame = codec::decode(&body).context("the answer is not a response frame")?;
    ensure!(f.v == PROTOCOL_VERSION && codec::encode(&f) == body, "the answer is not a deterministic version-0 frame");
    Ok(f.res)
}

/// Sends one frame body and returns the response.
async fn answer(c: &Client, body: &[u8]) -> anyhow::Result<Response> {
    answer_raw(c, &codec::frame(body)).await
}

/// Fails unless `r` is the error `code`.
fn expect_error(r: &Response, code: ErrorCode, what: &str) -> anyhow::Result<()> {
    match r {
        Response::Error { code: got, .. } if *got == code => Ok(()),
        other => bail!("{what}: expected {code}, got {other:?}"),
    }
}

async fn not_a_request_frame(mut ctx: Ctx) -> anyhow::Result<()> {
    use cbor::*;
    let s = ctx.server().await?;
    let c = s.connect().await?;
    let info = || map(&[("info", map(&[]))]);
    // A text string of invalid UTF-8 as the request name.
    let mut bad_utf8 = map(&[("v", uint(0))]);
    bad_utf8[0] += 1;
    bad_utf8.extend(text("req"));
    bad_utf8.extend([0xa1, 0x62, 0xff, 0xfe, 0xa0]);
    let two_requests = map(&[("v", uint(0)), ("req", map(&[("info", map(&[])), ("devices", map(&[]))]))]);
    // {"v": 0, "req": {1: {}}}: the request name is not text.
    let mut numeric_name = map(&[("v", uint(0))]);
    numeric_name[0] += 1;
    numeric_name.extend(text("req"));
    numeric_name.extend([0xa1, 0x01, 0xa0]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an array instead of a map", array(&[uint(0), info()])),
        ("a frame without v", map(&[("req", info())])),
        ("v as text", map(&[("v", text("0")), ("req", info())])),
        ("a frame without req", map(&[("v", uint(0))])),
        ("req as an array", map(&[("v", uint(0)), ("req", array(&[text("info")]))])),
        ("an empty req map", map(&[("v", uint(0)), ("req", map(&[]))])),
        ("two requests in one req", two_requests),
        ("a request name that is not text", numeric_name),
        ("auth as an integer", map(&[("v", uint(0)), ("req", info()), ("auth", uint(7))])),
        ("a text string of invalid UTF-8", bad_utf8),
    ];
    for (what, body) in cases {
        let r = answer(&c, &body).await.with_context(|| what.to_owned())?;
        expect_error(&r, ErrorCode::BadFrame, what)?;
    }
    // Not deterministic, still well formed: {"v": 0, "req": {_ "info": {}}}, the request
    // map of indefinite length (§1.1).
    let mut indefinite = map(&[("v", uint(0))]);
    indefinite[0] += 1;
    indefinite.extend(text("req"));
    indefinite.push(0xbf);
    indefinite.extend(text("info"));
    indefinite.extend([0xa0, 0xff]);
    let r = answer(&c, &indefinite).await?;
    ensure!(matches!(r, Response::Info { .. }), "an info request in an indefinite-length map was answered {r:?}");
    Ok(())
}

async fn invalid_arguments(mut ctx: Ctx) -> anyhow::Result<()> {
    use cbor::*;
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    let m = a.send_text(&bob, "the only message").await?;
    let key = m.order_key().to_bytes();
    let token = b.token().map(str::to_owned).unwrap_or_default();
    let auth = Some(token.as_str());
    let receipt = |kind: &str, up_to: Vec<u8>| map(&[("kind", text(kind)), ("with", text(alice.as_str())), ("up_to", up_to)]);
    let send = |to: &str, id: Vec<u8>| {
        map(&[("to", text(to)), ("content", map(&[("body", bytes(b"x")), ("type", text("text"))])), ("client_msg_id", id)])
    };
    let upper = format!("@Alice:{}", s.name);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a receipt whose up_to is bytes but not an order key", request("receipt", receipt("read", bytes(&[1, 2, 3])), auth)),
        ("a receipt whose up_to is text", request("receipt", receipt("read", text("AAAAAAAA")), auth)),
        ("a receipt of unknown kind", request("receipt", receipt("seen", bytes(&key)), auth)),
        ("a receipt without up_to", request("receipt", map(&[("kind", text("read")), ("with", text(alice.as_str()))]), auth)),
        ("a send with a 15-byte client_msg_id", request("send", send(alice.as_str(), bytes(&[7; 15])), auth)),
        ("a send with a 17-byte client_msg_id", request("send", send(alice.as_str(), bytes(&[7; 17])), auth)),
        ("a send whose client_msg_id is text", request("send", send(alice.as_str(), text("0123456789abcdef")), auth)),
        ("a send to a malformed user id", request("send", send("alice", bytes(&[8; 16])), auth)),
        ("a presence request for an upper-case user id", request("presence", map(&[("user", text(&upper))]), auth)),
        ("a presence request whose user is bytes", request("presence", map(&[("user", bytes(alice.as_str().as_bytes()))]), auth)),
        ("a sync without since", request("sync", map(&[]), auth)),
        ("a sync whose since is text", request("sync", map(&[("since", text("0"))]), auth)),
        ("a sync whose limit does not fit", request("sync", map(&[("limit", uint(1 << 40)), ("since", uint(0))]), auth)),
        ("info with arguments that are not a map", request("info", uint(5), None)),
        // Decoding comes before authentication.
        ("a send without a token and with a 15-byte client_msg_id", request("send", send(alice.as_str(), bytes(&[9; 15])), None)),
    ];
    for (what, body) in cases {
        let r = answer(&b, &body).await.with_context(|| what.to_owned())?;
        expect_error(&r, ErrorCode::InvalidRequest, what)?;
    }
    // Nothing was changed: one message, no receipt.
    ensure!(history_all(&a, &bob).await?.len() == 1, "an invalid send was stored");
    let receipts = sync_all(&a).await?.into_iter().filter(|e| matches!(e.event, EventKind::Receipt(_))).count();
    ensure!(receipts == 0, "an invalid receipt reached alice's stream");
    // The same receipt, well formed, is accepted.
    let ok = answer(&b, &request("receipt", receipt("read", bytes(&key)), auth)).await?;
    ensure!(matches!(ok, Response::Ok {}), "a valid receipt was answered {ok:?}");
    Ok(())
}

/// `{"v": 0, "req": {"info": {"x": A}}}`, A being `arrays` nested one-element arrays.
fn info_nested(arrays: usize) -> Vec<u8> {
    let mut inner = cbor::uint(0);
    for _ in 0..arrays {
        inner = cbor::array(&[inner]);
    }
    cbor::request("info", cbor::map(&[("x", inner)]), None)
}

async fn nesting_depth(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = ctx.server().await?;
    let c = s.connect().await?;
    // The outer map is level 1, `req` 2, the arguments 3: 13 arrays reach level 16.
    let r = answer(&c, &info_nested(13)).await?;
    ensure!(matches!(r, Response::Info { .. }), "an info request nesting 16 levels was answered {r:?}");
    let r = answer(&c, &info_nested(14)).await?;
    expect_error(&r, ErrorCode::BadFrame, "an info request nesting 17 levels in a field the server ignores")?;
    ensure!(matches!(c.info().await?, Response::Info { .. }), "info after a too-deep frame failed");
    Ok(())
}

async fn empty_stream(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = ctx.server().await?;
    let c = s.connect().await?;
    let (mut send, mut recv) = c.connection().open_bi().await?;
    send.finish()?;
    let got = tokio::time::timeout(super::DEADLINE, recv.read_to_end(limits::MAX_RESPONSE_FRAME))
        .await
        .map_err(|_| anyhow!("the server neither finished nor reset a stream that carried no request"))?;
    match got {
        Ok(bytes) => ensure!(bytes.is_empty(), "a stream without a request was answered with {} bytes", bytes.len()),
        Err(e) => bail!("a stream without a request ended with {e}, expected a clean finish"),
    }
    // Part of a frame, then the end of the stream: a length of 10, then 3 bytes.
    let r = answer_raw(&c, &[0, 0, 0, 10, 0xa1, 0x61, b'v']).await?;
    expect_error(&r, ErrorCode::BadFrame, "a stream finished inside a frame")?;
    let r = answer_raw(&c, &[0, 0]).await?;
    expect_error(&r, ErrorCode::BadFrame, "a stream finished inside the length prefix")?;
    ensure!(matches!(c.info().await?, Response::Info { .. }), "info on the same connection failed");
    Ok(())
}

async fn tls_server_name(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = ctx.server().await?;
    // The suite's client sends the server name as SNI.
    let c = s.connect().await?;
    ensure!(matches!(c.info().await?, Response::Info { .. }), "info over a connection with SNI {} failed", s.name);
    let certs = c
        .connection()
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<quinn::rustls::pki_types::CertificateDer<'static>>>().ok())
        .ok_or_else(|| anyhow!("the server presented no certificate chain"))?;
    let leaf = certs.first().ok_or_else(|| anyhow!("the server presented an empty chain"))?;
    // subjectAltName dNSName: context tag [2], the length, the name.
    let name = s.name.as_str().as_bytes();
    let mut want = vec![0x82, name.len() as u8];
    want.extend_from_slice(name);
    ensure!(leaf.windows(want.len()).any(|w| w == want), "the certificate does not carry {} as a DNS name", s.name);
    Ok(())
}

async fn login_invalid(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, _a) = s.new_user("alice").await?;
    let password = crate::implementation::password_of(alice.localpart());
    let mut c = s.connect().await?;
    let long_name = Some("n".repeat(limits::MAX_DEVICE_NAME_LEN + 1));
    expect_code(c.login(&alice, &password, long_name.clone()).await, ErrorCode::InvalidRequest, "a login with a 129-byte device name")?;
    let nobody = s.user_id("nobody");
    expect_code(c.login(&nobody, &password, long_name).await, ErrorCode::InvalidRequest, "a login of an unknown user with a 129-byte device name")?;
    let long_password = "p".repeat(limits::MAX_PASSWORD_LEN + 1);
    expect_code(c.login(&alice, &long_password, None).await, ErrorCode::InvalidRequest, "a login with a 1025-byte password")?;
    let name = "n".repeat(limits::MAX_DEVICE_NAME_LEN);
    c.login(&alice, &password, Some(name.clone())).await.context("a login with a device name of exactly 128 bytes")?;
    let listed = c.devices().await.ok().and_then(|d| d.into_iter().find(|d| d.current)).and_then(|d| d.name);
    if let Some(listed) = listed {
        ensure!(listed == name, "the device is listed with name {listed:?}");
    }
    Ok(())
}

async fn read_apart_from_delivered(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    let m1 = a.send_text(&bob, "one").await?;
    let m2 = a.send_text(&bob, "two").await?;
    let (w1, w2) = (Watermark(m1.order_key()), Watermark(m2.order_key()));
    b.receipt(&alice, ReceiptKind::Read, w2.clone()).await?;
    let page = a.history(&bob, None, None, None).await?;
    ensure!(page.read == Some(w2.clone()), "read is {:?}, expected up to the second message", page.read);
    ensure!(page.delivered.is_none(), "a read receipt moved delivered to {:?}: the watermarks are kept apart", page.delivered);
    b.receipt(&alice, ReceiptKind::Delivered, w1.clone()).await?;
    let page = a.history(&bob, None, None, None).await?;
    ensure!(page.delivered == Some(w1.clone()), "delivered is {:?} after a delivered receipt up to the first message", page.delivered);
    ensure!(page.read == Some(w2.clone()), "read moved to {:?} after a delivered receipt", page.read);
    let receipts: Vec<_> = sync_all(&a)
        .await?
        .into_iter()
        .filter_map(|e| match e.event {
            EventKind::Receipt(r) => Some((r.kind, r.up_to)),
            _ => None,
        })
        .collect();
    ensure!(receipts == vec![(ReceiptKind::Read, w2), (ReceiptKind::Delivered, w1)], "alice's stream has receipts {receipts:?}");
    Ok(())
}

/// Reads one length-prefixed frame body from a stream.
async fn read_one(recv: &mut quinn::RecvStream) -> anyhow::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    ensure!(len <= limits::MAX_RESPONSE_FRAME, "a {len}-byte frame");
    let mut body = vec![0; len];
    recv.read_exact(&mut body).await?;
    Ok(body)
}

async fn subscribe_stop(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    // Both have written, so they share the conversation (§12).
    a.send_text(&bob, "hello").await?;
    b.send_text(&alice, "hello to you").await?;
    let frame = RequestFrame { v: PROTOCOL_VERSION, req: Request::Subscribe { since: 0 }, auth: b.token().map(str::to_owned) };
    let (mut send, mut recv) = b.connection().open_bi().await?;
    send.write_all(&codec::frame(&codec::encode(&frame))).await?;
    // Finishing the request side is part of every request; it does not end the subscription.
    send.finish()?;
    let first: ResponseFrame = codec::decode(&read_one(&mut recv).await?)?;
    ensure!(matches!(first.res, Response::Events { .. }), "subscribe was answered {:?}", first.res);
    eventually("bob online while subscribed", || async { a.presence(&bob).await.ok().filter(|p| p.online) }).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(a.presence(&bob).await?.online, "bob went offline although his subscription was only finished, not stopped");
    recv.stop(0u32.into())?;
    eventually("bob offline once his only subscription was stopped", || async { a.presence(&bob).await.ok().filter(|p| !p.online) })
        .await?;
    ensure!(b.sync(0, None).await.is_ok(), "the connection stopped serving after a subscription was stopped");
    Ok(())
}

async fn shared_by_both(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (carol, c) = s.new_user("carol").await?;
    let (bob, b) = s.new_user("bob").await?;
    // Carol writes to bob, who has never written to her.
    for i in 0..3 {
        c.send_text(&bob, &format!("unsolicited {i}")).await?;
    }
    expect_code(c.presence(&bob).await, ErrorCode::UnknownUser, "carol asking about bob, who never wrote to her")?;
    expect_code(b.presence(&carol).await, ErrorCode::UnknownUser, "bob asking about carol before he wrote to her")?;
    expect_code(c.typing(&bob).await, ErrorCode::UnknownUser, "carol typing to bob, who never wrote to her")?;
    expect_code(b.typing(&carol).await, ErrorCode::UnknownUser, "bob typing to carol before he wrote to her")?;
    ensure!(c.presence(&carol).await.is_ok(), "carol cannot ask about herself");
    // A receipt does not share the conversation either; a reply does.
    let last = history_all(&b, &carol).await?.pop().ok_or_else(|| anyhow!("bob has no message from carol"))?;
    b.receipt(&carol, ReceiptKind::Read, Watermark(last.order_key())).await?;
    expect_code(c.presence(&bob).await, ErrorCode::UnknownUser, "carol asking about bob after he only sent a receipt")?;
    b.send_text(&carol, "who is this?").await?;
    c.presence(&bob).await.context("carol asking about bob after he replied")?;
    b.presence(&carol).await.context("bob asking about carol after he replied")?;
    c.typing(&bob).await.context("carol typing to bob after he replied")?;
    Ok(())
}
