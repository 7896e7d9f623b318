//! `missived.toml`: loading, validation and the commented template `missived init` writes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use missive_spec::{RegistrationPolicy, ServerName};
use serde::Deserialize;

pub const CONFIG_FILE: &str = "missived.toml";
pub const KEY_FILE: &str = "server.key";
pub const DEFAULT_CLIENT_PORT: u16 = 7450;
/// TCP port of the metrics and health listener.
pub const DEFAULT_METRICS_PORT: u16 = 7452;
pub use missive_federation::discovery::DEFAULT_FEDERATION_PORT;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server_name: ServerName,
    #[serde(default = "dot")]
    pub data_dir: PathBuf,
    #[serde(default = "key_file")]
    pub key_file: PathBuf,
    #[serde(default)]
    pub client: ClientSection,
    #[serde(default)]
    pub registration: RegistrationSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub federation: FederationSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub store: StoreSection,
    /// Peers pinned by hand (`missived peer add`).
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
    /// Cluster mode: absent, this node is the whole server (RocksDB alone).
    #[serde(default)]
    pub cluster: Option<ClusterSection>,
}

/// One server name served by several nodes over a NATS JetStream cluster (`cluster/`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub engine: ClusterEngine,
    /// The NATS servers to connect to (`nats://host:port`, `tls://host:port`).
    pub urls: Vec<String>,
    /// This node's name, unique in the cluster: 1 to 32 of `a-z`, `0-9`, `-`.
    pub node: String,
    /// A NATS credentials file (JWT and NKey seed), relative to data_dir.
    pub credentials: Option<PathBuf>,
    /// A NATS user and password (both or neither).
    pub user: Option<String>,
    pub password: Option<String>,
    /// A NATS authentication token.
    pub token: Option<String>,
    /// Copies JetStream keeps of the log (1 to 5; 3 survives the loss of any one node).
    #[serde(default = "cluster_replicas")]
    pub replicas: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterEngine {
    Nats,
}

fn cluster_replicas() -> usize {
    3
}

