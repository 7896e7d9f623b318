//! A local HTTPS server standing in for the web servers that publish key documents
//! (`/.well-known/missive/server`), with a certificate from a throwaway test CA that the
//! server under test is told to trust (`[federation] ca_file`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the server sends for one request.
pub enum Reply {
    /// `200` with this JSON body and its length.
    Doc(String),
    /// `404`, empty.
    NotFound,
    /// `200` with no declared length, then spaces as fast as the client takes them, until
    /// it goes away or a gibibyte has been sent.
    Endless,
}

pub struct Https {
    pub port: u16,
    /// The test CA's certificate (PEM).
    pub ca_pem: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    body_bytes: Arc<AtomicU64>,
}

impl Https {
    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    /// Complete request heads read so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    /// Body bytes written so far, all responses together.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes.load(Ordering::SeqCst)
    }
}

/// Starts the server on 127.0.0.1 with one certificate for all of `names` (wildcards such
/// as `*.evil.localhost` allowed); `reply` chooses the answer from the request's host and
/// path.
pub async fn start(names: Vec<String>, reply: impl Fn(&str, &str) -> Reply + Send + Sync + 'static) -> Https {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Missive test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(names).unwrap().signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key_der)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let https = Https {
        port,
        ca_pem: ca.pem(),
        connections: Arc::default(),
        requests: Arc::default(),
        body_bytes: Arc::default(),
    };
    let (connections, requests, body_bytes) = (https.connections.clone(), https.requests.clone(), https.body_bytes.clone());
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            connections.fetch_add(1, Ordering::SeqCst);
            let (acceptor, reply, requests, body_bytes) = (acceptor.clone(), reply.clone(), requests.clone(), body_bytes.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                requests.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&req);
                let host = text
                    .lines()
                    .find_map(|l| l.strip_prefix("host: ").or_else(|| l.strip_prefix("Host: ")))
                    .map(|h| h.split(':').next().unwrap_or_default().to_owned())
                    .unwrap_or_default();
                let path = text.strip_prefix("GET ").and_then(|r| r.split(' ').next()).unwrap_or_default();
                let head = |status: &str, length: Option<usize>| {
                    let length = length.map(|n| format!("content-length: {n}\r\n")).unwrap_or_default();
                    format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{length}connection: close\r\n\r\n")
                };
                match reply(&host, path) {
                    Reply::Doc(d) => {
                        let _ = tls.write_all(format!("{}{d}", head("200 OK", Some(d.len()))).as_bytes()).await;
                    }
                    Reply::NotFound => {
                        let _ = tls.write_all(head("404 Not Found", Some(0)).as_bytes()).await;
                    }
                    Reply::Endless => {
                        if tls.write_all(head("200 OK", None).as_bytes()).await.is_err() {
                            return;
                        }
                        let chunk = [b' '; 16 * 1024];
                        let mut sent = 0u64;
                        while sent < 1 << 30 {
                            if tls.write_all(&chunk).await.is_err() {
                                return;
                            }
                            sent += chunk.len() as u64;
                            body_bytes.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                        }
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    https
}
