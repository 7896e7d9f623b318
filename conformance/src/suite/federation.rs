//! Federation tests against a mock peer (federation.md), from both sides: units the mock
//! sends in (inbound checks, admission, gaps) and units the server under test sends out
//! (signatures, transactions, retries through a misbehaving receiver, backfill answers).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use missive_federation::{envelope, ServerKey};
use missive_spec::federation::{txn_id, FedErrorCode, FedRequest, FedResponse, SignedUnit, Unit, UnitResult};
use missive_spec::{codec, Content, ConversationId, EventKind, ReceiptKind, UserId, Watermark};

use super::{eventually, history_all, messages, mock_info, sync_all, test, text, Ctx, Test};
use crate::implementation::Sut;
use crate::mock_peer::{Fate, Misbehaviour, MockPeer};
use crate::wire::Client;

const MOCK: &str = "mock.conformance.test";

pub fn tests() -> Vec<Test> {
    vec![
        test!("fed.recv.accept", Required, ["FED-RECV-11", "FED-RECV-14", "FED-TLS-2", "FED-FRAME-1"], [Federation], recv_accept),
        test!("fed.recv.duplicate", Required, ["FED-RECV-9", "CORE-MSG-1", "FED-TXN-1"], [Federation], recv_duplicate),
        test!("fed.recv.signature", Required, ["FED-RECV-2", "FED-RECV-3", "FED-SIGN-2"], [Federation], recv_signature),
        test!("fed.recv.bad_unit", Required, ["FED-RECV-4"], [Federation], recv_bad_unit),
        test!("fed.recv.impersonation", Required, ["FED-RECV-5"], [Federation], recv_impersonation),
        test!("fed.recv.recipient", Required, ["FED-RECV-6", "FED-RECV-7"], [Federation], recv_recipient),
        test!("fed.recv.invalid_unit", Required, ["FED-RECV-8"], [Federation], recv_invalid_unit),
        test!("fed.recv.equivocation", Required, ["FED-RECV-10", "CORE-MSG-1"], [Federation], recv_equivocation),
        test!("fed.recv.txn_checks", Required, ["FED-RECV-1", "FED-TXN-2"], [Federation], recv_txn_checks),
        test!("fed.recv.gap_fill", Required, ["FED-RECV-12", "FED-BACKFILL-4", "CORE-ORDER-1"], [Federation], recv_gap),
        test!("fed.recv.restart", Required, ["FED-RECV-13"], [Federation], recv_restart),
        test!("fed.recv.held_flood", Required, ["FED-RECV-12", "FED-RECV-16"], [Federation], recv_held_flood),
        test!("fed.recv.receipt", Required, ["FED-RCPT-1", "FED-RCPT-2"], [Federation, Receipts], recv_receipt),
        test!("fed.recv.edu", Required, ["FED-EDU-1", "FED-EDU-3"], [Federation, Presence, Typing], recv_edu),
        test!("fed.tls.unpinned_peer", Required, ["FED-TLS-2", "FED-DISC-3"], [Federation], tls_unpinned_peer),
        test!("fed.tls.wrong_server_key", Required, ["FED-TLS-1"], [Federation], tls_wrong_server_key),
        test!("fed.send.signed", Required, ["FED-SIGN-1", "FED-TXN-1", "FED-SEND-4", "CORE-CBOR-1"], [Federation], send_signed),
        test!("fed.restore.answers", Required, ["FED-RESTORE-1", "FED-RESTORE-2", "FED-ROT-2"], [Federation], restore_answers),
        test!("fed.send.backfill_answer", Required, ["FED-BACKFILL-1", "FED-BACKFILL-2", "FED-BACKFILL-3", "FED-SIGN-2"], [Federation], send_backfill_answer),
        test!("fed.send.dropped_transactions", Required, ["FED-SEND-2", "FED-SEND-3"], [Federation], send_dropped),
        test!("fed.send.partial_ack", Required, ["FED-SEND-2", "FED-SEND-4"], [Federation], send_partial),
        test!("fed.send.slow_peer", Required, ["FED-SEND-2", "FED-SEND-4"], [Federation], send_slow),
        test!("fed.send.disconnect_mid_txn", Required, ["FED-SEND-2", "FED-SEND-3"], [Federation], send_disconnect),
        test!("fed.send.resume_after_restart", Required, ["FED-SEND-1", "FED-SEND-6"], [Federation], send_resume),
        test!("fed.send.batching", Recommended, ["FED-TXN-2"], [Federation], send_batching),
        test!("fed.send.backoff", Recommended, ["FED-SEND-5"], [Federation], send_backoff),
        test!("fed.send.presence_coalesced", Recommended, ["FED-EDU-2"], [Federation, Presence], send_presence_coalesced),
        test!("fed.send.undeliverable", Required, ["FED-SEND-8", "C2S-RCPT-8", "C2S-HIST-5", "FED-SEND-2"], [Federation], send_undeliverable),
        test!("fed.send.receipt", Required, ["C2S-RCPT-6", "FED-RCPT-1"], [Federation, Receipts], send_receipt),
    ]
}

/// A server under test that pins a fresh mock, with one local user.
struct Setup {
    sut: Sut,
    mock: MockPeer,
    local: UserId,
    client: Client,
}

