//! The single writer. Every change to conversations, streams, queues and accounts passes
//! through one thread that assigns `origin_seq` and stream positions, builds one batch per
//! logical change, and commits all changes waiting at that moment in one synced write
//! (group commit). Replies go out, subscribers are woken and outbound senders nudged only
//! after the write is durable.
//!
//! A command that fails halfway (a read error, a record that does not decode) leaves
//! nothing behind: its part of the batch is dropped and the group ends there. Units held
//! behind a gap are bounded per (origin, conversation) and per origin, and released in
//! bounded steps, so one filled gap cannot stall every other writer command.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use missive_federation::admission::{self, Decision};
use missive_federation::{envelope, ServerKey};
use missive_spec::federation::{SignedUnit, Unit, UnitResult};
use missive_spec::{
    ClientMsgId, Content, ConversationId, Deps, DeviceId, ErrorCode, Event, EventKind, Message, Receipt, ReceiptKind,
    ServerName, UserId, Watermark,
};
use tokio::sync::{mpsc, oneshot};

use crate::accounts::now_ms;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::records::{self, ConvRecord, DeadLetter, DeviceRecord, MsgIdRecord, PresenceRecord, SendIdRecord, TokenRecord, UserRecord};
use crate::store::{keys, Batch, Cf, Direction, Store, StoreResult};

/// Most commands folded into one synced write.
const MAX_GROUP: usize = 512;

pub struct NewDevice {
    pub id: DeviceId,
    pub name: Option<String>,
    pub token_hash: [u8; 32],
}

/// A unit from a peer whose signature and structure were already checked.
pub struct InboundUnit {
    pub env: SignedUnit,
    pub msg: Message,
    pub hash: [u8; 32],
}

