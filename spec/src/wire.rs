//! Client protocol frames (spec §5, §6): every request, response and event, once.
//!
//! Struct fields are declared in deterministic-CBOR key order (shorter key first, then
//! bytewise; RFC 8949 §4.2.1) so that serde's declaration-order encoding is canonical.

use serde::{Deserialize, Serialize};

use crate::ids::{ClientMsgId, ConversationId, DeviceId, ServerName, UserId};
use crate::ordering::{Deps, OrderKey};

/// Version carried in every frame's `v` field (§5.3).
pub const PROTOCOL_VERSION: u16 = 0;
/// ALPN of the client protocol (§5.1).
pub const CLIENT_ALPN: &[u8] = b"missive-client/0";

/// A request: the only frame a client writes on a request stream (§5.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub v: u16,
    pub req: Request,
    /// The device's access token; absent for `info`, `register` and `login`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}

/// A response or subscription frame written by the server (§5.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub v: u16,
    pub res: Response,
}

/// Every request of the client protocol (§6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// §6.1: the server's name, protocol version and registration policy.
    Info {},
    /// §6.2: create an account (if the server's policy allows) and a first device.
    Register {
        user: UserId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        password: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_name: Option<String>,
    },
    /// §6.2: a new device with its own access token.
    Login {
        user: UserId,
        password: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_name: Option<String>,
    },
    /// §6.3: revoke the calling device's token.
    Logout {},
    /// §6.4: send a message; idempotent on (device, `client_msg_id`).
    Send { to: UserId, content: Content, client_msg_id: ClientMsgId },
    /// §6.6: one page of a conversation's history, newest first.
    History {
        with: UserId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<Cursor>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<Cursor>,
    },
    /// §6.5: the caller's events after position `since`.
    Sync {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        since: u64,
    },
    /// §6.5: like `sync`, then keep the stream open and push new events as they happen.
    Subscribe { since: u64 },
    /// §10.2: the caller's devices have `kind` (delivered, read) everything up to `up_to`
    /// in the conversation with `with`.
    Receipt { kind: ReceiptKind, with: UserId, up_to: Watermark },
    /// §11: the caller's devices.
    Devices {},
    /// §11: revoke one of the caller's other devices.
    RevokeDevice { device: DeviceId },
    /// §12.2: whether `user` is online, or when last seen.
    Presence { user: UserId },
    /// §12.4: the caller's settings.
    Settings { hide_last_seen: bool },
    /// §13: the caller is typing to `with`.
    Typing { with: UserId },
    /// §6.10: the caller's conversations, most recently active first.
    Conversations {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<Cursor>,
    },
    /// §6.11: the caller changes their own password.
    ChangePassword {
        new_password: String,
        old_password: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        logout_others: bool,
    },
    /// §6.12: the caller's account stops receiving anything of `user`'s.
    Block { user: UserId },
    /// §6.12: ends a block.
    Unblock { user: UserId },
    /// §6.12: whom the caller blocks.
    Blocked {},
    /// §6.13: the server's current key and rotation chain (no auth).
    Keys {},
    /// E3.1: publishes the calling device's keys, one-time keys and fallback key.
    KeysUpload {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keys: Option<crate::e2ee::DeviceKeys>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fallback: Option<crate::e2ee::OneTimeKey>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        one_time: Vec<crate::e2ee::OneTimeKey>,
    },
    /// E3.2: the device keys of `user`'s devices (any server).
    KeysQuery { user: UserId },
    /// E3.3: one one-time key (or the fallback key) of each of `devices` of `user`.
    KeysClaim { user: UserId, devices: Vec<DeviceId> },
}

impl Request {
    /// The name of every request, as `req`'s one key carries it (§5.3): a frame naming
    /// anything else is `bad_frame`, one naming these with bad arguments `invalid_request`
    /// (§5.2).
    pub const NAMES: [&'static str; 23] = [
        "info",
        "register",
        "login",
        "logout",
        "send",
        "history",
        "sync",
        "subscribe",
        "receipt",
        "devices",
        "revoke_device",
        "presence",
        "settings",
        "typing",
        "conversations",
        "change_password",
        "block",
        "unblock",
        "blocked",
        "keys",
        "keys_upload",
        "keys_query",
        "keys_claim",
    ];

