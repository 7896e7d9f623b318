//! Key rotation (federation.md F2.7): the statement a server's old key signs to hand over
//! to its new key, as it travels in `keys` answers.

use serde::{Deserialize, Serialize};

use crate::ServerName;

/// What a rotation signature covers, before the statement's bytes.
pub const ROTATION_DOMAIN: &[u8] = b"missive/rotation/v1\x00";
/// Most statements a `keys` answer carries.
pub const MAX_ROTATIONS: usize = 100;

/// `old` hands over to `new` from `valid_until_ms` on. Keys in textual form (`ed25519:…`).
/// Fields in canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationStatement {
    pub new: String,
    pub old: String,
    pub server: ServerName,
    pub valid_until_ms: u64,
}

/// A statement's deterministic encoding and the old key's signature over
/// [`ROTATION_DOMAIN`] followed by it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRotation {
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub statement: Vec<u8>,
}

impl SignedRotation {
    /// The bytes the signature covers.
    pub fn signed_bytes(statement: &[u8]) -> Vec<u8> {
        [ROTATION_DOMAIN, statement].concat()
    }
}
