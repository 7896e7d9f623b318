//! `missived check` (is this server set up so that people and peers can reach it?) and
//! `missived well-known` (the key document it should publish). Each check prints one line,
//! `OK`, `WARN` or `FAIL`, and for anything but OK what to do about it.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use missive_federation::discovery::{Discovery, KeyDocument, KeyEntry, PeerInfo, WELL_KNOWN_PATH};
use missive_federation::tls::{self, Pin, PinnedServerVerifier};
use missive_federation::{PublicKey, ServerKey};
use missive_server::admin::{self, AdminRequest};
use missive_server::config::Config;
use missive_spec::federation::FEDERATION_ALPN;
use missive_spec::ServerName;
use serde_json::json;

use crate::ConfigArg;

/// How long one peer's handshake may take before it counts as unreachable.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

/// The checks' lines as they are printed, and the worst level seen.
struct Report {
    json: bool,
    worst: Level,
}

impl Report {
    fn line(&mut self, level: Level, check: &str, what: impl AsRef<str>, fix: Option<String>) {
        self.worst = self.worst.max(level);
        if self.json {
            println!("{}", json!({"type": "check", "check": check, "level": level.as_str(), "what": what.as_ref(), "fix": fix}));
            return;
        }
        let tag = match level {
            Level::Ok => "OK  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        println!("{tag}  {check:<10} {}", what.as_ref());
        if let Some(f) = fix {
            println!("      {:<10} fix: {f}", "");
        }
    }
    fn ok(&mut self, check: &str, what: impl AsRef<str>) {
        self.line(Level::Ok, check, what, None);
    }
    fn warn(&mut self, check: &str, what: impl AsRef<str>, fix: impl Into<String>) {
        self.line(Level::Warn, check, what, Some(fix.into()));
    }
    fn fail(&mut self, check: &str, what: impl AsRef<str>, fix: impl Into<String>) {
        self.line(Level::Fail, check, what, Some(fix.into()));
    }
}

/// The key document this server should publish at `https://NAME/.well-known/missive/server`.
pub fn key_document(config: &Config, federation: Option<&str>) -> anyhow::Result<KeyDocument> {
    let key = ServerKey::load(&config.key_file)?.public();
    let mut keys = vec![KeyEntry { id: key.key_id(), key: key.to_text(), valid_until_ms: None }];
    // Replaced keys stay published, retired, so units they signed still verify (F2.2, F2.7).
    let chain = missive_federation::RotationChain::load(&config.key_file)?;
    for (old, until) in missive_federation::RotationChain::retired(&chain) {
        keys.push(KeyEntry { id: old.key_id(), key: old.to_text(), valid_until_ms: Some(until) });
    }
    Ok(KeyDocument { server_name: config.server_name.to_string(), federation: federation.map(str::to_owned), keys })
}

pub fn well_known(config: &ConfigArg, federation: Option<&str>) -> anyhow::Result<()> {
    let config = config.load()?;
    if let Some(f) = federation {
        check_host_port(f)?;
    }
    let doc = key_document(&config, federation)?;
    println!("{}", serde_json::to_string_pretty(&doc)?);
    eprintln!(
        "publish this at https://{}{WELL_KNOWN_PATH} (HTTPS, a certificate valid for {0}, at most 64 KiB)",
        config.server_name
    );
    Ok(())
}

/// A federation address in a key document is `HOST:PORT` with a DNS name (F2.2, F2.5).
fn check_host_port(s: &str) -> anyhow::Result<()> {
    let Some((host, port)) = s.rsplit_once(':') else { anyhow::bail!("--federation must be HOST:PORT, e.g. fed.example.org:7451") };
    if port.parse::<u16>().is_err() || host.is_empty() {
        anyhow::bail!("--federation must be HOST:PORT, e.g. fed.example.org:7451");
    }
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        anyhow::bail!("--federation takes a DNS name, not an IP address: peers follow only names (spec F2.5)");
    }
    Ok(())
}

