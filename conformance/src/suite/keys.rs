//! The key directory (e2ee.md E3, E5), as a black box: uploads and their rules, queries,
//! claims (each one-time key once, under concurrent claims; then the fallback key),
//! keys leaving with their device, `devices` events, encrypted payloads carried as they
//! were sent, and the same across federation through the mock peer, from both sides.
//! Keys are made here with ed25519 and random curve25519 bytes: a server only checks
//! signatures and sizes, never the Olm that clients build on them.

use std::collections::HashSet;

use anyhow::{bail, ensure, Context};
use ed25519_dalek::{Signer, SigningKey};
use missive_spec::e2ee::{ClaimedKey, DeviceKeys, DeviceListChange, OneTimeKey};
use missive_spec::federation::{FedErrorCode, FedRequest, FedResponse, Unit, UnitResult};
use missive_spec::{Content, DeviceId, ErrorCode, EventKind, UserId};

use super::client::expect_code;
use super::{eventually, history_all, messages, mock_info, sync_all, test, Ctx, Test};
use crate::mock_peer::{MockDevice, MockPeer};
use crate::wire::Client;

pub fn tests() -> Vec<Test> {
    vec![
        test!(
            "c2s.keys.upload",
            Required,
            ["C2S-E2EE-1", "C2S-E2EE-2", "C2S-E2EE-3", "C2S-E2EE-4", "C2S-E2EE-5", "C2S-E2EE-6"],
            [],
            upload
        ),
        test!("c2s.keys.claim", Required, ["C2S-E2EE-7", "C2S-E2EE-8", "C2S-E2EE-9", "C2S-E2EE-10"], [], claim),
        test!("c2s.keys.devices", Required, ["C2S-E2EE-11", "C2S-E2EE-14"], [Devices], device_changes),
        test!("c2s.keys.opaque", Required, ["C2S-E2EE-13"], [], opaque),
        test!("fed.keys", Required, ["FED-KEYS-1", "FED-KEYS-2", "FED-KEYS-3", "FED-KEYS-5", "C2S-E2EE-12"], [Federation], federated),
    ]
}

/// A device's keys as a client would make them (E2).
struct Dev {
    user: UserId,
    device: DeviceId,
    signing: SigningKey,
    curve: [u8; 32],
}

impl Dev {
    fn new(user: &UserId, device: &DeviceId) -> Dev {
        Dev { user: user.clone(), device: device.clone(), signing: SigningKey::generate(&mut rand::rngs::OsRng), curve: rand::random() }
    }

    async fn of(c: &Client, user: &UserId) -> anyhow::Result<Dev> {
        Ok(Dev::new(user, &c.device_id().await?))
    }

    fn keys(&self) -> DeviceKeys {
        let mut k = DeviceKeys {
            sig: Vec::new(),
            user: self.user.clone(),
            device: self.device.clone(),
            ed25519: self.signing.verifying_key().to_bytes().to_vec(),
            curve25519: self.curve.to_vec(),
        };
        k.sig = self.signing.sign(&k.signed_bytes()).to_bytes().to_vec();
        k
    }

    fn key(&self, id: u64, fallback: bool) -> OneTimeKey {
        let mut k = OneTimeKey { id, key: rand::random::<[u8; 32]>().to_vec(), sig: Vec::new() };
        k.sig = self.signing.sign(&k.signed_bytes(&self.user, &self.device, fallback)).to_bytes().to_vec();
        k
    }

    fn keys_range(&self, ids: std::ops::RangeInclusive<u64>) -> Vec<OneTimeKey> {
        ids.map(|i| self.key(i, false)).collect()
    }
}

