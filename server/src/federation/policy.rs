//! Which servers this one federates with: `[federation] allow` and `deny` in the config,
//! replaced on reload (federation.md F3.5).

use std::collections::HashSet;
use std::sync::RwLock;

use missive_spec::ServerName;

use crate::config::FederationSection;

/// The QUIC application close code for a server refused by policy (F3.5).
pub const REFUSED_CLOSE_CODE: u32 = 3;
/// The close reason sent with [`REFUSED_CLOSE_CODE`].
pub const REFUSED_REASON: &[u8] = b"federation_refused";

#[derive(Debug, Default)]
struct Lists {
    /// `None`: every server not denied.
    allow: Option<HashSet<ServerName>>,
    deny: HashSet<ServerName>,
}

/// The allow and deny lists in effect.
#[derive(Debug, Default)]
pub struct FederationPolicy {
    lists: RwLock<Lists>,
}

impl FederationPolicy {
    pub fn new(f: &FederationSection) -> FederationPolicy {
        let p = FederationPolicy::default();
        p.set(f);
        p
    }

    /// Puts the lists of `f` into effect.
    pub fn set(&self, f: &FederationSection) {
        let lists = Lists { allow: f.allow.as_ref().map(|a| a.iter().cloned().collect()), deny: f.deny.iter().cloned().collect() };
        *self.lists.write().unwrap_or_else(|e| e.into_inner()) = lists;
    }

    /// Whether this server exchanges anything with `name`: not denied, and allowed when
    /// there is an allow list.
    pub fn allows(&self, name: &ServerName) -> bool {
        let l = self.lists.read().unwrap_or_else(|e| e.into_inner());
        !l.deny.contains(name) && l.allow.as_ref().is_none_or(|a| a.contains(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> FederationSection {
        crate::config::Config::parse(&format!("server_name = \"a.test\"\n[federation]\n{text}"), std::path::Path::new("/srv"))
            .unwrap()
            .federation
    }

    #[test]
    fn deny_wins_and_an_allow_list_admits_only_its_names() {
        let (b, c) = (ServerName::parse("b.test").unwrap(), ServerName::parse("c.test").unwrap());
        let p = FederationPolicy::new(&section(""));
        assert!(p.allows(&b) && p.allows(&c), "no lists: everyone");
        p.set(&section("deny = [\"b.test\"]"));
        assert!(!p.allows(&b) && p.allows(&c));
        p.set(&section("allow = [\"b.test\", \"c.test\"]\ndeny = [\"b.test\"]"));
        assert!(!p.allows(&b) && p.allows(&c), "deny wins over allow");
        p.set(&section("allow = []"));
        assert!(!p.allows(&b) && !p.allows(&c), "an empty allow list: nobody");
    }
}