/// Runs every check; fails (exit status 1) when any says FAIL.
pub async fn check(config_arg: &ConfigArg, json: bool) -> anyhow::Result<()> {
    let mut r = Report { json, worst: Level::Ok };
    let config = match config_arg.load() {
        Ok(c) => {
            r.ok("config", format!("{} is valid (server name {})", config_arg.path.display(), c.server_name));
            c
        }
        Err(e) => {
            r.fail("config", format!("{e:#}"), format!("correct {}; `missived init` writes a valid one", config_arg.path.display()));
            anyhow::bail!("the config cannot be read; nothing else was checked");
        }
    };
    let key = check_key(&mut r, &config.key_file);
    let running = admin::call(&config.admin_socket(), &AdminRequest::Peers {}).await.ok().flatten().is_some();
    check_port(&mut r, "client", config.client.listen, running);
    check_port(&mut r, "federation", config.federation.listen, running);
    if config.metrics.enabled {
        check_port(&mut r, "metrics", config.metrics.listen, running);
    }
    check_clock(&mut r);
    let discovery = match config.discovery().and_then(|d| Ok(Discovery::new(d)?)) {
        Ok(d) => Some(d),
        Err(e) => {
            r.fail("discovery", format!("{e:#}"), "correct the [federation] section of the config");
            None
        }
    };
    if let (Some(d), Some(key)) = (&discovery, &key) {
        check_published(&mut r, d, &config, key).await;
        for p in &config.peers {
            check_peer(&mut r, d, &config, key, &p.name).await;
        }
        if config.peers.is_empty() {
            r.ok("peers", "no peer is pinned in the config (peers are found through their key documents)");
        }
    }
    if r.worst == Level::Fail {
        anyhow::bail!("some checks failed");
    }
    Ok(())
}

fn check_key(r: &mut Report, path: &Path) -> Option<ServerKey> {
    let key = match ServerKey::load(path) {
        Ok(k) => k,
        Err(e) => {
            r.fail("key", e.to_string(), format!("restore the key file {} from a backup, or `missived init` a new server", path.display()));
            return None;
        }
    };
    match std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777) {
        Ok(mode) if mode & 0o077 != 0 => r.fail(
            "key",
            format!("{} is readable by others (mode {mode:o}): whoever reads it can sign as this server", path.display()),
            format!("chmod 600 {}", path.display()),
        ),
        Ok(_) => r.ok("key", format!("{} is private; public key {}", path.display(), key.public().to_text())),
        Err(e) => r.fail("key", format!("{}: {e}", path.display()), "check the key file's permissions"),
    }
    Some(key)
}

fn check_port(r: &mut Report, which: &str, addr: SocketAddr, running: bool) {
    let check = which;
    if running {
        r.ok(check, format!("{addr}: served by the running missived"));
        return;
    }
    // The metrics listener is HTTP over TCP; the others are QUIC over UDP.
    let (proto, bound) = if which == "metrics" {
        ("TCP", std::net::TcpListener::bind(addr).map(drop))
    } else {
        ("UDP", std::net::UdpSocket::bind(addr).map(drop))
    };
    match bound {
        Ok(()) => r.ok(check, format!("{addr} ({proto}) can be bound")),
        Err(e) => r.fail(
            check,
            format!("{addr} ({proto}) cannot be bound: {e}"),
            format!("stop what holds {addr}, or change `listen` in the [{which}] section"),
        ),
    }
}

/// Whether the kernel considers the clock synchronised (by NTP or the like): units carry
/// timestamps, and a clock far off makes this server's messages sort wrongly for people.
fn check_clock(r: &mut Report) {
    // SAFETY: a zeroed `timex` with `modes == 0` only reads the kernel's clock state.
    let state = unsafe {
        let mut t: libc::timex = std::mem::zeroed();
        libc::adjtimex(&mut t)
    };
    if state == libc::TIME_ERROR {
        r.warn(
            "clock",
            "the system clock is not synchronised (the kernel reports TIME_ERROR)",
            "run an NTP client (systemd-timesyncd, chrony or ntpd) on this host",
        );
    } else if state < 0 {
        r.warn("clock", format!("cannot read the clock's state: {}", std::io::Error::last_os_error()), "check NTP by hand");
    } else {
        r.ok("clock", "the system clock is synchronised");
    }
}

