//! A server restored from a backup (federation.md F12), on the core alone: it refuses to
//! number for a peer it has not asked, takes back exactly its own units above its head,
//! numbers after them once reclaimed, and its event streams go on above the backup's.

use std::sync::Arc;

use missive_core::log::unsigned;
use missive_core::restore::{self, EVENT_GAP};
use missive_core::store::memory::MemStore;
use missive_core::store::{keys, Batch, Cf, Direction, Store};
use missive_core::{Core, Faults};
use missive_spec::federation::{FedResponse, SignedUnit, Unit};
use missive_spec::{ClientMsgId, Content, DeviceId, ErrorCode, Message, ServerName, UserId};

mod common;

use common::{group, Unsigned};

fn name(s: &str) -> ServerName {
    ServerName::parse(s).unwrap()
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn open(store: &Arc<MemStore>, server: &str) -> Core {
    Core::open(store.clone(), name(server), Arc::new(Unsigned), Faults::default()).unwrap()
}

fn send(core: &mut Core, store: &MemStore, n: u8, text: &str) -> Result<Message, missive_core::Error> {
    group(core, store, |c, tx| {
        c.send(tx, user("@alice:a.test"), DeviceId::parse("D1").unwrap(), user("@bob:b.test"), ClientMsgId([n; 16]), Content::text(text))
    })
}

/// Every entry of every column family: the backup.
fn copy(store: &MemStore) -> Arc<MemStore> {
    let out = Arc::new(MemStore::default());
    let mut batch = Batch::default();
    for cf in Cf::ALL {
        for (k, v) in store.scan(cf, &[], None, Direction::Forward, usize::MAX).unwrap() {
            batch.put(cf, k, v);
        }
    }
    out.write(batch).unwrap();
    out
}

fn deliver(b: &mut Core, b_store: &MemStore, m: &Message) {
    let env = unsigned(&Unit::Message(m.clone()));
    let checked = missive_core::checks::unit(b_store, &name("b.test"), &name("a.test"), env, Unit::Message(m.clone()));
    let (results, _) = group(b, b_store, |c, tx| c.receive(tx, vec![checked]).unwrap());
    assert!(results[0].delivered(), "{results:?}");
}

#[test]
fn a_restored_core_takes_back_its_units_before_numbering_again() {
    let (a_store, b_store) = (Arc::new(MemStore::default()), Arc::new(MemStore::default()));
    let (mut a, mut b) = (open(&a_store, "a.test"), open(&b_store, "b.test"));
    group(&mut a, &a_store, |c, tx| c.create_user(tx, user("@alice:a.test"), "hash".into(), None).unwrap());
    group(&mut b, &b_store, |c, tx| c.create_user(tx, user("@bob:b.test"), "hash".into(), None).unwrap());
    let first = send(&mut a, &a_store, 1, "one").unwrap();
    let backup = copy(&a_store);
    let later: Vec<Message> = (2..=3).map(|n| send(&mut a, &a_store, n, "later").unwrap()).collect();
    for m in std::iter::once(&first).chain(&later) {
        deliver(&mut b, &b_store, m);
    }

    // The backup comes back: marked restored, its streams continue above the old ones.
    let floor = restore::mark_restored(&*backup, 5_000).unwrap().event_floor;
    assert!(floor > EVENT_GAP);
    let mut restored = open(&backup, "a.test");
    match send(&mut restored, &backup, 9, "too early") {
        Err(missive_core::Error::Refused { code: ErrorCode::RemoteUnavailable, .. }) => {}
        other => panic!("numbered before reclaiming: {other:?}"),
    }

    // b reports what it holds; a asks for exactly the units above its head.
    let FedResponse::HighWater { next: None, convs } = restore::high_water(&*b_store, &name("b.test"), &name("a.test"), None) else {
        panic!("high_water answer")
    };
    assert_eq!((convs.len(), convs[0].yours, convs[0].mine), (1, 3, 0));
    let plan = restore::plan(&*backup, &name("a.test"), &name("b.test"), &convs[0]).unwrap();
    assert_eq!((plan.reclaim, plan.fill), (Some((2, 3)), None));
    let FedResponse::Units { units } = restore::serve_reclaim(&*b_store, &name("a.test"), first.conv, 2, 3) else { panic!("units") };
    let units: Vec<(SignedUnit, Message)> = units
        .into_iter()
        .map(|u| match missive_spec::codec::decode::<Unit>(&u.unit).unwrap() {
            Unit::Message(m) => (u, m),
            r => panic!("not a message: {r:?}"),
        })
        .collect();
    assert_eq!(units.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(), later);
    assert_eq!(group(&mut restored, &backup, |c, tx| c.reclaim(tx, units.clone()).unwrap()), 2);
    // Again: nothing new. A unit of another origin is refused.
    assert_eq!(group(&mut restored, &backup, |c, tx| c.reclaim(tx, units.clone()).unwrap()), 0);
    let mut foreign = units[0].1.clone();
    foreign.origin = name("b.test");
    assert!(group(&mut restored, &backup, |c, tx| c.reclaim(tx, vec![(unsigned(&Unit::Message(foreign.clone())), foreign)])).is_err());
    assert_eq!(restore::plan(&*backup, &name("a.test"), &name("b.test"), &convs[0]).unwrap().reclaim, None);

    // Reclaimed: numbered after what b holds, and remembered across a restart.
    group(&mut restored, &backup, |c, tx| c.reclaimed(tx, &name("b.test")));
    let mut reopened = open(&backup, "a.test");
    let next = send(&mut reopened, &backup, 9, "after").unwrap();
    assert_eq!(next.seq, 4);
    let events = backup.scan(Cf::Events, &keys::events_of("alice"), None, Direction::Forward, 100).unwrap();
    let positions: Vec<u64> = events.iter().map(|(k, _)| keys::parse_event(k).unwrap().1).collect();
    assert_eq!(positions.first(), Some(&1), "the backup's own event");
    assert!(positions[1..].iter().all(|p| *p > floor), "{positions:?} not above {floor}");
}