    /// This request's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Info {} => "info",
            Request::Register { .. } => "register",
            Request::Login { .. } => "login",
            Request::Logout {} => "logout",
            Request::Send { .. } => "send",
            Request::History { .. } => "history",
            Request::Sync { .. } => "sync",
            Request::Subscribe { .. } => "subscribe",
            Request::Receipt { .. } => "receipt",
            Request::Devices {} => "devices",
            Request::RevokeDevice { .. } => "revoke_device",
            Request::Presence { .. } => "presence",
            Request::Settings { .. } => "settings",
            Request::Typing { .. } => "typing",
            Request::Conversations { .. } => "conversations",
            Request::ChangePassword { .. } => "change_password",
            Request::Block { .. } => "block",
            Request::Unblock { .. } => "unblock",
            Request::Blocked {} => "blocked",
            Request::Keys {} => "keys",
            Request::KeysUpload { .. } => "keys_upload",
            Request::KeysQuery { .. } => "keys_query",
            Request::KeysClaim { .. } => "keys_claim",
        }
    }
}

/// Every response of the client protocol (§6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Info { version: u16, server_name: ServerName, registration: RegistrationPolicy },
    Session { user: UserId, token: String, device: DeviceId },
    Ok {},
    /// The stored message; a retried send returns the same one (§6.4).
    Sent { message: Message },
    Page {
        /// The other user's read watermark (§10.3).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        read: Option<Watermark>,
        /// The caller's own read position: the highest of their devices' (§10.3).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seen: Option<Watermark>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        newer: Option<Cursor>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        older: Option<Cursor>,
        /// The caller's own messages on this page that the recipient's server refused for
        /// good, with the reason (§6.6, §10.5).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        failed: Vec<Undeliverable>,
        messages: Vec<Message>,
        /// The other user's delivered watermark (§10.3).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delivered: Option<Watermark>,
    },
    /// `next` is the position to ask for next time (§6.5). `ephemeral` updates (§12, §13)
    /// come only on subscriptions and are never stored.
    Events {
        /// Present (true) when the server stopped before the end of the stream, by count
        /// or by frame size: ask again from `next` (§6.5).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
        next: u64,
        events: Vec<Event>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ephemeral: Vec<Ephemeral>,
    },
    Presence {
        user: UserId,
        online: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_seen: Option<u64>,
    },
    Devices { devices: Vec<DeviceInfo> },
    /// §6.12: the users the caller blocks, in id order.
    Blocked { users: Vec<UserId> },
    /// §6.13: the server's current key and its rotation chain, oldest first.
    Keys { current: String, rotations: Vec<crate::rotation::SignedRotation> },
    /// E3.1: how many one-time keys the server holds for the calling device, and whether
    /// it holds a fallback key.
    KeyCount { fallback: bool, one_time: u32 },
    /// E3.2: `user`'s devices with keys, in device id order.
    DeviceKeys { user: UserId, devices: Vec<crate::e2ee::DeviceKeys> },
    /// E3.3: one key per device asked for that has keys, in device id order.
    Claimed { keys: Vec<crate::e2ee::ClaimedKey> },
    /// §6.10: one page of the caller's conversations, most recently active first.
    Conversations {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        older: Option<Cursor>,
        conversations: Vec<ConversationSummary>,
    },
    Error { code: ErrorCode, message: String },
}

/// How a server lets new users in (§6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistrationPolicy {
    Closed,
    Open,
    Token,
}

/// Error codes (§7). Each names a cause the client can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid CBOR of a known request.
    BadFrame,
    /// The frame's length prefix exceeds the limit.
    FrameTooLarge,
    /// The frame's `v` is not a version this server speaks.
    UnsupportedVersion,
    /// Missing, unknown or revoked access token.
    Unauthorized,
    /// Wrong user or password.
    BadCredentials,
    /// The request is well formed but a field is out of range.
    InvalidRequest,
    /// The named user does not exist (or is not visible to the caller).
    UnknownUser,
    /// A user cannot send a message to themself.
    SelfMessage,
    /// The content body or type is over its limit.
    ContentTooLarge,
    /// Registration is closed, or the registration token is wrong.
    RegistrationClosed,
    /// The user id is taken.
    UserExists,
    /// The user lives on another server and this server cannot reach it.
    RemoteUnavailable,
    /// Too many attempts; try later.
    RateLimited,
    /// The server is shutting down; retry on a new connection.
    ShuttingDown,
    /// A server fault; nothing was changed.
    Internal,
}