async fn setup(ctx: &mut Ctx) -> anyhow::Result<Setup> {
    let mock = ctx.mock(MOCK)?;
    let mut sut = ctx.server_with_peers(&[mock_info(&mock)]).await?;
    let (local, client) = sut.new_user("bob").await?;
    Ok(Setup { sut, mock, local, client })
}

fn mock_user(mock: &MockPeer, local: &str) -> UserId {
    UserId::new(local, &mock.name).expect("valid")
}

async fn conn(s: &Setup) -> anyhow::Result<quinn::Connection> {
    s.mock.connect(s.sut.name.as_str(), s.sut.federation, &s.sut.key.to_text()).await.context("the mock cannot connect to the server under test")
}

/// Messages `first..=last` from `from` (of the mock) to `to`, in a conversation where the
/// server under test has sent nothing.
fn msgs(mock: &MockPeer, from: &UserId, to: &UserId, first: u64, last: u64) -> Vec<missive_spec::Message> {
    (first..=last).map(|s| mock.message(from, to, s, &[(&mock.name, s)], &format!("f{s}"))).collect()
}

/// Sends one transaction and checks the per-unit results.
async fn expect_results(c: &quinn::Connection, units: Vec<SignedUnit>, want: &[UnitResult], what: &str) -> anyhow::Result<()> {
    let got = MockPeer::send_txn(c, units).await.with_context(|| what.to_owned())?;
    ensure!(got == want, "{what}: results {got:?}, expected {want:?}");
    Ok(())
}

async fn recv_accept(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let ms = msgs(&s.mock, &alice, &s.local, 1, 3);
    let units: Vec<_> = ms.iter().map(|m| s.mock.sign(m)).collect();
    expect_results(&c, units, &[UnitResult::Accepted; 3], "three honest units").await?;
    let got = messages(&sync_all(&s.client).await?);
    ensure!(got == ms, "bob's stream has {:?}, expected f1..f3 exactly as sent", got.iter().map(text).collect::<Vec<_>>());
    ensure!(history_all(&s.client, &alice).await? == ms, "history differs from the accepted units");
    Ok(())
}

/// What a restored peer asks (F12): `high_water` reports what is stored of the asker's
/// units and of the server's own per conversation, `reclaim` sends the asker's own units
/// back as stored; and `keys` (F2.7) names the key the link presented.
async fn restore_answers(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let units: Vec<_> = msgs(&s.mock, &alice, &s.local, 1, 3).iter().map(|m| s.mock.sign(m)).collect();
    expect_results(&c, units.clone(), &[UnitResult::Accepted; 3], "three honest units").await?;
    s.client.send_text(&alice, "a reply").await?;
    let conv = ConversationId::one_to_one(&s.local, &alice);
    let (next, convs) = match MockPeer::request(&c, FedRequest::HighWater { after: None }).await? {
        FedResponse::HighWater { next, convs } => (next, convs),
        r => bail!("high_water answered {r:?}"),
    };
    ensure!(next.is_none(), "one conversation, yet high_water says more remain");
    let mark = convs.iter().find(|m| m.conv == conv).ok_or_else(|| anyhow!("high_water lists no entry for the conversation: {convs:?}"))?;
    ensure!((mark.yours, mark.mine) == (3, 1), "high_water says yours {} mine {}, expected 3 and 1", mark.yours, mark.mine);
    let after = MockPeer::request(&c, FedRequest::HighWater { after: Some(conv) }).await?;
    ensure!(matches!(&after, FedResponse::HighWater { convs, .. } if convs.iter().all(|m| m.conv > conv)), "high_water after the last conversation answered {after:?}");
    match MockPeer::request(&c, FedRequest::Reclaim { conv, last: 9, first: 2 }).await? {
        FedResponse::Units { units: back } => ensure!(back == units[1..], "reclaim 2..9 answered other units than the asker's 2 and 3 as sent"),
        r => bail!("reclaim answered {r:?}"),
    }
    let r = MockPeer::request(&c, FedRequest::Reclaim { conv, last: 101, first: 1 }).await?;
    ensure!(matches!(&r, FedResponse::Error { code, .. } if *code == FedErrorCode::TooMany), "a reclaim of 101 was answered {r:?}");
    let (carol, _) = s.sut.new_user("carol").await?;
    let foreign = ConversationId::one_to_one(&s.local, &carol);
    let r = MockPeer::request(&c, FedRequest::Reclaim { conv: foreign, last: 1, first: 1 }).await?;
    ensure!(matches!(&r, FedResponse::Error { code, .. } if *code == FedErrorCode::Forbidden), "a reclaim of a conversation the asker has no member in was answered {r:?}");
    match MockPeer::request(&c, FedRequest::Keys {}).await? {
        FedResponse::Keys { current, .. } => ensure!(current == s.sut.key.to_text(), "keys names {current}, not the server's key"),
        r => bail!("keys answered {r:?}"),
    }
    Ok(())
}

