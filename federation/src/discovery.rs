//! Finding a server's federation address and keys (spec F§2), in order:
//!
//! 1. a static entry in the config (address and/or pinned key);
//! 2. `https://NAME/.well-known/missive/server` over HTTPS (WebPKI), a JSON key document;
//! 3. DNS SRV `_missive._udp.NAME` for the address;
//! 4. `NAME` on the default federation port.
//!
//! Keys come only from a static pin or the HTTPS document, never from DNS. Results are
//! cached for `ttl`, failures for `negative_ttl`.
//!
//! Outsiders choose the names looked up (an inbound peer's certificate names one), so
//! every cost has a bound (F2.5–F2.6): one lookup in flight per name, shared by everyone
//! asking; at most [`DiscoveryConfig::max_lookups`] names in flight, beyond which a
//! lookup fails at once with [`DiscoveryError::Busy`]; at most
//! [`DiscoveryConfig::max_cache_names`] cached results; key documents read only up to
//! [`DiscoveryConfig::max_key_document_bytes`]. Discovery never connects to an address
//! [`is_special_address`] refuses, nor to an IP literal, unless a static entry names it.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use missive_spec::{IdError, ServerName};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::keys::PublicKey;

/// Default UDP port of federation links (F§2).
pub const DEFAULT_FEDERATION_PORT: u16 = 7451;
/// Path of the key document.
pub const WELL_KNOWN_PATH: &str = "/.well-known/missive/server";
/// Longest one lookup may take, all steps together; then it fails with `TimedOut`.
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(30);
/// SRV targets tried per lookup, in order; the rest are ignored.
const MAX_SRV_TARGETS: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error("no trusted key for {0}: no static pin and no usable .well-known document ({1})")]
    NoKeys(String, String),
    #[error("cannot find an address for {0}: {1}")]
    NoAddress(String, String),
    /// The key document is longer than the configured limit; reading stopped there.
    #[error("key document of {name} is over {limit} bytes; reading stopped there (F2.2)")]
    KeyDocumentTooLarge { name: String, limit: usize },
    /// Every address `host` resolved to is one discovery does not connect to (F2.5).
    #[error("{host} (looked up for {name}) resolves only to loopback, private or other special addresses {addrs:?}; discovery does not connect there (F2.5)")]
    SpecialAddress { name: String, host: String, addrs: Vec<IpAddr> },
    /// The key document names an IP address where a DNS name belongs (F2.5).
    #[error("the key document of {name} gives the IP literal {address:?} as its federation address; only DNS names are followed (F2.5)")]
    IpLiteral { name: String, address: String },
    /// Too many lookups are in flight; nothing was looked up or cached. Try again later.
    #[error("{limit} discovery lookups already in flight; {name} not looked up (F2.6)")]
    Busy { name: String, limit: usize },
    #[error("discovery of {0} took longer than {LOOKUP_DEADLINE:?}")]
    TimedOut(String),
    #[error("resolver setup: {0}")]
    Setup(String),
}

/// A configured peer: `address` as `HOST:PORT`, and the keys it may present.
#[derive(Debug, Clone, Default)]
pub struct StaticPeer {
    pub address: Option<String>,
    pub keys: Vec<PublicKey>,
}

/// The key document served at [`WELL_KNOWN_PATH`] (F§2.2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyDocument {
    pub server_name: String,
    /// `HOST:PORT` of the federation endpoint; absent: use SRV, then the default port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<String>,
    pub keys: Vec<KeyEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyEntry {
    pub id: String,
    pub key: String,
    /// Milliseconds since the epoch after which the key no longer signs; absent: current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until_ms: Option<u64>,
}

/// Where and who a peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// Keys the peer may present and sign with now.
    pub keys: Vec<PublicKey>,
    /// Retired keys with their end of validity (ms), still good for verifying old units.
    pub old_keys: Vec<(PublicKey, u64)>,
    /// How the address was found: `static`, `well-known`, `srv` or `default`.
    pub via: &'static str,
}

pub struct DiscoveryConfig {
    pub statics: HashMap<ServerName, StaticPeer>,
    /// Port of the HTTPS server holding the key document (443 in production).
    pub https_port: u16,
    /// Extra trusted CA certificates (PEM) for the key document, besides the WebPKI roots.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// DNS server to ask; `None`: the system's resolver configuration.
    pub dns_server: Option<SocketAddr>,
    pub default_port: u16,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    /// Names looked up at once (at least 1); one more fails with [`DiscoveryError::Busy`].
    pub max_lookups: usize,
    /// Names whose result is cached (at least 1).
    pub max_cache_names: usize,
    /// Largest key document read, in bytes: 1 to [`MAX_KEY_DOCUMENT`].
    pub max_key_document_bytes: usize,
    /// Test-only: connect to special addresses and IP literals found by discovery too, so
    /// that tests on loopback can use `.well-known` and SRV. Never in production.
    pub allow_special_addresses: bool,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            statics: HashMap::new(),
            https_port: 443,
            extra_ca_pem: None,
            dns_server: None,
            default_port: DEFAULT_FEDERATION_PORT,
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(30),
            max_lookups: 32,
            max_cache_names: 10_000,
            max_key_document_bytes: MAX_KEY_DOCUMENT,
            allow_special_addresses: false,
        }
    }
}

/// A rotation (F2.7) followed from a statically pinned key: while the static entry still
/// names `from`, the peer's key is `key`, and the replaced keys verify older units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub from: PublicKey,
    pub key: PublicKey,
    pub retired: Vec<(PublicKey, u64)>,
}

