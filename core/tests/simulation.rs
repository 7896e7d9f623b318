//! Deterministic simulation of whole federations on the shipped protocol core.
//!
//! Three servers, each its real [`Core`] over a [`MemStore`], its real [`Link`]s and
//! [`GapFill`], driven the way `missived`'s shell drives them: users send messages and
//! receipts across every pair of servers; lanes are read and sent as transactions; what
//! arrives is checked and received; answers settle the queues; gaps are asked for and
//! served. The network loses, duplicates, delays (so reorders) and partitions; servers
//! crash and come back with only what their store holds. Time is simulated: one seed fixes
//! the whole run.
//!
//! After the chaos the network heals and the run goes on until quiet. Then, on every
//! server: each message sent is stored exactly once at both ends, every origin's
//! sequence is gap-free, both ends hold one identical order, each user's event stream
//! carries each of its messages exactly once, receipts agree at both ends, and every
//! queue, held unit and dead letter is gone.
//!
//! `MISSIVE_SIM_SEEDS` sets how many seeds run (default 10 000); `MISSIVE_SIM_SEED`
//! replays one. A failing seed prints the command that replays it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use missive_core::checks::{self, Checked};
use missive_core::gapfill::{self, GapFill, Step};
use missive_core::link::{self, Link, Txn, LANES};
use missive_core::records::{self, ConvRecord, MsgIdRecord};
use missive_core::store::memory::MemStore;
use missive_core::store::{keys, Cf, Direction, Store};
use missive_core::{Backfill, Core, Faults, HeldLimits, NewDevice, Signer, Tx};
use missive_spec::federation::{FedResponse, SignedUnit, Unit, UnitResult};
use missive_spec::{
    codec, ClientMsgId, Content, ConversationId, DeviceId, Event, EventKind, Receipt, ReceiptKind, ServerName, UserId, Watermark,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SERVERS: usize = 3;
const USERS: usize = 2;
/// Steps of chaos, then at most this many more to become quiet.
const CHAOS_STEPS: usize = 250;
const QUIET_STEPS: usize = 20_000;
/// A request not answered within this long is given up by its sender.
const TIMEOUT_MS: u64 = 400;
/// Small held limits, so that `retry` and its settlement are exercised.
const LIMITS: HeldLimits = HeldLimits { per_conversation: 3, per_peer: 5, release_batch: 2 };

/// Signs by naming the origin: signatures are checked by the shell, before the core.
struct NameSigner(ServerName);

impl Signer for NameSigner {
    fn sign(&self, unit: &Unit) -> SignedUnit {
        SignedUnit { key: self.0.to_string(), sig: Vec::new(), unit: codec::encode(unit) }
    }
}

#[derive(Clone, Debug)]
enum Body {
    Txn { lane: u8, id: Vec<u8>, units: Vec<SignedUnit> },
    TxnResult { lane: u8, id: Vec<u8>, results: Vec<UnitResult> },
    Backfill { conv: ConversationId, first: u64, last: u64 },
    Units { conv: ConversationId, res: FedResponse },
}

#[derive(Clone, Debug)]
struct Packet {
    from: usize,
    to: usize,
    at: u64,
    body: Body,
}

/// One server. Only `store` survives a crash.
struct Node {
    name: ServerName,
    store: Arc<MemStore>,
    core: Core,
    links: Vec<Link>,
    gaps: GapFill,
    /// Per (destination, lane): the transaction in flight and when it was sent.
    inflight: BTreeMap<(usize, u8), (Txn, u64)>,
    /// Gap requests in flight: (conversation, origin) → when asked.
    asking: BTreeMap<(ConversationId, usize), u64>,
    /// Gaps with a fill running.
    filling: BTreeSet<(ConversationId, usize)>,
}

struct Sim {
    rng: StdRng,
    faults: Faults,
    t0: Instant,
    now_ms: u64,
    nodes: Vec<Node>,
    net: Vec<Packet>,
    /// Pairs of servers that cannot reach each other.
    cut: BTreeSet<(usize, usize)>,
    loss: f64,
    dup: f64,
    /// Every message a server acknowledged to its sender: (conv, origin, seq).
    sent: Vec<(ConversationId, usize, u64)>,
    names: Vec<ServerName>,
}

fn name(i: usize) -> ServerName {
    ServerName::parse(&format!("s{i}.test")).unwrap()
}

fn user(server: usize, u: usize) -> UserId {
    UserId::parse(&format!("@u{u}:s{server}.test")).unwrap()
}

fn device() -> DeviceId {
    DeviceId::parse("DEV1").unwrap()
}

impl Node {
    fn new(i: usize, store: Arc<MemStore>, faults: Faults) -> Node {
        let name = name(i);
        let signer = Arc::new(NameSigner(name.clone()));
        let core = Core::open(store.clone(), name.clone(), signer, faults).expect("open core");
        let links = (0..SERVERS).map(|_| Link::new(Duration::from_millis(100), Duration::from_secs(2), faults)).collect();
        Node {
            name,
            store,
            core,
            links,
            gaps: GapFill::new(Duration::from_millis(100), Duration::from_secs(2)),
            inflight: BTreeMap::new(),
            asking: BTreeMap::new(),
            filling: BTreeSet::new(),
        }
    }

    /// Runs one group the way the writer does: the commands, pending releases, one write.
    fn group<T>(&mut self, now_ms: u64, f: impl FnOnce(&mut Core, &mut Tx) -> T) -> T {
        let mut tx = self.core.begin(now_ms, LIMITS);
        let out = f(&mut self.core, &mut tx);
        self.core.release_pending(&mut tx);
        let ok = self.store.write(std::mem::take(&mut tx.batch)).is_ok();
        self.core.committed(ok);
        out
    }

    fn head(&self, conv: &ConversationId, origin: &ServerName) -> u64 {
        gapfill::head_of(&*self.store, conv, origin).unwrap()
    }
}

impl Sim {
    fn new(seed: u64, faults: Faults) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let loss = rng.gen_range(0.0..0.3);
        let dup = rng.gen_range(0.0..0.3);
        let mut nodes: Vec<Node> = (0..SERVERS).map(|i| Node::new(i, Arc::new(MemStore::default()), faults)).collect();
        for (i, n) in nodes.iter_mut().enumerate() {
            for u in 0..USERS {
                let d = NewDevice { id: device(), name: None, token_hash: [u as u8; 32] };
                n.group(0, |c, tx| c.create_user(tx, user(i, u), "hash".into(), Some(d))).unwrap();
            }
        }
        Sim {
            rng,
            faults,
            t0: Instant::now(),
            now_ms: 1_000,
            nodes,
            net: Vec::new(),
            cut: BTreeSet::new(),
            loss,
            dup,
            sent: Vec::new(),
            names: (0..SERVERS).map(name).collect(),
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.now_ms)
    }

    fn jitter(&mut self) -> f64 {
        self.rng.gen()
    }

    fn index(&self, n: &ServerName) -> usize {
        self.names.iter().position(|x| x == n).expect("known server")
    }

    fn post(&mut self, from: usize, to: usize, body: Body) {
        let delay = self.rng.gen_range(1..120);
        self.net.push(Packet { from, to, at: self.now_ms + delay, body });
    }

    fn send_message(&mut self) {
        let (a, b) = (self.rng.gen_range(0..SERVERS), self.rng.gen_range(0..SERVERS));
        if a == b {
            return;
        }
        let (from, to) = (user(a, self.rng.gen_range(0..USERS)), user(b, self.rng.gen_range(0..USERS)));
        let mut id = [0u8; 16];
        self.rng.fill(&mut id);
        let now = self.now_ms;
        let body = format!("m{}", self.sent.len());
        let sent = self.nodes[a].group(now, |c, tx| c.send(tx, from, device(), to, ClientMsgId(id), Content::text(&body)));
        if let Ok(m) = sent {
            self.sent.push((m.conv, a, m.seq));
        }
    }

    /// A local user reads or receives up to the newest message of one of its conversations.
    fn send_receipt(&mut self) {
        let a = self.rng.gen_range(0..SERVERS);
        let me = user(a, self.rng.gen_range(0..USERS));
        let convs: Vec<ConvRecord> = self.nodes[a]
            .store
            .scan(Cf::Convs, &[], None, Direction::Forward, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(_, v)| records::decode::<ConvRecord>("convs", &v).unwrap())
            .filter(|c| c.members.contains(&me))
            .collect();
        if convs.is_empty() {
            return;
        }
        let c = &convs[self.rng.gen_range(0..convs.len())];
        let Some(peer) = c.members.iter().find(|m| **m != me).cloned() else { return };
        let conv = ConversationId::one_to_one(&me, &peer);
        let newest = self.nodes[a].store.scan(Cf::Messages, &keys::messages_of(&conv), None, Direction::Reverse, 1).unwrap();
        let Some((key, _)) = newest.first() else { return };
        let Some((_, up_to)) = keys::parse_message(key) else { return };
        let kind = if self.rng.gen_bool(0.5) { ReceiptKind::Read } else { ReceiptKind::Delivered };
        let r = Receipt { conv, kind, peer, user: me, up_to: Watermark(up_to) };
        let now = self.now_ms;
        self.nodes[a].group(now, |c, tx| c.receipt(tx, r, Some(device()))).unwrap();
    }

    /// A lane's sender: one transaction at a time, when the link's backoff allows.
    fn sender(&mut self, a: usize, b: usize, lane: u8) {
        let now = self.now();
        let n = &mut self.nodes[a];
        if a == b || n.inflight.contains_key(&(b, lane)) || n.links[b].next_attempt(now).is_some() {
            return;
        }
        let rows = link::next_rows(&*n.store, &self.names[b], lane, n.links[b].read_after(lane)).unwrap();
        if rows.is_empty() {
            return;
        }
        let txn = Link::build(lane, rows);
        let body = Body::Txn { lane, id: txn.id.clone(), units: txn.units.clone() };
        n.inflight.insert((b, lane), (txn, self.now_ms));
        self.post(a, b, body);
    }

    /// What the inbound shell does with units from `peer`: open, check, receive; start a
    /// fill for every gap.
    fn receive(&mut self, at: usize, peer: usize, units: Vec<SignedUnit>) -> Vec<UnitResult> {
        let now = self.now_ms;
        let peer_name = self.names[peer].clone();
        let n = &mut self.nodes[at];
        let checked = units
            .into_iter()
            .map(|env| {
                if env.key != peer_name.as_str() {
                    return Err(UnitResult::UnknownKey);
                }
                let unit: Unit = codec::decode(&env.unit).map_err(|_| UnitResult::BadUnit)?;
                checks::unit(&*n.store, &n.name, &peer_name, env, unit)
            })
            .collect::<Vec<Result<Checked, UnitResult>>>();
        let (results, gaps) = n.group(now, |c, tx| c.receive(tx, checked)).unwrap();
        for g in gaps {
            self.want_gap(at, g);
        }
        results
    }

    fn want_gap(&mut self, at: usize, g: Backfill) {
        let origin = self.index(&g.origin);
        let n = &mut self.nodes[at];
        n.gaps.want(&g);
        n.filling.insert((g.conv, origin));
    }

    /// Every running fill takes its next step.
    fn fills(&mut self, at: usize) {
        let now = self.now();
        let gaps: Vec<_> = self.nodes[at].filling.iter().cloned().collect();
        for (conv, origin) in gaps {
            if self.nodes[at].asking.contains_key(&(conv, origin)) {
                continue;
            }
            let head = self.nodes[at].head(&conv, &self.names[origin]);
            let step = self.nodes[at].gaps.next(conv, &self.names[origin], head, now);
            match step {
                Step::Ask { first, last } => {
                    self.nodes[at].asking.insert((conv, origin), self.now_ms);
                    self.post(at, origin, Body::Backfill { conv, first, last });
                }
                Step::Wait(_) => {}
                Step::Done => {
                    self.nodes[at].filling.remove(&(conv, origin));
                }
            }
        }
    }

    fn deliver(&mut self, p: Packet) {
        let (from, to) = (p.from, p.to);
        match p.body {
            Body::Txn { lane, id, mut units } => {
                // The units of one transaction may be taken in any order (another
                // implementation may, and it makes gaps for the inbox to hold and fill).
                let mut order: Vec<usize> = (0..units.len()).collect();
                if self.rng.gen_bool(0.3) {
                    for i in (1..order.len()).rev() {
                        order.swap(i, self.rng.gen_range(0..=i));
                    }
                    let mut shuffled: Vec<SignedUnit> = order.iter().map(|i| units[*i].clone()).collect();
                    std::mem::swap(&mut units, &mut shuffled);
                }
                let taken = self.receive(to, from, units);
                let mut results = vec![UnitResult::Retry; taken.len()];
                for (r, i) in taken.into_iter().zip(order) {
                    results[i] = r;
                }
                self.post(to, from, Body::TxnResult { lane, id, results });
            }
            Body::TxnResult { lane, id, results } => {
                let (now, now_ms, jitter) = (self.now(), self.now_ms, self.jitter());
                let n = &mut self.nodes[to];
                let Some((txn, _)) = n.inflight.get(&(from, lane)) else { return };
                if txn.id != id {
                    return; // the answer to an earlier attempt
                }
                let (txn, _) = n.inflight.remove(&(from, lane)).unwrap();
                let s = n.links[from].settle(&txn, &results);
                n.group(now_ms, |c, tx| c.settle(tx, &s)).unwrap();
                n.links[from].settled(&s.progress, now, now_ms, jitter);
            }
            Body::Backfill { conv, first, last } => {
                let n = &self.nodes[to];
                let res = gapfill::serve(&*n.store, &n.name, &self.names[from], conv, first, last);
                self.post(to, from, Body::Units { conv, res });
            }
            Body::Units { conv, res } => {
                let (now, jitter) = (self.now(), self.jitter());
                self.nodes[to].asking.remove(&(conv, from));
                let taken = match res {
                    FedResponse::Units { units } if !units.is_empty() => self.receive(to, from, units).iter().all(|r| r.delivered()),
                    _ => false,
                };
                if !taken {
                    self.nodes[to].gaps.failed(conv, &self.names[from], now, jitter);
                }
            }
        }
    }

    /// Requests whose answer did not come in time are given up, as the shell's timeouts do.
    fn timeouts(&mut self) {
        let (now, now_ms) = (self.now(), self.now_ms);
        for a in 0..SERVERS {
            let late: Vec<(usize, u8)> = self.nodes[a].inflight.iter().filter(|(_, (_, at))| now_ms >= at + TIMEOUT_MS).map(|(k, _)| *k).collect();
            for (b, lane) in late {
                let jitter = self.jitter();
                let n = &mut self.nodes[a];
                n.inflight.remove(&(b, lane));
                n.links[b].remote_failure("timed out".into(), now, jitter);
            }
            let late: Vec<(ConversationId, usize)> = self.nodes[a].asking.iter().filter(|(_, at)| now_ms >= *at + TIMEOUT_MS).map(|(k, _)| *k).collect();
            for (conv, origin) in late {
                let jitter = self.jitter();
                let n = &mut self.nodes[a];
                n.asking.remove(&(conv, origin));
                n.gaps.failed(conv, &self.names[origin], now, jitter);
            }
        }
    }

    /// Crash and restart: only the store survives; the sweep of held units starts fills.
    fn crash(&mut self, a: usize) {
        let store = self.nodes[a].store.clone();
        self.nodes[a] = Node::new(a, store, self.faults);
        for g in gapfill::held_gaps(&*self.nodes[a].store).unwrap() {
            self.want_gap(a, g);
        }
    }

    /// Writer groups with nothing but pending releases, as the writer runs them when idle.
    fn idle_releases(&mut self) {
        let now = self.now_ms;
        for n in &mut self.nodes {
            while n.core.releases_pending() {
                n.group(now, |_, _| ());
            }
        }
    }

    fn step(&mut self, chaos: bool) {
        self.now_ms += self.rng.gen_range(1..40);
        if chaos {
            match self.rng.gen_range(0..100) {
                0..=24 => self.send_message(),
                25..=34 => self.send_receipt(),
                35..=36 => {
                    let a = self.rng.gen_range(0..SERVERS);
                    self.crash(a);
                }
                37..=39 => {
                    let (a, b) = (self.rng.gen_range(0..SERVERS), self.rng.gen_range(0..SERVERS));
                    if !self.cut.remove(&(a.min(b), a.max(b))) {
                        self.cut.insert((a.min(b), a.max(b)));
                    }
                }
                _ => {}
            }
        }
        for a in 0..SERVERS {
            for b in 0..SERVERS {
                for lane in 0..LANES {
                    self.sender(a, b, lane);
                }
            }
            self.fills(a);
        }
        // Deliver what is due, in a shuffled order; lose, duplicate or cut some of it.
        let now = self.now_ms;
        let (mut due, rest): (Vec<Packet>, Vec<Packet>) = std::mem::take(&mut self.net).into_iter().partition(|p| p.at <= now);
        self.net = rest;
        while !due.is_empty() {
            let p = due.swap_remove(self.rng.gen_range(0..due.len()));
            let cut = self.cut.contains(&(p.from.min(p.to), p.from.max(p.to)));
            if cut || (chaos && self.rng.gen_bool(self.loss)) {
                continue;
            }
            if chaos && self.rng.gen_bool(self.dup) {
                let mut again = p.clone();
                again.at = now + self.rng.gen_range(1..200);
                self.net.push(again);
            }
            self.deliver(p);
        }
        self.idle_releases();
        self.timeouts();
    }

    fn quiet(&self) -> bool {
        self.net.is_empty()
            && self.nodes.iter().all(|n| {
                n.inflight.is_empty()
                    && n.asking.is_empty()
                    && n.store.scan(Cf::OutQueue, &[], None, Direction::Forward, 1).unwrap().is_empty()
                    && n.store.scan(Cf::Held, &[], None, Direction::Forward, 1).unwrap().is_empty()
            })
    }

    fn run(&mut self) -> Result<usize, String> {
        for _ in 0..CHAOS_STEPS {
            self.step(true);
        }
        self.cut.clear();
        // Healed: restart fills for gaps still open (the shell's periodic sweep).
        for a in 0..SERVERS {
            for g in gapfill::held_gaps(&*self.nodes[a].store).unwrap() {
                self.want_gap(a, g);
            }
        }
        for i in 0..QUIET_STEPS {
            if self.quiet() {
                self.check()?;
                return Ok(i);
            }
            self.step(false);
            if i % 2_000 == 1_999 {
                for a in 0..SERVERS {
                    for g in gapfill::held_gaps(&*self.nodes[a].store).unwrap() {
                        self.want_gap(a, g);
                    }
                }
            }
        }
        self.check()?;
        Err("never became quiet after healing".into())
    }

    /// The promise: nothing lost, nothing twice, one order, gap-free origins, queues drained.
    fn check(&self) -> Result<(), String> {
        for (i, n) in self.nodes.iter().enumerate() {
            for cf in [Cf::OutQueue, Cf::Held, Cf::DeadLetters] {
                let left = n.store.scan(cf, &[], None, Direction::Forward, usize::MAX).unwrap();
                if !left.is_empty() {
                    return Err(format!("{}: {} rows left in {}", n.name, left.len(), cf.name()));
                }
            }
            // Gap-free origin sequences, per conversation.
            let mut seqs: BTreeMap<(ConversationId, ServerName), Vec<u64>> = BTreeMap::new();
            for (k, _) in n.store.scan(Cf::MsgIds, &[], None, Direction::Forward, usize::MAX).unwrap() {
                let (conv, origin, seq) = keys::parse_msg_id(&k).unwrap();
                seqs.entry((conv, origin)).or_default().push(seq);
            }
            for ((conv, origin), s) in &seqs {
                if s.iter().copied().ne(1..=s.len() as u64) {
                    return Err(format!("{}: {origin}'s sequence in {conv} has gaps: {s:?}", n.name));
                }
            }
            // The activity index (§6.10): one entry per local member of each conversation
            // with messages, at the time its record names.
            let mut active: HashMap<(String, ConversationId), Vec<u64>> = HashMap::new();
            for (k, _) in n.store.scan(Cf::Active, &[], None, Direction::Forward, usize::MAX).unwrap() {
                let (local, ms, conv) = keys::parse_active(&k).unwrap();
                active.entry((local, conv)).or_default().push(ms);
            }
            let mut indexed = 0;
            for (k, v) in n.store.scan(Cf::Convs, &[], None, Direction::Forward, usize::MAX).unwrap() {
                let conv = ConversationId(<[u8; 32]>::try_from(k.as_slice()).unwrap());
                let rec: ConvRecord = records::decode("convs", &v).unwrap();
                for m in rec.members.iter().filter(|m| m.is_on(&n.name)) {
                    let got = active.get(&(m.localpart().to_owned(), conv)).cloned().unwrap_or_default();
                    let want = if rec.active_ms == 0 { vec![] } else { vec![rec.active_ms] };
                    if got != want {
                        return Err(format!("{}: {m}'s activity entries for {conv} are {got:?}, the record says {want:?}", n.name));
                    }
                    indexed += want.len();
                }
            }
            if indexed != active.values().map(Vec::len).sum::<usize>() {
                return Err(format!("{}: activity entries for conversations that have no record", n.name));
            }
            // Each user's stream carries each message of theirs exactly once.
            for u in 0..USERS {
                let me = user(i, u);
                let mut seen = HashSet::new();
                for (_, v) in n.store.scan(Cf::Events, &keys::events_of(me.localpart()), None, Direction::Forward, usize::MAX).unwrap() {
                    let ev: Event = records::decode("events", &v).unwrap();
                    if let EventKind::Message(m) = ev.event {
                        if !seen.insert((m.conv, m.origin.clone(), m.seq)) {
                            return Err(format!("{}: {me} got {} #{} of {} twice", n.name, m.origin, m.seq, m.conv));
                        }
                    }
                }
                for (conv, origin, seq) in &self.sent {
                    let stored = n.store.get(Cf::MsgIds, &keys::msg_id(conv, &self.names[*origin], *seq)).unwrap();
                    let Some(stored) = stored else { continue };
                    let id: MsgIdRecord = records::decode("msg_ids", &stored).unwrap();
                    let mut full = keys::messages_of(conv);
                    full.extend_from_slice(&id.key);
                    let m = records::stored_message(&n.store.get(Cf::Messages, &full).unwrap().unwrap()).unwrap();
                    if (m.from == me || m.to == me) && !seen.contains(&(*conv, self.names[*origin].clone(), *seq)) {
                        return Err(format!("{}: {me} never got {} #{seq} of {conv}", n.name, self.names[*origin]));
                    }
                }
            }
        }
        // Every message acknowledged to its sender is at both ends, and both ends of every
        // conversation hold the same messages in the same order.
        let mut convs: HashMap<ConversationId, (usize, usize)> = HashMap::new();
        for (conv, origin, seq) in &self.sent {
            let n = &self.nodes[*origin];
            let id = n.store.get(Cf::MsgIds, &keys::msg_id(conv, &n.name, *seq)).unwrap().ok_or("sent message missing at its origin")?;
            let id: MsgIdRecord = records::decode("msg_ids", &id).unwrap();
            let mut full = keys::messages_of(conv);
            full.extend_from_slice(&id.key);
            let m = records::stored_message(&n.store.get(Cf::Messages, &full).unwrap().unwrap()).unwrap();
            let other = self.index(&m.to.server_name());
            convs.insert(*conv, (*origin, other));
            if self.nodes[other].store.get(Cf::MsgIds, &keys::msg_id(conv, &n.name, *seq)).unwrap().is_none() {
                return Err(format!("{}'s message #{seq} in {conv} never reached {}", n.name, self.names[other]));
            }
        }
        for (conv, (a, b)) in convs {
            let order = |i: usize| -> Vec<Vec<u8>> {
                self.nodes[i].store.scan(Cf::Messages, &keys::messages_of(&conv), None, Direction::Forward, usize::MAX).unwrap().into_iter().map(|(k, _)| k).collect()
            };
            if order(a) != order(b) {
                return Err(format!("{} and {} hold {conv} in different orders", self.names[a], self.names[b]));
            }
            // Receipts agree at both ends.
            let members = [user(a, 0), user(a, 1), user(b, 0), user(b, 1)];
            for u in members.iter().filter(|u| ConversationId::one_to_one(u, &members[0]) == conv || members.iter().any(|p| ConversationId::one_to_one(u, p) == conv)) {
                for kind in [ReceiptKind::Read, ReceiptKind::Delivered] {
                    let k = keys::receipt(&conv, u, kind);
                    let (x, y) = (self.nodes[a].store.get(Cf::Receipts, &k).unwrap(), self.nodes[b].store.get(Cf::Receipts, &k).unwrap());
                    if x != y {
                        return Err(format!("{u}'s {kind:?} receipt in {conv} differs between {} and {}", self.names[a], self.names[b]));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs one seed; `Err` names what broke.
fn run(seed: u64, faults: Faults) -> Result<(), String> {
    let mut sim = Sim::new(seed, faults);
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    match out {
        Ok(r) => r.map(|_| ()),
        Err(p) => Err(format!("panicked: {}", p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default())),
    }
}

fn replay(seed: u64) -> String {
    format!("MISSIVE_SIM_SEED={seed} cargo test -p missive-core --test simulation -- --nocapture")
}

/// Runs `seeds` on every core of the machine; the first failures found, by seed.
fn run_many(seeds: std::ops::Range<u64>, faults: Faults, stop_at_first: bool) -> Vec<(u64, String)> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = std::sync::atomic::AtomicU64::new(seeds.start);
    let failed = std::sync::Mutex::new(Vec::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= seeds.end || stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                if let Err(e) = run(seed, faults) {
                    failed.lock().unwrap().push((seed, e));
                    if stop_at_first {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let mut f = failed.into_inner().unwrap();
    f.sort();
    f
}

fn seeds() -> std::ops::Range<u64> {
    if let Some(one) = std::env::var("MISSIVE_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return one..one + 1;
    }
    let n = std::env::var("MISSIVE_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    0..n
}

#[test]
fn every_schedule_keeps_the_promise() {
    // Quiet the core's logs: thousands of schedules refuse and hold units on purpose.
    let started = Instant::now();
    let range = seeds();
    let n = range.end - range.start;
    let failed = run_many(range, Faults::NONE, false);
    for (seed, e) in failed.iter().take(5) {
        eprintln!("seed {seed}: {e}\n  replay: {}", replay(*seed));
    }
    assert!(failed.is_empty(), "{} of {n} schedules broke the promise; first: seed {}", failed.len(), failed[0].0);
    println!("{n} schedules passed in {:.1} s", started.elapsed().as_secs_f64());
}

/// Each deliberate fault in the core is caught within the seeds CI runs, and the same
/// seeds pass without it (the test above).
#[test]
fn the_simulation_catches_each_fault_in_the_core() {
    let budget = seeds();
    for (name, faults) in [
        ("settle_extra", Faults { settle_extra: true, ..Faults::NONE }),
        ("store_twice", Faults { store_twice: true, ..Faults::NONE }),
        ("release_early", Faults { release_early: true, ..Faults::NONE }),
    ] {
        let started = Instant::now();
        let caught = run_many(budget.clone(), faults, true);
        let Some((seed, why)) = caught.first() else { panic!("{name}: no schedule of {budget:?} noticed the fault") };
        println!("{name}: caught by seed {seed} in {:.1} s: {why}", started.elapsed().as_secs_f64());
    }
}
