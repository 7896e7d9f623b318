//! Checks `spec/vectors/federation.json`: signed envelopes (key, signed bytes, signature)
//! and transaction frames, byte for byte. `regenerate` (ignored) rewrites the file.

use std::path::PathBuf;

use ed25519_dalek::SigningKey;
use missive_federation::{envelope, PublicKey, ServerKey};
use missive_spec::codec;
use missive_spec::diag::{check_deterministic, diagnostic};
use missive_spec::federation::{
    txn_id, FedRequest, FedRequestFrame, FedResponse, FedResponseFrame, SignedUnit, Unit, UnitResult,
};
use missive_spec::{Content, ConversationId, Deps, Message, ServerName, UserId};
use serde_json::{json, Value};

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors/federation.json")
}

const SEED: [u8; 32] = [7; 32];

fn key() -> ServerKey {
    ServerKey::from_signing_key(SigningKey::from_bytes(&SEED))
}

fn message(seq: u64, text: &str) -> Message {
    let a = UserId::parse("@alice:alpha.example").unwrap();
    let b = UserId::parse("@bob:beta.example").unwrap();
    let mut deps = Deps::new();
    deps.set(ServerName::parse("alpha.example").unwrap(), seq);
    deps.set(ServerName::parse("beta.example").unwrap(), 1);
    Message {
        to: b.clone(),
        ts: 1_795_366_800_000 + seq,
        seq,
        conv: ConversationId::one_to_one(&a, &b),
        deps,
        from: a,
        origin: ServerName::parse("alpha.example").unwrap(),
        content: Content::text(text),
    }
}

fn frames() -> (Vec<SignedUnit>, Vec<(&'static str, &'static str, Vec<u8>)>) {
    let k = key();
    let units = vec![envelope::sign(&k, &Unit::Message(message(1, "hello"))), envelope::sign(&k, &Unit::Message(message(2, "again")))];
    let id = txn_id(&units).to_vec();
    let conv = units_conv();
    let f = vec![
        ("txn", "F5", codec::encode(&FedRequestFrame { v: 0, req: FedRequest::Txn { id: id.clone(), units: units.clone() } })),
        (
            "txn_result",
            "F6",
            codec::encode(&FedResponseFrame { v: 0, res: FedResponse::TxnResult { id, results: vec![UnitResult::Accepted, UnitResult::Held] } }),
        ),
        ("backfill", "F7", codec::encode(&FedRequestFrame { v: 0, req: FedRequest::Backfill { conv, last: 6, first: 5 } })),
        ("high_water", "F12.1", codec::encode(&FedRequestFrame { v: 0, req: FedRequest::HighWater { after: None } })),
        ("high_water_after", "F12.1", codec::encode(&FedRequestFrame { v: 0, req: FedRequest::HighWater { after: Some(conv) } })),
        (
            "high_water_answer",
            "F12.1",
            codec::encode(&FedResponseFrame {
                v: 0,
                res: FedResponse::HighWater { next: Some(conv), convs: vec![missive_spec::federation::HighWaterMark { conv, mine: 3, yours: 7 }] },
            }),
        ),
        ("reclaim", "F12.2", codec::encode(&FedRequestFrame { v: 0, req: FedRequest::Reclaim { conv, last: 7, first: 5 } })),
        ("keys", "F2.7", codec::encode(&FedRequestFrame { v: 0, req: FedRequest::Keys {} })),
        ("keys_answer", "F2.7", {
            // The vector key hands over to the key of seed 8 at 1 795 366 800 000 ms.
            let next = ServerKey::from_signing_key(SigningKey::from_bytes(&[8; 32]));
            let name = missive_spec::ServerName::parse("alpha.example").unwrap();
            let rotation = k.hand_over(&next.public(), &name, 1_795_366_800_000);
            codec::encode(&FedResponseFrame { v: 0, res: FedResponse::Keys { current: next.public().to_text(), rotations: vec![rotation] } })
        }),
    ];
    (units, f)
}

fn units_conv() -> ConversationId {
    message(1, "").conv
}

