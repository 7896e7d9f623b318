//! Gaps: asking an origin for the units missing below a held one, and answering such
//! requests from this server's log (F7).
//!
//! One fill runs per (conversation, origin) at a time. It asks for the range above the
//! current head, at most [`MAX_BACKFILL`] at once, goes on while answers move the head,
//! and after a failure (or an answer that moved nothing) waits as the backoff says, up to
//! [`ATTEMPTS`] failures; the sweep of
//! held units (at start-up and every minute) starts it again for any gap still open.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use missive_spec::federation::{FedErrorCode, FedResponse, SignedUnit, MAX_BACKFILL};
use missive_spec::{ConversationId, ServerName};

use crate::backoff::Backoff;
use crate::records::{self, ConvRecord, MsgIdRecord};
use crate::store::{keys, Cf, Direction, Store, StoreResult};
use crate::Backfill;

/// Failed attempts at one gap before it is left to the next sweep.
pub const ATTEMPTS: u32 = 8;
/// Fills running at once toward one origin, and in all: a peer that names ever more
/// conversations cannot make this server run ever more requests (F8). A gap over either
/// bound is taken up by a later sweep, or when its origin sends the unit again.
pub const MAX_FILLS_PER_ORIGIN: usize = 64;
pub const MAX_FILLS: usize = 1_024;

type Gap = (ConversationId, ServerName);

/// The gaps being filled.
pub struct GapFill {
    retry_base: Duration,
    retry_cap: Duration,
    gaps: HashMap<Gap, Filling>,
    /// Fills running per origin (entries only while one runs).
    per_origin: HashMap<ServerName, usize>,
}

struct Filling {
    last: u64,
    backoff: Backoff,
    /// The head when the last request went out: an answer that did not move it counts as
    /// a failure, so an origin that answers with nothing new cannot keep a fill spinning.
    asked_at: Option<u64>,
}

/// The next step of one fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask the origin for `first..=last`.
    Ask { first: u64, last: u64 },
    /// Wait until then, then look again.
    Wait(Instant),
    /// Filled, or given up until the next sweep: the fill is over.
    Done,
}

impl GapFill {
    pub fn new(retry_base: Duration, retry_cap: Duration) -> GapFill {
        GapFill { retry_base, retry_cap, gaps: HashMap::new(), per_origin: HashMap::new() }
    }

    /// Wants `b` filled. True when no fill of its (conversation, origin) was running and
    /// there is room for one: the caller starts it. A running fill widens to cover `b`.
    pub fn want(&mut self, b: &Backfill) -> bool {
        let key = (b.conv, b.origin.clone());
        if let Some(f) = self.gaps.get_mut(&key) {
            f.last = f.last.max(b.last);
            return false;
        }
        let from_origin = self.per_origin.get(&b.origin).copied().unwrap_or(0);
        if self.gaps.len() >= MAX_FILLS || from_origin >= MAX_FILLS_PER_ORIGIN {
            return false;
        }
        *self.per_origin.entry(b.origin.clone()).or_insert(0) += 1;
        self.gaps.insert(key, Filling { last: b.last, backoff: Backoff::new(self.retry_base, self.retry_cap), asked_at: None });
        true
    }

    /// What the fill of `gap` does next, given the head stored now.
    pub fn next(&mut self, conv: ConversationId, origin: &ServerName, head: u64, now: Instant) -> Step {
        let key = (conv, origin.clone());
        let Some(f) = self.gaps.get_mut(&key) else { return Step::Done };
        if head >= f.last {
            self.end(&key);
            return Step::Done;
        }
        match f.asked_at.take() {
            Some(h) if head > h => f.backoff.reset(),
            Some(_) if f.backoff.failures() + 1 >= ATTEMPTS => {
                self.end(&key);
                return Step::Done;
            }
            Some(_) => {
                f.backoff.failure(now, 0.5);
            }
            None => {}
        }
        if let Some(at) = f.backoff.next_attempt().filter(|at| *at > now) {
            return Step::Wait(at);
        }
        f.asked_at = Some(head);
        Step::Ask { first: head + 1, last: f.last.min(head + MAX_BACKFILL) }
    }

