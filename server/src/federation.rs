//! Federation links of a running server (spec `federation.md`).
//!
//! Outbound: each destination's durable queue is split into lanes by conversation; one
//! sender task per lane reads it in order, sends up to 100 units per transaction on its own
//! stream, deletes only what the peer acknowledged, and backs off with jitter while the
//! peer is unreachable — resetting the moment the peer contacts us. A slow conversation
//! holds up only its lane; a conversation's units never overtake each other.
//! Inbound: the peer's certificate key must be one discovery returned for the name it
//! claims; every unit is verified before it is decoded, checked, and handed to the writer.
//! Units held behind a gap make us ask their origin for the missing range.
//!
//! Bounds (spec F8, `[limits]`): connections in all and per address, handshakes and key
//! discoveries in progress, streams only after authentication, requests per second per
//! peer, a deadline and a shared byte budget for reading request frames. Every store read
//! runs on the blocking pool; every write goes through the writer.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use missive_federation::backoff::Backoff;
use missive_federation::discovery::{Discovery, PeerInfo};
use missive_federation::framing::{read_frame, read_request, write_frame, BodyBudget, FrameError};
use missive_federation::tls::{self, Pin, PinnedServerVerifier};
use missive_federation::{envelope, ServerKey};
use missive_spec::federation::{
    txn_id, FedErrorCode, FedRequest, FedRequestFrame, FedResponse, FedResponseFrame, SignedUnit, Unit, UnitResult,
    FEDERATION_ALPN, MAX_BACKFILL, MAX_FEDERATION_FRAME, MAX_TXN_UNITS,
};
use missive_spec::{codec, limits, ConversationId, Message, Receipt, ServerName, PROTOCOL_VERSION};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::accounts::now_ms;
use crate::api::Slots;
use crate::limits::LiveLimits;
use crate::ratelimit::TokenBucket;
use crate::records::{self, ConvRecord, DeadLetter, MsgIdRecord};
use crate::sequencer::{Backfill, InboundUnit, Sequencer};
use crate::store::{blocking, keys, Cf, Direction, Store, StoreResult};

/// How long a peer may take to connect or answer one request (a transaction of 100
/// units takes milliseconds; silence this long means the peer is gone).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Presence and typing updates toward one server are gathered this long, so a burst of
/// changes crosses as one request carrying the latest state of each user (F§11).
const EDU_COALESCE: Duration = Duration::from_millis(200);
/// Most updates in one ephemeral request.
const MAX_EDU_UPDATES: usize = 1_000;
/// Attempts to fill one gap before leaving it to the next sweep.
const BACKFILL_ATTEMPTS: u32 = 8;
/// How often held units are looked over for gaps nobody is filling (also at start-up).
const HELD_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
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

struct PeerState {
    backoff: Backoff,
    up: bool,
    last_success_ms: Option<u64>,
    last_error: Option<String>,
}

struct Peer {
    name: ServerName,
    /// One wake-up per lane.
    wake: Vec<Notify>,
    state: Mutex<PeerState>,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
}

