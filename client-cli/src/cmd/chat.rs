//! `missive chat [@peer]`: in a terminal, the full-screen chat (`crate::tui`); with
//! standard input or output redirected (or `--json`), a line mode for scripts. In line
//! mode typed lines go to the peer (or wait in the outbox while the server is away);
//! `/quit` or the end of input ends it. It prints what arrives after the saved sync
//! position, as `sync` and `listen` do, then saves the position, so that nothing shows
//! twice across `chat`, `sync` and the next `chat`; the peer's presence and typing show
//! as they come. Errors are reported on standard error and the session goes on.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::bail;
use missive_cli::archive::Recorder;
use missive_cli::client::{new_client_msg_id, ClientError};
use missive_cli::e2ee::send_text;
use missive_cli::output::message_json;
use missive_cli::profile::Profile;
use missive_cli::receipts::ack_delivered;
use missive_spec::{limits, ConversationId, Ephemeral, EventKind, ReceiptKind, ServerName, UserId, Watermark};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::mpsc;

use super::{parse_user, send};
use crate::follow::{Follow, Next};
use crate::seen::Seen;
use crate::show;

/// After an error that the reconnect loop cannot retry by itself (a refused session),
/// wait this long before trying again.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(3);
/// How long leaving waits for the event stream to bring back the messages just sent,
/// so that the saved position is past them and `sync` does not show them again.
const ECHO_WAIT: Duration = Duration::from_secs(3);
/// Longest line read from standard input; the rest of a longer line is skipped and the
/// line refused (it could not be sent whole anyway).
const MAX_LINE: usize = 4 * limits::MAX_CONTENT_BODY;

/// One line of standard input.
#[derive(Debug, PartialEq, Eq)]
enum Typed {
    Line(String),
    /// A line over [`MAX_LINE`] bytes, of this many bytes.
    TooLong(usize),
    End,
}

/// Reads one line of at most [`MAX_LINE`] bytes; a longer one is read to its end and
/// dropped.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Typed {
    let mut buf = Vec::new();
    match (&mut *r).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).await {
        Ok(0) | Err(_) => return Typed::End,
        Ok(_) => {}
    }
    if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE {
        let mut skipped = buf.len();
        loop {
            let mut rest = Vec::new();
            match (&mut *r).take(MAX_LINE as u64).read_until(b'\n', &mut rest).await {
                Ok(0) | Err(_) => break,
                Ok(n) => skipped += n,
            }
            if rest.last() == Some(&b'\n') {
                break;
            }
        }
        return Typed::TooLong(skipped);
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Typed::Line(String::from_utf8_lossy(&buf).into_owned())
}

/// Lines typed on standard input, read on their own task so that typed lines survive
/// reconnections. Bounded: the reader waits while 64 lines are unread.
fn typed_lines() -> mpsc::Receiver<Typed> {
    let (line_tx, lines) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        loop {
            let line = read_line(&mut stdin).await;
            let end = line == Typed::End;
            if line_tx.send(line).await.is_err() || end {
                return;
            }
        }
    });
    lines
}

pub async fn chat(profile: &Profile, json: bool, with: Option<&str>, plaintext: bool) -> anyhow::Result<()> {
    let with = with.map(parse_user).transpose()?;
    let me = profile.require_session()?.user;
    if with.as_ref() == Some(&me) {
        bail!("cannot chat with yourself");
    }
    if !json && std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        return crate::tui::run(profile, with, plaintext).await;
    }
    let Some(with) = with else {
        bail!("say whom to chat with (`missive chat @user:server`) when input or output is not a terminal");
    };
    line_mode(profile, json, &me, &with, plaintext).await
}

