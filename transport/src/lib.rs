//! Missive's QUIC transport, shared by the `missive` client and the homeserver: what both
//! ends of a connection need, and nothing only a server needs (certificate generation,
//! discovery and signing keys live in `missive-federation`).
//!
//! - [`key`]: the textual ed25519 public key ([`PublicKey`]) that clients and peers pin.
//! - [`tls`]: the pin ([`tls::Pin`]) and the verifiers that check a peer's certificate
//!   key against it, the flow-control windows of each kind of connection, and the QUIC
//!   client configuration.
//! - [`framing`]: length-prefixed CBOR frames on QUIC streams, bounded for untrusted peers.

pub mod framing;
pub mod key;
pub mod rotation;
pub mod tls;

pub use key::{PublicKey, PublicKeyError};
