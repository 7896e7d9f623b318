//! Missive's server identity and federation layer.
//!
//! - [`keys`]: ed25519 server keys ([`ServerKey`]), their PEM files, key ids and the
//!   textual public key ([`PublicKey`]) that peers and clients pin.
//! - [`tls`]: self-signed certificates over the server key; SPKI-pinning verifiers for
//!   clients and, with client certificates, for federation links both ways.
//! - [`framing`]: length-prefixed CBOR frames on QUIC streams.
//! - [`envelope`]: signing units and verifying them before decoding.
//! - [`discovery`]: static peers, `.well-known` over HTTPS, DNS SRV, default port; cached,
//!   one lookup per name in flight, bounded, and never to loopback or private addresses.
//! - [`backoff`]: retry timing, which lives in the protocol core (`missive_core::backoff`).

pub use missive_core::backoff;
pub mod discovery;
pub mod envelope;
pub mod framing;
pub mod keys;
pub mod tls;

pub use keys::{KeyError, PublicKey, ServerKey};
