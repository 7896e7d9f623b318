//! Checking the other end of a QUIC link by its key, and the settings of such links.
//!
//! A homeserver presents a self-signed X.509 certificate over its ed25519 server key. The
//! other end does not consult any certificate authority: it checks that the certificate
//! carries exactly the key it expects for that server (SPKI pinning) and still verifies
//! the TLS 1.3 handshake signature with the certificate's key. Clients that have not met a
//! server yet record the key they saw (trust on first use) and pin it from then on.
//!
//! Making certificates is the server's business (`missive_federation::tls`); this module
//! only reads them, so a client links no certificate generator.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName as TlsName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::key::PublicKey;

/// Why a TLS or QUIC configuration could not be built from a certificate already made.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// The one crypto provider Missive uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider; harmless if already installed.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The ed25519 key a certificate carries, if it is a well-formed certificate over one.
pub fn cert_public_key(cert: &CertificateDer<'_>) -> Option<PublicKey> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    PublicKey::from_spki_der(ee.subject_public_key_info().as_ref())
}

/// What a client accepts from the server it connects to.
#[derive(Debug, Clone)]
pub enum Pin {
    /// Exactly this key.
    Key(PublicKey),
    /// Any one of these keys (a server during key rotation).
    AnyOf(Vec<PublicKey>),
    /// Any ed25519 key (first contact): the caller reads the seen key afterwards and pins it.
    FirstUse,
}

impl Pin {
    fn accepts(&self, key: &PublicKey) -> bool {
        match self {
            Pin::Key(k) => k == key,
            Pin::AnyOf(ks) => ks.contains(key),
            Pin::FirstUse => true,
        }
    }
}

/// Verifies a server certificate against a pinned key, and remembers the key it was shown.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    pin: Pin,
    seen: Mutex<Option<PublicKey>>,
    provider: Arc<CryptoProvider>,
}

impl PinnedServerVerifier {
    pub fn new(pin: Pin) -> Arc<PinnedServerVerifier> {
        Arc::new(PinnedServerVerifier { pin, seen: Mutex::new(None), provider: provider() })
    }
    /// The key the server presented in the last handshake, matching the pin or not.
    pub fn seen(&self) -> Option<PublicKey> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &TlsName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let key = cert_public_key(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
        if self.pin.accepts(&key) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Requires a client certificate over an ed25519 key and verifies the handshake signature
/// with it. Which keys are acceptable depends on the server name the peer claims, which
/// needs discovery: the federation endpoint checks that after the handshake
/// ([`peer_identity`]) and closes the connection before reading any request.
#[derive(Debug)]
pub struct Ed25519ClientVerifier {
    provider: Arc<CryptoProvider>,
}

impl Ed25519ClientVerifier {
    pub fn new() -> Arc<Ed25519ClientVerifier> {
        Arc::new(Ed25519ClientVerifier { provider: provider() })
    }
}

impl ClientCertVerifier for Ed25519ClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        cert_public_key(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The key and the DNS names of the certificate a QUIC peer presented.
pub fn peer_identity(conn: &quinn::Connection) -> Option<(PublicKey, Vec<String>)> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let cert = certs.first()?;
    let key = cert_public_key(cert)?;
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let names = ee.valid_dns_names().map(str::to_owned).collect();
    Some((key, names))
}

/// What a peer may have in flight on one connection: the streams it may open, and the
/// bytes we buffer for it per stream and per connection before it must wait for us to
/// read. quinn's defaults buffer without a connection limit; a server must not.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub streams: u32,
    pub stream_window: u32,
    pub window: u32,
}

/// A client of the client API: requests are at most 64 KiB (§5.2). quinn keeps state for
/// every stream a peer may open from the handshake on: 256 streams cost an idle device
/// 16 KiB more than 64 do, which a device with a subscription and a few requests in
/// flight never needs.
pub const CLIENT_API_FLOW: Flow = Flow { streams: 64, stream_window: 128 * 1024, window: 1024 * 1024 };
/// A federation peer: no streams until it is authenticated (then
/// [`FEDERATION_PEER_STREAMS`]); a frame is at most 4 MiB (F3.3).
pub const FEDERATION_FLOW: Flow = Flow { streams: 0, stream_window: 4 * 1024 * 1024 + 64 * 1024, window: 8 * 1024 * 1024 };
/// The server at the other end of a connection we opened: it answers, it opens nothing.
pub const SERVER_FLOW: Flow = Flow { streams: 0, stream_window: 4 * 1024 * 1024 + 64 * 1024, window: 16 * 1024 * 1024 };
/// Streams an authenticated federation peer may have open at once.
pub const FEDERATION_PEER_STREAMS: u32 = 64;

/// QUIC transport settings: idle timeout, keep-alives, and what the peer may have in flight.
pub fn transport_config(idle: Duration, keep_alive: Option<Duration>, flow: Flow) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // The idle timeout is well within quinn's VarInt range.
    t.max_idle_timeout(Some(idle.try_into().expect("idle timeout in range")));
    t.keep_alive_interval(keep_alive);
    t.max_concurrent_bidi_streams(flow.streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(flow.stream_window.into());
    t.receive_window(flow.window.into());
    Arc::new(t)
}

/// QUIC client configuration that checks the server against `verifier` and, when given a
/// certificate and its key (a server opening a federation link), presents it.
pub fn quic_client_config(
    verifier: Arc<PinnedServerVerifier>,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
    idle: Duration,
    keep_alive: Duration,
) -> Result<quinn::ClientConfig, TlsConfigError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match identity {
        Some((cert, der)) => builder.with_client_auth_cert(vec![cert], der)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsConfigError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport_config(idle, Some(keep_alive), SERVER_FLOW));
    Ok(cfg)
}

/// QUIC client configuration that checks the server against `verifier`. A client notices
/// a vanished server within 10 s (keep-alives every 3 s), so it can reconnect.
pub fn client_config(verifier: Arc<PinnedServerVerifier>, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsConfigError> {
    quic_client_config(verifier, None, alpn, Duration::from_secs(10), Duration::from_secs(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_accept_only_their_keys() {
        let key = |b: u8| PublicKey::from_spki_der(&[&crate::key::ED25519_SPKI_PREFIX[..], &[b; 32][..]].concat());
        // Not every 32-byte string is a point; find two that are.
        let mut keys = (0u8..=255).filter_map(key);
        let (a, b) = (keys.next().unwrap(), keys.next().unwrap());
        assert!(Pin::Key(a).accepts(&a));
        assert!(!Pin::Key(a).accepts(&b));
        assert!(Pin::AnyOf(vec![b, a]).accepts(&a));
        assert!(!Pin::AnyOf(vec![]).accepts(&a));
        assert!(Pin::FirstUse.accepts(&b));
    }

    #[test]
    fn a_non_certificate_carries_no_key() {
        assert_eq!(cert_public_key(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])), None);
    }
}
