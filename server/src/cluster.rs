//! Cluster mode: one server name served by several nodes over a NATS JetStream cluster.
//!
//! Every change goes through one JetStream stream, the server's *log*: a node that wants
//! an [`Op`] applied appends it there (with a random id), and every node, itself
//! included, applies the log's entries in the log's order, one write per entry, each at
//! the time the stream recorded for it, through its own writer and protocol core, into
//! its own RocksDB. The core is deterministic, so every node that applied the same
//! entries holds the same store, and any node can serve any client's reads. A node that
//! cannot read an entry (a newer build wrote it), or finds entries missing, stops
//! applying rather than go on apart from the others. JetStream's Raft replication (replicas 3, `sync_interval: always`) is
//! what makes an entry durable; this node answers the op's caller once its own writer has
//! applied the entry, so an answer never names something a later node could lack. A node
//! that starts, or restarts after a crash, replays the log from the last entry its store
//! recorded ([`APPLIED_KEY`], written in the same batch as the entry's changes) and
//! serves only once it caught up with the log as it found it. A store that was a single
//! server's, or restored from a backup, is refused: a node starts empty and replays.
//!
//! Idempotency does not rest on JetStream's deduplication window: a client's retry on
//! another node appends a second entry, and the core answers it from its durable
//! idempotency record like any retry. The message id (`Nats-Msg-Id`) only makes this
//! node's own re-publishing of one entry, after a lost acknowledgement, harmless.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures_util::StreamExt;
use missive_spec::{ErrorCode, ServerName};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::ClusterSection;
use crate::error::ApiError;
use crate::sequencer::{Cmd, Op, Replier};
use crate::store::{Cf, Store};

/// The `Meta` record of the last log entry applied: its position and time, 8 bytes each.
pub const APPLIED_KEY: &[u8] = b"cluster_applied";
/// Longest wait for an appended op to come back applied; the caller then hears that the
/// change may or may not be made (a retry with the same ids is safe).
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Ops this node appended and waits for at once; more are refused until some are applied.
const MAX_WAITING: usize = 65_536;
/// How long a node tries to append one entry (re-publishing it under the same message
/// id) before it tells the caller the log cannot be reached; well within the window.
const APPEND_TIMEOUT: Duration = Duration::from_secs(15);
/// JetStream remembers message ids this long: re-publishing within it is deduplicated.
const DEDUPE_WINDOW: Duration = Duration::from_secs(120);
/// A consumer that delivered nothing this long is checked against the log's length.
const STALL_CHECK: Duration = Duration::from_secs(1);
/// How long a node waits at start for JetStream to find or create its log.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node waits for the NATS servers at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn encode_applied(seq: u64, time_ms: u64) -> Vec<u8> {
    [seq.to_be_bytes(), time_ms.to_be_bytes()].concat()
}

fn decode_applied(v: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let time = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    Some((seq, time))
}

/// One entry of the log, as stored in the stream (CBOR). The op is encoded on its own, so
/// that an entry whose op this build cannot read is still applied (as a failed op) in
/// its place, by every node alike.
#[derive(Serialize, Deserialize)]
struct Entry {
    /// The entry format ([`ENTRY_VERSION`]); a node stops at one it does not know.
    v: u8,
    #[serde(with = "serde_bytes")]
    id: Vec<u8>,
    #[serde(with = "serde_bytes")]
    op: Vec<u8>,
}

const ENTRY_VERSION: u8 = 1;

/// The answer when a change went, or may have gone, into the log but this node cannot
/// say what became of it: the client retries with the same ids (on another node if need
/// be), and the core's idempotency gives the first answer.
pub fn outcome_unknown() -> ApiError {
    ApiError::new(ErrorCode::ShuttingDown, "this node cannot tell whether the change took effect; retry with the same ids, on another node if need be")
}

fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing CBOR into a Vec cannot fail for these types.
    ciborium::into_writer(v, &mut out).expect("CBOR into memory");
    out
}

/// The stream and subject names of a server name's log (JetStream names allow no `.`).
pub fn names(server: &ServerName) -> (String, String) {
    let flat = server.as_str().replace('.', "_");
    (format!("missive-log-{flat}"), format!("missive.log.{flat}"))
}

/// How far this node's writer applied the log: the last entry's position and time.
pub struct Progress {
    seq: AtomicU64,
    time: AtomicU64,
    tx: watch::Sender<u64>,
}

