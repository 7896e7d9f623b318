//! The Missive client: a library ([`client::Client`]) speaking the client protocol over
//! QUIC, and the `missive` command-line program built on it, whose local state lives in a
//! [`profile::Profile`] directory (session, pinned server keys, sync position).

pub mod client;
pub mod output;
pub mod profile;

pub use client::{Client, ClientError, Page, Session, Subscription};
