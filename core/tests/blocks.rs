//! Blocking (§6.12) in the core: a group sees its own block changes, a withheld message
//! makes no event for the blocker and leaves the indexes as any message does.

use std::sync::Arc;

use missive_core::store::memory::MemStore;
use missive_core::store::{keys, Cf, Direction, Store};
use missive_core::{AccountChange, Core, Faults, Tx};
use missive_spec::{ClientMsgId, Content, DeviceId, ServerName, UserId};

mod common;

use common::{group_at as group, Unsigned};

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn send(core: &mut Core, tx: &mut Tx, n: u8, from: &str, to: &str) {
    core.send(tx, user(from), DeviceId::parse("D1").unwrap(), user(to), ClientMsgId([n; 16]), Content::text("hi")).unwrap();
}

fn count(store: &MemStore, cf: Cf, prefix: &[u8]) -> usize {
    store.scan(cf, prefix, None, Direction::Forward, 1000).unwrap().len()
}

#[test]
fn a_group_sees_its_own_blocks_and_withheld_messages_keep_the_indexes_whole() {
    let store = Arc::new(MemStore::default());
    let mut core = Core::open(store.clone(), ServerName::parse("a.test").unwrap(), Arc::new(Unsigned), Faults::default()).unwrap();
    let (alice, bob) = (user("@alice:a.test"), user("@bob:a.test"));
    group(&mut core, &store, 1, |c, tx| {
        c.create_user(tx, alice.clone(), "h".into(), None).unwrap();
        c.create_user(tx, bob.clone(), "h".into(), None).unwrap();
    });
    // Block and unblock in one group: not blocked.
    group(&mut core, &store, 2, |c, tx| {
        c.change_account(tx, &alice, AccountChange::Block(bob.clone(), true)).unwrap();
        c.change_account(tx, &alice, AccountChange::Block(bob.clone(), false)).unwrap();
    });
    assert_eq!(count(&store, Cf::Blocks, &keys::blocks_of("alice")), 0);
    // A block and bob's message in one group: the message is withheld.
    group(&mut core, &store, 3, |c, tx| {
        c.change_account(tx, &alice, AccountChange::Block(bob.clone(), true)).unwrap();
        send(c, tx, 1, "@bob:a.test", "@alice:a.test");
    });
    assert_eq!(count(&store, Cf::Withheld, &[]), 1);
    assert_eq!(count(&store, Cf::Events, &keys::events_of("alice")), 0, "the blocker got an event");
    assert_eq!(count(&store, Cf::Events, &keys::events_of("bob")), 1, "the sender sees its own message");
    // Unblocked, a later message arrives, and each user has one activity entry.
    group(&mut core, &store, 4, |c, tx| c.change_account(tx, &alice, AccountChange::Block(bob.clone(), false)).unwrap());
    group(&mut core, &store, 5, |c, tx| send(c, tx, 2, "@bob:a.test", "@alice:a.test"));
    group(&mut core, &store, 6, |c, tx| send(c, tx, 3, "@alice:a.test", "@bob:a.test"));
    assert_eq!(count(&store, Cf::Events, &keys::events_of("alice")), 2);
    assert_eq!(count(&store, Cf::Active, &keys::active_of("alice")), 1, "the conversation is listed once");
    assert_eq!(count(&store, Cf::UserConvs, &keys::user_conv_prefix("alice")), 1, "the users share the conversation");
}
