//! The server's side of Missive's TLS identity: a self-signed X.509 certificate over the
//! ed25519 server key, the QUIC server configurations that present it (to clients, and to
//! federation peers, whose certificate is required in turn), the federation client
//! configuration that presents it, and the endpoint whose stateless resets survive a
//! restart.
//!
//! Checking the other end by its key (pins, verifiers, flow-control windows, the client
//! configuration) lives in `missive_transport::tls`, which a client can link without a
//! certificate generator; it is re-exported here under the same names.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub use missive_transport::tls::{
    cert_public_key, client_config, install_provider, peer_identity, provider, quic_client_config, transport_config,
    Ed25519ClientVerifier, Flow, Pin, PinnedServerVerifier, TlsConfigError, CLIENT_API_FLOW, FEDERATION_FLOW,
    FEDERATION_PEER_STREAMS, SERVER_FLOW,
};

use crate::keys::ServerKey;

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

impl From<TlsConfigError> for TlsSetupError {
    fn from(e: TlsConfigError) -> TlsSetupError {
        match e {
            TlsConfigError::Rustls(e) => TlsSetupError::Rustls(e),
            TlsConfigError::Quic(e) => TlsSetupError::Quic(e),
        }
    }
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

fn quic_server(
    key: &ServerKey,
    server_name: &str,
    alpn: &[u8],
    transport: Arc<quinn::TransportConfig>,
    client_auth: bool,
) -> Result<quinn::ServerConfig, TlsSetupError> {
    let (cert, der) = self_signed_cert(key, server_name)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = if client_auth {
        builder.with_client_cert_verifier(Ed25519ClientVerifier::new())
    } else {
        builder.with_no_client_auth()
    };
    let mut tls = builder.with_single_cert(vec![cert], der)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsSetupError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// QUIC server configuration presenting the server's certificate under `alpn`.
pub fn server_config(key: &ServerKey, server_name: &str, alpn: &[u8], idle: Duration) -> Result<quinn::ServerConfig, TlsSetupError> {
    quic_server(key, server_name, alpn, transport_config(idle, None, CLIENT_API_FLOW), false)
}

/// QUIC server configuration for federation: presents the server's certificate and
/// requires one from the peer.
/// A federation link with no packet from the other side for this long is dead: both ends
/// send keep-alives every [`FEDERATION_KEEP_ALIVE`], so a peer that died (or whose network
/// went away) shows as down within seconds, not at the next transaction's timeout.
pub const FEDERATION_IDLE: Duration = Duration::from_secs(4);
pub const FEDERATION_KEEP_ALIVE: Duration = Duration::from_secs(1);

pub fn federation_server_config(key: &ServerKey, server_name: &str, alpn: &[u8]) -> Result<quinn::ServerConfig, TlsSetupError> {
    quic_server(key, server_name, alpn, transport_config(FEDERATION_IDLE, Some(FEDERATION_KEEP_ALIVE), FEDERATION_FLOW), true)
}

/// QUIC client configuration for federation: checks the peer against `verifier` and
/// presents this server's own certificate.
pub fn federation_client_config(
    verifier: Arc<PinnedServerVerifier>,
    key: &ServerKey,
    server_name: &str,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsSetupError> {
    let identity = self_signed_cert(key, server_name)?;
    Ok(quic_client_config(verifier, Some(identity), alpn, FEDERATION_IDLE, FEDERATION_KEEP_ALIVE)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PublicKey;

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
        let sc = federation_server_config(&b, "beta.test", alpn).unwrap();
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