impl ErrorCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::BadCredentials => "bad_credentials",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::SelfMessage => "self_message",
            ErrorCode::ContentTooLarge => "content_too_large",
            ErrorCode::RegistrationClosed => "registration_closed",
            ErrorCode::UserExists => "user_exists",
            ErrorCode::RemoteUnavailable => "remote_unavailable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A history position. Opaque to clients: they pass back what the server gave (§6.6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor(pub String);

/// A typed payload (§4.4). The server treats `body` as bytes and only checks its size.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Content {
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    #[serde(rename = "type")]
    pub kind: String,
}

/// Content type of plain UTF-8 text.
pub const CONTENT_TEXT: &str = "text";

impl Content {
    pub fn text(s: &str) -> Content {
        Content { body: s.as_bytes().to_vec(), kind: CONTENT_TEXT.to_owned() }
    }
    /// The body as text, if it is a `text` payload of valid UTF-8.
    pub fn as_text(&self) -> Option<&str> {
        (self.kind == CONTENT_TEXT).then(|| std::str::from_utf8(&self.body).ok()).flatten()
    }
}

/// A message as created by its origin (§4.1). Identity: (`conv`, `origin`, `seq`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub to: UserId,
    /// Origin's clock at acceptance, milliseconds since the Unix epoch (informational).
    pub ts: u64,
    /// `origin_seq`: 1, 2, 3, … per (conversation, origin), without gaps.
    pub seq: u64,
    pub conv: ConversationId,
    pub deps: Deps,
    pub from: UserId,
    pub origin: ServerName,
    pub content: Content,
}

impl Message {
    pub fn order_key(&self) -> OrderKey {
        OrderKey { rank: self.deps.rank(), origin: self.origin.clone(), seq: self.seq }
    }
}

/// One entry of a user's event stream (§6.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub pos: u64,
    pub event: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A message the user sent (from any of their devices) or received.
    Message(Message),
    /// A watermark of either user of one of the user's conversations moved (§10).
    Receipt(Receipt),
    /// The recipient's server refused one of the user's messages for good (§10.5).
    Undeliverable(Undeliverable),
    /// The devices of `user` (the caller, or someone they share a conversation with)
    /// changed: query their keys again (E5).
    Devices(crate::e2ee::DeviceListChange),
    /// A kind this version does not know (a later minor revision); skipped (§6.5).
    /// Encoded again, it is its name with no fields: `{NAME: {}}`.
    Unknown(String),
}

/// Decodes `{NAME: VALUE}`, turning a NAME this version does not know into `unknown(NAME)`
/// instead of an error, as §6.5 requires of clients; encodes `{NAME: VALUE}` (an unknown
/// kind as `{NAME: {}}`, so that whatever decodes can be encoded again).
macro_rules! tolerant_enum {
    ($t:ident { $($name:literal => $variant:ident($inner:ty)),+ $(,)? }) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                match self {
                    $($t::$variant(v) => m.serialize_entry($name, v)?,)+
                    $t::Unknown(name) => m.serialize_entry(name, &std::collections::BTreeMap::<String, ()>::new())?,
                }
                m.end()
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a map with one key naming the kind")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<$t, A::Error> {
                        use serde::de::Error;
                        let key: String = map.next_key()?.ok_or_else(|| A::Error::custom("empty map"))?;
                        let value = match key.as_str() {
                            $($name => $t::$variant(map.next_value::<$inner>()?),)+
                            _ => {
                                map.next_value::<serde::de::IgnoredAny>()?;
                                $t::Unknown(key)
                            }
                        };
                        if map.next_key::<serde::de::IgnoredAny>()?.is_some() {
                            return Err(A::Error::custom("more than one key"));
                        }
                        Ok(value)
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}

tolerant_enum!(EventKind {
    "message" => Message(Message),
    "receipt" => Receipt(Receipt),
    "undeliverable" => Undeliverable(Undeliverable),
    "devices" => Devices(crate::e2ee::DeviceListChange),
});
tolerant_enum!(Ephemeral { "presence" => Presence(PresenceUpdate), "typing" => Typing(TypingUpdate) });

