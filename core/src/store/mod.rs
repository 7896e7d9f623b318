//! The storage interface the core reads through and the writer applies batches to.
//!
//! Protocol code sees only [`Store`]: point reads, ordered range scans within one column
//! family, and [`Batch`]es that land atomically and durably (WAL synced) or not at all.
//! A second engine implements the same trait without touching protocol code.

pub mod keys;
pub mod memory;

use thiserror::Error;

/// One kind of record; each is a column family in RocksDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cf {
    /// localpart → `UserRecord`
    Users,
    /// localpart, device → `DeviceRecord`
    Devices,
    /// SHA-256(access token) → `TokenRecord`
    Tokens,
    /// conversation → `ConvRecord` (members, sequence heads)
    Convs,
    /// conversation, order key → the message's signed envelope (canonical order)
    Messages,
    /// conversation, origin, origin_seq → order key and content hash (identity index)
    MsgIds,
    /// localpart, device, client_msg_id → conversation and order key (idempotent send)
    SendIds,
    /// localpart, position → encoded `Event` (per-user event stream)
    Events,
    /// localpart, conversation → peer user id (a user's conversations)
    UserConvs,
    /// destination server, queue position → signed unit waiting for the peer's acknowledgement
    OutQueue,
    /// conversation, origin, origin_seq → signed unit held behind a gap
    Held,
    /// destination server, queue position → unit the peer refused for good, with the reason
    DeadLetters,
    /// conversation, user, kind → watermark (order key bytes): receipts, max-merged
    Receipts,
    /// localpart, device, conversation → that device's read watermark
    ReadCursors,
    /// user id (any server), local localpart → () : local users with a conversation with that user
    Contacts,
    /// localpart → `PresenceRecord` (last seen, settings)
    Presence,
    /// localpart, last activity (ms), conversation → peer user id: a user's conversations,
    /// most recently active last (§6.10)
    Active,
    /// conversation, order key → `Undeliverable`: the recipient's server refused that local
    /// message for good (§10.5); read by `history` (§6.6)
    Failed,
    /// localpart, user id → block time (ms): whom a local user blocks (§6.12)
    Blocks,
    /// conversation, order key → (): a message kept from its local recipient, who blocked
    /// its sender when it arrived (§6.12); same key layout as `Messages`
    Withheld,
    /// name → a record about the whole database (`restore`: `RestoreRecord`, federation.md F12)
    Meta,
    /// localpart, device → `KeyRecord`: a device's public keys and fallback key (e2ee.md E3)
    DeviceKeys,
    /// localpart, device, key id → `OneTimeKey`, removed when claimed (e2ee.md E3.3)
    OneTimeKeys,
    /// user id (any server) → version (u64 BE): the latest change of that user's device
    /// list issued (local users) or seen (remote users) (e2ee.md E5)
    DeviceLists,
}

impl Cf {
    pub const ALL: [Cf; 24] = [
        Cf::Users,
        Cf::Devices,
        Cf::Tokens,
        Cf::Convs,
        Cf::Messages,
        Cf::MsgIds,
        Cf::SendIds,
        Cf::Events,
        Cf::UserConvs,
        Cf::OutQueue,
        Cf::Held,
        Cf::DeadLetters,
        Cf::Receipts,
        Cf::ReadCursors,
        Cf::Contacts,
        Cf::Presence,
        Cf::Active,
        Cf::Failed,
        Cf::Meta,
        Cf::Blocks,
        Cf::Withheld,
        Cf::DeviceKeys,
        Cf::OneTimeKeys,
        Cf::DeviceLists,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Cf::Users => "users",
            Cf::Devices => "devices",
            Cf::Tokens => "tokens",
            Cf::Convs => "convs",
            Cf::Messages => "messages",
            Cf::MsgIds => "msg_ids",
            Cf::SendIds => "send_ids",
            Cf::Events => "events",
            Cf::UserConvs => "user_convs",
            Cf::OutQueue => "out_queue",
            Cf::Held => "held",
            Cf::DeadLetters => "dead_letters",
            Cf::Receipts => "receipts",
            Cf::ReadCursors => "read_cursors",
            Cf::Contacts => "contacts",
            Cf::Presence => "presence",
            Cf::Active => "active",
            Cf::Failed => "failed",
            Cf::Meta => "meta",
            Cf::Blocks => "blocks",
            Cf::Withheld => "withheld",
            Cf::DeviceKeys => "device_keys",
            Cf::OneTimeKeys => "one_time_keys",
            Cf::DeviceLists => "device_lists",
        }
    }
}

/// Storage failures. Any of them means the operation did not happen.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("the database at {0} is in use by another process (is missived running?)")]
    Locked(String),
    /// The disk is full (or refuses writes); the write did not happen.
    #[error("disk full: {0}")]
    NoSpace(String),
    #[error("corrupt record in {cf}: {reason}")]
    Corrupt { cf: &'static str, reason: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Writes that must land together: one logical change.
#[derive(Debug, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
}

#[derive(Debug)]
pub enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
}

impl Batch {
    pub fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put(cf, key, value));
    }
    pub fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.ops.push(Op::Delete(cf, key));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    /// Drops every op after the first `len` (what a failed command added).
    pub fn truncate(&mut self, len: usize) {
        self.ops.truncate(len);
    }
}

/// Direction of a range scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Reverse,
}

/// The storage engine behind the homeserver.
pub trait Store: Send + Sync + 'static {
    fn get(&self, cf: Cf, key: &[u8]) -> StoreResult<Option<Vec<u8>>>;

    /// Up to `limit` entries whose keys start with `prefix`, strictly after `from` in
    /// `dir` order (from the first or last key of the prefix when `from` is `None`).
    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: Option<&[u8]>,
        dir: Direction,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>>;

    /// Applies every op of the batch atomically; returns once it is durable.
    fn write(&self, batch: Batch) -> StoreResult<()>;

    /// Applies every op of the batch atomically, without waiting for the disk: for writes
    /// that can be made again from elsewhere after a machine's crash (cluster mode's log
    /// replays them). An engine without the distinction writes as [`Store::write`] does.
    fn write_unsynced(&self, batch: Batch) -> StoreResult<()> {
        self.write(batch)
    }

    /// How many keys start with `prefix`, read a thousand at a time (an engine may count
    /// without copying values).
    fn count(&self, cf: Cf, prefix: &[u8]) -> StoreResult<u64> {
        let mut n = 0u64;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let rows = self.scan(cf, prefix, after.as_deref(), Direction::Forward, 1000)?;
            n += rows.len() as u64;
            let full = rows.len() == 1000;
            match rows.into_iter().last() {
                Some((k, _)) if full => after = Some(k),
                _ => return Ok(n),
            }
        }
    }
}
