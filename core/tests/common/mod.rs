//! What the core's integration tests share: a signer that does not sign (verification is
//! the shell's) and a group of commands committed to a `MemStore`.
#![allow(dead_code)]

use missive_core::log::unsigned;
use missive_core::store::memory::MemStore;
use missive_core::store::Store;
use missive_core::{Core, HeldLimits, Signer, Tx};
use missive_spec::federation::{SignedUnit, Unit};

pub struct Unsigned;

impl Signer for Unsigned {
    fn sign(&self, unit: &Unit) -> SignedUnit {
        unsigned(unit)
    }
}

/// Runs `f` as one group at `now_ms` and commits its batch.
pub fn group_at<T>(core: &mut Core, store: &MemStore, now_ms: u64, f: impl FnOnce(&mut Core, &mut Tx) -> T) -> T {
    let mut tx = core.begin(now_ms, HeldLimits::default());
    let out = f(core, &mut tx);
    store.write(std::mem::take(&mut tx.batch)).unwrap();
    core.committed(true);
    out
}

/// [`group_at`] at 1 000 ms.
pub fn group<T>(core: &mut Core, store: &MemStore, f: impl FnOnce(&mut Core, &mut Tx) -> T) -> T {
    group_at(core, store, 1_000, f)
}
