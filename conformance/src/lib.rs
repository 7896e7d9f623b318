//! Missive's black-box conformance suite and test tooling.
//!
//! - [`suite`]: the conformance tests ([`suite::Test`]), each naming the spec requirement
//!   ids it checks, and [`runner`] which selects and runs them against any implementation
//!   described by an `impl.toml` ([`implementation::ImplFile`], servers as
//!   [`implementation::Sut`]); [`report`] writes the results for people and CI systems.
//! - [`mock_peer`]: a fake homeserver with its own key and federation endpoint
//!   ([`mock_peer::MockPeer`]) that sends honest or forged transactions, answers backfill
//!   requests, and misbehaves on purpose as a receiver ([`mock_peer::Misbehaviour`]).
//! - [`harness`]: starts, kills and restarts real `missived` processes
//!   ([`harness::ServerProcess`]) for this workspace's own integration tests.
//!
//! The binary `missive-conformance` is the command-line front end (`run`, `list`,
//! `coverage`).

pub mod chaos;
pub mod harness;
pub mod implementation;
pub mod load;
pub mod mock_peer;
pub mod proxy;
pub mod report;
pub mod runner;
pub mod suite;