async fn upload(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (_bob, b) = s.new_user("bob").await?;
    let d = Dev::of(&a, &alice).await?;
    expect_code(a.keys_upload(None, None, d.keys_range(1..=1)).await, ErrorCode::InvalidRequest, "one-time keys before device keys")?;
    let mut forged = d.keys();
    forged.sig[0] ^= 1;
    expect_code(a.keys_upload(Some(forged), None, Vec::new()).await, ErrorCode::InvalidRequest, "device keys with a bad signature")?;
    let other = Dev::new(&alice, &DeviceId::parse("NOTMINE").expect("valid"));
    expect_code(a.keys_upload(Some(other.keys()), None, Vec::new()).await, ErrorCode::InvalidRequest, "keys naming another device")?;
    ensure!(b.keys_query(&alice).await?.is_empty(), "refused uploads left keys in the directory");

    let (one_time, fallback) = (d.keys_range(1..=5), d.key(6, true));
    let first = a.keys_upload(Some(d.keys()), Some(fallback.clone()), one_time.clone()).await.context("a good upload")?;
    ensure!(first == (5, true), "key_count after 5 one-time keys and a fallback key is {first:?}");
    let again = a.keys_upload(Some(d.keys()), Some(fallback), one_time).await.context("the same upload again")?;
    ensure!(again == (5, true), "a repeated upload changed the count to {again:?}");
    let changed = Dev::new(&alice, &d.device);
    expect_code(a.keys_upload(Some(changed.keys()), None, Vec::new()).await, ErrorCode::InvalidRequest, "other keys for the same device")?;
    expect_code(a.keys_upload(None, None, vec![d.key(7, false), d.key(7, false)]).await, ErrorCode::InvalidRequest, "one id twice")?;
    expect_code(a.keys_upload(None, None, vec![d.key(8, true)]).await, ErrorCode::InvalidRequest, "a one-time key signed as a fallback key")?;
    expect_code(a.keys_upload(None, None, d.keys_range(10..=105)).await, ErrorCode::InvalidRequest, "101 one-time keys held")?;
    let full = a.keys_upload(None, None, d.keys_range(10..=104)).await.context("up to 100 held")?;
    ensure!(full == (100, true), "key_count with 100 held is {full:?}");

    let listed = b.keys_query(&alice).await?;
    ensure!(listed == [d.keys()], "keys_query lists {listed:?}, not the device's keys as uploaded");
    expect_code(b.keys_query(&s.user_id("nobody")).await, ErrorCode::UnknownUser, "keys of a user who does not exist")?;
    Ok(())
}

async fn claim(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let d = Dev::of(&a, &alice).await?;
    let one_time = d.keys_range(1..=20);
    let fallback = d.key(21, true);
    a.keys_upload(Some(d.keys()), Some(fallback.clone()), one_time.clone()).await?;
    // Forty claims at once from two users: twenty one-time keys, each once, then the
    // fallback key.
    let mut claimers = Vec::new();
    for name in ["bob", "carol"] {
        claimers.push(s.new_user(name).await?.1);
    }
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (c, alice, device) = (claimers[i % 2].clone(), alice.clone(), d.device.clone());
        tasks.push(tokio::spawn(async move { c.keys_claim(&alice, vec![device]).await }));
    }
    let mut got: Vec<ClaimedKey> = Vec::new();
    for t in tasks {
        let keys = t.await.context("a claim task")?.context("a claim")?;
        ensure!(keys.len() == 1, "a claim of one device answered {} keys", keys.len());
        got.extend(keys);
    }
    let handed: Vec<&OneTimeKey> = got.iter().filter(|k| !k.fallback).map(|k| &k.key).collect();
    let distinct: HashSet<&Vec<u8>> = handed.iter().map(|k| &k.key).collect();
    ensure!(distinct.len() == handed.len(), "a one-time key was handed out twice");
    ensure!(handed.len() == 20, "{} one-time keys handed out of 20", handed.len());
    ensure!(handed.iter().all(|k| one_time.contains(k)), "a claim handed out a key that was not uploaded as is");
    ensure!(got.iter().filter(|k| k.fallback).all(|k| k.key == fallback), "fallback answers carry another key than the fallback key");
    ensure!(got.iter().all(|k| k.device == d.device), "a claim named another device");
    // Named twice: one key; a device without keys: left out; too many devices: refused.
    let twice = claimers[0].keys_claim(&alice, vec![d.device.clone(), d.device.clone(), DeviceId::parse("NOKEYS").expect("valid")]).await?;
    ensure!(twice.len() == 1 && twice[0].fallback, "a claim naming the device twice and one without keys answered {twice:?}");
    let many: Vec<DeviceId> = (0..65).map(|i| DeviceId::parse(&format!("D{i}")).expect("valid")).collect();
    expect_code(claimers[0].keys_claim(&alice, many).await, ErrorCode::InvalidRequest, "a claim naming 65 devices")?;
    // The per-user bound: 120 a minute.
    let (_dave, dave) = s.new_user("dave").await?;
    for i in 0..120 {
        dave.keys_claim(&alice, vec![d.device.clone()]).await.with_context(|| format!("claim {i} of 120 in a minute"))?;
    }
    expect_code(dave.keys_claim(&alice, vec![d.device.clone()]).await, ErrorCode::RateLimited, "the 121st claim in a minute")?;
    Ok(())
}