async fn recv_duplicate(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let units: Vec<_> = msgs(&s.mock, &alice, &s.local, 1, 2).iter().map(|m| s.mock.sign(m)).collect();
    expect_results(&c, units.clone(), &[UnitResult::Accepted; 2], "two honest units").await?;
    // The same transaction again (a retry), then one unit alone.
    expect_results(&c, units.clone(), &[UnitResult::Duplicate; 2], "the same transaction again").await?;
    expect_results(&c, vec![units[1].clone()], &[UnitResult::Duplicate], "the newest unit alone again").await?;
    let got = messages(&sync_all(&s.client).await?);
    ensure!(got.len() == 2, "bob's stream holds {} messages after a retried transaction of 2", got.len());
    ensure!(history_all(&s.client, &alice).await?.len() == 2, "history holds a replayed unit twice");
    Ok(())
}

async fn recv_signature(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let m = &msgs(&s.mock, &alice, &s.local, 1, 1)[0];
    // Signed by a key the mock never published.
    let stranger = ServerKey::generate();
    let unknown = envelope::sign(&stranger, &Unit::Message(m.clone()));
    expect_results(&c, vec![unknown], &[UnitResult::UnknownKey], "a unit signed with an unpublished key").await?;
    // Claims the mock's key, signed by another.
    let mut forged = envelope::sign(&stranger, &Unit::Message(m.clone()));
    forged.key = s.mock.public().key_id();
    expect_results(&c, vec![forged], &[UnitResult::BadSignature], "a unit with a forged signature").await?;
    // The mock's own signature over other bytes.
    let honest = s.mock.sign(m);
    let mut other = m.clone();
    other.content = Content::text("tampered");
    let mut tampered = honest.clone();
    tampered.unit = codec::encode(&Unit::Message(other));
    expect_results(&c, vec![tampered], &[UnitResult::BadSignature], "a unit whose bytes changed after signing").await?;
    ensure!(sync_all(&s.client).await?.is_empty(), "a unit that failed its signature check reached bob");
    // The honest one still goes through.
    expect_results(&c, vec![honest.clone()], &[UnitResult::Accepted], "the honest unit").await?;
    Ok(())
}

async fn recv_bad_unit(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let bytes = codec::encode(&"not a unit");
    let sig = ed25519_sign(&s.mock.key, &bytes);
    let u = SignedUnit { key: s.mock.public().key_id(), sig, unit: bytes };
    expect_results(&c, vec![u], &[UnitResult::BadUnit], "signed bytes that are not a unit").await?;
    Ok(())
}

fn ed25519_sign(key: &ServerKey, unit: &[u8]) -> Vec<u8> {
    use ed25519_dalek::Signer;
    key.signing_key().sign(&SignedUnit::signed_bytes(unit)).to_bytes().to_vec()
}

async fn recv_impersonation(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    // A user of another server, sent (and signed) by the mock.
    let eve = UserId::parse("@eve:elsewhere.conformance.test")?;
    let mut m = s.mock.message(&eve, &s.local, 1, &[(&s.mock.name, 1)], "i am eve");
    expect_results(&c, vec![s.mock.sign(&m)], &[UnitResult::WrongOrigin], "a unit from a user of another server").await?;
    // A mock user, but origin names another server.
    let alice = mock_user(&s.mock, "alice");
    let other = missive_spec::ServerName::parse("elsewhere.conformance.test")?;
    m = s.mock.message(&alice, &s.local, 1, &[(&other, 1)], "wrong origin");
    m.origin = other;
    expect_results(&c, vec![s.mock.sign(&m)], &[UnitResult::WrongOrigin], "a unit whose origin is another server").await?;
    ensure!(sync_all(&s.client).await?.is_empty(), "an impersonating unit reached bob");
    Ok(())
}

async fn recv_recipient(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let ghost = s.sut.user_id("ghost");
    let m = s.mock.message(&alice, &ghost, 1, &[(&s.mock.name, 1)], "to nobody");
    expect_results(&c, vec![s.mock.sign(&m)], &[UnitResult::UnknownRecipient], "a unit for a user that does not exist").await?;
    let elsewhere = UserId::parse("@zed:elsewhere.conformance.test")?;
    let m = s.mock.message(&alice, &elsewhere, 1, &[(&s.mock.name, 1)], "to another server");
    expect_results(&c, vec![s.mock.sign(&m)], &[UnitResult::UnknownRecipient], "a unit for a user of another server").await?;
    let mut m = s.mock.message(&alice, &s.local, 1, &[(&s.mock.name, 1)], "wrong conversation");
    m.conv = ConversationId::one_to_one(&alice, &ghost);
    expect_results(&c, vec![s.mock.sign(&m)], &[UnitResult::ConvMismatch], "a unit whose conversation id is not its users'").await?;
    ensure!(sync_all(&s.client).await?.is_empty(), "a misaddressed unit reached bob");
    Ok(())
}

async fn recv_invalid_unit(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let cases = [
        ("deps[origin] is not seq", s.mock.message(&alice, &s.local, 1, &[(&s.mock.name, 2)], "bad vector")),
        ("deps claims 5 messages the receiver never sent", s.mock.message(&alice, &s.local, 1, &[(&s.mock.name, 1), (&s.sut.name, 5)], "phantom")),
        ("a third server in deps", {
            let third = missive_spec::ServerName::parse("third.conformance.test")?;
            s.mock.message(&alice, &s.local, 1, &[(&s.mock.name, 1), (&third, 1)], "three servers")
        }),
        ("a body over 16 384 bytes", {
            let mut m = s.mock.message(&alice, &s.local, 1, &[(&s.mock.name, 1)], "");
            m.content = Content { body: vec![b'x'; 16_385], kind: "text".into() };
            m
        }),
    ];
    for (what, m) in cases {
        expect_results(&c, vec![s.mock.sign(&m)], &[UnitResult::InvalidUnit], what).await?;
    }
    ensure!(sync_all(&s.client).await?.is_empty(), "an invalid unit reached bob");
    Ok(())
}

