//! The Missive protocol, as code: what every implementation must agree on byte for byte.
//!
//! - [`ids`]: validated identifiers ([`ServerName`], [`UserId`], [`DeviceId`],
//!   [`ConversationId`], [`ClientMsgId`]) — spec §2, §3.
//! - [`ordering`]: sequence vectors ([`Deps`]) and the canonical order ([`OrderKey`]) — §4.
//! - [`wire`]: every client-protocol frame ([`RequestFrame`], [`ResponseFrame`],
//!   [`Message`], [`Event`]) — §5, §6, with error codes ([`ErrorCode`]) — §7.
//! - [`codec`]: deterministic CBOR and length-prefixed framing with bounded decoding — §5.2.
//! - [`limits`]: every size limit — §8.
//! - [`requirements`]: the spec's requirement ids (`[C2S-SEND-3]`) and their text.
//! - [`federation`]: server-to-server frames: signed units, transactions, backfill —
//!   `federation.md`.
//!
//! The normative text is `spec/*.md` beside this crate; `spec/vectors/` holds test vectors
//! that this crate's tests check byte for byte. Nothing here does I/O.

pub mod codec;
pub mod diag;
pub mod e2ee;
pub mod federation;
pub mod ids;
pub mod limits;
pub mod ordering;
pub mod requirements;
pub mod rotation;
pub mod wire;

pub use ids::{ClientMsgId, ConversationId, DeviceId, IdError, ServerName, UserId};
pub use ordering::{Deps, OrderKey};
pub use wire::{
    Content, ConversationSummary, Cursor, DeviceInfo, Ephemeral, ErrorCode, Event, EventKind, Message, PresenceUpdate, Receipt, ReceiptKind,
    RegistrationPolicy, Request, RequestFrame, Response, ResponseFrame, TypingUpdate, Undeliverable, Watermark, PROTOCOL_VERSION,
};
