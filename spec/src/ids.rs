//! Identifiers (spec §2): server names, user ids, device ids, conversation ids and
//! client message ids. Every type validates on parse; holding one means it is well formed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::limits;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("server name {0:?} is not a lowercase DNS name (§2.1)")]
    ServerName(String),
    #[error("server name {0:?} reads as an IPv4 address; a server name is a DNS name (§2.1)")]
    IpLiteral(String),
    #[error("user id {0:?} is not of the form @localpart:server.name (§2.2)")]
    UserId(String),
    #[error("user id {given:?} has capital letters; user ids are lower-case: {lower:?} (§2.2)")]
    UserIdCase { given: String, lower: String },
    #[error("device id {0:?} is not 1-32 characters of A-Z, a-z, 0-9, '-' or '_' (§2.3)")]
    DeviceId(String),
    #[error("expected {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
}

fn valid_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Whether URL parsers would read a name ending in `label` as an IPv4 address (the WHATWG
/// URL "ends in a number" rule): all digits (`127.0.0.1`, `127.1`, `2130706433`) or `0x`
/// and hex digits (`0x7f000001`).
fn reads_as_ipv4(last_label: &str) -> bool {
    let hex = last_label.strip_prefix("0x").is_some_and(|h| h.bytes().all(|c| c.is_ascii_hexdigit()));
    hex || last_label.bytes().all(|c| c.is_ascii_digit())
}

/// A homeserver's name: a lowercase DNS name such as `alpha.example` (§2.1), never an IP
/// address in any spelling. IPv6 literals cannot pass the label grammar (`:` and `[`);
/// IPv4 ones are refused by their last label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerName(String);

impl ServerName {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() > limits::MAX_SERVER_NAME_LEN || !s.split('.').all(valid_label) {
            return Err(IdError::ServerName(s.to_owned()));
        }
        if s.rsplit('.').next().is_some_and(reads_as_ipv4) {
            return Err(IdError::IpLiteral(s.to_owned()));
        }
        Ok(ServerName(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_localpart(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= limits::MAX_LOCALPART_LEN
        && s.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'=' | b'-')
        })
}

/// A user: `@localpart:server.name` (§2.2). Only the named server answers for the user.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserId {
    full: String,
    colon: usize,
}

impl UserId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let err = || IdError::UserId(s.to_owned());
        let rest = s.strip_prefix('@').ok_or_else(err)?;
        let colon = rest.find(':').ok_or_else(err)?;
        let (local, server) = (&rest[..colon], &rest[colon + 1..]);
        if !valid_localpart(local) || ServerName::parse(server).is_err() {
            let lower = s.to_ascii_lowercase();
            if lower != s && UserId::parse(&lower).is_ok() {
                return Err(IdError::UserIdCase { given: s.to_owned(), lower });
            }
            return Err(err());
        }
        Ok(UserId { full: s.to_owned(), colon: colon + 1 })
    }
    /// Builds `@localpart:server`, validating the localpart.
    pub fn new(localpart: &str, server: &ServerName) -> Result<Self, IdError> {
        UserId::parse(&format!("@{localpart}:{}", server.as_str()))
    }
    pub fn localpart(&self) -> &str {
        &self.full[1..self.colon]
    }
    pub fn server_name(&self) -> ServerName {
        ServerName(self.full[self.colon + 1..].to_owned())
    }
    pub fn is_on(&self, server: &ServerName) -> bool {
        &self.full[self.colon + 1..] == server.as_str()
    }
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