/// What became of an inbound unit, and which range to ask its origin for, if any.
#[derive(Debug, Clone)]
pub struct InboundOutcome {
    pub result: UnitResult,
    pub backfill: Option<Backfill>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backfill {
    pub conv: ConversationId,
    pub origin: ServerName,
    pub first: u64,
    pub last: u64,
}

type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// A change to a local user's stored presence facts.
#[derive(Debug, Clone, Copy)]
pub enum PresenceChange {
    /// The user's last subscription ended at this time (ms).
    LastSeen(u64),
    HideLastSeen(bool),
}

pub enum Cmd {
    Send { from: UserId, device: DeviceId, to: UserId, client_msg_id: ClientMsgId, content: Content, reply: Reply<Message> },
    Inbound { units: Vec<InboundUnit>, reply: Reply<Vec<InboundOutcome>> },
    /// Max-merges receipts; `device` is set when a local device sent one. Replies, per
    /// receipt, whether the watermark moved.
    Receipts { receipts: Vec<(Receipt, Option<DeviceId>)>, reply: Reply<Vec<bool>> },
    CreateUser { user: UserId, password_hash: String, device: Option<NewDevice>, reply: Reply<()> },
    AddDevice { user: UserId, device: NewDevice, reply: Reply<()> },
    RemoveDevice { user: UserId, device: DeviceId, reply: Reply<()> },
    /// Settles an outbound transaction: removes the queue rows the peer took, and moves
    /// the ones it refused for good to dead letters.
    Settle { delivered: Vec<Vec<u8>>, dead: Vec<(Vec<u8>, DeadLetter)>, reply: Reply<()> },
    /// Changes a local user's presence record; replies with the record as stored.
    Presence { localpart: String, change: PresenceChange, reply: Reply<PresenceRecord> },
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
}

impl Sequencer {
    /// Starts the writer thread; it ends on [`Sequencer::stop`] or when every handle is gone.
    pub fn start(store: Arc<dyn Store>, ctx: WriterContext) -> StoreResult<(Sequencer, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        let queues = queue_heads(&*store)?;
        let held = HeldCounts::load(&*store)?;
        let pending = held.per_conv.keys().cloned().collect();
        let mut w = Writer { store, ctx, convs: HashMap::new(), heads: HashMap::new(), queues, held, held_stale: false, pending };
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

    /// Commits everything queued so far and ends the writer.
    pub async fn stop(&self) {
        let _ = self.tx.send(Cmd::Stop).await;
    }

    pub async fn send(&self, from: UserId, device: DeviceId, to: UserId, client_msg_id: ClientMsgId, content: Content) -> Result<Message, ApiError> {
        self.call(|reply| Cmd::Send { from, device, to, client_msg_id, content, reply }).await
    }
    pub async fn inbound(&self, units: Vec<InboundUnit>) -> Result<Vec<InboundOutcome>, ApiError> {
        self.call(|reply| Cmd::Inbound { units, reply }).await
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
    /// Removes delivered rows from the outbound queue and moves refused ones to dead letters.
    pub async fn settle(&self, delivered: Vec<Vec<u8>>, dead: Vec<(Vec<u8>, DeadLetter)>) -> Result<(), ApiError> {
        self.call(|reply| Cmd::Settle { delivered, dead, reply }).await
    }
    pub async fn presence(&self, localpart: String, change: PresenceChange) -> Result<PresenceRecord, ApiError> {
        self.call(|reply| Cmd::Presence { localpart, change, reply }).await
    }
}

/// A reply held until the group's write is durable: called with `true` once committed.
type Completion = Box<dyn FnOnce(bool) + Send>;

fn completion<T: Send + 'static>(reply: Reply<T>, r: Result<T, ApiError>) -> Completion {
    Box::new(move |committed| {
        let _ = reply.send(if committed { r } else { Err(ApiError::internal()) });
    })
}

type Identity = (ConversationId, ServerName, u64);

/// Changes made by the commands of one group, visible to later commands of the same group.
#[derive(Default)]
struct Group {
    batch: Batch,
    done: Vec<Completion>,
    sends: HashMap<Vec<u8>, Message>,
    stored: HashMap<Identity, [u8; 32]>,
    held: HashMap<Identity, Option<SignedUnit>>,
    users: HashSet<String>,
    devices: HashMap<(String, DeviceId), [u8; 32]>,
    removed: HashSet<(String, DeviceId)>,
    wake: HashMap<String, u64>,
    outbound: HashSet<ServerName>,
    watermarks: HashMap<Vec<u8>, Watermark>,
    presence: HashMap<String, PresenceRecord>,
    /// Held units this group may still release.
    release_left: usize,
}

impl Group {
    fn new(release_batch: usize) -> Group {
        Group { release_left: release_batch, ..Default::default() }
    }
}

/// How many units are held, per (conversation, origin) and per origin. Bounded by the held
/// limits: a unit over them is refused (`retry`), so the maps never outgrow what is stored.
#[derive(Default)]
struct HeldCounts {
    per_conv: HashMap<(ConversationId, ServerName), u64>,
    per_peer: HashMap<ServerName, u64>,
}

impl HeldCounts {
    fn load(store: &dyn Store) -> StoreResult<HeldCounts> {
        let mut counts = HeldCounts::default();
        let mut from: Option<Vec<u8>> = None;
        loop {
            let rows = store.scan(Cf::Held, &[], from.as_deref(), Direction::Forward, 1_000)?;
            let Some((last, _)) = rows.last() else { return Ok(counts) };
            from = Some(last.clone());
            for (k, _) in &rows {
                if let Some((conv, origin, _)) = keys::parse_msg_id(k) {
                    counts.add(conv, &origin, 1);
                }
            }
        }
    }

    fn add(&mut self, conv: ConversationId, origin: &ServerName, n: i64) {
        fn bump<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, u64>, key: &K, n: i64) {
            let v = map.entry(key.clone()).or_insert(0);
            *v = v.saturating_add_signed(n);
            if *v == 0 {
                map.remove(key);
            }
        }
        bump(&mut self.per_conv, &(conv, origin.clone()), n);
        bump(&mut self.per_peer, origin, n);
    }

