//! The single writer: the one thread that writes the server's store. It runs the
//! protocol core ([`missive_core::Core`]), which decides what each command changes, and
//! commits all commands waiting at that moment in one synced write (group commit). Replies
//! go out, subscribers are woken and outbound senders nudged only after the write is
//! durable.
//!
//! A command that fails halfway (a read error, a record that does not decode) leaves
//! nothing behind: its part of the batch is dropped and the group ends there. Held units
//! waiting for release make the writer run groups without waiting for a command.

use std::sync::Arc;

use missive_core::checks::Checked;
use missive_core::link::Settlement;
use missive_core::{Core, HeldLimits, Signer};
use missive_federation::{envelope, ServerKey};
use missive_spec::federation::{SignedUnit, Unit, UnitResult};
use missive_spec::{ClientMsgId, Content, DeviceId, ErrorCode, Message, Receipt, ServerName, UserId};
use tokio::sync::{mpsc, oneshot};

use crate::accounts::now_ms;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::linger::Linger;
use crate::records::PresenceRecord;
use crate::store::{Store, StoreResult};

pub use missive_core::{AccountChange, Backfill, InboundUnit, NewDevice, PresenceChange, QueueChange};

/// Longest wait of a new client connection for its node to catch up with the log.
const CLUSTER_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(5);

/// Most commands folded into one synced write.
const MAX_GROUP: usize = 512;

/// What a command's result is handed to: type-erased, so that one [`Op`] enum, free of
/// reply channels, can also travel through cluster mode's log.
pub type Replier = Box<dyn FnOnce(Result<Box<dyn std::any::Any + Send>, ApiError>) + Send>;

/// A change to the store, as the writer applies it. Serializable: in cluster mode every
/// node applies the same ops in the log's order (`cluster/`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Op {
    Send { from: UserId, device: DeviceId, to: UserId, client_msg_id: ClientMsgId, content: Content },
    /// Units of one transaction or backfill answer, checked: one result per unit, and the
    /// gaps to ask for.
    Receive { units: Vec<Result<Checked, UnitResult>> },
    /// Max-merges receipts; `device` is set when a local device sent one. Replies, per
    /// receipt, whether the watermark moved.
    Receipts { receipts: Vec<(Receipt, Option<DeviceId>)> },
    CreateUser { user: UserId, password_hash: String, device: Option<NewDevice> },
    AddDevice { user: UserId, device: NewDevice },
    RemoveDevice { user: UserId, device: DeviceId },
    /// Changes an account; replies with the devices it revoked.
    Account { user: UserId, change: AccountChange },
    /// An operator's change to queued units or dead letters; replies how many it touched.
    Queue { change: QueueChange },
    /// Settles an outbound transaction: removes the queue rows the peer took, and moves
    /// the ones it refused for good to dead letters.
    Settle { settlement: Settlement },
    /// Changes a local user's presence record; replies with the record as stored.
    Presence { localpart: String, change: PresenceChange },
    /// Stores units of our own a peer sent back after a restore (federation.md F12.3);
    /// replies how many were new.
    Reclaim { units: Vec<(SignedUnit, Message)> },
    /// Records that a restored server has reclaimed from this peer.
    Reclaimed { peer: ServerName },
    /// A device publishes keys (e2ee.md E3.1), signatures already checked.
    UploadKeys { user: UserId, device: DeviceId, upload: missive_core::keydir::Upload },
    /// Hands out one key of each device named (E3.3).
    ClaimKeys { user: UserId, devices: Vec<DeviceId> },
    /// Writes a record about the whole database (`Cf::Meta`).
    Meta { key: Vec<u8>, value: Vec<u8> },
}

pub enum Cmd {
    Op(Op, Replier),
    /// An op of cluster mode's log, at position `seq`, recorded by the stream at `time_ms`
    /// (`None` if this build cannot read it); `reply` is set on the node that appended it, waiting for the result.
    Logged { seq: u64, time_ms: u64, op: Option<Op>, reply: Option<Replier> },
    /// Commit what came before, then end the writer; later commands fail with shutting_down.
    Stop,
}

/// Handle to the writer thread.
#[derive(Clone)]
pub struct Sequencer {
    tx: mpsc::Sender<Cmd>,
    /// Cluster mode: ops go through the replicated log, and this node's writer applies
    /// them from there like every other node's.
    log: Option<Arc<crate::cluster::ClusterLog>>,
}