async fn recv_equivocation(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let m = s.mock.message(&alice, &s.local, 1, &[(&s.mock.name, 1)], "the original");
    expect_results(&c, vec![s.mock.sign(&m)], &[UnitResult::Accepted], "the original").await?;
    let mut twin = m.clone();
    twin.content = Content::text("a different story");
    expect_results(&c, vec![s.mock.sign(&twin)], &[UnitResult::Equivocation], "same identity, other content").await?;
    let h = history_all(&s.client, &alice).await?;
    ensure!(h == vec![m], "after equivocation bob's history is {:?}", h.iter().map(text).collect::<Vec<_>>());
    Ok(())
}

async fn recv_txn_checks(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let units: Vec<_> = msgs(&s.mock, &alice, &s.local, 1, 101).iter().map(|m| s.mock.sign(m)).collect();
    let id = txn_id(&units).to_vec();
    let r = MockPeer::request(&c, FedRequest::Txn { id, units: units.clone() }).await?;
    ensure!(matches!(&r, FedResponse::Error { code, .. } if *code == FedErrorCode::TooMany), "101 units were answered {r:?}");
    let first = units[..1].to_vec();
    let r = MockPeer::request(&c, FedRequest::Txn { id: vec![7; 32], units: first.clone() }).await?;
    ensure!(matches!(&r, FedResponse::Error { code, .. } if *code == FedErrorCode::BadTxnId), "a wrong transaction id was answered {r:?}");
    ensure!(sync_all(&s.client).await?.is_empty(), "a refused transaction stored units");
    expect_results(&c, units[..100].to_vec(), &[UnitResult::Accepted; 100], "exactly 100 units").await?;
    Ok(())
}

async fn recv_gap(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let ms = msgs(&s.mock, &alice, &s.local, 1, 4);
    let units: Vec<_> = ms.iter().map(|m| s.mock.record(m)).collect();
    expect_results(&c, vec![units[0].clone()], &[UnitResult::Accepted], "unit 1").await?;
    expect_results(&c, vec![units[3].clone()], &[UnitResult::Held], "unit 4 behind a gap").await?;
    let conv = ms[0].conv;
    let asked = eventually("a backfill request for 2..3", || async {
        s.mock.observed.lock().unwrap().backfills.iter().find(|(cv, _, _)| *cv == conv).copied()
    })
    .await?;
    ensure!(asked == (conv, 2, 3), "the server asked for {}..{}, expected 2..3", asked.1, asked.2);
    let got = eventually("all four messages stored", || async {
        let h = history_all(&s.client, &alice).await.ok()?;
        (h.len() == 4).then_some(h)
    })
    .await?;
    ensure!(got == ms, "after the gap filled, history is {:?}", got.iter().map(text).collect::<Vec<_>>());
    let stream = messages(&sync_all(&s.client).await?);
    ensure!(stream == ms, "bob's stream is {:?}, expected f1..f4 in order", stream.iter().map(text).collect::<Vec<_>>());
    Ok(())
}

/// 1 500 units behind a gap: each is held or answered `retry` (nothing refused for good);
/// once the gap fills and the origin sends again what was answered `retry`, all are
/// stored, in order, once.
async fn recv_held_flood(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let n = 1_500;
    let ms = msgs(&s.mock, &alice, &s.local, 1, n);
    // Signed, not recorded: the mock cannot fill the gap by backfill; it sends unit 1 later.
    let units: Vec<_> = ms.iter().map(|m| s.mock.sign(m)).collect();
    let mut retried = Vec::new();
    for chunk in units[1..].chunks(100) {
        let got = MockPeer::send_txn(&c, chunk.to_vec()).await?;
        for (u, r) in chunk.iter().zip(got) {
            match r {
                UnitResult::Held => {}
                UnitResult::Retry => retried.push(u.clone()),
                other => bail!("a unit behind a gap was answered {other:?}"),
            }
        }
    }
    expect_results(&c, vec![units[0].clone()], &[UnitResult::Accepted], "unit 1, filling the gap").await?;
    let held = n as usize - 1 - retried.len();
    eventually("the held units stored", || async { (history_all(&s.client, &alice).await.ok()?.len() > held).then_some(()) }).await?;
    for chunk in retried.chunks(100) {
        let got = MockPeer::send_txn(&c, chunk.to_vec()).await?;
        ensure!(got.iter().all(|r| r.delivered()), "units sent again after the gap filled were answered {got:?}");
    }
    let got = eventually("all units stored", || async {
        let h = history_all(&s.client, &alice).await.ok()?;
        (h.len() == n as usize).then_some(h)
    })
    .await?;
    ensure!(got == ms, "history after the flood is not f1..f{n} in order");
    Ok(())
}

