//! `missive conversations`: the user's conversations, most recently active first, each
//! with its last message, the unread count and the other user's presence (§6.10).

use missive_cli::output::{message_fields, message_line, utc};
use missive_cli::profile::Profile;
use missive_spec::{limits, ConversationSummary};
use serde_json::{json, Value};

use crate::connect::session_client;

/// Longest preview of the last message on a line of its own.
const PREVIEW_CHARS: usize = 72;

pub async fn conversations(profile: &Profile, json: bool, limit: usize) -> anyhow::Result<()> {
    let (c, s) = session_client(profile).await?;
    let mut crypto = crate::connect::crypto(profile, &s)?;
    let mut before = None;
    let mut listed = 0;
    while listed < limit {
        let page_size = (limit - listed).min(limits::CONVERSATIONS_MAX_LIMIT as usize) as u32;
        let (mut page, older) = c.conversations(Some(page_size), before).await?;
        for s in page.iter_mut() {
            if let Some(m) = &s.last {
                s.last = Some(crypto.open_message(&c, m).await);
            }
        }
        crate::connect::say_notices(&mut crypto);
        for s in &page {
            println!("{}", if json { summary_json(s).to_string() } else { summary_line(s) });
        }
        listed += page.len();
        match older {
            Some(o) if !page.is_empty() => before = Some(o),
            _ => break,
        }
    }
    if listed == 0 && !json {
        eprintln!("no conversations yet");
    }
    c.close().await;
    Ok(())
}

/// The unread count as shown: the server stops counting at its cap.
fn unread_text(n: u32) -> String {
    if n >= limits::CONVERSATIONS_UNREAD_CAP {
        format!("{n}+")
    } else {
        n.to_string()
    }
}

fn summary_json(s: &ConversationSummary) -> Value {
    let last = s.last.as_ref().map(|m| Value::Object(message_fields(m)));
    json!({
        "type": "conversation",
        "with": s.with.as_str(),
        "conv": s.conv.to_hex(),
        "active_ms": s.active_ms,
        "unread": s.unread,
        "unread_capped": s.unread >= limits::CONVERSATIONS_UNREAD_CAP,
        "online": s.presence.as_ref().map(|p| p.online),
        "last_seen": s.presence.as_ref().and_then(|p| p.last_seen),
        "last": last,
    })
}

fn summary_line(s: &ConversationSummary) -> String {
    let presence = match &s.presence {
        Some(p) if p.online => "online".to_owned(),
        Some(p) => p.last_seen.map_or("offline".to_owned(), |t| format!("last seen {}", utc(t))),
        None => "-".to_owned(),
    };
    let unread = if s.unread == 0 { String::new() } else { format!("  {} unread", unread_text(s.unread)) };
    let last = s.last.as_ref().map(|m| {
        let line = message_line(m);
        let mut preview: String = line.chars().take(PREVIEW_CHARS).collect();
        if preview.len() < line.len() {
            preview.push('…');
        }
        format!("\n    {}", preview.replace('\n', " "))
    });
    format!("{}  ({presence}){unread}{}", s.with, last.unwrap_or_default())
}
