//! `missive send`: a message goes out now, or waits in the outbox until a command reaches
//! the server.

use missive_cli::archive::Recorder;
use missive_cli::client::new_client_msg_id;
use missive_cli::e2ee::send_text;
use missive_cli::outbox::{check_size, Outbox, Queued};
use missive_cli::output::message_json;
use missive_cli::profile::Profile;
use missive_spec::{ClientMsgId, UserId};

use super::parse_user;
use crate::connect::{crypto, say_notices, session_client_flushed, unreachable};
use crate::show;

pub async fn send(profile: &Profile, json: bool, to: &str, text: &str, plaintext: bool) -> anyhow::Result<()> {
    let to = parse_user(to)?;
    check_size(text)?;
    let s = profile.require_session()?;
    let id = new_client_msg_id();
    let (c, _, waiting) = match session_client_flushed(profile).await {
        Ok(x) => x,
        Err(e) if unreachable(&e) => return queue(profile, &to, text, id, json, plaintext),
        Err(e) => return Err(e),
    };
    if waiting > 0 {
        // Older messages could not all go: keep the order by queueing this one too.
        return queue(profile, &to, text, id, json, plaintext);
    }
    let mut crypto = crypto(profile, &s)?;
    let sent = send_text(&c, &mut crypto, &to, text, id, plaintext).await;
    say_notices(&mut crypto);
    match sent {
        Ok(m) => {
            Recorder::new(profile).record(&m);
            if json {
                println!("{}", message_json("sent", &m, None));
            } else {
                println!("sent to {} (#{})", m.to, m.seq);
            }
        }
        // The request may or may not have arrived: queue it with the same id; the
        // server's idempotent send makes the retry safe.
        Err(e) if e.is_later() => queue(profile, &to, text, id, json, plaintext)?,
        Err(e) => return Err(e.into()),
    }
    c.close().await;
    Ok(())
}

/// Puts a message in the outbox, under the id it was (or would have been) sent with.
pub fn queue(profile: &Profile, to: &UserId, text: &str, id: ClientMsgId, json: bool, plaintext: bool) -> anyhow::Result<()> {
    let outbox = Outbox::open(profile.dir())?;
    let q = Queued { plaintext, ..Queued::new(to.clone(), text.to_owned(), id) };
    outbox.push(&q)?;
    let waiting = outbox.list()?.len();
    if json {
        println!("{}", show::queued_json(&q));
    } else {
        println!("server unreachable: queued for {to} ({waiting} waiting); it goes out with the next command that reaches the server");
    }
    Ok(())
}
