//! Deterministic simulation of the receiving side (spec F§6, §4.6), on the same pure
//! functions the server uses: whatever the interleaving, duplication, loss and reordering
//! of the same units, the receiver ends with every unit exactly once, in one canonical
//! order, and never stores an origin's unit before all of its predecessors.

use std::collections::{BTreeMap, HashMap};

use missive_federation::admission::{self, Decision, Hash};
use missive_spec::{Deps, OrderKey, ServerName};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct SimUnit {
    origin: usize,
    seq: u64,
    key: OrderKey,
    hash: Hash,
}

fn names() -> [ServerName; 2] {
    [ServerName::parse("alpha.test").unwrap(), ServerName::parse("beta.test").unwrap()]
}

/// Two origins writing in turn; each message's vector holds what its origin had seen of the
/// other (a prefix, never shrinking), as the sequencer computes it.
fn history(steps: &[(bool, u8)]) -> Vec<SimUnit> {
    let n = names();
    let mut made = [0u64; 2];
    let mut seen = [0u64; 2]; // seen[i]: how much of the other origin i has stored
    let mut out = Vec::new();
    for (who, visible) in steps {
        let i = usize::from(*who);
        let other = 1 - i;
        // The origin may have received more of the other's messages by now.
        seen[i] = seen[i].max(made[other] * u64::from(*visible) / 255);
        made[i] += 1;
        let mut deps = Deps::new();
        deps.set(n[i].clone(), made[i]);
        deps.set(n[other].clone(), seen[i]);
        let key = OrderKey { rank: deps.rank(), origin: n[i].clone(), seq: made[i] };
        let mut hash = [0u8; 32];
        hash[0] = i as u8;
        hash[1..9].copy_from_slice(&made[i].to_be_bytes());
        out.push(SimUnit { origin: i, seq: made[i], key, hash });
    }
    out
}

#[derive(Default)]
struct Receiver {
    head: [u64; 2],
    stored: BTreeMap<OrderKey, Hash>,
    ids: HashMap<(usize, u64), Hash>,
    held: HashMap<(usize, u64), SimUnit>,
    asked: Vec<(usize, u64, u64)>,
}

impl Receiver {
    /// Returns true when the unit is acknowledged (stored, held or duplicate).
    fn receive(&mut self, u: &SimUnit) -> bool {
        let id = (u.origin, u.seq);
        let known = self.ids.get(&id).copied().or_else(|| self.held.get(&id).map(|h| h.hash));
        match admission::admit(self.head[u.origin], u.seq, known, u.hash) {
            Decision::Duplicate => true,
            Decision::Equivocation => panic!("honest units never equivocate"),
            Decision::Hold { first, last } => {
                self.held.insert(id, u.clone());
                self.asked.push((u.origin, first, last));
                true
            }
            Decision::Store => {
                self.store(u);
                let held = self.held.keys().filter(|(o, _)| *o == u.origin).map(|(_, s)| *s).collect::<Vec<_>>();
                for s in admission::releasable(self.head[u.origin], held) {
                    let h = self.held.remove(&(u.origin, s)).unwrap();
                    self.store(&h);
                }
                true
            }
        }
    }

    fn store(&mut self, u: &SimUnit) {
        assert_eq!(u.seq, self.head[u.origin] + 1, "stored out of line");
        self.head[u.origin] = u.seq;
        assert!(self.stored.insert(u.key.clone(), u.hash).is_none(), "stored twice");
        self.ids.insert((u.origin, u.seq), u.hash);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_delivery_schedule_yields_the_same_stored_order(
        steps in prop::collection::vec((any::<bool>(), any::<u8>()), 1..40),
        schedule in prop::collection::vec((any::<prop::sample::Index>(), 0u8..10), 0..120),
    ) {
        let units = history(&steps);
        let mut want: Vec<OrderKey> = units.iter().map(|u| u.key.clone()).collect();
        want.sort();
        let mut rx = Receiver::default();
        let mut acked = vec![false; units.len()];
        // Network: arbitrary order, duplicates, and losses (about 1 in 10 dropped).
        for (pick, fate) in &schedule {
            let i = pick.index(units.len());
            if *fate == 0 {
                continue;
            }
            if rx.receive(&units[i]) {
                acked[i] = true;
            }
        }
        // Gap fill: the origin answers each request from its log (these may be lost too,
        // and are asked again while the gap stays open).
        while let Some((o, first, last)) = rx.asked.pop() {
            for u in units.iter().filter(|u| u.origin == o && u.seq >= first && u.seq <= last) {
                rx.receive(u);
            }
        }
        // Senders retry whatever was never acknowledged, in queue order.
        for (i, u) in units.iter().enumerate() {
            if !acked[i] {
                rx.receive(u);
            }
        }
        prop_assert!(rx.held.is_empty(), "units left held: {:?}", rx.held.keys().collect::<Vec<_>>());
        prop_assert_eq!(rx.stored.keys().cloned().collect::<Vec<_>>(), want);
    }

    #[test]
    fn canonical_order_respects_causality(steps in prop::collection::vec((any::<bool>(), any::<u8>()), 1..60)) {
        let units = history(&steps);
        // A message sorts after every message its origin had stored when creating it.
        for a in &units {
            for b in &units {
                // a's vector entry for b's origin is its rank minus its own seq.
                let seen = if a.origin == b.origin { b.seq < a.seq } else { b.seq <= a.key.rank - a.seq };
                if seen {
                    prop_assert!(b.key < a.key, "{:?} seen by {:?} sorts after it", b.key, a.key);
                }
            }
        }
    }
}
