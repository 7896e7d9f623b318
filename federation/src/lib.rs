//! Missive's server identity and QUIC transport layer.
//!
//! - [`keys`]: ed25519 server keys ([`ServerKey`]), their PEM files and the textual
//!   public key ([`PublicKey`]) that peers and clients pin.
//! - [`tls`]: self-signed certificates over the server key and the SPKI-pinning verifier
//!   ([`tls::PinnedServerVerifier`]) used by clients today and by federation links.
//! - [`framing`]: length-prefixed CBOR frames on QUIC streams.
//!
//! Server-to-server federation (discovery, signed transactions, outbound queues, gap fill)
//! grows here on top of these pieces.

pub mod framing;
pub mod keys;
pub mod tls;

pub use keys::{KeyError, PublicKey, ServerKey};
