//! The `[limits]` a running server enforces. Most can change while it runs: SIGHUP
//! re-reads the config and [`LiveLimits::apply`] takes the new values; those that size
//! pools or buffers made at start-up (hashing threads, request byte budgets, discovery)
//! wait for a restart, and the reload says so.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use crate::config::LimitsSection;

pub struct LiveLimits {
    read_timeout_ms: AtomicU64,
    requests_per_second: AtomicU32,
    held_per_conversation: AtomicU64,
    held_per_peer: AtomicU64,
    held_release_batch: AtomicUsize,
    remote_presence_users: AtomicUsize,
    federation_connections: AtomicUsize,
    federation_connections_per_address: AtomicUsize,
}

impl LiveLimits {
    pub fn new(l: &LimitsSection) -> LiveLimits {
        LiveLimits {
            read_timeout_ms: AtomicU64::new(l.request_read_timeout_ms),
            requests_per_second: AtomicU32::new(l.federation_requests_per_second),
            held_per_conversation: AtomicU64::new(l.held_per_conversation),
            held_per_peer: AtomicU64::new(l.held_per_peer),
            held_release_batch: AtomicUsize::new(l.held_release_batch),
            remote_presence_users: AtomicUsize::new(l.remote_presence_users),
            federation_connections: AtomicUsize::new(l.federation_connections),
            federation_connections_per_address: AtomicUsize::new(l.federation_connections_per_address),
        }
    }

    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms.load(Relaxed))
    }
    pub fn requests_per_second(&self) -> u32 {
        self.requests_per_second.load(Relaxed)
    }
    pub fn held_per_conversation(&self) -> u64 {
        self.held_per_conversation.load(Relaxed)
    }
    pub fn held_per_peer(&self) -> u64 {
        self.held_per_peer.load(Relaxed)
    }
    pub fn held_release_batch(&self) -> usize {
        self.held_release_batch.load(Relaxed)
    }
    pub fn remote_presence_users(&self) -> usize {
        self.remote_presence_users.load(Relaxed)
    }
    pub fn federation_connections(&self) -> (usize, usize) {
        (self.federation_connections.load(Relaxed), self.federation_connections_per_address.load(Relaxed))
    }

    /// Takes the new values that apply at once. Returns the names of the settings that
    /// changed and now apply, and of those that changed but need a restart.
    pub fn apply(&self, old: &LimitsSection, new: &LimitsSection) -> (Vec<&'static str>, Vec<&'static str>) {
        let (mut applied, mut restart) = (Vec::new(), Vec::new());
        macro_rules! live {
            ($field:ident) => {
                if old.$field != new.$field {
                    self.$field.store(new.$field, Relaxed);
                    applied.push(stringify!($field));
                }
            };
            ($field:ident => $atomic:ident) => {
                if old.$field != new.$field {
                    self.$atomic.store(new.$field, Relaxed);
                    applied.push(stringify!($field));
                }
            };
        }
        macro_rules! at_restart {
            ($field:ident) => {
                if old.$field != new.$field {
                    restart.push(stringify!($field));
                }
            };
        }
        live!(request_read_timeout_ms => read_timeout_ms);
        live!(federation_requests_per_second => requests_per_second);
        live!(held_per_conversation);
        live!(held_per_peer);
        live!(held_release_batch);
        live!(remote_presence_users);
        live!(federation_connections);
        live!(federation_connections_per_address);
        at_restart!(client_request_bytes);
        at_restart!(federation_request_bytes);
        at_restart!(password_hashes);
        at_restart!(federation_handshakes);
        at_restart!(discovery_lookups);
        at_restart!(discovery_cache_names);
        at_restart!(key_document_bytes);
        (applied, restart)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_takes_live_values_and_names_the_rest() {
        let old = LimitsSection::default();
        let live = LiveLimits::new(&old);
        let new = LimitsSection { held_per_conversation: 7, federation_requests_per_second: 3, password_hashes: 9, ..old.clone() };
        let (applied, restart) = live.apply(&old, &new);
        assert_eq!(applied, vec!["federation_requests_per_second", "held_per_conversation"]);
        assert_eq!(restart, vec!["password_hashes"]);
        assert_eq!((live.held_per_conversation(), live.requests_per_second()), (7, 3));
        assert_eq!(live.apply(&new, &new), (vec![], vec![]));
    }
}
