//! Deterministic CBOR and length-prefixed framing (spec §5.2).
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of CBOR. Decoders bound
//! the length before reading and the nesting depth while decoding. A request body is
//! decoded in two steps (§5.2): the frame (`bad_frame` when it fails), then the request's
//! arguments (`invalid_request`).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::limits;
use crate::wire::{ErrorCode, Request, RequestFrame, PROTOCOL_VERSION};

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame version {0} is not supported (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u64),
    #[error("invalid CBOR: {0}")]
    Cbor(String),
    #[error("{0} trailing bytes after the CBOR item")]
    Trailing(usize),
    /// One well-formed CBOR item, but not a request frame of a known request (§5.2 step 1).
    #[error("not a request frame: {0}")]
    NotAFrame(String),
    /// A request frame whose arguments do not fit its request (§5.2 step 2).
    #[error("invalid arguments: {0}")]
    Arguments(String),
}

impl DecodeError {
    /// The protocol error code a server answers with (§7).
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::Cbor(_) | DecodeError::Trailing(_) | DecodeError::NotAFrame(_) => ErrorCode::BadFrame,
            DecodeError::Arguments(_) => ErrorCode::InvalidRequest,
        }
    }
}

/// Encodes a value as CBOR. Wire types encode deterministically (see `wire`).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    // Writing into a Vec cannot fail, and every wire type is serialisable.
    ciborium::ser::into_writer(value, &mut out).expect("CBOR encoding into a Vec");
    out
}

/// Decodes exactly one CBOR item, bounding nesting depth.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut reader = bytes;
    let value = ciborium::de::from_reader_with_recursion_limit(&mut reader, limits::MAX_CBOR_DEPTH)
        .map_err(|e| DecodeError::Cbor(e.to_string()))?;
    if !reader.is_empty() {
        return Err(DecodeError::Trailing(reader.len()));
    }
    Ok(value)
}

