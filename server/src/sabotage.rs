//! Deliberate faults, to prove that the tests catch them.
//!
//! Compiled in only with the `sabotage` cargo feature, which is off by default and never
//! part of a release build; the test build turns it on so that a test can start a server
//! with one fault switched on through `MISSIVED_SABOTAGE=NAME[,NAME]`. Without the feature
//! [`active`] is a constant `false` and every fault path compiles away.

/// One deliberate fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Inbound federation units are decoded without checking their signature.
    SkipSignatureCheck,
    /// A repeated inbound unit is stored again instead of answered `duplicate` (core).
    StoreTwice,
    /// Settling a transaction removes one queued unit more than the peer took (core).
    SettleExtra,
    /// A unit beyond a gap is stored at once instead of held for its predecessor (core).
    ReleaseEarly,
    /// History pages list their two newest messages the wrong way round.
    ReorderPage,
    /// Writes skip the write-ahead log, so an acknowledged write dies with the process.
    AckBeforeSync,
    /// `keys_query` answers carry fresh device keys instead of the devices' own, as a
    /// server that wants to read its users' messages would (e2ee.md E6).
    SubstituteDeviceKeys,
    /// A retried send is numbered and stored again instead of answered from its
    /// idempotency record (core): a client's retry on another node of a cluster, or on
    /// the same server, makes a duplicate.
    ForgetSends,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::SkipSignatureCheck,
        Fault::StoreTwice,
        Fault::SettleExtra,
        Fault::ReleaseEarly,
        Fault::ReorderPage,
        Fault::AckBeforeSync,
        Fault::SubstituteDeviceKeys,
        Fault::ForgetSends,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::SkipSignatureCheck => "skip_signature_check",
            Fault::StoreTwice => "store_twice",
            Fault::SettleExtra => "settle_extra",
            Fault::ReleaseEarly => "release_early",
            Fault::ReorderPage => "reorder_page",
            Fault::AckBeforeSync => "ack_before_sync",
            Fault::SubstituteDeviceKeys => "substitute_device_keys",
            Fault::ForgetSends => "forget_sends",
        }
    }
}

/// The environment variable that switches faults on.
pub const ENV: &str = "MISSIVED_SABOTAGE";

#[cfg(feature = "sabotage")]
fn switched_on() -> &'static [Fault] {
    static ON: std::sync::OnceLock<Vec<Fault>> = std::sync::OnceLock::new();
    ON.get_or_init(|| {
        let v = std::env::var(ENV).unwrap_or_default();
        Fault::ALL.into_iter().filter(|f| v.split(',').any(|n| n.trim() == f.name())).collect()
    })
}

/// Whether `fault` is switched on in this process.
#[cfg(feature = "sabotage")]
pub fn active(fault: Fault) -> bool {
    switched_on().contains(&fault)
}

/// Whether `fault` is switched on in this process: never, in this build.
#[cfg(not(feature = "sabotage"))]
#[inline(always)]
pub fn active(_fault: Fault) -> bool {
    false
}

/// The faults of the protocol core that are switched on (see `missive_core::sabotage`).
pub fn core_faults() -> missive_core::Faults {
    missive_core::Faults {
        settle_extra: active(Fault::SettleExtra),
        store_twice: active(Fault::StoreTwice),
        release_early: active(Fault::ReleaseEarly),
        forget_sends: active(Fault::ForgetSends),
    }
}

/// Logs, loudly, what is switched on; or that the variable is ignored by this build.
pub fn announce() {
    let Ok(asked) = std::env::var(ENV) else { return };
    #[cfg(feature = "sabotage")]
    {
        let on: Vec<&str> = switched_on().iter().map(|f| f.name()).collect();
        tracing::error!(faults = ?on, asked = %asked, "SABOTAGE: deliberate faults are switched on; this server loses and corrupts data");
    }
    #[cfg(not(feature = "sabotage"))]
    tracing::warn!(asked = %asked, "{ENV} is ignored: this build has no deliberate faults");
}
