//! TLS identity for Missive's QUIC links.
//!
//! A homeserver presents a self-signed X.509 certificate over its ed25519 server key. The
//! other end does not consult any certificate authority: it checks that the certificate
//! carries exactly the key it expects for that server (SPKI pinning) and still verifies
//! the TLS 1.3 handshake signature with the certificate's key. Clients that have not met a
//! server yet record the key they saw (trust on first use) and pin it from then on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName as TlsName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::keys::{PublicKey, ServerKey};

/// Why a TLS or QUIC configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot build certificate: {0}")]
    Certificate(#[from] rcgen::Error),
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

/// A self-signed certificate over the server key, naming the server.
pub fn self_signed_cert(
    key: &ServerKey,
    server_name: &str,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsSetupError> {
    let der = PrivatePkcs8KeyDer::from(key.pkcs8_der());
    let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)?;
    let params = rcgen::CertificateParams::new(vec![server_name.to_owned()])?;
    let cert = params.self_signed(&kp)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
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
struct Flow {
    streams: u32,
    stream_window: u32,
    window: u32,
}

/// A client of the client API: requests are at most 64 KiB (§5.2).
const CLIENT_API_FLOW: Flow = Flow { streams: 256, stream_window: 128 * 1024, window: 1024 * 1024 };
/// A federation peer: no streams until it is authenticated (then
/// [`FEDERATION_PEER_STREAMS`]); a frame is at most 4 MiB (F3.3).
const FEDERATION_FLOW: Flow = Flow { streams: 0, stream_window: 4 * 1024 * 1024 + 64 * 1024, window: 8 * 1024 * 1024 };
/// The server at the other end of a connection we opened: it answers, it opens nothing.
const SERVER_FLOW: Flow = Flow { streams: 0, stream_window: 4 * 1024 * 1024 + 64 * 1024, window: 16 * 1024 * 1024 };
/// Streams an authenticated federation peer may have open at once.
pub const FEDERATION_PEER_STREAMS: u32 = 64;

fn transport(idle: Duration, keep_alive: Option<Duration>, flow: Flow) -> Arc<quinn::TransportConfig> {
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

fn quic_server(
    key: &ServerKey,
    server_name: &str,
    alpn: &[u8],
    transport_config: Arc<quinn::TransportConfig>,
    client_auth: bool,
) -> Result<quinn::ServerConfig, TlsSetupError> {
    let (cert, der) = self_signed_cert(key, server_name)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = if client_auth {
        builder.with_client_cert_verifier(Arc::new(Ed25519ClientVerifier { provider: provider() }))
    } else {
        builder.with_no_client_auth()
    };
    let mut tls = builder.with_single_cert(vec![cert], der)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsSetupError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport_config);
    Ok(cfg)
}

fn quic_client(
    verifier: Arc<PinnedServerVerifier>,
    identity: Option<(&ServerKey, &str)>,
    alpn: &[u8],
    idle: Duration,
    keep_alive: Duration,
) -> Result<quinn::ClientConfig, TlsSetupError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match identity {
        Some((key, name)) => {
            let (cert, der) = self_signed_cert(key, name)?;
            builder.with_client_auth_cert(vec![cert], der)?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsSetupError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport(idle, Some(keep_alive), SERVER_FLOW));
    Ok(cfg)
}

/// QUIC server configuration presenting the server's certificate under `alpn`.
pub fn server_config(key: &ServerKey, server_name: &str, alpn: &[u8], idle: Duration) -> Result<quinn::ServerConfig, TlsSetupError> {
    quic_server(key, server_name, alpn, transport(idle, None, CLIENT_API_FLOW), false)
}

/// QUIC server configuration for federation: presents the server's certificate and
/// requires one from the peer.
pub fn federation_server_config(key: &ServerKey, server_name: &str, alpn: &[u8], idle: Duration) -> Result<quinn::ServerConfig, TlsSetupError> {
    quic_server(key, server_name, alpn, transport(idle, Some(Duration::from_secs(5)), FEDERATION_FLOW), true)
}

/// QUIC client configuration for federation: checks the peer against `verifier` and
/// presents this server's own certificate.
pub fn federation_client_config(
    verifier: Arc<PinnedServerVerifier>,
    key: &ServerKey,
    server_name: &str,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsSetupError> {
    quic_client(verifier, Some((key, server_name)), alpn, Duration::from_secs(30), Duration::from_secs(5))
}

/// Binds a QUIC endpoint whose stateless-reset key is derived from the server key and
/// `purpose`. A restarted server can then reset connections its previous run held, so
/// peers and clients notice at once instead of waiting for an idle timeout.
pub fn bind_endpoint(
    addr: std::net::SocketAddr,
    server: quinn::ServerConfig,
    key: &ServerKey,
    purpose: &[u8],
) -> std::io::Result<quinn::Endpoint> {
    use sha2::{Digest, Sha256};
    let mut seed = Sha256::new();
    seed.update(b"missive/quic-stateless-reset/v1\0");
    seed.update(purpose);
    seed.update(key.signing_key().to_bytes());
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed.finalize());
    let socket = std::net::UdpSocket::bind(addr)?;
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::new(Arc::new(reset)), Some(server), socket, runtime)
}

/// QUIC client configuration that checks the server against `verifier`. A client notices
/// a vanished server within 10 s (keep-alives every 3 s), so it can reconnect.
pub fn client_config(verifier: Arc<PinnedServerVerifier>, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsSetupError> {
    quic_client(verifier, None, alpn, Duration::from_secs(10), Duration::from_secs(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_server_key() {
        let k = ServerKey::generate();
        let (cert, _) = self_signed_cert(&k, "alpha.test").unwrap();
        assert_eq!(cert_public_key(&cert), Some(k.public()));
    }

    async fn handshake(server_key: &ServerKey, pin: Pin) -> (Result<(), String>, Option<PublicKey>) {
        let alpn = b"missive-test";
        let sc = server_config(server_key, "alpha.test", alpn, Duration::from_secs(5)).unwrap();
        let server = quinn::Endpoint::server(sc, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            if let Some(inc) = server.accept().await {
                let _ = inc.await;
            }
        });
        let verifier = PinnedServerVerifier::new(pin);
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config(verifier.clone(), alpn).unwrap());
        let res = match client.connect(addr, "alpha.test").unwrap().await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        accept.abort();
        (res, verifier.seen())
    }

    #[tokio::test]
    async fn pinned_key_accepted_other_key_refused() {
        install_provider();
        let k = ServerKey::generate();
        let (ok, seen) = handshake(&k, Pin::Key(k.public())).await;
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(seen, Some(k.public()));

        let other = ServerKey::generate();
        let (refused, seen) = handshake(&k, Pin::Key(other.public())).await;
        assert!(refused.is_err(), "a server with another key must be refused");
        assert_eq!(seen, Some(k.public()));

        let (first, seen) = handshake(&k, Pin::FirstUse).await;
        assert!(first.is_ok(), "{first:?}");
        assert_eq!(seen, Some(k.public()));
    }

    #[tokio::test]
    async fn federation_links_authenticate_both_ends() {
        install_provider();
        let (a, b) = (ServerKey::generate(), ServerKey::generate());
        let alpn = b"missive-test-fed";
        let sc = federation_server_config(&b, "beta.test", alpn, Duration::from_secs(5)).unwrap();
        let server = quinn::Endpoint::server(sc, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move { server.accept().await.unwrap().await.unwrap() });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let v = PinnedServerVerifier::new(Pin::AnyOf(vec![ServerKey::generate().public(), b.public()]));
        client.set_default_client_config(federation_client_config(v, &a, "alpha.test", alpn).unwrap());
        let conn = client.connect(addr, "beta.test").unwrap().await.unwrap();
        let server_side = accept.await.unwrap();
        assert_eq!(peer_identity(&server_side), Some((a.public(), vec!["alpha.test".to_owned()])));
        assert_eq!(peer_identity(&conn).map(|p| p.0), Some(b.public()));
    }
}