/// Prefixes a CBOR body with its 4-byte big-endian length.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads a frame's length prefix and checks it against `max`.
pub fn frame_len(header: [u8; 4], max: usize) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a request body in the two steps of §5.2. First the frame: one well-formed CBOR
/// item within the nesting limit, a map whose `v` is an unsigned integer (another version
/// is [`DecodeError::UnsupportedVersion`] whatever the rest holds), whose `req` is a map
/// with one key naming a known request and whose `auth`, if any, is text; else a
/// `bad_frame` error. Then the request's arguments; a mismatch there is
/// [`DecodeError::Arguments`], answered `invalid_request`.
///
/// Decoding through a [`ciborium::Value`] also accepts an indefinite-length `req` map,
/// which ciborium's typed enum decoding refuses (§1.1 wants every well-formed encoding).
pub fn decode_request(body: &[u8]) -> Result<RequestFrame, DecodeError> {
    use ciborium::Value;
    let not_a_frame = |why: &str| DecodeError::NotAFrame(why.to_owned());
    let Value::Map(fields) = decode::<Value>(body)? else { return Err(not_a_frame("the body is not a map")) };
    let field = |name: &str| fields.iter().find(|(k, _)| k.as_text() == Some(name)).map(|(_, v)| v);
    let v = match field("v") {
        Some(Value::Integer(i)) => u64::try_from(*i).map_err(|_| not_a_frame("`v` is negative"))?,
        _ => return Err(not_a_frame("`v` is missing or not an unsigned integer")),
    };
    if v != u64::from(PROTOCOL_VERSION) {
        return Err(DecodeError::UnsupportedVersion(v));
    }
    let auth = match field("auth") {
        None => None,
        Some(Value::Text(t)) => Some(t.clone()),
        Some(_) => return Err(not_a_frame("`auth` is not a text string")),
    };
    let req = field("req").ok_or_else(|| not_a_frame("`req` is missing"))?;
    let name = match req {
        Value::Map(m) if m.len() == 1 => m[0].0.as_text().ok_or_else(|| not_a_frame("the request name is not text"))?,
        _ => return Err(not_a_frame("`req` is not a map with exactly one key")),
    };
    if !Request::NAMES.contains(&name) {
        return Err(DecodeError::NotAFrame(format!("unknown request {name:?}")));
    }
    let req: Request = req.deserialized().map_err(|e| DecodeError::Arguments(format!("{name}: {e}")))?;
    Ok(RequestFrame { v: PROTOCOL_VERSION, req, auth })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::cbor;

    #[test]
    fn rejects_deep_nesting() {
        // 100 nested one-element arrays.
        let mut b = vec![0x81u8; 100];
        b.push(0x00);
        assert!(matches!(decode::<ciborium::Value>(&b), Err(DecodeError::Cbor(_))));
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut b = encode(&RequestFrame { v: 0, req: Request::Info {}, auth: None });
        b.push(0);
        assert!(matches!(decode::<RequestFrame>(&b), Err(DecodeError::Trailing(1))));
    }

    #[test]
    fn tells_other_versions_apart() {
        let b = encode(&RequestFrame { v: 7, req: Request::Info {}, auth: None });
        assert!(matches!(decode_request(&b), Err(DecodeError::UnsupportedVersion(7))));
        // A future version with a request this one does not know.
        let future = encode(&cbor!({"v" => 9, "req" => {"teleport" => {}}}).unwrap());
        assert!(matches!(decode_request(&future), Err(DecodeError::UnsupportedVersion(9))));
        let garbage = [0xffu8, 0x00, 0x13];
        assert!(matches!(decode_request(&garbage), Err(DecodeError::Cbor(_))));
    }

    /// `{"v": 0, "req": {"info": {"x": A}}}` where A is `arrays` nested one-element arrays.
    fn info_nesting(arrays: usize) -> Vec<u8> {
        let mut inner = ciborium::Value::Integer(0.into());
        for _ in 0..arrays {
            inner = ciborium::Value::Array(vec![inner]);
        }
        let args = cbor!({"x" => inner}).unwrap();
        encode(&cbor!({"v" => 0, "req" => {"info" => args}}).unwrap())
    }

    #[test]
    fn nesting_depth_counts_every_enclosing_container_from_the_outer_map() {
        // Outer map 1, `req` 2, arguments 3: 13 arrays reach level 16, 14 go over.
        assert!(matches!(decode_request(&info_nesting(13)), Ok(RequestFrame { req: Request::Info {}, .. })));
        let deep = decode_request(&info_nesting(14));
        assert!(matches!(deep, Err(DecodeError::Cbor(_))), "{deep:?}");
        assert_eq!(deep.unwrap_err().code(), ErrorCode::BadFrame);
        // A tag is a level too; 12 arrays in a tag reach 16.
        let tagged = |arrays: usize| {
            let mut inner = ciborium::Value::Integer(0.into());
            for _ in 0..arrays {
                inner = ciborium::Value::Array(vec![inner]);
            }
            let args = ciborium::Value::Map(vec![("x".into(), ciborium::Value::Tag(100, Box::new(inner)))]);
            encode(&cbor!({"v" => 0, "req" => {"info" => args}}).unwrap())
        };
        assert!(decode_request(&tagged(12)).is_ok());
        assert!(matches!(decode_request(&tagged(13)), Err(DecodeError::Cbor(_))));
    }

    #[test]
    fn a_bad_frame_and_bad_arguments_get_different_codes() {
        let code = |v: ciborium::Value| decode_request(&encode(&v)).map(|_| ()).map_err(|e| e.code());
        let bad_frame = Err(ErrorCode::BadFrame);
        let invalid = Err(ErrorCode::InvalidRequest);
        assert_eq!(code(cbor!([0]).unwrap()), bad_frame, "not a map");
        assert_eq!(code(cbor!({"req" => {"info" => {}}}).unwrap()), bad_frame, "no v");
        assert_eq!(code(cbor!({"v" => "0", "req" => {"info" => {}}}).unwrap()), bad_frame, "v as text");
        assert_eq!(code(cbor!({"v" => 0}).unwrap()), bad_frame, "no req");
        assert_eq!(code(cbor!({"v" => 0, "req" => {}}).unwrap()), bad_frame, "empty req");
        assert_eq!(code(cbor!({"v" => 0, "req" => {"info" => {}, "devices" => {}}}).unwrap()), bad_frame, "two requests");
        assert_eq!(code(cbor!({"v" => 0, "req" => {"teleport" => {}}}).unwrap()), bad_frame, "unknown request");
        assert_eq!(code(cbor!({"v" => 0, "req" => {"info" => {}}, "auth" => 5}).unwrap()), bad_frame, "auth not text");
        assert_eq!(code(cbor!({"v" => 0, "req" => {"info" => 5}}).unwrap()), invalid, "arguments not a map");
        assert_eq!(code(cbor!({"v" => 0, "req" => {"sync" => {}}}).unwrap()), invalid, "missing since");
        assert_eq!(code(cbor!({"v" => 0, "req" => {"sync" => {"since" => "0"}}}).unwrap()), invalid, "since as text");
        assert_eq!(code(cbor!({"v" => 0, "req" => {"presence" => {"user" => "alice"}}}).unwrap()), invalid, "bad user id");
        let user = ciborium::Value::Bytes(b"@a:b.example".to_vec());
        assert_eq!(code(cbor!({"v" => 0, "req" => {"presence" => {"user" => user}}}).unwrap()), invalid, "user id as bytes");
        let receipt = |kind: &str, up_to: ciborium::Value| {
            cbor!({"v" => 0, "req" => {"receipt" => {"kind" => kind, "with" => "@b:x.example", "up_to" => up_to}}}).unwrap()
        };
        let key = crate::OrderKey { rank: 1, origin: crate::ServerName::parse("x.example").unwrap(), seq: 1 }.to_bytes();
        assert_eq!(code(receipt("read", ciborium::Value::Bytes(key.clone()))), Ok(()));
        assert_eq!(code(receipt("seen", ciborium::Value::Bytes(key.clone()))), invalid, "unknown kind");
        assert_eq!(code(receipt("read", ciborium::Value::Bytes(vec![1, 2, 3]))), invalid, "up_to not an order key");
        assert_eq!(code(receipt("read", ciborium::Value::Text("AAAA".into()))), invalid, "up_to as text");
        let send = |id: Vec<u8>| {
            let id = ciborium::Value::Bytes(id);
            cbor!({"v" => 0, "req" => {"send" => {"to" => "@b:x.example", "content" => {"body" => ciborium::Value::Bytes(vec![]), "type" => "text"}, "client_msg_id" => id}}}).unwrap()
        };
        assert_eq!(code(send(vec![7; 16])), Ok(()));
        assert_eq!(code(send(vec![7; 15])), invalid, "15-byte client_msg_id");
        // Another version wins over anything else wrong, as long as `v` can be read.
        assert_eq!(code(cbor!({"v" => 3, "req" => 5}).unwrap()), Err(ErrorCode::UnsupportedVersion));
    }

    #[test]
    fn an_indefinite_length_request_map_is_accepted() {
        // {"v": 0, "req": {_ "info": {}}}: the `req` map of indefinite length.
        let mut b = vec![0xa2, 0x61, b'v', 0x00, 0x63, b'r', b'e', b'q', 0xbf];
        b.extend([0x64, b'i', b'n', b'f', b'o', 0xa0, 0xff]);
        assert!(matches!(decode_request(&b), Ok(RequestFrame { req: Request::Info {}, .. })));
    }

    #[test]
    fn frame_limit() {
        assert!(frame_len(100u32.to_be_bytes(), 99).is_err());
        assert_eq!(frame_len(99u32.to_be_bytes(), 99).unwrap(), 99);
    }
}