pub struct Discovery {
    // Bound: the operator's `[[peers]]`; replaced whole by `set_statics`.
    statics: RwLock<HashMap<ServerName, StaticPeer>>,
    // Bound: one entry per static peer at most (only statically pinned keys are followed).
    rotated: RwLock<HashMap<ServerName, Rotated>>,
    https_port: u16,
    default_port: u16,
    ttl: Duration,
    negative_ttl: Duration,
    max_lookups: usize,
    max_key_document_bytes: usize,
    allow_special: bool,
    dns: Arc<TokioResolver>,
    http: reqwest::Client,
    state: Mutex<State>,
}

/// A lookup's outcome, as cached and as shared with those waiting for it.
type Outcome = Result<PeerInfo, DiscoveryError>;

/// What discovery remembers between calls; one lock, never held across an await.
struct State {
    cache: Cache,
    // Bound: `max_lookups` names, more are refused with `Busy`; an entry leaves when its lookup ends or its caller gives up.
    in_flight: HashMap<ServerName, watch::Receiver<Option<Outcome>>>,
    /// Bumped when cached results are thrown away, so that a lookup begun before does not
    /// cache what it found under the old statics.
    generation: u64,
}

/// Lookup results by server name, at most `cap` of them.
struct Cache {
    cap: usize,
    // Bound: `cap` names; when full, expired entries go first, then those expiring soonest.
    entries: HashMap<ServerName, (Instant, Outcome)>,
    // The same names as `entries`, by expiry (same bound, same eviction).
    by_expiry: BTreeSet<(Instant, ServerName)>,
}

impl Cache {
    fn new(cap: usize) -> Cache {
        Cache { cap: cap.max(1), entries: HashMap::new(), by_expiry: BTreeSet::new() }
    }

    /// The unexpired result for `name`.
    fn get(&self, name: &ServerName, now: Instant) -> Option<&Outcome> {
        self.entries.get(name).filter(|(until, _)| now < *until).map(|(_, r)| r)
    }

    /// Stores `r` until `until`, making room first: expired entries go, then as many of
    /// those expiring soonest as it takes to stay within `cap`.
    fn insert(&mut self, name: ServerName, until: Instant, r: Outcome, now: Instant) {
        self.remove(&name);
        while let Some((t, n)) = self.by_expiry.first().cloned() {
            if t > now && self.entries.len() < self.cap {
                break;
            }
            self.remove(&n);
        }
        self.by_expiry.insert((until, name.clone()));
        self.entries.insert(name, (until, r));
    }

    fn remove(&mut self, name: &ServerName) {
        if let Some((until, _)) = self.entries.remove(name) {
            self.by_expiry.remove(&(until, name.clone()));
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.by_expiry.clear();
    }

    #[cfg(test)]
    fn names(&self) -> BTreeSet<&str> {
        self.entries.keys().map(ServerName::as_str).collect()
    }
}

/// The next thing `resolve` does.
enum Step {
    /// Answer from the cache.
    Done(Outcome),
    /// Wait for the lookup of the same name already in flight.
    Wait(watch::Receiver<Option<Outcome>>),
    /// Look it up, for everyone who waits; with the generation of the cache at the start.
    Lead(watch::Sender<Option<Outcome>>, u64),
}

/// Removes the in-flight entry of a lookup whose caller gave up (its future was dropped),
/// so that those waiting for it start their own; disarmed when the lookup ends normally.
struct InFlight<'a> {
    state: &'a Mutex<State>,
    name: &'a ServerName,
    armed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.lock().unwrap_or_else(|e| e.into_inner()).in_flight.remove(self.name);
        }
    }
}

/// reqwest's resolver for key-document fetches: hickory, with special addresses left out
/// (F2.5) unless the test-only flag allows them.
struct HickoryForReqwest {
    dns: Arc<TokioResolver>,
    allow_special: bool,
}

/// Why the key-document fetch did not connect: every address of `host` was special.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to addresses discovery does not connect to: {addrs:?}")]
struct RefusedAddresses {
    host: String,
    addrs: Vec<IpAddr>,
}

