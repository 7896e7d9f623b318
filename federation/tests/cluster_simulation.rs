//! Deterministic simulation of whole federations: three servers, a conversation on every
//! pair, each server creating messages, queueing them durably, sending transactions,
//! admitting what arrives (spec F5–F7, through the same `admission` functions the server
//! uses), asking for and answering gap fills — over a simulated network that loses,
//! duplicates, reorders and partitions, while servers crash and lose everything not
//! durable. No sockets, no clocks: one seed fixes the whole run, and thousands of seeds
//! run in seconds.
//!
//! After the chaos, the network heals and the run goes on until quiet. Then: every
//! message created is stored exactly once on both servers of its conversation, each
//! origin's messages without a gap, and both servers hold one identical canonical order.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use missive_federation::admission::{self, Decision, Hash};
use missive_spec::{Deps, OrderKey, ServerName};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SERVERS: usize = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Unit {
    conv: (usize, usize),
    origin: usize,
    seq: u64,
    key: OrderKey,
    hash: Hash,
}

#[derive(Clone, Debug)]
enum Packet {
    Txn { id: u64, units: Vec<Unit> },
    Acks { id: u64, acked: Vec<((usize, usize), u64)> },
    Backfill { conv: (usize, usize), first: u64, last: u64 },
    Units { units: Vec<Unit> },
}

/// One server: `durable` survives a crash, the rest does not.
#[derive(Default)]
struct Server {
    // Durable.
    made: HashMap<(usize, usize), u64>,
    stored: BTreeMap<(usize, usize), BTreeMap<OrderKey, Unit>>,
    ids: HashMap<((usize, usize), usize, u64), Hash>,
    held: HashMap<((usize, usize), usize, u64), Unit>,
    queue: BTreeMap<usize, Vec<Unit>>,
    // Volatile.
    inflight: HashMap<usize, (u64, u64)>, // destination -> (txn id, sent at step)
}

impl Server {
    fn head(&self, conv: (usize, usize), origin: usize) -> u64 {
        self.stored.get(&conv).map_or(0, |m| m.values().filter(|u| u.origin == origin).map(|u| u.seq).max().unwrap_or(0))
    }

    fn crash(&mut self) {
        self.inflight.clear();
    }

    /// F6.3 admission; returns whether the unit is acknowledged and a backfill to ask for.
    fn admit(&mut self, u: &Unit) -> (bool, Option<(u64, u64)>) {
        let id = (u.conv, u.origin, u.seq);
        let known = self.ids.get(&id).copied().or_else(|| self.held.get(&id).map(|h| h.hash));
        let head = self.head(u.conv, u.origin);
        match admission::admit(head, u.seq, known, u.hash) {
            Decision::Duplicate => (true, (u.seq > head).then(|| (head + 1, u.seq - 1))),
            Decision::Equivocation => panic!("honest origins never equivocate: {u:?}"),
            Decision::Hold { first, last } => {
                self.held.insert(id, u.clone());
                (true, Some((first, last)))
            }
            Decision::Store => {
                self.store(u.clone());
                loop {
                    let head = self.head(u.conv, u.origin);
                    let held: Vec<u64> = self.held.keys().filter(|(c, o, _)| *c == u.conv && *o == u.origin).map(|k| k.2).collect();
                    let Some(next) = admission::releasable(head, held).first().copied() else { break };
                    let h = self.held.remove(&(u.conv, u.origin, next)).expect("held");
                    self.store(h);
                }
                (true, None)
            }
        }
    }

    fn store(&mut self, u: Unit) {
        assert_eq!(u.seq, self.head(u.conv, u.origin) + 1, "stored out of line");
        self.ids.insert((u.conv, u.origin, u.seq), u.hash);
        let prev = self.stored.entry(u.conv).or_default().insert(u.key.clone(), u);
        assert!(prev.is_none(), "stored twice");
    }
}

struct Net {
    /// In flight: (from, to, packet).
    packets: Vec<(usize, usize, Packet)>,
    cut: BTreeSet<(usize, usize)>,
    loss: f64,
    dup: f64,
}

fn names() -> Vec<ServerName> {
    (0..SERVERS).map(|i| ServerName::parse(&format!("s{i}.sim")).unwrap()).collect()
}

