// The decoders of untrusted bytes, one per fuzz target: shared, by `include!`, between the
// fuzz targets (fuzz/fuzz_targets/) and the stable replay test
// (server/tests/untrusted_input.rs), so both exercise exactly the same calls.

use missive_federation::discovery::{document_keys, parse_key_document};
use missive_federation::{envelope, PublicKey};
use missive_spec::federation::{FedRequestFrame, FedResponseFrame, SignedUnit};
use missive_spec::{codec, limits, DeviceId, ResponseFrame, ServerName, UserId};

/// Feeds `data` to the decoders of `target`; panics only on a bug.
pub fn decode_all(target: &str, data: &[u8]) {
    match target {
        "client_request" => {
            if let Some(h) = data.get(..4) {
                let _ = codec::frame_len(h.try_into().unwrap(), limits::MAX_REQUEST_FRAME);
            }
            if let Ok(f) = codec::decode_request(data) {
                assert_eq!(codec::decode_request(&codec::encode(&f)).ok(), Some(f));
            }
        }
        "client_response" => {
            if let Ok(f) = codec::decode::<ResponseFrame>(data) {
                assert!(codec::decode::<ResponseFrame>(&codec::encode(&f)).is_ok());
            }
        }
        "federation_frame" => {
            if let Ok(f) = codec::decode::<FedRequestFrame>(data) {
                assert!(codec::decode::<FedRequestFrame>(&codec::encode(&f)).is_ok());
            }
            let _ = codec::decode::<FedResponseFrame>(data);
        }
        "signed_unit" => {
            // The key of spec/vectors/federation.json, so the seed envelopes verify.
            let key = PublicKey::parse("ed25519:6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw").unwrap();
            if let Ok(env) = codec::decode::<SignedUnit>(data) {
                let _ = envelope::verify(&env, &[key]);
                let _ = envelope::open_trusted(&env);
            }
        }
        "key_document" => {
            if let Ok(doc) = parse_key_document(data, &ServerName::parse("beta.example").unwrap()) {
                let _ = document_keys(&doc, 1_795_000_000_000);
            }
        }
        "identifiers" => {
            let Ok(s) = std::str::from_utf8(data) else { return };
            if let Ok(u) = UserId::parse(s) {
                assert_eq!(UserId::parse(u.as_str()).ok(), Some(u));
            }
            let _ = (ServerName::parse(s), DeviceId::parse(s));
            if let Ok(k) = PublicKey::parse(s) {
                assert_eq!(PublicKey::parse(&k.to_text()).ok(), Some(k));
            }
        }
        "config" => {
            if let Ok(text) = std::str::from_utf8(data) {
                let _ = missive_server::config::Config::parse(text, std::path::Path::new("/nonexistent"));
            }
        }
        other => panic!("no decoder for {other}"),
    }
}

