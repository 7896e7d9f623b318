//! Checks `spec/vectors/*.json` byte for byte. The files are the reference other
//! implementations test against; `regenerate` (ignored) rewrites them from the values
//! below when the spec changes on purpose.

use std::path::PathBuf;

use missive_spec::codec;
use missive_spec::diag::{check_deterministic, diagnostic};
use missive_spec::{
    ClientMsgId, Content, ConversationId, ConversationSummary, Cursor, Deps, DeviceId, DeviceInfo, Ephemeral, ErrorCode, Event, EventKind,
    Message, OrderKey, PresenceUpdate, Receipt, ReceiptKind, RegistrationPolicy, Request, RequestFrame, Response,
    ResponseFrame, ServerName, TypingUpdate, Undeliverable, UserId, Watermark,
};
use missive_spec::e2ee::{fingerprint_digits, safety_number, ClaimedKey, DeviceKeys, DeviceListChange, Inner, OneTimeKey, Sealed, SealedFor};
use serde_json::{json, Value};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

fn load(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join(name)).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["vectors"].as_array().unwrap().clone()
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}
fn server(s: &str) -> ServerName {
    ServerName::parse(s).unwrap()
}

fn sample_message() -> Message {
    let (a, b) = (user("@alice:alpha.example"), user("@bob:beta.example"));
    let mut deps = Deps::new();
    deps.set(server("alpha.example"), 3);
    deps.set(server("beta.example"), 2);
    Message {
        to: b.clone(),
        ts: 1_795_366_800_000,
        seq: 3,
        conv: ConversationId::one_to_one(&a, &b),
        deps,
        from: a,
        origin: server("alpha.example"),
        content: Content::text("hello, bob"),
    }
}

/// Device keys with stand-in key and signature bytes: frames test encodings, not
/// signatures (`e2ee.json` gives the bytes a signature covers).
fn sample_device_keys() -> DeviceKeys {
    DeviceKeys {
        sig: vec![0x33; 64],
        user: user("@alice:alpha.example"),
        device: DeviceId::parse("K7Q2M9XW4BRT").unwrap(),
        ed25519: vec![0x11; 32],
        curve25519: vec![0x22; 32],
    }
}

fn sample_key(id: u64) -> OneTimeKey {
    OneTimeKey { id, key: vec![0x44; 32], sig: vec![0x55; 64] }
}

fn sample_sealed() -> Sealed {
    Sealed {
        to: vec![SealedFor {
            body: vec![0x03, 0x0a, 0x20],
            kind: missive_spec::e2ee::OLM_PRE_KEY,
            user: user("@bob:beta.example"),
            device: DeviceId::parse("B0BDEV1CE").unwrap(),
            session: "c2Vzc2lvbi1pZA".into(),
        }],
        alg: missive_spec::e2ee::ALG_OLM_V1.into(),
        sender: DeviceId::parse("K7Q2M9XW4BRT").unwrap(),
        sender_key: vec![0x22; 32],
    }
}