impl reqwest::dns::Resolve for HickoryForReqwest {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (dns, allow_special) = (self.dns.clone(), self.allow_special);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let ips: Vec<IpAddr> = dns.lookup_ip(format!("{host}.")).await?.iter().collect();
            let usable: Vec<SocketAddr> =
                ips.iter().filter(|ip| allow_special || !is_special_address(**ip)).map(|ip| SocketAddr::new(*ip, 0)).collect();
            if usable.is_empty() {
                return Err(Box::new(RefusedAddresses { host, addrs: ips }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(usable.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A lookup gives up after about four seconds rather than stalling a sender.
fn bounded(o: &mut hickory_resolver::config::ResolverOpts) {
    o.timeout = Duration::from_secs(2);
    o.attempts = 2;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// An error and its causes, `outer: inner: innermost` (reqwest hides the cause otherwise).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// The [`RefusedAddresses`] among the causes of `e`, if the resolver refused.
fn refused_addresses<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a RefusedAddresses> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<RefusedAddresses>() {
            return Some(r);
        }
        cause = c.source();
    }
    None
}

/// The host of a `HOST:PORT` address.
#[derive(Debug, PartialEq, Eq)]
enum Host<'a> {
    Ip(IpAddr),
    /// Not a DNS name but what resolvers and URL parsers take for an IPv4 address
    /// (`127.1`, `0x7f000001`, CORE-ID-3).
    IpLike(&'a str),
    Name(&'a str),
}

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6) and says what kind of host it names.
fn parse_host_port(s: &str) -> Result<(Host<'_>, u16), String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok((Host::Ip(a.ip()), a.port()));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
    let port = port.parse::<u16>().map_err(|_| format!("{s:?} has no valid port"))?;
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok((Host::Ip(ip), port));
    }
    if matches!(ServerName::parse(&host.to_ascii_lowercase()), Err(IdError::IpLiteral(_))) {
        return Ok((Host::IpLike(host), port));
    }
    Ok((Host::Name(host), port))
}

impl Discovery {
    pub fn new(cfg: DiscoveryConfig) -> Result<Discovery, DiscoveryError> {
        let setup = |e: String| DiscoveryError::Setup(e);
        if cfg.max_lookups == 0 || cfg.max_cache_names == 0 {
            return Err(setup("max_lookups and max_cache_names must be at least 1".into()));
        }
        if !(1..=MAX_KEY_DOCUMENT).contains(&cfg.max_key_document_bytes) {
            return Err(setup(format!("max_key_document_bytes must be 1 to {MAX_KEY_DOCUMENT}")));
        }
        let dns = match cfg.dns_server {
            Some(server) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                let ns = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
                let mut b = Resolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                );
                bounded(b.options_mut());
                b.build().map_err(|e| setup(e.to_string()))?
            }
            None => {
                let mut b = TokioResolver::builder_tokio().map_err(|e| setup(e.to_string()))?;
                bounded(b.options_mut());
                b.build().map_err(|e| setup(e.to_string()))?
            }
        };
        let dns = Arc::new(dns);
        let mut http = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(true)
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve and connect on our behalf, past the address filter.
            .no_proxy()
            .dns_resolver(Arc::new(HickoryForReqwest { dns: dns.clone(), allow_special: cfg.allow_special_addresses }));
        if let Some(pem) = &cfg.extra_ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| setup(e.to_string()))? {
                http = http.add_root_certificate(cert);
            }
        }
        Ok(Discovery {
            statics: RwLock::new(cfg.statics),
            rotated: RwLock::new(HashMap::new()),
            https_port: cfg.https_port,
            default_port: cfg.default_port,
            ttl: cfg.ttl,
            negative_ttl: cfg.negative_ttl,
            max_lookups: cfg.max_lookups,
            max_key_document_bytes: cfg.max_key_document_bytes,
            allow_special: cfg.allow_special_addresses,
            dns,
            http: http.build().map_err(|e| setup(e.to_string()))?,
            state: Mutex::new(State { cache: Cache::new(cfg.max_cache_names), in_flight: HashMap::new(), generation: 0 }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the static peers (after `missived peer add`) and forgets cached results.
    pub fn set_statics(&self, statics: HashMap<ServerName, StaticPeer>) {
        *self.statics.write().unwrap_or_else(|e| e.into_inner()) = statics;
        let mut st = self.state();
        st.cache.clear();
        st.generation += 1;
    }

    /// Follows `name`'s rotation from its statically pinned key (the caller checked the
    /// chain, F2.7), and forgets what is cached about it.
    pub fn learn_rotation(&self, name: &ServerName, rotated: Rotated) {
        self.rotated.write().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), rotated);
        self.forget(name);
    }

    /// The servers the operator pinned (`[[peers]]`).
    pub fn static_names(&self) -> Vec<ServerName> {
        self.statics.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// The keys the operator pinned for `name` (`[[peers]]`), if any.
    pub fn static_keys(&self, name: &ServerName) -> Vec<PublicKey> {
        self.statics.read().unwrap_or_else(|e| e.into_inner()).get(name).map(|s| s.keys.clone()).unwrap_or_default()
    }

    /// Forgets what is cached about `name` (after a failed connection, say).
    pub fn forget(&self, name: &ServerName) {
        self.state().cache.remove(name);
    }

    /// Where and who `name` is: from the cache, from the lookup of `name` already in
    /// flight, or from a new lookup if fewer than `max_lookups` are in flight.
    pub async fn resolve(&self, name: &ServerName) -> Result<PeerInfo, DiscoveryError> {
        loop {
            match self.step(name)? {
                Step::Done(r) => return r,
                Step::Wait(mut rx) => {
                    if let Ok(r) = rx.wait_for(Option::is_some).await {
                        if let Some(r) = r.as_ref() {
                            return r.clone();
                        }
                    }
                    // Whoever was looking gave up before the end: look again.
                }
                Step::Lead(tx, generation) => return self.lead(name, tx, generation).await,
            }
        }
    }

    /// What `resolve` does next for `name`, decided under the lock.
    fn step(&self, name: &ServerName) -> Result<Step, DiscoveryError> {
        let mut st = self.state();
        if let Some(r) = st.cache.get(name, Instant::now()) {
            return Ok(Step::Done(r.clone()));
        }
        if let Some(rx) = st.in_flight.get(name) {
            return Ok(Step::Wait(rx.clone()));
        }
        if st.in_flight.len() >= self.max_lookups {
            tracing::debug!(peer = %name, in_flight = st.in_flight.len(), "discovery busy; lookup refused");
            return Err(DiscoveryError::Busy { name: name.to_string(), limit: self.max_lookups });
        }
        let (tx, rx) = watch::channel(None);
        st.in_flight.insert(name.clone(), rx);
        Ok(Step::Lead(tx, st.generation))
    }

    /// Runs the lookup of `name` for everyone waiting on `tx`, and caches its outcome.
    async fn lead(&self, name: &ServerName, tx: watch::Sender<Option<Outcome>>, generation: u64) -> Outcome {
        let mut guard = InFlight { state: &self.state, name, armed: true };
        let r = match tokio::time::timeout(LOOKUP_DEADLINE, self.lookup(name)).await {
            Ok(r) => r,
            Err(_) => Err(DiscoveryError::TimedOut(name.to_string())),
        };
        if let Err(e) = &r {
            tracing::warn!(peer = %name, error = %e, "discovery failed");
        }
        {
            let mut st = self.state();
            if st.generation == generation {
                let now = Instant::now();
                let ttl = if r.is_ok() { self.ttl } else { self.negative_ttl };
                st.cache.insert(name.clone(), now + ttl, r.clone(), now);
            }
            st.in_flight.remove(name);
            guard.armed = false;
        }
        let _ = tx.send(Some(r.clone()));
        r
    }

    async fn lookup(&self, name: &ServerName) -> Result<PeerInfo, DiscoveryError> {
        let fixed = self.statics.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned().unwrap_or_default();
        let need_doc = fixed.keys.is_empty() || fixed.address.is_none();
        let doc = if need_doc { Some(self.fetch_document(name).await) } else { None };
        let (keys, old_keys, doc_addr) = match (&fixed.keys[..], &doc) {
            ([], Some(Ok(d))) => {
                let (keys, old) = document_keys(d, now_ms());
                (keys, old, d.federation.clone())
            }
            ([], Some(Err(e))) => return Err(e.clone()),
            (ks, d) => {
                let addr = d.as_ref().and_then(|d| d.as_ref().ok()).and_then(|d| d.federation.clone());
                match self.rotated.read().unwrap_or_else(|e| e.into_inner()).get(name) {
                    Some(r) if ks.contains(&r.from) => (vec![r.key], r.retired.clone(), addr),
                    _ => (ks.to_vec(), Vec::new(), addr),
                }
            }
        };
        if keys.is_empty() {
            return Err(DiscoveryError::NoKeys(name.to_string(), "the key document lists no current key".into()));
        }
        let (addr, via) = if let Some(a) = &fixed.address {
            (self.static_address(a).await.map_err(|e| DiscoveryError::NoAddress(name.to_string(), e))?, "static")
        } else if let Some(a) = &doc_addr {
            (self.document_address(name, a).await?, "well-known")
        } else if let Some(a) = self.srv(name).await {
            (a, "srv")
        } else {
            (self.found_host(name, name.as_str(), self.default_port).await?, "default")
        };
        Ok(PeerInfo { addr, keys, old_keys, via })
    }

    async fn fetch_document(&self, name: &ServerName) -> Result<KeyDocument, DiscoveryError> {
        let url = format!("https://{}:{}{WELL_KNOWN_PATH}", name.as_str(), self.https_port);
        let fail = |e: String| DiscoveryError::NoKeys(name.to_string(), format!("{url}: {e}"));
        let parsed = reqwest::Url::parse(&url).map_err(|e| fail(e.to_string()))?;
        // reqwest connects to an IP-literal host without asking the resolver, where
        // addresses are screened; server names never are one (CORE-ID-3), but make sure.
        if parsed.domain().is_none() {
            return Err(DiscoveryError::IpLiteral { name: name.to_string(), address: name.to_string() });
        }
        let mut resp = self.http.get(parsed).send().await.map_err(|e| match refused_addresses(&e) {
            Some(r) => DiscoveryError::SpecialAddress { name: name.to_string(), host: r.host.clone(), addrs: r.addrs.clone() },
            None => fail(error_chain(&e)),
        })?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let body = match read_bounded(&mut resp, self.max_key_document_bytes).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => {
                return Err(DiscoveryError::KeyDocumentTooLarge { name: name.to_string(), limit: self.max_key_document_bytes })
            }
            Err(BodyError::Read(e)) => return Err(fail(error_chain(&e))),
        };
        parse_key_document(&body, name).map_err(fail)
    }

    async fn srv(&self, name: &ServerName) -> Option<SocketAddr> {
        let lookup = self.dns.srv_lookup(format!("_missive._udp.{}.", name.as_str())).await.ok()?;
        let mut targets: Vec<(u16, u16, String, u16)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.priority, u16::MAX - s.weight, s.target.to_ascii(), s.port)),
                _ => None,
            })
            .collect();
        targets.sort();
        for (_, _, target, port) in targets.into_iter().take(MAX_SRV_TARGETS) {
            match self.found_host(name, target.trim_end_matches('.'), port).await {
                Ok(a) => return Some(a),
                Err(e) => tracing::debug!(peer = %name, %target, error = %e, "SRV target unusable"),
            }
        }
        None
    }

    /// A static entry's `HOST:PORT`: any address, as configured (F2.5 exempts it).
    async fn static_address(&self, s: &str) -> Result<SocketAddr, String> {
        let (host, port) = parse_host_port(s)?;
        let host = match host {
            Host::Ip(ip) => return Ok(SocketAddr::new(ip, port)),
            Host::IpLike(h) | Host::Name(h) => h,
        };
        let ips = self.lookup_ips(host).await?;
        ips.first().map(|ip| SocketAddr::new(*ip, port)).ok_or_else(|| format!("{host}: no address"))
    }

    /// The key document's `federation` address: a DNS name, whose addresses are screened.
    async fn document_address(&self, name: &ServerName, s: &str) -> Result<SocketAddr, DiscoveryError> {
        let (host, port) = parse_host_port(s).map_err(|e| DiscoveryError::NoAddress(name.to_string(), e))?;
        match host {
            Host::Ip(ip) if self.allow_special => Ok(SocketAddr::new(ip, port)),
            Host::Ip(_) | Host::IpLike(_) => Err(DiscoveryError::IpLiteral { name: name.to_string(), address: s.to_owned() }),
            Host::Name(h) => self.found_host(name, h, port).await,
        }
    }

    /// The first address of `host` that discovery may connect to, looked up for `name`.
    async fn found_host(&self, name: &ServerName, host: &str, port: u16) -> Result<SocketAddr, DiscoveryError> {
        let ips = self.lookup_ips(host).await.map_err(|e| DiscoveryError::NoAddress(name.to_string(), e))?;
        match ips.iter().find(|ip| self.allow_special || !is_special_address(**ip)) {
            Some(ip) => Ok(SocketAddr::new(*ip, port)),
            None if ips.is_empty() => Err(DiscoveryError::NoAddress(name.to_string(), format!("{host}: no address"))),
            None => Err(DiscoveryError::SpecialAddress { name: name.to_string(), host: host.to_owned(), addrs: ips }),
        }
    }

    async fn lookup_ips(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let ips = self.dns.lookup_ip(format!("{host}.")).await.map_err(|e| format!("{host}: {e}"))?;
        Ok(ips.iter().collect())
    }
}