/// A device, assigned by the homeserver at login (§2.3).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= limits::MAX_DEVICE_ID_LEN
            && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
        if ok {
            Ok(DeviceId(s.to_owned()))
        } else {
            Err(IdError::DeviceId(s.to_owned()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_id {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $t::parse(s)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $t::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}
string_id!(ServerName);
string_id!(UserId);
string_id!(DeviceId);

macro_rules! byte_id {
    ($(#[$doc:meta])* $t:ident, $n:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $t(pub [u8; $n]);

        impl $t {
            pub const LEN: usize = $n;
            pub fn from_slice(b: &[u8]) -> Result<Self, IdError> {
                let arr: [u8; $n] =
                    b.try_into().map_err(|_| IdError::Length { expected: $n, got: b.len() })?;
                Ok($t(arr))
            }
            pub fn as_bytes(&self) -> &[u8; $n] {
                &self.0
            }
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($t), self.to_hex())
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "a byte string of length {}", $n)
                    }
                    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<$t, E> {
                        $t::from_slice(v).map_err(E::custom)
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    };
}

byte_id!(
    /// A 1:1 conversation: SHA-256 over a domain-separation prefix and the two user ids in
    /// bytewise order (§3). Both homeservers compute it without asking each other.
    ConversationId,
    32
);
byte_id!(
    /// Chosen at random by the sending client; a retry carries the same id (§6.4).
    ClientMsgId,
    16
);

/// Domain-separation prefix of conversation ids (§3).
pub const CONVERSATION_ID_DOMAIN: &[u8] = b"missive/conversation/v1\0";

impl ConversationId {
    /// The id of the 1:1 conversation between `a` and `b`, in either argument order.
    pub fn one_to_one(a: &UserId, b: &UserId) -> ConversationId {
        let (lo, hi) = if a.as_str().as_bytes() <= b.as_str().as_bytes() { (a, b) } else { (b, a) };
        let mut h = Sha256::new();
        h.update(CONVERSATION_ID_DOMAIN);
        h.update(lo.as_str().as_bytes());
        h.update([0u8]);
        h.update(hi.as_str().as_bytes());
        ConversationId(h.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn server_names() {
        for ok in ["alpha.example", "a", "x-1.y", "127-0-0-1.test", "1.example", "10.0.0.1.nip-io", "0xg", "x0.1a", "0x1-2"] {
            ServerName::parse(ok).unwrap();
        }
        for bad in ["", "Alpha.example", "a..b", "-a.b", "a-.b", "a.b.", "a_b", "a:1", &"a".repeat(64), "::1", "[::1]", "fe80::1"] {
            assert!(matches!(ServerName::parse(bad), Err(IdError::ServerName(_))), "{bad:?} accepted");
        }
    }

    #[test]
    fn ip_literals_are_not_server_names() {
        // Every spelling a URL parser reads as IPv4: dotted, shortened, one number, octal, hex.
        for ip in ["127.0.0.1", "127.0.0.31", "10.1", "127.1", "2130706433", "0177.0.0.1", "0x7f000001", "0x7f.1", "a.0x", "example.123", "1"] {
            assert_eq!(ServerName::parse(ip), Err(IdError::IpLiteral(ip.to_owned())), "{ip:?}");
        }
        assert!(UserId::parse("@x:127.0.0.31").is_err());
    }

    #[test]
    fn user_ids() {
        let u = UserId::parse("@alice:alpha.example").unwrap();
        assert_eq!(u.localpart(), "alice");
        assert_eq!(u.server_name().as_str(), "alpha.example");
        assert!(u.is_on(&ServerName::parse("alpha.example").unwrap()));
        for bad in ["alice:alpha", "@:alpha", "@Alice:alpha", "@al ice:alpha", "@alice", "@alice:", "@a:b:c"] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn capitals_in_user_ids_are_named() {
        for (given, lower) in [("@Bob:alpha.example", "@bob:alpha.example"), ("@bob:Alpha.Example", "@bob:alpha.example")] {
            let e = UserId::parse(given).unwrap_err();
            assert_eq!(e, IdError::UserIdCase { given: given.into(), lower: lower.into() });
            assert!(e.to_string().contains("lower-case"), "{e}");
        }
        // Capitals that are not the only fault keep the general error.
        assert_eq!(UserId::parse("@B ob:alpha.example"), Err(IdError::UserId("@B ob:alpha.example".into())));
    }

    #[test]
    fn conversation_id_is_symmetric() {
        let a = UserId::parse("@alice:alpha.example").unwrap();
        let b = UserId::parse("@bob:beta.example").unwrap();
        assert_eq!(ConversationId::one_to_one(&a, &b), ConversationId::one_to_one(&b, &a));
        let c = UserId::parse("@carol:beta.example").unwrap();
        assert_ne!(ConversationId::one_to_one(&a, &b), ConversationId::one_to_one(&a, &c));
    }

    proptest! {
        #[test]
        fn user_id_roundtrip(local in "[a-z0-9._=-]{1,20}", server in "[a-z]{1,10}(\\.[a-z][a-z0-9]{0,9}){0,3}") {
            let s = format!("@{local}:{server}");
            let u = UserId::parse(&s).unwrap();
            prop_assert_eq!(u.as_str(), s.as_str());
            prop_assert_eq!(u.localpart(), local.as_str());
        }
    }
}
