//! Finding a server's federation address and keys (spec F§2), in order:
//!
//! 1. a static entry in the config (address and/or pinned key);
//! 2. `https://NAME/.well-known/missive/server` over HTTPS (WebPKI), a JSON key document;
//! 3. DNS SRV `_missive._udp.NAME` for the address;
//! 4. `NAME` on the default federation port.
//!
//! Keys come only from a static pin or the HTTPS document, never from DNS. Results are
//! cached for `ttl`, failures for `negative_ttl`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use missive_spec::ServerName;
use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;

/// Default UDP port of federation links (F§2).
pub const DEFAULT_FEDERATION_PORT: u16 = 7451;
/// Path of the key document.
pub const WELL_KNOWN_PATH: &str = "/.well-known/missive/server";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error("no trusted key for {0}: no static pin and no usable .well-known document ({1})")]
    NoKeys(String, String),
    #[error("cannot find an address for {0}: {1}")]
    NoAddress(String, String),
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
        }
    }
}

pub struct Discovery {
    statics: RwLock<HashMap<ServerName, StaticPeer>>,
    https_port: u16,
    default_port: u16,
    ttl: Duration,
    negative_ttl: Duration,
    dns: Arc<TokioResolver>,
    http: reqwest::Client,
    cache: Mutex<HashMap<ServerName, Cached>>,
}

/// A lookup result and when it stops being good.
type Cached = (Instant, Result<PeerInfo, DiscoveryError>);

struct HickoryForReqwest(Arc<TokioResolver>);

impl reqwest::dns::Resolve for HickoryForReqwest {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let dns = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let ips = dns.lookup_ip(format!("{host}.")).await?;
            let addrs: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
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

impl Discovery {
    pub fn new(cfg: DiscoveryConfig) -> Result<Discovery, DiscoveryError> {
        let setup = |e: String| DiscoveryError::Setup(e);
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
            .dns_resolver(Arc::new(HickoryForReqwest(dns.clone())));
        if let Some(pem) = &cfg.extra_ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| setup(e.to_string()))? {
                http = http.add_root_certificate(cert);
            }
        }
        Ok(Discovery {
            statics: RwLock::new(cfg.statics),
            https_port: cfg.https_port,
            default_port: cfg.default_port,
            ttl: cfg.ttl,
            negative_ttl: cfg.negative_ttl,
            dns,
            http: http.build().map_err(|e| setup(e.to_string()))?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Replaces the static peers (after `missived peer add`) and forgets cached results.
    pub fn set_statics(&self, statics: HashMap<ServerName, StaticPeer>) {
        *self.statics.write().unwrap_or_else(|e| e.into_inner()) = statics;
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Forgets what is cached about `name` (after a failed connection, say).
    pub fn forget(&self, name: &ServerName) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    pub async fn resolve(&self, name: &ServerName) -> Result<PeerInfo, DiscoveryError> {
        if let Some((until, r)) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            if Instant::now() < *until {
                return r.clone();
            }
        }
        let r = self.lookup(name).await;
        let ttl = if r.is_ok() { self.ttl } else { self.negative_ttl };
        if let Err(e) = &r {
            tracing::warn!(peer = %name, error = %e, "discovery failed");
        }
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), (Instant::now() + ttl, r.clone()));
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
            ([], Some(Err(e))) => return Err(DiscoveryError::NoKeys(name.to_string(), e.clone())),
            (ks, d) => (ks.to_vec(), Vec::new(), d.as_ref().and_then(|d| d.as_ref().ok()).and_then(|d| d.federation.clone())),
        };
        if keys.is_empty() {
            return Err(DiscoveryError::NoKeys(name.to_string(), "the key document lists no current key".into()));
        }
        let noaddr = |e: String| DiscoveryError::NoAddress(name.to_string(), e);
        let (addr, via) = if let Some(a) = &fixed.address {
            (self.host_port(a).await.map_err(noaddr)?, "static")
        } else if let Some(a) = &doc_addr {
            (self.host_port(a).await.map_err(noaddr)?, "well-known")
        } else if let Some(a) = self.srv(name).await {
            (a, "srv")
        } else {
            (self.host(name.as_str(), self.default_port).await.map_err(noaddr)?, "default")
        };
        Ok(PeerInfo { addr, keys, old_keys, via })
    }

    async fn fetch_document(&self, name: &ServerName) -> Result<KeyDocument, String> {
        let url = format!("https://{}:{}{WELL_KNOWN_PATH}", name.as_str(), self.https_port);
        let resp = self.http.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let body = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
        parse_key_document(&body, name).map_err(|e| format!("{url}: {e}"))
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
        for (_, _, target, port) in targets {
            if let Ok(a) = self.host(target.trim_end_matches('.'), port).await {
                return Some(a);
            }
        }
        None
    }

    async fn host_port(&self, s: &str) -> Result<SocketAddr, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a);
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
        let port = port.parse::<u16>().map_err(|_| format!("{s:?} has no valid port"))?;
        self.host(host, port).await
    }

    async fn host(&self, host: &str, port: u16) -> Result<SocketAddr, String> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        let ips = self.dns.lookup_ip(format!("{host}.")).await.map_err(|e| format!("{host}: {e}"))?;
        ips.iter().next().map(|ip| SocketAddr::new(ip, port)).ok_or_else(|| format!("{host}: no address"))
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
}
