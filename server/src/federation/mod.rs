//! Federation links of a running server (spec `federation.md`): the async shell around
//! the protocol core's link, gap-fill and ephemeral state machines, one file per concept:
//! [`outbound`] (queue lanes, transactions, settlement through the writer), [`inbound`]
//! (accepting and authenticating peers, verifying, checking and receiving units, serving
//! backfill), [`backfill`] (filling gaps, the held-unit sweep) and [`ephemeral`]
//! (presence and typing, coalesced per destination).
//!
//! Bounds (spec F8, `[limits]`): connections in all and per address, handshakes and key
//! discoveries in progress, streams only after authentication, requests per second per
//! peer, a deadline and a shared byte budget for reading request frames. Every store read
//! runs on the blocking pool; every write goes through the writer.

mod announce;
mod backfill;
mod ephemeral;
mod inbound;
mod outbound;
mod restore;
mod rotation;

pub use rotation::OwnKeys;
pub mod policy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use missive_core::ephemeral::EduBatcher;
use missive_core::gapfill::GapFill;
use missive_core::link::{self, Link, LANES};
use missive_federation::discovery::{Discovery, PeerInfo};
use missive_federation::framing::{read_frame, write_frame, BodyBudget};
use missive_federation::tls::{self, Pin, PinnedServerVerifier};
use missive_federation::ServerKey;
use missive_spec::federation::{SignedUnit, Unit, FedErrorCode, FedRequest, FedRequestFrame, FedResponse, FedResponseFrame, FEDERATION_ALPN, MAX_FEDERATION_FRAME};
use missive_spec::{codec, ServerName, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tracing::Instrument;

use self::policy::FederationPolicy;
use crate::api::Slots;
use crate::limits::LiveLimits;
use crate::ratelimit::TokenBucket;
use crate::sequencer::Sequencer;
use crate::store::{blocking, keys, Cf, Direction, Store, StoreResult};

/// How long a peer may take to connect or answer one request (a transaction of 100
/// units takes milliseconds; silence this long means the peer is gone).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connecting peer may take to finish its handshake and have its keys found.
const AUTHENTICATION_TIMEOUT: Duration = Duration::from_secs(20);

/// What peers, and those claiming to be peers, may make this server spend (F8), fixed at
/// start-up; the rest is in [`LiveLimits`].
#[derive(Debug, Clone)]
pub struct FederationLimits {
    /// Connections still in their handshake or key discovery.
    pub handshakes: usize,
    /// Bytes of request frames read at once, over all peers.
    pub body_bytes: usize,
}

/// Timing knobs from the configuration.
#[derive(Debug, Clone)]
pub struct FederationTiming {
    pub retry_base: Duration,
    pub retry_cap: Duration,
}

/// A peer's link state, for operators (`missived peers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: ServerName,
    pub queue_depth: u64,
    pub up: bool,
    pub failures: u32,
    pub last_success_ms: Option<u64>,
    pub next_retry_in_ms: Option<u64>,
    pub last_error: Option<String>,
}

struct Peer {
    name: ServerName,
    /// Set when the operator removed the peer: its senders end.
    gone: std::sync::atomic::AtomicBool,
    /// One wake-up per lane.
    wake: Vec<Notify>,
    link: Mutex<Link>,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
}

