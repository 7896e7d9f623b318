//! The Missive client: a library ([`client::Client`]) speaking the client protocol over
//! QUIC, and the `missive` command-line program built on it, whose local state lives in a
//! [`profile::Profile`] directory (session, pinned server keys, sync position) with an
//! [`outbox::Outbox`] of messages written while the server was unreachable, the receipts
//! it sends for what it received ([`receipts`]), and an [`archive::Archive`] of the
//! messages it saw, with a full-text index for `missive search`.

pub mod archive;
pub mod client;
pub mod e2ee;
pub mod outbox;
pub mod output;
pub mod profile;
pub mod receipts;

pub use client::{Client, ClientError, Page, Session, Subscription};