/// Updates pushed to live subscriptions and never stored (§12, §13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ephemeral {
    Presence(PresenceUpdate),
    Typing(TypingUpdate),
    /// A kind this version does not know; skipped (§12.3). Encoded again: `{NAME: {}}`.
    Unknown(String),
}

/// `user` is online, or offline and last seen at `last_seen` (ms; absent when hidden) (§12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceUpdate {
    pub user: UserId,
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
}

/// `user` is typing to `peer` in `conv` until `until` (ms since the epoch) (§13).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypingUpdate {
    pub conv: ConversationId,
    pub peer: UserId,
    pub user: UserId,
    pub until: u64,
}

/// What a receipt says (§10.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    /// A device of `user` has stored the messages.
    Delivered,
    /// `user` has read them.
    Read,
}

/// A position in a conversation's canonical order, carried as the order key's bytes
/// (§4.6), so watermarks compare bytewise like the order itself (§10.1).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Watermark(pub OrderKey);

impl Serialize for Watermark {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.to_bytes())
    }
}

impl<'de> Deserialize<'de> for Watermark {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        OrderKey::from_bytes(&b).map(Watermark).ok_or_else(|| serde::de::Error::custom("not an order key (§4.6)"))
    }
}

/// `user` has `kind` everything up to `up_to` in the 1:1 conversation `conv` with `peer`
/// (§10.1). Monotonic: a receipt never moves a watermark backwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub conv: ConversationId,
    pub kind: ReceiptKind,
    pub peer: UserId,
    pub user: UserId,
    pub up_to: Watermark,
}

/// The recipient's server refused the message `origin`/`seq` of `conv` for good (§10.5):
/// its state is *failed*.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undeliverable {
    pub seq: u64,
    pub conv: ConversationId,
    pub origin: ServerName,
    /// The refusing server's unit result (`unknown_recipient`, …) or another snake_case code.
    pub reason: String,
}

/// One of the caller's conversations, as `conversations` lists it (§6.10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSummary {
    pub conv: ConversationId,
    /// The newest message in canonical order: the first one `history` would list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Message>,
    /// The other member.
    pub with: UserId,
    /// Messages from `with` after the caller's read position, counted up to
    /// [`crate::limits::CONVERSATIONS_UNREAD_CAP`].
    pub unread: u32,
    /// The other member's presence, present when the caller may see it (§12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceUpdate>,
    /// When the server last stored a message of the conversation (ms since the epoch, the
    /// server's clock).
    pub active_ms: u64,
}

/// One of the caller's devices (§11).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: DeviceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// True for the device making the request.
    pub current: bool,
    pub created_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use ciborium::cbor;

    #[test]
    fn unknown_event_and_ephemeral_kinds_are_skipped_not_fatal() {
        let frame = cbor!({
            "v" => 0,
            "res" => {"events" => {
                "next" => 9,
                "events" => [{"pos" => 9, "event" => {"reaction" => {"emoji" => "x", "nested" => [1, 2]}}}],
                "ephemeral" => [{"call_ringing" => {"who" => "@a:b"}}],
            }},
        })
        .unwrap();
        let f: ResponseFrame = codec::decode(&codec::encode(&frame)).unwrap();
        match f.res {
            Response::Events { next, events, ephemeral, .. } => {
                assert_eq!(next, 9);
                assert_eq!(events[0].event, EventKind::Unknown("reaction".into()));
                assert_eq!(ephemeral[0], Ephemeral::Unknown("call_ringing".into()));
                // What decodes encodes again, and decodes to the same thing.
                let again = crate::codec::encode(&Response::Events { more: false, next: 1, events: events.clone(), ephemeral: ephemeral.clone() });
                match crate::codec::decode::<Response>(&again).unwrap() {
                    Response::Events { events: e2, ephemeral: p2, .. } => assert_eq!((e2, p2), (events, ephemeral)),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        // Two keys in one kind map are still an error.
        let bad = cbor!({"message" => {}, "receipt" => {}}).unwrap();
        assert!(codec::decode::<EventKind>(&codec::encode(&bad)).is_err());
    }
}
