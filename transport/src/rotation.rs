//! Following a server's key rotation (federation.md F2.7, core.md CLI-TLS-5): a chain of
//! statements, each signed by the key it replaces, leads from the key one expected to the
//! key one is shown. Clients and servers both check it; only the server signs.

use ed25519_dalek::Signature;
use missive_spec::rotation::{RotationStatement, SignedRotation, MAX_ROTATIONS};
use missive_spec::{codec, ServerName};

use crate::key::PublicKey;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RotationError {
    #[error("the server's rotation chain does not lead from {from} to {to}")]
    NoPath { from: String, to: String },
    #[error("a rotation statement is unreadable or badly signed: {0}")]
    Bad(String),
    #[error("the rotation chain has more than {MAX_ROTATIONS} statements")]
    TooLong,
}

/// Decodes a statement after checking its signature by its own `old` key.
pub fn open(s: &SignedRotation) -> Result<(RotationStatement, PublicKey, PublicKey), RotationError> {
    let st: RotationStatement = codec::decode(&s.statement).map_err(|e| RotationError::Bad(e.to_string()))?;
    let old = PublicKey::parse(&st.old).map_err(|e| RotationError::Bad(e.to_string()))?;
    let new = PublicKey::parse(&st.new).map_err(|e| RotationError::Bad(e.to_string()))?;
    let sig = Signature::from_slice(&s.sig).map_err(|_| RotationError::Bad("not a signature".into()))?;
    old.0.verify_strict(&SignedRotation::signed_bytes(&s.statement), &sig).map_err(|_| RotationError::Bad(format!("not signed by {}", st.old)))?;
    Ok((st, old, new))
}

/// The keys `server` replaced on the way from `from` to `to`, each with the end of its
/// validity, when `chain` holds statements leading there (F2.7); else why not.
pub fn follow(server: &ServerName, from: &PublicKey, to: &PublicKey, chain: &[SignedRotation]) -> Result<Vec<(PublicKey, u64)>, RotationError> {
    if chain.len() > MAX_ROTATIONS {
        return Err(RotationError::TooLong);
    }
    let no_path = || RotationError::NoPath { from: from.to_text(), to: to.to_text() };
    let mut at = *from;
    let mut retired = Vec::new();
    for s in chain {
        let (st, old, new) = open(s)?;
        if st.server != *server {
            return Err(RotationError::Bad(format!("a statement names {}", st.server)));
        }
        // Statements before the one that starts from `from` are history we need not follow.
        if old != at {
            if retired.is_empty() {
                continue;
            }
            return Err(no_path());
        }
        retired.push((old, st.valid_until_ms));
        at = new;
        if at == *to {
            return Ok(retired);
        }
    }
    Err(no_path())
}
