//! Discovery against real local infrastructure: a DNS server (dnsmasq) for SRV and address
//! records, and an HTTPS server with a test CA for `.well-known` key documents. The
//! server under test is pointed at both by its config; nothing is mocked.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use missive_conformance::harness::{free_udp_port, ServerProcess};
use missive_conformance::mock_peer::MockPeer;
use missive_federation::{PublicKey, ServerKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn dnsmasq_bin() -> PathBuf {
    for p in ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("dnsmasq is not installed: run scripts/deps (it installs dnsmasq-base)");
}

/// A dnsmasq on 127.0.0.1 answering only the given records.
async fn start_dns(args: &[String]) -> (tokio::process::Child, SocketAddr) {
    let port = free_udp_port([127, 0, 0, 1].into()).unwrap();
    let child = tokio::process::Command::new(dnsmasq_bin())
        .args(["--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll"])
        .args(["--listen-address=127.0.0.1", "--bind-interfaces", "--user=root", "--pid-file="])
        .arg(format!("--port={port}"))
        .args(args)
        .kill_on_drop(true)
        .spawn()
        .expect("start dnsmasq");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // Ready once it answers a query for one of its names.
    eventually("dnsmasq to answer", || async {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
        // A minimal DNS query for "beta.test" A.
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["beta", "test"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        sock.send_to(&q, addr).await.ok()?;
        let mut buf = [0u8; 512];
        tokio::time::timeout(std::time::Duration::from_millis(200), sock.recv(&mut buf)).await.ok()?.ok().map(|_| ())
    })
    .await;
    (child, addr)
}

/// An HTTPS server for key documents, keyed by host name, with a certificate from a test
/// CA for all of them. Returns its port and the CA certificate (PEM).
async fn start_https(docs: HashMap<String, String>) -> (u16, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Missive test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(docs.keys().cloned().collect::<Vec<_>>()).unwrap().signed_by(&leaf_key, &ca, &ca_key).unwrap();
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
    let docs = Arc::new(docs);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, docs) = (acceptor.clone(), docs.clone());
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
                let text = String::from_utf8_lossy(&req);
                let host = text
                    .lines()
                    .find_map(|l| l.strip_prefix("host: ").or_else(|| l.strip_prefix("Host: ")))
                    .map(|h| h.split(':').next().unwrap_or_default().to_owned())
                    .unwrap_or_default();
                let wanted = text.starts_with("GET /.well-known/missive/server ");
                let (status, body) = match docs.get(&host) {
                    Some(d) if wanted => ("200 OK", d.clone()),
                    _ => ("404 Not Found", String::new()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, ca.pem())
}

fn key_doc(name: &str, federation: Option<SocketAddr>, key: &str) -> String {
    let k = PublicKey::parse(key).unwrap();
    let mut doc = serde_json::json!({"server_name": name, "keys": [{"id": k.key_id(), "key": key}]});
    if let Some(f) = federation {
        doc["federation"] = serde_json::json!(f.to_string());
    }
    doc.to_string()
}

/// Points a stopped server's discovery at the local DNS and HTTPS servers.
fn use_local_discovery(config: &Path, dns: SocketAddr, https_port: u16, ca_file: &Path) {
    let text = std::fs::read_to_string(config).unwrap().replace(
        "https_port = 443",
        &format!("https_port = {https_port}\ndns_server = \"{dns}\"\nca_file = \"{}\"", ca_file.display()),
    );
    std::fs::write(config, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_known_and_srv_discovery_each_lead_to_a_working_link() {
    let dir = tempfile::tempdir().unwrap();
    let bin = missived();
    // beta: found through its key document, which names its federation address.
    // gamma: key document without an address; the address comes from DNS SRV.
    let mut servers = Vec::new();
    for (i, name) in ["alpha.test", "beta.test", "gamma.test"].iter().enumerate() {
        let data = dir.path().join(name);
        ServerProcess::init_on(bin, &data, name, "open", [127, 0, 0, 2 + i as u8].into()).await.unwrap();
        servers.push(ServerProcess::start(bin, &data, name).await.unwrap());
    }
    let (beta, gamma) = (&servers[1], &servers[2]);
    // delta: its key document lists a key that is not the one its server presents.
    let delta = MockPeer::start("delta.test", [127, 0, 0, 5].into()).unwrap();
    let delta_doc_key = ServerKey::generate().public().to_text();

    let mut docs = HashMap::new();
    docs.insert("beta.test".to_owned(), key_doc("beta.test", Some(beta.federation), &beta.key));
    docs.insert("gamma.test".to_owned(), key_doc("gamma.test", None, &gamma.key));
    docs.insert("delta.test".to_owned(), key_doc("delta.test", Some(delta.addr), &delta_doc_key));
    let (https_port, ca_pem) = start_https(docs).await;
    let ca_file = dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let (_dns, dns_addr) = start_dns(&[
        "--address=/beta.test/127.0.0.1".to_owned(),
        "--address=/gamma.test/127.0.0.1".to_owned(),
        "--address=/delta.test/127.0.0.1".to_owned(),
        "--host-record=gamma-fed.test,127.0.0.4".to_owned(),
        format!("--srv-host=_missive._udp.gamma.test,gamma-fed.test,{},0,0", gamma.federation.port()),
    ])
    .await;

    // alpha knows nobody by configuration: only its DNS server, HTTPS port and CA.
    servers[0].terminate().await.unwrap();
    use_local_discovery(&servers[0].config, dns_addr, https_port, &ca_file);
    servers[0].restart().await.unwrap();
    let alpha = &servers[0];
    // beta and gamma pin alpha, so they accept its connections.
    servers[1].pin_peer(alpha).await.unwrap();
    servers[2].pin_peer(alpha).await.unwrap();

    let alice = register(alpha, "alice").await;
    let bob = register(&servers[1], "bob").await;
    let carol = register(&servers[2], "carol").await;
    let (alice_id, bob_id, carol_id) = (uid("alice", alpha), uid("bob", &servers[1]), uid("carol", &servers[2]));
    let m1 = alice.send_text(&bob_id, "found you through .well-known").await.unwrap();
    let m2 = alice.send_text(&carol_id, "found you through SRV").await.unwrap();
    let dan = missive_spec::UserId::parse("@dan:delta.test").unwrap();
    alice.send_text(&dan, "to a server whose key does not match its document").await.unwrap();

    let got = eventually("bob to receive", || async {
        let h = full_history(&bob, &alice_id, 10).await;
        (!h.is_empty()).then_some(h)
    })
    .await;
    assert_eq!(got, vec![m1]);
    let got = eventually("carol to receive", || async {
        let h = full_history(&carol, &alice_id, 10).await;
        (!h.is_empty()).then_some(h)
    })
    .await;
    assert_eq!(got, vec![m2]);
    eventually("queues to beta and gamma to drain", || async {
        (queue_depth(alpha, "beta.test").await == 0 && queue_depth(alpha, "gamma.test").await == 0).then_some(())
    })
    .await;
    // delta presented a key its document does not list: refused, nothing delivered.
    let status = eventually("alpha to report delta.test down", || async {
        alpha.peers_json().await.unwrap().into_iter().find(|l| l.contains("delta.test") && l.contains("\"up\":false"))
    })
    .await;
    assert!(status.contains("\"queue_depth\":1"), "{status}");
    assert!(delta.observed.lock().unwrap().txns.is_empty());
}
