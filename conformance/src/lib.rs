//! Missive's black-box conformance suite and test tooling.
//!
//! - [`suite`]: the conformance tests ([`suite::Test`]), each naming the spec requirement
//!   ids it checks, and [`runner`] which selects and runs them against any implementation
//!   described by an `impl.toml` ([`implementation::ImplFile`], servers as
//!   [`implementation::Sut`]); [`report`] writes the results for people and CI systems.
//! - [`wire`]: the suite's own client of the client protocol ([`wire::Client`],
//!   [`wire::Subscription`]): QUIC, the server's key pinned, frames and requests written
//!   from the spec with `missive-spec`'s wire types and nothing else of Missive's, so that
//!   a misreading the reference client and server share still fails here.
//! - [`mock_peer`]: a fake homeserver with its own key and federation endpoint
//!   ([`mock_peer::MockPeer`]) that sends honest or forged transactions, answers backfill
//!   requests, and misbehaves on purpose as a receiver ([`mock_peer::Misbehaviour`]).
//! - [`harness`]: starts, kills and restarts real `missived` processes
//!   ([`harness::ServerProcess`]) for this workspace's own integration tests.
//!
//! The binary `missive-conformance` is the command-line front end (`run`, `list`,
//! `coverage`).

pub mod chaos;
pub mod compare;
pub mod harness;
pub mod implementation;
pub mod load;
pub mod mock_peer;
pub mod proxy;
pub mod report;
pub mod runner;
pub mod scenarios;
pub mod suite;
pub mod wire;