/// What the writer needs besides the store.
pub struct WriterContext {
    pub server: ServerName,
    pub key: Arc<ServerKey>,
    pub hub: Arc<Hub>,
    /// Told, after each durable write, which destinations have new queued units.
    pub outbound: Option<mpsc::UnboundedSender<ServerName>>,
    /// Bounds on units held behind gaps (F6.3), changeable while running.
    pub limits: Arc<crate::limits::LiveLimits>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Group commit's longest wait for more commands (`[store] group_commit_linger_us`).
    pub linger: std::time::Duration,
    /// Cluster mode: where the writer, which takes the log's entries (`Cmd::Logged`),
    /// tells how far it applied them.
    pub cluster: Option<Arc<crate::cluster::Progress>>,
}

/// Signs with the server key.
struct KeySigner(Arc<ServerKey>);

impl Signer for KeySigner {
    fn sign(&self, unit: &Unit) -> SignedUnit {
        envelope::sign(&self.0, unit)
    }
}

impl From<missive_core::Error> for ApiError {
    fn from(e: missive_core::Error) -> ApiError {
        match e {
            missive_core::Error::Refused { code, message } => ApiError::new(code, message),
            missive_core::Error::Store(e) => e.into(),
        }
    }
}

impl Sequencer {
    /// Starts the writer thread; it ends on [`Sequencer::stop`] or when every handle is gone.
    pub fn start(store: Arc<dyn Store>, ctx: WriterContext) -> StoreResult<(Sequencer, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        let signer = Arc::new(KeySigner(ctx.key.clone()));
        let core = Core::open(store.clone(), ctx.server.clone(), signer, crate::sabotage::core_faults())?;
        let linger = Linger::new(ctx.linger);
        let mut w = Writer { store, ctx, core, accepted: 0, linger, store_failed: false };
        let join = std::thread::Builder::new()
            .name("missive-writer".into())
            .spawn(move || match w.ctx.cluster.is_some() {
                true => w.run_logged(rx),
                false => w.run(rx),
            })
            // Failing to spawn a thread at start-up is unrecoverable.
            .expect("spawn writer thread");
        Ok((Sequencer { tx, log: None }, join))
    }

    /// Cluster mode: ops go to `log`, whose entries this node's writer applies.
    pub fn with_log(self, log: Arc<crate::cluster::ClusterLog>) -> Sequencer {
        Sequencer { log: Some(log), ..self }
    }

    /// Where cluster mode's log entries go to be applied (`cluster::ClusterLog::follow`).
    pub fn writer(&self) -> mpsc::Sender<Cmd> {
        self.tx.clone()
    }

