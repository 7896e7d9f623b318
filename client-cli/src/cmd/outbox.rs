//! `missive outbox`, `outbox retry ID` and `outbox drop ID`: what waits to be sent, what
//! the server refused and why, and putting either right.

use missive_cli::outbox::{short_id, short_id_len, Outbox, State};
use missive_cli::output::{queued_json, queued_line};
use missive_cli::profile::Profile;

use crate::show;

pub fn list(profile: &Profile, json: bool) -> anyhow::Result<()> {
    let entries = Outbox::open(profile.dir())?.entries()?;
    let len = short_id_len(&entries);
    for e in &entries {
        if json {
            println!("{}", queued_json(&e.queued, e.state, len));
        } else {
            println!("{}", queued_line(&e.queued, e.state, len));
        }
    }
    if !json && entries.is_empty() {
        eprintln!("the outbox is empty");
    }
    Ok(())
}

pub fn retry(profile: &Profile, json: bool, id: &str) -> anyhow::Result<()> {
    let q = Outbox::open(profile.dir())?.retry(id)?;
    if json {
        println!("{}", queued_json(&q, State::Waiting, id.len()));
    } else {
        println!("{} to {} waits again; it goes out with the next command that reaches the server", short_id(&q.client_msg_id, id.len()), q.to);
    }
    Ok(())
}

pub fn drop(profile: &Profile, json: bool, id: &str) -> anyhow::Result<()> {
    let q = Outbox::open(profile.dir())?.drop_entry(id)?;
    show::ok(json, Some(&format!("dropped the message to {}: {}", q.to, q.text)));
    Ok(())
}