/// Runs one seeded schedule; panics with the seed on a violated property.
fn run(seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let names = names();
    let convs: Vec<(usize, usize)> = (0..SERVERS).flat_map(|a| (a + 1..SERVERS).map(move |b| (a, b))).collect();
    let mut servers: Vec<Server> = (0..SERVERS).map(|_| Server::default()).collect();
    let mut net = Net { packets: Vec::new(), cut: BTreeSet::new(), loss: rng.gen_range(0.0..0.3), dup: rng.gen_range(0.0..0.2) };
    let mut created: BTreeMap<(usize, usize), Vec<OrderKey>> = BTreeMap::new();
    let mut next_txn = 0u64;
    let timeout = 30;

    let mut step = 0usize;
    let mut quiet_for = 0;
    loop {
        step += 1;
        let chaos = step < steps;
        if !chaos {
            net.cut.clear();
            net.loss = 0.0;
            net.dup = 0.0;
        }
        let roll: f64 = rng.gen();
        // Create a message (only while the chaos lasts).
        if chaos && roll < 0.15 {
            let conv = convs[rng.gen_range(0..convs.len())];
            let me = if rng.gen_bool(0.5) { conv.0 } else { conv.1 };
            let other = if me == conv.0 { conv.1 } else { conv.0 };
            let s = &mut servers[me];
            let seq = s.made.get(&conv).copied().unwrap_or(0) + 1;
            s.made.insert(conv, seq);
            let mut deps = Deps::new();
            deps.set(names[me].clone(), seq);
            deps.set(names[other].clone(), s.head(conv, other));
            let key = OrderKey { rank: deps.rank(), origin: names[me].clone(), seq };
            let mut hash = [0u8; 32];
            hash[..8].copy_from_slice(&seed.to_be_bytes());
            hash[8] = me as u8;
            hash[9..17].copy_from_slice(&seq.to_be_bytes());
            hash[17] = conv.0 as u8;
            hash[18] = conv.1 as u8;
            let u = Unit { conv, origin: me, seq, key: key.clone(), hash };
            // One atomic write: stored here and queued for the other server.
            s.store(u.clone());
            s.queue.entry(other).or_default().push(u);
            created.entry(conv).or_default().push(key);
        } else if chaos && roll < 0.17 {
            let i = rng.gen_range(0..SERVERS);
            servers[i].crash();
            // Packets to a crashed server may be lost with it.
            net.packets.retain(|(_, to, _)| *to != i || rng.gen_bool(0.5));
        } else if chaos && roll < 0.19 {
            let a = rng.gen_range(0..SERVERS);
            let b = (a + rng.gen_range(1..SERVERS)) % SERVERS;
            if !net.cut.remove(&(a.min(b), a.max(b))) {
                net.cut.insert((a.min(b), a.max(b)));
            }
        }
        // Every server: time out stale transactions, send the next one, sweep held gaps.
        for (i, s) in servers.iter_mut().enumerate() {
            s.inflight.retain(|_, (_, at)| step as u64 - *at < timeout);
            for (dest, q) in &s.queue {
                if q.is_empty() || s.inflight.contains_key(dest) {
                    continue;
                }
                next_txn += 1;
                let units: Vec<Unit> = q.iter().take(5).cloned().collect();
                s.inflight.insert(*dest, (next_txn, step as u64));
                net.packets.push((i, *dest, Packet::Txn { id: next_txn, units }));
            }
            if step % 40 == 0 {
                let mut asks = Vec::new();
                for conv in &convs {
                    for origin in [conv.0, conv.1].into_iter().filter(|o| *o != i) {
                        let held: Vec<u64> = s.held.keys().filter(|(c, o, _)| c == conv && *o == origin).map(|k| k.2).collect();
                        for (first, last) in admission::missing(s.head(*conv, origin), held) {
                            asks.push((origin, Packet::Backfill { conv: *conv, first, last }));
                        }
                    }
                }
                for (to, p) in asks {
                    net.packets.push((i, to, p));
                }
            }
        }
        // The network delivers one packet, chosen at random (reordering).
        if !net.packets.is_empty() {
            let k = rng.gen_range(0..net.packets.len());
            let (from, to, p) = if rng.gen_bool(net.dup) { net.packets[k].clone() } else { net.packets.swap_remove(k) };
            let cut = net.cut.contains(&(from.min(to), from.max(to)));
            if !cut && !rng.gen_bool(net.loss) {
                deliver(&mut servers, &mut net, from, to, p);
            }
        }
        let busy = !net.packets.is_empty() || servers.iter().any(|s| s.queue.values().any(|q| !q.is_empty()) || !s.held.is_empty());
        quiet_for = if busy { 0 } else { quiet_for + 1 };
        if !chaos && quiet_for > 2 * timeout as usize {
            break;
        }
        assert!(step < steps + 200_000, "seed {seed}: no quiet after healing ({} packets, queues {:?})", net.packets.len(),
            servers.iter().map(|s| s.queue.values().map(Vec::len).sum::<usize>()).collect::<Vec<_>>());
    }

    for (conv, mut keys) in created {
        keys.sort();
        for side in [conv.0, conv.1] {
            let got: Vec<OrderKey> = servers[side].stored.get(&conv).map(|m| m.keys().cloned().collect()).unwrap_or_default();
            assert_eq!(got, keys, "seed {seed}: server {side} holds another set or order for conversation {conv:?}");
        }
    }
}

fn deliver(servers: &mut [Server], net: &mut Net, from: usize, to: usize, p: Packet) {
    let s = &mut servers[to];
    match p {
        Packet::Txn { id, units } => {
            let mut acked = Vec::new();
            for u in &units {
                let (ok, ask) = s.admit(u);
                if ok {
                    acked.push((u.conv, u.seq));
                }
                if let Some((first, last)) = ask {
                    net.packets.push((to, from, Packet::Backfill { conv: u.conv, first, last }));
                }
            }
            net.packets.push((to, from, Packet::Acks { id, acked }));
        }
        Packet::Acks { id, acked } => {
            if s.inflight.get(&from).is_some_and(|(t, _)| *t == id) {
                s.inflight.remove(&from);
            }
            if let Some(q) = s.queue.get_mut(&from) {
                q.retain(|u| !acked.contains(&(u.conv, u.seq)));
            }
        }
        Packet::Backfill { conv, first, last } => {
            let units: Vec<Unit> = s
                .stored
                .get(&conv)
                .map(|m| m.values().filter(|u| u.origin == to && u.seq >= first && u.seq <= last).cloned().collect())
                .unwrap_or_default();
            net.packets.push((to, from, Packet::Units { units }));
        }
        Packet::Units { units } => {
            for u in units {
                s.admit(&u);
            }
        }
    }
}

#[test]
fn thousands_of_seeded_schedules_converge_to_one_order_with_nothing_lost_or_doubled() {
    let started = std::time::Instant::now();
    let seeds = 2000;
    for seed in 0..seeds {
        run(seed, 600);
    }
    println!("{seeds} schedules in {:.2} s", started.elapsed().as_secs_f64());
}
