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

/// Most commands folded into one synced write.
const MAX_GROUP: usize = 512;

type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

pub enum Cmd {
    Send { from: UserId, device: DeviceId, to: UserId, client_msg_id: ClientMsgId, content: Content, reply: Reply<Message> },
    /// Units of one transaction or backfill answer, checked: one result per unit, and the
    /// gaps to ask for.
    Receive { units: Vec<Result<Checked, UnitResult>>, reply: Reply<(Vec<UnitResult>, Vec<Backfill>)> },
    /// Max-merges receipts; `device` is set when a local device sent one. Replies, per
    /// receipt, whether the watermark moved.
    Receipts { receipts: Vec<(Receipt, Option<DeviceId>)>, reply: Reply<Vec<bool>> },
    CreateUser { user: UserId, password_hash: String, device: Option<NewDevice>, reply: Reply<()> },
    AddDevice { user: UserId, device: NewDevice, reply: Reply<()> },
    RemoveDevice { user: UserId, device: DeviceId, reply: Reply<()> },
    /// Changes an account; replies with the devices it revoked.
    Account { user: UserId, change: AccountChange, reply: Reply<Vec<DeviceId>> },
    /// An operator's change to queued units or dead letters; replies how many it touched.
    Queue { change: QueueChange, reply: Reply<usize> },
    /// Settles an outbound transaction: removes the queue rows the peer took, and moves
    /// the ones it refused for good to dead letters.
    Settle { settlement: Settlement, reply: Reply<()> },
    /// Changes a local user's presence record; replies with the record as stored.
    Presence { localpart: String, change: PresenceChange, reply: Reply<PresenceRecord> },
    /// Stores units of our own a peer sent back after a restore (federation.md F12.3);
    /// replies how many were new.
    Reclaim { units: Vec<(SignedUnit, Message)>, reply: Reply<usize> },
    /// Records that a restored server has reclaimed from this peer.
    Reclaimed { peer: ServerName, reply: Reply<()> },
    /// A device publishes keys (e2ee.md E3.1), signatures already checked.
    UploadKeys { user: UserId, device: DeviceId, upload: missive_core::keydir::Upload, reply: Reply<missive_core::keydir::KeyCount> },
    /// Hands out one key of each device named (E3.3).
    ClaimKeys { user: UserId, devices: Vec<DeviceId>, reply: Reply<Vec<missive_spec::e2ee::ClaimedKey>> },
    /// Writes a record about the whole database (`Cf::Meta`).
    Meta { key: Vec<u8>, value: Vec<u8>, reply: Reply<()> },
    /// Commit what came before, then end the writer; later commands fail with shutting_down.
    Stop,
}

/// Handle to the writer thread.
#[derive(Clone)]
pub struct Sequencer {
    tx: mpsc::Sender<Cmd>,
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
        let mut w = Writer { store, ctx, core, accepted: 0, linger };
        let join = std::thread::Builder::new()
            .name("missive-writer".into())
            .spawn(move || w.run(rx))
            // Failing to spawn a thread at start-up is unrecoverable.
            .expect("spawn writer thread");
        Ok((Sequencer { tx }, join))
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, ApiError> {
        let (reply, rx) = oneshot::channel();
        let closing = || ApiError::new(ErrorCode::ShuttingDown, "server is shutting down");
        self.tx.send(make(reply)).await.map_err(|_| closing())?;
        // A reply is dropped unanswered only when the writer stopped before reaching it.
        rx.await.map_err(|_| closing())?
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
        self.call(|reply| Cmd::Send { from, device, to, client_msg_id, content, reply }).await
    }
    pub async fn receive(&self, units: Vec<Result<Checked, UnitResult>>) -> Result<(Vec<UnitResult>, Vec<Backfill>), ApiError> {
        self.call(|reply| Cmd::Receive { units, reply }).await
    }
    /// Max-merges receipts in one write; per receipt, whether its watermark moved.
    pub async fn receipts(&self, receipts: Vec<(Receipt, Option<DeviceId>)>) -> Result<Vec<bool>, ApiError> {
        self.call(|reply| Cmd::Receipts { receipts, reply }).await
    }
    pub async fn create_user(&self, user: UserId, password_hash: String, device: Option<NewDevice>) -> Result<(), ApiError> {
        self.call(|reply| Cmd::CreateUser { user, password_hash, device, reply }).await
    }
    pub async fn add_device(&self, user: UserId, device: NewDevice) -> Result<(), ApiError> {
        self.call(|reply| Cmd::AddDevice { user, device, reply }).await
    }
    pub async fn remove_device(&self, user: UserId, device: DeviceId) -> Result<(), ApiError> {
        self.call(|reply| Cmd::RemoveDevice { user, device, reply }).await
    }
    /// Changes an account (password, disabled, removed); the devices it revoked. The
    /// caller wakes the user's subscriptions so that revoked ones end.
    pub async fn change_account(&self, user: UserId, change: AccountChange) -> Result<Vec<DeviceId>, ApiError> {
        self.call(|reply| Cmd::Account { user, change, reply }).await
    }
    /// Drops a destination's queue, or retries or drops dead letters; how many units.
    pub async fn change_queue(&self, change: QueueChange) -> Result<usize, ApiError> {
        self.call(|reply| Cmd::Queue { change, reply }).await
    }
    /// Records a settled transaction: delivered rows removed, refused ones dead letters.
    pub async fn settle(&self, settlement: Settlement) -> Result<(), ApiError> {
        self.call(|reply| Cmd::Settle { settlement, reply }).await
    }
    pub async fn presence(&self, localpart: String, change: PresenceChange) -> Result<PresenceRecord, ApiError> {
        self.call(|reply| Cmd::Presence { localpart, change, reply }).await
    }
    pub async fn reclaim(&self, units: Vec<(SignedUnit, Message)>) -> Result<usize, ApiError> {
        self.call(|reply| Cmd::Reclaim { units, reply }).await
    }
    pub async fn upload_keys(&self, user: UserId, device: DeviceId, upload: missive_core::keydir::Upload) -> Result<missive_core::keydir::KeyCount, ApiError> {
        self.call(|reply| Cmd::UploadKeys { user, device, upload, reply }).await
    }
    pub async fn claim_keys(&self, user: UserId, devices: Vec<DeviceId>) -> Result<Vec<missive_spec::e2ee::ClaimedKey>, ApiError> {
        self.call(|reply| Cmd::ClaimKeys { user, devices, reply }).await
    }
    pub async fn put_meta(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), ApiError> {
        self.call(|reply| Cmd::Meta { key, value, reply }).await
    }
    pub async fn reclaimed(&self, peer: ServerName) -> Result<(), ApiError> {
        self.call(|reply| Cmd::Reclaimed { peer, reply }).await
    }
}