impl Peer {
    fn wake_all(&self) {
        for w in &self.wake {
            w.notify_one();
        }
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Federation {
    server: ServerName,
    key: Arc<ServerKey>,
    endpoint: quinn::Endpoint,
    discovery: Arc<Discovery>,
    store: Arc<dyn Store>,
    sequencer: Sequencer,
    timing: FederationTiming,
    peers: Mutex<HashMap<ServerName, Arc<Peer>>>,
    /// Whom to tell at the next start that this server is back.
    known: announce::KnownPeers,
    gaps: Mutex<GapFill>,
    presence: Arc<crate::presence::Presence>,
    edus: Mutex<EduBatcher>,
    shutdown: watch::Receiver<bool>,
    live: Arc<LiveLimits>,
    slots: Arc<Slots>,
    handshakes: Arc<Semaphore>,
    bodies: BodyBudget,
    /// Request budget per peer, shared by its connections; an entry lives while one of
    /// them does (dead entries are pruned past the connection limit).
    buckets: Mutex<HashMap<ServerName, Weak<Mutex<TokenBucket>>>>,
    /// The allow and deny lists (F3.5), shared with the client API.
    policy: Arc<FederationPolicy>,
    metrics: Arc<crate::metrics::Metrics>,
    /// This server's current key and rotation chain (F2.7).
    own: Arc<OwnKeys>,
    /// When a peer's rotation was last looked for; only statically pinned peers are.
    rotation_tries: Mutex<HashMap<ServerName, (Instant, bool)>>,
    /// Held while looking for a peer's rotation.
    rotation_lock: tokio::sync::Mutex<()>,
    /// `high_water` requests per peer and minute (each reads up to 1 000 records, F12.1).
    high_water_limit: crate::ratelimit::FailureLimiter<ServerName>,
    /// The client side, which answers peers' key-directory requests (e2ee.md E3).
    service: std::sync::OnceLock<Arc<crate::service::Service>>,
}

/// `high_water` requests one peer may make a minute.
pub const HIGH_WATER_PER_MINUTE: u32 = 600;

fn response(res: FedResponse) -> Vec<u8> {
    codec::encode(&FedResponseFrame { v: PROTOCOL_VERSION, res })
}

fn fed_error(code: FedErrorCode, message: impl Into<String>) -> FedResponse {
    FedResponse::Error { code, message: message.into() }
}

impl Federation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        server: ServerName,
        key: Arc<ServerKey>,
        endpoint: quinn::Endpoint,
        discovery: Arc<Discovery>,
        store: Arc<dyn Store>,
        sequencer: Sequencer,
        timing: FederationTiming,
        presence: Arc<crate::presence::Presence>,
        shutdown: watch::Receiver<bool>,
        limits: FederationLimits,
        live: Arc<LiveLimits>,
        policy: Arc<FederationPolicy>,
        metrics: Arc<crate::metrics::Metrics>,
        own: Arc<OwnKeys>,
    ) -> Arc<Federation> {
        let (connections, per_address) = live.federation_connections();
        Arc::new(Federation {
            slots: Slots::new(connections, per_address),
            handshakes: Arc::new(Semaphore::new(limits.handshakes)),
            bodies: BodyBudget::new(limits.body_bytes),
            buckets: Mutex::new(HashMap::new()),
            live,
            server,
            key,
            endpoint,
            discovery,
            store,
            sequencer,
            gaps: Mutex::new(GapFill::new(timing.retry_base, timing.retry_cap)),
            timing,
            peers: Mutex::new(HashMap::new()),
            known: Default::default(),
            presence,
            edus: Mutex::new(EduBatcher::default()),
            shutdown,
            policy,
            metrics,
            own,
            rotation_tries: Mutex::new(HashMap::new()),
            rotation_lock: tokio::sync::Mutex::new(()),
            high_water_limit: crate::ratelimit::FailureLimiter::new(HIGH_WATER_PER_MINUTE, Duration::from_secs(60)),
            service: Default::default(),
        })
    }

