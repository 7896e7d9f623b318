//! `missive search`: the profile's message archive, searched offline, newest first.

use std::io::IsTerminal;

use missive_cli::archive::{Archive, Found, Hit};
use missive_cli::output::{message_json, utc};
use missive_cli::profile::Profile;
use serde_json::json;

use super::parse_user;

/// Hits shown when `--limit` is not given.
pub const DEFAULT_LIMIT: u32 = 20;

pub fn search(profile: &Profile, json: bool, text: &str, with: Option<&str>, limit: u32) -> anyhow::Result<()> {
    let with = with.map(parse_user).transpose()?;
    let archive = Archive::open(profile)?;
    let Found { hits, more } = archive.search(text, with.as_ref(), limit)?;
    let bold = !json && std::io::stdout().is_terminal();
    for h in &hits {
        if json {
            println!("{}", message_json("found", &h.message, None));
        } else {
            println!("{}", hit_line(h, bold));
        }
    }
    if json {
        println!("{}", json!({"type": "searched", "count": hits.len(), "more": more}));
    } else if hits.is_empty() {
        eprintln!("no message found");
    } else if more {
        eprintln!("-- more than {limit} found; narrow the search or raise --limit");
    }
    Ok(())
}

/// `2026-12-01 18:50:20 @alice:alpha.example: lunch [tomorrow]?` (bold on a terminal).
fn hit_line(h: &Hit, bold: bool) -> String {
    let (start, end) = if bold { ("\x1b[1m", "\x1b[0m") } else { ("[", "]") };
    format!("{} {}: {}", utc(h.message.ts), h.message.from, h.marked(start, end))
}