    async fn call<T: Send + 'static>(&self, op: Op) -> Result<T, ApiError> {
        let (reply, rx) = oneshot::channel();
        let closing = || ApiError::new(ErrorCode::ShuttingDown, "server is shutting down");
        let replier: Replier = Box::new(move |r| {
            // The writer boxes exactly the type the op's core call returns.
            let _ = reply.send(r.and_then(|b| b.downcast::<T>().map(|b| *b).map_err(|_| ApiError::internal())));
        });
        match &self.log {
            Some(log) => return log.call(op, replier, rx).await,
            None => self.tx.send(Cmd::Op(op, replier)).await.map_err(|_| closing())?,
        }
        // A reply is dropped unanswered only when the writer stopped before reaching it.
        rx.await.map_err(|_| closing())?
    }

    /// Cluster mode: waits (a few seconds at most) until this node applied everything the
    /// log held when called, so that a client that moved from another node finds here
    /// what that node acknowledged (its login, its sends). Nothing to wait for otherwise.
    pub async fn catch_up(&self) {
        if let Some(log) = &self.log {
            if let Err(e) = log.catch_up(CLUSTER_CATCH_UP).await {
                tracing::warn!(error = %e, "serving a client before this node caught up with the cluster's log");
            }
        }
    }

    /// Whether the writer thread still takes commands.
    pub fn running(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Commits everything queued so far and ends the writer.
    pub async fn stop(&self) {
        let _ = self.tx.send(Cmd::Stop).await;
    }

    pub async fn send(&self, from: UserId, device: DeviceId, to: UserId, client_msg_id: ClientMsgId, content: Content) -> Result<Message, ApiError> {
        self.call(Op::Send { from, device, to, client_msg_id, content }).await
    }
    pub async fn receive(&self, units: Vec<Result<Checked, UnitResult>>) -> Result<(Vec<UnitResult>, Vec<Backfill>), ApiError> {
        self.call(Op::Receive { units }).await
    }
    /// Max-merges receipts in one write; per receipt, whether its watermark moved.
    pub async fn receipts(&self, receipts: Vec<(Receipt, Option<DeviceId>)>) -> Result<Vec<bool>, ApiError> {
        self.call(Op::Receipts { receipts }).await
    }
    pub async fn create_user(&self, user: UserId, password_hash: String, device: Option<NewDevice>) -> Result<(), ApiError> {
        self.call(Op::CreateUser { user, password_hash, device }).await
    }
    pub async fn add_device(&self, user: UserId, device: NewDevice) -> Result<(), ApiError> {
        self.call(Op::AddDevice { user, device }).await
    }
    pub async fn remove_device(&self, user: UserId, device: DeviceId) -> Result<(), ApiError> {
        self.call(Op::RemoveDevice { user, device }).await
    }
    /// Changes an account (password, disabled, removed); the devices it revoked. The
    /// caller wakes the user's subscriptions so that revoked ones end.
    pub async fn change_account(&self, user: UserId, change: AccountChange) -> Result<Vec<DeviceId>, ApiError> {
        self.call(Op::Account { user, change }).await
    }
    /// Drops a destination's queue, or retries or drops dead letters; how many units.
    pub async fn change_queue(&self, change: QueueChange) -> Result<usize, ApiError> {
        self.call(Op::Queue { change }).await
    }
    /// Records a settled transaction: delivered rows removed, refused ones dead letters.
    pub async fn settle(&self, settlement: Settlement) -> Result<(), ApiError> {
        self.call(Op::Settle { settlement }).await
    }
    pub async fn presence(&self, localpart: String, change: PresenceChange) -> Result<PresenceRecord, ApiError> {
        self.call(Op::Presence { localpart, change }).await
    }
    pub async fn reclaim(&self, units: Vec<(SignedUnit, Message)>) -> Result<usize, ApiError> {
        self.call(Op::Reclaim { units }).await
    }
    pub async fn upload_keys(&self, user: UserId, device: DeviceId, upload: missive_core::keydir::Upload) -> Result<missive_core::keydir::KeyCount, ApiError> {
        self.call(Op::UploadKeys { user, device, upload }).await
    }
    pub async fn claim_keys(&self, user: UserId, devices: Vec<DeviceId>) -> Result<Vec<missive_spec::e2ee::ClaimedKey>, ApiError> {
        self.call(Op::ClaimKeys { user, devices }).await
    }
    pub async fn put_meta(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), ApiError> {
        self.call(Op::Meta { key, value }).await
    }
    pub async fn reclaimed(&self, peer: ServerName) -> Result<(), ApiError> {
        self.call(Op::Reclaimed { peer }).await
    }
}

/// A reply held until the group's write is durable: called with `true` once committed.
type Completion = Box<dyn FnOnce(bool) + Send>;

type Answer = Result<Box<dyn std::any::Any + Send>, missive_core::Error>;

/// `failed` is the answer when the write does not happen.
fn completion(reply: Replier, r: Result<Box<dyn std::any::Any + Send>, ApiError>, failed: ApiError) -> Completion {
    Box::new(move |committed| reply(if committed { r } else { Err(failed) }))
}

/// A replier for an op nobody on this node waits for (another node appended it).
fn nobody() -> Replier {
    Box::new(|_| {})
}

fn boxed<T: Send + 'static>(r: Result<T, missive_core::Error>) -> Answer {
    r.map(|v| Box::new(v) as Box<dyn std::any::Any + Send>)
}