enum BodyError {
    TooLarge,
    Read(reqwest::Error),
}

/// Reads a response body of at most `limit` bytes, chunk by chunk: a declared length
/// over the limit is refused before reading, and reading stops at the first chunk that
/// would cross it, so no more than `limit` bytes plus one chunk are ever held.
async fn read_bounded(resp: &mut reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Whether discovery refuses to connect to `ip` when it found the address itself (F2.5):
/// anything but a globally reachable unicast address. Refused: unspecified, loopback,
/// private (RFC 1918, IPv6 ULA), shared (CGNAT 100.64/10), link-local, multicast,
/// broadcast and reserved, documentation and benchmarking ranges, IETF protocol
/// assignments, site-local, and every IPv6 form that carries one of those IPv4 addresses
/// (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`). IPv6 outside
/// `2000::/3`, which holds all global unicast space, is refused whole (this includes the
/// deprecated IPv4-compatible `::a.b.c.d`).
pub fn is_special_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_special_v4(v4),
        IpAddr::V6(v6) => is_special_v6(v6),
    }
}

fn is_special_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    matches!(
        (a, b, c),
        (0, _, _)                 // "this network", 0.0.0.0 unspecified
            | (10, _, _)          // private
            | (100, 64..=127, _)  // shared address space (CGNAT)
            | (127, _, _)         // loopback
            | (169, 254, _)       // link-local
            | (172, 16..=31, _)   // private
            | (192, 0, 0)         // IETF protocol assignments
            | (192, 0, 2)         // documentation (TEST-NET-1)
            | (192, 88, 99)       // 6to4 relay anycast (deprecated)
            | (192, 168, _)       // private
            | (198, 18..=19, _)   // benchmarking
            | (198, 51, 100)      // documentation (TEST-NET-2)
            | (203, 0, 113)       // documentation (TEST-NET-3)
            | (224..=255, _, _) // multicast, reserved, broadcast
    )
}