    /// The request failed; the fill waits, or ends after [`ATTEMPTS`] failures.
    pub fn failed(&mut self, conv: ConversationId, origin: &ServerName, now: Instant, jitter: f64) {
        let key = (conv, origin.clone());
        let Some(f) = self.gaps.get_mut(&key) else { return };
        f.asked_at = None;
        if f.backoff.failures() + 1 >= ATTEMPTS {
            self.end(&key);
            return;
        }
        f.backoff.failure(now, jitter);
    }

    fn end(&mut self, key: &Gap) {
        if self.gaps.remove(key).is_none() {
            return;
        }
        if let Some(n) = self.per_origin.get_mut(&key.1) {
            *n -= 1;
            if *n == 0 {
                self.per_origin.remove(&key.1);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.gaps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gaps.is_empty()
    }
}

/// The highest seq stored without a gap for `origin` in `conv`.
pub fn head_of(store: &dyn Store, conv: &ConversationId, origin: &ServerName) -> StoreResult<u64> {
    match store.get(Cf::Convs, &keys::conv(conv))? {
        Some(v) => Ok(records::decode::<ConvRecord>("convs", &v)?.heads.get(origin)),
        None => Ok(0),
    }
}

/// The lowest held seq of every (conversation, origin) with held units: each waits on the
/// gap below it (held units survive restarts; the requests that would fill them do not).
pub fn held_gaps(store: &dyn Store) -> StoreResult<Vec<Backfill>> {
    let mut out = Vec::new();
    let mut from: Option<Vec<u8>> = None;
    loop {
        let rows = store.scan(Cf::Held, &[], from.as_deref(), Direction::Forward, 1)?;
        let Some((k, _)) = rows.into_iter().next() else { return Ok(out) };
        let Some((conv, origin, seq)) = keys::parse_msg_id(&k) else { return Ok(out) };
        // The lowest held seq of this (conversation, origin) comes first; skip the rest.
        from = Some(keys::held(&conv, &origin, u64::MAX));
        out.push(Backfill { conv, origin, first: 1, last: seq - 1 });
    }
}

/// Answers `peer`'s request for this server's (`me`) messages `first..=last` in `conv`:
/// only to a server hosting a member, at most [`MAX_BACKFILL`], stopping at the first one
/// this server does not have.
pub fn serve(store: &dyn Store, me: &ServerName, peer: &ServerName, conv: ConversationId, first: u64, last: u64) -> FedResponse {
    serve_units(store, me, peer, conv, first, last)
}

/// The units of `origin` in `conv`, `first..=last`, for `peer`, on the terms of [`serve`]
/// (a backfill serves the asked server's units, a reclaim the asker's: federation.md F12.2).
pub fn serve_units(store: &dyn Store, origin: &ServerName, peer: &ServerName, conv: ConversationId, first: u64, last: u64) -> FedResponse {
    let error = |code, message: &str| FedResponse::Error { code, message: message.to_owned() };
    if first == 0 || last < first || last - first >= MAX_BACKFILL {
        return error(FedErrorCode::TooMany, &format!("ask for 1 to {MAX_BACKFILL} messages from seq 1 on"));
    }
    let rec = match store.get(Cf::Convs, &keys::conv(&conv)) {
        Ok(Some(v)) => match records::decode::<ConvRecord>("convs", &v) {
            Ok(r) => r,
            Err(_) => return error(FedErrorCode::Internal, "conversation record unreadable"),
        },
        Ok(None) => return error(FedErrorCode::Forbidden, "no such conversation here"),
        Err(_) => return error(FedErrorCode::Internal, "storage fault"),
    };
    if !rec.members.iter().any(|u| u.is_on(peer)) {
        return error(FedErrorCode::Forbidden, "you host no member of that conversation");
    }
    let mut units = Vec::new();
    for seq in first..=last {
        let found = store.get(Cf::MsgIds, &keys::msg_id(&conv, origin, seq)).ok().flatten().and_then(|v| {
            let id: MsgIdRecord = records::decode("msg_ids", &v).ok()?;
            let mut k = keys::messages_of(&conv);
            k.extend_from_slice(&id.key);
            let env = store.get(Cf::Messages, &k).ok().flatten()?;
            records::decode::<SignedUnit>("messages", &env).ok()
        });
        match found {
            Some(u) => units.push(u),
            None => break,
        }
    }
    FedResponse::Units { units }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fill_asks_above_the_head_backs_off_and_ends() {
        let conv = ConversationId([7; 32]);
        let origin = ServerName::parse("beta.test").unwrap();
        let t0 = Instant::now();
        let mut g = GapFill::new(Duration::from_millis(100), Duration::from_secs(1));
        assert!(g.want(&Backfill { conv, origin: origin.clone(), first: 1, last: 5 }));
        assert!(!g.want(&Backfill { conv, origin: origin.clone(), first: 1, last: 9 }), "one fill per gap");
        assert_eq!(g.next(conv, &origin, 2, t0), Step::Ask { first: 3, last: 9 });
        g.failed(conv, &origin, t0, 0.0);
        assert_eq!(g.next(conv, &origin, 2, t0), Step::Wait(t0 + Duration::from_millis(50)));
        assert_eq!(g.next(conv, &origin, 2, t0 + Duration::from_millis(50)), Step::Ask { first: 3, last: 9 });
        for _ in 1..ATTEMPTS {
            g.failed(conv, &origin, t0, 0.0);
        }
        assert_eq!(g.next(conv, &origin, 2, t0 + Duration::from_secs(60)), Step::Done, "given up until the next sweep");
        assert!(g.want(&Backfill { conv, origin: origin.clone(), first: 1, last: 9 }));
        assert_eq!(g.next(conv, &origin, 9, t0), Step::Done, "filled");
        assert!(g.is_empty());
        // An origin whose answers never move the head cannot keep a fill going.
        assert!(g.want(&Backfill { conv, origin: origin.clone(), first: 1, last: 9 }));
        let mut t = t0;
        let mut asks = 0;
        loop {
            match g.next(conv, &origin, 2, t) {
                Step::Ask { .. } => asks += 1,
                Step::Wait(at) => t = at,
                Step::Done => break,
            }
            assert!(asks <= ATTEMPTS, "a fill without progress never ends");
        }
        assert_eq!(asks, ATTEMPTS);
        assert!(g.is_empty());
    }

    #[test]
    fn fills_are_bounded_per_origin_and_in_all() {
        let t0 = Instant::now();
        let mut g = GapFill::new(Duration::from_millis(100), Duration::from_secs(1));
        let gap = |origin: &ServerName, i: usize| {
            let mut conv = [0u8; 32];
            conv[..8].copy_from_slice(&(i as u64).to_be_bytes());
            Backfill { conv: ConversationId(conv), origin: origin.clone(), first: 1, last: 5 }
        };
        let flood = ServerName::parse("flood.test").unwrap();
        let started = (0..10 * MAX_FILLS_PER_ORIGIN).filter(|i| g.want(&gap(&flood, *i))).count();
        assert_eq!(started, MAX_FILLS_PER_ORIGIN, "one origin holds more fills than its share");
        let honest = ServerName::parse("honest.test").unwrap();
        assert!(g.want(&gap(&honest, 0)), "another origin still gets a fill");
        // A fill that ends makes room for its origin again.
        let first = gap(&flood, 0);
        assert_eq!(g.next(first.conv, &flood, 5, t0), Step::Done);
        assert!(g.want(&gap(&flood, 10 * MAX_FILLS_PER_ORIGIN)));
        // In all: many origins together stop at the total.
        let total = (0..2 * MAX_FILLS)
            .filter(|i| g.want(&gap(&ServerName::parse(&format!("o{}.test", i / MAX_FILLS_PER_ORIGIN)).unwrap(), *i)))
            .count();
        assert_eq!(g.len(), MAX_FILLS);
        assert!(total < 2 * MAX_FILLS);
    }
}