async fn line_mode(profile: &Profile, json: bool, me: &UserId, with: &UserId, plaintext: bool) -> anyhow::Result<()> {
    let conv = ConversationId::one_to_one(me, with);
    let mut crypto = crate::connect::crypto(profile, &profile.require_session()?)?;
    let mut lines = typed_lines();
    let mut seen = Seen::default();
    let mut archive = Recorder::new(profile);
    let mut announced = false;
    let mut follow = Follow::new(profile);
    let mut hold_until: Option<tokio::time::Instant> = None;
    // Sent messages whose copy in the event stream has not come yet: at most those sent
    // since the last frame, as each frame takes away what it brings.
    let mut unechoed: HashSet<(ServerName, u64)> = HashSet::new();
    // Leaving, once the stream has brought back what was sent or at this instant.
    let mut leaving: Option<tokio::time::Instant> = None;
    loop {
        let lines = &mut lines;
        let input = async move {
            match leaving {
                Some(at) => {
                    tokio::time::sleep_until(at).await;
                    Typed::End
                }
                None => lines.recv().await.unwrap_or(Typed::End),
            }
        };
        let next = match hold_until {
            Some(at) => tokio::select! {
                x = input => Ok(Next::Input(x)),
                _ = tokio::time::sleep_until(at) => { hold_until = None; continue; }
            },
            None => follow.next(input).await,
        };
        let next = match next {
            // `/quit` is never sent: it ends the session like the end of input.
            Ok(Next::Input(Typed::Line(text))) if text.trim() == "/quit" => Next::Input(Typed::End),
            Ok(n) => n,
            Err(e) => {
                eprintln!("missive: {e:#}; trying again");
                hold_until = Some(tokio::time::Instant::now() + RETRY_AFTER_ERROR);
                continue;
            }
        };
        match next {
            Next::Unreachable(_) => {
                if !announced {
                    eprintln!("-- the server is unreachable; lines you type are queued --");
                    announced = true;
                }
            }
            Next::Connected(_) => {}
            Next::Frame(c, mut f) => {
                crypto.open_events(&c, &mut f.events).await;
                crate::connect::say_notices(&mut crypto);
                if !announced && !json {
                    eprintln!(
                        "-- chatting with {with}; type a line and press Enter to send, /quit or Ctrl-D to quit --"
                    );
                }
                announced = true;
                for e in &f.ephemeral {
                    let about_peer = match e {
                        Ephemeral::Presence(p) => p.user == *with,
                        Ephemeral::Typing(t) => t.user == *with && t.conv == conv,
                        Ephemeral::Unknown(_) => false,
                    };
                    if about_peer {
                        show::ephemeral(json, e);
                    }
                }
                // Everything past the saved position shows, as with `sync`: the position
                // saved below would otherwise skip it for good. One's own receipts are
                // left out: they change nothing on this screen.
                let mut newest_in: Option<Watermark> = None;
                for e in &f.events {
                    match &e.event {
                        EventKind::Message(m) if !seen.saw(m) => {
                            unechoed.remove(&(m.origin.clone(), m.seq));
                        }
                        EventKind::Message(m) => {
                            show::message(json, "message", m, Some(e.pos));
                            if m.conv == conv && m.from == *with {
                                let w = Watermark(m.order_key());
                                if newest_in.as_ref().is_none_or(|n| *n < w) {
                                    newest_in = Some(w);
                                }
                            }
                        }
                        EventKind::Receipt(r) if r.user != *me => show::receipt(json, r, Some(e.pos)),
                        // One's own message refused for good by the recipient's server.
                        EventKind::Undeliverable(u) => show::failed(json, u, Some(e.pos)),
                        EventKind::Receipt(_) | EventKind::Devices(_) | EventKind::Unknown(_) => {}
                    }
                }
                archive.record_events(&f.events);
                let acks = async {
                    ack_delivered(&c, me, &f.events).await?;
                    // On screen means read, in the conversation being had.
                    if let Some(w) = newest_in {
                        c.receipt(with, ReceiptKind::Read, w).await?;
                    }
                    Ok::<_, ClientError>(())
                };
                if let Err(e) = acks.await {
                    eprintln!("missive: a receipt failed: {e}");
                }
                if let Err(e) = follow.save_position(f.next) {
                    eprintln!("missive: {e:#}");
                }
                if leaving.is_some() && unechoed.is_empty() {
                    follow.close().await;
                    return Ok(());
                }
            }
            Next::Interrupted => {
                follow.close().await;
                return Ok(());
            }
            Next::Input(Typed::End) => {
                if leaving.is_none() && !unechoed.is_empty() && follow.client().is_some() {
                    leaving = Some(tokio::time::Instant::now() + ECHO_WAIT);
                    continue;
                }
                follow.close().await;
                return Ok(());
            }
            Next::Input(Typed::TooLong(n)) => {
                eprintln!(
                    "missive: not sent: the line is {n} bytes, over the limit of {} bytes",
                    limits::MAX_CONTENT_BODY
                );
            }
            Next::Input(Typed::Line(text)) if text.trim().is_empty() => {}
            Next::Input(Typed::Line(text)) if text.len() > limits::MAX_CONTENT_BODY => {
                eprintln!(
                    "missive: not sent: the line is {} bytes, over the limit of {} bytes",
                    text.len(),
                    limits::MAX_CONTENT_BODY
                );
            }
            Next::Input(Typed::Line(text)) => {
                let id = new_client_msg_id();
                let Some(c) = follow.client() else {
                    if let Err(e) = send::queue(profile, with, &text, id, json, plaintext) {
                        eprintln!("missive: not sent: {e:#}");
                    }
                    continue;
                };
                let sent = send_text(c, &mut crypto, with, &text, id, plaintext).await;
                crate::connect::say_notices(&mut crypto);
                match sent {
                    Ok(m) => {
                        archive.record(&m);
                        seen.saw(&m);
                        unechoed.insert((m.origin.clone(), m.seq));
                        if json {
                            println!("{}", message_json("sent", &m, None));
                        }
                    }
                    Err(e) if e.is_later() => {
                        if let Err(e) = send::queue(profile, with, &text, id, json, plaintext) {
                            eprintln!("missive: not sent: {e:#}");
                        }
                        if e.is_connection() {
                            follow.lost(e.to_string());
                        }
                    }
                    Err(e) => eprintln!("missive: not sent: {e}"),
                }
            }
            Next::Lost(reason) => eprintln!("-- connection lost ({reason}); reconnecting --"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_read_up_to_the_bound_and_longer_ones_skipped_whole() {
        let long = "x".repeat(MAX_LINE * 2 + 10);
        let input = format!("first\r\n{long}\nafter\nlast");
        let mut r = tokio::io::BufReader::new(input.as_bytes());
        assert_eq!(read_line(&mut r).await, Typed::Line("first".into()));
        assert_eq!(read_line(&mut r).await, Typed::TooLong(long.len() + 1));
        assert_eq!(read_line(&mut r).await, Typed::Line("after".into()));
        assert_eq!(read_line(&mut r).await, Typed::Line("last".into()));
        assert_eq!(read_line(&mut r).await, Typed::End);
    }
}
