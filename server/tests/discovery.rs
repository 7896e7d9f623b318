//! Discovery against real local infrastructure: a DNS server (dnsmasq) for SRV and address
//! records, and an HTTPS server with a test CA for `.well-known` key documents. The
//! server under test is pointed at both by its config; nothing is mocked. Everything here
//! lives on loopback, which discovery refuses to connect to (spec F2.5) unless the config
//! says `allow_special_addresses = true`: the first test sets it, the second checks the
//! refusal.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::*;
use missive_conformance::harness::{free_udp_port, ServerProcess};
use missive_federation::discovery::DEFAULT_FEDERATION_PORT;
use missive_conformance::mock_peer::MockPeer;
use missive_federation::{PublicKey, ServerKey};

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
/// CA for all of them.
async fn start_https(docs: HashMap<String, String>) -> https::Https {
    let names = docs.keys().cloned().collect();
    https::start(names, move |host, path| match docs.get(host) {
        Some(d) if path == "/.well-known/missive/server" => https::Reply::Doc(d.clone()),
        _ => https::Reply::NotFound,
    })
    .await
}

fn key_doc(name: &str, federation: Option<SocketAddr>, key: &str) -> String {
    let k = PublicKey::parse(key).unwrap();
    let mut doc = serde_json::json!({"server_name": name, "keys": [{"id": k.key_id(), "key": key}]});
    if let Some(f) = federation {
        doc["federation"] = serde_json::json!(f.to_string());
    }
    doc.to_string()
}