/// The e2ee.md vectors: what signatures cover, a sealed body and its inner plaintext,
/// and safety numbers.
fn e2ee_vectors() -> Value {
    let keys = sample_device_keys();
    let otk = sample_key(1);
    let m = sample_message();
    let inner = Inner { conv: m.conv, from: m.from.clone(), content: Content::text("hello, bob") };
    let (alice, bob) = (user("@alice:alpha.example"), user("@bob:beta.example"));
    let (d1, d2, d3) = (DeviceId::parse("K7Q2M9XW4BRT").unwrap(), DeviceId::parse("B0BDEV1CE").unwrap(), DeviceId::parse("B0BPHONE").unwrap());
    let (k1, k2, k3) = ([0x11u8; 32], [0x66u8; 32], [0x77u8; 32]);
    let a: Vec<(&DeviceId, &[u8])> = vec![(&d1, &k1)];
    let b: Vec<(&DeviceId, &[u8])> = vec![(&d3, &k3), (&d2, &k2)];
    json!({
        "device_keys": {"section": "E2.1", "cbor_hex": hex::encode(codec::encode(&keys)), "signed_bytes_hex": hex::encode(keys.signed_bytes())},
        "one_time_key": {
            "section": "E2.2",
            "cbor_hex": hex::encode(codec::encode(&otk)),
            "signed_bytes_hex": hex::encode(otk.signed_bytes(&keys.user, &keys.device, false)),
            "fallback_signed_bytes_hex": hex::encode(otk.signed_bytes(&keys.user, &keys.device, true)),
        },
        "sealed": {"section": "E4.1", "cbor_hex": hex::encode(codec::encode(&sample_sealed())), "diagnostic": diagnostic(&codec::encode(&sample_sealed())).unwrap()},
        "inner": {"section": "E4.2", "cbor_hex": hex::encode(codec::encode(&inner)), "diagnostic": diagnostic(&codec::encode(&inner)).unwrap()},
        "safety_number": {
            "section": "E6.1",
            "users": [
                {"user": alice.as_str(), "devices": [{"device": d1.as_str(), "ed25519_hex": hex::encode(k1)}], "digits": fingerprint_digits(&alice, &a)},
                {"user": bob.as_str(), "devices": [{"device": d2.as_str(), "ed25519_hex": hex::encode(k2)}, {"device": d3.as_str(), "ed25519_hex": hex::encode(k3)}], "digits": fingerprint_digits(&bob, &b)},
            ],
            "number": safety_number((&alice, &a), (&bob, &b)),
        },
    })
}

