//! One module per group of commands; `main.rs` parses the command line and calls them.

pub mod account;
pub mod chat;
pub mod conversations;
pub mod history;
pub mod listen;
pub mod login;
pub mod outbox;
pub mod presence;
pub mod search;
pub mod send;
pub mod sync;
pub mod verify;

use anyhow::anyhow;
use missive_spec::UserId;

fn parse_user(s: &str) -> anyhow::Result<UserId> {
    UserId::parse(s).map_err(|e| anyhow!("{e}"))
}
