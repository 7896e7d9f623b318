//! Signing and verifying units (spec F§4): the signature covers the transmitted unit bytes
//! exactly; verification happens before a byte of the unit is decoded.

use ed25519_dalek::{Signature, Signer};
use missive_spec::codec;
use missive_spec::federation::{SignedUnit, Unit, UnitResult};

use crate::keys::{PublicKey, ServerKey};

/// Why a signed unit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("key id {0:?} is not a key of the sending server")]
    UnknownKey(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("unit does not decode: {0}")]
    BadUnit(String),
    #[error("key id {key:?} was retired at {until_ms} ms, before the unit's claimed time")]
    KeyRetired { key: String, until_ms: u64 },
}

impl VerifyError {
    pub fn result(&self) -> UnitResult {
        match self {
            VerifyError::UnknownKey(_) | VerifyError::KeyRetired { .. } => UnitResult::UnknownKey,
            VerifyError::BadSignature => UnitResult::BadSignature,
            VerifyError::BadUnit(_) => UnitResult::BadUnit,
        }
    }
}

/// Encodes and signs a unit with the server key.
pub fn sign(key: &ServerKey, unit: &Unit) -> SignedUnit {
    let bytes = codec::encode(unit);
    let sig = key.signing_key().sign(&SignedUnit::signed_bytes(&bytes));
    SignedUnit { key: key.public().key_id(), sig: sig.to_bytes().to_vec(), unit: bytes }
}

/// Wraps a unit that never leaves this server in an envelope without a signature, so that
/// it is stored like every other. [`verify`] refuses it (it names no key).
pub fn unsigned(unit: &Unit) -> SignedUnit {
    SignedUnit { key: String::new(), sig: Vec::new(), unit: codec::encode(unit) }
}

/// Checks the signature with whichever of `keys` the envelope names, then decodes.
pub fn verify(env: &SignedUnit, keys: &[PublicKey]) -> Result<Unit, VerifyError> {
    let key = keys
        .iter()
        .find(|k| k.key_id() == env.key)
        .ok_or_else(|| VerifyError::UnknownKey(env.key.clone()))?;
    let sig = Signature::from_slice(&env.sig).map_err(|_| VerifyError::BadSignature)?;
    key.0
        .verify_strict(&SignedUnit::signed_bytes(&env.unit), &sig)
        .map_err(|_| VerifyError::BadSignature)?;
    codec::decode(&env.unit).map_err(|e| VerifyError::BadUnit(e.to_string()))
}

/// Checks a unit from a peer whose keys are `current` and `retired` (with the end of each
/// retired key's validity, ms). A retired key verifies only what it could have signed
/// while valid: a message whose claimed time `ts` is at or before that end. A receipt
/// carries no time, so only a current key verifies it (F2.1, F6.2).
pub fn verify_for_peer(env: &SignedUnit, current: &[PublicKey], retired: &[(PublicKey, u64)]) -> Result<Unit, VerifyError> {
    if current.iter().any(|k| k.key_id() == env.key) {
        return verify(env, current);
    }
    let Some((key, until_ms)) = retired.iter().find(|(k, _)| k.key_id() == env.key) else {
        return Err(VerifyError::UnknownKey(env.key.clone()));
    };
    signed_while_valid(env, verify(env, std::slice::from_ref(key))?, *until_ms)
}

/// `unit`, if a key retired at `until_ms` could have signed it: only a message claimed at
/// or before that time.
fn signed_while_valid(env: &SignedUnit, unit: Unit, until_ms: u64) -> Result<Unit, VerifyError> {
    match unit {
        Unit::Message(m) if m.ts <= until_ms => Ok(Unit::Message(m)),
        _ => Err(VerifyError::KeyRetired { key: env.key.clone(), until_ms }),
    }
}

