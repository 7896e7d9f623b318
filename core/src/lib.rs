//! Missive's deterministic protocol core.
//!
//! Every protocol decision of a homeserver lives here, as plain state machines without
//! I/O: no sockets, no clocks, no threads, no async. Time comes in as an argument, stored
//! state is read through the [`store::Store`] interface, and what a decision changes comes
//! out as one [`store::Batch`] plus the actions the shell carries out after the batch is
//! durable (wake subscribers, nudge outbound senders, ask for a gap). The server's async
//! code moves bytes and calls these types; the simulations (`tests/simulation.rs`) drive
//! the very same types over [`store::memory::MemStore`] and a simulated network.
//!
//! - [`Core`]: the one writer's state. Its methods, each in the module of its concept:
//!   the conversation log ([`log`]: numbering, `deps`, idempotent sends, events, outbound
//!   queue entries), the inbox ([`inbox`]: admission, held units, release in bounded
//!   steps, gap requests), watermarks ([`watermarks`]: receipts, per-device read cursors)
//!   and accounts ([`accounts`]: users, devices, presence records, queue settlement).
//! - [`link`]: one peer link (lanes, transactions, acknowledgement settlement, dead
//!   letters, backoff); [`gapfill`]: asking for and serving missing ranges;
//!   [`ephemeral`]: presence and typing (coalescing per destination, rate limits, expiry);
//!   [`restore`]: a server restored from a backup (what it may number, what it takes back).
//! - [`admission`], [`backoff`]: the smallest pure rules the others are built from.

pub mod accounts;
pub mod admission;
pub mod backoff;
pub mod checks;
pub mod ephemeral;
pub mod gapfill;
pub mod inbox;
pub mod keydir;
pub mod link;
pub mod log;
pub mod records;
pub mod restore;
pub mod sabotage;
pub mod store;
pub mod watermarks;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use missive_spec::federation::{SignedUnit, Unit};
use missive_spec::{ConversationId, DeviceId, ErrorCode, Message, ServerName, Watermark};

use crate::inbox::HeldCounts;
use crate::records::{ConvRecord, PresenceRecord, UserRecord};
use crate::store::{Batch, Store, StoreError, StoreResult};

pub use crate::accounts::{AccountChange, NewDevice, PresenceChange, QueueChange};
pub use crate::inbox::{Backfill, InboundOutcome, InboundUnit};
pub use crate::sabotage::Faults;

/// Signs units this server originates. The server signs with its ed25519 key; simulations
/// may sign with anything, since verification happens in the shell before the core.
pub trait Signer: Send + Sync {
    fn sign(&self, unit: &Unit) -> SignedUnit;
}

/// Why a command was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Refused for a reason the client is told (`user_exists`, `bad_credentials`, ...).
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The store failed or holds something unreadable: the command changed nothing.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    pub fn refused(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Refused { code, message: message.into() }
    }
}

/// Bounds on units held behind gaps (F6.3); read anew for every group, since an operator
/// may change them while the server runs.
#[derive(Debug, Clone, Copy)]
pub struct HeldLimits {
    pub per_conversation: u64,
    pub per_peer: u64,
    /// Most held units released by one group.
    pub release_batch: usize,
}

impl Default for HeldLimits {
    fn default() -> Self {
        HeldLimits { per_conversation: 1_000, per_peer: 10_000, release_batch: 256 }
    }
}

pub(crate) type Identity = (ConversationId, ServerName, u64);

/// One group of commands committed in one write: the batch, what later commands of the
/// group must see before it is durable, and what to do once it is.
pub struct Tx {
    /// The time of the group, in ms since the epoch.
    pub now_ms: u64,
    pub batch: Batch,
    /// Local users whose event streams grew, with their new head: wake their subscribers.
    pub wake: HashMap<String, u64>,
    /// Destinations with newly queued units: nudge their senders.
    pub outbound: HashSet<ServerName>,
    pub(crate) sends: HashMap<Vec<u8>, Message>,
    pub(crate) stored: HashMap<Identity, [u8; 32]>,
    pub(crate) held: HashMap<Identity, Option<SignedUnit>>,
    pub(crate) users: HashSet<String>,
    /// User records changed by this group, by localpart.
    pub(crate) accounts: HashMap<String, UserRecord>,
    pub(crate) devices: HashMap<(String, DeviceId), [u8; 32]>,
    pub(crate) removed: HashSet<(String, DeviceId)>,
    pub(crate) watermarks: HashMap<Vec<u8>, Watermark>,
    pub(crate) presence: HashMap<String, PresenceRecord>,
    /// Blocks started (true) or ended (false) by this group, by `Blocks` key (§6.12).
    pub(crate) blocks: HashMap<Vec<u8>, bool>,
    /// Key-directory records written (`Some`) or removed (`None`) by this group.
    pub(crate) keydir: HashMap<(store::Cf, Vec<u8>), Option<Vec<u8>>>,
    pub(crate) limits: HeldLimits,
    /// Held units this group may still release.
    pub(crate) release_left: usize,
}

