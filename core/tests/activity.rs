//! The activity index behind `conversations` (§6.10): kept in the batch of every stored
//! message, never going back in time, and built once for conversations stored before it
//! existed.

use std::sync::Arc;

use missive_core::log::unsigned;
use missive_core::records::{self, ConvRecord};
use missive_core::store::memory::MemStore;
use missive_core::store::{keys, Batch, Cf, Direction, Store};
use missive_core::{Core, Faults, HeldLimits, Signer, Tx};
use missive_spec::federation::{SignedUnit, Unit};
use missive_spec::{ClientMsgId, Content, ConversationId, DeviceId, ServerName, UserId};

struct Unsigned;

impl Signer for Unsigned {
    fn sign(&self, unit: &Unit) -> SignedUnit {
        unsigned(unit)
    }
}

fn open(store: &Arc<MemStore>) -> Core {
    Core::open(store.clone(), ServerName::parse("a.test").unwrap(), Arc::new(Unsigned), Faults::default()).unwrap()
}

fn group<T>(core: &mut Core, store: &MemStore, now_ms: u64, f: impl FnOnce(&mut Core, &mut Tx) -> T) -> (T, usize) {
    let mut tx = core.begin(now_ms, HeldLimits::default());
    let out = f(core, &mut tx);
    let ops = tx.batch.len();
    store.write(std::mem::take(&mut tx.batch)).unwrap();
    core.committed(true);
    (out, ops)
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn send(core: &mut Core, store: &MemStore, now_ms: u64, from: &str, to: &str) {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&now_ms.to_be_bytes());
    group(core, store, now_ms, |c, tx| {
        c.send(tx, user(from), DeviceId::parse("D1").unwrap(), user(to), ClientMsgId(id), Content::text("hi")).unwrap()
    });
}

/// A user's index, oldest activity first: (time, conversation).
fn entries(store: &MemStore, localpart: &str) -> Vec<(u64, ConversationId)> {
    let rows = store.scan(Cf::Active, &keys::active_of(localpart), None, Direction::Forward, 100).unwrap();
    rows.iter().map(|(k, _)| keys::parse_active(k).map(|(_, ms, c)| (ms, c)).unwrap()).collect()
}

fn conv(a: &str, b: &str) -> ConversationId {
    ConversationId::one_to_one(&user(a), &user(b))
}

const ALICE: &str = "@alice:a.test";
const BOB: &str = "@bob:a.test";
const CAROL: &str = "@carol:a.test";

#[test]
fn a_message_moves_its_conversation_to_the_front_and_time_never_goes_back() {
    let store = Arc::new(MemStore::default());
    let mut core = open(&store);
    send(&mut core, &store, 100, ALICE, BOB);
    send(&mut core, &store, 200, CAROL, ALICE);
    let (ab, ac) = (conv(ALICE, BOB), conv(ALICE, CAROL));
    assert_eq!(entries(&store, "alice"), vec![(100, ab), (200, ac)]);
    assert_eq!(entries(&store, "bob"), vec![(100, ab)]);
    send(&mut core, &store, 300, BOB, ALICE);
    assert_eq!(entries(&store, "alice"), vec![(200, ac), (300, ab)]);
    // A clock that went back leaves the conversation where it was.
    send(&mut core, &store, 150, CAROL, ALICE);
    assert_eq!(entries(&store, "alice"), vec![(200, ac), (300, ab)]);
    // A remote member has no entry here.
    send(&mut core, &store, 400, ALICE, "@dan:b.test");
    assert_eq!(entries(&store, "alice").last(), Some(&(400, conv(ALICE, "@dan:b.test"))));
    assert!(entries(&store, "dan").is_empty());
}

#[test]
fn conversations_stored_before_the_index_are_indexed_once() {
    let store = Arc::new(MemStore::default());
    let mut core = open(&store);
    send(&mut core, &store, 100, ALICE, BOB);
    send(&mut core, &store, 200, BOB, ALICE);
    send(&mut core, &store, 900, CAROL, ALICE);
    // As a store written before the index existed: no entries, records without a time.
    let mut old = Batch::default();
    for (k, v) in store.scan(Cf::Convs, &[], None, Direction::Forward, 100).unwrap() {
        let mut rec: ConvRecord = records::decode("convs", &v).unwrap();
        rec.active_ms = 0;
        old.put(Cf::Convs, k, records::encode(&rec));
    }
    for (k, _) in store.scan(Cf::Active, &[], None, Direction::Forward, 100).unwrap() {
        old.delete(Cf::Active, k);
    }
    store.write(old).unwrap();
    assert!(entries(&store, "alice").is_empty());

    let mut core = open(&store);
    // One conversation per step; at "now" 500 carol's message, stamped 900, is clamped.
    let mut after = None;
    let mut steps = 0;
    loop {
        let (next, _) = group(&mut core, &store, 500, |c, tx| c.index_activity(tx, after, 1).unwrap());
        steps += 1;
        match next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert!(steps >= 2, "indexing went in one step");
    let (ab, ac) = (conv(ALICE, BOB), conv(ALICE, CAROL));
    let mut want = vec![(200, ab), (500, ac)];
    want.sort();
    assert_eq!(entries(&store, "alice"), want);
    assert_eq!(entries(&store, "bob"), vec![(200, ab)]);
    assert_eq!(entries(&store, "carol"), vec![(500, ac)]);
    // A second run finds nothing to do.
    let (next, ops) = group(&mut open(&store), &store, 600, |c, tx| c.index_activity(tx, None, 1000).unwrap());
    assert_eq!((next, ops), (None, 0));
    // And later messages move the indexed entries on.
    send(&mut core, &store, 700, ALICE, BOB);
    assert_eq!(entries(&store, "alice"), vec![(500, ac), (700, ab)]);
}