/// Checks the envelopes of one transaction from a peer, each as [`verify_for_peer`] would,
/// but their signatures together: one batch verification (`ed25519_dalek::verify_batch`)
/// costs about half of checking them one by one. If the batch fails, each is checked
/// alone, so a bad signature costs only its own unit.
///
/// The batch equation accepts every signature single verification accepts. It can also
/// accept a few that `verify_strict` refuses (a small-order or mixed-order `R`), but only
/// ones made by whoever holds the signing key: the peer itself, about its own units, which
/// this server never hands on to another. A weak (small-order) key is never batched.
pub fn verify_all_for_peer<'a>(envs: &[SignedUnit], current: &'a [PublicKey], retired: &'a [(PublicKey, u64)]) -> Vec<Result<Unit, VerifyError>> {
    /// A key the peer may sign with: its id, whether it is weak (never batched), and the
    /// end of its validity if it is retired.
    struct Named<'a> {
        id: String,
        key: &'a PublicKey,
        weak: bool,
        until_ms: Option<u64>,
    }
    let named = |k: &'a PublicKey, until_ms| Named { id: k.key_id(), key: k, weak: k.0.is_weak(), until_ms };
    let keys: Vec<Named> = current.iter().map(|k| named(k, None)).chain(retired.iter().map(|(k, until)| named(k, Some(*until)))).collect();
    // Per envelope: the key it names (current keys first) and its signature.
    let found: Vec<Result<(&Named, Signature), VerifyError>> = envs
        .iter()
        .map(|env| {
            let key = keys.iter().find(|k| k.id == env.key).ok_or_else(|| VerifyError::UnknownKey(env.key.clone()))?;
            let sig = Signature::from_slice(&env.sig).map_err(|_| VerifyError::BadSignature)?;
            Ok((key, sig))
        })
        .collect();
    let batched: Vec<(usize, &Named, Signature)> =
        found.iter().enumerate().filter_map(|(i, f)| f.as_ref().ok().filter(|(k, _)| !k.weak).map(|(k, s)| (i, *k, *s))).collect();
    let batch_verified = batched.len() > 1 && {
        let signed: Vec<Vec<u8>> = batched.iter().map(|(i, _, _)| SignedUnit::signed_bytes(&envs[*i].unit)).collect();
        let messages: Vec<&[u8]> = signed.iter().map(Vec::as_slice).collect();
        let sigs: Vec<Signature> = batched.iter().map(|(_, _, s)| *s).collect();
        let vks: Vec<ed25519_dalek::VerifyingKey> = batched.iter().map(|(_, k, _)| k.key.0).collect();
        ed25519_dalek::verify_batch(&messages, &sigs, &vks).is_ok()
    };
    envs.iter()
        .zip(found)
        .map(|(env, found)| {
            let (key, _) = found?;
            let unit = if batch_verified && !key.weak { open_trusted(env)? } else { verify(env, std::slice::from_ref(key.key))? };
            match key.until_ms {
                None => Ok(unit),
                Some(until_ms) => signed_while_valid(env, unit, until_ms),
            }
        })
        .collect()
}

