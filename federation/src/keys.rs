//! Server signing keys (ed25519): generation and the on-disk PKCS#8 PEM form. The textual
//! public key that other servers and clients pin (`ed25519:` + unpadded base64url) is
//! `missive_transport::key`, re-exported here.

use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;

pub use missive_transport::key::{PublicKey, PublicKeyError, ED25519_SPKI_PREFIX};

/// Why a key could not be loaded or parsed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write key file {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("key file {path} is not an ed25519 PKCS#8 PEM private key: {reason}")]
    Format { path: String, reason: String },
    #[error(transparent)]
    PublicKey(#[from] PublicKeyError),
}

/// A server's ed25519 signing key.
pub struct ServerKey {
    signing: SigningKey,
}

impl ServerKey {
    pub fn generate() -> ServerKey {
        ServerKey { signing: SigningKey::generate(&mut rand::rngs::OsRng) }
    }

    pub fn from_signing_key(signing: SigningKey) -> ServerKey {
        ServerKey { signing }
    }

    pub fn load(path: &Path) -> Result<ServerKey, KeyError> {
        let p = path.display().to_string();
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: p.clone(), source })?;
        let signing = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| KeyError::Format { path: p, reason: e.to_string() })?;
        Ok(ServerKey { signing })
    }

    /// Writes the key as PKCS#8 PEM, readable only by its owner, refusing to overwrite.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        let p = path.display().to_string();
        let pem = self
            .signing
            .to_pkcs8_pem(Default::default())
            .map_err(|e| KeyError::Format { path: p.clone(), reason: e.to_string() })?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path).map_err(|source| KeyError::Write { path: p.clone(), source })?;
        f.write_all(pem.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|source| KeyError::Write { path: p, source })
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key())
    }

    /// PKCS#8 DER of the private key, for building the TLS certificate.
    pub fn pkcs8_der(&self) -> Vec<u8> {
        // Encoding a valid in-memory ed25519 key cannot fail.
        self.signing.to_pkcs8_der().expect("PKCS#8 encoding").as_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_text_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let k = ServerKey::generate();
        k.save_new(&path).unwrap();
        assert!(k.save_new(&path).is_err(), "must not overwrite an existing key");
        let again = ServerKey::load(&path).unwrap();
        assert_eq!(k.public(), again.public());
        let text = k.public().to_text();
        assert_eq!(PublicKey::parse(&text).unwrap(), k.public());
        assert!(PublicKey::parse("ed25519:short").is_err());
        assert_eq!(PublicKey::from_spki_der(&k.public().spki_der()), Some(k.public()));
    }
}