fn requests() -> Vec<(&'static str, &'static str, RequestFrame)> {
    let token = Some("mt_ZXhhbXBsZS10b2tlbg".to_owned());
    let f = |req, auth: &Option<String>| RequestFrame { v: 0, req, auth: auth.clone() };
    vec![
        ("info", "6.1", f(Request::Info {}, &None)),
        (
            "register with token",
            "6.2",
            f(
                Request::Register {
                    user: user("@alice:alpha.example"),
                    token: Some("let-me-in-please".into()),
                    password: "correct horse battery".into(),
                    device_name: Some("laptop".into()),
                },
                &None,
            ),
        ),
        (
            "login",
            "6.2",
            f(Request::Login { user: user("@alice:alpha.example"), password: "correct horse battery".into(), device_name: None }, &None),
        ),
        ("logout", "6.3", f(Request::Logout {}, &token)),
        (
            "send text",
            "6.4",
            f(
                Request::Send {
                    to: user("@bob:alpha.example"),
                    content: Content::text("hello, bob"),
                    client_msg_id: ClientMsgId(*b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f"),
                },
                &token,
            ),
        ),
        ("sync", "6.5", f(Request::Sync { limit: Some(100), since: 42 }, &token)),
        ("subscribe", "6.5", f(Request::Subscribe { since: 0 }, &token)),
        (
            "read receipt",
            "10.2",
            f(
                Request::Receipt {
                    kind: ReceiptKind::Read,
                    with: user("@bob:beta.example"),
                    up_to: Watermark(sample_message().order_key()),
                },
                &token,
            ),
        ),
        ("devices", "11", f(Request::Devices {}, &token)),
        ("block", "6.12", f(Request::Block { user: user("@mallory:beta.example") }, &token)),
        ("unblock", "6.12", f(Request::Unblock { user: user("@mallory:beta.example") }, &token)),
        ("blocked", "6.12", f(Request::Blocked {}, &token)),
        ("keys", "6.13", f(Request::Keys {}, &None)),
        (
            "keys_upload",
            "E3.1",
            f(Request::KeysUpload { keys: Some(sample_device_keys()), fallback: Some(sample_key(2)), one_time: vec![sample_key(1)] }, &token),
        ),
        ("keys_query", "E3.2", f(Request::KeysQuery { user: user("@bob:beta.example") }, &token)),
        (
            "keys_claim",
            "E3.3",
            f(Request::KeysClaim { user: user("@bob:beta.example"), devices: vec![DeviceId::parse("K7Q2M9XW4BRT").unwrap()] }, &token),
        ),
        ("presence", "12.2", f(Request::Presence { user: user("@bob:beta.example") }, &token)),
        ("settings", "12.4", f(Request::Settings { hide_last_seen: true }, &token)),
        ("typing", "13", f(Request::Typing { with: user("@bob:beta.example") }, &token)),
        ("revoke device", "11", f(Request::RevokeDevice { device: DeviceId::parse("K7Q2M9XW4BRT").unwrap() }, &token)),
        (
            "conversations",
            "6.10",
            f(Request::Conversations { limit: Some(20), before: Some(Cursor("AAABmsZ1RgBVE2xJ".into())) }, &token),
        ),
        (
            "change password",
            "6.11",
            f(
                Request::ChangePassword {
                    old_password: "correct horse".into(),
                    new_password: "battery staple".into(),
                    logout_others: true,
                },
                &token,
            ),
        ),
        (
            "history before cursor",
            "6.6",
            f(
                Request::History {
                    with: user("@bob:alpha.example"),
                    after: None,
                    limit: Some(20),
                    before: Some(Cursor("AAAAAAAAAAVhbHBoYS5leGFtcGxlAAAAAAAAAAAF".into())),
                },
                &token,
            ),
        ),
    ]
}

fn responses() -> Vec<(&'static str, &'static str, ResponseFrame)> {
    let f = |res| ResponseFrame { v: 0, res };
    let m = sample_message();
    vec![
        (
            "info",
            "6.1",
            f(Response::Info { version: 0, server_name: server("alpha.example"), registration: RegistrationPolicy::Token }),
        ),
        (
            "session",
            "6.2",
            f(Response::Session {
                user: user("@alice:alpha.example"),
                token: "mt_ZXhhbXBsZS10b2tlbg".into(),
                device: DeviceId::parse("K7Q2M9XW4BRT").unwrap(),
            }),
        ),
        ("ok", "6.3", f(Response::Ok {})),
        ("sent", "6.4", f(Response::Sent { message: m.clone() })),
        (
            "events",
            "6.5",
            f(Response::Events { more: false, next: 7, events: vec![Event { pos: 7, event: EventKind::Message(m.clone()) }], ephemeral: vec![] }),
        ),
        (
            "page",
            "6.6",
            f(Response::Page {
                read: Some(Watermark(m.order_key())),
                seen: None,
                newer: None,
                older: Some(Cursor("AAAAAAAAAAVhbHBoYS5leGFtcGxlAAAAAAAAAAAD".into())),
                failed: vec![],
                messages: vec![m.clone()],
                delivered: Some(Watermark(m.order_key())),
            }),
        ),
        (
            "page with a refused message",
            "6.6",
            f(Response::Page {
                read: None,
                seen: None,
                newer: None,
                older: None,
                failed: vec![Undeliverable { seq: m.seq, conv: m.conv, origin: m.origin.clone(), reason: "unknown_recipient".into() }],
                messages: vec![m.clone()],
                delivered: None,
            }),
        ),
        (
            "receipt event",
            "10.4",
            f(Response::Events {
                more: false,
                next: 8,
                ephemeral: vec![],
                events: vec![Event {
                    pos: 8,
                    event: EventKind::Receipt(Receipt {
                        conv: m.conv,
                        kind: ReceiptKind::Read,
                        peer: m.from.clone(),
                        user: m.to.clone(),
                        up_to: Watermark(m.order_key()),
                    }),
                }],
            }),
        ),
        (
            "ephemeral presence and typing",
            "12.3",
            f(Response::Events {
                more: false,
                next: 8,
                events: vec![],
                ephemeral: vec![
                    Ephemeral::Presence(PresenceUpdate { user: m.to.clone(), online: false, last_seen: Some(1_795_366_900_000) }),
                    Ephemeral::Typing(TypingUpdate { conv: m.conv, peer: m.from.clone(), user: m.to.clone(), until: 1_795_366_905_000 }),
                ],
            }),
        ),
        (
            "presence",
            "12.2",
            f(Response::Presence { user: m.to.clone(), online: true, last_seen: None }),
        ),
        (
            "devices",
            "11",
            f(Response::Devices {
                devices: vec![DeviceInfo {
                    id: DeviceId::parse("K7Q2M9XW4BRT").unwrap(),
                    name: Some("laptop".into()),
                    current: true,
                    created_ms: 1_795_366_800_000,
                }],
            }),
        ),
        ("blocked", "6.12", f(Response::Blocked { users: vec![user("@mallory:beta.example")] })),
        ("key_count", "E3.1", f(Response::KeyCount { fallback: true, one_time: 50 })),
        ("device_keys", "E3.2", f(Response::DeviceKeys { user: user("@alice:alpha.example"), devices: vec![sample_device_keys()] })),
        (
            "claimed",
            "E3.3",
            f(Response::Claimed {
                keys: vec![ClaimedKey { key: sample_key(2), device: DeviceId::parse("K7Q2M9XW4BRT").unwrap(), fallback: true }],
            }),
        ),
        (
            "devices event",
            "E5.1",
            f(Response::Events {
                more: false,
                next: 10,
                events: vec![Event { pos: 10, event: EventKind::Devices(DeviceListChange { user: user("@bob:beta.example"), version: 3 }) }],
                ephemeral: vec![],
            }),
        ),
        (
            "undeliverable event",
            "10.5",
            f(Response::Events {
                more: false,
                next: 9,
                events: vec![Event {
                    pos: 9,
                    event: EventKind::Undeliverable(Undeliverable {
                        seq: m.seq,
                        conv: m.conv,
                        origin: m.origin.clone(),
                        reason: "unknown_recipient".into(),
                    }),
                }],
                ephemeral: vec![],
            }),
        ),
        (
            "conversations",
            "6.10",
            f(Response::Conversations {
                older: Some(Cursor("AAABmsZ1RgBVE2xJ".into())),
                conversations: vec![ConversationSummary {
                    conv: m.conv,
                    last: Some(m.clone()),
                    with: m.from.clone(),
                    unread: 1,
                    presence: Some(PresenceUpdate { user: m.from.clone(), online: false, last_seen: Some(1_795_366_800_000) }),
                    active_ms: 1_795_366_900_000,
                }],
            }),
        ),
        ("error", "7", f(Response::Error { code: ErrorCode::UnknownUser, message: "no such user @zed:alpha.example".into() })),
    ]
}

fn frame_vector(name: &str, section: &str, kind: &str, bytes: Vec<u8>) -> Value {
    json!({
        "name": name,
        "section": section,
        "kind": kind,
        "cbor_hex": hex::encode(&bytes),
        "diagnostic": diagnostic(&bytes).unwrap(),
    })
}

fn conversation_cases() -> Vec<(&'static str, &'static str)> {
    vec![
        ("@alice:alpha.example", "@bob:beta.example"),
        ("@bob:beta.example", "@alice:alpha.example"),
        ("@alice:alpha.example", "@bob:alpha.example"),
        ("@a:x", "@a:xy"),
    ]
}

/// Messages of one conversation as (origin, seq, deps) in arrival order, scrambled.
fn ordering_case() -> Vec<(&'static str, u64, Vec<(&'static str, u64)>)> {
    vec![
        ("beta.example", 2, vec![("alpha.example", 2), ("beta.example", 2)]),
        ("alpha.example", 1, vec![("alpha.example", 1)]),
        ("alpha.example", 3, vec![("alpha.example", 3), ("beta.example", 1)]),
        ("beta.example", 1, vec![("alpha.example", 1), ("beta.example", 1)]),
        ("alpha.example", 2, vec![("alpha.example", 2)]),
        ("gamma.example", 1, vec![("alpha.example", 2), ("gamma.example", 1)]),
        ("alpha.example", 4, vec![("alpha.example", 4), ("beta.example", 2), ("gamma.example", 1)]),
    ]
}

