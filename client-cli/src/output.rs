//! How the CLI prints things: one readable line per item, or with `--json` one JSON object
//! per line. Every JSON object has a `type` (`message`, `sent`, `receipt`, `page`, `session`,
//! `synced`, `queued`, `device`, `presence`, `typing`, `ok`), listed in `missive --help`.

use crate::outbox::{short_id, Queued, State};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use missive_spec::{Cursor, Ephemeral, Message, Receipt, ReceiptKind, Watermark};
use serde_json::{json, Map, Value};

/// Fields describing a message, shared by every JSON object that carries one.
pub fn message_fields(m: &Message) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("conv".into(), json!(m.conv.to_hex()));
    o.insert("origin".into(), json!(m.origin.as_str()));
    o.insert("seq".into(), json!(m.seq));
    o.insert("rank".into(), json!(m.deps.rank()));
    o.insert("from".into(), json!(m.from.as_str()));
    o.insert("to".into(), json!(m.to.as_str()));
    o.insert("ts".into(), json!(m.ts));
    let shown = crate::e2ee::shown(&m.content);
    o.insert("content_type".into(), json!(shown.kind));
    o.insert("encrypted".into(), json!(shown.encrypted));
    match (shown.text, shown.undecryptable) {
        (_, Some(why)) => o.insert("undecryptable".into(), json!(why)),
        (Some(t), None) => o.insert("text".into(), json!(t)),
        (None, None) => o.insert("body_base64".into(), json!(STANDARD.encode(shown.body))),
    };
    o
}

pub fn message_json(kind: &str, m: &Message, pos: Option<u64>) -> String {
    message_json_with_state(kind, m, pos, None)
}

/// Like [`message_json`], with `state` (sent, delivered, read) for one's own messages.
pub fn message_json_with_state(kind: &str, m: &Message, pos: Option<u64>, state: Option<&str>) -> String {
    let mut o = Map::new();
    o.insert("type".into(), json!(kind));
    if let Some(p) = pos {
        o.insert("pos".into(), json!(p));
    }
    o.extend(message_fields(m));
    if let Some(s) = state {
        o.insert("state".into(), json!(s));
    }
    Value::Object(o).to_string()
}

fn watermark_json(w: &Watermark) -> Value {
    json!({"rank": w.0.rank, "origin": w.0.origin.as_str(), "seq": w.0.seq})
}

pub fn kind_str(k: ReceiptKind) -> &'static str {
    match k {
        ReceiptKind::Delivered => "delivered",
        ReceiptKind::Read => "read",
    }
}

/// `{"type":"receipt","pos":…,"conv":…,"user":…,"peer":…,"kind":"read","up_to":{rank,origin,seq}}`
pub fn receipt_json(r: &Receipt, pos: Option<u64>) -> String {
    let mut o = Map::new();
    o.insert("type".into(), json!("receipt"));
    if let Some(p) = pos {
        o.insert("pos".into(), json!(p));
    }
    o.insert("conv".into(), json!(r.conv.to_hex()));
    o.insert("user".into(), json!(r.user.as_str()));
    o.insert("peer".into(), json!(r.peer.as_str()));
    o.insert("kind".into(), json!(kind_str(r.kind)));
    o.insert("up_to".into(), watermark_json(&r.up_to));
    Value::Object(o).to_string()
}

/// `-- @bob:beta.example has read up to alpha.example #3`
pub fn receipt_line(r: &Receipt) -> String {
    format!("-- {} has {} up to {} #{}", r.user, kind_str(r.kind), r.up_to.0.origin, r.up_to.0.seq)
}

pub fn page_json(older: &Option<Cursor>, newer: &Option<Cursor>, count: usize) -> String {
    json!({"type": "page", "count": count, "older": older.as_ref().map(|c| &c.0), "newer": newer.as_ref().map(|c| &c.0)})
        .to_string()
}

/// `2026-11-22 17:05:09 @alice:alpha.test: hello`
pub fn message_line(m: &Message) -> String {
    let shown = crate::e2ee::shown(&m.content);
    let body = match (shown.text, shown.undecryptable) {
        (_, Some(why)) => format!("[encrypted message this device cannot read: {why}]"),
        (Some(t), None) => t.replace('\n', "\n    "),
        (None, None) => format!("[{} payload, {} bytes]", shown.kind, shown.body.len()),
    };
    format!("{} {}: {}", utc(m.ts), m.from, body)
}

/// A message line with its state, for one's own messages: `… [read]`.
pub fn message_line_with_state(m: &Message, state: Option<&str>) -> String {
    match state {
        Some(s) => format!("{} [{s}]", message_line(m)),
        None => message_line(m),
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `{"type":"queued","id":…,"state":"waiting"|"failed","reason":…,"to":…,"text":…,"client_msg_id":…,"created_ms":…}`
pub fn queued_json(q: &Queued, state: State, id_len: usize) -> String {
    json!({
        "type": "queued",
        "id": short_id(&q.client_msg_id, id_len),
        "state": state.as_str(),
        "reason": q.reason,
        "to": q.to.as_str(),
        "text": q.text,
        "client_msg_id": q.client_msg_id,
        "created_ms": q.created_ms,
    })
    .to_string()
}

/// `3f9a1c2e  waiting  2026-12-01 18:50:20 to @bob:beta.example: hello`, and for a failed
/// entry its reason on the next line.
pub fn queued_line(q: &Queued, state: State, id_len: usize) -> String {
    let head = format!("{}  {:7}  {} to {}: {}", short_id(&q.client_msg_id, id_len), state.as_str(), utc(q.created_ms), q.to, q.text);
    match &q.reason {
        Some(r) => format!("{head}\n          refused by the server: {r}"),
        None => head,
    }
}

/// `{"type":"presence","user":…,"online":…,"last_seen":…}` or
/// `{"type":"typing","user":…,"conv":…,"until":…}`
pub fn ephemeral_json(e: &Ephemeral) -> String {
    match e {
        Ephemeral::Presence(p) => json!({"type": "presence", "user": p.user.as_str(), "online": p.online, "last_seen": p.last_seen}).to_string(),
        Ephemeral::Typing(t) => json!({"type": "typing", "user": t.user.as_str(), "conv": t.conv.to_hex(), "until": t.until}).to_string(),
        Ephemeral::Unknown(kind) => json!({"type": "unknown", "kind": kind}).to_string(),
    }
}

/// `-- @bob:beta.example is online` / `… is offline (last seen …)` / `… is typing…`
pub fn ephemeral_line(e: &Ephemeral) -> String {
    match e {
        Ephemeral::Presence(p) if p.online => format!("-- {} is online", p.user),
        Ephemeral::Presence(p) => match p.last_seen {
            Some(t) => format!("-- {} is offline (last seen {})", p.user, utc(t)),
            None => format!("-- {} is offline", p.user),
        },
        Ephemeral::Typing(t) => format!("-- {} is typing…", t.user),
        Ephemeral::Unknown(kind) => format!("-- ({kind} update; this missive version cannot show it)"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_795_366_800_000), "2026-11-22 17:00:00");
    }
}