async fn recv_restart(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = setup(&mut ctx).await?;
    let alice = mock_user(&s.mock, "alice");
    let ms = msgs(&s.mock, &alice, &s.local, 1, 5);
    let units: Vec<_> = ms.iter().map(|m| s.mock.sign(m)).collect();
    {
        let c = conn(&s).await?;
        expect_results(&c, units[..2].to_vec(), &[UnitResult::Accepted; 2], "units 1-2").await?;
        expect_results(&c, vec![units[4].clone()], &[UnitResult::Held], "unit 5 behind a gap").await?;
    }
    let token = s.client.token().map(str::to_owned);
    s.sut.restart_after_kill9().await?;
    s.client = s.sut.connect().await?;
    s.client.set_token(token);
    let c = conn(&s).await?;
    expect_results(&c, units[..2].to_vec(), &[UnitResult::Duplicate; 2], "units 1-2 again after kill -9").await?;
    expect_results(&c, vec![units[4].clone()], &[UnitResult::Duplicate], "held unit 5 again after kill -9").await?;
    // Now the mock can fill the gap; the restarted server still holds 5 and asks.
    for m in &ms {
        s.mock.record(m);
    }
    let got = eventually("the gap filled after the restart", || async {
        let h = history_all(&s.client, &alice).await.ok()?;
        (h.len() == 5).then_some(h)
    })
    .await?;
    ensure!(got == ms, "history after restart and gap fill: {:?}", got.iter().map(text).collect::<Vec<_>>());
    Ok(())
}

async fn recv_receipt(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let alice = mock_user(&s.mock, "alice");
    let m1 = s.client.send_text(&alice, "one").await?;
    let m2 = s.client.send_text(&alice, "two").await?;
    eventually("bob's messages at the mock", || async { (s.mock.accepted_messages().len() == 2).then_some(()) }).await?;
    let c = conn(&s).await?;
    let receipt = |kind, up_to: &missive_spec::Message, user: &UserId| {
        Unit::Receipt(missive_spec::Receipt {
            conv: ConversationId::one_to_one(user, &s.local),
            kind,
            peer: s.local.clone(),
            user: user.clone(),
            up_to: Watermark(up_to.order_key()),
        })
    };
    let r2 = s.mock.key_sign(&receipt(ReceiptKind::Read, &m2, &alice));
    expect_results(&c, vec![r2], &[UnitResult::Accepted], "a read receipt up to message 2").await?;
    let r1 = s.mock.key_sign(&receipt(ReceiptKind::Read, &m1, &alice));
    expect_results(&c, vec![r1], &[UnitResult::Duplicate], "an older read receipt").await?;
    let eve = UserId::parse("@eve:elsewhere.conformance.test")?;
    let forged = s.mock.key_sign(&receipt(ReceiptKind::Read, &m2, &eve));
    expect_results(&c, vec![forged], &[UnitResult::WrongOrigin], "a receipt of a user of another server").await?;
    let page = s.client.history(&alice, None, None, None).await?;
    ensure!(page.read == Some(Watermark(m2.order_key())), "bob's page shows read {:?}, expected up to message 2", page.read);
    Ok(())
}

async fn tls_unpinned_peer(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    // Same name as the pinned mock, other key.
    let impostor = MockPeer::start(MOCK, [127, 0, 0, 1].into())?;
    let alice = mock_user(&impostor, "alice");
    let u = impostor.sign(&impostor.message(&alice, &s.local, 1, &[(&impostor.name, 1)], "impostor"));
    let refused = match impostor.connect(s.sut.name.as_str(), s.sut.federation, &s.sut.key.to_text()).await {
        Err(_) => true,
        Ok(c) => MockPeer::send_txn(&c, vec![u]).await.is_err(),
    };
    ensure!(refused, "a peer presenting an unpinned key for {MOCK} got a transaction answered");
    ensure!(sync_all(&s.client).await?.is_empty(), "the impostor's unit reached bob");
    Ok(())
}

async fn tls_wrong_server_key(mut ctx: Ctx) -> anyhow::Result<()> {
    // The server under test pins a key for the mock's name that the mock does not hold.
    let mock = ctx.mock(MOCK)?;
    let mut info = mock_info(&mock);
    info.key = ServerKey::generate().public();
    let mut sut = ctx.server_with_peers(&[info]).await?;
    let (_bob, b) = sut.new_user("bob").await?;
    let alice = mock_user(&mock, "alice");
    b.send_text(&alice, "for the real alice only").await?;
    // Let the server try several times; none may get through.
    let handshakes = mock.handshakes.clone();
    eventually("the server to try the mock twice", || async { (handshakes.load(std::sync::atomic::Ordering::SeqCst) >= 2).then_some(()) }).await?;
    let o = mock.observed.lock().unwrap();
    ensure!(o.attempts.is_empty(), "the server sent a transaction to a peer whose key does not match its pin");
    Ok(())
}

/// A mock, a server pinning it, and a local user who sends the mock's `alice` messages.
async fn send_setup(ctx: &mut Ctx, misbehave: Misbehaviour) -> anyhow::Result<(Setup, UserId)> {
    let s = setup(ctx).await?;
    *s.mock.misbehave.lock().unwrap() = misbehave;
    let alice = mock_user(&s.mock, "alice");
    Ok((s, alice))
}

