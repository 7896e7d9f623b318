//! End-to-end encryption (spec `e2ee.md`): device keys and one-time keys as the key
//! directory stores them, the encrypted message payload, device-list changes and the
//! safety number. The cryptography itself (Olm) is not here: this module fixes the bytes
//! that Missive adds around it, which every implementation must agree on.
//!
//! Field declaration order is deterministic-CBOR key order, as in `wire`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

use crate::ids::{ConversationId, DeviceId, UserId};
use crate::wire::Content;

/// Content type of an end-to-end encrypted message (E4).
pub const CONTENT_ENCRYPTED: &str = "encrypted";
/// The one algorithm of this version: Olm (version 1 sessions), one ciphertext per
/// recipient device (E4).
pub const ALG_OLM_V1: &str = "olm.v1";
/// Prefix of the bytes a device-keys signature covers (E2.1).
pub const DEVICE_KEYS_DOMAIN: &[u8] = b"missive/device-keys/v1\0";
/// Prefix of the bytes a one-time or fallback key signature covers (E2.2).
pub const ONE_TIME_KEY_DOMAIN: &[u8] = b"missive/one-time-key/v1\0";
/// Prefix of the bytes a safety number hashes (E6).
pub const SAFETY_NUMBER_DOMAIN: &[u8] = b"missive/safety-number/v1\0";
/// Most one-time keys a server keeps per device; an upload beyond is `invalid_request` (E3.1).
pub const MAX_ONE_TIME_KEYS: usize = 100;
/// Most devices with keys a user may have: `keys_query` and `keys_claim` answers are
/// bounded by it (E3).
pub const MAX_KEY_DEVICES: usize = 64;
/// Olm message types as carried in [`SealedFor::kind`] (E4).
pub const OLM_PRE_KEY: u8 = 0;
pub const OLM_NORMAL: u8 = 1;

/// A device's long-term public keys, signed by the device's own ed25519 key (E2.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceKeys {
    /// ed25519 signature over [`DeviceKeys::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
    pub user: UserId,
    pub device: DeviceId,
    /// The device's signing key (32 bytes).
    #[serde(with = "serde_bytes")]
    pub ed25519: Vec<u8>,
    /// The device's Olm identity key (32 bytes).
    #[serde(with = "serde_bytes")]
    pub curve25519: Vec<u8>,
}

#[derive(Serialize)]
struct DeviceKeysBody<'a> {
    user: &'a UserId,
    device: &'a DeviceId,
    #[serde(with = "serde_bytes")]
    ed25519: &'a [u8],
    #[serde(with = "serde_bytes")]
    curve25519: &'a [u8],
}

impl DeviceKeys {
    /// `DEVICE_KEYS_DOMAIN || CBOR({user, device, ed25519, curve25519})`.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let body = DeviceKeysBody { user: &self.user, device: &self.device, ed25519: &self.ed25519, curve25519: &self.curve25519 };
        let mut b = DEVICE_KEYS_DOMAIN.to_vec();
        b.extend_from_slice(&crate::codec::encode(&body));
        b
    }

    /// Sizes as E2.1 fixes them (the signature is checked by whoever holds a verifier).
    pub fn well_formed(&self) -> bool {
        self.sig.len() == 64 && self.ed25519.len() == 32 && self.curve25519.len() == 32
    }
}

/// A one-time key or a fallback key of a device, signed by the device (E2.2). `id` is the
/// device's own counter: every key it uploads has a higher id than the ones before.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OneTimeKey {
    pub id: u64,
    /// A curve25519 public key (32 bytes).
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// ed25519 signature of the device over [`OneTimeKey::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

#[derive(Serialize)]
struct OneTimeKeyBody<'a> {
    id: u64,
    #[serde(with = "serde_bytes")]
    key: &'a [u8],
    user: &'a UserId,
    device: &'a DeviceId,
    fallback: bool,
}

impl OneTimeKey {
    /// `ONE_TIME_KEY_DOMAIN || CBOR({id, key, user, device, fallback})`.
    pub fn signed_bytes(&self, user: &UserId, device: &DeviceId, fallback: bool) -> Vec<u8> {
        let body = OneTimeKeyBody { id: self.id, key: &self.key, user, device, fallback };
        let mut b = ONE_TIME_KEY_DOMAIN.to_vec();
        b.extend_from_slice(&crate::codec::encode(&body));
        b
    }

