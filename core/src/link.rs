//! One link to a peer server, outbound: lanes, transactions, acknowledgement settlement,
//! dead letters and backoff.
//!
//! A destination's durable queue is split into lanes by conversation; each lane is read in
//! order, up to [`MAX_TXN_UNITS`] rows per transaction. A unit leaves the queue only when
//! the peer acknowledged it (or refused it for good: then it becomes a dead letter); a
//! row that no longer decodes is set aside as a dead letter too, or the lane would read
//! it forever. The link remembers, per lane, the last row it settled, so the next read
//! starts after it instead of walking deletion markers; [`crate::Core::settle`] makes sure
//! no later unit gets a position at or below it.
//!
//! Failures — the peer unreachable, refusing, asking to retry, or this server unable to
//! record what the peer took — back the link off with jitter; the peer answering or
//! contacting us resets it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use missive_spec::federation::{txn_id, SignedUnit, Unit, UnitResult, MAX_TXN_UNITS};
use missive_spec::{ConversationId, ReceiptKind, ServerName, Watermark};

use crate::backoff::Backoff;
use crate::records::{self, DeadLetter};
use crate::sabotage::Faults;
use crate::store::keys;

/// Lanes per destination.
pub const LANES: u8 = keys::LANES;

/// One transaction built from a lane's queued rows.
#[derive(Debug, Clone)]
pub struct Txn {
    pub lane: u8,
    /// Its id: a hash of its units, so a retry is idempotent (F5).
    pub id: Vec<u8>,
    /// What goes on the wire: receipts coalesced to the highest watermark of each kind.
    pub units: Vec<SignedUnit>,
    /// Every row in queue order: its key, and the index in `units` of the result that
    /// settles it — or why it does not decode.
    rows: Vec<(Vec<u8>, Result<usize, Undecodable>)>,
}

#[derive(Debug, Clone)]
struct Undecodable {
    error: String,
    raw: Vec<u8>,
}

/// What the writer must record for a settled transaction.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Settlement {
    pub delivered: Vec<Vec<u8>>,
    pub dead: Vec<(Vec<u8>, DeadLetter)>,
    /// What the link does once the writer recorded it.
    pub progress: Progress,
}

/// How a settled transaction moves its link on ([`Link::settled`]).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub lane: u8,
    /// The last row of the leading run now removed: the lane reads on after it.
    pub removed_through: Option<Vec<u8>>,
    /// Some units were not taken (`retry` and the like): back off before the next round.
    pub retry: bool,
    /// Units were sent and answered: the peer is reachable.
    pub answered: bool,
}

/// A peer's link state, for operators.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    pub up: bool,
    pub failures: u32,
    pub last_success_ms: Option<u64>,
    pub next_attempt: Option<Instant>,
    pub last_error: Option<String>,
}

pub struct Link {
    backoff: Backoff,
    up: bool,
    last_success_ms: Option<u64>,
    last_error: Option<String>,
    /// Per lane, the last queue key settled.
    after: Vec<Option<Vec<u8>>>,
    faults: Faults,
}

impl Link {
    pub fn new(retry_base: Duration, retry_cap: Duration, faults: Faults) -> Link {
        Link {
            backoff: Backoff::new(retry_base, retry_cap),
            up: false,
            last_success_ms: None,
            last_error: None,
            after: vec![None; usize::from(LANES)],
            faults,
        }
    }

    /// Where the next read of `lane` starts (exclusive).
    pub fn read_after(&self, lane: u8) -> Option<&[u8]> {
        self.after[usize::from(lane)].as_deref()
    }

    /// Forgets where each lane was: the next reads start at the queue's head.
    pub fn rewind(&mut self) {
        self.after.iter_mut().for_each(|a| *a = None);
    }

    /// When the next attempt may start; `None`: now.
    pub fn next_attempt(&self, now: Instant) -> Option<Instant> {
        self.backoff.next_attempt().filter(|at| *at > now)
    }

    /// Builds the transaction for up to [`MAX_TXN_UNITS`] rows read from `lane`.
    pub fn build(lane: u8, rows: Vec<(Vec<u8>, Vec<u8>)>) -> Txn {
        let mut queued: Vec<SignedUnit> = Vec::with_capacity(rows.len());
        let rows: Vec<(Vec<u8>, Result<usize, Undecodable>)> = rows
            .into_iter()
            .map(|(k, v)| match records::decode::<SignedUnit>("out_queue", &v) {
                Ok(u) => {
                    queued.push(u);
                    (k, Ok(queued.len() - 1))
                }
                Err(e) => (k, Err(Undecodable { error: e.to_string(), raw: v })),
            })
            .collect();
        let (units, sent_as) = coalesce_receipts(queued);
        let rows = rows.into_iter().map(|(k, r)| (k, r.map(|i| sent_as[i]))).collect();
        Txn { lane, id: txn_id(&units).to_vec(), units, rows }
    }

