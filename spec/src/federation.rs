//! Server-to-server frames (spec `federation.md`): signed units, transactions, per-unit
//! results and gap-fill requests.
//!
//! Field declaration order is deterministic-CBOR key order, as in `wire`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::ConversationId;
use crate::wire::Message;

/// ALPN of federation links (F§3).
pub const FEDERATION_ALPN: &[u8] = b"missive-federation/0";
/// Prefix of the bytes a unit signature covers (F§4).
pub const UNIT_SIGNATURE_DOMAIN: &[u8] = b"missive/unit/v1\0";
/// Prefix of the bytes a transaction id hashes (F§5).
pub const TXN_ID_DOMAIN: &[u8] = b"missive/txn/v1\0";
/// Most units in one transaction (F§8).
pub const MAX_TXN_UNITS: usize = 100;
/// Largest federation frame body, in bytes (F§8).
pub const MAX_FEDERATION_FRAME: usize = 4 * 1024 * 1024;
/// Most messages one backfill request may ask for (F§7).
pub const MAX_BACKFILL: u64 = 100;

/// A unit as signed by its origin: the signature covers `UNIT_SIGNATURE_DOMAIN || unit`,
/// where `unit` is exactly the bytes carried here (F§4). Receivers verify before decoding
/// and store these bytes unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SignedUnit {
    /// Id of the origin's signing key (F§2).
    pub key: String,
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub unit: Vec<u8>,
}

impl SignedUnit {
    /// SHA-256 of the envelope's deterministic encoding: the unit's content hash.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(crate::codec::encode(self)).into()
    }
    /// The bytes the signature covers.
    pub fn signed_bytes(unit: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(UNIT_SIGNATURE_DOMAIN.len() + unit.len());
        b.extend_from_slice(UNIT_SIGNATURE_DOMAIN);
        b.extend_from_slice(unit);
        b
    }
}

/// What a unit carries (F§4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Message(Message),
    /// A watermark of a user of the origin (F§10).
    Receipt(crate::wire::Receipt),
    /// A user of the origin changed their devices or device keys (e2ee.md E5).
    Devices(crate::e2ee::DeviceListChange),
}