/// Points a stopped server's discovery at the local DNS and HTTPS servers; with
/// `allow_special`, lets it connect to the loopback addresses they hand out.
fn use_local_discovery(config: &Path, dns: SocketAddr, https_port: u16, ca_file: &Path, allow_special: bool) {
    let text = std::fs::read_to_string(config)
        .unwrap()
        .replace(
            "https_port = 443",
            &format!("https_port = {https_port}\ndns_server = \"{dns}\"\nca_file = \"{}\"", ca_file.display()),
        )
        .replace("allow_special_addresses = false", &format!("allow_special_addresses = {allow_special}"));
    std::fs::write(config, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_known_and_srv_discovery_each_lead_to_a_working_link() {
    let dir = tempfile::tempdir().unwrap();
    // beta: found through its key document, which names its federation address.
    // gamma: key document without an address; the address comes from DNS SRV.
    let mut servers = started(dir.path(), &["alpha.test", "beta.test", "gamma.test"]).await;
    let (beta, gamma) = (&servers[1], &servers[2]);
    // delta: its key document lists a key that is not the one its server presents.
    let delta = MockPeer::start("delta.test", [127, 0, 0, 5].into()).unwrap();
    let delta_doc_key = ServerKey::generate().public().to_text();

    let mut docs = HashMap::new();
    docs.insert("beta.test".to_owned(), key_doc("beta.test", Some(beta.federation), &beta.key));
    docs.insert("gamma.test".to_owned(), key_doc("gamma.test", None, &gamma.key));
    docs.insert("delta.test".to_owned(), key_doc("delta.test", Some(delta.addr), &delta_doc_key));
    let https = start_https(docs).await;
    let ca_file = dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, &https.ca_pem).unwrap();
    let (_dns, dns_addr) = start_dns(&[
        "--address=/beta.test/127.0.0.1".to_owned(),
        "--address=/gamma.test/127.0.0.1".to_owned(),
        "--address=/delta.test/127.0.0.1".to_owned(),
        "--host-record=gamma-fed.test,127.0.0.4".to_owned(),
        format!("--srv-host=_missive._udp.gamma.test,gamma-fed.test,{},0,0", gamma.federation.port()),
    ])
    .await;

    // alpha knows nobody by configuration: only its DNS server, HTTPS port and CA. Every
    // address here is loopback, which discovery refuses unless told this is a test.
    servers[0].terminate().await.unwrap();
    use_local_discovery(&servers[0].config, dns_addr, https.port, &ca_file, true);
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

/// Without the test-only flag, names whose records point at loopback get nothing out of
/// the server: no key-document fetch from the HTTPS server their A record names, and no
/// packet to the SRV target or to the default port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_refuses_loopback_addresses_it_found_itself() {
    let dir = tempfile::tempdir().unwrap();
    let bin = missived();
    let data = dir.path().join("alpha.test");
    ServerProcess::init_on(bin, &data, "alpha.test", "open", [127, 0, 0, 2].into()).await.unwrap();
    // Where alpha would send packets if it did not screen addresses.
    let srv_target = tokio::net::UdpSocket::bind("127.0.0.6:0").await.unwrap();
    let default_target = tokio::net::UdpSocket::bind(("127.0.0.7", DEFAULT_FEDERATION_PORT))
        .await
        .expect("UDP 127.0.0.7:7451 is taken; this test watches it");
    // epsilon: key document on the HTTPS server (127.0.0.1), address by SRV (127.0.0.6).
    // zeta: key pinned in alpha's config, no address: SRV has none, its A record is
    // 127.0.0.7, so the default port is tried.
    let (eps_key, zeta_key) = (ServerKey::generate().public(), ServerKey::generate().public());
    let docs = HashMap::from([("epsilon.test".to_owned(), key_doc("epsilon.test", None, &eps_key.to_text()))]);
    let https = start_https(docs).await;
    let ca_file = dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, &https.ca_pem).unwrap();
    let (_dns, dns_addr) = start_dns(&[
        "--address=/epsilon.test/127.0.0.1".to_owned(),
        "--host-record=eps-fed.test,127.0.0.6".to_owned(),
        format!("--srv-host=_missive._udp.epsilon.test,eps-fed.test,{},0,0", srv_target.local_addr().unwrap().port()),
        "--address=/zeta.test/127.0.0.7".to_owned(),
    ])
    .await;
    let config = data.join("missived.toml");
    use_local_discovery(&config, dns_addr, https.port, &ca_file, false);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[[peers]]\nname = \"zeta.test\"\nkey = \"{}\"\n", zeta_key.to_text()));
    std::fs::write(&config, text).unwrap();
    let alpha = ServerProcess::start(bin, &data, "alpha.test").await.unwrap();

    let alice = register(&alpha, "alice").await;
    for to in ["@eve:epsilon.test", "@zed:zeta.test"] {
        alice.send_text(&missive_spec::UserId::parse(to).unwrap(), "stays queued").await.unwrap();
    }
    for (peer, host) in [("epsilon.test", "epsilon.test"), ("zeta.test", "zeta.test")] {
        let v = eventually(&format!("alpha to try {peer}"), || async {
            let lines = alpha.peers_json().await.unwrap();
            let v = lines.iter().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|v| v["name"] == peer)?;
            v["last_error"].is_string().then_some(v)
        })
        .await;
        let error = v["last_error"].as_str().unwrap_or_default();
        assert!(error.contains(&format!("{host} (looked up for {peer}) resolves only to loopback")), "{peer}: {error}");
        assert_eq!((v["queue_depth"].as_u64(), v["up"].as_bool()), (Some(1), Some(false)), "{v}");
    }
    assert_eq!(https.connections(), 0, "alpha fetched a key document from loopback");
    let mut buf = [0u8; 2048];
    for (what, sock) in [("the SRV target", &srv_target), ("the default port", &default_target)] {
        let got = sock.try_recv_from(&mut buf);
        assert!(got.is_err(), "{what} on loopback received a packet from {:?}", got.map(|(_, from)| from));
    }
}