impl ClusterSection {
    fn validate(&self) -> anyhow::Result<()> {
        if self.urls.is_empty() {
            bail!("cluster.urls names no NATS server");
        }
        for u in &self.urls {
            if !["nats://", "tls://"].iter().any(|s| u.starts_with(s)) || u.len() > 256 {
                bail!("cluster.urls: {u:?} is not a nats:// or tls:// URL");
            }
        }
        let n = &self.node;
        if n.is_empty() || n.len() > 32 || !n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            bail!("cluster.node {n:?} must be 1 to 32 of a-z, 0-9 and -");
        }
        if !(1..=5).contains(&self.replicas) {
            bail!("cluster.replicas is {}, must be 1 to 5", self.replicas);
        }
        if self.user.is_some() != self.password.is_some() {
            bail!("cluster.user and cluster.password go together");
        }
        let ways = [self.credentials.is_some(), self.user.is_some(), self.token.is_some()];
        if ways.iter().filter(|w| **w).count() > 1 {
            bail!("cluster: give one of credentials, user and password, or token");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    #[serde(default = "default_federation_listen")]
    pub listen: SocketAddr,
    /// Port of other servers' HTTPS key documents (`/.well-known/missive/server`).
    #[serde(default = "https_port")]
    pub https_port: u16,
    /// DNS server for SRV and address lookups; absent: the system resolver.
    pub dns_server: Option<SocketAddr>,
    /// Extra CA certificates (PEM) trusted for key documents, besides the WebPKI roots.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "retry_base_ms")]
    pub retry_base_ms: u64,
    #[serde(default = "retry_cap_ms")]
    pub retry_cap_ms: u64,
    /// Test-only: let discovery connect to loopback, private, link-local and other special
    /// addresses it found through `.well-known`, SRV or the default port (static peer
    /// entries may always name them).
    #[serde(default)]
    pub allow_special_addresses: bool,
    /// Federate only with these servers; absent: with every server not denied (F3.5).
    #[serde(default)]
    pub allow: Option<Vec<ServerName>>,
    /// Never federate with these servers (F3.5); wins over `allow`.
    #[serde(default)]
    pub deny: Vec<ServerName>,
}

/// Every bound on what an outsider can make the server spend (spec §8, F8). Each has a
/// safe default; `missived.toml` lists them all under `[limits]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// How long a peer or client may take to deliver one request frame once its stream
    /// opened; a slower one gets its stream reset.
    pub request_read_timeout_ms: u64,
    /// Bytes of request frames being read at once, over all client connections and over
    /// all federation peers; a frame waits (within its deadline) for room.
    pub client_request_bytes: usize,
    pub federation_request_bytes: usize,
    /// Password hashes (argon2id, 19 MiB each) computed at once; more logins wait.
    pub password_hashes: usize,
    /// Federation connections at once, in all and from one IP address.
    pub federation_connections: usize,
    pub federation_connections_per_address: usize,
    /// Federation connections whose handshake or key discovery is still in progress.
    pub federation_handshakes: usize,
    /// Requests per second one peer may make (a bucket of this size, refilled per second).
    pub federation_requests_per_second: u32,
    /// Units held behind a gap, per (peer, conversation) and per peer in all; beyond them a
    /// unit is answered `retry` and stays in the origin's queue.
    pub held_per_conversation: u64,
    pub held_per_peer: u64,
    /// Held units released (stored) per write once their gap is filled.
    pub held_release_batch: usize,
    /// Users of other servers whose presence is remembered.
    pub remote_presence_users: usize,
    /// Discovery lookups in flight at once (one per server name at most).
    pub discovery_lookups: usize,
    /// Server names whose discovery result is cached.
    pub discovery_cache_names: usize,
    /// Largest key document read, in bytes (at most 65 536, F2.2).
    pub key_document_bytes: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            request_read_timeout_ms: 10_000,
            client_request_bytes: 16 * 1024 * 1024,
            federation_request_bytes: 32 * 1024 * 1024,
            password_hashes: 2,
            federation_connections: 1_000,
            federation_connections_per_address: 8,
            federation_handshakes: 64,
            federation_requests_per_second: 10_000,
            held_per_conversation: 1_000,
            held_per_peer: 10_000,
            held_release_batch: 256,
            remote_presence_users: 100_000,
            discovery_lookups: 32,
            discovery_cache_names: 10_000,
            key_document_bytes: missive_federation::discovery::MAX_KEY_DOCUMENT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    pub name: ServerName,
    /// `HOST:PORT` of its federation endpoint; absent: `.well-known`, SRV, default port.
    pub address: Option<String>,
    /// Its public key (`ed25519:...`); absent: from its `.well-known` document.
    pub key: Option<String>,
}

/// How the writer uses the store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Longest wait, in µs, for more commands before a small group is written, when
    /// commands arrive fast enough that the wait gathers some (`linger.rs`); 0: never wait.
    #[serde(default = "group_commit_linger_us")]
    pub group_commit_linger_us: u64,
}

/// The longest linger allowed: beyond it, the wait would cost more latency than any
/// group's sync.
pub const MAX_GROUP_COMMIT_LINGER_US: u64 = 5_000;

impl Default for StoreSection {
    fn default() -> StoreSection {
        StoreSection { group_commit_linger_us: group_commit_linger_us() }
    }
}

fn group_commit_linger_us() -> u64 {
    500
}

impl StoreSection {
    pub fn linger(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.group_commit_linger_us)
    }
}

/// The operators' HTTP listener: `/metrics`, `/health`, `/ready` (`http.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

impl Default for MetricsSection {
    fn default() -> MetricsSection {
        MetricsSection { enabled: true, listen: default_metrics_listen() }
    }
}

fn yes() -> bool {
    true
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    #[serde(default = "default_client_listen")]
    pub listen: SocketAddr,
    /// Most client connections at once; more are refused at the handshake.
    #[serde(default = "max_connections")]
    pub max_connections: usize,
    /// Most client connections at once from one IP address.
    #[serde(default = "max_connections_per_address")]
    pub max_connections_per_address: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationSection {
    #[serde(default = "closed")]
    pub policy: RegistrationPolicy,
    pub token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default = "info")]
    pub level: String,
    /// `text` (one line per event) or `json` (one JSON object per event and line).
    #[serde(default)]
    pub format: LogFormat,
}

