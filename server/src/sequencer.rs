//! The single writer. Every change to conversations, streams and accounts passes through
//! one thread that assigns `origin_seq` and stream positions, builds one batch per logical
//! change, and commits all changes waiting at that moment in one synced write (group
//! commit). Replies go out, and subscribers are woken, only after the write is durable.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use missive_spec::{
    ClientMsgId, Content, ConversationId, Deps, DeviceId, ErrorCode, Event, EventKind, Message, ServerName,
    UserId,
};
use tokio::sync::{mpsc, oneshot};

use crate::accounts::now_ms;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::records::{self, ConvRecord, DeviceRecord, SendIdRecord, TokenRecord, UserRecord};
use crate::store::{keys, Batch, Cf, Direction, Store, StoreResult};

/// Most commands folded into one synced write.
const MAX_GROUP: usize = 512;

pub struct NewDevice {
    pub id: DeviceId,
    pub name: Option<String>,
    pub token_hash: [u8; 32],
}

type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

pub enum Cmd {
    Send { from: UserId, device: DeviceId, to: UserId, client_msg_id: ClientMsgId, content: Content, reply: Reply<Message> },
    CreateUser { user: UserId, password_hash: String, device: Option<NewDevice>, reply: Reply<()> },
    AddDevice { user: UserId, device: NewDevice, reply: Reply<()> },
    RemoveDevice { user: UserId, device: DeviceId, reply: Reply<()> },
    /// Commit what came before, then end the writer; later commands fail with shutting_down.
    Stop,
}

/// Handle to the writer thread.
#[derive(Clone)]
pub struct Sequencer {
    tx: mpsc::Sender<Cmd>,
}