impl Tx {
    /// Where the batch stands; [`Core::abort`] cuts it back to such a mark.
    pub fn mark(&self) -> usize {
        self.batch.len()
    }
}

/// The one writer's state: write-through caches of what is stored (valid because the
/// writer is the store's only writer), and the protocol decisions made on top of them.
pub struct Core {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) server: ServerName,
    pub(crate) signer: Arc<dyn Signer>,
    pub(crate) faults: Faults,
    pub(crate) convs: HashMap<ConversationId, ConvRecord>,
    pub(crate) heads: HashMap<String, u64>,
    /// The last position handed out or settled per outbound lane. Never lowered while the
    /// process runs: a sender skips past what it settled, so a position must not be
    /// handed out twice (see [`link`]).
    pub(crate) queues: HashMap<(ServerName, u8), u64>,
    /// Held units per (conversation, origin) and per origin, as committed.
    pub(crate) held: HeldCounts,
    /// Set when a write failed: `held` is read again from the store before its next use.
    pub(crate) held_stale: bool,
    /// Gaps filled whose held units are not all released yet, oldest first; at most one
    /// entry per (conversation, origin) with held units, so bounded like `held`.
    pub(crate) pending: VecDeque<(ConversationId, ServerName)>,
    /// Set when the database was restored from a backup (federation.md F12).
    pub(crate) restore: Option<restore::RestoreRecord>,
}

impl Core {
    /// The core of `server` over `store`, as a restart finds it: held units counted, and
    /// every conversation with held units looked at again in the first groups.
    pub fn open(store: Arc<dyn Store>, server: ServerName, signer: Arc<dyn Signer>, faults: Faults) -> StoreResult<Core> {
        let held = HeldCounts::load(&*store)?;
        let mut pending: Vec<_> = held.conversations().collect();
        pending.sort();
        let pending = pending.into();
        let restore = restore::load(&*store)?;
        Ok(Core {
            restore,
            store,
            server,
            signer,
            faults,
            convs: HashMap::new(),
            heads: HashMap::new(),
            queues: HashMap::new(),
            held,
            held_stale: false,
            pending,
        })
    }

    /// Writes a record about the whole database ([`store::Cf::Meta`]): a learnt key
    /// rotation of a peer, say.
    pub fn put_meta(&mut self, tx: &mut Tx, key: Vec<u8>, value: Vec<u8>) {
        tx.batch.put(store::Cf::Meta, key, value);
    }

    pub fn server(&self) -> &ServerName {
        &self.server
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Starts a group at `now_ms`.
    pub fn begin(&self, now_ms: u64, limits: HeldLimits) -> Tx {
        Tx {
            now_ms,
            batch: Batch::default(),
            wake: HashMap::new(),
            outbound: HashSet::new(),
            sends: HashMap::new(),
            stored: HashMap::new(),
            held: HashMap::new(),
            users: HashSet::new(),
            accounts: HashMap::new(),
            devices: HashMap::new(),
            removed: HashSet::new(),
            watermarks: HashMap::new(),
            presence: HashMap::new(),
            blocks: HashMap::new(),
            keydir: HashMap::new(),
            limits,
            release_left: limits.release_batch,
        }
    }

    /// Whether held units wait for release: the shell should run a group soon even with
    /// no command waiting.
    pub fn releases_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A command failed after adding to the batch: drops its part (everything after
    /// `mark`) and whatever the caches learnt from it. The group must end here, because
    /// the group-local maps may still hold the failed command's changes.
    pub fn abort(&mut self, tx: &mut Tx, mark: usize) {
        tx.batch.truncate(mark);
        self.forget_uncommitted();
    }

    /// Tells the core whether the group's batch became durable.
    pub fn committed(&mut self, ok: bool) {
        if !ok {
            self.forget_uncommitted();
        }
    }

    /// Drops caches that may hold what never reached disk. Queue positions stay: skipping
    /// a number is harmless, handing one out again is not.
    fn forget_uncommitted(&mut self) {
        self.convs.clear();
        self.heads.clear();
        self.held_stale = true;
        if let Ok(r) = restore::load(&*self.store) {
            self.restore = r;
        }
    }

    pub(crate) fn held_counts(&mut self) -> StoreResult<&mut HeldCounts> {
        if self.held_stale {
            self.held = HeldCounts::load(&*self.store)?;
            self.held_stale = false;
        }
        Ok(&mut self.held)
    }
}