#[test]
#[ignore = "rewrites spec/vectors/federation.json; run on purpose after a deliberate spec change"]
fn regenerate() {
    let k = key();
    let (units, frames) = frames();
    let envs: Vec<Value> = units
        .iter()
        .map(|u| {
            json!({
                "unit_cbor_hex": hex::encode(&u.unit),
                "unit_diagnostic": diagnostic(&u.unit).unwrap(),
                "signed_bytes_hex": hex::encode(SignedUnit::signed_bytes(&u.unit)),
                "signature_hex": hex::encode(&u.sig),
                "envelope_cbor_hex": hex::encode(codec::encode(u)),
                "envelope_hash_hex": hex::encode(u.hash()),
            })
        })
        .collect();
    let fr: Vec<Value> = frames
        .iter()
        .map(|(n, s, b)| json!({"name": n, "section": s, "cbor_hex": hex::encode(b), "diagnostic": diagnostic(b).unwrap()}))
        .collect();
    let doc = json!({
        "description": "Federation (spec federation.md). The signing key is ed25519 with the 32-byte seed `seed_hex`; `envelopes` are two signed message units: unit_cbor_hex is the unit, signed_bytes_hex what the signature covers (\"missive/unit/v1\" NUL || unit), envelope_hash_hex the SHA-256 of the envelope's encoding. `txn_id_hex` is the id of a transaction of both envelopes in order. `frames` are federation frame bodies.",
        "seed_hex": hex::encode(SEED),
        "public_key": k.public().to_text(),
        "key_id": k.public().key_id(),
        "envelopes": envs,
        "txn_id_hex": hex::encode(txn_id(&units)),
        "frames": fr,
    });
    std::fs::write(path(), serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
}

#[test]
fn envelopes_and_transactions_match_the_vectors() {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap();
    let k = key();
    assert_eq!(hex::encode(SEED), v["seed_hex"]);
    let public = PublicKey::parse(v["public_key"].as_str().unwrap()).unwrap();
    assert_eq!(public, k.public());
    assert_eq!(public.key_id(), v["key_id"]);
    let mut units = Vec::new();
    for e in v["envelopes"].as_array().unwrap() {
        let h = |f: &str| hex::decode(e[f].as_str().unwrap()).unwrap();
        let env: SignedUnit = codec::decode(&h("envelope_cbor_hex")).unwrap();
        check_deterministic(&h("envelope_cbor_hex")).unwrap();
        check_deterministic(&h("unit_cbor_hex")).unwrap();
        assert_eq!(env.unit, h("unit_cbor_hex"));
        assert_eq!(env.sig, h("signature_hex"));
        assert_eq!(SignedUnit::signed_bytes(&env.unit), h("signed_bytes_hex"));
        assert_eq!(env.hash().to_vec(), h("envelope_hash_hex"));
        assert_eq!(diagnostic(&env.unit).unwrap(), e["unit_diagnostic"].as_str().unwrap());
        // The signature verifies with the published key, and signing again gives the same bytes.
        let unit = envelope::verify(&env, &[public]).unwrap();
        assert_eq!(envelope::sign(&k, &unit), env);
        units.push(env);
    }
    assert_eq!(hex::encode(txn_id(&units)), v["txn_id_hex"]);
    let (_, frames) = frames();
    let stored = v["frames"].as_array().unwrap();
    assert_eq!(stored.len(), frames.len());
    for (s, (name, _, bytes)) in stored.iter().zip(frames) {
        let want = hex::decode(s["cbor_hex"].as_str().unwrap()).unwrap();
        assert_eq!(hex::encode(&bytes), hex::encode(&want), "{name}");
        check_deterministic(&want).unwrap();
        assert_eq!(diagnostic(&want).unwrap(), s["diagnostic"].as_str().unwrap());
        let again = if name == "txn_result" || name.ends_with("_answer") {
            codec::encode(&codec::decode::<FedResponseFrame>(&want).unwrap())
        } else {
            codec::encode(&codec::decode::<FedRequestFrame>(&want).unwrap())
        };
        assert_eq!(again, want, "{name}: re-encoding differs");
    }
}