/// A reply held until the group's write is durable: called with `true` once committed.
type Completion = Box<dyn FnOnce(bool) + Send>;

fn completion<T: Send + 'static>(reply: Reply<T>, r: Result<T, ApiError>) -> Completion {
    Box::new(move |committed| {
        let _ = reply.send(if committed { r } else { Err(ApiError::internal()) });
    })
}

struct Writer {
    store: Arc<dyn Store>,
    ctx: WriterContext,
    core: Core,
    /// Sends of the group that stored a new message (for the metrics, once durable).
    accepted: u64,
    linger: Linger,
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
                Some(cmd) => self.apply(cmd, &mut tx, &mut done),
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
                Ok(cmd) => state = self.apply(cmd, tx, done),
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
            let r = self.store.write(batch);
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

    /// Applies one command to the group. A command that fails keeps none of its writes.
    fn apply(&mut self, cmd: Cmd, tx: &mut missive_core::Tx, done: &mut Vec<Completion>) -> Applied {
        let mark = tx.mark();
        let is_send = matches!(cmd, Cmd::Send { .. });
        let core = &mut self.core;
        let ok = match cmd {
            Cmd::Stop => return Applied::Stop,
            Cmd::Send { from, device, to, client_msg_id, content, reply } => {
                finish(done, reply, core.send(tx, from, device, to, client_msg_id, content).map_err(Into::into))
            }
            Cmd::Receive { units, reply } => finish(done, reply, core.receive(tx, units).map_err(Into::into)),
            Cmd::Receipts { receipts, reply } => {
                let r = receipts.into_iter().map(|(r, d)| core.receipt(tx, r, d)).collect::<Result<Vec<_>, _>>();
                finish(done, reply, r.map_err(Into::into))
            }
            Cmd::CreateUser { user, password_hash, device, reply } => {
                finish(done, reply, core.create_user(tx, user, password_hash, device).map_err(Into::into))
            }
            Cmd::AddDevice { user, device, reply } => finish(done, reply, core.add_device(tx, &user, device).map_err(Into::into)),
            Cmd::RemoveDevice { user, device, reply } => finish(done, reply, core.remove_device(tx, &user, device).map_err(Into::into)),
            Cmd::Account { user, change, reply } => finish(done, reply, core.change_account(tx, &user, change).map_err(Into::into)),
            Cmd::Queue { change, reply } => finish(done, reply, core.change_queue(tx, change).map_err(Into::into)),
            Cmd::Settle { settlement, reply } => finish(done, reply, core.settle(tx, &settlement).map_err(Into::into)),
            Cmd::Presence { localpart, change, reply } => finish(done, reply, core.presence(tx, localpart, change).map_err(Into::into)),
            Cmd::Reclaim { units, reply } => finish(done, reply, core.reclaim(tx, units).map_err(Into::into)),
            Cmd::UploadKeys { user, device, upload, reply } => {
                finish(done, reply, core.upload_keys(tx, &user, &device, upload).map_err(Into::into))
            }
            Cmd::ClaimKeys { user, devices, reply } => finish(done, reply, core.claim_keys(tx, &user, &devices).map_err(Into::into)),
            Cmd::Meta { key, value, reply } => {
                core.put_meta(tx, key, value);
                finish(done, reply, Ok(()))
            }
            Cmd::Reclaimed { peer, reply } => {
                core.reclaimed(tx, &peer);
                finish(done, reply, Ok(()))
            }
        };
        if ok && is_send && tx.mark() != mark {
            self.accepted += 1;
        }
        if ok || tx.mark() == mark {
            return Applied::Done;
        }
        self.core.abort(tx, mark);
        Applied::Failed
    }
}

/// Holds the reply until the group commits; false if the command failed.
fn finish<T: Send + 'static>(done: &mut Vec<Completion>, reply: Reply<T>, r: Result<T, ApiError>) -> bool {
    let ok = r.is_ok();
    done.push(completion(reply, r));
    ok
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
        let ctx = WriterContext {
            server: ServerName::parse("alpha.test").unwrap(),
            key: Arc::new(ServerKey::generate()),
            hub: Arc::new(Hub::default()),
            outbound: None,
            limits: Arc::new(crate::limits::LiveLimits::new(&limits)),
            metrics: Default::default(),
            linger: Default::default(),
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
