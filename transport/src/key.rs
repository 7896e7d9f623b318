//! The textual public key that servers present and clients and peers pin:
//! `ed25519:` + unpadded base64url of the 32 key bytes.

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};

/// A public key text that is not `ed25519:` + 43 characters of base64url of a valid key.
#[derive(Debug, thiserror::Error)]
#[error("public key {0:?} is not of the form ed25519:<43 characters of base64url>")]
pub struct PublicKeyError(pub String);

/// A server's public key, as pinned by peers and clients.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub VerifyingKey);

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): the 32 key bytes follow.
pub const ED25519_SPKI_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

impl PublicKey {
    pub fn parse(s: &str) -> Result<PublicKey, PublicKeyError> {
        let err = || PublicKeyError(s.to_owned());
        let b64 = s.strip_prefix("ed25519:").ok_or_else(err)?;
        let bytes = URL_SAFE_NO_PAD.decode(b64).map_err(|_| err())?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| err())?;
        VerifyingKey::from_bytes(&arr).map(PublicKey).map_err(|_| err())
    }

    pub fn to_text(&self) -> String {
        format!("ed25519:{}", URL_SAFE_NO_PAD.encode(self.0.as_bytes()))
    }

    /// `SHA256:` + base64 of the SHA-256 of the key bytes, for people to compare.
    pub fn fingerprint(&self) -> String {
        format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(self.0.as_bytes())))
    }

    /// The key id units name (F§2): the first 8 bytes of SHA-256 of the key, base64url.
    pub fn key_id(&self) -> String {
        URL_SAFE_NO_PAD.encode(&Sha256::digest(self.0.as_bytes())[..8])
    }

    /// The DER SubjectPublicKeyInfo a certificate over this key carries.
    pub fn spki_der(&self) -> Vec<u8> {
        let mut out = ED25519_SPKI_PREFIX.to_vec();
        out.extend_from_slice(self.0.as_bytes());
        out
    }

    /// The key inside a DER SubjectPublicKeyInfo, if it is an ed25519 one.
    pub fn from_spki_der(spki: &[u8]) -> Option<PublicKey> {
        let key = spki.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
        let arr: [u8; 32] = key.try_into().ok()?;
        VerifyingKey::from_bytes(&arr).ok().map(PublicKey)
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_spki_roundtrip() {
        // RFC 8032 test 1 public key.
        let bytes: [u8; 32] = [
            0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64, 0x07, 0x3a, 0x0e, 0xe1,
            0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68, 0xf7, 0x07, 0x51, 0x1a,
        ];
        let k = PublicKey(VerifyingKey::from_bytes(&bytes).unwrap());
        assert_eq!(PublicKey::parse(&k.to_text()).unwrap(), k);
        assert_eq!(PublicKey::from_spki_der(&k.spki_der()), Some(k));
        assert!(PublicKey::parse("ed25519:short").is_err());
        assert!(PublicKey::parse(&k.to_text().replace("ed25519:", "rsa:")).is_err());
        assert_eq!(PublicKey::from_spki_der(&k.spki_der()[1..]), None);
    }
}
