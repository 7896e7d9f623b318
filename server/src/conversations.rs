//! `conversations` (§6.10): a user's conversations, most recently active first, each with
//! its newest message, the caller's unread count and the other member's presence. Read
//! from the `Active` index the writer keeps beside every stored message.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use missive_spec::{limits, ConversationId, ConversationSummary, Cursor, ReceiptKind, Response, UserId};

use crate::error::ApiError;
use crate::records;
use crate::service::{Caller, Service};
use crate::store::{keys, Cf, Direction, StoreError};

/// Most messages looked at to count one conversation's unread messages: the caller's own
/// messages after their read position count against it too, so with many of those the
/// count stops short (§6.10 allows it).
const UNREAD_SCAN: usize = 1000;

/// A cursor names the last conversation listed: its activity time and id.
fn encode_cursor(active_ms: u64, conv: &ConversationId) -> Cursor {
    let mut b = active_ms.to_be_bytes().to_vec();
    b.extend_from_slice(conv.as_bytes());
    Cursor(URL_SAFE_NO_PAD.encode(b))
}

fn decode_cursor(c: &Cursor) -> Result<(u64, ConversationId), ApiError> {
    let bad = || ApiError::invalid("cursor was not issued by this server");
    let b = URL_SAFE_NO_PAD.decode(&c.0).map_err(|_| bad())?;
    if b.len() != 8 + ConversationId::LEN {
        return Err(bad());
    }
    let (ms, conv) = b.split_at(8);
    Ok((u64::from_be_bytes(ms.try_into().map_err(|_| bad())?), ConversationId(conv.try_into().map_err(|_| bad())?)))
}

fn corrupt(what: &str) -> ApiError {
    StoreError::Corrupt { cf: "active", reason: what.to_owned() }.into()
}

impl Service {
    pub(crate) fn conversations(&self, c: &Caller, limit: Option<u32>, before: Option<Cursor>) -> Result<Response, ApiError> {
        let limit = limit.unwrap_or(limits::CONVERSATIONS_DEFAULT_LIMIT);
        if limit == 0 || limit > limits::CONVERSATIONS_MAX_LIMIT {
            return Err(ApiError::invalid(format!("limit must be 1 to {}", limits::CONVERSATIONS_MAX_LIMIT)));
        }
        let limit = limit as usize;
        let me = c.user.localpart();
        let from = before.map(|b| decode_cursor(&b)).transpose()?.map(|(ms, conv)| keys::active(me, ms, &conv));
        let mut rows = self.store.scan(Cf::Active, &keys::active_of(me), from.as_deref(), Direction::Reverse, limit + 1)?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let mut conversations = Vec::with_capacity(rows.len());
        let mut older = None;
        for (k, v) in &rows {
            let (_, active_ms, conv) = keys::parse_active(k).ok_or_else(|| corrupt("bad key"))?;
            let with = std::str::from_utf8(v).ok().and_then(|s| UserId::parse(s).ok()).ok_or_else(|| corrupt("bad peer"))?;
            conversations.push(self.summary(&c.user, conv, with, active_ms)?);
            older = more.then(|| encode_cursor(active_ms, &conv));
        }
        Ok(Response::Conversations { older, conversations })
    }

    fn summary(&self, me: &UserId, conv: ConversationId, with: UserId, active_ms: u64) -> Result<ConversationSummary, ApiError> {
        let prefix = keys::messages_of(&conv);
        let seen = match self.store.get(Cf::Receipts, &keys::receipt(&conv, me, ReceiptKind::Read))? {
            Some(v) => Some(records::watermark("receipts", &v)?),
            None => None,
        };
        // Newest first, down to the read position: the first row is `last`.
        let rows = self.store.scan(Cf::Messages, &prefix, None, Direction::Reverse, UNREAD_SCAN)?;
        // Messages kept from the caller, who blocked their sender (§6.12): neither shown
        // nor counted. Most conversations have none, found with one seek.
        let any_withheld = !self.store.scan(Cf::Withheld, &prefix, None, Direction::Forward, 1)?.is_empty();
        let mut last = None;
        let mut unread = 0;
        for (k, v) in &rows {
            if any_withheld && self.store.get(Cf::Withheld, k)?.is_some() && records::stored_message(v)?.to == *me {
                continue;
            }
            let (_, key) = keys::parse_message(k).ok_or_else(|| corrupt("bad message key"))?;
            let after_seen = seen.as_ref().is_none_or(|s| s.0 < key);
            if !after_seen && last.is_some() {
                break;
            }
            let m = records::stored_message(v)?;
            if after_seen && m.from == with {
                unread += 1;
            }
            last.get_or_insert(m);
            if !after_seen || unread == limits::CONVERSATIONS_UNREAD_CAP {
                break;
            }
        }
        // Someone the caller blocks shows no presence (§6.12).
        let blocked = self.store.get(Cf::Blocks, &keys::block(me.localpart(), &with))?.is_some();
        let presence = if !blocked && self.shares_conversation(me, &with)? { Some(self.presence.current(&with)) } else { None };
        Ok(ConversationSummary { conv, last, with, unread, presence, active_ms })
    }
}
