//! The inbox: units from other servers. Each (conversation, origin) stream is stored in
//! `origin_seq` order without gaps: a unit next in line is stored (and whatever was held
//! right behind it released), a unit beyond a gap is held and its gap asked for, a repeat
//! is a duplicate, the same identity with other content is equivocation (F6.3).
//!
//! Held units are bounded per (conversation, origin) and per origin; a unit over either
//! bound gets `retry`, so its origin keeps it queued. Releases run in bounded steps: one
//! filled gap cannot make one group unboundedly large.

use std::collections::HashMap;

use missive_spec::federation::{SignedUnit, Unit, UnitResult};
use missive_spec::{ConversationId, Message, ServerName};

use crate::admission::{self, Decision};
use crate::checks::Checked;
use crate::records::{self, MsgIdRecord};
use crate::store::{keys, Cf, Direction, Store, StoreResult};
use crate::{Core, Error, Identity, Tx};

/// A unit from a peer whose signature and structure were already checked.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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

/// A range of an origin's messages in one conversation that this server is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backfill {
    pub conv: ConversationId,
    pub origin: ServerName,
    pub first: u64,
    pub last: u64,
}

/// How many units are held, per (conversation, origin) and per origin. Bounded by the held
/// limits: a unit over them is refused (`retry`), so the maps never outgrow what is stored.
#[derive(Default)]
pub(crate) struct HeldCounts {
    per_conv: HashMap<(ConversationId, ServerName), u64>,
    per_peer: HashMap<ServerName, u64>,
}