/// The key document and the federation address, as any peer will find them.
async fn check_published(r: &mut Report, d: &Discovery, config: &Config, key: &ServerKey) {
    let name = &config.server_name;
    let url = format!("https://{name}{WELL_KNOWN_PATH}");
    let info = match d.resolve(name).await {
        Ok(i) => i,
        Err(e) => {
            r.fail(
                "published",
                format!("peers cannot find this server: {e}"),
                format!("publish the output of `missived well-known` at {url}"),
            );
            return;
        }
    };
    if info.keys.contains(&key.public()) {
        r.ok("published", format!("{url} lists this server's key"));
    } else {
        r.fail(
            "published",
            format!("{url} does not list this server's key {} (it lists {})", key.public().to_text(), keys_text(&info.keys)),
            format!("publish the output of `missived well-known` at {url}"),
        );
    }
    check_address(r, &info, config);
}

fn check_address(r: &mut Report, info: &PeerInfo, config: &Config) {
    let listen = config.federation.listen;
    let source = match info.via {
        "well-known" => "the key document's `federation`".to_owned(),
        "srv" => format!("DNS SRV _missive._udp.{}", config.server_name),
        other => other.to_owned(),
    };
    if info.addr.port() != listen.port() {
        r.warn(
            "address",
            format!("peers will connect to {} (from {source}) but federation listens on port {}", info.addr, listen.port()),
            "make the published address and [federation] listen agree (a port forward is fine if you have one)",
        );
    } else if info.via == "default" {
        r.warn(
            "address",
            format!("no SRV record and no `federation` in the key document: peers try {} (port 7451)", info.addr),
            format!("publish _missive._udp.{} SRV or `missived well-known --federation HOST:PORT`", config.server_name),
        );
    } else {
        r.ok("address", format!("peers connect to {} (from {source})", info.addr));
    }
}

/// A configured peer: found, and answering a federation handshake with the key pinned.
async fn check_peer(r: &mut Report, d: &Discovery, config: &Config, key: &ServerKey, peer: &ServerName) {
    let check = "peer";
    let info = match d.resolve(peer).await {
        Ok(i) => i,
        Err(e) => {
            r.fail(check, format!("{peer}: {e}"), format!("check its entry in the config, or `missived peer remove {peer}`"));
            return;
        }
    };
    match handshake(config, key, peer, &info).await {
        Ok(()) => r.ok(check, format!("{peer} at {} answers with its pinned key", info.addr)),
        Err(e) => r.fail(
            check,
            format!("{peer} at {} (via {}): {e}", info.addr, info.via),
            "check the peer's address and key with its operator, and that it pins this server's key",
        ),
    }
}

async fn handshake(config: &Config, key: &ServerKey, peer: &ServerName, info: &PeerInfo) -> Result<(), String> {
    tls::install_provider();
    let verifier = PinnedServerVerifier::new(Pin::AnyOf(info.keys.clone()));
    let cfg = tls::federation_client_config(verifier, key, config.server_name.as_str(), FEDERATION_ALPN).map_err(|e| e.to_string())?;
    let local: SocketAddr = if info.addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let endpoint = quinn::Endpoint::client(local).map_err(|e| e.to_string())?;
    let connecting = endpoint.connect_with(cfg, info.addr, peer.as_str()).map_err(|e| e.to_string())?;
    let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Err(_) => Err(format!("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(conn)) => {
            conn.close(0u32.into(), b"check");
            Ok(())
        }
    };
    endpoint.wait_idle().await;
    result
}

fn keys_text(keys: &[PublicKey]) -> String {
    if keys.is_empty() {
        return "no current key".into();
    }
    keys.iter().map(PublicKey::to_text).collect::<Vec<_>>().join(", ")
}
