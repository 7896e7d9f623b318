//! The server's key, checked as spec §5.1 asks of a client: the self-signed certificate
//! must carry exactly the expected ed25519 key (RFC 8410), and the TLS 1.3 handshake
//! signature must verify with that key. No certificate authority is consulted.

use std::sync::Mutex;

use ed25519_dalek::{Signature, VerifyingKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName as TlsName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

/// Which server key a connection accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// Exactly this key [CLI-TLS-1].
    Key(VerifyingKey),
    /// Whatever ed25519 key the server presents, to be recorded and pinned afterwards
    /// (first use, [CLI-TLS-2]).
    FirstUse,
}

impl From<VerifyingKey> for Pin {
    fn from(k: VerifyingKey) -> Pin {
        Pin::Key(k)
    }
}

/// Server keys reach the suite in the form the implementation file and the mock peer
/// use; only the 32 key bytes are taken from it.
impl From<missive_federation::PublicKey> for Pin {
    fn from(k: missive_federation::PublicKey) -> Pin {
        Pin::Key(k.0)
    }
}

/// An ed25519 SubjectPublicKeyInfo up to the key bytes (RFC 8410 §4):
/// `SEQUENCE(42) { SEQUENCE(5) { OID 1.3.101.112 }, BIT STRING(33) { 0 unused bits, key } }`.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// The ed25519 key a certificate's subject public key info holds; `None` for a malformed
/// certificate or a key of any other kind.
pub fn certificate_key(cert: &CertificateDer<'_>) -> Option<VerifyingKey> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = ee.subject_public_key_info();
    let key: [u8; 32] = spki.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..])?.try_into().ok()?;
    VerifyingKey::from_bytes(&key).ok()
}

/// A rustls server-certificate verifier for one connection: accepts the certificate only
/// if its key matches the pin, and remembers the key it was shown either way.
#[derive(Debug)]
pub struct ServerKeyCheck {
    pin: Pin,
    seen: Mutex<Option<VerifyingKey>>,
}

impl ServerKeyCheck {
    pub fn new(pin: Pin) -> ServerKeyCheck {
        ServerKeyCheck { pin, seen: Mutex::new(None) }
    }

    /// The key the server's certificate carried, matching the pin or not.
    pub fn seen(&self) -> Option<VerifyingKey> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ServerCertVerifier for ServerKeyCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &TlsName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let key = certificate_key(end_entity).ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
        match self.pin {
            Pin::Key(pinned) if pinned != key => Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        // QUIC runs only over TLS 1.3 (RFC 9001 §4.2).
        Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    /// `message` is the content TLS 1.3 signs (RFC 8446 §4.4.3); the certificate's key,
    /// which `verify_server_cert` matched against the pin, must have signed it.
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(Error::PeerMisbehaved(rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme));
        }
        let key = certificate_key(cert).ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let sig = Signature::from_slice(dss.signature()).map_err(|_| Error::InvalidCertificate(CertificateError::BadSignature))?;
        key.verify_strict(message, &sig).map_err(|_| Error::InvalidCertificate(CertificateError::BadSignature))?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use missive_federation::ServerKey;

    #[test]
    fn the_certificate_key_is_the_server_key() {
        let k = ServerKey::generate();
        let (cert, _) = missive_federation::tls::self_signed_cert(&k, "alpha.test").unwrap();
        assert_eq!(certificate_key(&cert), Some(k.public().0));
        assert_eq!(certificate_key(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])), None);
    }

    #[test]
    fn a_different_key_is_refused_and_remembered() {
        let (k, other) = (ServerKey::generate(), ServerKey::generate());
        let (cert, _) = missive_federation::tls::self_signed_cert(&k, "alpha.test").unwrap();
        let name = TlsName::try_from("alpha.test").unwrap();
        let check = ServerKeyCheck::new(other.public().into());
        assert!(check.verify_server_cert(&cert, &[], &name, &[], UnixTime::now()).is_err());
        assert_eq!(check.seen(), Some(k.public().0));
        for pin in [Pin::from(k.public()), Pin::FirstUse] {
            assert!(ServerKeyCheck::new(pin).verify_server_cert(&cert, &[], &name, &[], UnixTime::now()).is_ok());
        }
    }
}