    /// Puts new allow and deny lists into effect: links to servers now refused stop at
    /// their next send, and what waited for servers now allowed leaves at once.
    pub fn set_policy(self: &Arc<Self>, f: &crate::config::FederationSection) {
        let peers: Vec<(Arc<Peer>, bool)> = {
            let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            peers.values().map(|p| (p.clone(), self.policy.allows(&p.name))).collect()
        };
        self.policy.set(f);
        for (p, was_allowed) in peers {
            match (was_allowed, self.policy.allows(&p.name)) {
                (false, true) => {
                    p.link().contacted();
                    p.wake_all();
                }
                (true, false) => {
                    if let Some(c) = p.conn.try_lock().ok().and_then(|mut slot| slot.take()) {
                        c.close(policy::REFUSED_CLOSE_CODE.into(), policy::REFUSED_REASON);
                    }
                }
                _ => {}
            }
        }
    }

    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// Starts accepting peers, a sender for every destination with queued units, and the
    /// sweep of held units.
    pub async fn start(self: &Arc<Self>, mut queued: mpsc::UnboundedReceiver<ServerName>) -> anyhow::Result<()> {
        self.announce().await;
        let me = self.clone();
        tokio::spawn(async move { me.accept_loop().await });
        for dest in self.queued_destinations().await? {
            self.peer(&dest).wake_all();
        }
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(dest) = queued.recv().await {
                me.peer(&dest).wake_all();
            }
        });
        self.start_sweep();
        Ok(())
    }

    async fn queued_destinations(&self) -> StoreResult<Vec<ServerName>> {
        let store = self.store.clone();
        blocking(move || link::queued_destinations(&*store)).await?
    }

    fn peer(self: &Arc<Self>, name: &ServerName) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = peers.get(name) {
            return p.clone();
        }
        let p = Arc::new(Peer {
            name: name.clone(),
            wake: (0..LANES).map(|_| Notify::new()).collect(),
            gone: std::sync::atomic::AtomicBool::new(false),
            link: Mutex::new(Link::new(self.timing.retry_base, self.timing.retry_cap, crate::sabotage::core_faults())),
            conn: tokio::sync::Mutex::new(None),
        });
        peers.insert(name.clone(), p.clone());
        for lane in 0..LANES {
            let me = self.clone();
            let task_peer = p.clone();
            tokio::spawn(async move { me.sender(task_peer, lane).await }.instrument(tracing::info_span!("to", peer = %name, lane)));
        }
        p
    }

    /// Peers whose pins changed: their backoff starts afresh, a connection made with the
    /// old pin is dropped, and what waits for them goes at once.
    pub fn repinned(self: &Arc<Self>, names: impl Iterator<Item = ServerName>) {
        for name in names {
            let p = self.peer(&name);
            if let Ok(mut slot) = p.conn.try_lock() {
                *slot = None;
            }
            p.link().contacted();
            p.wake_all();
        }
    }

    /// The operator removed a peer (its queue is dropped): its senders end and it leaves
    /// `missived peers`. A later unit for it starts a new link.
    pub fn forget(&self, name: &ServerName) {
        self.unremember(name);
        let removed = self.peers.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        if let Some(p) = removed {
            p.gone.store(true, std::sync::atomic::Ordering::Relaxed);
            p.wake_all();
        }
    }

    /// The peer reached us: whatever we owe it may go at once.
    fn contacted(self: &Arc<Self>, name: &ServerName) {
        self.remember(name);
        let p = self.peer(name);
        p.link().contacted();
        p.wake_all();
    }

    /// The open connection to `peer`, or a new one. A watcher marks the link down the
    /// moment a connection ends, so `missived peers` shows a dead peer within the idle
    /// timeout of the keep-alives.
    async fn connection(&self, peer: &Arc<Peer>) -> Result<quinn::Connection, String> {
        if !self.policy.allows(&peer.name) {
            return Err(format!("{} is refused by this server's federation policy ([federation] allow/deny)", peer.name));
        }
        let mut guard = peer.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let info = self.discovery.resolve(&peer.name).await.map_err(|e| e.to_string())?;
        let conn = self.connect(&peer.name, &info).await?;
        self.remember(&peer.name);
        *guard = Some(conn.clone());
        let (watched, closed) = (peer.clone(), conn.clone());
        tokio::spawn(async move {
            let reason = closed.closed().await;
            watched.link().connection_lost(reason.to_string());
        });
        Ok(conn)
    }

    async fn connect(&self, peer: &ServerName, info: &PeerInfo) -> Result<quinn::Connection, String> {
        match self.connect_once(peer, info).await {
            Ok(c) => Ok(c),
            // Another key than expected: follow the peer's rotation if its old key signed
            // one (F2.7), then try again once with what discovery now says.
            Err((e, Some(seen))) if !info.keys.contains(&seen) => {
                if let Err(why) = self.follow_rotation(peer, info).await {
                    return Err(format!("{e} (and no key rotation to follow: {why})"));
                }
                let info = self.discovery.resolve(peer).await.map_err(|e| e.to_string())?;
                self.connect_once(peer, &info).await.map_err(|(e, _)| e)
            }
            Err((e, _)) => Err(e),
        }
    }

    /// One attempt; on failure, the key the peer presented, if it got that far.
    async fn connect_once(&self, peer: &ServerName, info: &PeerInfo) -> Result<quinn::Connection, (String, Option<missive_federation::PublicKey>)> {
        let verifier = PinnedServerVerifier::new(Pin::AnyOf(info.keys.clone()));
        let cfg = tls::federation_client_config(verifier.clone(), &self.key, self.server.as_str(), FEDERATION_ALPN)
            .map_err(|e| (e.to_string(), None))?;
        let connecting = self.endpoint.connect_with(cfg, info.addr, peer.as_str()).map_err(|e| (e.to_string(), None))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, connecting).await {
            Err(_) => Err((format!("connecting to {} timed out", info.addr), None)),
            Ok(Err(e)) => Err((format!("connecting to {} ({}): {e}", info.addr, info.via), verifier.seen())),
            Ok(Ok(c)) => Ok(c),
        }
    }

    /// Asks `dest` one request on the link (opening it if need be): a key query or claim
    /// for a client waiting on the answer (e2ee.md E3).
    pub async fn ask(self: &Arc<Self>, dest: &ServerName, req: FedRequest) -> Result<FedResponse, String> {
        let p = self.peer(dest);
        let conn = self.connection(&p).await?;
        // A claim is never sent twice: the first may have taken a key.
        let again = !matches!(req, FedRequest::KeysClaim { .. });
        match self.request(&conn, req.clone()).await {
            Ok(r) => Ok(r),
            // The connection may be one the peer forgot (it restarted): once more, on a
            // new one if that one is still the link's.
            Err(_) if again => {
                let mut guard = p.conn.lock().await;
                if guard.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
                    guard.take();
                    conn.close(0u32.into(), b"stale");
                }
                drop(guard);
                let conn = self.connection(&p).await?;
                self.request(&conn, req).await
            }
            Err(e) => Err(e),
        }
    }

    /// The client side that answers peers' key-directory requests.
    pub fn serve_keys_for(&self, service: Arc<crate::service::Service>) {
        let _ = self.service.set(service);
    }

    pub(super) async fn request(&self, conn: &quinn::Connection, req: FedRequest) -> Result<FedResponse, String> {
        let body = codec::encode(&FedRequestFrame { v: PROTOCOL_VERSION, req });
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(&mut send, &body).await.map_err(|e| e.to_string())?;
            let _ = send.finish();
            let body = read_frame(&mut recv, MAX_FEDERATION_FRAME).await.map_err(|e| e.to_string())?.ok_or("no response")?;
            let f: FedResponseFrame = codec::decode(&body).map_err(|e| e.to_string())?;
            Ok::<_, String>(f.res)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.map_err(|_| "peer did not answer in time".to_string())?
    }

    /// This server's keys that sign now.
    fn own_keys(&self) -> Vec<missive_federation::PublicKey> {
        vec![self.own.current]
    }

    /// This server's retired keys with the end of their validity (ms).
    fn retired_keys(&self) -> Vec<(missive_federation::PublicKey, u64)> {
        self.own.retired.clone()
    }

    /// For `/metrics`, on the blocking pool: each known peer's queue depth (a key count),
    /// the age of the oldest message at a lane's head, and whether its link is up.
    pub fn queue_figures(&self, now_ms: u64) -> StoreResult<Vec<crate::metrics::QueueFigures>> {
        let peers: Vec<Arc<Peer>> = self.peers.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut out = Vec::with_capacity(peers.len());
        for peer in peers {
            let depth = self.store.count(Cf::OutQueue, &keys::queue_of(&peer.name))?;
            let mut oldest = None::<u64>;
            for lane in 0..LANES {
                let head = self.store.scan(Cf::OutQueue, &keys::queue_lane(&peer.name, lane), None, Direction::Forward, 1)?;
                let ts = head.first().and_then(|(_, v)| {
                    let u: SignedUnit = missive_core::records::decode("out_queue", v).ok()?;
                    match codec::decode::<Unit>(&u.unit).ok()? {
                        Unit::Message(m) => Some(m.ts),
                        Unit::Receipt(_) | Unit::Devices(_) => None,
                    }
                });
                oldest = match (oldest, ts) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            let up = peer.link().status().up;
            out.push(crate::metrics::QueueFigures {
                peer: peer.name.to_string(),
                depth,
                oldest_seconds: oldest.map_or(0.0, |ts| now_ms.saturating_sub(ts) as f64 / 1000.0),
                up,
            });
        }
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        Ok(out)
    }

    /// Every peer we know of or owe units to, with its queue depth and link state.
    pub async fn status(self: &Arc<Self>) -> anyhow::Result<Vec<PeerStatus>> {
        let mut names: Vec<ServerName> = self.peers.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        for d in self.queued_destinations().await? {
            if !names.contains(&d) {
                names.push(d);
            }
        }
        names.sort();
        let depths = {
            let (store, names) = (self.store.clone(), names.clone());
            blocking(move || {
                names
                    .iter()
                    .map(|n| Ok(store.scan(Cf::OutQueue, &keys::queue_of(n), None, Direction::Forward, usize::MAX)?.len() as u64))
                    .collect::<StoreResult<Vec<u64>>>()
            })
            .await??
        };
        let now = Instant::now();
        let mut out = Vec::new();
        for (name, depth) in names.into_iter().zip(depths) {
            let st = self.peer(&name).link().status();
            out.push(PeerStatus {
                name,
                queue_depth: depth,
                up: st.up,
                failures: st.failures,
                last_success_ms: st.last_success_ms,
                next_retry_in_ms: st.next_attempt.map(|t| t.saturating_duration_since(now).as_millis() as u64),
                last_error: st.last_error,
            });
        }
        Ok(out)
    }
}
