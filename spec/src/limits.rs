//! Size and count limits (spec §8). Every implementation enforces these; peers may rely on them.

/// Longest server name, in bytes (§2.1).
pub const MAX_SERVER_NAME_LEN: usize = 253;
/// Longest user localpart, in bytes (§2.2).
pub const MAX_LOCALPART_LEN: usize = 64;
/// Longest device id, in bytes (§2.3).
pub const MAX_DEVICE_ID_LEN: usize = 32;
/// Largest request frame body a client may send, in bytes (§5.2).
pub const MAX_REQUEST_FRAME: usize = 64 * 1024;
/// Largest response or event frame body a server may send, in bytes (§5.2).
pub const MAX_RESPONSE_FRAME: usize = 4 * 1024 * 1024;
/// Largest message content body, in bytes (§4.4).
pub const MAX_CONTENT_BODY: usize = 16 * 1024;
/// Longest content type name, in bytes (§4.4).
pub const MAX_CONTENT_TYPE_LEN: usize = 64;
/// Deepest CBOR nesting a decoder accepts (§5.2).
pub const MAX_CBOR_DEPTH: usize = 16;
/// History page size when the request names none, and the largest allowed (§6.6).
pub const HISTORY_DEFAULT_LIMIT: u32 = 50;
pub const HISTORY_MAX_LIMIT: u32 = 200;
/// Most users one account may block (§6.12).
pub const MAX_BLOCKED: usize = 10_000;
/// `conversations` page size when the request names none, and the largest allowed (§6.10).
pub const CONVERSATIONS_DEFAULT_LIMIT: u32 = 50;
pub const CONVERSATIONS_MAX_LIMIT: u32 = 100;
/// The highest `unread` count a server reports: it stops counting there (§6.10).
pub const CONVERSATIONS_UNREAD_CAP: u32 = 100;
/// Most events in one `events` response or subscription frame (§6.5).
pub const SYNC_MAX_EVENTS: u32 = 500;
/// Password length bounds, in bytes (§6.2).
pub const MIN_PASSWORD_LEN: usize = 8;
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Longest device display name, in bytes (§6.2).
pub const MAX_DEVICE_NAME_LEN: usize = 128;
/// Largest sequence number or position (2^53 - 1, exact in every JSON number, §4.2).
pub const MAX_SEQ: u64 = (1 << 53) - 1;
/// Most servers in one sequence vector (§4.3).
pub const MAX_DEPS: usize = 64;