/// Waits until the mock accepted `n` messages; checks they are the texts, in order, once.
async fn delivered_in_order(mock: &MockPeer, texts: &[String]) -> anyhow::Result<()> {
    eventually(&format!("{} messages at the mock", texts.len()), || async { (mock.accepted_messages().len() >= texts.len()).then_some(()) }).await?;
    let got: Vec<String> = mock.accepted_messages().iter().map(text).collect();
    ensure!(got == texts, "the mock accepted {got:?}, expected {texts:?} in order, once each");
    Ok(())
}

async fn send_texts(c: &Client, to: &UserId, prefix: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for i in 0..n {
        let t = format!("{prefix}{i}");
        c.send_text(to, &t).await?;
        out.push(t);
    }
    Ok(out)
}

async fn send_signed(mut ctx: Ctx) -> anyhow::Result<()> {
    let (s, alice) = send_setup(&mut ctx, Misbehaviour::default()).await?;
    let texts = send_texts(&s.client, &alice, "s", 5).await?;
    delivered_in_order(&s.mock, &texts).await?;
    let o = s.mock.observed.lock().unwrap();
    for (i, u) in o.accepted.iter().enumerate() {
        let unit = envelope::verify(u, &[s.sut.key]).map_err(|e| anyhow!("unit {i} does not verify with the server's key: {e}"))?;
        ensure!(codec::encode(&unit) == u.unit, "unit {i} is not deterministic CBOR");
        let Unit::Message(m) = unit else { bail!("unit {i} is not a message") };
        ensure!(m.seq == i as u64 + 1 && m.origin == s.sut.name && m.from == s.local, "unit {i}: seq {} origin {} from {}", m.seq, m.origin, m.from);
    }
    ensure!(o.attempts.iter().all(|a| a.units <= 100), "a transaction carried over 100 units");
    drop(o);
    // Each transaction's id is the hash of its units (checked on what was answered).
    let o = s.mock.observed.lock().unwrap();
    for (a, units) in o.attempts.iter().filter(|a| a.fate == Fate::Answered).zip(o.txns.iter()) {
        ensure!(a.id == txn_id(units).to_vec(), "a transaction id is not the hash of its units");
    }
    Ok(())
}

async fn send_backfill_answer(mut ctx: Ctx) -> anyhow::Result<()> {
    let (mut s, alice) = send_setup(&mut ctx, Misbehaviour::default()).await?;
    let texts = send_texts(&s.client, &alice, "b", 5).await?;
    delivered_in_order(&s.mock, &texts).await?;
    let sent = s.mock.observed.lock().unwrap().accepted.clone();
    let conv = ConversationId::one_to_one(&s.local, &alice);
    let c = conn(&s).await?;
    let ask = |first, last| MockPeer::request(&c, FedRequest::Backfill { conv, last, first });
    match ask(2, 4).await? {
        FedResponse::Units { units } => ensure!(units == sent[1..4], "backfill 2..4 answered other units than those sent (same bytes required)"),
        r => bail!("backfill 2..4 answered {r:?}"),
    }
    match ask(4, 9).await? {
        FedResponse::Units { units } => ensure!(units == sent[3..5], "backfill 4..9 answered {} units, expected 4 and 5", units.len()),
        r => bail!("backfill 4..9 answered {r:?}"),
    }
    let r = ask(1, 101).await?;
    ensure!(matches!(&r, FedResponse::Error { code, .. } if *code == FedErrorCode::TooMany), "a backfill of 101 was answered {r:?}");
    // A conversation the mock has no member in.
    let (carol, _) = s.sut.new_user("carol").await?;
    let foreign = ConversationId::one_to_one(&s.local, &carol);
    let r = MockPeer::request(&c, FedRequest::Backfill { conv: foreign, last: 1, first: 1 }).await?;
    ensure!(
        matches!(&r, FedResponse::Error { code, .. } if *code == FedErrorCode::Forbidden),
        "a backfill of a conversation the asker has no member in was answered {r:?}"
    );
    Ok(())
}

async fn send_dropped(mut ctx: Ctx) -> anyhow::Result<()> {
    let (s, alice) = send_setup(&mut ctx, Misbehaviour { drop_next: 3, ..Default::default() }).await?;
    let texts = send_texts(&s.client, &alice, "d", 5).await?;
    delivered_in_order(&s.mock, &texts).await?;
    let dropped = s.mock.observed.lock().unwrap().attempts.iter().filter(|a| a.fate == Fate::Dropped).count();
    ensure!(dropped == 3, "the mock dropped {dropped} transactions, expected 3 before delivery");
    Ok(())
}

async fn send_partial(mut ctx: Ctx) -> anyhow::Result<()> {
    let (s, alice) = send_setup(&mut ctx, Misbehaviour::default()).await?;
    // Queue while the mock drops everything, so units travel together; then answer half.
    *s.mock.misbehave.lock().unwrap() = Misbehaviour { drop_next: usize::MAX, ..Default::default() };
    let texts = send_texts(&s.client, &alice, "p", 10).await?;
    eventually("a first attempt", || async { (!s.mock.observed.lock().unwrap().attempts.is_empty()).then_some(()) }).await?;
    *s.mock.misbehave.lock().unwrap() = Misbehaviour { partial_next: 3, ..Default::default() };
    eventually("all 10 at the mock", || async { (s.mock.accepted_messages().len() >= 10).then_some(()) }).await?;
    let mut got: Vec<String> = s.mock.accepted_messages().iter().map(text).collect();
    let o = s.mock.observed.lock().unwrap();
    ensure!(o.resent_after_ack.is_empty(), "{} units were sent again after the mock had accepted them", o.resent_after_ack.len());
    got.sort();
    let mut want = texts.clone();
    want.sort();
    ensure!(got == want, "the mock accepted {got:?}, expected each of the 10 once");
    Ok(())
}