impl Sequencer {
    /// Starts the writer thread; it ends on [`Sequencer::stop`] or when every handle is gone.
    pub fn start(store: Arc<dyn Store>, server: ServerName, hub: Arc<Hub>) -> (Sequencer, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        let mut w = Writer { store, server, hub, convs: HashMap::new(), heads: HashMap::new() };
        let join = std::thread::Builder::new()
            .name("missive-writer".into())
            .spawn(move || w.run(rx))
            // Failing to spawn a thread at start-up is unrecoverable.
            .expect("spawn writer thread");
        (Sequencer { tx }, join)
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
    pub async fn create_user(&self, user: UserId, password_hash: String, device: Option<NewDevice>) -> Result<(), ApiError> {
        self.call(|reply| Cmd::CreateUser { user, password_hash, device, reply }).await
    }
    pub async fn add_device(&self, user: UserId, device: NewDevice) -> Result<(), ApiError> {
        self.call(|reply| Cmd::AddDevice { user, device, reply }).await
    }
    pub async fn remove_device(&self, user: UserId, device: DeviceId) -> Result<(), ApiError> {
        self.call(|reply| Cmd::RemoveDevice { user, device, reply }).await
    }
}

/// A reply held until the group's write is durable.
enum Done {
    Message(Reply<Message>, Result<Message, ApiError>),
    Unit(Reply<()>, Result<(), ApiError>),
}

impl Done {
    fn fail(self, e: ApiError) {
        match self {
            Done::Message(r, _) => drop(r.send(Err(e))),
            Done::Unit(r, _) => drop(r.send(Err(e))),
        }
    }
    fn complete(self) {
        match self {
            Done::Message(r, v) => drop(r.send(v)),
            Done::Unit(r, v) => drop(r.send(v)),
        }
    }
}

/// Changes made by the commands of one group, visible to later commands of the same group.
#[derive(Default)]
struct Group {
    batch: Batch,
    done: Vec<Done>,
    sends: HashMap<Vec<u8>, Message>,
    users: HashSet<String>,
    devices: HashMap<(String, DeviceId), [u8; 32]>,
    removed: HashSet<(String, DeviceId)>,
    wake: HashMap<String, u64>,
}

struct Writer {
    store: Arc<dyn Store>,
    server: ServerName,
    hub: Arc<Hub>,
    /// Write-through caches, valid because this thread is the only writer.
    convs: HashMap<ConversationId, ConvRecord>,
    heads: HashMap<String, u64>,
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Cmd>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = Group::default();
            let mut stop = self.apply(first, &mut group);
            while !stop && group.done.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(cmd) => stop = self.apply(cmd, &mut group),
                    Err(_) => break,
                }
            }
            self.commit(group);
            if stop {
                break;
            }
        }
        // Dropping the receiver fails every later command with shutting_down.
    }

    fn commit(&mut self, group: Group) {
        let result = if group.batch.is_empty() { Ok(()) } else { self.store.write(group.batch) };
        match result {
            Ok(()) => {
                for d in group.done {
                    d.complete();
                }
                for (user, head) in group.wake {
                    self.hub.notify(&user, head);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group write failed; replying with errors");
                // The caches may hold counters that never reached disk.
                self.convs.clear();
                self.heads.clear();
                for d in group.done {
                    d.fail(ApiError::internal());
                }
            }
        }
    }

    /// Applies one command to the group; true when the writer must stop after it.
    fn apply(&mut self, cmd: Cmd, g: &mut Group) -> bool {
        match cmd {
            Cmd::Stop => return true,
            Cmd::Send { from, device, to, client_msg_id, content, reply } => {
                let r = self.send(g, from, device, to, client_msg_id, content);
                g.done.push(Done::Message(reply, r));
            }
            Cmd::CreateUser { user, password_hash, device, reply } => {
                let r = self.create_user(g, user, password_hash, device);
                g.done.push(Done::Unit(reply, r));
            }
            Cmd::AddDevice { user, device, reply } => {
                let r = self.add_device(g, &user, device);
                g.done.push(Done::Unit(reply, r));
            }
            Cmd::RemoveDevice { user, device, reply } => {
                let r = self.remove_device(g, &user, device);
                g.done.push(Done::Unit(reply, r));
            }
        }
        false
    }

    fn conv(&mut self, conv: &ConversationId, a: &UserId, b: &UserId) -> StoreResult<(ConvRecord, bool)> {
        if let Some(c) = self.convs.get(conv) {
            return Ok((c.clone(), false));
        }
        match self.store.get(Cf::Convs, &keys::conv(conv))? {
            Some(v) => {
                let rec: ConvRecord = records::decode("convs", &v)?;
                self.convs.insert(*conv, rec.clone());
                Ok((rec, false))
            }
            None => {
                let mut members = vec![a.clone(), b.clone()];
                members.sort();
                Ok((ConvRecord { members, heads: Deps::new() }, true))
            }
        }
    }

    fn head(&mut self, localpart: &str) -> StoreResult<u64> {
        if let Some(h) = self.heads.get(localpart) {
            return Ok(*h);
        }
        let last = self.store.scan(Cf::Events, &keys::events_of(localpart), None, Direction::Reverse, 1)?;
        let head = match last.first() {
            Some((k, _)) => keys::parse_event(k).map(|(_, p)| p).unwrap_or(0),
            None => 0,
        };
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
            return Ok(records::decode("messages", &bytes)?);
        }
        let conv_id = ConversationId::one_to_one(&from, &to);
        let (mut conv, new) = self.conv(&conv_id, &from, &to)?;
        let seq = conv.heads.get(&self.server) + 1;
        conv.heads.set(self.server.clone(), seq);
        let msg = Message {
            to: to.clone(),
            ts: now_ms(),
            seq,
            conv: conv_id,
            deps: conv.heads.clone(),
            from: from.clone(),
            origin: self.server.clone(),
            content,
        };
        let key = msg.order_key();
        g.batch.put(Cf::Messages, keys::message(&conv_id, &key), records::encode(&msg));
        g.batch.put(Cf::MsgIds, keys::msg_id(&conv_id, &self.server, seq), key.to_bytes());
        g.batch.put(Cf::SendIds, send_key.clone(), records::encode(&SendIdRecord::new(conv_id, &key)));
        g.batch.put(Cf::Convs, keys::conv(&conv_id), records::encode(&conv));
        self.convs.insert(conv_id, conv);
        for (user, peer) in [(&from, &to), (&to, &from)] {
            if user.is_on(&self.server) {
                if new {
                    g.batch.put(Cf::UserConvs, keys::user_conv(user.localpart(), &conv_id), peer.as_str().as_bytes().to_vec());
                }
                self.push_event(g, user.localpart(), EventKind::Message(msg.clone()))?;
            }
        }
        g.sends.insert(send_key, msg.clone());
        Ok(msg)
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
        }
        g.removed.insert(id);
        Ok(())
    }
}
