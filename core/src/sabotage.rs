//! Deliberate faults in the protocol logic, to prove that the simulations and the
//! conformance suite catch them. They exist only with the `sabotage` cargo feature (off
//! by default, never in a release build); without it every accessor is a constant `false`
//! and the fault paths compile away.

/// Which faults are switched on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Settling a transaction also removes the first queued unit the peer did not
    /// acknowledge.
    pub settle_extra: bool,
    /// A repeated inbound unit is stored again instead of answered `duplicate`.
    pub store_twice: bool,
    /// A unit beyond a gap is stored at once instead of held until its predecessor.
    pub release_early: bool,
    /// A retried send is numbered and stored again instead of answered from its
    /// idempotency record.
    pub forget_sends: bool,
}

impl Faults {
    pub const NONE: Faults = Faults { settle_extra: false, store_twice: false, release_early: false, forget_sends: false };

    /// The faults named in a comma-separated list (`settle_extra,store_twice,...`).
    pub fn parse(list: &str) -> Faults {
        let on = |name: &str| list.split(',').any(|n| n.trim() == name);
        Faults {
            settle_extra: on("settle_extra"),
            store_twice: on("store_twice"),
            release_early: on("release_early"),
            forget_sends: on("forget_sends"),
        }
    }

    pub fn any(&self) -> bool {
        *self != Faults::NONE
    }

    #[inline(always)]
    pub fn settle_extra(&self) -> bool {
        cfg!(feature = "sabotage") && self.settle_extra
    }

    #[inline(always)]
    pub fn store_twice(&self) -> bool {
        cfg!(feature = "sabotage") && self.store_twice
    }

    #[inline(always)]
    pub fn release_early(&self) -> bool {
        cfg!(feature = "sabotage") && self.release_early
    }

    #[inline(always)]
    pub fn forget_sends(&self) -> bool {
        cfg!(feature = "sabotage") && self.forget_sends
    }
}