fn is_special_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        // IPv4-mapped, and NAT64's well-known prefix: judged by the IPv4 address.
        [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => is_special_v4(embedded(hi, lo)),
        // 6to4: the IPv4 address follows the prefix.
        [0x2002, hi, lo, ..] => is_special_v4(embedded(hi, lo)),
        // Outside global unicast: ::, ::1, ::/96, 100::/64, fc00::/7, fe80::/10, ff00::/8, ...
        [first, ..] if first & 0xe000 != 0x2000 => true,
        // IETF protocol assignments (Teredo, benchmarking 2001:2::/48, ORCHID), documentation.
        [0x2001, 0x0000..=0x01ff, ..] | [0x2001, 0x0db8, ..] | [0x3fff, 0x0000..=0x0fff, ..] => true,
        _ => false,
    }
}

/// Most bytes a key document may have (F2.2).
pub const MAX_KEY_DOCUMENT: usize = 64 * 1024;

/// Reads a key document fetched for `name` (F2.2): bounded, JSON, and about `name`.
pub fn parse_key_document(body: &[u8], name: &ServerName) -> Result<KeyDocument, String> {
    if body.len() > MAX_KEY_DOCUMENT {
        return Err("key document over 64 KiB".into());
    }
    let doc: KeyDocument = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if doc.server_name != name.as_str() {
        return Err(format!("document is for {:?}", doc.server_name));
    }
    Ok(doc)
}

