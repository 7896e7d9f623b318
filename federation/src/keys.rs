//! Server signing keys (ed25519): generation and the on-disk PKCS#8 PEM form. The textual
//! public key that other servers and clients pin (`ed25519:` + unpadded base64url) is
//! `missive_transport::key`, re-exported here.
//!
//! The key file is PKCS#8 v1 (RFC 5958 `OneAsymmetricKey` version 0, RFC 8410): a
//! `-----BEGIN PRIVATE KEY-----` PEM holding the 32-byte seed and no public key, the form
//! OpenSSL 3 (`openssl pkey`), Python's `cryptography` and Go's `x509.ParsePKCS8PrivateKey`
//! read. Files written earlier as v2 (with the public key) still load.

use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};
use ed25519_dalek::SigningKey;

pub use missive_transport::key::{PublicKey, PublicKeyError, ED25519_SPKI_PREFIX};
use missive_spec::rotation::{RotationStatement, SignedRotation};

/// A server's rotation chain on disk (F2.7): beside the key file, `KEY_FILE.rotations`,
/// one statement per line as `STATEMENT_HEX SIGNATURE_HEX`, oldest first. No file: the key
/// was never rotated.
pub struct RotationChain;

impl RotationChain {
    pub fn path(key_file: &Path) -> std::path::PathBuf {
        let mut p = key_file.as_os_str().to_owned();
        p.push(".rotations");
        p.into()
    }

    pub fn load(key_file: &Path) -> Result<Vec<SignedRotation>, KeyError> {
        let path = Self::path(key_file);
        let p = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(KeyError::Read { path: p, source }),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let bad = || KeyError::Format { path: p.clone(), reason: format!("not a rotation line: {l:?}") };
                let (st, sig) = l.trim().split_once(' ').ok_or_else(bad)?;
                let s = SignedRotation { statement: hex::decode(st).map_err(|_| bad())?, sig: hex::decode(sig).map_err(|_| bad())? };
                missive_transport::rotation::open(&s).map_err(|e| KeyError::Format { path: p.clone(), reason: e.to_string() })?;
                Ok(s)
            })
            .collect()
    }

    /// Appends a statement, synced.
    pub fn append(key_file: &Path, s: &SignedRotation) -> Result<(), KeyError> {
        use std::io::Write;
        let path = Self::path(key_file);
        let p = path.display().to_string();
        let mut opts = std::fs::OpenOptions::new();
        opts.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&path).map_err(|source| KeyError::Write { path: p.clone(), source })?;
        writeln!(f, "{} {}", hex::encode(&s.statement), hex::encode(&s.sig))
            .and_then(|_| f.sync_all())
            .map_err(|source| KeyError::Write { path: p, source })
    }

    /// The keys the chain retired, each with the end of its validity.
    pub fn retired(chain: &[SignedRotation]) -> Vec<(PublicKey, u64)> {
        chain.iter().filter_map(|s| missive_transport::rotation::open(s).ok()).map(|(st, old, _)| (old, st.valid_until_ms)).collect()
    }
}