impl Progress {
    pub fn new(seq: u64, time_ms: u64) -> Arc<Progress> {
        Arc::new(Progress { seq: AtomicU64::new(seq), time: AtomicU64::new(time_ms), tx: watch::channel(seq).0 })
    }

    /// The last entry this node's store holds: its position and time.
    pub fn get(&self) -> (u64, u64) {
        (self.seq.load(Ordering::SeqCst), self.time.load(Ordering::SeqCst))
    }

    /// Called by the writer once entries up to `seq` are written.
    pub fn set(&self, seq: u64, time_ms: u64) {
        self.time.store(time_ms, Ordering::SeqCst);
        self.seq.store(seq, Ordering::SeqCst);
        self.tx.send_replace(seq);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

/// Where this node's store stands in the log: the last entry applied and its time, or
/// nothing yet. A store with users but no position was a single server's, and one
/// restored from a backup carries a past of its own: neither came from the log.
fn start_position(store: &dyn Store) -> anyhow::Result<(u64, u64)> {
    if missive_core::restore::load(store)?.is_some() {
        anyhow::bail!("this node's store was restored from a backup: a cluster node starts from an empty data directory (or its own store) and replays the log");
    }
    match store.get(Cf::Meta, APPLIED_KEY)? {
        Some(v) => decode_applied(&v).context("the cluster_applied record does not decode"),
        None if !store.scan(Cf::Users, &[], None, crate::store::Direction::Forward, 1)?.is_empty() => anyhow::bail!(
            "this node's store holds users but no cluster log position: it was a single server's. A cluster node starts from an empty data directory and replays the log"
        ),
        None => Ok((0, 0)),
    }
}

/// This node's handle on the log.
pub struct ClusterLog {
    js: jetstream::Context,
    stream: String,
    subject: String,
    pub node: String,
    /// Ops this node appended, by entry id, waiting to be applied; at most `MAX_WAITING`.
    waiting: Mutex<HashMap<[u8; 16], Replier>>,
    pub progress: Arc<Progress>,
    /// The log's end as last read, and when that read started: one read in flight at a
    /// time serves every connection that arrived before it started.
    end: tokio::sync::Mutex<Option<(tokio::time::Instant, u64)>>,
}


impl ClusterLog {
    /// Connects to the NATS servers and finds or creates the server's log.
    pub async fn connect(cfg: &ClusterSection, server: &ServerName, store: &dyn Store) -> anyhow::Result<Arc<ClusterLog>> {
        let (seq, time) = start_position(store)?;
        let js = connect_jetstream(cfg).await?;
        let (stream, subject) = names(server);
        let config = jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            num_replicas: cfg.replicas,
            storage: jetstream::stream::StorageType::File,
            duplicate_window: DEDUPE_WINDOW,
            description: Some(format!("missive: the log of {server}")),
            ..Default::default()
        };
        // A NATS cluster that is starting too has no JetStream leader for a moment.
        let deadline = tokio::time::Instant::now() + STREAM_TIMEOUT;
        let s = loop {
            match js.get_or_create_stream(config.clone()).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::info!(error = %e, stream, "waiting for JetStream");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("cannot find or create the JetStream stream {stream}")),
            }
        };
        // Finding or creating the stream brought its info: no second request.
        let info = s.cached_info();
        if info.config.num_replicas != cfg.replicas {
            tracing::warn!(stream, replicas = info.config.num_replicas, configured = cfg.replicas, "the log's stream keeps another number of replicas than cluster.replicas");
        }
        if seq > info.state.last_sequence {
            anyhow::bail!(
                "this node's store has applied the log up to entry {seq}, but the stream {stream} ends at {}: it is another cluster's store, or the stream was lost",
                info.state.last_sequence
            );
        }
        Ok(Arc::new(ClusterLog { js, stream, subject, node: cfg.node.clone(), waiting: Mutex::new(HashMap::new()), progress: Progress::new(seq, time), end: Default::default() }))
    }

    /// The last entry this node's store holds: its position and time.
    pub fn applied(&self) -> (u64, u64) {
        self.progress.get()
    }

    /// The position of the log's last entry.
    pub async fn last_seq(&self) -> anyhow::Result<u64> {
        // `get_stream` reads the stream's info: one request.
        Ok(self.js.get_stream(&self.stream).await?.cached_info().state.last_sequence)
    }

    /// The log's end as read after `asked`: every entry appended before then is in it.
    async fn end_after(&self, asked: tokio::time::Instant) -> anyhow::Result<u64> {
        let mut end = self.end.lock().await;
        if let Some((read_at, seq)) = *end {
            if read_at >= asked {
                return Ok(seq);
            }
        }
        let read_at = tokio::time::Instant::now();
        let seq = self.last_seq().await.context("cannot read the log's length")?;
        *end = Some((read_at, seq));
        Ok(seq)
    }

    /// Waits until this node applied every entry the log held when called.
    pub async fn catch_up(&self, within: Duration) -> anyhow::Result<()> {
        let asked = tokio::time::Instant::now();
        let deadline = asked + within;
        let last = tokio::time::timeout_at(deadline, self.end_after(asked)).await.context("the log's length did not come in time")??;
        let mut rx = self.progress.subscribe();
        tokio::time::timeout_at(deadline, rx.wait_for(|s| *s >= last))
            .await
            .with_context(|| format!("not caught up with the log after {within:?} (applied {} of {last})", self.applied().0))?
            .context("the writer stopped")?;
        Ok(())
    }

    /// Appends `op` and waits until this node applied it; `rx` hears the result.
    pub async fn call<T>(&self, op: Op, reply: Replier, rx: oneshot::Receiver<Result<T, ApiError>>) -> Result<T, ApiError> {
        let id: [u8; 16] = rand::random();
        let entry = cbor(&Entry { v: ENTRY_VERSION, id: id.to_vec(), op: cbor(&op) });
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if waiting.len() >= MAX_WAITING {
                return Err(ApiError::new(ErrorCode::RateLimited, "this node has too many changes waiting for the cluster's log"));
            }
            waiting.insert(id, reply);
        }
        let forget = || self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        if let Err(e) = self.append(&id, entry).await {
            forget();
            return Err(e);
        }
        match tokio::time::timeout(APPLY_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            // The writer stopped (shutdown, or a local store fault) before the entry.
            Ok(Err(_)) => Err(outcome_unknown()),
            Err(_) => {
                forget();
                Err(outcome_unknown())
            }
        }
    }

    /// Publishes one entry, re-publishing it under the same message id when its
    /// acknowledgement does not come.
    async fn append(&self, id: &[u8; 16], entry: Vec<u8>) -> Result<(), ApiError> {
        let msg_id = hex::encode(id);
        let mut last = String::new();
        let deadline = tokio::time::Instant::now() + APPEND_TIMEOUT;
        let mut pause = Duration::from_millis(50);
        while tokio::time::Instant::now() < deadline {
            let publish = jetstream::message::PublishMessage::build().message_id(&msg_id).payload(entry.clone().into());
            match self.js.send_publish(self.subject.clone(), publish).await {
                Ok(ack) => match ack.await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            // While JetStream elects a new leader for the stream (a NATS node died), it
            // answers that no stream takes the subject, or nothing at all.
            tracing::debug!(error = %last, "appending to the cluster's log failed; trying again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        tracing::warn!(error = %last, "cannot append to the cluster's log");
        Err(outcome_unknown())
    }

    /// Feeds the log, from the entry after the last one applied, to this node's writer,
    /// handing each entry this node appended the reply its caller waits for. Ends when
    /// the writer stops.
    pub fn follow(self: &Arc<Self>, writer: mpsc::Sender<Cmd>) -> tokio::task::JoinHandle<()> {
        let log = self.clone();
        tokio::spawn(async move {
            // The last entry handed to the writer (applied or on its way).
            let mut delivered = log.applied().0;
            loop {
                match log.feed(&writer, &mut delivered).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, delivered, "reading the cluster's log failed; reading on in a second");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        })
    }

    /// Reads the log after `delivered` into the writer; `Ok` when the writer is gone.
    async fn feed(&self, writer: &mpsc::Sender<Cmd>, delivered: &mut u64) -> anyhow::Result<()> {
        let stream = self.js.get_stream(&self.stream).await?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: *delivered + 1 },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            // A consumer on a NATS node that died can stall without an error: when nothing
            // came for a while although the log grew, read on through a new one.
            let m = match tokio::time::timeout(STALL_CHECK, messages.next()).await {
                Ok(Some(m)) => m?,
                Ok(None) => break,
                Err(_) => match self.last_seq().await? > *delivered {
                    true => anyhow::bail!("the log's consumer stalled"),
                    false => continue,
                },
            };
            let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            let seq = info.stream_sequence;
            if seq <= *delivered {
                continue;
            }
            if seq != *delivered + 1 {
                // Entries were removed from the stream: this node cannot hold what the
                // others hold. Stop applying; the node stays behind and says so.
                tracing::error!(seq, expected = *delivered + 1, "entries are missing from the cluster's log; this node stops applying it");
                return Ok(());
            }
            // The stream's own timestamp, the same for every node that reads the entry.
            let time_ms = u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            let cmd = self.logged(seq, time_ms, &m.payload);
            if writer.send(cmd).await.is_err() {
                return Ok(());
            }
            *delivered = seq;
        }
        anyhow::bail!("the log's consumer ended")
    }

    /// The writer's command for entry `seq`; its op is `None` when this build cannot read
    /// it, and the writer then stops rather than go on without it.
    fn logged(&self, seq: u64, time_ms: u64, payload: &[u8]) -> Cmd {
        let entry = match ciborium::from_reader::<Entry, _>(payload) {
            Ok(e) if e.v == ENTRY_VERSION => e,
            Ok(e) => {
                tracing::error!(seq, version = e.v, "a cluster log entry has a format this build does not know");
                return Cmd::Logged { seq, time_ms, op: None, reply: None };
            }
            Err(e) => {
                tracing::error!(seq, error = %e, "a cluster log entry does not decode");
                return Cmd::Logged { seq, time_ms, op: None, reply: None };
            }
        };
        let reply = <[u8; 16]>::try_from(entry.id.as_slice())
            .ok()
            .and_then(|id| self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&id));
        let op = match ciborium::from_reader::<Op, _>(entry.op.as_slice()) {
            Ok(op) => Some(op),
            Err(e) => {
                tracing::error!(seq, error = %e, "a cluster log entry's op does not decode");
                None
            }
        };
        Cmd::Logged { seq, time_ms, op, reply }
    }
}