/// How log events are written to standard error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn dot() -> PathBuf {
    PathBuf::from(".")
}
fn key_file() -> PathBuf {
    PathBuf::from(KEY_FILE)
}
fn default_client_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_CLIENT_PORT))
}
fn max_connections() -> usize {
    10_000
}
fn max_connections_per_address() -> usize {
    64
}
fn default_federation_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_FEDERATION_PORT))
}
fn https_port() -> u16 {
    443
}
fn retry_base_ms() -> u64 {
    200
}
fn retry_cap_ms() -> u64 {
    60_000
}
fn closed() -> RegistrationPolicy {
    RegistrationPolicy::Closed
}
fn info() -> String {
    "info".into()
}

impl Default for ClientSection {
    fn default() -> Self {
        ClientSection {
            listen: default_client_listen(),
            max_connections: max_connections(),
            max_connections_per_address: max_connections_per_address(),
        }
    }
}
impl Default for RegistrationSection {
    fn default() -> Self {
        RegistrationSection { policy: closed(), token: None }
    }
}
impl Default for FederationSection {
    fn default() -> Self {
        FederationSection {
            listen: default_federation_listen(),
            https_port: https_port(),
            dns_server: None,
            ca_file: None,
            retry_base_ms: retry_base_ms(),
            retry_cap_ms: retry_cap_ms(),
            allow_special_addresses: false,
            allow: None,
            deny: Vec::new(),
        }
    }
}
impl Default for LogSection {
    fn default() -> Self {
        LogSection { level: info(), format: LogFormat::Text }
    }
}

impl Config {
    /// Reads and validates a config file; relative paths are taken from the file's folder.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        Config::parse(&text, path.parent().unwrap_or(Path::new("."))).with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses and validates config text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Config> {
        let mut c: Config = toml::from_str(text)?;
        c.data_dir = tidy(&base.join(&c.data_dir));
        c.key_file = c.data_dir.join(&c.key_file);
        if c.registration.policy == RegistrationPolicy::Token
            && c.registration.token.as_deref().is_none_or(|t| t.len() < 8)
        {
            bail!("registration policy \"token\" needs registration.token of at least 8 characters");
        }
        c.federation.ca_file = c.federation.ca_file.map(|f| base.join(f));
        for p in &c.peers {
            if let Some(k) = &p.key {
                missive_federation::PublicKey::parse(k).with_context(|| format!("peer {}", p.name))?;
            }
            if p.key.is_none() && p.address.is_none() {
                bail!("peer {} needs an address or a key", p.name);
            }
        }
        if let Some(cluster) = &mut c.cluster {
            cluster.validate()?;
            cluster.credentials = cluster.credentials.as_ref().map(|f| c.data_dir.join(f));
            // The log's deterministic replay does not cover federation yet (held units are
            // released in an order a restart does not reproduce): a cluster talks to no peer.
            if !c.peers.is_empty() || c.federation.allow.as_ref().is_some_and(|a| !a.is_empty()) {
                bail!("cluster mode does not federate yet: remove [[peers]] and federation.allow");
            }
            c.federation.allow = Some(Vec::new());
        }
        c.validate()?;
        Ok(c)
    }

    /// The bounds a value's type does not express. A setting that must be at least 1 is one
    /// whose 0 would refuse or stall everything it governs, never a way to turn it off.
    fn validate(&self) -> anyhow::Result<()> {
        check_log_level(&self.log.level)?;
        at_least_one("client.max_connections", self.client.max_connections as u64)?;
        at_least_one("client.max_connections_per_address", self.client.max_connections_per_address as u64)?;
        let FederationSection { retry_base_ms, retry_cap_ms, .. } = self.federation;
        at_least_one("federation.retry_base_ms", retry_base_ms)?;
        if retry_cap_ms < retry_base_ms {
            bail!("federation.retry_cap_ms ({retry_cap_ms}) must be at least federation.retry_base_ms ({retry_base_ms})");
        }
        // Named one by one, so that a new limit cannot be added without deciding its bounds.
        let LimitsSection {
            request_read_timeout_ms,
            client_request_bytes,
            federation_request_bytes,
            password_hashes,
            federation_connections,
            federation_connections_per_address,
            federation_handshakes,
            federation_requests_per_second,
            held_per_conversation,
            held_per_peer,
            held_release_batch,
            remote_presence_users,
            discovery_lookups,
            discovery_cache_names,
            key_document_bytes,
        } = self.limits;
        for (key, value) in [
            ("limits.request_read_timeout_ms", request_read_timeout_ms),
            ("limits.client_request_bytes", client_request_bytes as u64),
            ("limits.federation_request_bytes", federation_request_bytes as u64),
            ("limits.password_hashes", password_hashes as u64),
            ("limits.federation_connections", federation_connections as u64),
            ("limits.federation_connections_per_address", federation_connections_per_address as u64),
            ("limits.federation_handshakes", federation_handshakes as u64),
            ("limits.federation_requests_per_second", u64::from(federation_requests_per_second)),
            ("limits.held_per_conversation", held_per_conversation),
            ("limits.held_per_peer", held_per_peer),
            ("limits.held_release_batch", held_release_batch as u64),
            ("limits.remote_presence_users", remote_presence_users as u64),
            ("limits.discovery_lookups", discovery_lookups as u64),
            ("limits.discovery_cache_names", discovery_cache_names as u64),
            ("limits.key_document_bytes", key_document_bytes as u64),
        ] {
            at_least_one(key, value)?;
        }
        let linger = self.store.group_commit_linger_us;
        if linger > MAX_GROUP_COMMIT_LINGER_US {
            bail!("store.group_commit_linger_us is {linger}, at most {MAX_GROUP_COMMIT_LINGER_US}");
        }
        let max_document = missive_federation::discovery::MAX_KEY_DOCUMENT;
        if key_document_bytes > max_document {
            bail!("limits.key_document_bytes is {key_document_bytes}, at most {max_document} (F2.2)");
        }
        Ok(())
    }

    /// Discovery settings: static peers from `[[peers]]`, the rest from `[federation]`.
    pub fn discovery(&self) -> anyhow::Result<missive_federation::discovery::DiscoveryConfig> {
        use missive_federation::discovery::{DiscoveryConfig, StaticPeer};
        let mut statics = std::collections::HashMap::new();
        for p in &self.peers {
            let e: &mut StaticPeer = statics.entry(p.name.clone()).or_default();
            if let Some(a) = &p.address {
                e.address = Some(a.clone());
            }
            if let Some(k) = &p.key {
                e.keys.push(missive_federation::PublicKey::parse(k)?);
            }
        }
        let extra_ca_pem = match &self.federation.ca_file {
            Some(f) => Some(std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?),
            None => None,
        };
        Ok(DiscoveryConfig {
            statics,
            https_port: self.federation.https_port,
            extra_ca_pem,
            dns_server: self.federation.dns_server,
            max_lookups: self.limits.discovery_lookups,
            max_cache_names: self.limits.discovery_cache_names,
            max_key_document_bytes: self.limits.key_document_bytes,
            allow_special_addresses: self.federation.allow_special_addresses,
            ..Default::default()
        })
    }

    pub fn db_dir(&self) -> PathBuf {
        self.data_dir.join("db")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }
}