fn deps_of(entries: &[(&str, u64)]) -> Deps {
    let mut d = Deps::new();
    for (s, n) in entries {
        d.set(server(s), *n);
    }
    d
}

#[test]
#[ignore = "rewrites spec/vectors; run on purpose after a deliberate spec change"]
fn regenerate() {
    let mut frames = Vec::new();
    for (n, s, f) in requests() {
        frames.push(frame_vector(n, s, "request", codec::encode(&f)));
    }
    for (n, s, f) in responses() {
        frames.push(frame_vector(n, s, "response", codec::encode(&f)));
    }
    let doc = json!({
        "description": "Client protocol frame bodies (spec §5.3, §6): cbor_hex is the frame body without its 4-byte length prefix; diagnostic is its meaning in CBOR diagnostic notation (RFC 8949 §8). Decoding then re-encoding must give the same bytes.",
        "vectors": frames,
    });
    std::fs::write(dir().join("frames.json"), serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();

    let convs: Vec<Value> = conversation_cases()
        .into_iter()
        .map(|(a, b)| json!({"a": a, "b": b, "conversation_id_hex": ConversationId::one_to_one(&user(a), &user(b)).to_hex()}))
        .collect();
    let doc = json!({
        "description": "Conversation ids (spec §3): SHA-256 of \"missive/conversation/v1\" NUL, the bytewise-smaller user id, NUL, the other user id.",
        "vectors": convs,
    });
    std::fs::write(dir().join("conversation_ids.json"), serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();

    let case = ordering_case();
    let mut keyed: Vec<(OrderKey, String)> = case
        .iter()
        .map(|(o, s, d)| (OrderKey { rank: deps_of(d).rank(), origin: server(o), seq: *s }, format!("{o}/{s}")))
        .collect();
    keyed.sort();
    let msgs: Vec<Value> = case
        .iter()
        .map(|(o, s, d)| {
            let deps = deps_of(d);
            let key = OrderKey { rank: deps.rank(), origin: server(o), seq: *s };
            json!({
                "id": format!("{o}/{s}"),
                "origin": o,
                "seq": s,
                "deps": d.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "deps_cbor_hex": hex::encode(codec::encode(&deps)),
                "rank": deps.rank(),
                "order_key_hex": hex::encode(key.to_bytes()),
            })
        })
        .collect();
    let doc = json!({
        "description": "Canonical order (spec §4.6): messages of one conversation in arrival order; canonical_order lists their ids sorted by rank = sum(deps), then origin name bytewise, then seq. order_key_hex is the sortable key of §4.6; deps_cbor_hex the deterministic encoding of the vector (§4.3).",
        "vectors": [{"messages": msgs, "canonical_order": keyed.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>()}],
    });
    std::fs::write(dir().join("ordering.json"), serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();

    let doc = json!({
        "description": "End-to-end encryption (e2ee.md): device keys and a one-time key with the bytes their signatures cover (key and signature bytes are stand-ins), a sealed body and the inner plaintext a ciphertext carries (the Olm bytes are stand-ins), and a safety number with each user's digits.",
        "vectors": [e2ee_vectors()],
    });
    std::fs::write(dir().join("e2ee.json"), serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
}

#[test]
fn e2ee_vectors_match() {
    assert_eq!(load("e2ee.json"), [e2ee_vectors()]);
}

#[test]
fn frames_decode_and_reencode_byte_exact() {
    let vectors = load("frames.json");
    assert_eq!(vectors.len(), requests().len() + responses().len());
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let bytes = hex::decode(v["cbor_hex"].as_str().unwrap()).unwrap();
        check_deterministic(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(diagnostic(&bytes).unwrap(), v["diagnostic"].as_str().unwrap(), "{name}: meaning differs");
        let again = match v["kind"].as_str().unwrap() {
            "request" => codec::encode(&codec::decode_request(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"))),
            "response" => codec::encode(&codec::decode::<ResponseFrame>(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"))),
            k => panic!("unknown kind {k}"),
        };
        assert_eq!(hex::encode(again), hex::encode(&bytes), "{name}: re-encoding differs");
    }
    // The typed values behind the vectors encode to exactly the stored bytes.
    let stored: Vec<String> = load("frames.json").iter().map(|v| v["cbor_hex"].as_str().unwrap().to_owned()).collect();
    let fresh: Vec<String> = requests()
        .iter()
        .map(|(_, _, f)| hex::encode(codec::encode(f)))
        .chain(responses().iter().map(|(_, _, f)| hex::encode(codec::encode(f))))
        .collect();
    assert_eq!(fresh, stored);
}

/// The request vectors hold one request of every kind, and `Request::NAMES` (which tells
/// `bad_frame` from `invalid_request`, §5.2) lists exactly their names as encoded.
#[test]
fn request_names_are_the_encoded_ones() {
    let mut names: Vec<&str> = requests()
        .iter()
        .map(|(_, _, f)| {
            let encoded = codec::encode(&f.req);
            let key: std::collections::BTreeMap<String, ciborium::Value> = codec::decode(&encoded).unwrap();
            assert_eq!(key.keys().collect::<Vec<_>>(), [f.req.name()], "name() of {:?}", f.req);
            f.req.name()
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut known = missive_spec::Request::NAMES.to_vec();
    known.sort_unstable();
    assert_eq!(names, known);
}

#[test]
fn conversation_ids_match() {
    for v in load("conversation_ids.json") {
        let (a, b) = (user(v["a"].as_str().unwrap()), user(v["b"].as_str().unwrap()));
        assert_eq!(ConversationId::one_to_one(&a, &b).to_hex(), v["conversation_id_hex"].as_str().unwrap());
    }
}

#[test]
fn canonical_order_matches() {
    for case in load("ordering.json") {
        let mut keyed = Vec::new();
        for m in case["messages"].as_array().unwrap() {
            let deps: Deps = codec::decode(&hex::decode(m["deps_cbor_hex"].as_str().unwrap()).unwrap()).unwrap();
            for (k, n) in m["deps"].as_object().unwrap() {
                assert_eq!(deps.get(&server(k)), n.as_u64().unwrap());
            }
            assert_eq!(deps.rank(), m["rank"].as_u64().unwrap());
            check_deterministic(&codec::encode(&deps)).unwrap();
            let key = OrderKey { rank: deps.rank(), origin: server(m["origin"].as_str().unwrap()), seq: m["seq"].as_u64().unwrap() };
            assert_eq!(hex::encode(key.to_bytes()), m["order_key_hex"].as_str().unwrap());
            keyed.push((hex::decode(m["order_key_hex"].as_str().unwrap()).unwrap(), key, m["id"].as_str().unwrap().to_owned()));
        }
        let want: Vec<String> = case["canonical_order"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect();
        let mut by_key = keyed.clone();
        by_key.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(by_key.iter().map(|k| k.2.clone()).collect::<Vec<_>>(), want);
        let mut by_bytes = keyed;
        by_bytes.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(by_bytes.iter().map(|k| k.2.clone()).collect::<Vec<_>>(), want, "key bytes sort differently");
    }
}

#[test]
fn deps_encode_in_deterministic_key_order() {
    // "gamma.example" is longer than "beta.example", so it comes after it whatever the
    // alphabet says; "zz.example" is shorter than both and comes first.
    let d = deps_of(&[("gamma.example", 1), ("beta.example", 2), ("zz.example", 3)]);
    let b = codec::encode(&d);
    check_deterministic(&b).unwrap();
    assert_eq!(diagnostic(&b).unwrap(), r#"{"zz.example": 3, "beta.example": 2, "gamma.example": 1}"#);
}