/// Decodes a unit from an envelope this server stored itself (already verified).
pub fn open_trusted(env: &SignedUnit) -> Result<Unit, VerifyError> {
    codec::decode(&env.unit).map_err(|e| VerifyError::BadUnit(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use missive_spec::{Content, ConversationId, Deps, Message, ServerName, UserId};

    fn unit() -> Unit {
        let a = UserId::parse("@a:alpha.test").unwrap();
        let b = UserId::parse("@b:beta.test").unwrap();
        let origin = ServerName::parse("alpha.test").unwrap();
        let mut deps = Deps::new();
        deps.set(origin.clone(), 1);
        Unit::Message(Message {
            to: b.clone(),
            ts: 1,
            seq: 1,
            conv: ConversationId::one_to_one(&a, &b),
            deps,
            from: a,
            origin,
            content: Content::text("hi"),
        })
    }

    #[test]
    fn verifies_only_untouched_units_under_the_named_key() {
        let k = ServerKey::generate();
        let other = ServerKey::generate();
        let env = sign(&k, &unit());
        assert_eq!(verify(&env, &[other.public(), k.public()]).unwrap(), unit());
        assert_eq!(verify(&env, &[other.public()]), Err(VerifyError::UnknownKey(env.key.clone())));
        for i in 0..env.unit.len() {
            let mut bad = env.clone();
            bad.unit[i] ^= 0x01;
            assert_eq!(verify(&bad, &[k.public()]), Err(VerifyError::BadSignature), "tampered byte {i} accepted");
        }
        let mut forged = sign(&other, &unit());
        forged.key = k.public().key_id();
        assert_eq!(verify(&forged, &[k.public()]), Err(VerifyError::BadSignature));
        let mut short = env.clone();
        short.sig.truncate(10);
        assert_eq!(verify(&short, &[k.public()]), Err(VerifyError::BadSignature));
    }

    #[test]
    fn a_retired_key_verifies_only_messages_claimed_before_its_end() {
        let (old, new) = (ServerKey::generate(), ServerKey::generate());
        let at = |ts| match unit() {
            Unit::Message(m) => Unit::Message(Message { ts, ..m }),
            u => u,
        };
        let retired = [(old.public(), 1_000)];
        assert_eq!(verify_for_peer(&sign(&old, &at(1_000)), &[new.public()], &retired).unwrap(), at(1_000));
        let late = sign(&old, &at(1_001));
        assert_eq!(verify_for_peer(&late, &[new.public()], &retired).unwrap_err().result(), UnitResult::UnknownKey);
        assert_eq!(verify_for_peer(&sign(&new, &at(5_000)), &[new.public()], &retired).unwrap(), at(5_000));
        let receipt = Unit::Receipt(missive_spec::Receipt {
            conv: ConversationId::one_to_one(&UserId::parse("@a:alpha.test").unwrap(), &UserId::parse("@b:beta.test").unwrap()),
            kind: missive_spec::ReceiptKind::Read,
            peer: UserId::parse("@b:beta.test").unwrap(),
            user: UserId::parse("@a:alpha.test").unwrap(),
            up_to: missive_spec::Watermark(missive_spec::OrderKey { rank: 1, origin: ServerName::parse("alpha.test").unwrap(), seq: 1 }),
        });
        assert!(matches!(verify_for_peer(&sign(&old, &receipt), &[new.public()], &retired), Err(VerifyError::KeyRetired { .. })));
        assert!(verify_for_peer(&sign(&new, &receipt), &[new.public()], &retired).is_ok());
    }

    #[test]
    fn a_transaction_verified_together_gets_the_results_of_each_verified_alone() {
        let (old, new, stranger) = (ServerKey::generate(), ServerKey::generate(), ServerKey::generate());
        let at = |ts| match unit() {
            Unit::Message(m) => Unit::Message(Message { ts, ..m }),
            u => u,
        };
        let retired = [(old.public(), 1_000)];
        let current = [new.public()];
        let good: Vec<SignedUnit> = (0..5).map(|i| sign(&new, &at(2_000 + i))).chain([sign(&old, &at(900))]).collect();
        let all = verify_all_for_peer(&good, &current, &retired);
        assert!(all.iter().all(Result::is_ok), "{all:?}");
        assert_eq!(all[5].as_ref().unwrap(), &at(900));
        let mut tampered = sign(&new, &at(3_000));
        tampered.unit[3] ^= 1;
        let mut short = sign(&new, &at(3_001));
        short.sig.truncate(10);
        let mut forged = sign(&stranger, &at(3_002));
        forged.key = new.public().key_id();
        let mixed = vec![
            good[0].clone(),
            tampered,
            good[1].clone(),
            sign(&stranger, &at(3_003)),
            short,
            sign(&old, &at(1_001)),
            forged,
            good[5].clone(),
            unsigned(&at(3_004)),
        ];
        let alone: Vec<_> = mixed.iter().map(|e| verify_for_peer(e, &current, &retired)).collect();
        assert_eq!(verify_all_for_peer(&mixed, &current, &retired), alone);
        let oks = alone.iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 3, "{alone:?}");
        // A batch that verifies, with units left out of it: no key, a short signature; and
        // a retired key's unit in it whose claimed time is past the key's end.
        let some = vec![good[0].clone(), sign(&stranger, &at(3_003)), good[1].clone(), sign(&old, &at(1_001)), good[5].clone()];
        let mut short = sign(&new, &at(3_005));
        short.sig.truncate(63);
        let some: Vec<SignedUnit> = some.into_iter().chain([short]).collect();
        let alone: Vec<_> = some.iter().map(|e| verify_for_peer(e, &current, &retired)).collect();
        assert_eq!(verify_all_for_peer(&some, &current, &retired), alone);
        assert_eq!(alone.iter().filter(|r| r.is_ok()).count(), 3, "{alone:?}");
        // One unit, and none: nothing to batch.
        assert_eq!(verify_all_for_peer(&good[..1], &current, &retired), vec![Ok(at(2_000))]);
        assert!(verify_all_for_peer(&[], &current, &retired).is_empty());
    }

    #[test]
    fn an_unsigned_envelope_opens_but_never_verifies() {
        let k = ServerKey::generate();
        let env = unsigned(&unit());
        assert_eq!(open_trusted(&env).unwrap(), unit());
        assert_eq!(verify(&env, &[k.public()]), Err(VerifyError::UnknownKey(String::new())));
    }
}