    /// Decides what becomes of each row once the peer answered `results` (one per sent
    /// unit; a transaction with nothing to send is settled with none).
    pub fn settle(&self, txn: &Txn, results: &[UnitResult]) -> Settlement {
        let mut s = Settlement { progress: Progress { lane: txn.lane, answered: !txn.units.is_empty(), ..Default::default() }, ..Default::default() };
        let mut extra = self.faults.settle_extra();
        for (k, row) in &txn.rows {
            match row {
                Err(u) => {
                    tracing::error!(error = %u.error, "queued unit does not decode; moving it to dead letters");
                    let unit = SignedUnit { key: String::new(), sig: Vec::new(), unit: u.raw.clone() };
                    s.dead.push((k.clone(), DeadLetter { reason: "undecodable".into(), unit }));
                }
                Ok(i) => match results.get(*i) {
                    Some(r) if r.delivered() => s.delivered.push(k.clone()),
                    Some(r) if r.permanent() => {
                        tracing::error!(result = ?r, "peer refused a unit for good; moved to dead letters");
                        let unit = txn.units[*i].clone();
                        s.dead.push((k.clone(), DeadLetter { reason: r.code().to_owned(), unit }));
                    }
                    _ if extra => {
                        extra = false;
                        s.delivered.push(k.clone());
                    }
                    _ => s.progress.retry = true,
                },
            }
            if !s.progress.retry {
                s.progress.removed_through = Some(k.clone());
            }
        }
        s
    }

    /// The writer recorded `s`: the lane reads on after it; the link is up, and backs off
    /// only if the peer asked for some units again.
    pub fn settled(&mut self, s: &Progress, now: Instant, now_ms: u64, jitter: f64) -> Option<Instant> {
        if let Some(k) = &s.removed_through {
            self.after[usize::from(s.lane)] = Some(k.clone());
        }
        if s.answered {
            self.reached(now_ms);
        }
        if s.retry {
            return Some(self.backoff.failure(now, jitter));
        }
        if s.answered {
            self.backoff.reset();
        }
        None
    }

    /// The peer answered.
    fn reached(&mut self, now_ms: u64) {
        if !self.up {
            tracing::info!("federation link up");
        }
        self.up = true;
        self.last_success_ms = Some(now_ms);
        self.last_error = None;
    }

    /// The peer could not be reached or refused the request. Returns when to try again.
    pub fn remote_failure(&mut self, error: String, now: Instant, jitter: f64) -> Instant {
        let at = self.backoff.failure(now, jitter);
        let retry_in = at.saturating_duration_since(now);
        if self.up || self.last_error.is_none() {
            tracing::warn!(%error, ?retry_in, "federation link down; queued units wait");
        } else {
            tracing::debug!(%error, ?retry_in, "federation link still down");
        }
        self.up = false;
        self.last_error = Some(error);
        at
    }

    /// The connection to the peer went away (its keep-alives stopped, or it closed): the
    /// link is down until the peer answers again. Nothing is backed off: the next unit
    /// tries at once.
    pub fn connection_lost(&mut self, error: String) {
        if self.up {
            tracing::warn!(%error, "federation link down: connection lost");
            self.up = false;
            self.last_error = Some(error);
        }
    }

    /// This server could not read or write its own store: back off as for the peer, so a
    /// disk that refuses writes does not become a storm of resends.
    pub fn local_failure(&mut self, error: String, now: Instant, jitter: f64) -> Instant {
        self.last_error = Some(error);
        self.backoff.failure(now, jitter)
    }

    /// The peer contacted us: whatever we owe it may go at once.
    pub fn contacted(&mut self) {
        self.backoff.reset();
    }

    pub fn status(&self) -> LinkStatus {
        LinkStatus {
            up: self.up,
            failures: self.backoff.failures(),
            last_success_ms: self.last_success_ms,
            next_attempt: self.backoff.next_attempt(),
            last_error: self.last_error.clone(),
        }
    }
}

/// Queued receipts are watermarks: of several for the same (conversation, user, kind) only
/// the highest needs to travel. Returns the units to send and, for each queued unit, the
/// index of the sent unit whose result settles it.
fn coalesce_receipts(units: Vec<SignedUnit>) -> (Vec<SignedUnit>, Vec<usize>) {
    let mut send: Vec<SignedUnit> = Vec::with_capacity(units.len());
    let mut sent_as = Vec::with_capacity(units.len());
    let mut best: HashMap<(ConversationId, String, ReceiptKind), (usize, Watermark)> = HashMap::new();
    for u in units {
        if let Ok(Unit::Receipt(r)) = missive_spec::codec::decode::<Unit>(&u.unit) {
            let key = (r.conv, r.user.to_string(), r.kind);
            if let Some((j, w)) = best.get_mut(&key) {
                if r.up_to > *w {
                    send[*j] = u;
                    *w = r.up_to;
                }
                sent_as.push(*j);
                continue;
            }
            best.insert(key, (send.len(), r.up_to));
        }
        sent_as.push(send.len());
        send.push(u);
    }
    (send, sent_as)
}