/// The `devices` events of `events` about `user`.
fn device_events(events: &[missive_spec::Event], user: &UserId) -> Vec<DeviceListChange> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            EventKind::Devices(c) if c.user == *user => Some(c.clone()),
            _ => None,
        })
        .collect()
}

async fn device_changes(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b1) = s.new_user("bob").await?;
    a.send_text(&bob, "hi bob").await?;
    b1.send_text(&alice, "hi alice").await?;
    let seen = sync_all(&a).await?.len();
    let d1 = Dev::of(&b1, &bob).await?;
    b1.keys_upload(Some(d1.keys()), None, d1.keys_range(1..=3)).await?;
    let first = eventually("alice hears of bob's keys", || async {
        let ev = sync_all(&a).await.ok()?;
        let changes = device_events(&ev[seen.min(ev.len())..], &bob);
        (!changes.is_empty()).then_some(changes)
    })
    .await?;
    ensure!(device_events(&sync_all(&b1).await?, &bob).len() == 1, "bob's own stream does not carry his device change once");

    let b2 = s.login(&bob).await?;
    let d2 = Dev::of(&b2, &bob).await?;
    b2.keys_upload(Some(d2.keys()), Some(d2.key(9, true)), d2.keys_range(1..=2)).await?;
    ensure!(a.keys_query(&bob).await?.len() == 2, "bob's two devices with keys are not both listed");
    b1.revoke_device(d2.device.clone()).await?;
    let listed = a.keys_query(&bob).await?;
    ensure!(listed == [d1.keys()], "after the revocation keys_query lists {listed:?}");
    let claimed = a.keys_claim(&bob, vec![d2.device.clone()]).await?;
    ensure!(claimed.is_empty(), "a revoked device's keys are still handed out: {claimed:?}");
    let all = device_events(&sync_all(&a).await?, &bob);
    ensure!(all.len() == 3, "alice has {} devices events about bob, expected 3 (keys, second device, revocation)", all.len());
    ensure!(all.windows(2).all(|w| w[0].version < w[1].version) && all[0] == first[0], "versions do not rise: {all:?}");
    Ok(())
}

async fn opaque(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut s = ctx.server().await?;
    let (alice, a) = s.new_user("alice").await?;
    let (bob, b) = s.new_user("bob").await?;
    let body: Vec<u8> = (0..4000).map(|_| rand::random::<u8>()).collect();
    let content = Content { body, kind: missive_spec::e2ee::CONTENT_ENCRYPTED.to_owned() };
    a.send(&bob, content.clone(), crate::wire::new_client_msg_id()).await.context("an encrypted message")?;
    let got = messages(&sync_all(&b).await?);
    ensure!(got.len() == 1 && got[0].content == content, "the event carries other content than was sent");
    ensure!(history_all(&b, &alice).await?[0].content == content, "history carries other content than was sent");
    Ok(())
}

