//! `missive chat`: typed lines are sent (or queued while the server is away); the other
//! user's messages, receipts, presence and typing appear as they arrive, and what is on
//! screen is acknowledged as delivered and read.

use std::collections::HashSet;

use anyhow::bail;
use missive_cli::client::{new_client_msg_id, ClientError};
use missive_cli::output::message_json;
use missive_cli::profile::Profile;
use missive_spec::{Content, ConversationId, Ephemeral, EventKind, ReceiptKind, Watermark};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::{parse_user, send};
use crate::follow::{Follow, Next};
use crate::show;

/// Lines typed on standard input (`None` at its end), read on their own task so that
/// typed lines survive reconnections. Bounded: the reader waits while 64 lines are unread.
fn typed_lines() -> mpsc::Receiver<Option<String>> {
    let (line_tx, lines) = mpsc::channel::<Option<String>>(64);
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            let line = stdin.next_line().await.ok().flatten();
            let eof = line.is_none();
            if line_tx.send(line).await.is_err() || eof {
                return;
            }
        }
    });
    lines
}

pub async fn chat(profile: &Profile, json: bool, with: &str) -> anyhow::Result<()> {
    let with = parse_user(with)?;
    let me = profile.require_session()?.user;
    if with == me {
        bail!("cannot chat with yourself");
    }
    let conv = ConversationId::one_to_one(&me, &with);
    let mut lines = typed_lines();
    // (origin, seq) of every message on screen, so that none shows twice across
    // reconnections. Grows with the conversation for the life of the process.
    let mut shown = HashSet::new();
    let mut first = true;
    let mut follow = Follow::new(profile);
    loop {
        match follow.next(async { lines.recv().await.flatten() }).await? {
            Next::Unreachable(_) => {
                if first {
                    eprintln!("-- the server is unreachable; lines you type are queued --");
                    first = false;
                }
            }
            Next::Connected(c) => {
                let page = c.history(&with, Some(20), None, None).await?;
                for m in page.messages.iter().rev() {
                    if shown.insert((m.origin.clone(), m.seq)) {
                        show::page_message(json, m, &me, &page);
                    }
                }
                if let Some(newest) = page.messages.first() {
                    c.receipt(&with, ReceiptKind::Read, Watermark(newest.order_key())).await?;
                }
            }
            Next::Frame(c, f) => {
                if first {
                    if !json {
                        eprintln!("-- chatting with {with}; type a line and press Enter to send, Ctrl-D to quit --");
                    }
                    first = false;
                }
                for e in &f.ephemeral {
                    let about_peer = match e {
                        Ephemeral::Presence(p) => p.user == with,
                        Ephemeral::Typing(t) => t.user == with && t.conv == conv,
                        Ephemeral::Unknown(_) => false,
                    };
                    if about_peer {
                        show::ephemeral(json, e);
                    }
                }
                let mut newest_in: Option<Watermark> = None;
                for e in f.events {
                    match e.event {
                        EventKind::Message(m) => {
                            if m.conv == conv && shown.insert((m.origin.clone(), m.seq)) {
                                show::message(json, "message", &m, Some(e.pos));
                                if m.from == with {
                                    let w = Watermark(m.order_key());
                                    if newest_in.as_ref().is_none_or(|n| *n < w) {
                                        newest_in = Some(w);
                                    }
                                }
                            }
                        }
                        // The other user's receipts change the state of our messages.
                        EventKind::Receipt(r) if r.conv == conv && r.user == with => show::receipt(json, &r, Some(e.pos)),
                        EventKind::Undeliverable(u) if u.conv == conv => show::failed(json, &u, Some(e.pos)),
                        EventKind::Receipt(_) | EventKind::Undeliverable(_) | EventKind::Unknown(_) => {}
                    }
                }
                // On screen means delivered and read.
                if let Some(w) = newest_in {
                    c.receipt(&with, ReceiptKind::Delivered, w.clone()).await?;
                    c.receipt(&with, ReceiptKind::Read, w).await?;
                }
            }
            Next::Input(None) | Next::Interrupted => {
                follow.close().await;
                return Ok(());
            }
            Next::Input(Some(text)) if text.trim().is_empty() => {}
            Next::Input(Some(text)) => {
                let id = new_client_msg_id();
                let Some(c) = follow.client() else {
                    send::queue(profile, &with, &text, id, json)?;
                    continue;
                };
                match c.send(&with, Content::text(&text), id).await {
                    Ok(m) => {
                        shown.insert((m.origin.clone(), m.seq));
                        if json {
                            println!("{}", message_json("sent", &m, None));
                        }
                    }
                    Err(ClientError::Connection(e)) => {
                        send::queue(profile, &with, &text, id, json)?;
                        follow.lost(e);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Next::Lost(reason) => eprintln!("-- connection lost ({reason}); reconnecting --"),
        }
    }
}
