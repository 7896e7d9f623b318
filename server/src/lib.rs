//! The Missive homeserver, `missived`.
//!
//! A request arrives on the QUIC client API ([`api::Api`]), is answered by the
//! [`service::Service`], and every change goes through the single writer
//! ([`sequencer::Sequencer`]), which numbers messages and stream events and commits them
//! in grouped, synced writes to the [`store::Store`] (RocksDB: [`store::rocks::RocksStore`]).
//! Subscribers are woken through the [`hub::Hub`] only after a write is durable.
//! Messages for other servers leave through [`federation::Federation`], which also
//! receives, checks and stores theirs. [`config::Config`] is `missived.toml`; [`admin`] is
//! the operator's socket; [`signals::Signals`] and [`reload::Reloadable`] apply an edited
//! config to the running server.

pub mod accounts;
pub mod admin;
pub mod api;
pub mod cluster;
pub mod config;
pub mod conversations;
pub mod error;
pub mod federation;
pub mod hashing;
pub mod hub;
pub mod keydir;
pub mod limits;
pub mod linger;
pub mod logging;
pub mod metrics;
pub mod http;
pub mod presence;
pub mod ratelimit;
pub mod records;
pub mod reload;
pub mod sabotage;
pub mod sequencer;
pub mod server;
pub mod service;
pub mod signals;
pub mod store;