fn at_least_one(key: &str, value: u64) -> anyhow::Result<()> {
    if value == 0 {
        bail!("{key} must be at least 1");
    }
    Ok(())
}

const LOG_LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// `[log] level`: a level, or `tracing` filter directives that each end in one
/// (`missive_server=debug,info`). A bare word that is no level would be taken as a target
/// name and silence everything else, so it is refused.
fn check_log_level(level: &str) -> anyhow::Result<()> {
    let allowed = "one of error, warn, info, debug, trace, off, or directives such as \"missive_server=debug,info\"";
    let directives: Vec<&str> = level.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    if directives.is_empty() {
        bail!("log.level is empty; use {allowed}");
    }
    for d in &directives {
        let named = d.rsplit_once('=').map_or(*d, |(_, l)| l);
        if !LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(named)) {
            bail!("log.level {level:?}: {d:?} names no level; use {allowed}");
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(level)
        .map_err(|e| anyhow::anyhow!("log.level {level:?} is not a valid filter ({e}); use {allowed}"))?;
    Ok(())
}

/// The commented configuration `missived init` writes.
pub fn template(server_name: &ServerName, listen: SocketAddr, federation: SocketAddr, metrics: SocketAddr, policy: RegistrationPolicy) -> String {
    let policy = match policy {
        RegistrationPolicy::Closed => "closed",
        RegistrationPolicy::Open => "open",
        RegistrationPolicy::Token => "token",
    };
    format!(
        r#"# Missive homeserver configuration (missived).

# This server's name. User ids on this server end in ":{server_name}".
# It is part of every id and message: never change it once users exist.
server_name = "{server_name}"

# Where the database (db/), the server key and the admin socket live.
# Relative paths are taken from this file's folder.
data_dir = "."

# The server's ed25519 signing key (PKCS#8 PEM), relative to data_dir. Keep it secret
# and backed up: clients and peer servers pin its public key.
key_file = "{KEY_FILE}"

[client]
# UDP address of the client API (QUIC). The default serves this machine only; use
# 0.0.0.0:{DEFAULT_CLIENT_PORT} to serve the network.
listen = "{listen}"
# Connections at once, in all and from one IP address; more are refused. Connections
# silent for 15 s are closed (clients send keep-alives every 3 s).
max_connections = 10000
max_connections_per_address = 64

[metrics]
# HTTP (TCP) address serving /metrics (Prometheus text), /health and /ready. Plain
# HTTP without authentication: keep it on loopback or a private network.
enabled = true
listen = "{metrics}"

[store]
# Under load the writer waits up to this many microseconds for more commands before a
# small group's synced write, so that one sync serves several. It never waits when
# commands arrive slower than one per wait; after a wait that gathered nothing (a client
# that sends one at a time) it writes the next 16 groups at once. 0 turns it off; at
# most 5000. A change needs a restart.
group_commit_linger_us = 500

[registration]
# Who may create an account with `missive register`:
#   "closed" - nobody; the operator adds users with `missived user add` (default)
#   "open"   - anyone who can reach the client API
#   "token"  - whoever presents the token below
policy = "{policy}"
# token = "a long random string"

[log]
# One of error, warn, info, debug, trace, off, or per-target directives such as
# "missive_server=debug,info". RUST_LOG overrides it; SIGHUP applies a change.
level = "info"
# "text", or "json" for one JSON object per line (log collectors); `missived run
# --log-format` overrides it. A change needs a restart.
format = "text"

[federation]
# UDP address of the federation endpoint (QUIC, mutual TLS with server keys). Other
# servers find it through their [[peers]] entry for this server, this server's
# https://{server_name}/.well-known/missive/server document, DNS SRV
# _missive._udp.{server_name}, or port {DEFAULT_FEDERATION_PORT}.
listen = "{federation}"
# Port of other servers' HTTPS key documents.
https_port = 443
# DNS server for SRV and address lookups (default: the system resolver).
# dns_server = "127.0.0.1:53"
# Extra CA certificates (PEM) trusted for key documents, besides the WebPKI roots.
# ca_file = "extra-ca.pem"
# Retry delays toward an unreachable peer: exponential from retry_base_ms, with
# jitter, never above retry_cap_ms. Nothing queued is ever dropped.
retry_base_ms = 200
retry_cap_ms = 60000
# Test-only: let discovery connect to loopback, private, link-local and other special
# addresses found through .well-known or DNS. [[peers]] entries may always name them.
allow_special_addresses = false
# Federate only with these servers (absent: with every server not denied), and never
# with these; SIGHUP applies a change. Refused servers are closed at the handshake.
# allow = ["partner.example"]
# deny = ["spam.example"]

[limits]
# Bounds on what clients, peers and strangers can make this server spend. SIGHUP
# re-reads them where the running server can apply them.
# Time a client or peer has to deliver one request frame once its stream opened.
request_read_timeout_ms = 10000
# Bytes of request frames being read at once, over all clients / all peers.
client_request_bytes = 16777216
federation_request_bytes = 33554432
# Password hashes (argon2id, 19 MiB each) computed at once; more logins wait.
password_hashes = 2
# Federation connections at once: in all, from one IP address, and still in their
# handshake or key discovery (a stranger's connection stays there until its keys are
# found; it may open no stream before).
federation_connections = 1000
federation_connections_per_address = 8
federation_handshakes = 64
# Requests one peer may make per second (its connections share one bucket).
federation_requests_per_second = 10000
# Units held behind a gap, per (peer, conversation) and per peer; beyond them a unit is
# answered "retry" and stays queued at its origin. Released in steps of held_release_batch.
held_per_conversation = 1000
held_per_peer = 10000
held_release_batch = 256
# Users of other servers whose presence is remembered (only contacts of local users).
remote_presence_users = 100000
# Discovery: lookups in flight at once (one per server name), names cached, and the
# largest key document read (at most 65536).
discovery_lookups = 32
discovery_cache_names = 10000
key_document_bytes = 65536

# Peers pinned by hand: `missived peer add` appends entries like this one.
# [[peers]]
# name = "beta.example"
# address = "beta.example:{DEFAULT_FEDERATION_PORT}"
# key = "ed25519:..."

# Cluster mode: this server name served by several nodes over a NATS JetStream cluster
# (README, "Running a cluster"). Every node has the same server_name and key file and its
# own node name and data_dir; each keeps a full copy, replayed from the replicated log.
# A cluster does not federate yet. A change needs a restart.
# [cluster]
# engine = "nats"
# urls = ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222", "nats://10.0.0.3:4222"]
# node = "node-1"
# replicas = 3
# credentials = "nats.creds"   # or user and password, or token
"#
    )
}

/// `path` without its `.` components (`/srv/missive/./db` → `/srv/missive/db`), so that
/// messages name paths as an operator would type them.
fn tidy(path: &Path) -> PathBuf {
    let p: PathBuf = path.components().filter(|c| *c != std::path::Component::CurDir).collect();
    if p.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_loads_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(CONFIG_FILE);
        let name = ServerName::parse("alpha.test").unwrap();
        std::fs::write(&p, template(&name, default_client_listen(), default_federation_listen(), default_metrics_listen(), RegistrationPolicy::Closed)).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.server_name, name);
        assert_eq!(c.client.listen, default_client_listen());
        assert_eq!(c.registration.policy, RegistrationPolicy::Closed);
        assert_eq!(c.key_file, dir.path().join(".").join(KEY_FILE));
    }

    #[test]
    fn rejects_unknown_keys_and_weak_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(CONFIG_FILE);
        std::fs::write(&p, "server_name = \"a.test\"\nlisten = \"x\"\n").unwrap();
        assert!(Config::load(&p).is_err());
        std::fs::write(&p, "server_name = \"a.test\"\n[registration]\npolicy = \"token\"\n").unwrap();
        assert!(Config::load(&p).is_err());
        std::fs::write(&p, "server_name = \"A.test\"\n").unwrap();
        assert!(Config::load(&p).is_err());
        std::fs::write(&p, "server_name = \"127.0.0.1\"\n").unwrap();
        assert!(Config::load(&p).is_err());
    }

    #[test]
    fn discovery_limits_reach_discovery_and_are_checked_at_load() {
        let base = Path::new(".");
        let c = Config::parse(
            "server_name = \"a.test\"\n[federation]\nallow_special_addresses = true\n[limits]\ndiscovery_lookups = 3\ndiscovery_cache_names = 7\nkey_document_bytes = 1000\n",
            base,
        )
        .unwrap();
        let d = c.discovery().unwrap();
        assert_eq!((d.max_lookups, d.max_cache_names, d.max_key_document_bytes, d.allow_special_addresses), (3, 7, 1000, true));
        let d = Config::parse("server_name = \"a.test\"\n", base).unwrap().discovery().unwrap();
        assert_eq!((d.max_lookups, d.max_cache_names, d.max_key_document_bytes, d.allow_special_addresses), (32, 10_000, 65_536, false));
        Config::parse("server_name = \"a.test\"\n[limits]\nkey_document_bytes = 65536\n", base).unwrap();
        for bad in ["key_document_bytes = 65537", "key_document_bytes = 0", "discovery_lookups = 0", "discovery_cache_names = 0"] {
            let e = Config::parse(&format!("server_name = \"a.test\"\n[limits]\n{bad}\n"), base).unwrap_err();
            assert!(e.to_string().contains(bad.split(' ').next().unwrap()), "{bad}: {e}");
        }
    }

    fn parse(extra: &str) -> anyhow::Result<Config> {
        Config::parse(&format!("server_name = \"a.test\"\n{extra}"), Path::new("/srv/missive"))
    }

    #[test]
    fn accepts_levels_and_directives() {
        for level in ["error", "warn", "info", "debug", "trace", "off", "INFO", "missive_server=debug,info", "warn,quinn=off"] {
            let c = parse(&format!("[log]\nlevel = \"{level}\"\n")).unwrap_or_else(|e| panic!("{level}: {e:#}"));
            assert_eq!(c.log.level, level);
        }
    }

    #[test]
    fn rejects_log_levels_that_name_no_level() {
        for level in ["verbose", "", " , ", "missive_server", "missive_server=verbose", "info,missive_server", "missive_server[conn{peer=x}]"] {
            let e = format!("{:#}", parse(&format!("[log]\nlevel = \"{level}\"\n")).unwrap_err());
            assert!(e.contains("log.level") && e.contains("error, warn, info, debug, trace, off"), "{level:?}: {e}");
        }
    }

    #[test]
    fn rejects_each_bound_it_checks() {
        let cases = [
            ("[client]\nmax_connections = 0\n", "client.max_connections must be at least 1"),
            ("[client]\nmax_connections_per_address = 0\n", "client.max_connections_per_address must be at least 1"),
            ("[federation]\nretry_base_ms = 0\n", "federation.retry_base_ms must be at least 1"),
            ("[federation]\nretry_base_ms = 500\nretry_cap_ms = 499\n", "federation.retry_cap_ms (499) must be at least federation.retry_base_ms (500)"),
            ("[limits]\nkey_document_bytes = 65537\n", "limits.key_document_bytes is 65537, at most 65536"),
            ("[store]\ngroup_commit_linger_us = 5001\n", "store.group_commit_linger_us is 5001, at most 5000"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
        for limit in [
            "request_read_timeout_ms",
            "password_hashes",
            "federation_connections",
            "federation_connections_per_address",
            "federation_handshakes",
            "federation_requests_per_second",
            "held_per_conversation",
            "held_per_peer",
            "held_release_batch",
            "remote_presence_users",
            "discovery_lookups",
            "discovery_cache_names",
            "key_document_bytes",
        ] {
            let e = format!("{:#}", parse(&format!("[limits]\n{limit} = 0\n")).unwrap_err());
            assert!(e.contains(&format!("limits.{limit} must be at least 1")), "{limit}: {e}");
        }
        parse("[federation]\nretry_base_ms = 1\nretry_cap_ms = 1\n[limits]\nkey_document_bytes = 65536\n").unwrap();
    }

    #[test]
    fn reads_and_checks_the_cluster_section() {
        let base = "[cluster]\nengine = \"nats\"\nurls = [\"nats://127.0.0.1:4222\"]\nnode = \"n-1\"\n";
        let c = parse(base).unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!((cluster.engine, cluster.replicas, cluster.node.as_str()), (ClusterEngine::Nats, 3, "n-1"));
        assert_eq!(c.federation.allow, Some(Vec::new()), "a cluster federates with nobody yet");
        let creds = parse(&format!("{base}credentials = \"nats.creds\"\n")).unwrap();
        assert_eq!(creds.cluster.unwrap().credentials.unwrap(), Path::new("/srv/missive/nats.creds"));
        assert!(parse("").unwrap().cluster.is_none());
        let cases = [
            ("[cluster]\nengine = \"etcd\"\nurls = []\nnode = \"a\"\n", "unknown variant"),
            ("[cluster]\nengine = \"nats\"\nurls = []\nnode = \"a\"\n", "cluster.urls names no NATS server"),
            ("[cluster]\nengine = \"nats\"\nurls = [\"http://x\"]\nnode = \"a\"\n", "is not a nats:// or tls:// URL"),
            ("[cluster]\nengine = \"nats\"\nurls = [\"nats://x\"]\nnode = \"A b\"\n", "must be 1 to 32 of a-z"),
            ("[cluster]\nengine = \"nats\"\nurls = [\"nats://x\"]\nnode = \"a\"\nreplicas = 0\n", "cluster.replicas is 0"),
            ("[cluster]\nengine = \"nats\"\nurls = [\"nats://x\"]\nnode = \"a\"\nuser = \"u\"\n", "go together"),
            ("[cluster]\nengine = \"nats\"\nurls = [\"nats://x\"]\nnode = \"a\"\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\"\n", "give one of"),
            ("[[peers]]\nname = \"b.test\"\naddress = \"127.0.0.1:1\"\n[cluster]\nengine = \"nats\"\nurls = [\"nats://x\"]\nnode = \"a\"\n", "does not federate yet"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