async fn federated(mut ctx: Ctx) -> anyhow::Result<()> {
    let mock = ctx.mock("mock.conformance.test")?;
    let mut sut = ctx.server_with_peers(&[mock_info(&mock)]).await?;
    let (bob, b) = sut.new_user("bob").await?;
    let carol = UserId::new("carol", &mock.name)?;
    let dc = Dev::new(&carol, &DeviceId::parse("CAROL1")?);
    let fallback = dc.key(9, true);
    mock.directory.lock().unwrap_or_else(|e| e.into_inner()).insert(
        carol.clone(),
        vec![MockDevice { keys: dc.keys(), one_time: dc.keys_range(1..=2), fallback: Some(fallback.clone()) }],
    );
    // A server asks the user's server, and passes on what it answers.
    let listed = b.keys_query(&carol).await.context("keys of a user of the mock")?;
    ensure!(listed == [dc.keys()], "keys_query of the mock's user answered {listed:?}");
    let mut handed = Vec::new();
    for _ in 0..3 {
        handed.extend(b.keys_claim(&carol, vec![dc.device.clone()]).await.context("a claim of the mock's user")?);
    }
    ensure!(
        handed.iter().map(|k| (k.key.id, k.fallback)).collect::<Vec<_>>() == [(1, false), (2, false), (9, true)],
        "claims through the server answered {handed:?}"
    );
    // An answer naming someone else is not passed on.
    let stray = Dev::new(&UserId::new("mallory", &mock.name)?, &DeviceId::parse("M1")?).keys();
    mock.directory.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&carol).expect("set above").push(MockDevice {
        keys: stray,
        one_time: Vec::new(),
        fallback: None,
    });
    expect_code(b.keys_query(&carol).await, ErrorCode::RemoteUnavailable, "an answer listing another user's device")?;

    // The other way: the mock asks the server under test.
    let db = Dev::of(&b, &bob).await?;
    b.keys_upload(Some(db.keys()), Some(db.key(5, true)), db.keys_range(1..=1)).await?;
    let conn = mock.connect(sut.name.as_str(), sut.federation, &sut.key.to_text()).await?;
    match MockPeer::request(&conn, FedRequest::KeysQuery { user: bob.clone() }).await? {
        FedResponse::DeviceKeys { user, devices } => ensure!(user == bob && devices == [db.keys()], "keys_query over federation answered {devices:?}"),
        r => bail!("keys_query over federation answered {r:?}"),
    }
    match MockPeer::request(&conn, FedRequest::KeysClaim { user: bob.clone(), devices: vec![db.device.clone()] }).await? {
        FedResponse::Claimed { keys } => ensure!(keys.len() == 1 && keys[0].key.id == 1 && !keys[0].fallback, "keys_claim over federation answered {keys:?}"),
        r => bail!("keys_claim over federation answered {r:?}"),
    }
    let r = MockPeer::request(&conn, FedRequest::KeysQuery { user: carol.clone() }).await?;
    ensure!(matches!(&r, FedResponse::Error { code: FedErrorCode::Forbidden, .. }), "keys_query about a user of the asker answered {r:?}");
    let many: Vec<DeviceId> = (0..65).map(|i| DeviceId::parse(&format!("D{i}")).expect("valid")).collect();
    let r = MockPeer::request(&conn, FedRequest::KeysClaim { user: bob.clone(), devices: many }).await?;
    ensure!(matches!(&r, FedResponse::Error { code: FedErrorCode::TooMany, .. }), "a claim of 65 devices answered {r:?}");

    // Device-list changes of the mock's user reach bob once they share a conversation.
    let m = mock.message(&carol, &bob, 1, &[(&mock.name, 1)], "hello bob");
    let results = MockPeer::send_txn(&conn, vec![mock.sign(&m)]).await?;
    ensure!(results == [UnitResult::Accepted], "carol's message was answered {results:?}");
    b.send_text(&carol, "hello carol").await?;
    let change = |user: &UserId, version| mock.key_sign(&Unit::Devices(DeviceListChange { user: user.clone(), version }));
    let first = MockPeer::send_txn(&conn, vec![change(&carol, 1)]).await?;
    ensure!(first == [UnitResult::Accepted], "a devices unit of the mock's user was answered {first:?}");
    let again = MockPeer::send_txn(&conn, vec![change(&carol, 1), change(&bob, 7)]).await?;
    ensure!(again == [UnitResult::Duplicate, UnitResult::WrongOrigin], "a repeated devices unit and one about a user of the receiver were answered {again:?}");
    let got = device_events(&sync_all(&b).await?, &carol);
    ensure!(got == [DeviceListChange { user: carol.clone(), version: 1 }], "bob's devices events about carol: {got:?}");
    Ok(())
}