/// Every destination with queued units.
pub fn queued_destinations(store: &dyn crate::store::Store) -> crate::store::StoreResult<Vec<ServerName>> {
    use crate::store::{Cf, Direction};
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

/// Reads the next rows of `lane` toward `dest`, after what `link` settled.
pub fn next_rows(store: &dyn crate::store::Store, dest: &ServerName, lane: u8, after: Option<&[u8]>) -> crate::store::StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
    store.scan(crate::store::Cf::OutQueue, &keys::queue_lane(dest, lane), after, crate::store::Direction::Forward, MAX_TXN_UNITS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use missive_spec::{Content, Message, OrderKey, Receipt, UserId};

    fn signed(unit: &Unit) -> SignedUnit {
        crate::log::unsigned(unit)
    }

    #[test]
    fn queued_receipts_travel_as_their_highest_watermark() {
        let (a, b) = (UserId::parse("@a:alpha.test").unwrap(), UserId::parse("@b:beta.test").unwrap());
        let conv = ConversationId::one_to_one(&a, &b);
        let r = |kind, seq| {
            let up_to = Watermark(OrderKey { rank: seq, origin: ServerName::parse("beta.test").unwrap(), seq });
            signed(&Unit::Receipt(Receipt { conv, kind, peer: b.clone(), user: a.clone(), up_to }))
        };
        let msg = signed(&Unit::Message(Message {
            to: b.clone(),
            ts: 0,
            seq: 1,
            conv,
            deps: Default::default(),
            from: a.clone(),
            origin: ServerName::parse("alpha.test").unwrap(),
            content: Content::text("x"),
        }));
        let queued = vec![r(ReceiptKind::Read, 3), msg.clone(), r(ReceiptKind::Read, 7), r(ReceiptKind::Delivered, 2), r(ReceiptKind::Read, 5)];
        let (send, sent_as) = coalesce_receipts(queued);
        assert_eq!(send, vec![r(ReceiptKind::Read, 7), msg, r(ReceiptKind::Delivered, 2)]);
        assert_eq!(sent_as, vec![0, 1, 0, 2, 0]);
    }

    #[test]
    fn only_acknowledged_rows_leave_and_refused_ones_become_dead_letters() {
        let dest = ServerName::parse("beta.test").unwrap();
        let (a, b) = (UserId::parse("@a:alpha.test").unwrap(), UserId::parse("@b:beta.test").unwrap());
        let unit = |seq| {
            let m = Message {
                to: b.clone(),
                ts: 0,
                seq,
                conv: ConversationId::one_to_one(&a, &b),
                deps: Default::default(),
                from: a.clone(),
                origin: ServerName::parse("alpha.test").unwrap(),
                content: Content::text("x"),
            };
            records::encode(&signed(&Unit::Message(m)))
        };
        let rows = vec![
            (keys::queue(&dest, 0, 1), unit(1)),
            (keys::queue(&dest, 0, 2), b"not cbor".to_vec()),
            (keys::queue(&dest, 0, 3), unit(3)),
            (keys::queue(&dest, 0, 4), unit(4)),
            (keys::queue(&dest, 0, 5), unit(5)),
        ];
        let txn = Link::build(0, rows);
        assert_eq!(txn.units.len(), 4);
        let mut link = Link::new(Duration::from_millis(100), Duration::from_secs(10), Faults::NONE);
        let s = link.settle(&txn, &[UnitResult::Accepted, UnitResult::Equivocation, UnitResult::Retry, UnitResult::Duplicate]);
        assert_eq!(s.delivered, vec![keys::queue(&dest, 0, 1), keys::queue(&dest, 0, 5)]);
        assert_eq!(s.dead.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), vec![keys::queue(&dest, 0, 2), keys::queue(&dest, 0, 3)]);
        assert!(s.progress.retry);
        assert_eq!(s.progress.removed_through, Some(keys::queue(&dest, 0, 3)), "the lane must read row 4 again");
        let now = Instant::now();
        assert!(link.settled(&s.progress, now, 1, 0.0).is_some(), "a retry backs off");
        assert_eq!(link.read_after(0), Some(&keys::queue(&dest, 0, 3)[..]));
        assert!(link.status().up);
    }
}