/// Lets the core decide what `op` changes, adding it to the group's batch.
fn run_op(core: &mut Core, tx: &mut missive_core::Tx, op: Op) -> Answer {
    match op {
        Op::Send { from, device, to, client_msg_id, content } => boxed(core.send(tx, from, device, to, client_msg_id, content)),
        Op::Receive { units } => boxed(core.receive(tx, units)),
        Op::Receipts { receipts } => boxed(receipts.into_iter().map(|(r, d)| core.receipt(tx, r, d)).collect::<Result<Vec<_>, _>>()),
        Op::CreateUser { user, password_hash, device } => boxed(core.create_user(tx, user, password_hash, device)),
        Op::AddDevice { user, device } => boxed(core.add_device(tx, &user, device)),
        Op::RemoveDevice { user, device } => boxed(core.remove_device(tx, &user, device)),
        Op::Account { user, change } => boxed(core.change_account(tx, &user, change)),
        Op::Queue { change } => boxed(core.change_queue(tx, change)),
        Op::Settle { settlement } => boxed(core.settle(tx, &settlement)),
        Op::Presence { localpart, change } => boxed(core.presence(tx, localpart, change)),
        Op::Reclaim { units } => boxed(core.reclaim(tx, units)),
        Op::UploadKeys { user, device, upload } => boxed(core.upload_keys(tx, &user, &device, upload)),
        Op::ClaimKeys { user, devices } => boxed(core.claim_keys(tx, &user, &devices)),
        Op::Meta { key, value } => {
            core.put_meta(tx, key, value);
            boxed(Ok(()))
        }
        Op::Reclaimed { peer } => {
            core.reclaimed(tx, &peer);
            boxed(Ok(()))
        }
    }
}

struct Writer {
    store: Arc<dyn Store>,
    ctx: WriterContext,
    core: Core,
    /// Sends of the group that stored a new message (for the metrics, once durable).
    accepted: u64,
    linger: Linger,
    /// A store read or write failed in the last op applied.
    store_failed: bool,
}