/// A message the peer refuses for good becomes an `undeliverable` event in the sender's
/// stream, once, with the peer's reason; the next message still goes through.
async fn send_undeliverable(mut ctx: Ctx) -> anyhow::Result<()> {
    let (s, alice) = send_setup(&mut ctx, Misbehaviour::default()).await?;
    let nobody = mock_user(&s.mock, crate::mock_peer::NOBODY);
    let sent = s.client.send_text(&nobody, "is anyone there?").await?;
    let failed = eventually("an undeliverable event in the sender's stream", || async {
        let events = sync_all(&s.client).await.ok()?;
        let failed: Vec<_> = events.into_iter().filter_map(|e| if let EventKind::Undeliverable(u) = e.event { Some(u) } else { None }).collect();
        (!failed.is_empty()).then_some(failed)
    })
    .await?;
    ensure!(failed.len() == 1, "{} undeliverable events for one refused message", failed.len());
    let u = &failed[0];
    ensure!(
        (u.conv, &u.origin, u.seq, u.reason.as_str()) == (sent.conv, &sent.origin, sent.seq, "unknown_recipient"),
        "the event names {u:?}, expected message {} #{} refused as unknown_recipient",
        sent.origin,
        sent.seq
    );
    // history says so too, to any device, after the event.
    let page = s.client.history(&nobody, None, None, None).await?;
    let marks: Vec<_> = page.failed.iter().map(|f| (f.conv, &f.origin, f.seq, f.reason.as_str())).collect();
    ensure!(
        marks == [(sent.conv, &sent.origin, sent.seq, "unknown_recipient")],
        "history lists {marks:?} as failed, expected message #{} refused as unknown_recipient",
        sent.seq
    );
    let texts = send_texts(&s.client, &alice, "after", 1).await?;
    delivered_in_order(&s.mock, &texts).await
}

async fn send_slow(mut ctx: Ctx) -> anyhow::Result<()> {
    let (s, alice) = send_setup(&mut ctx, Misbehaviour { reply_delay: Duration::from_secs(2), ..Default::default() }).await?;
    let texts = send_texts(&s.client, &alice, "w", 6).await?;
    delivered_in_order(&s.mock, &texts).await
}

async fn send_disconnect(mut ctx: Ctx) -> anyhow::Result<()> {
    let (s, alice) = send_setup(&mut ctx, Misbehaviour { disconnect_next: 2, ..Default::default() }).await?;
    let texts = send_texts(&s.client, &alice, "x", 5).await?;
    delivered_in_order(&s.mock, &texts).await?;
    let cut = s.mock.observed.lock().unwrap().attempts.iter().filter(|a| a.fate == Fate::Disconnected).count();
    ensure!(cut == 2, "the mock cut {cut} transactions, expected 2");
    Ok(())
}

async fn send_resume(mut ctx: Ctx) -> anyhow::Result<()> {
    let (mut s, alice) = send_setup(&mut ctx, Misbehaviour { drop_next: usize::MAX, ..Default::default() }).await?;
    let texts = send_texts(&s.client, &alice, "q", 8).await?;
    eventually("a first attempt", || async { (!s.mock.observed.lock().unwrap().attempts.is_empty()).then_some(()) }).await?;
    s.sut.restart_after_kill9().await?;
    *s.mock.misbehave.lock().unwrap() = Misbehaviour::default();
    delivered_in_order(&s.mock, &texts).await
}

async fn send_batching(mut ctx: Ctx) -> anyhow::Result<()> {
    let (s, alice) = send_setup(&mut ctx, Misbehaviour { reply_delay: Duration::from_millis(800), ..Default::default() }).await?;
    let texts = send_texts(&s.client, &alice, "n", 30).await?;
    delivered_in_order(&s.mock, &texts).await?;
    let o = s.mock.observed.lock().unwrap();
    let biggest = o.attempts.iter().map(|a| a.units).max().unwrap_or(0);
    ensure!(biggest > 1, "30 units queued behind a slow peer went one per transaction");
    ensure!(o.attempts.len() < 30, "30 units took {} transactions", o.attempts.len());
    Ok(())
}

async fn send_backoff(mut ctx: Ctx) -> anyhow::Result<()> {
    let (s, alice) = send_setup(&mut ctx, Misbehaviour { drop_next: 5, ..Default::default() }).await?;
    let texts = send_texts(&s.client, &alice, "k", 1).await?;
    delivered_in_order(&s.mock, &texts).await?;
    let o = s.mock.observed.lock().unwrap();
    let at: Vec<Instant> = o.attempts.iter().map(|a| a.at).collect();
    ensure!(at.len() >= 6, "only {} attempts", at.len());
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    ensure!(gaps[4] > gaps[0] * 2, "retry gaps {gaps:?} do not grow: expected exponential backoff");
    ensure!(gaps.iter().all(|g| *g < Duration::from_secs(20)), "retry gaps {gaps:?}: a gap over 20 s after 5 failures");
    Ok(())
}