/// What each node tells the others of itself, in the nodes bucket, every
/// [`HEARTBEAT`]: how far it applied the log, and where it serves clients.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    pub client: String,
    pub applied: u64,
    pub started_ms: u64,
    pub updated_ms: u64,
}

/// How often a node refreshes its record; one not refreshed for [`NODE_EXPIRY`] is gone.
const HEARTBEAT: Duration = Duration::from_secs(2);
const NODE_EXPIRY: Duration = Duration::from_secs(30);

/// The key-value bucket of a server name's nodes.
fn nodes_bucket(server: &ServerName) -> String {
    format!("missive-nodes-{}", server.as_str().replace('.', "_"))
}

async fn nodes_store(js: &jetstream::Context, server: &ServerName, replicas: usize) -> anyhow::Result<jetstream::kv::Store> {
    let bucket = nodes_bucket(server);
    if let Ok(kv) = js.get_key_value(&bucket).await {
        return Ok(kv);
    }
    let config = jetstream::kv::Config {
        bucket: bucket.clone(),
        description: format!("missive: the nodes of {server}"),
        history: 1,
        max_age: NODE_EXPIRY,
        num_replicas: replicas,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    js.create_key_value(config).await.with_context(|| format!("cannot create the key-value bucket {bucket}"))
}

impl ClusterLog {
    /// Keeps this node's record in the nodes bucket fresh until `shutdown`, then removes it.
    pub async fn announce(self: &Arc<Self>, server: ServerName, replicas: usize, client: std::net::SocketAddr, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let kv = nodes_store(&self.js, &server, replicas).await?;
        let log = self.clone();
        let started_ms = crate::accounts::now_ms();
        tokio::spawn(async move {
            loop {
                let record = NodeRecord { node: log.node.clone(), client: client.to_string(), applied: log.applied().0, started_ms, updated_ms: crate::accounts::now_ms() };
                if let Err(e) = kv.put(&log.node, serde_json::to_vec(&record).unwrap_or_default().into()).await {
                    tracing::debug!(error = %e, "cannot refresh this node's record");
                }
                tokio::select! {
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                    _ = shutdown.changed() => break,
                }
            }
            let _ = kv.delete(&log.node).await;
        });
        Ok(())
    }
}

/// `missived cluster status`: the nodes serving the server name, and the log's stream.
pub async fn status(config: &crate::config::Config, json: bool) -> anyhow::Result<()> {
    let cfg = config.cluster.as_ref().context("this config has no [cluster] section: the server runs on one node")?;
    let js = connect_jetstream(cfg).await?;
    let (stream, _) = names(&config.server_name);
    let s = js.get_stream(&stream).await.with_context(|| format!("no stream {stream}: no node of this cluster has started yet"))?;
    let info = s.cached_info().clone();
    let last = info.state.last_sequence;
    let mut nodes: Vec<NodeRecord> = Vec::new();
    if let Ok(kv) = js.get_key_value(nodes_bucket(&config.server_name)).await {
        let mut keys = kv.keys().await?;
        while let Some(k) = keys.next().await {
            if let Some(v) = kv.get(k?).await? {
                if let Ok(r) = serde_json::from_slice::<NodeRecord>(&v) {
                    nodes.push(r);
                }
            }
        }
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    let now = crate::accounts::now_ms();
    let cluster = info.cluster.clone().unwrap_or_default();
    if json {
        let replicas: Vec<_> = cluster.replicas.iter().map(|r| serde_json::json!({"name": r.name, "current": r.current, "offline": r.offline, "lag": r.lag})).collect();
        let out = serde_json::json!({
            "stream": stream, "replicas": info.config.num_replicas, "leader": cluster.leader, "followers": replicas,
            "entries": last, "bytes": info.state.bytes,
            "nodes": nodes.iter().map(|n| serde_json::json!({"node": n.node, "client": n.client, "applied": n.applied, "lag": last.saturating_sub(n.applied), "seen_ms_ago": now.saturating_sub(n.updated_ms)})).collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(());
    }
    println!("{} on {} node(s); log {stream}: {last} entries, {} bytes", config.server_name, nodes.len(), info.state.bytes);
    println!("  replicas {} - leader {}", info.config.num_replicas, cluster.leader.as_deref().unwrap_or("none"));
    for r in &cluster.replicas {
        let state = if r.offline { "offline" } else if r.current { "current" } else { "behind" };
        println!("  replica {}: {state}, lag {}", r.name, r.lag.unwrap_or(0));
    }
    for n in &nodes {
        println!("node {}: client API {}, applied {} (lag {}), seen {:.1} s ago", n.node, n.client, n.applied, last.saturating_sub(n.applied), now.saturating_sub(n.updated_ms) as f64 / 1000.0);
    }
    Ok(())
}

/// A JetStream context over a connection made as `[cluster]` says.
pub async fn connect_jetstream(cfg: &ClusterSection) -> anyhow::Result<jetstream::Context> {
    let mut options = async_nats::ConnectOptions::new().name(format!("missived {}", cfg.node)).connection_timeout(CONNECT_TIMEOUT);
    if let Some(f) = &cfg.credentials {
        options = options.credentials_file(f).await.with_context(|| format!("cannot read the NATS credentials {}", f.display()))?;
    }
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        options = options.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        options = options.token(t.clone());
    }
    let addrs = cfg
        .urls
        .iter()
        .map(|u| async_nats::ServerAddr::from_str(u).with_context(|| format!("cluster.urls: {u}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = options.connect(addrs).await.with_context(|| format!("cannot connect to NATS at {}", cfg.urls.join(", ")))?;
    Ok(jetstream::new(client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_applied_record_round_trips_and_refuses_short_values() {
        assert_eq!(decode_applied(&encode_applied(7, 1_700_000_000_123)), Some((7, 1_700_000_000_123)));
        assert_eq!(decode_applied(&[0; 15]), None);
    }

    #[test]
    fn a_node_starts_only_from_an_empty_store_or_one_the_log_made() {
        use crate::store::memory::MemStore;
        let store = MemStore::default();
        assert_eq!(start_position(&store).unwrap(), (0, 0));
        let mut b = crate::store::Batch::default();
        b.put(Cf::Users, b"alice".to_vec(), b"x".to_vec());
        store.write(b).unwrap();
        let e = start_position(&store).unwrap_err().to_string();
        assert!(e.contains("it was a single server's"), "{e}");
        let mut b = crate::store::Batch::default();
        b.put(Cf::Meta, APPLIED_KEY.to_vec(), encode_applied(42, 7));
        store.write(b).unwrap();
        assert_eq!(start_position(&store).unwrap(), (42, 7));
    }

    #[test]
    fn log_names_are_valid_jetstream_names() {
        let (stream, subject) = names(&ServerName::parse("alpha.example").unwrap());
        assert_eq!((stream.as_str(), subject.as_str()), ("missive-log-alpha_example", "missive.log.alpha_example"));
    }
}
