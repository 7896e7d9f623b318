//! Missive's black-box test tooling.
//!
//! - [`harness`]: starts, kills and restarts real `missived` processes
//!   ([`harness::ServerProcess`]) for integration tests and, later, the conformance runner.
//!
//! - [`mock_peer`]: a fake homeserver with its own key and federation endpoint
//!   ([`mock_peer::MockPeer`]) that sends honest or forged transactions and answers
//!   backfill requests.
//!
//! The conformance runner, fault proxy and load generator grow here.

pub mod harness;
pub mod mock_peer;
