//! Missive's server identity and federation layer.
//!
//! - [`keys`]: ed25519 server keys ([`ServerKey`]) and their PEM files.
//! - [`tls`]: self-signed certificates over the server key and the QUIC configurations that
//!   present them, to clients and, with client certificates, on federation links both ways.
//! - [`envelope`]: signing units and verifying them before decoding.
//! - [`discovery`]: static peers, `.well-known` over HTTPS, DNS SRV, default port; cached,
//!   one lookup per name in flight, bounded, and never to loopback or private addresses.
//!
//! What a client shares with the server lives in `missive-transport` and is re-exported
//! here under its old paths: the pinned public key ([`PublicKey`]), pins and verifiers
//! (in [`tls`]) and [`framing`]. Retry timing ([`backoff`]) is the protocol core's.

pub use missive_core::backoff;
pub mod discovery;
pub mod envelope;
pub mod keys;
pub mod tls;

pub use missive_transport::framing;
pub use missive_transport::rotation;

pub use keys::{KeyError, PublicKey, RotationChain, ServerKey};