/// Why a key could not be loaded or parsed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    // The cause is the error's source: printing it here too would say it twice in a chain.
    #[error("cannot read key file {path}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write key file {path}")]
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

    /// Writes the key as PKCS#8 v1 PEM (seed only, see the module notes), readable only by
    /// its owner, refusing to overwrite.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        let p = path.display().to_string();
        // `SigningKey`'s own encoding is v2, with the public key, which OpenSSL 3 refuses.
        let seed_only = KeypairBytes { secret_key: self.signing.to_bytes(), public_key: None };
        let pem = seed_only
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

    /// Hands over from this key to `new` (F2.7): a rotation statement signed by this key,
    /// `new` alone signing from `valid_until_ms` on.
    pub fn hand_over(&self, new: &PublicKey, server: &missive_spec::ServerName, valid_until_ms: u64) -> SignedRotation {
        use ed25519_dalek::Signer;
        let st = RotationStatement { new: new.to_text(), old: self.public().to_text(), server: server.clone(), valid_until_ms };
        let statement = missive_spec::codec::encode(&st);
        let sig = self.signing.sign(&SignedRotation::signed_bytes(&statement)).to_bytes().to_vec();
        SignedRotation { sig, statement }
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
    fn a_rotation_chain_is_followed_only_along_signatures_of_the_replaced_keys() {
        use missive_transport::rotation::{follow, RotationError};
        let name = missive_spec::ServerName::parse("alpha.test").unwrap();
        let (k1, k2, k3) = (ServerKey::generate(), ServerKey::generate(), ServerKey::generate());
        let s1 = k1.hand_over(&k2.public(), &name, 100);
        let s2 = k2.hand_over(&k3.public(), &name, 200);
        let chain = vec![s1.clone(), s2.clone()];
        assert_eq!(follow(&name, &k1.public(), &k3.public(), &chain).unwrap(), vec![(k1.public(), 100), (k2.public(), 200)]);
        assert_eq!(follow(&name, &k2.public(), &k3.public(), &chain).unwrap(), vec![(k2.public(), 200)]);
        assert!(matches!(follow(&name, &k1.public(), &k3.public(), std::slice::from_ref(&s2)), Err(RotationError::NoPath { .. })));
        let other = missive_spec::ServerName::parse("beta.test").unwrap();
        assert!(follow(&other, &k1.public(), &k2.public(), std::slice::from_ref(&s1)).is_err(), "a chain of another server");
        // A statement naming k1 as the old key but signed by someone else.
        let forged = missive_spec::rotation::SignedRotation { sig: k3.hand_over(&k3.public(), &name, 1).sig, statement: s1.statement.clone() };
        assert!(matches!(follow(&name, &k1.public(), &k2.public(), &[forged]), Err(RotationError::Bad(_))));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        assert!(RotationChain::load(&path).unwrap().is_empty());
        RotationChain::append(&path, &s1).unwrap();
        RotationChain::append(&path, &s2).unwrap();
        assert_eq!(RotationChain::load(&path).unwrap(), chain);
        assert_eq!(RotationChain::retired(&chain), vec![(k1.public(), 100), (k2.public(), 200)]);
    }

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

    #[test]
    fn the_key_file_is_pkcs8_v1_and_old_v2_files_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let k = ServerKey::generate();
        k.save_new(&path).unwrap();
        let pem = std::fs::read_to_string(&path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        let der = pem_der(&pem);
        // SEQUENCE { INTEGER 0 (v1), AlgorithmIdentifier { 1.3.101.112 }, OCTET STRING { seed } }.
        assert_eq!(der.len(), 48, "a v1 ed25519 key is 48 bytes of DER");
        assert_eq!(&der[..16], &[0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20]);
        assert_eq!(&der[16..], k.signing_key().to_bytes().as_slice());
        // A v2 file, as earlier versions wrote it.
        let v2 = dir.path().join("old.key");
        std::fs::write(&v2, k.signing_key().to_pkcs8_pem(Default::default()).unwrap().as_bytes()).unwrap();
        assert_eq!(ServerKey::load(&v2).unwrap().public(), k.public());
    }

    #[test]
    fn io_errors_are_said_once_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = ServerKey::load(dir.path()).err().expect("a directory is not a key file");
        let mut chain = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            chain.push_str(&format!(": {c}"));
            cause = c.source();
        }
        assert!(chain.contains(&dir.path().display().to_string()), "{chain}");
        assert_eq!(chain.matches("os error").count(), 1, "{chain}");
    }

    /// The DER inside a one-block PEM.
    fn pem_der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }

    /// OpenSSL reads the key file (OpenSSL 3 refuses PKCS#8 v2 ed25519 keys).
    #[test]
    fn openssl_reads_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let k = ServerKey::generate();
        k.save_new(&path).unwrap();
        let out = match std::process::Command::new("openssl").args(["pkey", "-in"]).arg(&path).args(["-pubout", "-outform", "DER"]).output() {
            Ok(out) => out,
            Err(e) => {
                println!("skipped: openssl cannot be run here ({e})");
                return;
            }
        };
        assert!(out.status.success(), "openssl pkey failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, k.public().spki_der(), "openssl derived another public key");
    }
}
