//! Stored records (CBOR), one type per column family value.

use missive_spec::{codec, ConversationId, Deps, DeviceId, Message, OrderKey, UserId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::StoreError;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    /// PHC string of the argon2id hash.
    pub password_hash: String,
    pub created_ms: u64,
    /// Set by the operator: no login, every device revoked, messages still stored.
    #[serde(default)]
    pub disabled: bool,
    /// When the operator removed the account. The record stays as a tombstone so that the
    /// id is never issued again (§6.2).
    #[serde(default)]
    pub removed_ms: Option<u64>,
}

impl UserRecord {
    /// Whether the account exists for everyone else: not removed.
    pub fn exists(&self) -> bool {
        self.removed_ms.is_none()
    }

    /// Whether its owner may log in.
    pub fn may_log_in(&self) -> bool {
        self.exists() && !self.disabled
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub name: Option<String>,
    pub created_ms: u64,
    #[serde(with = "serde_bytes_array")]
    pub token_hash: [u8; 32],
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub user: UserId,
    pub device: DeviceId,
}

/// Per-conversation state kept by this server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConvRecord {
    pub members: Vec<UserId>,
    /// Per origin, the highest `origin_seq` stored with no gap below it.
    pub heads: Deps,
    /// The members who have sent a message in it (§12): once both have, they share it.
    /// Records written before this field existed have none; their conversations were
    /// indexed as shared on the first message and stay so.
    #[serde(default)]
    pub senders: Vec<UserId>,
    /// When a message of it was last stored (ms, this server's clock): its place in each
    /// local member's `Active` index. 0 in records written before the index existed,
    /// until `Core::index_activity` has indexed them.
    #[serde(default)]
    pub active_ms: u64,
}

/// A device's entry in the key directory (e2ee.md E3.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub keys: missive_spec::e2ee::DeviceKeys,
    pub fallback: Option<missive_spec::e2ee::OneTimeKey>,
    /// The highest key id the device ever uploaded: later uploads must go above it, so a
    /// claimed key never comes back (E3.1).
    pub max_id: u64,
}

/// Where an idempotent send's message lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendIdRecord {
    pub conv: ConversationId,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
}

impl SendIdRecord {
    pub fn new(conv: ConversationId, key: &OrderKey) -> Self {
        SendIdRecord { conv, key: key.to_bytes() }
    }
}

/// Identity index entry: where the message sits and what its content hash is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MsgIdRecord {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes_array")]
    pub hash: [u8; 32],
}

/// A local user's presence facts that outlive a restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PresenceRecord {
    pub last_seen_ms: Option<u64>,
    #[serde(default)]
    pub hide_last_seen: bool,
}

/// A unit the destination refused for good.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub reason: String,
    pub unit: missive_spec::federation::SignedUnit,
}

/// The message inside a stored envelope (stored envelopes were verified on the way in).
pub fn stored_message(bytes: &[u8]) -> Result<Message, StoreError> {
    let env: missive_spec::federation::SignedUnit = decode("messages", bytes)?;
    match decode::<missive_spec::federation::Unit>("messages", &env.unit)? {
        missive_spec::federation::Unit::Message(m) => Ok(m),
        other => Err(StoreError::Corrupt { cf: "messages", reason: format!("not a message: {other:?}") }),
    }
}

/// A stored watermark (order key bytes).
pub fn watermark(cf: &'static str, bytes: &[u8]) -> Result<missive_spec::Watermark, StoreError> {
    OrderKey::from_bytes(bytes)
        .map(missive_spec::Watermark)
        .ok_or_else(|| StoreError::Corrupt { cf, reason: "not an order key".into() })
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v)
}

pub fn decode<T: DeserializeOwned>(cf: &'static str, b: &[u8]) -> Result<T, StoreError> {
    codec::decode(b).map_err(|e| StoreError::Corrupt { cf, reason: e.to_string() })
}

mod serde_bytes_array {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let v: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        v.into_vec().try_into().map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}
