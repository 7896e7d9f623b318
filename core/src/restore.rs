//! A server restored from a backup (federation.md F12): the mark `missived restore` leaves
//! on the database, what the restored server may not do until it has asked each peer what
//! it already sent, how it takes those units back, and what a server answers a peer that
//! asks.

use missive_spec::federation::{FedErrorCode, FedResponse, HighWaterMark, SignedUnit, HIGH_WATER_SCAN, MAX_BACKFILL};
use missive_spec::{ConversationId, ErrorCode, Message, ServerName};
use serde::{Deserialize, Serialize};

use crate::gapfill;
use crate::records::{self, ConvRecord};
use crate::store::{keys, Cf, Direction, Store, StoreResult};
use crate::{Core, Error, Tx};

/// The key of the [`RestoreRecord`] in [`Cf::Meta`].
pub const RESTORE_KEY: &[u8] = b"restore";
/// How far above the backup's highest event position a restored server goes on (F12.4).
pub const EVENT_GAP: u64 = 1 << 32;

/// Written by `missived restore` into the database it restored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RestoreRecord {
    /// When the backup was restored (ms since the epoch).
    pub restored_ms: u64,
    /// Every event position handed out from now on is above this (F12.4).
    pub event_floor: u64,
    /// Servers this one has learnt from what it sent them (F12.3): its messages to their
    /// users are numbered again.
    pub reclaimed: Vec<ServerName>,
}

/// Reads the restore record, if the database was restored.
pub fn load(store: &dyn Store) -> StoreResult<Option<RestoreRecord>> {
    match store.get(Cf::Meta, RESTORE_KEY)? {
        Some(v) => Ok(Some(records::decode("meta", &v)?)),
        None => Ok(None),
    }
}

/// Marks a database just copied from a backup as restored: event streams go on above
/// every position in it, and no server is reclaimed from yet. Run with no writer open.
pub fn mark_restored(store: &dyn Store, now_ms: u64) -> StoreResult<RestoreRecord> {
    // The highest position of any stream: the last event key of each user.
    let mut highest = load(store)?.map_or(0, |r| r.event_floor);
    let mut after: Option<Vec<u8>> = None;
    loop {
        let users = store.scan(Cf::Users, &[], after.as_deref(), Direction::Forward, 1000)?;
        for (k, _) in &users {
            let localpart = String::from_utf8_lossy(k);
            let last = store.scan(Cf::Events, &keys::events_of(&localpart), None, Direction::Reverse, 1)?;
            if let Some((_, p)) = last.first().and_then(|(k, _)| keys::parse_event(k)) {
                highest = highest.max(p);
            }
        }
        match users.last() {
            Some((k, _)) if users.len() == 1000 => after = Some(k.clone()),
            _ => break,
        }
    }
    let rec = RestoreRecord { restored_ms: now_ms, event_floor: highest + EVENT_GAP, reclaimed: Vec::new() };
    let mut batch = crate::store::Batch::default();
    batch.put(Cf::Meta, RESTORE_KEY.to_vec(), records::encode(&rec));
    store.write(batch)?;
    Ok(rec)
}

impl Core {
    /// Refuses to number a message for a user of `server` while this restored server has
    /// not learnt from it what it already sent (F12.3).
    pub(crate) fn may_number_for(&self, server: &ServerName) -> Result<(), Error> {
        match &self.restore {
            Some(r) if *server != self.server && !r.reclaimed.contains(server) => Err(Error::refused(
                ErrorCode::RemoteUnavailable,
                format!("this server was restored from a backup and is still learning from {server} what it sent there; try again shortly"),
            )),
            _ => Ok(()),
        }
    }

    /// The restore record, when the database was restored from a backup.
    pub fn restored(&self) -> Option<&RestoreRecord> {
        self.restore.as_ref()
    }

    /// The lowest position the next event of any stream may take (F12.4).
    pub(crate) fn event_floor(&self) -> u64 {
        self.restore.as_ref().map_or(0, |r| r.event_floor)
    }