/// `missived check --json` of a running server, and its exit status.
async fn check(config: &Path) -> (bool, HashMap<String, (String, String)>) {
    let run = tokio::process::Command::new(missived()).args(["check", "--json", "--config"]).arg(config).kill_on_drop(true).output();
    let out = tokio::time::timeout(DEADLINE, run).await.expect("check hung").unwrap();
    let mut lines = HashMap::new();
    for l in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"));
        assert_eq!(v["type"], "check", "{l}");
        let (check, level, what) = (v["check"].as_str().unwrap(), v["level"].as_str().unwrap(), v["what"].as_str().unwrap());
        // Several peers share a check name; keep each peer's line apart.
        let key = if check == "peer" { format!("peer {}", what.split(' ').next().unwrap()) } else { check.to_owned() };
        lines.insert(key, (level.to_owned(), what.to_owned()));
    }
    (out.status.success(), lines)
}

/// `missived well-known` prints the document that `missived check` then finds published
/// (through real HTTPS and DNS SRV); a key file others can read, a document with another
/// key and a peer that stopped answering each turn a line into FAIL and the exit status to 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_the_published_key_the_srv_address_and_each_peer() {
    let dir = tempfile::tempdir().unwrap();
    let bin = missived();
    let mut servers = started(dir.path(), &["alpha.test", "beta.test"]).await;
    let out = tokio::process::Command::new(bin).args(["well-known", "--config"]).arg(&servers[0].config).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((doc["server_name"].as_str(), doc["keys"][0]["key"].as_str()), (Some("alpha.test"), Some(servers[0].key.as_str())));
    // The document as printed is what the HTTPS server serves; another name serves a
    // document with a key alpha does not have.
    let stale = key_doc("stale.test", None, &ServerKey::generate().public().to_text());
    let docs = HashMap::from([("alpha.test".to_owned(), doc.to_string()), ("stale.test".to_owned(), stale)]);
    let https = start_https(docs).await;
    let ca_file = dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, &https.ca_pem).unwrap();
    let (_dns, dns_addr) = start_dns(&[
        "--address=/alpha.test/127.0.0.1".to_owned(),
        "--address=/stale.test/127.0.0.1".to_owned(),
        "--host-record=alpha-fed.test,127.0.0.2".to_owned(),
        format!("--srv-host=_missive._udp.alpha.test,alpha-fed.test,{},0,0", servers[0].federation.port()),
    ])
    .await;
    servers[0].terminate().await.unwrap();
    use_local_discovery(&servers[0].config, dns_addr, https.port, &ca_file, true);
    servers[0].restart().await.unwrap();
    servers[0].pin_peer(&servers[1]).await.unwrap();
    servers[1].pin_peer(&servers[0]).await.unwrap();

    let (passed, lines) = check(&servers[0].config).await;
    for name in ["config", "key", "client", "federation", "published", "address", "peer beta.test"] {
        assert_eq!(lines.get(name).map(|l| l.0.as_str()), Some("ok"), "{name}: {lines:?}");
    }
    assert!(lines["address"].1.contains("SRV"), "{lines:?}");
    assert!(passed, "{lines:?}");

    // A key file others can read.
    let key_file = servers[0].config.parent().unwrap().join("server.key");
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (passed, lines) = check(&servers[0].config).await;
    assert_eq!(lines["key"].0, "fail", "{lines:?}");
    assert!(!passed);
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // beta stops answering.
    servers[1].terminate().await.unwrap();
    let (passed, lines) = check(&servers[0].config).await;
    assert_eq!(lines["peer beta.test"].0, "fail", "{lines:?}");
    assert!(!passed);

    // A server whose published document lists another key.
    let text = std::fs::read_to_string(&servers[0].config).unwrap();
    // Beside alpha's own, so that it names the same key file.
    let stale_config = servers[0].config.with_file_name("stale.toml");
    std::fs::write(&stale_config, text.replace("server_name = \"alpha.test\"", "server_name = \"stale.test\"")).unwrap();
    let (_, lines) = check(&stale_config).await;
    assert_eq!(lines["published"].0, "fail", "{lines:?}");
    assert!(lines["published"].1.contains("does not list this server's key"), "{lines:?}");
}