async fn send_receipt(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let ms = msgs(&s.mock, &alice, &s.local, 1, 2);
    let units: Vec<_> = ms.iter().map(|m| s.mock.sign(m)).collect();
    expect_results(&c, units, &[UnitResult::Accepted; 2], "two messages to bob").await?;
    s.client.receipt(&alice, ReceiptKind::Read, Watermark(ms[1].order_key())).await?;
    let r = eventually("bob's read receipt at the mock", || async {
        s.mock.received_receipts().into_iter().find(|r| r.kind == ReceiptKind::Read)
    })
    .await?;
    ensure!(r.user == s.local && r.peer == alice && r.up_to == Watermark(ms[1].order_key()), "the mock got receipt {r:?}");
    Ok(())
}

async fn recv_edu(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let c = conn(&s).await?;
    let alice = mock_user(&s.mock, "alice");
    let m = s.mock.sign(&s.mock.message(&alice, &s.local, 1, &[(&s.mock.name, 1)], "hello"));
    expect_results(&c, vec![m], &[UnitResult::Accepted], "a first message").await?;
    // Both have written: they share the conversation (§12).
    s.client.send_text(&alice, "hi alice").await.context("bob answers alice")?;
    let (mut sub, _, _) = s.client.subscribe(1000).await?;
    let eve = UserId::parse("@eve:elsewhere.conformance.test")?;
    let conv = ConversationId::one_to_one(&alice, &s.local);
    let until = super::client::now_ms() + 5_000;
    let typing = |user: &UserId, conv| missive_spec::TypingUpdate { conv, peer: s.local.clone(), user: user.clone(), until };
    let presence = |user: &UserId, online| missive_spec::PresenceUpdate { user: user.clone(), online, last_seen: None };
    // What must be ignored comes first in each list; what must arrive, last.
    let edu = FedRequest::Edu {
        typing: vec![typing(&eve, ConversationId::one_to_one(&eve, &s.local)), typing(&alice, ConversationId::one_to_one(&alice, &eve)), typing(&alice, conv)],
        presence: vec![presence(&eve, true), presence(&alice, true)],
    };
    let r = MockPeer::request(&c, edu).await?;
    ensure!(matches!(r, FedResponse::Ok {}), "an edu was answered {r:?}");
    let mut seen = Vec::new();
    let want = |seen: &[missive_spec::Ephemeral]| {
        let p = seen.iter().any(|e| matches!(e, missive_spec::Ephemeral::Presence(p) if p.user == alice));
        let t = seen.iter().any(|e| matches!(e, missive_spec::Ephemeral::Typing(t) if t.user == alice && t.conv == conv));
        p && t
    };
    let wait = async {
        while !want(&seen) {
            match sub.next_frame().await? {
                Some(f) => seen.extend(f.ephemeral),
                None => bail!("the subscription ended"),
            }
        }
        Ok(())
    };
    tokio::time::timeout(super::DEADLINE, wait).await.map_err(|_| anyhow!("alice's presence and typing did not reach bob; got {seen:?}"))??;
    let stray: Vec<_> = seen
        .iter()
        .filter(|e| match e {
            missive_spec::Ephemeral::Presence(p) => p.user != alice,
            missive_spec::Ephemeral::Typing(t) => t.user != alice || t.conv != conv,
            _ => false,
        })
        .collect();
    ensure!(stray.is_empty(), "updates the mock may not send were passed on: {stray:?}");
    let flood = FedRequest::Edu { typing: vec![], presence: (0..1001).map(|_| presence(&alice, true)).collect() };
    let r = MockPeer::request(&c, flood).await?;
    ensure!(matches!(&r, FedResponse::Error { code, .. } if *code == FedErrorCode::TooMany), "1001 updates were answered {r:?}");
    Ok(())
}

async fn send_presence_coalesced(mut ctx: Ctx) -> anyhow::Result<()> {
    let s = setup(&mut ctx).await?;
    let alice = mock_user(&s.mock, "alice");
    s.client.send_text(&alice, "hi").await?;
    eventually("the message at the mock", || async { (!s.mock.accepted_messages().is_empty()).then_some(()) }).await?;
    // alice answers, so the two share the conversation (§12) and bob's presence is the mock's business.
    let c = conn(&s).await?;
    let m = s.mock.sign(&s.mock.message(&alice, &s.local, 1, &[(&s.mock.name, 1)], "hello"));
    expect_results(&c, vec![m], &[UnitResult::Accepted], "alice's answer").await?;
    // Ten quick flaps of bob's presence.
    for _ in 0..10 {
        let c = s.sut.login(&s.local).await?;
        let (sub, _, _) = c.subscribe(1000).await?;
        drop(sub);
        c.close().await;
    }
    let about_bob = || -> Vec<missive_spec::PresenceUpdate> {
        s.mock.observed.lock().unwrap().edus.iter().flatten().filter(|p| p.user == s.local).cloned().collect()
    };
    eventually("bob's final offline state at the mock", || async { about_bob().last().filter(|p| !p.online).map(|_| ()) }).await?;
    let n = about_bob().len();
    ensure!(n < 10, "20 presence changes crossed federation as {n} updates: expected them coalesced");
    Ok(())
}