impl Peer {
    fn wake_all(&self) {
        for w in &self.wake {
            w.notify_one();
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer answered a transaction.
    fn reached(&self) {
        let mut st = self.state();
        if !st.up {
            tracing::info!("federation link up");
        }
        st.up = true;
        st.last_success_ms = Some(now_ms());
        st.last_error = None;
    }

    /// The peer could not be reached or refused the request: back off.
    fn remote_failure(&self, e: String) {
        let mut st = self.state();
        let at = st.backoff.failure(Instant::now(), rand::thread_rng().gen());
        let retry_in = at.saturating_duration_since(Instant::now());
        if st.up || st.last_error.is_none() {
            tracing::warn!(error = %e, ?retry_in, "federation link down; queued units wait");
        } else {
            tracing::debug!(error = %e, ?retry_in, "federation link still down");
        }
        st.up = false;
        st.last_error = Some(e);
    }

    /// This server could not read or write its own store: back off as for the peer.
    fn local_failure(&self, e: String) {
        let mut st = self.state();
        st.backoff.failure(Instant::now(), rand::thread_rng().gen());
        st.last_error = Some(e);
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
    backfills: Mutex<HashSet<(ConversationId, ServerName)>>,
    presence: Arc<crate::presence::Presence>,
    edus: Mutex<HashMap<ServerName, PendingEdu>>,
    shutdown: watch::Receiver<bool>,
    live: Arc<LiveLimits>,
    slots: Arc<Slots>,
    handshakes: Arc<Semaphore>,
    bodies: BodyBudget,
    /// Request budget per peer, shared by its connections; an entry lives while one of
    /// them does (dead entries are pruned past the connection limit).
    buckets: Mutex<HashMap<ServerName, Weak<Mutex<TokenBucket>>>>,
}

/// Ephemeral updates gathered for one destination: the latest per user (and conversation).
#[derive(Default)]
struct PendingEdu {
    presence: HashMap<missive_spec::UserId, missive_spec::PresenceUpdate>,
    typing: HashMap<(missive_spec::UserId, ConversationId), missive_spec::TypingUpdate>,
}

/// A unit that passed its checks.
enum Checked {
    Message(InboundUnit),
    Receipt(Receipt),
}

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
            timing,
            peers: Mutex::new(HashMap::new()),
            backfills: Mutex::new(HashSet::new()),
            presence,
            edus: Mutex::new(HashMap::new()),
            shutdown,
        })
    }

    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// Gathers ephemeral updates per destination and sends each batch after
    /// [`EDU_COALESCE`]; best effort, never queued durably.
    pub fn start_edus(self: &Arc<Self>, mut rx: mpsc::UnboundedReceiver<(ServerName, missive_spec::Ephemeral)>) {
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((dest, e)) = rx.recv().await {
                let schedule = {
                    let mut edus = me.edus.lock().unwrap_or_else(|e| e.into_inner());
                    let fresh = !edus.contains_key(&dest);
                    let p = edus.entry(dest.clone()).or_default();
                    match e {
                        missive_spec::Ephemeral::Presence(u) => {
                            p.presence.insert(u.user.clone(), u);
                        }
                        missive_spec::Ephemeral::Typing(t) => {
                            p.typing.insert((t.user.clone(), t.conv), t);
                        }
                        missive_spec::Ephemeral::Unknown(_) => {}
                    }
                    fresh
                };
                if schedule {
                    let me = me.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(EDU_COALESCE).await;
                        let Some(p) = me.edus.lock().unwrap_or_else(|e| e.into_inner()).remove(&dest) else { return };
                        let req = FedRequest::Edu { typing: p.typing.into_values().collect(), presence: p.presence.into_values().collect() };
                        let peer = me.peer(&dest);
                        let sent = async {
                            let conn = me.connection(&dest, &peer.conn).await?;
                            me.request(&conn, req).await
                        };
                        if let Err(e) = sent.await {
                            tracing::debug!(peer = %dest, error = %e, "ephemeral update not delivered");
                        }
                    });
                }
            }
        });
    }

    /// Starts accepting peers, and a sender for every destination with queued units.
    pub async fn start(self: &Arc<Self>, mut queued: mpsc::UnboundedReceiver<ServerName>) -> anyhow::Result<()> {
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
        let me = self.clone();
        tokio::spawn(async move {
            let mut shutdown = me.shutdown.clone();
            loop {
                let store = me.store.clone();
                match blocking(move || held_gaps(&*store)).await.and_then(|r| r) {
                    Ok(gaps) => {
                        for (conv, origin, seq) in gaps {
                            me.spawn_backfill(Backfill { conv, origin, first: 0, last: seq - 1 });
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot look over held units"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(HELD_SWEEP_INTERVAL) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
        Ok(())
    }

    async fn queued_destinations(&self) -> StoreResult<Vec<ServerName>> {
        let store = self.store.clone();
        blocking(move || queued_destinations(&*store)).await?
    }

    fn peer(self: &Arc<Self>, name: &ServerName) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = peers.get(name) {
            return p.clone();
        }
        let p = Arc::new(Peer {
            name: name.clone(),
            wake: (0..keys::LANES).map(|_| Notify::new()).collect(),
            state: Mutex::new(PeerState {
                backoff: Backoff::new(self.timing.retry_base, self.timing.retry_cap),
                up: false,
                last_success_ms: None,
                last_error: None,
            }),
            conn: tokio::sync::Mutex::new(None),
        });
        peers.insert(name.clone(), p.clone());
        for lane in 0..keys::LANES {
            let me = self.clone();
            let task_peer = p.clone();
            tokio::spawn(async move { me.sender(task_peer, lane).await }.instrument(tracing::info_span!("to", peer = %name, lane)));
        }
        p
    }

    /// The peer reached us: whatever we owe it may go at once.
    fn contacted(self: &Arc<Self>, name: &ServerName) {
        let p = self.peer(name);
        p.state().backoff.reset();
        p.wake_all();
    }

    // ---- outbound -------------------------------------------------------------------

    async fn sender(self: Arc<Self>, peer: Arc<Peer>, lane: u8) {
        let mut shutdown = self.shutdown.clone();
        let wake = &peer.wake[usize::from(lane)];
        // The last queue key known removed: later scans start after it, so they do not
        // walk the deletion markers of everything already delivered.
        let mut after: Option<Vec<u8>> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let prefix = keys::queue_lane(&peer.name, lane);
            let (store, from) = (self.store.clone(), after.clone());
            let scanned = blocking(move || store.scan(Cf::OutQueue, &prefix, from.as_deref(), Direction::Forward, MAX_TXN_UNITS)).await;
            let rows = match scanned.and_then(|r| r) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbound queue");
                    peer.local_failure(format!("cannot read the outbound queue: {e}"));
                    Vec::new()
                }
            };
            let next = peer.state().backoff.next_attempt();
            let wait_until = match (rows.is_empty(), next) {
                (true, None) => None,
                (_, Some(at)) if at > Instant::now() => Some(at),
                (true, Some(_)) => None,
                (false, _) => {
                    if let Some(k) = self.deliver_batch(&peer, rows).await {
                        after = Some(k);
                    }
                    continue;
                }
            };
            let sleep = async {
                match wait_until {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = sleep => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Sends one transaction of queued rows and settles them through the writer: removes
    /// what the peer took, moves what it refused for good (and rows that no longer decode)
    /// to dead letters. Returns the last key of the leading run of rows now removed from
    /// the queue, if any. A failure here or at the peer backs off alike.
    async fn deliver_batch(&self, peer: &Peer, rows: Vec<(Vec<u8>, Vec<u8>)>) -> Option<Vec<u8>> {
        // Every row in queue order, with the index of its unit in `units` if it decodes.
        let mut units: Vec<SignedUnit> = Vec::with_capacity(rows.len());
        let rows: Vec<(Vec<u8>, Result<usize, (String, Vec<u8>)>)> = rows
            .into_iter()
            .map(|(k, v)| match records::decode::<SignedUnit>("out_queue", &v) {
                Ok(u) => {
                    units.push(u);
                    (k, Ok(units.len() - 1))
                }
                Err(e) => {
                    tracing::error!(error = %e, "queued unit does not decode; moving it to dead letters");
                    (k, Err((e.to_string(), v)))
                }
            })
            .collect();
        let mut results = Vec::new().into_iter();
        if !units.is_empty() {
            let (to_send, sent_as) = coalesce_receipts(&units);
            match self.transact(peer, to_send).await {
                Ok(sent) => results = sent_as.iter().map(|i| sent[*i]).collect::<Vec<_>>().into_iter(),
                Err(e) => {
                    *peer.conn.lock().await = None;
                    self.discovery.forget(&peer.name);
                    peer.remote_failure(e);
                    return None;
                }
            }
            peer.reached();
        }
        let (mut delivered, mut dead) = (Vec::new(), Vec::new());
        let mut retry = false;
        let mut removed_through = None;
        for (k, unit) in rows {
            match unit {
                Err((e, raw)) => {
                    // Set aside as it was, or the lane would read it forever.
                    let unit = SignedUnit { key: String::new(), sig: Vec::new(), unit: raw };
                    dead.push((k.clone(), DeadLetter { reason: format!("undecodable in the queue: {e}"), unit }));
                }
                Ok(i) => match results.next() {
                    Some(r) if r.delivered() => delivered.push(k.clone()),
                    Some(r) if r.permanent() => {
                        tracing::error!(result = ?r, "peer refused a unit for good; moved to dead letters");
                        dead.push((k.clone(), DeadLetter { reason: format!("{r:?}"), unit: units[i].clone() }));
                    }
                    _ => retry = true,
                },
            }
            if !retry {
                removed_through = Some(k);
            }
        }
        if let Err(e) = self.sequencer.settle(delivered, dead).await {
            // The peer has them: sending them again is safe (it answers duplicate), but
            // not at once, or a disk that refuses writes would make this a storm.
            tracing::error!(error = %e.message, "cannot record acknowledgements; units will be sent again after a pause");
            peer.local_failure(format!("cannot record acknowledgements: {}", e.message));
            return None;
        }
        if retry {
            let at = peer.state().backoff.failure(Instant::now(), rand::thread_rng().gen());
            tracing::warn!(retry_in = ?at.saturating_duration_since(Instant::now()), "peer asked to retry some units");
        } else if !units.is_empty() {
            peer.state().backoff.reset();
        }
        removed_through
    }

    async fn connection(&self, peer: &ServerName, slot: &tokio::sync::Mutex<Option<quinn::Connection>>) -> Result<quinn::Connection, String> {
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let info = self.discovery.resolve(peer).await.map_err(|e| e.to_string())?;
        let conn = self.connect(peer, &info).await?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(&self, peer: &ServerName, info: &PeerInfo) -> Result<quinn::Connection, String> {
        let verifier = PinnedServerVerifier::new(Pin::AnyOf(info.keys.clone()));
        let cfg = tls::federation_client_config(verifier, &self.key, self.server.as_str(), FEDERATION_ALPN)
            .map_err(|e| e.to_string())?;
        let connecting = self.endpoint.connect_with(cfg, info.addr, peer.as_str()).map_err(|e| e.to_string())?;
        tokio::time::timeout(REQUEST_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("connecting to {} timed out", info.addr))?
            .map_err(|e| format!("connecting to {} ({}): {e}", info.addr, info.via))
    }

    async fn request(&self, conn: &quinn::Connection, req: FedRequest) -> Result<FedResponse, String> {
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

    async fn transact(&self, peer: &Peer, units: Vec<SignedUnit>) -> Result<Vec<UnitResult>, String> {
        let conn = self.connection(&peer.name, &peer.conn).await?;
        let id = txn_id(&units).to_vec();
        let n = units.len();
        match self.request(&conn, FedRequest::Txn { id: id.clone(), units }).await? {
            FedResponse::TxnResult { id: got, results } if got == id && results.len() == n => Ok(results),
            FedResponse::Error { code, message } => Err(format!("peer refused the transaction: {code:?}: {message}")),
            other => Err(format!("unexpected answer to a transaction: {other:?}")),
        }
    }

    // ---- inbound --------------------------------------------------------------------

    async fn accept_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => {
                        let addr = incoming.remote_address();
                        let (max, per_address) = self.live.federation_connections();
                        let Some(slot) = self.slots.take_within(addr.ip(), max, per_address) else {
                            tracing::warn!(%addr, "federation connection refused: connection limit reached");
                            incoming.refuse();
                            continue;
                        };
                        let Ok(handshake) = self.handshakes.clone().try_acquire_owned() else {
                            tracing::warn!(%addr, "federation connection refused: too many handshakes in progress");
                            incoming.refuse();
                            continue;
                        };
                        let me = self.clone();
                        tokio::spawn(async move {
                            me.inbound_connection(incoming, addr, handshake).await;
                            drop(slot);
                        });
                    }
                    None => return,
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Completes the handshake and finds the peer's keys (bounded in time, and in number by
    /// `handshake`), then serves its requests.
    async fn inbound_connection(self: Arc<Self>, incoming: quinn::Incoming, addr: SocketAddr, handshake: OwnedSemaphorePermit) {
        let authenticated = tokio::time::timeout(AUTHENTICATION_TIMEOUT, self.authenticate(incoming, addr)).await;
        drop(handshake);
        let (conn, name, info) = match authenticated {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(_) => {
                tracing::warn!(%addr, "refusing peer: handshake and key discovery took over {AUTHENTICATION_TIMEOUT:?}");
                return;
            }
        };
        self.contacted(&name);
        let bucket = self.bucket(&name);
        // Only now may the peer open streams (F3.2).
        conn.set_max_concurrent_bi_streams(tls::FEDERATION_PEER_STREAMS.into());
        let span = tracing::info_span!("from", peer = %name);
        async move {
            loop {
                let (mut send, recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(_) => return,
                };
                let rate = self.live.requests_per_second();
                if !bucket.lock().unwrap_or_else(|e| e.into_inner()).take(Instant::now(), rate) {
                    let mut recv = recv;
                    let _ = recv.stop(0u32.into());
                    let msg = format!("at most {rate} requests per second");
                    if write_frame(&mut send, &response(fed_error(FedErrorCode::RateLimited, msg))).await.is_ok() {
                        let _ = send.finish();
                    }
                    continue;
                }
                let me = self.clone();
                let (name, info) = (name.clone(), info.clone());
                tokio::spawn(async move { me.inbound_stream(&name, &info, send, recv).await }.in_current_span());
            }
        }
        .instrument(span)
        .await
    }

    /// The connection, once the peer's certificate carries a key discovery returned for the
    /// one server name it names (F3.2); `None` after closing it otherwise.
    async fn authenticate(&self, incoming: quinn::Incoming, addr: SocketAddr) -> Option<(quinn::Connection, ServerName, PeerInfo)> {
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "federation handshake failed");
                return None;
            }
        };
        let Some((key, names)) = tls::peer_identity(&conn) else {
            conn.close(1u32.into(), b"no usable certificate");
            return None;
        };
        let name = match names.as_slice() {
            [one] => ServerName::parse(one).ok(),
            _ => None,
        };
        let Some(name) = name else {
            conn.close(1u32.into(), b"certificate must name exactly one server");
            return None;
        };
        let info = match self.discovery.resolve(&name).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(peer = %name, %addr, error = %e, "refusing peer: cannot discover its keys");
                conn.close(2u32.into(), b"cannot discover your keys");
                return None;
            }
        };
        if !info.keys.contains(&key) {
            tracing::warn!(peer = %name, %addr, presented = %key, "refusing peer: key is not one discovery returned");
            conn.close(2u32.into(), b"key not pinned for that server name");
            return None;
        }
        Some((conn, name, info))
    }

    /// The request budget `name` shares over its connections.
    fn bucket(&self, name: &ServerName) -> Arc<Mutex<TokenBucket>> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = buckets.get(name).and_then(Weak::upgrade) {
            return b;
        }
        if buckets.len() >= self.live.federation_connections().0 {
            buckets.retain(|_, b| b.strong_count() > 0);
        }
        let b = Arc::new(Mutex::new(TokenBucket::new(self.live.requests_per_second(), Instant::now())));
        buckets.insert(name.clone(), Arc::downgrade(&b));
        b
    }

    async fn inbound_stream(self: Arc<Self>, peer: &ServerName, info: &PeerInfo, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let res = match read_request(&mut recv, MAX_FEDERATION_FRAME, self.live.read_timeout(), &self.bodies).await {
            Ok(Some(frame)) => match codec::decode::<FedRequestFrame>(&frame.body) {
                Ok(f) if f.v != PROTOCOL_VERSION => fed_error(FedErrorCode::UnsupportedVersion, format!("version {}", f.v)),
                Ok(f) => {
                    drop(frame);
                    self.handle(peer, info, f.req).await
                }
                Err(e) => fed_error(FedErrorCode::BadFrame, e.to_string()),
            },
            Ok(None) => return,
            Err(FrameError::Decode(e)) => {
                let _ = recv.stop(0u32.into());
                fed_error(FedErrorCode::FrameTooLarge, e.to_string())
            }
            Err(e @ FrameError::Timeout(_)) => {
                tracing::warn!(error = %e, "request frame too slow; stream reset");
                let _ = recv.stop(0u32.into());
                fed_error(FedErrorCode::BadFrame, e.to_string())
            }
            Err(e) => fed_error(FedErrorCode::BadFrame, e.to_string()),
        };
        if write_frame(&mut send, &response(res)).await.is_ok() {
            let _ = send.finish();
        }
    }

    async fn handle(self: &Arc<Self>, peer: &ServerName, info: &PeerInfo, req: FedRequest) -> FedResponse {
        match req {
            FedRequest::Txn { id, units } => {
                if units.len() > MAX_TXN_UNITS {
                    return fed_error(FedErrorCode::TooMany, format!("at most {MAX_TXN_UNITS} units per transaction"));
                }
                if txn_id(&units)[..] != id[..] {
                    return fed_error(FedErrorCode::BadTxnId, "transaction id does not match its units");
                }
                let results = self.receive_units(peer, info, units).await;
                FedResponse::TxnResult { id, results }
            }
            FedRequest::Backfill { conv, last, first } => {
                let (me, peer) = (self.clone(), peer.clone());
                blocking(move || me.serve_backfill(&peer, conv, first, last))
                    .await
                    .unwrap_or_else(|_| fed_error(FedErrorCode::Internal, "storage fault"))
            }
            FedRequest::Edu { typing, presence } => {
                if typing.len() + presence.len() > MAX_EDU_UPDATES {
                    return fed_error(FedErrorCode::TooMany, format!("at most {MAX_EDU_UPDATES} updates per request"));
                }
                let presence: Vec<_> = presence.into_iter().filter(|p| p.user.is_on(peer)).collect();
                if !presence.is_empty() {
                    let (me, peer) = (self.clone(), peer.clone());
                    let _ = blocking(move || me.presence.remote_updates(&peer, presence)).await;
                }
                for t in typing {
                    let ok = t.user.is_on(peer)
                        && t.peer.is_on(&self.server)
                        && t.conv == ConversationId::one_to_one(&t.user, &t.peer);
                    if ok {
                        self.presence.remote_typing(t);
                    }
                }
                FedResponse::Ok {}
            }
        }
    }

    /// Verifies, checks and stores units from `peer`; one result per unit.
    async fn receive_units(self: &Arc<Self>, peer: &ServerName, info: &PeerInfo, units: Vec<SignedUnit>) -> Vec<UnitResult> {
        let n = units.len();
        // Signatures and store reads: work for the blocking pool, not a runtime worker.
        let checked = {
            let (me, peer, info) = (self.clone(), peer.clone(), info.clone());
            blocking(move || units.into_iter().map(|env| me.check_unit(&peer, &info, env)).collect::<Vec<_>>()).await
        };
        let Ok(checked) = checked else { return vec![UnitResult::Retry; n] };
        let mut results = vec![UnitResult::Retry; n];
        let mut accepted = Vec::new();
        let mut slots = Vec::new();
        let mut receipts = Vec::new();
        let mut receipt_slots = Vec::new();
        for (i, c) in checked.into_iter().enumerate() {
            match c {
                Ok(Checked::Message(u)) => {
                    accepted.push(u);
                    slots.push(i);
                }
                Ok(Checked::Receipt(r)) => {
                    receipts.push((r, None));
                    receipt_slots.push(i);
                }
                Err(r) => {
                    tracing::warn!(result = ?r, "refused unit");
                    results[i] = r;
                }
            }
        }
        if !receipts.is_empty() {
            match self.sequencer.receipts(receipts).await {
                Ok(moved) => {
                    for (i, m) in receipt_slots.into_iter().zip(moved) {
                        results[i] = if m { UnitResult::Accepted } else { UnitResult::Duplicate };
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot store inbound receipts; the peer will retry"),
            }
        }
        if accepted.is_empty() {
            return results;
        }
        match self.sequencer.inbound(accepted).await {
            Ok(outcomes) => {
                for (i, o) in slots.into_iter().zip(outcomes) {
                    results[i] = o.result;
                    if let Some(b) = o.backfill {
                        self.spawn_backfill(b);
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot store inbound units; the peer will retry"),
        }
        results
    }

    fn check_unit(&self, peer: &ServerName, info: &PeerInfo, env: SignedUnit) -> Result<Checked, UnitResult> {
        let opened = if crate::sabotage::active(crate::sabotage::Fault::SkipSignatureCheck) {
            envelope::open_trusted(&env).map_err(|e| e.result())
        } else {
            envelope::verify_for_peer(&env, &info.keys, &info.old_keys).map_err(|e| e.result())
        };
        let msg = match opened? {
            Unit::Message(m) => m,
            Unit::Receipt(r) => return self.check_receipt(peer, r).map(Checked::Receipt),
        };
        if msg.origin != *peer || !msg.from.is_on(peer) {
            return Err(UnitResult::WrongOrigin);
        }
        if !msg.to.is_on(&self.server) {
            return Err(UnitResult::UnknownRecipient);
        }
        if msg.conv != ConversationId::one_to_one(&msg.from, &msg.to) {
            return Err(UnitResult::ConvMismatch);
        }
        if !unit_limits_hold(&msg, &self.server) {
            return Err(UnitResult::InvalidUnit);
        }
        match self.store.get(Cf::Users, &keys::user(msg.to.localpart())) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(UnitResult::UnknownRecipient),
            Err(_) => return Err(UnitResult::Retry),
        }
        let hash = env.hash();
        Ok(Checked::Message(InboundUnit { env, msg, hash }))
    }

    /// A receipt speaks for a user of the sending server about a conversation with one of
    /// ours (F§10).
    fn check_receipt(&self, peer: &ServerName, r: Receipt) -> Result<Receipt, UnitResult> {
        if !r.user.is_on(peer) {
            return Err(UnitResult::WrongOrigin);
        }
        if !r.peer.is_on(&self.server) {
            return Err(UnitResult::UnknownRecipient);
        }
        if r.conv != ConversationId::one_to_one(&r.user, &r.peer) {
            return Err(UnitResult::ConvMismatch);
        }
        match self.store.get(Cf::Users, &keys::user(r.peer.localpart())) {
            Ok(Some(_)) => Ok(r),
            Ok(None) => Err(UnitResult::UnknownRecipient),
            Err(_) => Err(UnitResult::Retry),
        }
    }

    fn serve_backfill(&self, peer: &ServerName, conv: ConversationId, first: u64, last: u64) -> FedResponse {
        if first == 0 || last < first || last - first >= MAX_BACKFILL {
            return fed_error(FedErrorCode::TooMany, format!("ask for 1 to {MAX_BACKFILL} messages from seq 1 on"));
        }
        let rec = match self.store.get(Cf::Convs, &keys::conv(&conv)) {
            Ok(Some(v)) => match records::decode::<ConvRecord>("convs", &v) {
                Ok(r) => r,
                Err(_) => return fed_error(FedErrorCode::Internal, "conversation record unreadable"),
            },
            Ok(None) => return fed_error(FedErrorCode::Forbidden, "no such conversation here"),
            Err(_) => return fed_error(FedErrorCode::Internal, "storage fault"),
        };
        if !rec.members.iter().any(|u| u.is_on(peer)) {
            return fed_error(FedErrorCode::Forbidden, "you host no member of that conversation");
        }
        let mut units = Vec::new();
        for seq in first..=last {
            let found = self.store.get(Cf::MsgIds, &keys::msg_id(&conv, &self.server, seq)).ok().flatten().and_then(|v| {
                let id: MsgIdRecord = records::decode("msg_ids", &v).ok()?;
                let mut k = keys::messages_of(&conv);
                k.extend_from_slice(&id.key);
                let env = self.store.get(Cf::Messages, &k).ok().flatten()?;
                records::decode::<SignedUnit>("messages", &env).ok()
            });
            match found {
                Some(u) => units.push(u),
                None => break,
            }
        }
        FedResponse::Units { units }
    }

    fn spawn_backfill(self: &Arc<Self>, b: Backfill) {
        let slot = (b.conv, b.origin.clone());
        if !self.backfills.lock().unwrap_or_else(|e| e.into_inner()).insert(slot.clone()) {
            return; // already being filled
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.fill_gap(&b).await;
            me.backfills.lock().unwrap_or_else(|e| e.into_inner()).remove(&slot);
        });
    }

    async fn head_of(&self, conv: &ConversationId, origin: &ServerName) -> u64 {
        let (store, conv, origin) = (self.store.clone(), *conv, origin.clone());
        blocking(move || {
            store
                .get(Cf::Convs, &keys::conv(&conv))
                .ok()
                .flatten()
                .and_then(|v| records::decode::<ConvRecord>("convs", &v).ok())
                .map(|r| r.heads.get(&origin))
                .unwrap_or(0)
        })
        .await
        .unwrap_or(0)
    }

    async fn fill_gap(self: &Arc<Self>, b: &Backfill) {
        let mut delay = self.timing.retry_base;
        for attempt in 0..BACKFILL_ATTEMPTS {
            let head = self.head_of(&b.conv, &b.origin).await;
            if head >= b.last {
                return;
            }
            let first = head + 1;
            let last = b.last.min(head + MAX_BACKFILL);
            tracing::info!(conv = %b.conv, origin = %b.origin, first, last, attempt, "asking origin for missing units");
            match self.request_backfill(&b.origin, b.conv, first, last).await {
                Ok(()) => continue,
                Err(e) => tracing::warn!(origin = %b.origin, error = %e, "backfill failed"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.timing.retry_cap);
        }
    }

    async fn request_backfill(self: &Arc<Self>, origin: &ServerName, conv: ConversationId, first: u64, last: u64) -> Result<(), String> {
        let peer = self.peer(origin);
        let info = self.discovery.resolve(origin).await.map_err(|e| e.to_string())?;
        let conn = self.connection(origin, &peer.conn).await?;
        match self.request(&conn, FedRequest::Backfill { conv, last, first }).await? {
            FedResponse::Units { units } if units.is_empty() => Err("origin has none of the missing units".into()),
            FedResponse::Units { units } => {
                let results = self.receive_units(origin, &info, units).await;
                match results.iter().find(|r| !r.delivered()) {
                    Some(r) => Err(format!("backfilled unit refused: {r:?}")),
                    None => Ok(()),
                }
            }
            FedResponse::Error { code, message } => Err(format!("{code:?}: {message}")),
            other => Err(format!("unexpected answer to backfill: {other:?}")),
        }
    }

    // ---- operators ------------------------------------------------------------------

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
            let p = self.peer(&name);
            let st = p.state();
            out.push(PeerStatus {
                name,
                queue_depth: depth,
                up: st.up,
                failures: st.backoff.failures(),
                last_success_ms: st.last_success_ms,
                next_retry_in_ms: st.backoff.next_attempt().map(|t| t.saturating_duration_since(now).as_millis() as u64),
                last_error: st.last_error.clone(),
            });
        }
        Ok(out)
    }
}

/// Every destination with queued units.
fn queued_destinations(store: &dyn Store) -> StoreResult<Vec<ServerName>> {
    let mut out = Vec::new();
    let mut from: Option<Vec<u8>> = None;
    loop {
        let row = store.scan(Cf::OutQueue, &[], from.as_deref(), Direction::Forward, 1)?;
        let Some((k, _)) = row.into_iter().next() else { return Ok(out) };
        let Some((dest, _, _)) = keys::parse_queue(&k) else { return Ok(out) };
        from = Some(keys::queue(&dest, u8::MAX, u64::MAX));
        out.push(dest);
    }
}

/// The lowest held seq of every (conversation, origin) with held units: each waits on the
/// gap below it (held units survive restarts; the requests that would fill them do not).
fn held_gaps(store: &dyn Store) -> StoreResult<Vec<(ConversationId, ServerName, u64)>> {
    let mut out = Vec::new();
    let mut from: Option<Vec<u8>> = None;
    loop {
        let rows = store.scan(Cf::Held, &[], from.as_deref(), Direction::Forward, 1)?;
        let Some((k, _)) = rows.into_iter().next() else { return Ok(out) };
        let Some((conv, origin, seq)) = keys::parse_msg_id(&k) else { return Ok(out) };
        // The lowest held seq of this (conversation, origin) comes first; skip the rest.
        from = Some(keys::held(&conv, &origin, u64::MAX));
        out.push((conv, origin, seq));
    }
}

/// Queued receipts are watermarks: of several for the same (conversation, user, kind) only
/// the highest needs to travel. Returns the units to send and, for each queued unit, the
/// index of the sent unit whose result settles it.
fn coalesce_receipts(units: &[SignedUnit]) -> (Vec<SignedUnit>, Vec<usize>) {
    let mut send: Vec<SignedUnit> = Vec::with_capacity(units.len());
    let mut sent_as = Vec::with_capacity(units.len());
    let mut best: HashMap<(ConversationId, String, missive_spec::ReceiptKind), (usize, missive_spec::Watermark)> = HashMap::new();
    for u in units {
        if let Ok(Unit::Receipt(r)) = envelope::open_trusted(u) {
            let key = (r.conv, r.user.to_string(), r.kind);
            if let Some((j, w)) = best.get_mut(&key) {
                if r.up_to > *w {
                    send[*j] = u.clone();
                    *w = r.up_to;
                }
                sent_as.push(*j);
                continue;
            }
            best.insert(key, (send.len(), r.up_to));
        }
        sent_as.push(send.len());
        send.push(u.clone());
    }
    (send, sent_as)
}

/// Size and shape limits of a message unit (F§6): content as for local sends; the vector
/// names only the two servers of a 1:1 conversation and carries the unit's own seq.
pub fn unit_limits_hold(m: &Message, receiver: &ServerName) -> bool {
    m.seq >= 1
        && m.seq <= limits::MAX_SEQ
        && m.deps.get(&m.origin) == m.seq
        && m.deps.iter().all(|(s, _)| *s == m.origin || s == receiver)
        && !m.content.kind.is_empty()
        && m.content.kind.len() <= limits::MAX_CONTENT_TYPE_LEN
        && m.content.body.len() <= limits::MAX_CONTENT_BODY
}

#[cfg(test)]
mod tests {
    use super::*;
    use missive_spec::{OrderKey, ReceiptKind, UserId, Watermark};

    #[test]
    fn queued_receipts_travel_as_their_highest_watermark() {
        let key = ServerKey::generate();
        let (a, b) = (UserId::parse("@a:alpha.test").unwrap(), UserId::parse("@b:beta.test").unwrap());
        let conv = ConversationId::one_to_one(&a, &b);
        let r = |kind, seq| {
            let up_to = Watermark(OrderKey { rank: seq, origin: ServerName::parse("beta.test").unwrap(), seq });
            envelope::sign(&key, &Unit::Receipt(Receipt { conv, kind, peer: b.clone(), user: a.clone(), up_to }))
        };
        let msg = envelope::sign(&key, &Unit::Message(Message {
            to: b.clone(),
            ts: 0,
            seq: 1,
            conv,
            deps: Default::default(),
            from: a.clone(),
            origin: ServerName::parse("alpha.test").unwrap(),
            content: missive_spec::Content::text("x"),
        }));
        let queued = vec![r(ReceiptKind::Read, 3), msg.clone(), r(ReceiptKind::Read, 7), r(ReceiptKind::Delivered, 2), r(ReceiptKind::Read, 5)];
        let (send, sent_as) = coalesce_receipts(&queued);
        assert_eq!(send, vec![r(ReceiptKind::Read, 7), msg, r(ReceiptKind::Delivered, 2)]);
        assert_eq!(sent_as, vec![0, 1, 0, 2, 0]);
    }
}
