//! Deterministic CBOR and length-prefixed framing (spec §5.2).
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of CBOR. Decoders bound
//! the length before reading and the nesting depth while decoding.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::limits;
use crate::wire::{ErrorCode, RequestFrame, PROTOCOL_VERSION};

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
}

impl DecodeError {
    /// The protocol error code a server answers with (§7).
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::Cbor(_) | DecodeError::Trailing(_) => ErrorCode::BadFrame,
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

#[derive(Deserialize)]
struct VersionOnly {
    v: u64,
}

/// Decodes a request body, telling a frame of another version from a malformed one.
pub fn decode_request(body: &[u8]) -> Result<RequestFrame, DecodeError> {
    match decode::<RequestFrame>(body) {
        Ok(f) if f.v == PROTOCOL_VERSION => Ok(f),
        Ok(f) => Err(DecodeError::UnsupportedVersion(f.v.into())),
        Err(e) => match decode::<VersionOnly>(body) {
            Ok(only) if only.v != u64::from(PROTOCOL_VERSION) => {
                Err(DecodeError::UnsupportedVersion(only.v))
            }
            _ => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Request;
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

    #[test]
    fn frame_limit() {
        assert!(frame_len(100u32.to_be_bytes(), 99).is_err());
        assert_eq!(frame_len(99u32.to_be_bytes(), 99).unwrap(), 99);
    }
}