/// A transaction id: SHA-256 over the domain prefix and the content hash of each unit in
/// order, so a retry of the same units has the same id (F§5).
pub fn txn_id(units: &[SignedUnit]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TXN_ID_DOMAIN);
    for u in units {
        h.update(u.hash());
    }
    h.finalize().into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FedRequestFrame {
    pub v: u16,
    pub req: FedRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FedResponseFrame {
    pub v: u16,
    pub res: FedResponse,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FedRequest {
    /// F§5: deliver units; answered per unit.
    Txn {
        #[serde(with = "serde_bytes")]
        id: Vec<u8>,
        units: Vec<SignedUnit>,
    },
    /// F§7: send again the asked server's own messages `first..=last` of `conv`.
    Backfill { conv: ConversationId, last: u64, first: u64 },
    /// F§12.1: what the asked server stores of the asker's units and of its own, per
    /// conversation with a member on the asker, after `after` in id order.
    HighWater {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<ConversationId>,
    },
    /// F§12.2: send back the *asker's* own messages `first..=last` of `conv`, as stored.
    Reclaim { conv: ConversationId, last: u64, first: u64 },
    /// F§2.7: the asked server's current key and rotation chain.
    Keys {},
    /// E3.2: the device keys of a user of the asked server.
    KeysQuery { user: crate::ids::UserId },
    /// E3.3: one one-time key (or the fallback key) of each of `devices` of a user of the
    /// asked server.
    KeysClaim { user: crate::ids::UserId, devices: Vec<crate::ids::DeviceId> },
    /// F§11: ephemeral updates about users of the sending server, coalesced; not stored,
    /// not signed (the link authenticates the sender).
    Edu {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        typing: Vec<crate::wire::TypingUpdate>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        presence: Vec<crate::wire::PresenceUpdate>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FedResponse {
    /// One result per unit, in the order of the transaction.
    TxnResult {
        #[serde(with = "serde_bytes")]
        id: Vec<u8>,
        results: Vec<UnitResult>,
    },
    /// The units a backfill or reclaim asked for, in `origin_seq` order.
    Units { units: Vec<SignedUnit> },
    /// F§2.7: the current key and the rotation chain, oldest first.
    Keys { current: String, rotations: Vec<crate::rotation::SignedRotation> },
    /// F§12.1: one entry per conversation; `next` when more conversations remain.
    HighWater {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<ConversationId>,
        convs: Vec<HighWaterMark>,
    },
    /// E3.2: a user's devices with keys, in device id order.
    DeviceKeys { user: crate::ids::UserId, devices: Vec<crate::e2ee::DeviceKeys> },
    /// E3.3: one key per device asked for that has keys.
    Claimed { keys: Vec<crate::e2ee::ClaimedKey> },
    Ok {},
    Error { code: FedErrorCode, message: String },
}

/// What a server stores of one conversation's units (F§12.1): the highest `seq` with none
/// missing below, of its own units (`mine`) and of the asking server's (`yours`). Fields
/// in canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HighWaterMark {
    pub conv: ConversationId,
    pub mine: u64,
    pub yours: u64,
}

/// Most stored conversations one `high_water` request looks at (F§12.1).
pub const HIGH_WATER_SCAN: usize = 1000;

/// The receiver's answer for one unit (F§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitResult {
    /// Stored now.
    Accepted,
    /// Already stored with the same content; nothing changed.
    Duplicate,
    /// Stored durably but held behind a gap; the receiver asks for the missing range.
    Held,
    /// The envelope's key id is not a key of the sending server.
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// Not a well-formed unit.
    BadUnit,
    /// The unit's origin or sender is not the authenticated peer's.
    WrongOrigin,
    /// The recipient is not a user of this server.
    UnknownRecipient,
    /// The conversation id does not match the two users.
    ConvMismatch,
    /// The same identity was seen with different content.
    Equivocation,
    /// A field is out of range (content size, vector entries).
    InvalidUnit,
    /// A transient fault at the receiver: keep the unit and retry.
    Retry,
}

impl UnitResult {
    /// True when the sender may drop the unit from its queue: it is delivered.
    pub fn delivered(self) -> bool {
        matches!(self, UnitResult::Accepted | UnitResult::Duplicate | UnitResult::Held)
    }
    /// True when retrying can never succeed.
    pub fn permanent(self) -> bool {
        !self.delivered() && self != UnitResult::Retry
    }
    /// The result as it is encoded (F6.2): `unknown_recipient`, …
    pub fn code(self) -> &'static str {
        match self {
            UnitResult::Accepted => "accepted",
            UnitResult::Duplicate => "duplicate",
            UnitResult::Held => "held",
            UnitResult::UnknownKey => "unknown_key",
            UnitResult::BadSignature => "bad_signature",
            UnitResult::BadUnit => "bad_unit",
            UnitResult::WrongOrigin => "wrong_origin",
            UnitResult::UnknownRecipient => "unknown_recipient",
            UnitResult::ConvMismatch => "conv_mismatch",
            UnitResult::Equivocation => "equivocation",
            UnitResult::InvalidUnit => "invalid_unit",
            UnitResult::Retry => "retry",
        }
    }
}

/// Errors of a whole federation request (F§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FedErrorCode {
    BadFrame,
    FrameTooLarge,
    UnsupportedVersion,
    /// The transaction id does not match its units.
    BadTxnId,
    /// Too many units, or a backfill range too long.
    TooMany,
    /// The peer is not part of the conversation it asks about.
    Forbidden,
    /// The peer made more requests than the receiver's per-peer rate allows (F8).
    RateLimited,
    ShuttingDown,
    Internal,
}