    fn of(&self, conv: ConversationId, origin: &ServerName) -> (u64, u64) {
        let c = self.per_conv.get(&(conv, origin.clone())).copied().unwrap_or(0);
        (c, self.per_peer.get(origin).copied().unwrap_or(0))
    }
}

/// The last position of every non-empty outbound queue lane. Read before any sender runs:
/// senders skip what they removed, so a position must never be handed out twice in one
/// process, as it would be if the writer first looked at a lane after it had drained.
fn queue_heads(store: &dyn Store) -> StoreResult<HashMap<(ServerName, u8), u64>> {
    let mut out = HashMap::new();
    let mut from: Option<Vec<u8>> = None;
    loop {
        let Some((k, _)) = store.scan(Cf::OutQueue, &[], from.as_deref(), Direction::Forward, 1)?.into_iter().next() else {
            return Ok(out);
        };
        let Some((dest, lane, _)) = keys::parse_queue(&k) else { return Ok(out) };
        let last = store.scan(Cf::OutQueue, &keys::queue_lane(&dest, lane), None, Direction::Reverse, 1)?;
        if let Some((_, _, pos)) = last.first().and_then(|(k, _)| keys::parse_queue(k)) {
            out.insert((dest.clone(), lane), pos);
        }
        from = Some(keys::queue(&dest, lane, u64::MAX));
    }
}

struct Writer {
    store: Arc<dyn Store>,
    ctx: WriterContext,
    /// Write-through caches, valid because this thread is the only writer.
    convs: HashMap<ConversationId, ConvRecord>,
    heads: HashMap<String, u64>,
    queues: HashMap<(ServerName, u8), u64>,
    /// Held units per (conversation, origin) and per origin, as committed.
    held: HeldCounts,
    /// Set when a write failed: `held` is read again from the store before its next use.
    held_stale: bool,
    /// Gaps filled whose held units are not all released yet, oldest first; at most one
    /// entry per (conversation, origin) with held units, so bounded like `held`.
    pending: VecDeque<(ConversationId, ServerName)>,
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
        loop {
            // With releases pending, look for commands without waiting for one.
            let first = if self.pending.is_empty() {
                match rx.blocking_recv() {
                    Some(cmd) => Some(cmd),
                    None => break,
                }
            } else {
                rx.try_recv().ok()
            };
            let mut group = Group::new(self.ctx.limits.held_release_batch());
            let mut state = match first {
                Some(cmd) => self.apply(cmd, &mut group),
                None => Applied::Done,
            };
            while matches!(state, Applied::Done) && group.done.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(cmd) => state = self.apply(cmd, &mut group),
                    Err(_) => break,
                }
            }
            if matches!(state, Applied::Done) {
                self.release_pending(&mut group);
            }
            self.commit(group);
            if matches!(state, Applied::Stop) {
                break;
            }
        }
        // Dropping the receiver fails every later command with shutting_down.
    }

    /// Drops caches that may hold what never reached disk. Queue positions stay: skipping
    /// a number is harmless, handing one out again is not.
    fn forget_uncommitted(&mut self) {
        self.convs.clear();
        self.heads.clear();
        self.held_stale = true;
    }

    fn held_counts(&mut self) -> StoreResult<&mut HeldCounts> {
        if self.held_stale {
            self.held = HeldCounts::load(&*self.store)?;
            self.held_stale = false;
        }
        Ok(&mut self.held)
    }

    /// Releases the held units of one pending gap, as many as the group may still take.
    fn release_pending(&mut self, g: &mut Group) {
        while g.release_left > 0 {
            let Some((conv, origin)) = self.pending.pop_front() else { return };
            let mark = g.batch.len();
            if let Err(e) = self.release_held(g, conv, &origin) {
                tracing::error!(%conv, %origin, error = %e, "cannot release held units; trying again later");
                g.batch.truncate(mark);
                self.forget_uncommitted();
                self.pending.push_back((conv, origin));
                return;
            }
        }
    }

    /// Stores the held units of (conv, origin) that now follow in line, up to the group's
    /// release budget; queues the rest for a later group.
    fn release_held(&mut self, g: &mut Group, conv_id: ConversationId, origin: &ServerName) -> StoreResult<()> {
        let Some(mut conv) = self.stored_conv(&conv_id)? else { return Ok(()) };
        loop {
            let next = (conv_id, origin.clone(), conv.heads.get(origin) + 1);
            if g.release_left == 0 {
                if self.held_at(g, &next)? && !self.pending.contains(&(conv_id, origin.clone())) {
                    self.pending.push_back((conv_id, origin.clone()));
                }
                break;
            }
            let Some(env) = self.take_held(g, &next)? else { break };
            let Ok(Unit::Message(held)) = envelope::open_trusted(&env) else {
                tracing::error!(conv = %conv_id, "held unit does not decode; dropping it");
                break;
            };
            let hash = env.hash();
            self.store_message(g, &mut conv, false, &env, &held, hash)?;
            g.release_left -= 1;
        }
        self.save_conv(g, conv_id, conv);
        Ok(())
    }

    fn held_at(&self, g: &Group, id: &Identity) -> StoreResult<bool> {
        if let Some(h) = g.held.get(id) {
            return Ok(h.is_some());
        }
        Ok(self.store.get(Cf::Held, &keys::held(&id.0, &id.1, id.2))?.is_some())
    }

    fn commit(&mut self, group: Group) {
        let result = if group.batch.is_empty() { Ok(()) } else { self.store.write(group.batch) };
        let committed = match result {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "group write failed; replying with errors");
                self.forget_uncommitted();
                false
            }
        };
        for d in group.done {
            d(committed);
        }
        if committed {
            for (user, head) in group.wake {
                self.ctx.hub.notify(&user, head);
            }
            if let Some(tx) = &self.ctx.outbound {
                for dest in group.outbound {
                    let _ = tx.send(dest);
                }
            }
        }
    }

    /// Applies one command to the group. A command that fails keeps none of its writes.
    fn apply(&mut self, cmd: Cmd, g: &mut Group) -> Applied {
        let mark = g.batch.len();
        let ok = match cmd {
            Cmd::Stop => return Applied::Stop,
            Cmd::Send { from, device, to, client_msg_id, content, reply } => {
                let r = self.send(g, from, device, to, client_msg_id, content);
                self.finish(g, reply, r)
            }
            Cmd::Inbound { units, reply } => {
                let r = units.into_iter().map(|u| self.inbound(g, u)).collect::<Result<Vec<_>, _>>();
                self.finish(g, reply, r)
            }
            Cmd::Receipts { receipts, reply } => {
                let r = receipts.into_iter().map(|(r, d)| self.receipt(g, r, d)).collect::<Result<Vec<_>, _>>();
                self.finish(g, reply, r)
            }
            Cmd::CreateUser { user, password_hash, device, reply } => {
                let r = self.create_user(g, user, password_hash, device);
                self.finish(g, reply, r)
            }
            Cmd::AddDevice { user, device, reply } => {
                let r = self.add_device(g, &user, device);
                self.finish(g, reply, r)
            }
            Cmd::RemoveDevice { user, device, reply } => {
                let r = self.remove_device(g, &user, device);
                self.finish(g, reply, r)
            }
            Cmd::Settle { delivered, dead, reply } => {
                for k in delivered {
                    g.batch.delete(Cf::OutQueue, k);
                }
                for (k, dl) in dead {
                    g.batch.put(Cf::DeadLetters, k.clone(), records::encode(&dl));
                    g.batch.delete(Cf::OutQueue, k);
                }
                self.finish(g, reply, Ok(()))
            }
            Cmd::Presence { localpart, change, reply } => {
                let r = self.presence(g, localpart, change);
                self.finish(g, reply, r)
            }
        };
        if ok || g.batch.len() == mark {
            return Applied::Done;
        }
        g.batch.truncate(mark);
        self.forget_uncommitted();
        Applied::Failed
    }

    /// Holds the reply until the group commits; false if the command failed.
    fn finish<T: Send + 'static>(&self, g: &mut Group, reply: Reply<T>, r: Result<T, ApiError>) -> bool {
        let ok = r.is_ok();
        g.done.push(completion(reply, r));
        ok
    }

    fn presence(&mut self, g: &mut Group, localpart: String, change: PresenceChange) -> Result<PresenceRecord, ApiError> {
        let mut rec = match g.presence.get(&localpart) {
            Some(r) => r.clone(),
            None => match self.store.get(Cf::Presence, &keys::presence(&localpart))? {
                Some(v) => records::decode("presence", &v)?,
                None => PresenceRecord::default(),
            },
        };
        match change {
            PresenceChange::LastSeen(ms) => rec.last_seen_ms = Some(rec.last_seen_ms.unwrap_or(0).max(ms)),
            PresenceChange::HideLastSeen(hide) => rec.hide_last_seen = hide,
        }
        g.batch.put(Cf::Presence, keys::presence(&localpart), records::encode(&rec));
        g.presence.insert(localpart, rec.clone());
        Ok(rec)
    }

    /// The conversation's record, if it exists (cached).
    fn stored_conv(&mut self, conv: &ConversationId) -> StoreResult<Option<ConvRecord>> {
        if let Some(c) = self.convs.get(conv) {
            return Ok(Some(c.clone()));
        }
        let Some(v) = self.store.get(Cf::Convs, &keys::conv(conv))? else { return Ok(None) };
        let rec: ConvRecord = records::decode("convs", &v)?;
        self.convs.insert(*conv, rec.clone());
        Ok(Some(rec))
    }

    /// The conversation's record, or a new one of `a` and `b` (true when new).
    fn conv(&mut self, conv: &ConversationId, a: &UserId, b: &UserId) -> StoreResult<(ConvRecord, bool)> {
        if let Some(rec) = self.stored_conv(conv)? {
            return Ok((rec, false));
        }
        let mut members = vec![a.clone(), b.clone()];
        members.sort();
        Ok((ConvRecord { members, heads: Deps::new() }, true))
    }

    fn save_conv(&mut self, g: &mut Group, id: ConversationId, conv: ConvRecord) {
        g.batch.put(Cf::Convs, keys::conv(&id), records::encode(&conv));
        self.convs.insert(id, conv);
    }

    fn last_key(&self, cf: Cf, prefix: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.store.scan(cf, prefix, None, Direction::Reverse, 1)?.into_iter().next().map(|(k, _)| k))
    }

    fn head(&mut self, localpart: &str) -> StoreResult<u64> {
        if let Some(h) = self.heads.get(localpart) {
            return Ok(*h);
        }
        let head = self.last_key(Cf::Events, &keys::events_of(localpart))?.and_then(|k| keys::parse_event(&k)).map(|(_, p)| p).unwrap_or(0);
        self.heads.insert(localpart.to_owned(), head);
        Ok(head)
    }

    /// Appends an event to a local user's stream within the group.
    fn push_event(&mut self, g: &mut Group, localpart: &str, kind: EventKind) -> StoreResult<()> {
        let pos = self.head(localpart)? + 1;
        let ev = Event { pos, event: kind };
        g.batch.put(Cf::Events, keys::event(localpart, pos), records::encode(&ev));
        self.heads.insert(localpart.to_owned(), pos);
        g.wake.insert(localpart.to_owned(), pos);
        Ok(())
    }

    /// Queues a unit for a peer, in the same batch as the change that made it.
    fn enqueue(&mut self, g: &mut Group, dest: &ServerName, conv: &ConversationId, env: &SignedUnit) -> StoreResult<()> {
        let lane = keys::lane_of(conv);
        let slot = (dest.clone(), lane);
        let pos = match self.queues.get(&slot) {
            Some(p) => *p,
            None => self
                .last_key(Cf::OutQueue, &keys::queue_lane(dest, lane))?
                .and_then(|k| keys::parse_queue(&k))
                .map(|(_, _, p)| p)
                .unwrap_or(0),
        } + 1;
        g.batch.put(Cf::OutQueue, keys::queue(dest, lane, pos), records::encode(env));
        self.queues.insert(slot, pos);
        g.outbound.insert(dest.clone());
        Ok(())
    }

    /// Stores a message (local or remote) with its index entries and events.
    fn store_message(&mut self, g: &mut Group, conv: &mut ConvRecord, new_conv: bool, env: &SignedUnit, msg: &Message, hash: [u8; 32]) -> StoreResult<()> {
        let key = msg.order_key();
        g.batch.put(Cf::Messages, keys::message(&msg.conv, &key), records::encode(env));
        let id = MsgIdRecord { key: key.to_bytes(), hash };
        g.batch.put(Cf::MsgIds, keys::msg_id(&msg.conv, &msg.origin, msg.seq), records::encode(&id));
        g.stored.insert((msg.conv, msg.origin.clone(), msg.seq), hash);
        conv.heads.set(msg.origin.clone(), msg.seq);
        for (user, peer) in [(&msg.from, &msg.to), (&msg.to, &msg.from)] {
            if user.is_on(&self.ctx.server) {
                if new_conv {
                    g.batch.put(Cf::UserConvs, keys::user_conv(user.localpart(), &msg.conv), peer.as_str().as_bytes().to_vec());
                    g.batch.put(Cf::Contacts, keys::contact(peer, user.localpart()), Vec::new());
                }
                self.push_event(g, user.localpart(), EventKind::Message(msg.clone()))?;
            }
        }
        Ok(())
    }

    fn send(
        &mut self,
        g: &mut Group,
        from: UserId,
        device: DeviceId,
        to: UserId,
        client_msg_id: ClientMsgId,
        content: Content,
    ) -> Result<Message, ApiError> {
        let send_key = keys::send_id(from.localpart(), &device, &client_msg_id);
        if let Some(m) = g.sends.get(&send_key) {
            return Ok(m.clone());
        }
        if let Some(v) = self.store.get(Cf::SendIds, &send_key)? {
            let rec: SendIdRecord = records::decode("send_ids", &v)?;
            let mut full = keys::messages_of(&rec.conv);
            full.extend_from_slice(&rec.key);
            let bytes = self.store.get(Cf::Messages, &full)?.ok_or_else(|| {
                tracing::error!(conv = %rec.conv, "send id points at a missing message");
                ApiError::internal()
            })?;
            return Ok(records::stored_message(&bytes)?);
        }
        let conv_id = ConversationId::one_to_one(&from, &to);
        let (mut conv, new) = self.conv(&conv_id, &from, &to)?;
        let me = self.ctx.server.clone();
        let seq = conv.heads.get(&me) + 1;
        let mut deps = conv.heads.clone();
        deps.set(me.clone(), seq);
        let msg = Message { to: to.clone(), ts: now_ms(), seq, conv: conv_id, deps, from, origin: me, content };
        // A conversation of two of our own users never leaves this server, and no peer may
        // ask for it (F7): its messages are stored without a signature, which would only
        // cost the writer about 15 µs each.
        let unit = Unit::Message(msg.clone());
        let env = if to.is_on(&self.ctx.server) { envelope::unsigned(&unit) } else { envelope::sign(&self.ctx.key, &unit) };
        self.store_message(g, &mut conv, new, &env, &msg, env.hash())?;
        g.batch.put(Cf::SendIds, send_key.clone(), records::encode(&SendIdRecord::new(conv_id, &msg.order_key())));
        if !to.is_on(&self.ctx.server) {
            self.enqueue(g, &to.server_name(), &conv_id, &env)?;
        }
        self.save_conv(g, conv_id, conv);
        g.sends.insert(send_key, msg.clone());
        Ok(msg)
    }

    /// The content hash already stored or held under an identity, if any.
    fn known(&self, g: &Group, id: &Identity) -> StoreResult<Option<[u8; 32]>> {
        if let Some(h) = g.stored.get(id) {
            return Ok(Some(*h));
        }
        if let Some(held) = g.held.get(id) {
            return Ok(held.as_ref().map(|e| e.hash()));
        }
        if let Some(v) = self.store.get(Cf::MsgIds, &keys::msg_id(&id.0, &id.1, id.2))? {
            return Ok(Some(records::decode::<MsgIdRecord>("msg_ids", &v)?.hash));
        }
        match self.store.get(Cf::Held, &keys::held(&id.0, &id.1, id.2))? {
            Some(v) => Ok(Some(records::decode::<SignedUnit>("held", &v)?.hash())),
            None => Ok(None),
        }
    }

    fn take_held(&mut self, g: &mut Group, id: &Identity) -> StoreResult<Option<SignedUnit>> {
        let env = match g.held.get(id) {
            Some(e) => e.clone(),
            None => match self.store.get(Cf::Held, &keys::held(&id.0, &id.1, id.2))? {
                Some(v) => Some(records::decode::<SignedUnit>("held", &v)?),
                None => None,
            },
        };
        if env.is_some() {
            g.batch.delete(Cf::Held, keys::held(&id.0, &id.1, id.2));
            g.held.insert(id.clone(), None);
            self.held_counts()?.add(id.0, &id.1, -1);
        }
        Ok(env)
    }

    fn inbound(&mut self, g: &mut Group, u: InboundUnit) -> Result<InboundOutcome, ApiError> {
        let outcome = |result| InboundOutcome { result, backfill: None };
        let m = &u.msg;
        let (mut conv, new) = self.conv(&m.conv, &m.from, &m.to)?;
        // The origin cannot have seen more of our messages than we have sent.
        if m.deps.get(&self.ctx.server) > conv.heads.get(&self.ctx.server) {
            tracing::warn!(conv = %m.conv, origin = %m.origin, seq = m.seq, "unit claims messages of ours that do not exist");
            return Ok(outcome(UnitResult::InvalidUnit));
        }
        let id: Identity = (m.conv, m.origin.clone(), m.seq);
        let head = conv.heads.get(&m.origin);
        let mut decision = admission::admit(head, m.seq, self.known(g, &id)?, u.hash);
        if decision == Decision::Duplicate && m.seq <= head && crate::sabotage::active(crate::sabotage::Fault::StoreTwice) {
            decision = Decision::Store;
        }
        match decision {
            Decision::Duplicate => {
                // A repeat of a held unit still waits on its gap: ask again.
                let backfill = (m.seq > head).then(|| Backfill { conv: m.conv, origin: m.origin.clone(), first: head + 1, last: m.seq - 1 });
                Ok(InboundOutcome { result: UnitResult::Duplicate, backfill })
            }
            Decision::Equivocation => {
                tracing::warn!(conv = %m.conv, origin = %m.origin, seq = m.seq, "equivocation: same identity, other content; refused");
                Ok(outcome(UnitResult::Equivocation))
            }
            Decision::Hold { first, last } => {
                let backfill = Some(Backfill { conv: m.conv, origin: m.origin.clone(), first, last });
                let (per_conversation, per_peer) = (self.ctx.limits.held_per_conversation(), self.ctx.limits.held_per_peer());
                let (in_conv, in_all) = self.held_counts()?.of(m.conv, &m.origin);
                if in_conv >= per_conversation || in_all >= per_peer {
                    // Refused, not dropped: the origin keeps it queued and sends it again
                    // once the gap is filled (F6.3).
                    tracing::warn!(conv = %m.conv, origin = %m.origin, seq = m.seq, in_conv, in_all, "held-unit limit reached; asking the origin to retry");
                    return Ok(InboundOutcome { result: UnitResult::Retry, backfill });
                }
                self.held_counts()?.add(m.conv, &m.origin, 1);
                g.batch.put(Cf::Held, keys::held(&m.conv, &m.origin, m.seq), records::encode(&u.env));
                g.held.insert(id, Some(u.env.clone()));
                tracing::info!(conv = %m.conv, origin = %m.origin, seq = m.seq, first, last, "holding unit behind a gap");
                Ok(InboundOutcome { result: UnitResult::Held, backfill })
            }
            Decision::Store => {
                self.store_message(g, &mut conv, new, &u.env, m, u.hash)?;
                self.save_conv(g, m.conv, conv);
                // Release whatever was held right behind it, within the group's budget.
                self.release_held(g, m.conv, &m.origin)?;
                Ok(outcome(UnitResult::Accepted))
            }
        }
    }

    /// Raises a watermark if `up_to` is beyond it (max-merge; repeats and stale receipts
    /// change nothing), records the device's own read cursor, tells both users' devices,
    /// and queues a receipt of a local user for the other user's server.
    fn receipt(&mut self, g: &mut Group, r: Receipt, device: Option<DeviceId>) -> Result<bool, ApiError> {
        if let (Some(d), ReceiptKind::Read) = (&device, r.kind) {
            let key = keys::read_cursor(r.user.localpart(), d, &r.conv);
            let cur = self.watermark(g, Cf::ReadCursors, &key)?;
            if cur.as_ref().is_none_or(|c| *c < r.up_to) {
                g.batch.put(Cf::ReadCursors, key.clone(), r.up_to.0.to_bytes());
                g.watermarks.insert(key, r.up_to.clone());
            }
        }
        let key = keys::receipt(&r.conv, &r.user, r.kind);
        let cur = self.watermark(g, Cf::Receipts, &key)?;
        if cur.as_ref().is_some_and(|c| *c >= r.up_to) {
            return Ok(false);
        }
        g.batch.put(Cf::Receipts, key.clone(), r.up_to.0.to_bytes());
        g.watermarks.insert(key, r.up_to.clone());
        for u in [&r.user, &r.peer] {
            if u.is_on(&self.ctx.server) {
                self.push_event(g, u.localpart(), EventKind::Receipt(r.clone()))?;
            }
        }
        if device.is_some() && !r.peer.is_on(&self.ctx.server) {
            let env = envelope::sign(&self.ctx.key, &Unit::Receipt(r.clone()));
            self.enqueue(g, &r.peer.server_name(), &r.conv, &env)?;
        }
        Ok(true)
    }

    fn watermark(&self, g: &Group, cf: Cf, key: &[u8]) -> StoreResult<Option<Watermark>> {
        if let Some(w) = g.watermarks.get(key) {
            return Ok(Some(w.clone()));
        }
        match self.store.get(cf, key)? {
            Some(v) => Ok(Some(records::watermark(cf.name(), &v)?)),
            None => Ok(None),
        }
    }

    fn user_exists(&self, g: &Group, user: &UserId) -> StoreResult<bool> {
        Ok(g.users.contains(user.localpart()) || self.store.get(Cf::Users, &keys::user(user.localpart()))?.is_some())
    }

    fn create_user(&mut self, g: &mut Group, user: UserId, password_hash: String, device: Option<NewDevice>) -> Result<(), ApiError> {
        if self.user_exists(g, &user)? {
            return Err(ApiError::new(ErrorCode::UserExists, format!("{user} already exists")));
        }
        let rec = UserRecord { password_hash, created_ms: now_ms() };
        g.batch.put(Cf::Users, keys::user(user.localpart()), records::encode(&rec));
        g.users.insert(user.localpart().to_owned());
        if let Some(d) = device {
            self.put_device(g, &user, d);
        }
        Ok(())
    }

    fn put_device(&mut self, g: &mut Group, user: &UserId, d: NewDevice) {
        let rec = DeviceRecord { name: d.name, created_ms: now_ms(), token_hash: d.token_hash };
        g.batch.put(Cf::Devices, keys::device(user.localpart(), &d.id), records::encode(&rec));
        let tok = TokenRecord { user: user.clone(), device: d.id.clone() };
        g.batch.put(Cf::Tokens, keys::token(&d.token_hash), records::encode(&tok));
        g.devices.insert((user.localpart().to_owned(), d.id), d.token_hash);
    }

    fn add_device(&mut self, g: &mut Group, user: &UserId, d: NewDevice) -> Result<(), ApiError> {
        if !self.user_exists(g, user)? {
            return Err(ApiError::new(ErrorCode::BadCredentials, "wrong user or password"));
        }
        self.put_device(g, user, d);
        Ok(())
    }

    fn remove_device(&mut self, g: &mut Group, user: &UserId, device: DeviceId) -> Result<(), ApiError> {
        let id = (user.localpart().to_owned(), device.clone());
        if g.removed.contains(&id) {
            return Ok(());
        }
        let hash = match g.devices.get(&id) {
            Some(h) => Some(*h),
            None => match self.store.get(Cf::Devices, &keys::device(user.localpart(), &device))? {
                Some(v) => Some(records::decode::<DeviceRecord>("devices", &v)?.token_hash),
                None => None,
            },
        };
        if let Some(h) = hash {
            g.batch.delete(Cf::Tokens, keys::token(&h));
            g.batch.delete(Cf::Devices, keys::device(user.localpart(), &device));
            // Its read cursors go with it; the user's read watermarks stay.
            let prefix = keys::read_cursors_of(user.localpart(), &device);
            for (k, _) in self.store.scan(Cf::ReadCursors, &prefix, None, Direction::Forward, usize::MAX)? {
                g.watermarks.remove(&k);
                g.batch.delete(Cf::ReadCursors, k);
            }
        }
        g.removed.insert(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemStore;
    use crate::store::StoreError;

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
        let err = seq.inbound(vec![good, bad]).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(store.inner.scan(Cf::Messages, &[], None, Direction::Forward, 10).unwrap().is_empty(), "the first unit's message was committed");
        assert!(store.inner.scan(Cf::Events, &[], None, Direction::Forward, 10).unwrap().is_empty(), "the first unit's event was committed");
        // The writer goes on: the good unit alone is stored, at stream position 1.
        let again = beta.unit("@bob:beta.test", &alice, 1);
        assert_eq!(seq.inbound(vec![again]).await.unwrap()[0].result, UnitResult::Accepted);
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
        let results = |outcomes: Vec<InboundOutcome>| outcomes.into_iter().map(|o| o.result).collect::<Vec<_>>();
        let to_alice: Vec<_> = (2..=6).map(|s| beta.unit("@bob:beta.test", &alice, s)).collect();
        let r = results(seq.inbound(to_alice).await.unwrap());
        use UnitResult::{Accepted, Held, Retry};
        assert_eq!(r, vec![Held, Held, Held, Retry, Retry], "per conversation");
        let r = results(seq.inbound(vec![beta.unit("@dan:beta.test", &alice, 2), beta.unit("@dan:beta.test", &alice, 3)]).await.unwrap());
        assert_eq!(r, vec![Held, Retry], "per peer");
        // The gap fills: seq 1 and the three held units behind it are stored, two per
        // group, the last in a later group.
        assert_eq!(results(seq.inbound(vec![beta.unit("@bob:beta.test", &alice, 1)]).await.unwrap()), vec![Accepted]);
        let conv = ConversationId::one_to_one(&UserId::parse("@bob:beta.test").unwrap(), &alice);
        let stored = || store.scan(Cf::Messages, &keys::messages_of(&conv), None, Direction::Forward, 100).unwrap().len();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stored() < 4 {
            assert!(std::time::Instant::now() < deadline, "held units were not released: {} stored", stored());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Room again: what was refused is taken now, in line.
        let r = results(seq.inbound((5..=6).map(|s| beta.unit("@bob:beta.test", &alice, s)).collect()).await.unwrap());
        assert_eq!(r, vec![Accepted, Accepted]);
        assert_eq!(stored(), 6);
        assert!(store.scan(Cf::Held, &[], None, Direction::Forward, 100).unwrap().len() == 1, "only dan's unit is still held");
        seq.stop().await;
        writer.join().unwrap();
    }
}
