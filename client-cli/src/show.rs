//! How commands print what they got: one readable line, or one JSON object with `--json`
//! (the formats themselves are `missive_cli::output`).

use missive_cli::outbox::Queued;
use missive_cli::output::{
    ephemeral_json, ephemeral_line, message_json, message_json_with_state, message_line, message_line_with_state,
    receipt_json, receipt_line,
};
use missive_cli::Page;
use missive_spec::{Ephemeral, Event, EventKind, Message, Receipt, Undeliverable, UserId};
use serde_json::json;

pub fn message(json: bool, kind: &str, m: &Message, pos: Option<u64>) {
    if json {
        println!("{}", message_json(kind, m, pos));
    } else {
        println!("{}", message_line(m));
    }
}

/// A message from a history page; one's own carry their state (sent, delivered, read).
pub fn page_message(json: bool, m: &Message, me: &UserId, page: &Page) {
    let mine = m.from == *me;
    let state = mine.then(|| page.state(m));
    if json {
        println!("{}", message_json_with_state("message", m, None, state));
    } else if let Some(reason) = page.failure(m).filter(|_| mine) {
        println!("{}", message_line_with_state(m, Some(&format!("failed: {reason}"))));
    } else {
        println!("{}", message_line_with_state(m, state));
    }
}

pub fn receipt(json: bool, r: &Receipt, pos: Option<u64>) {
    if json {
        println!("{}", receipt_json(r, pos));
    } else {
        println!("{}", receipt_line(r));
    }
}

pub fn event(json: bool, e: &Event) {
    match &e.event {
        EventKind::Message(m) => message(json, "message", m, Some(e.pos)),
        EventKind::Receipt(r) => receipt(json, r, Some(e.pos)),
        EventKind::Undeliverable(u) => failed(json, u, Some(e.pos)),
        // The key store looked at the user's devices again and said what changed.
        EventKind::Devices(d) if json => println!("{}", json!({"type": "devices", "pos": e.pos, "user": d.user.as_str()})),
        EventKind::Devices(_) => {}
        // A kind this version does not know (spec §6.5): skipped.
        EventKind::Unknown(_) => {}
    }
}

/// One of the user's messages the recipient's server refused for good (spec §10.5):
/// `{"type":"failed","pos":…,"conv":…,"origin":…,"seq":…,"reason":…}`.
pub fn failed(json: bool, u: &Undeliverable, pos: Option<u64>) {
    if json {
        println!("{}", json!({"type": "failed", "pos": pos, "conv": u.conv.to_hex(), "origin": u.origin.as_str(), "seq": u.seq, "reason": u.reason}));
    } else {
        println!("-- your message {} #{} could not be delivered [failed: {}]", u.origin, u.seq, u.reason.replace('_', " "));
    }
}

pub fn ephemeral(json: bool, e: &Ephemeral) {
    if json {
        println!("{}", ephemeral_json(e));
    } else {
        println!("{}", ephemeral_line(e));
    }
}

/// A message just put in the outbox.
pub fn queued_json(q: &Queued) -> String {
    missive_cli::output::queued_json(q, missive_cli::outbox::State::Waiting, missive_cli::outbox::SHORT_ID_LEN)
}

/// A command's acknowledgement: `{"type": "ok"}`, or `human` when there is one to print.
pub fn ok(json: bool, human: Option<&str>) {
    if json {
        println!("{}", json!({"type": "ok"}));
    } else if let Some(h) = human {
        println!("{h}");
    }
}