/// What became of one command.
enum Applied {
    Done,
    /// It failed after adding to the batch: its part was dropped; end the group here.
    Failed,
    Stop,
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Cmd>) {
        self.index_activity();
        loop {
            // With releases pending, look for commands without waiting for one.
            let first = if self.core.releases_pending() {
                rx.try_recv().ok()
            } else {
                match rx.blocking_recv() {
                    Some(cmd) => Some(cmd),
                    None => break,
                }
            };
            let mut tx = self.core.begin(now_ms(), self.held_limits());
            let mut done = Vec::new();
            let mut state = match first {
                Some(cmd) => self.take(cmd, &mut tx, &mut done),
                None => Applied::Done,
            };
            state = self.gather(&mut rx, state, &mut tx, &mut done);
            self.linger.observe(done.len(), std::time::Instant::now());
            if let (Applied::Done, Some(wait)) = (&state, self.linger.wait(done.len())) {
                std::thread::sleep(wait);
                let before = done.len();
                state = self.gather(&mut rx, state, &mut tx, &mut done);
                self.linger.gathered(done.len() - before);
            }
            if matches!(state, Applied::Done) {
                self.core.release_pending(&mut tx);
            }
            self.commit(tx, done);
            if matches!(state, Applied::Stop) {
                break;
            }
        }
        // Dropping the receiver fails every later command with shutting_down.
    }

    /// Applies the commands waiting now, until the group is full or one fails or stops.
    fn gather(&mut self, rx: &mut mpsc::Receiver<Cmd>, mut state: Applied, tx: &mut missive_core::Tx, done: &mut Vec<Completion>) -> Applied {
        while matches!(state, Applied::Done) && done.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(cmd) => state = self.take(cmd, tx, done),
                Err(_) => break,
            }
        }
        state
    }

    fn held_limits(&self) -> HeldLimits {
        HeldLimits {
            per_conversation: self.ctx.limits.held_per_conversation(),
            per_peer: self.ctx.limits.held_per_peer(),
            release_batch: self.ctx.limits.held_release_batch(),
        }
    }

    /// Indexes conversations stored before the activity index existed (§6.10), a
    /// thousand per write, before the first command. A failure is logged and left for the
    /// next start: those conversations are missing from `conversations` until then.
    fn index_activity(&mut self) {
        let mut after = None;
        loop {
            let mut tx = self.core.begin(now_ms(), self.held_limits());
            let next = match self.core.index_activity(&mut tx, after, 1000) {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %e, "cannot index conversations by activity; trying again at the next start");
                    return;
                }
            };
            if !self.commit(tx, Vec::new()) || next.is_none() {
                return;
            }
            after = next;
        }
    }

    /// Writes the group and answers its commands; whether the write became durable.
    fn commit(&mut self, mut tx: missive_core::Tx, done: Vec<Completion>) -> bool {
        let batch = std::mem::take(&mut tx.batch);
        let commands = done.len();
        let accepted = std::mem::take(&mut self.accepted);
        let result = if batch.is_empty() {
            Ok(())
        } else {
            let started = std::time::Instant::now();
            // Cluster mode's log is what makes a change durable; a machine's crash loses
            // at most entries its restart applies again, from the last one written.
            let r = match self.ctx.cluster.is_some() {
                true => self.store.write_unsynced(batch),
                false => self.store.write(batch),
            };
            self.ctx.metrics.commit(commands, started.elapsed());
            r
        };
        let committed = match result {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "group write failed; replying with errors");
                false
            }
        };
        self.core.committed(committed);
        if committed {
            // Counted before anyone hears `sent`, so no scrape after the reply misses it.
            self.ctx.metrics.messages_accepted.inc_by(accepted);
        }
        for d in done {
            d(committed);
        }
        if committed {
            for (user, head) in tx.wake {
                self.ctx.hub.notify(&user, head);
            }
            if let Some(out) = &self.ctx.outbound {
                for dest in tx.outbound {
                    let _ = out.send(dest);
                }
            }
        }
        committed
    }

    fn take(&mut self, cmd: Cmd, tx: &mut missive_core::Tx, done: &mut Vec<Completion>) -> Applied {
        match cmd {
            Cmd::Op(op, reply) => self.apply(op, reply, tx, done),
            Cmd::Stop => Applied::Stop,
            // Only a cluster's writer takes log entries.
            Cmd::Logged { reply, .. } => {
                if let Some(reply) = reply {
                    reply(Err(ApiError::internal()));
                }
                Applied::Done
            }
        }
    }

    /// Applies one op to the group. An op that fails keeps none of its writes.
    fn apply(&mut self, op: Op, reply: Replier, tx: &mut missive_core::Tx, done: &mut Vec<Completion>) -> Applied {
        self.store_failed = false;
        let mark = tx.mark();
        let is_send = matches!(op, Op::Send { .. });
        let r = run_op(&mut self.core, tx, op);
        let ok = r.is_ok();
        if matches!(r, Err(missive_core::Error::Store(_))) {
            self.store_failed = true;
        }
        // In cluster mode the entry is in the log whatever becomes of this node's write.
        let failed = match self.ctx.cluster.is_some() {
            true => crate::cluster::outcome_unknown(),
            false => ApiError::internal(),
        };
        done.push(completion(reply, r.map_err(Into::into), failed));
        if ok && is_send && tx.mark() != mark {
            self.accepted += 1;
        }
        if ok || tx.mark() == mark {
            return Applied::Done;
        }
        self.core.abort(tx, mark);
        Applied::Failed
    }

    /// Cluster mode: applies the log's entries in its order, each stamped with the time
    /// its node appended it (never earlier than the one before), and records with them
    /// how far it got, in the same write. Every node does the same from the same log, so
    /// all hold the same store. A local store fault stops this writer rather than let
    /// the node go on from a state the others do not share: a restart replays the log
    /// from the last entry written.
    fn run_logged(&mut self, mut rx: mpsc::Receiver<Cmd>) {
        let Some(progress) = self.ctx.cluster.clone() else { return };
        let mut time = progress.get().1;
        while let Some(cmd) = rx.blocking_recv() {
            let (seq, time_ms, op, reply) = match cmd {
                Cmd::Logged { seq, time_ms, op, reply } => (seq, time_ms, op, reply.unwrap_or_else(nobody)),
                Cmd::Op(_, reply) => {
                    reply(Err(ApiError::internal()));
                    continue;
                }
                Cmd::Stop => break,
            };
            let Some(op) = op else {
                tracing::error!(seq, "a cluster log entry does not decode with this build; stopping this node's writer (run the build that wrote it)");
                reply(Err(crate::cluster::outcome_unknown()));
                return;
            };
            time = time.max(time_ms);
            // One entry, one write: what an op reads of the store must not depend on how
            // many entries share a group, which differs between nodes (a replaying node
            // has many waiting, a live one few).
            let mut tx = self.core.begin(time, self.held_limits());
            let mut done = Vec::new();
            self.apply(op, reply, &mut tx, &mut done);
            if self.store_failed {
                tracing::error!(seq, "the local store failed while applying the cluster log; stopping this node's writer (a restart replays the log)");
                self.core.committed(false);
                for d in done {
                    d(false);
                }
                return;
            }
            self.core.put_meta(&mut tx, crate::cluster::APPLIED_KEY.to_vec(), crate::cluster::encode_applied(seq, time));
            if !self.commit(tx, done) {
                tracing::error!(seq, "the local store failed writing a cluster log entry; stopping this node's writer (a restart replays the log)");
                return;
            }
            progress.set(seq, time);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemStore;
    use crate::store::{keys, Batch, Cf, Direction, StoreError};
    use missive_spec::{ConversationId, Deps};

    /// A store whose reads of one key fail, as a disk fault would.
    struct FailingRead {
        inner: MemStore,
        fail: (Cf, Vec<u8>),
    }

    impl Store for FailingRead {
        fn get(&self, cf: Cf, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
            if (cf, key) == (self.fail.0, self.fail.1.as_slice()) {
                return Err(StoreError::Engine("injected read fault".into()));
            }
            self.inner.get(cf, key)
        }
        fn scan(&self, cf: Cf, prefix: &[u8], from: Option<&[u8]>, dir: Direction, limit: usize) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
            self.inner.scan(cf, prefix, from, dir, limit)
        }
        fn write(&self, batch: Batch) -> StoreResult<()> {
            self.inner.write(batch)
        }
    }

    struct Peer {
        key: ServerKey,
        name: ServerName,
    }

    impl Peer {
        fn unit(&self, from: &str, to: &UserId, seq: u64) -> InboundUnit {
            let from = UserId::parse(from).unwrap();
            let mut deps = Deps::new();
            deps.set(self.name.clone(), seq);
            let msg = Message {
                to: to.clone(),
                ts: seq,
                seq,
                conv: ConversationId::one_to_one(&from, to),
                deps,
                from,
                origin: self.name.clone(),
                content: Content::text(&format!("m{seq}")),
            };
            let env = envelope::sign(&self.key, &Unit::Message(msg.clone()));
            InboundUnit { hash: env.hash(), env, msg }
        }
    }

    fn start(store: Arc<dyn Store>, limits: crate::config::LimitsSection) -> (Sequencer, std::thread::JoinHandle<()>) {
        start_with(store, limits, None)
    }

    fn start_with(store: Arc<dyn Store>, limits: crate::config::LimitsSection, cluster: Option<Arc<crate::cluster::Progress>>) -> (Sequencer, std::thread::JoinHandle<()>) {
        let ctx = WriterContext {
            server: ServerName::parse("alpha.test").unwrap(),
            key: Arc::new(ServerKey::generate()),
            hub: Arc::new(Hub::default()),
            outbound: None,
            limits: Arc::new(crate::limits::LiveLimits::new(&limits)),
            metrics: Default::default(),
            linger: Default::default(),
            cluster,
        };
        Sequencer::start(store, ctx).unwrap()
    }

    fn peer() -> Peer {
        Peer { key: ServerKey::generate(), name: ServerName::parse("beta.test").unwrap() }
    }

    #[tokio::test]
    async fn a_command_that_fails_halfway_leaves_nothing_behind() {
        let alice = UserId::parse("@alice:alpha.test").unwrap();
        let beta = peer();
        let good = beta.unit("@bob:beta.test", &alice, 1);
        let bad = beta.unit("@carol:beta.test", &alice, 1);
        let store = Arc::new(FailingRead { inner: MemStore::default(), fail: (Cf::Convs, keys::conv(&bad.msg.conv)) });
        let (seq, writer) = start(store.clone(), Default::default());
        let err = seq.receive(vec![Ok(Checked::Message(good)), Ok(Checked::Message(bad))]).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(store.inner.scan(Cf::Messages, &[], None, Direction::Forward, 10).unwrap().is_empty(), "the first unit's message was committed");
        assert!(store.inner.scan(Cf::Events, &[], None, Direction::Forward, 10).unwrap().is_empty(), "the first unit's event was committed");
        // The writer goes on: the good unit alone is stored, at stream position 1.
        let again = beta.unit("@bob:beta.test", &alice, 1);
        assert_eq!(seq.receive(vec![Ok(Checked::Message(again))]).await.unwrap().0, vec![UnitResult::Accepted]);
        let events = store.inner.scan(Cf::Events, &keys::events_of("alice"), None, Direction::Forward, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(keys::parse_event(&events[0].0).map(|(_, p)| p), Some(1), "a position was skipped");
        seq.stop().await;
        writer.join().unwrap();
    }

    /// A writer of cluster mode over `store`, fed log entries through `Sequencer::writer`.
    fn cluster_writer(store: Arc<MemStore>) -> (Sequencer, std::thread::JoinHandle<()>, Arc<crate::cluster::Progress>) {
        let progress = crate::cluster::Progress::new(0, 0);
        let (seq, writer) = start_with(store, Default::default(), Some(progress.clone()));
        (seq, writer, progress)
    }

    /// Everything `store` holds, family by family.
    fn contents(store: &MemStore) -> Vec<(Cf, Vec<(Vec<u8>, Vec<u8>)>)> {
        Cf::ALL.iter().map(|cf| (*cf, store.scan(*cf, &[], None, Direction::Forward, usize::MAX).unwrap())).collect()
    }

    #[tokio::test]
    async fn writers_applying_the_same_log_hold_the_same_store_and_answer_only_their_own_callers() {
        let alice = UserId::parse("@alice:alpha.test").unwrap();
        let bob = UserId::parse("@bob:alpha.test").unwrap();
        let device = |id: &str| NewDevice { id: DeviceId::parse(id).unwrap(), name: None, token_hash: [id.len() as u8; 32] };
        let id = ClientMsgId::from_slice(&[9; 16]).unwrap();
        let send = |text: &str| Op::Send { from: alice.clone(), device: DeviceId::parse("DEVA").unwrap(), to: bob.clone(), client_msg_id: id, content: Content::text(text) };
        // As the log holds them: the times come from the nodes that appended each entry,
        // and one clock was behind.
        let log = || {
            vec![
                (Some(Op::CreateUser { user: alice.clone(), password_hash: "h".into(), device: Some(device("DEVA")) }), 1_000),
                (Some(Op::CreateUser { user: bob.clone(), password_hash: "h".into(), device: Some(device("DEVB")) }), 1_005),
                (Some(send("first")), 1_010),
                // Refused alike on every node: the user exists.
                (Some(Op::CreateUser { user: bob.clone(), password_hash: "h".into(), device: None }), 1_012),
                (Some(Op::RemoveDevice { user: bob.clone(), device: DeviceId::parse("DEVB").unwrap() }), 1_012),
                // A retry of the same send through another node, stamped earlier.
                (Some(send("first")), 900),
            ]
        };
        let mut stores = Vec::new();
        let mut answers = Vec::new();
        for node in 0..2 {
            let store = Arc::new(MemStore::default());
            let (seq, writer, progress) = cluster_writer(store.clone());
            let mut waiting = Vec::new();
            for (i, (op, time_ms)) in log().into_iter().enumerate() {
                // Node 1 takes the entries one at a time, node 0 all at once, as a live
                // node and a replaying one do.
                if node == 1 {
                    let mut rx = progress.subscribe();
                    rx.wait_for(|s| *s == i as u64).await.unwrap();
                }
                // Node 0 appended the first send, node 1 its retry.
                let mine = (node == 0 && i == 2) || (node == 1 && i == 5);
                let reply = mine.then(|| {
                    let (tx, rx) = oneshot::channel();
                    waiting.push(rx);
                    Box::new(move |r: Result<Box<dyn std::any::Any + Send>, ApiError>| {
                        let _ = tx.send(r.map(|b| *b.downcast::<Message>().unwrap()));
                    }) as Replier
                });
                seq.writer().send(Cmd::Logged { seq: i as u64 + 1, time_ms, op, reply }).await.unwrap();
            }
            seq.stop().await;
            writer.join().unwrap();
            assert_eq!(progress.get(), (6, 1_012), "the last entry, at the latest time so far");
            answers.push(waiting.pop().unwrap().await.unwrap().unwrap());
            stores.push(store);
        }
        assert_eq!(answers[0], answers[1], "the retry through node 1 answers what node 0 accepted");
        assert_eq!((answers[0].seq, answers[0].ts), (1, 1_010));
        assert_eq!(contents(&stores[0]), contents(&stores[1]), "the two nodes' stores differ");
        let applied = stores[0].get(Cf::Meta, crate::cluster::APPLIED_KEY).unwrap().unwrap();
        assert_eq!(applied, crate::cluster::encode_applied(6, 1_012));
        let messages = stores[0].scan(Cf::Messages, &[], None, Direction::Forward, 10).unwrap();
        assert_eq!(messages.len(), 1, "the retry was stored again");
    }

    #[tokio::test]
    async fn a_writer_stops_at_a_log_entry_it_cannot_read_rather_than_go_on_without_it() {
        let store = Arc::new(MemStore::default());
        let (seq, writer, progress) = cluster_writer(store.clone());
        let user = |name: &str| Op::CreateUser { user: UserId::parse(&format!("@{name}:alpha.test")).unwrap(), password_hash: "h".into(), device: None };
        let w = seq.writer();
        w.send(Cmd::Logged { seq: 1, time_ms: 5, op: Some(user("alice")), reply: None }).await.unwrap();
        w.send(Cmd::Logged { seq: 2, time_ms: 6, op: None, reply: None }).await.unwrap();
        let _ = w.send(Cmd::Logged { seq: 3, time_ms: 7, op: Some(user("bob")), reply: None }).await;
        writer.join().unwrap();
        assert_eq!(progress.get(), (1, 5));
        assert_eq!(store.scan(Cf::Users, &[], None, Direction::Forward, 10).unwrap().len(), 1, "bob was made after the unreadable entry");
        assert!(!seq.running());
    }

    #[tokio::test]
    async fn held_units_are_bounded_and_released_in_steps_with_none_lost() {
        let alice = UserId::parse("@alice:alpha.test").unwrap();
        let beta = peer();
        let store = Arc::new(MemStore::default());
        let limits = crate::config::LimitsSection { held_per_conversation: 3, held_per_peer: 4, held_release_batch: 2, ..Default::default() };
        let (seq, writer) = start(store.clone(), limits);
        let results = |(r, _): (Vec<UnitResult>, Vec<Backfill>)| r;
        let checked = |units: Vec<InboundUnit>| units.into_iter().map(|u| Ok(Checked::Message(u))).collect::<Vec<_>>();
        let to_alice: Vec<_> = (2..=6).map(|s| beta.unit("@bob:beta.test", &alice, s)).collect();
        let r = results(seq.receive(checked(to_alice)).await.unwrap());
        use UnitResult::{Accepted, Held, Retry};
        assert_eq!(r, vec![Held, Held, Held, Retry, Retry], "per conversation");
        let r = results(seq.receive(checked(vec![beta.unit("@dan:beta.test", &alice, 2), beta.unit("@dan:beta.test", &alice, 3)])).await.unwrap());
        assert_eq!(r, vec![Held, Retry], "per peer");
        // The gap fills: seq 1 and the three held units behind it are stored, two per
        // group, the last in a later group.
        assert_eq!(results(seq.receive(checked(vec![beta.unit("@bob:beta.test", &alice, 1)])).await.unwrap()), vec![Accepted]);
        let conv = ConversationId::one_to_one(&UserId::parse("@bob:beta.test").unwrap(), &alice);
        let stored = || store.scan(Cf::Messages, &keys::messages_of(&conv), None, Direction::Forward, 100).unwrap().len();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stored() < 4 {
            assert!(std::time::Instant::now() < deadline, "held units were not released: {} stored", stored());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Room again: what was refused is taken now, in line.
        let r = results(seq.receive(checked((5..=6).map(|s| beta.unit("@bob:beta.test", &alice, s)).collect())).await.unwrap());
        assert_eq!(r, vec![Accepted, Accepted]);
        assert_eq!(stored(), 6);
        assert!(store.scan(Cf::Held, &[], None, Direction::Forward, 100).unwrap().len() == 1, "only dan's unit is still held");
        seq.stop().await;
        writer.join().unwrap();
    }
}