/// Current and retired keys of a document at time `now` (ms); malformed entries skipped.
pub fn document_keys(d: &KeyDocument, now: u64) -> (Vec<PublicKey>, Vec<(PublicKey, u64)>) {
    let mut keys = Vec::new();
    let mut old = Vec::new();
    for e in &d.keys {
        let Ok(k) = PublicKey::parse(&e.key) else { continue };
        if k.key_id() != e.id {
            continue;
        }
        match e.valid_until_ms {
            Some(t) if t <= now => old.push((k, t)),
            _ => keys.push(k),
        }
    }
    (keys, old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ServerKey;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn document_keys_split_current_and_retired_and_skip_bad_ids() {
        let (a, b, c) = (ServerKey::generate().public(), ServerKey::generate().public(), ServerKey::generate().public());
        let d = KeyDocument {
            server_name: "beta.test".into(),
            federation: None,
            keys: vec![
                KeyEntry { id: a.key_id(), key: a.to_text(), valid_until_ms: None },
                KeyEntry { id: b.key_id(), key: b.to_text(), valid_until_ms: Some(1000) },
                KeyEntry { id: "wrong".into(), key: c.to_text(), valid_until_ms: None },
                KeyEntry { id: "x".into(), key: "not a key".into(), valid_until_ms: None },
            ],
        };
        assert_eq!(document_keys(&d, 2000), (vec![a], vec![(b, 1000)]));
        assert_eq!(document_keys(&d, 500).0, vec![a, b]);
    }

    #[tokio::test]
    async fn static_entries_resolve_without_network_and_failures_are_cached() {
        let k = ServerKey::generate().public();
        let name = ServerName::parse("beta.test").unwrap();
        let mut statics = HashMap::new();
        statics.insert(name.clone(), StaticPeer { address: Some("127.0.0.3:7451".into()), keys: vec![k] });
        let d = Discovery::new(DiscoveryConfig {
            statics,
            dns_server: Some("127.0.0.1:9".parse().unwrap()),
            https_port: 9,
            ..Default::default()
        })
        .unwrap();
        let p = d.resolve(&name).await.unwrap();
        assert_eq!((p.addr, p.keys, p.via), ("127.0.0.3:7451".parse().unwrap(), vec![k], "static"));
        let unknown = ServerName::parse("nowhere.test").unwrap();
        let e = d.resolve(&unknown).await.unwrap_err();
        assert!(matches!(e, DiscoveryError::NoKeys(..)), "{e}");
        let t = Instant::now();
        assert_eq!(d.resolve(&unknown).await.unwrap_err(), e);
        assert!(t.elapsed() < Duration::from_millis(50), "a cached failure answers at once");
    }

    #[test]
    fn special_addresses_are_told_from_global_ones() {
        let special = [
            "0.0.0.0", "0.1.2.3", "10.0.0.1", "10.255.255.255", "100.64.0.1", "100.127.255.254", "127.0.0.1",
            "127.0.0.31", "169.254.169.254", "172.16.0.1", "172.31.255.255", "192.0.0.8", "192.0.2.1", "192.88.99.1",
            "192.168.1.1", "198.18.0.1", "198.19.255.255", "198.51.100.7", "203.0.113.9", "224.0.0.1",
            "239.255.255.250", "240.0.0.1", "255.255.255.255",
            "::", "::1", "::127.0.0.1", "::8.8.8.8", "::ffff:127.0.0.1", "::ffff:10.1.2.3", "::ffff:169.254.169.254",
            "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::1", "100::1", "2001::1", "2001:2::1",
            "2001:10::1", "2001:db8::1", "2002:7f00:1::1", "2002:c0a8:101::1", "3fff::1", "5f00::1", "fc00::1",
            "fd12:3456::1", "fe80::1", "fec0::1", "ff02::1", "ff0e::1",
        ];
        let global = [
            "1.1.1.1", "8.8.8.8", "9.255.255.255", "11.0.0.1", "100.63.255.255", "100.128.0.1", "126.255.255.255",
            "128.0.0.1", "169.253.0.1", "172.15.255.255", "172.32.0.1", "192.0.1.1", "192.0.3.1", "192.167.1.1",
            "192.169.0.1", "198.17.255.255", "198.20.0.1", "203.0.114.1", "223.255.255.254",
            "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1", "2001:4860:4860::8888", "2606:4700::1111",
            "2a00:1450::1", "3ffe::1",
        ];
        for a in special {
            assert!(is_special_address(a.parse().unwrap()), "{a} should be refused");
        }
        for a in global {
            assert!(!is_special_address(a.parse().unwrap()), "{a} should be allowed");
        }
    }

    #[test]
    fn host_port_forms() {
        let ip = |s: &str| Host::Ip(s.parse().unwrap());
        assert_eq!(parse_host_port("127.0.0.1:7451").unwrap(), (ip("127.0.0.1"), 7451));
        assert_eq!(parse_host_port("[::1]:7451").unwrap(), (ip("::1"), 7451));
        assert_eq!(parse_host_port("127.1:7451").unwrap(), (Host::IpLike("127.1"), 7451));
        assert_eq!(parse_host_port("0x7F000001:7451").unwrap(), (Host::IpLike("0x7F000001"), 7451));
        assert_eq!(parse_host_port("fed.beta.example:7451").unwrap(), (Host::Name("fed.beta.example"), 7451));
        assert!(parse_host_port("fed.beta.example").is_err());
        assert!(parse_host_port("fed.beta.example:99999").is_err());
    }

    #[test]
    fn a_full_cache_drops_expired_entries_then_those_expiring_soonest() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let name = |n: &str| ServerName::parse(n).unwrap();
        let r = || Err(DiscoveryError::Setup("x".into()));
        let mut c = Cache::new(3);
        c.insert(name("a.test"), s(10), r(), t0);
        c.insert(name("b.test"), s(5), r(), t0);
        c.insert(name("c.test"), s(20), r(), t0);
        // Full, nothing expired: b, the soonest to expire, makes room.
        c.insert(name("d.test"), s(30), r(), t0);
        assert_eq!(c.names(), ["a.test", "c.test", "d.test"].into());
        // Replacing a cached name evicts nobody.
        c.insert(name("c.test"), s(25), r(), s(1));
        assert_eq!(c.names(), ["a.test", "c.test", "d.test"].into());
        // At 11 s, a has expired: it goes, not c (the soonest of the live ones).
        assert!(c.get(&name("a.test"), s(11)).is_none());
        c.insert(name("e.test"), s(40), r(), s(11));
        assert_eq!(c.names(), ["c.test", "d.test", "e.test"].into());
        // Several expired at once all go.
        c.insert(name("f.test"), s(50), r(), s(35));
        assert_eq!(c.names(), ["e.test", "f.test"].into());
        assert_eq!((c.entries.len(), c.by_expiry.len()), (2, 2));
    }

    #[tokio::test]
    async fn many_names_never_grow_the_cache_past_its_bound() {
        let d = Discovery::new(DiscoveryConfig {
            dns_server: Some("127.0.0.1:9".parse().unwrap()),
            https_port: 9,
            max_cache_names: 5,
            ..Default::default()
        })
        .unwrap();
        for i in 0..20 {
            let name = ServerName::parse(&format!("n{i}.localhost")).unwrap();
            assert!(d.resolve(&name).await.is_err());
            assert!(d.state().cache.entries.len() <= 5);
        }
        assert_eq!(d.state().cache.entries.len(), 5);
    }

    /// What the test HTTPS server sends after the request head.
    #[derive(Clone)]
    enum Body {
        /// This document, with its length.
        Doc(String),
        /// Spaces until the client goes away (or 1 GiB), no declared length.
        Endless,
        /// A `content-length` of 1 GiB, then spaces until the client goes away.
        Declared,
    }

    /// A local HTTPS server for key documents, with a certificate from its own CA for
    /// every name it serves. Answers wait while `open` is false.
    struct TestHttps {
        port: u16,
        ca_pem: String,
        /// Requests received (complete heads).
        requests: Arc<AtomicUsize>,
        /// Body bytes written, all responses together.
        sent: Arc<AtomicUsize>,
        open: watch::Sender<bool>,
    }

    impl TestHttps {
        async fn start(bodies: HashMap<String, Body>, delay: Duration) -> TestHttps {
            crate::tls::install_provider();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let leaf_key = rcgen::KeyPair::generate().unwrap();
            let names: Vec<String> = bodies.keys().cloned().collect();
            let leaf = rcgen::CertificateParams::new(names).unwrap().signed_by(&leaf_key, &ca, &ca_key).unwrap();
            let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
            let cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![leaf.der().clone()], key_der)
                .unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let (requests, sent) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let (open, open_rx) = watch::channel(true);
            let (bodies, req, snt) = (Arc::new(bodies), requests.clone(), sent.clone());
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (acceptor, bodies, req, snt, mut open) = (acceptor.clone(), bodies.clone(), req.clone(), snt.clone(), open_rx.clone());
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        req.fetch_add(1, Ordering::SeqCst);
                        let text = String::from_utf8_lossy(&head).to_lowercase();
                        let host = text.lines().find_map(|l| l.strip_prefix("host: ")).and_then(|h| h.split(':').next()).unwrap_or_default();
                        let body = bodies.get(host).cloned();
                        tokio::time::sleep(delay).await;
                        let _ = open.wait_for(|o| *o).await;
                        let endless = |declared: bool| {
                            let length = if declared { "content-length: 1073741824\r\n" } else { "" };
                            format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{length}connection: close\r\n\r\n")
                        };
                        let (head, endless_body) = match body {
                            Some(Body::Doc(d)) => {
                                (format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{d}", d.len()), false)
                            }
                            Some(Body::Endless) => (endless(false), true),
                            Some(Body::Declared) => (endless(true), true),
                            None => ("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(), false),
                        };
                        if tls.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        let chunk = [b' '; 16 * 1024];
                        while endless_body && snt.load(Ordering::SeqCst) < 1 << 30 {
                            if tls.write_all(&chunk).await.is_err() {
                                return;
                            }
                            snt.fetch_add(chunk.len(), Ordering::SeqCst);
                        }
                        let _ = tls.shutdown().await;
                    });
                }
            });
            TestHttps { port, ca_pem: ca.pem(), requests, sent, open }
        }

        /// Discovery pointed at this server, with DNS nowhere (`*.localhost` is answered
        /// by the resolver itself: 127.0.0.1 and ::1).
        fn discovery(&self, cfg: DiscoveryConfig) -> Arc<Discovery> {
            Arc::new(
                Discovery::new(DiscoveryConfig {
                    https_port: self.port,
                    extra_ca_pem: Some(self.ca_pem.clone().into_bytes()),
                    dns_server: Some("127.0.0.1:9".parse().unwrap()),
                    ..cfg
                })
                .unwrap(),
            )
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }
    }

    fn doc_for(name: &str, key: &PublicKey) -> String {
        serde_json::to_string(&KeyDocument {
            server_name: name.into(),
            federation: Some("127.0.0.1:7451".into()),
            keys: vec![KeyEntry { id: key.key_id(), key: key.to_text(), valid_until_ms: None }],
        })
        .unwrap()
    }

    fn allowing() -> DiscoveryConfig {
        DiscoveryConfig { allow_special_addresses: true, ..Default::default() }
    }

    /// Waits until `check` holds, failing after ten seconds.
    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn concurrent_resolves_of_one_name_share_one_lookup() {
        let key = ServerKey::generate().public();
        let docs = HashMap::from([("beta.localhost".to_owned(), Body::Doc(doc_for("beta.localhost", &key)))]);
        let srv = TestHttps::start(docs, Duration::from_millis(300)).await;
        let d = srv.discovery(allowing());
        let name = ServerName::parse("beta.localhost").unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        // More callers than the lookup cap: they wait for one lookup, they do not take slots.
        for _ in 0..100 {
            let (d, name) = (d.clone(), name.clone());
            tasks.spawn(async move { d.resolve(&name).await });
        }
        while let Some(r) = tasks.join_next().await {
            let p = r.unwrap().unwrap();
            assert_eq!((p.addr, p.keys, p.via), ("127.0.0.1:7451".parse().unwrap(), vec![key], "well-known"));
        }
        assert_eq!(srv.requests(), 1, "every caller made its own lookup");
        assert!(d.state().in_flight.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_caller_takes_over_when_the_looking_one_gives_up() {
        let key = ServerKey::generate().public();
        let docs = HashMap::from([("beta.localhost".to_owned(), Body::Doc(doc_for("beta.localhost", &key)))]);
        let srv = TestHttps::start(docs, Duration::ZERO).await;
        srv.open.send_replace(false);
        let d = srv.discovery(allowing());
        let name = ServerName::parse("beta.localhost").unwrap();
        let first = tokio::spawn({
            let (d, name) = (d.clone(), name.clone());
            async move { d.resolve(&name).await }
        });
        until("the first lookup to reach the server", || srv.requests() == 1).await;
        let second = tokio::spawn({
            let (d, name) = (d.clone(), name.clone());
            async move { d.resolve(&name).await }
        });
        first.abort();
        until("the second caller to start its own lookup", || srv.requests() == 2).await;
        srv.open.send_replace(true);
        assert_eq!(second.await.unwrap().unwrap().keys, vec![key]);
    }

    #[tokio::test]
    async fn lookups_over_the_cap_fail_at_once_and_are_not_cached() {
        let key = ServerKey::generate().public();
        let names = ["a.localhost", "b.localhost", "c.localhost"];
        let docs = names.iter().map(|n| (n.to_string(), Body::Doc(doc_for(n, &key)))).collect();
        let srv = TestHttps::start(docs, Duration::ZERO).await;
        srv.open.send_replace(false);
        let d = srv.discovery(DiscoveryConfig { max_lookups: 2, ..allowing() });
        let [a, b, c] = names.map(|n| ServerName::parse(n).unwrap());
        let spawn = |n: &ServerName| {
            let (d, n) = (d.clone(), n.clone());
            tokio::spawn(async move { d.resolve(&n).await })
        };
        let (ta, tb) = (spawn(&a), spawn(&b));
        until("two lookups in flight", || srv.requests() == 2).await;
        let t = Instant::now();
        assert_eq!(d.resolve(&c).await, Err(DiscoveryError::Busy { name: "c.localhost".into(), limit: 2 }));
        assert!(t.elapsed() < Duration::from_millis(100), "a refused lookup waited");
        // Asking for a name already in flight waits for that lookup instead.
        let ta2 = spawn(&a);
        srv.open.send_replace(true);
        for t in [ta, tb, ta2] {
            assert_eq!(t.await.unwrap().unwrap().keys, vec![key]);
        }
        assert_eq!(srv.requests(), 2);
        // The refusal was not cached: c resolves now.
        assert_eq!(d.resolve(&c).await.unwrap().keys, vec![key]);
        assert_eq!(srv.requests(), 3);
    }

    #[tokio::test]
    async fn key_document_reading_stops_at_the_limit() {
        let key = ServerKey::generate().public();
        let doc = doc_for("small.localhost", &key);
        let docs = HashMap::from([
            ("endless.localhost".to_owned(), Body::Endless),
            ("declared.localhost".to_owned(), Body::Declared),
            ("small.localhost".to_owned(), Body::Doc(doc.clone())),
        ]);
        let srv = TestHttps::start(docs, Duration::ZERO).await;
        let d = srv.discovery(allowing());
        for n in ["endless.localhost", "declared.localhost"] {
            let t = Instant::now();
            let e = d.resolve(&ServerName::parse(n).unwrap()).await.unwrap_err();
            assert_eq!(e, DiscoveryError::KeyDocumentTooLarge { name: n.into(), limit: MAX_KEY_DOCUMENT });
            assert!(t.elapsed() < Duration::from_secs(5), "{n}: took {:?}", t.elapsed());
        }
        // What the server managed to write before the connections broke: socket buffers'
        // worth, not the gigabyte.
        assert!(srv.sent.load(Ordering::SeqCst) < 64 << 20, "{} bytes sent", srv.sent.load(Ordering::SeqCst));
        // The limit is the configured one.
        let small = ServerName::parse("small.localhost").unwrap();
        let d = srv.discovery(DiscoveryConfig { max_key_document_bytes: doc.len() - 1, ..allowing() });
        assert_eq!(d.resolve(&small).await, Err(DiscoveryError::KeyDocumentTooLarge { name: small.to_string(), limit: doc.len() - 1 }));
        let d = srv.discovery(DiscoveryConfig { max_key_document_bytes: doc.len(), ..allowing() });
        assert_eq!(d.resolve(&small).await.unwrap().keys, vec![key]);
        // Out of range limits are refused.
        for bad in [0, MAX_KEY_DOCUMENT + 1] {
            let cfg = DiscoveryConfig { max_key_document_bytes: bad, ..Default::default() };
            assert!(matches!(Discovery::new(cfg), Err(DiscoveryError::Setup(_))));
        }
    }

    #[tokio::test]
    async fn addresses_discovery_found_itself_are_screened_and_static_ones_are_not() {
        let key = ServerKey::generate().public();
        let docs = HashMap::from([("beta.localhost".to_owned(), Body::Doc(doc_for("beta.localhost", &key)))]);
        let srv = TestHttps::start(docs, Duration::ZERO).await;
        let (gamma, delta) = (ServerName::parse("gamma.localhost").unwrap(), ServerName::parse("delta.localhost").unwrap());
        let statics = HashMap::from([
            (gamma.clone(), StaticPeer { address: Some("gamma.localhost:7451".into()), keys: vec![key] }),
            (delta.clone(), StaticPeer { address: None, keys: vec![key] }),
        ]);
        let d = srv.discovery(DiscoveryConfig { statics, ..Default::default() });
        // The key document of a name on loopback is not fetched.
        let beta = ServerName::parse("beta.localhost").unwrap();
        match d.resolve(&beta).await {
            Err(DiscoveryError::SpecialAddress { host, addrs, .. }) => {
                assert_eq!(host, "beta.localhost");
                assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
            }
            other => panic!("beta.localhost: {other:?}"),
        }
        assert_eq!(srv.requests(), 0, "the key document was fetched from loopback");
        // A static entry may name loopback.
        let p = d.resolve(&gamma).await.unwrap();
        assert!(p.addr.ip().is_loopback() && p.addr.port() == 7451 && p.via == "static", "{p:?}");
        // Keys pinned, address to discover: the default-port lookup is screened.
        assert!(matches!(d.resolve(&delta).await, Err(DiscoveryError::SpecialAddress { host, .. }) if host == "delta.localhost"));
        // The document's `federation`: IP literals refused, names screened.
        for lit in ["127.0.0.1:7451", "8.8.8.8:7451", "[::1]:7451", "127.1:7451", "0x7f000001:7451"] {
            assert!(matches!(d.document_address(&beta, lit).await, Err(DiscoveryError::IpLiteral { .. })), "{lit}");
        }
        assert!(matches!(d.document_address(&beta, "fed.localhost:7451").await, Err(DiscoveryError::SpecialAddress { .. })));
        // The test-only flag lets all of them through.
        let open = srv.discovery(allowing());
        assert!(open.document_address(&beta, "fed.localhost:7451").await.unwrap().ip().is_loopback());
        assert_eq!(open.resolve(&beta).await.unwrap().via, "well-known");
    }
}
