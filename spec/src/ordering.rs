//! Sequence vectors and the canonical order (spec §4).
//!
//! A message's `deps` vector holds, for every homeserver of its conversation, the highest
//! `origin_seq` of that server's messages that the origin had stored when it accepted the
//! message; the origin's own entry is the message's own `origin_seq`. The canonical order
//! sorts by `rank = sum(deps)`, then by origin server name (bytewise), then by `origin_seq`.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::ServerName;
use crate::limits;

/// A sequence vector: server name to highest `origin_seq` seen. Zero entries are never
/// stored, so each vector has exactly one encoding (§4.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deps(BTreeMap<ServerName, u64>);

impl Deps {
    pub fn new() -> Self {
        Deps::default()
    }
    pub fn get(&self, server: &ServerName) -> u64 {
        self.0.get(server).copied().unwrap_or(0)
    }
    /// Sets `server`'s entry; zero removes it.
    pub fn set(&mut self, server: ServerName, seq: u64) {
        if seq == 0 {
            self.0.remove(&server);
        } else {
            self.0.insert(server, seq);
        }
    }
    /// `sum(deps)`, the first key of the canonical order.
    pub fn rank(&self) -> u64 {
        self.0.values().fold(0u64, |a, b| a.saturating_add(*b))
    }
    pub fn iter(&self) -> impl Iterator<Item = (&ServerName, u64)> {
        self.0.iter().map(|(k, v)| (k, *v))
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Deterministic CBOR orders map keys by their encoded bytes: shorter text first, then
/// bytewise (RFC 8949 §4.2.1). `BTreeMap` orders bytewise only, so sort here.
impl Serialize for Deps {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut entries: Vec<_> = self.0.iter().collect();
        entries.sort_by(|a, b| {
            (a.0.as_str().len(), a.0.as_str()).cmp(&(b.0.as_str().len(), b.0.as_str()))
        });
        let mut m = s.serialize_map(Some(entries.len()))?;
        for (k, v) in entries {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Deps {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Deps;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of server name to sequence number")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Deps, A::Error> {
                use serde::de::Error;
                let mut out = BTreeMap::new();
                while let Some((k, v)) = a.next_entry::<ServerName, u64>()? {
                    if v == 0 || v > limits::MAX_SEQ {
                        return Err(A::Error::custom("deps entry out of range (§4.3)"));
                    }
                    if out.insert(k, v).is_some() {
                        return Err(A::Error::custom("duplicate server in deps (§4.3)"));
                    }
                    if out.len() > limits::MAX_DEPS {
                        return Err(A::Error::custom("too many servers in deps (§4.3)"));
                    }
                }
                Ok(Deps(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A message's place in the canonical order of its conversation (§4.5).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrderKey {
    pub rank: u64,
    pub origin: ServerName,
    pub seq: u64,
}

impl OrderKey {
    /// Bytes that sort like the key: `rank` (8 bytes big-endian), the origin's name, a zero
    /// byte (names never contain one, so a shorter name sorts first), `seq` (8 bytes BE).
    pub fn to_bytes(&self) -> Vec<u8> {
        let name = self.origin.as_str().as_bytes();
        let mut out = Vec::with_capacity(17 + name.len());
        out.extend_from_slice(&self.rank.to_be_bytes());
        out.extend_from_slice(name);
        out.push(0);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out
    }

    pub fn from_bytes(b: &[u8]) -> Option<OrderKey> {
        if b.len() < 18 {
            return None;
        }
        let rank = u64::from_be_bytes(b[..8].try_into().ok()?);
        let seq = u64::from_be_bytes(b[b.len() - 8..].try_into().ok()?);
        let name = &b[8..b.len() - 8];
        let (&zero, name) = name.split_last()?;
        if zero != 0 {
            return None;
        }
        let origin = ServerName::parse(std::str::from_utf8(name).ok()?).ok()?;
        Some(OrderKey { rank, origin, seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(s: &str) -> ServerName {
        ServerName::parse(s).unwrap()
    }

    #[test]
    fn shorter_name_sorts_first_in_bytes_too() {
        let a = OrderKey { rank: 5, origin: name("ab"), seq: 9 };
        let b = OrderKey { rank: 5, origin: name("abc"), seq: 1 };
        assert!(a < b);
        assert!(a.to_bytes() < b.to_bytes());
    }

    proptest! {
        #[test]
        fn key_bytes_sort_like_keys(
            r1 in 0u64..1000, r2 in 0u64..1000,
            n1 in "[a-c]{1,4}", n2 in "[a-c]{1,4}",
            s1 in 0u64..1000, s2 in 0u64..1000,
        ) {
            let a = OrderKey { rank: r1, origin: name(&n1), seq: s1 };
            let b = OrderKey { rank: r2, origin: name(&n2), seq: s2 };
            prop_assert_eq!(a.cmp(&b), a.to_bytes().cmp(&b.to_bytes()));
            prop_assert_eq!(OrderKey::from_bytes(&a.to_bytes()), Some(a));
        }
    }
}