    /// Stores units of this server's own that a peer sent back (F12.3 step 2), each
    /// already verified with one of this server's keys. Each must be a message of ours in
    /// its conversation, one above our head there; one already stored is skipped, one out
    /// of line ends the call. Returns how many were stored.
    pub fn reclaim(&mut self, tx: &mut Tx, units: Vec<(SignedUnit, Message)>) -> Result<usize, Error> {
        let mut stored = 0;
        for (env, msg) in units {
            if msg.origin != self.server || !msg.from.is_on(&self.server) || ConversationId::one_to_one(&msg.from, &msg.to) != msg.conv {
                return Err(Error::refused(ErrorCode::InvalidRequest, "a reclaimed unit is not a message of this server's"));
            }
            let mut conv = self.conv(&msg.conv, &msg.from, &msg.to)?;
            let head = conv.heads.get(&self.server);
            if msg.seq <= head {
                continue;
            }
            if msg.seq != head + 1 {
                break;
            }
            self.store_message(tx, &mut conv, &env, &msg, env.hash())?;
            self.save_conv(tx, msg.conv, conv);
            stored += 1;
        }
        Ok(stored)
    }

    /// Records that this restored server has learnt from `peer` what it sent there: its
    /// messages to `peer`'s users are numbered again.
    pub fn reclaimed(&mut self, tx: &mut Tx, peer: &ServerName) {
        let Some(rec) = &mut self.restore else { return };
        if !rec.reclaimed.contains(peer) {
            rec.reclaimed.push(peer.clone());
            tx.batch.put(Cf::Meta, RESTORE_KEY.to_vec(), records::encode(&*rec));
        }
    }
}

/// Answers `peer`'s `high_water` (F12.1): for each stored conversation after `after` with
/// a member on `peer`, the heads of `me`'s units and of `peer`'s, looking at most at
/// [`HIGH_WATER_SCAN`] conversations.
pub fn high_water(store: &dyn Store, me: &ServerName, peer: &ServerName, after: Option<ConversationId>) -> FedResponse {
    let from = after.map(|c| keys::conv(&c));
    let rows = match store.scan(Cf::Convs, &[], from.as_deref(), Direction::Forward, HIGH_WATER_SCAN) {
        Ok(r) => r,
        Err(_) => return FedResponse::Error { code: FedErrorCode::Internal, message: "storage fault".into() },
    };
    let full = rows.len() == HIGH_WATER_SCAN;
    let mut convs = Vec::new();
    let mut last = None;
    for (k, v) in &rows {
        let Ok(conv) = ConversationId::from_slice(k) else { continue };
        last = Some(conv);
        let Ok(rec) = records::decode::<ConvRecord>("convs", v) else { continue };
        if rec.members.iter().any(|u| u.is_on(peer)) {
            convs.push(HighWaterMark { conv, mine: rec.heads.get(me), yours: rec.heads.get(peer) });
        }
    }
    FedResponse::HighWater { next: if full { last } else { None }, convs }
}

/// Answers `peer`'s `reclaim` (F12.2): `peer`'s own units of `conv`, `first..=last`.
pub fn serve_reclaim(store: &dyn Store, peer: &ServerName, conv: ConversationId, first: u64, last: u64) -> FedResponse {
    gapfill::serve_units(store, peer, peer, conv, first, last)
}

/// What a restored server asks `peer` about one conversation of a `high_water` answer
/// (F12.3): the range of its own units to reclaim (at most [`MAX_BACKFILL`] at a time),
/// and the range of `peer`'s units to fill as a gap (F7).
pub fn plan(store: &dyn Store, me: &ServerName, peer: &ServerName, mark: &HighWaterMark) -> StoreResult<Plan> {
    let mine = gapfill::head_of(store, &mark.conv, me)?;
    let theirs = gapfill::head_of(store, &mark.conv, peer)?;
    Ok(Plan {
        reclaim: (mark.yours > mine).then(|| (mine + 1, mark.yours.min(mine + MAX_BACKFILL))),
        fill: (mark.mine > theirs).then(|| crate::Backfill { conv: mark.conv, origin: peer.clone(), first: theirs + 1, last: mark.mine }),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `(first, last)` of our own units the peer holds and we lack.
    pub reclaim: Option<(u64, u64)>,
    pub fill: Option<crate::Backfill>,
}
