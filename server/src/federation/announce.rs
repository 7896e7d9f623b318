//! Telling peers this server is back (federation.md FED-SEND-9).
//!
//! While a server is down, its peers back off their retries toward it, up to the retry cap
//! (60 s by default), and would send what they queued only at their next attempt. A peer
//! starts again at once when this server connects to it (FED-SEND-5). So the server
//! remembers whom it federated with, and connects to them when it starts.
//!
//! Bounds: at most [`KNOWN_PEERS`] names are remembered (the most recently first seen; a
//! stranger that authenticates under many names pushes out only older names), and at most
//! [`ANNOUNCE_CONCURRENCY`] connections are being made at once. The list is one
//! `Cf::Meta` record, rewritten when a server is seen for the first time in a run.

use std::sync::Arc;

use missive_spec::ServerName;
use tokio::sync::Semaphore;

use super::Federation;
use crate::store::{blocking, Cf};

/// The `Cf::Meta` key of the remembered peers.
const KNOWN_PEERS_KEY: &[u8] = b"known_peers";
/// Most peers remembered, and so connected to at a start.
pub const KNOWN_PEERS: usize = 1_000;
/// Connections being made at once while announcing.
pub const ANNOUNCE_CONCURRENCY: usize = 16;

/// The peers remembered in this run, oldest first.
#[derive(Default)]
pub(super) struct KnownPeers(tokio::sync::Mutex<Vec<ServerName>>);

/// Adds `name` (if new) to `known`, dropping the oldest beyond `cap`; whether it changed.
fn remember_in(known: &mut Vec<ServerName>, name: &ServerName, cap: usize) -> bool {
    if known.contains(name) {
        return false;
    }
    known.push(name.clone());
    if known.len() > cap {
        let excess = known.len() - cap;
        known.drain(..excess);
    }
    true
}

impl Federation {
    /// Reads the remembered peers (before any peer is created in this run, or the list
    /// would start afresh), and connects to each of them and to the peers the operator
    /// pinned, in the background.
    pub(super) async fn announce(self: &Arc<Self>) {
        let store = self.store.clone();
        let stored = match blocking(move || store.get(Cf::Meta, KNOWN_PEERS_KEY)).await.and_then(|r| r) {
            Ok(Some(v)) => missive_core::records::decode::<Vec<ServerName>>("meta", &v).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the remembered peers do not decode; starting a new list");
                Vec::new()
            }),
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the remembered peers; peers will resume at their next retry");
                Vec::new()
            }
        };
        let mut names = stored.clone();
        for name in self.discovery.static_names() {
            remember_in(&mut names, &name, usize::MAX);
        }
        *self.known.0.lock().await = stored;
        names.retain(|n| *n != self.server && self.policy.allows(n));
        if names.is_empty() {
            return;
        }
        tracing::info!(peers = names.len(), "telling peers this server is back");
        let me = self.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(ANNOUNCE_CONCURRENCY));
            for name in names {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let me = me.clone();
                tokio::spawn(async move {
                    let peer = me.peer(&name);
                    if let Err(e) = me.connection(&peer).await {
                        tracing::debug!(peer = %name, error = %e, "could not tell a peer this server is back");
                    }
                    drop(slot);
                });
            }
        });
    }

    /// Remembers `name` for the next start, if it is new.
    pub(super) fn remember(self: &Arc<Self>, name: &ServerName) {
        let (me, name) = (self.clone(), name.clone());
        tokio::spawn(async move {
            let mut known = me.known.0.lock().await;
            if !remember_in(&mut known, &name, KNOWN_PEERS) {
                return;
            }
            // Held across the write, so that lists reach the store in the order they grew.
            if let Err(e) = me.sequencer.put_meta(KNOWN_PEERS_KEY.to_vec(), missive_core::records::encode(&*known)).await {
                tracing::warn!(error = %e.message, "cannot remember a peer for the next start");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_each_name_once_and_only_the_newest() {
        let n = |s: &str| ServerName::parse(s).unwrap();
        let mut known = Vec::new();
        assert!(remember_in(&mut known, &n("a.test"), 2));
        assert!(!remember_in(&mut known, &n("a.test"), 2), "a name already known changes nothing");
        assert!(remember_in(&mut known, &n("b.test"), 2));
        assert!(remember_in(&mut known, &n("c.test"), 2));
        assert_eq!(known, vec![n("b.test"), n("c.test")], "the oldest goes beyond the bound");
    }
}
