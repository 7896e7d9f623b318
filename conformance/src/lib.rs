//! Missive's black-box test tooling.
//!
//! - [`harness`]: starts, kills and restarts real `missived` processes
//!   ([`harness::ServerProcess`]) for integration tests and, later, the conformance runner.
//!
//! The conformance runner, mock peer, fault proxy and load generator grow here.

pub mod harness;
