//! The key directory in the core (e2ee.md E3, E5): claims in one group hand out distinct
//! one-time keys, then the fallback key; a revoked device's keys go, and a device revoked
//! before its upload gets none; device-list changes are events, and units for the peers.

use std::sync::Arc;

use missive_core::keydir::{self, Upload};
use missive_core::store::memory::MemStore;
use missive_core::store::{keys, Cf, Direction, Store};
use missive_core::{Core, Faults, NewDevice};
use missive_spec::e2ee::{DeviceKeys, OneTimeKey};
use missive_spec::{DeviceId, ErrorCode, EventKind, ServerName, UserId};

mod common;

use common::{group, Unsigned};

/// Keys whose signatures the core does not check (the shell does).
fn device_keys(user: &UserId, device: &DeviceId) -> DeviceKeys {
    DeviceKeys { sig: vec![0; 64], user: user.clone(), device: device.clone(), ed25519: vec![1; 32], curve25519: vec![2; 32] }
}

fn key(id: u64) -> OneTimeKey {
    OneTimeKey { id, key: vec![id as u8; 32], sig: vec![0; 64] }
}

fn events(store: &MemStore, localpart: &str) -> Vec<EventKind> {
    store
        .scan(Cf::Events, &keys::events_of(localpart), None, Direction::Forward, 1000)
        .unwrap()
        .iter()
        .map(|(_, v)| missive_core::records::decode::<missive_spec::Event>("events", v).unwrap().event)
        .collect()
}

#[test]
fn claims_in_one_group_take_each_key_once_then_the_fallback_and_keys_leave_with_their_device() {
    let store = Arc::new(MemStore::default());
    let mut core = Core::open(store.clone(), ServerName::parse("a.test").unwrap(), Arc::new(Unsigned), Faults::default()).unwrap();
    let alice = UserId::parse("@alice:a.test").unwrap();
    let d1 = DeviceId::parse("D1").unwrap();
    let new_device = |id: &DeviceId| NewDevice { id: id.clone(), name: None, token_hash: [id.as_str().as_bytes()[1]; 32] };
    group(&mut core, &store, |c, tx| c.create_user(tx, alice.clone(), "h".into(), Some(new_device(&d1))).unwrap());
    let up = Upload { keys: Some(device_keys(&alice, &d1)), fallback: Some(key(9)), one_time: vec![key(1), key(2)] };
    let count = group(&mut core, &store, |c, tx| c.upload_keys(tx, &alice, &d1, up).unwrap());
    assert_eq!((count.one_time, count.fallback), (2, true));
    assert!(matches!(events(&store, "alice").last(), Some(EventKind::Devices(c)) if c.version == 1), "no devices event for the new keys");

    // Three claims in one group: keys 1 and 2, each once, then the fallback key.
    let got = group(&mut core, &store, |c, tx| (0..3).map(|_| c.claim_keys(tx, &alice, &[d1.clone()]).unwrap()).collect::<Vec<_>>());
    let ids: Vec<(u64, bool)> = got.iter().flatten().map(|k| (k.key.id, k.fallback)).collect();
    assert_eq!(ids, [(1, false), (2, false), (9, true)]);
    assert_eq!(keydir::one_time_count(&*store, &alice, &d1).unwrap(), 0);
    // A key at or below the highest id uploaded never comes back.
    let again = group(&mut core, &store, |c, tx| c.upload_keys(tx, &alice, &d1, Upload { one_time: vec![key(1), key(10)], ..Default::default() }).unwrap());
    assert_eq!(again.one_time, 1, "key 1 was handed out and must not be stored again");

    // Revoked: its keys go, and the change is an event.
    group(&mut core, &store, |c, tx| c.remove_device(tx, &alice, d1.clone()).unwrap());
    assert!(keydir::query(&*store, &alice).unwrap().is_empty());
    assert_eq!(keydir::one_time_count(&*store, &alice, &d1).unwrap(), 0);
    assert!(matches!(events(&store, "alice").last(), Some(EventKind::Devices(c)) if c.version == 2));

    // A device revoked in the group before its first upload gets no keys.
    let d2 = DeviceId::parse("D2").unwrap();
    group(&mut core, &store, |c, tx| c.add_device(tx, &alice, new_device(&d2)).unwrap());
    let refused = group(&mut core, &store, |c, tx| {
        c.remove_device(tx, &alice, d2.clone()).unwrap();
        c.upload_keys(tx, &alice, &d2, Upload { keys: Some(device_keys(&alice, &d2)), ..Default::default() })
    });
    assert!(matches!(refused, Err(missive_core::Error::Refused { code: ErrorCode::Unauthorized, .. })), "{refused:?}");
    assert!(keydir::query(&*store, &alice).unwrap().is_empty());
}