    pub fn well_formed(&self) -> bool {
        self.key.len() == 32 && self.sig.len() == 64
    }
}

/// One key handed out by `keys_claim` (E3.3): a one-time key, or the fallback key when the
/// device had none left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedKey {
    pub key: OneTimeKey,
    pub device: DeviceId,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallback: bool,
}

/// The body of a message of content type [`CONTENT_ENCRYPTED`] (E4): one Olm ciphertext
/// per recipient device, all of the same plaintext [`Sealed`]-inner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub to: Vec<SealedFor>,
    pub alg: String,
    /// The sending device.
    pub sender: DeviceId,
    /// The sending device's curve25519 identity key (32 bytes).
    #[serde(with = "serde_bytes")]
    pub sender_key: Vec<u8>,
}

/// The ciphertext for one device (E4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedFor {
    /// The Olm message.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// [`OLM_PRE_KEY`] or [`OLM_NORMAL`].
    #[serde(rename = "type")]
    pub kind: u8,
    pub user: UserId,
    pub device: DeviceId,
    /// The Olm session id.
    pub session: String,
}

/// What every ciphertext of a [`Sealed`] decrypts to (E4.2): the content, bound to the
/// conversation and the sender so that a server cannot replay it elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inner {
    pub conv: ConversationId,
    pub from: UserId,
    pub content: Content,
}

/// `user`'s devices or device keys changed (E5): the version counts the changes, so a
/// repeat changes nothing. An event (`devices`) and a federation unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceListChange {
    pub user: UserId,
    pub version: u64,
}

/// A user's devices as the safety number covers them: device id and ed25519 key.
pub type DeviceFingerprints<'a> = [(&'a DeviceId, &'a [u8])];

/// One user's half of a safety number: 30 digits (E6).
pub fn fingerprint_digits(user: &UserId, devices: &DeviceFingerprints<'_>) -> String {
    let mut sorted: Vec<(&DeviceId, &[u8])> = devices.to_vec();
    sorted.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    let list: Vec<(&str, &serde_bytes::Bytes)> = sorted.iter().map(|(d, k)| (d.as_str(), serde_bytes::Bytes::new(k))).collect();
    let mut h = Sha512::new();
    h.update(SAFETY_NUMBER_DOMAIN);
    h.update(crate::codec::encode(&(user.as_str(), list)));
    let digest = h.finalize();
    (0..6)
        .map(|i| {
            let chunk = &digest[5 * i..5 * i + 5];
            let n = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

/// The safety number of two users (E6): 60 digits in twelve groups of five, the half of
/// the user whose id sorts first bytewise first, so both users see the same number.
pub fn safety_number(a: (&UserId, &DeviceFingerprints<'_>), b: (&UserId, &DeviceFingerprints<'_>)) -> String {
    let (first, second) = if a.0.as_str() <= b.0.as_str() { (a, b) } else { (b, a) };
    let digits = fingerprint_digits(first.0, first.1) + &fingerprint_digits(second.0, second.1);
    digits.as_bytes().chunks(5).map(|c| std::str::from_utf8(c).unwrap_or("")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safety_numbers_are_symmetric_and_change_with_any_device() {
        let (a, b) = (UserId::parse("@alice:alpha.test").unwrap(), UserId::parse("@bob:beta.test").unwrap());
        let (d1, d2) = (DeviceId::parse("D1").unwrap(), DeviceId::parse("D2").unwrap());
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let alice: Vec<(&DeviceId, &[u8])> = vec![(&d1, &k1)];
        let bob: Vec<(&DeviceId, &[u8])> = vec![(&d2, &k2), (&d1, &k1)];
        let n = safety_number((&a, &alice), (&b, &bob));
        assert_eq!(n, safety_number((&b, &bob), (&a, &alice)));
        assert_eq!(n.len(), 60 + 11);
        let bob_reordered: Vec<(&DeviceId, &[u8])> = vec![(&d1, &k1), (&d2, &k2)];
        assert_eq!(n, safety_number((&a, &alice), (&b, &bob_reordered)), "device order must not matter");
        let other = [3u8; 32];
        let bob_changed: Vec<(&DeviceId, &[u8])> = vec![(&d1, &k1), (&d2, &other)];
        assert_ne!(n, safety_number((&a, &alice), (&b, &bob_changed)));
    }
}