impl HeldCounts {
    pub(crate) fn load(store: &dyn Store) -> StoreResult<HeldCounts> {
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

    pub(crate) fn conversations(&self) -> impl Iterator<Item = (ConversationId, ServerName)> + '_ {
        self.per_conv.keys().cloned()
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

impl Core {
    /// Takes the units of one transaction (or backfill answer) from `peer`, each already
    /// verified and checked (or refused with its result): receipts are max-merged,
    /// messages admitted. Returns one result per unit and the gaps to ask for.
    pub fn receive(&mut self, tx: &mut Tx, units: Vec<Result<Checked, UnitResult>>) -> Result<(Vec<UnitResult>, Vec<Backfill>), Error> {
        let mut results = Vec::with_capacity(units.len());
        let mut gaps = Vec::new();
        for u in units {
            results.push(match u {
                Err(r) => {
                    tracing::warn!(result = ?r, "refused unit");
                    r
                }
                Ok(Checked::Receipt(r)) => match self.receipt(tx, r, None)? {
                    true => UnitResult::Accepted,
                    false => UnitResult::Duplicate,
                },
                Ok(Checked::Devices(c)) => match self.device_list_change(tx, c)? {
                    true => UnitResult::Accepted,
                    false => UnitResult::Duplicate,
                },
                Ok(Checked::Message(m)) => {
                    let o = self.inbound(tx, m)?;
                    gaps.extend(o.backfill);
                    o.result
                }
            });
        }
        Ok((results, gaps))
    }

    /// Admits one checked unit from its origin's server.
    pub fn inbound(&mut self, tx: &mut Tx, u: InboundUnit) -> Result<InboundOutcome, Error> {
        let outcome = |result| InboundOutcome { result, backfill: None };
        let m = &u.msg;
        let mut conv = self.conv(&m.conv, &m.from, &m.to)?;
        // The origin cannot have seen more of our messages than we have sent.
        if m.deps.get(&self.server) > conv.heads.get(&self.server) {
            // Restored from a backup and not yet reclaimed from the origin: it may well
            // have seen messages of ours we lost; once reclaimed they are here (F12.3).
            if self.may_number_for(&m.origin).is_err() {
                return Ok(outcome(UnitResult::Retry));
            }
            tracing::warn!(conv = %m.conv, origin = %m.origin, seq = m.seq, "unit claims messages of ours that do not exist");
            return Ok(outcome(UnitResult::InvalidUnit));
        }
        let id: Identity = (m.conv, m.origin.clone(), m.seq);
        let head = conv.heads.get(&m.origin);
        let mut decision = admission::admit(head, m.seq, self.known(tx, &id)?, u.hash);
        if decision == Decision::Duplicate && m.seq <= head && self.faults.store_twice() {
            decision = Decision::Store;
        }
        if matches!(decision, Decision::Hold { .. }) && self.faults.release_early() {
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
                let (in_conv, in_all) = self.held_counts()?.of(m.conv, &m.origin);
                if in_conv >= tx.limits.per_conversation || in_all >= tx.limits.per_peer {
                    // Refused, not dropped: the origin keeps it queued and sends it again
                    // once the gap is filled (F6.3).
                    tracing::warn!(conv = %m.conv, origin = %m.origin, seq = m.seq, in_conv, in_all, "held-unit limit reached; asking the origin to retry");
                    return Ok(InboundOutcome { result: UnitResult::Retry, backfill });
                }
                self.held_counts()?.add(m.conv, &m.origin, 1);
                tx.batch.put(Cf::Held, keys::held(&m.conv, &m.origin, m.seq), records::encode(&u.env));
                tx.held.insert(id, Some(u.env.clone()));
                tracing::info!(conv = %m.conv, origin = %m.origin, seq = m.seq, first, last, "holding unit behind a gap");
                Ok(InboundOutcome { result: UnitResult::Held, backfill })
            }
            Decision::Store => {
                self.store_message(tx, &mut conv, &u.env, m, u.hash)?;
                self.save_conv(tx, m.conv, conv);
                // Release whatever was held right behind it, within the group's budget.
                self.release_held(tx, m.conv, &m.origin)?;
                Ok(outcome(UnitResult::Accepted))
            }
        }
    }

    /// Releases the held units of pending gaps, as many as the group may still take. A
    /// failure keeps the gap pending and drops only what this step added.
    pub fn release_pending(&mut self, tx: &mut Tx) {
        while tx.release_left > 0 {
            let Some((conv, origin)) = self.pending.pop_front() else { return };
            let mark = tx.mark();
            if let Err(e) = self.release_held(tx, conv, &origin) {
                tracing::error!(%conv, %origin, error = %e, "cannot release held units; trying again later");
                self.abort(tx, mark);
                self.pending.push_back((conv, origin));
                return;
            }
        }
    }

    /// Stores the held units of (conv, origin) that now follow in line, up to the group's
    /// release budget; queues the rest for a later group.
    fn release_held(&mut self, tx: &mut Tx, conv_id: ConversationId, origin: &ServerName) -> StoreResult<()> {
        let Some(mut conv) = self.stored_conv(&conv_id)? else { return Ok(()) };
        loop {
            let next = (conv_id, origin.clone(), conv.heads.get(origin) + 1);
            if tx.release_left == 0 {
                if self.held_at(tx, &next)? && !self.pending.contains(&(conv_id, origin.clone())) {
                    self.pending.push_back((conv_id, origin.clone()));
                }
                break;
            }
            let Some(env) = self.take_held(tx, &next)? else { break };
            let Ok(Unit::Message(held)) = missive_spec::codec::decode::<Unit>(&env.unit) else {
                tracing::error!(conv = %conv_id, "held unit does not decode; dropping it");
                break;
            };
            let hash = env.hash();
            self.store_message(tx, &mut conv, &env, &held, hash)?;
            tx.release_left -= 1;
        }
        self.save_conv(tx, conv_id, conv);
        Ok(())
    }

    fn held_at(&self, tx: &Tx, id: &Identity) -> StoreResult<bool> {
        if let Some(h) = tx.held.get(id) {
            return Ok(h.is_some());
        }
        Ok(self.store.get(Cf::Held, &keys::held(&id.0, &id.1, id.2))?.is_some())
    }

    /// The content hash already stored or held under an identity, if any.
    fn known(&self, tx: &Tx, id: &Identity) -> StoreResult<Option<[u8; 32]>> {
        if let Some(h) = tx.stored.get(id) {
            return Ok(Some(*h));
        }
        if let Some(held) = tx.held.get(id) {
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

    fn take_held(&mut self, tx: &mut Tx, id: &Identity) -> StoreResult<Option<SignedUnit>> {
        let env = match tx.held.get(id) {
            Some(e) => e.clone(),
            None => match self.store.get(Cf::Held, &keys::held(&id.0, &id.1, id.2))? {
                Some(v) => Some(records::decode::<SignedUnit>("held", &v)?),
                None => None,
            },
        };
        if env.is_some() {
            tx.batch.delete(Cf::Held, keys::held(&id.0, &id.1, id.2));
            tx.held.insert(id.clone(), None);
            self.held_counts()?.add(id.0, &id.1, -1);
        }
        Ok(env)
    }
}
