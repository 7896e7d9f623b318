//! Telling peers this server is back (federation.md FED-SEND-9).
//!
//! While a server is down, its peers back off their retries toward it, up to the retry cap
//! (60 s by default), and would send what they queued only at their next attempt. A peer
//! starts again at once when this server connects to it (FED-SEND-5). So the server
//! remembers the servers it federated with, and connects to them when it starts.
//!
//! Only a server this one had an authenticated connection with is remembered (it
//! connected to us, or we to it): a name a client merely typed is not. Bounds: at most
//! [`KNOWN_PEERS`] names, in the order they were met; a name met again that sits in the
//! older half moves to the newest end, so that peers still in touch stay when many new
//! ones come (each of which must hold a key its name's discovery returns). At most
//! [`ANNOUNCE_CONCURRENCY`] connections are being made at once at a start. The list is one
//! `Cf::Meta` record, written when it changes by one task, which writes only the newest
//! list (changes that come while it writes are coalesced).

use std::sync::Arc;

use missive_spec::ServerName;
use tokio::sync::{watch, Semaphore};

use super::Federation;
use crate::store::{blocking, Cf};

/// The `Cf::Meta` key of the remembered peers.
const KNOWN_PEERS_KEY: &[u8] = b"known_peers";
/// Most peers remembered, and so connected to at a start.
pub const KNOWN_PEERS: usize = 1_000;
/// Connections being made at once while announcing.
pub const ANNOUNCE_CONCURRENCY: usize = 16;

pub(super) struct KnownPeers {
    /// The peers remembered, oldest first; `None` until read at start (and for the whole
    /// run if that read failed, so that a list that could not be read is never written
    /// over).
    list: std::sync::Mutex<Option<Vec<ServerName>>>,
    /// The newest encoded list not yet written.
    unwritten: watch::Sender<Option<Vec<u8>>>,
}

impl Default for KnownPeers {
    fn default() -> KnownPeers {
        KnownPeers { list: Default::default(), unwritten: watch::channel(None).0 }
    }
}

/// Notes that `name` was met: a new name is added (the oldest dropped beyond `cap`), and a
/// known one in the older half moves to the newest end. Whether the list changed.
fn remember_in(known: &mut Vec<ServerName>, name: &ServerName, cap: usize) -> bool {
    if let Some(i) = known.iter().position(|n| n == name) {
        if i >= known.len() / 2 {
            return false;
        }
        let n = known.remove(i);
        known.push(n);
        return true;
    }
    known.push(name.clone());
    if known.len() > cap {
        let excess = known.len() - cap;
        known.drain(..excess);
    }
    true
}

impl KnownPeers {
    /// Changes the list with `change`; if it changed, the writer task writes it.
    fn update(&self, change: impl FnOnce(&mut Vec<ServerName>) -> bool) {
        let mut guard = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let Some(known) = guard.as_mut() else { return };
        if change(known) {
            self.unwritten.send_replace(Some(missive_core::records::encode(&*known)));
        }
    }
}

impl Federation {
    /// Reads the remembered peers (before any connection in this run), and connects to
    /// each of them and to the peers the operator pinned, in the background.
    pub(super) async fn announce(self: &Arc<Self>) {
        let store = self.store.clone();
        let stored = match blocking(move || store.get(Cf::Meta, KNOWN_PEERS_KEY)).await.and_then(|r| r) {
            Ok(Some(v)) => match missive_core::records::decode::<Vec<ServerName>>("meta", &v) {
                Ok(list) => Some(list),
                Err(e) => {
                    tracing::warn!(error = %e, "the remembered peers do not decode; starting a new list");
                    Some(Vec::new())
                }
            },
            Ok(None) => Some(Vec::new()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the remembered peers; peers will resume at their next retry, and none are remembered in this run");
                None
            }
        };
        let mut names = stored.clone().unwrap_or_default();
        for name in self.discovery.static_names() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        if stored.is_some() {
            let (mut unwritten, sequencer) = (self.known.unwritten.subscribe(), self.sequencer.clone());
            tokio::spawn(async move {
                while unwritten.changed().await.is_ok() {
                    let Some(list) = unwritten.borrow_and_update().clone() else { continue };
                    if let Err(e) = sequencer.put_meta(KNOWN_PEERS_KEY.to_vec(), list).await {
                        tracing::warn!(error = %e.message, "cannot remember the peers for the next start");
                    }
                }
            });
        }
        *self.known.list.lock().unwrap_or_else(|e| e.into_inner()) = stored;
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

    /// A connection with `name` was authenticated: remember it for the next start.
    pub(super) fn remember(&self, name: &ServerName) {
        self.known.update(|known| remember_in(known, name, KNOWN_PEERS));
    }

    /// The operator removed `name`: it is not told at the next start.
    pub(super) fn unremember(&self, name: &ServerName) {
        self.known.update(|known| {
            let before = known.len();
            known.retain(|n| n != name);
            known.len() != before
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_each_name_once_keeps_those_met_again_and_drops_the_oldest() {
        let n = |s: &str| ServerName::parse(s).unwrap();
        let mut known = Vec::new();
        assert!(remember_in(&mut known, &n("a.test"), 3));
        assert!(!remember_in(&mut known, &n("a.test"), 3), "a name already known changes nothing");
        assert!(remember_in(&mut known, &n("b.test"), 3));
        assert!(remember_in(&mut known, &n("c.test"), 3));
        assert!(!remember_in(&mut known, &n("b.test"), 3), "a name in the newer half stays where it is");
        assert!(remember_in(&mut known, &n("a.test"), 3), "a name in the older half moves up");
        assert_eq!(known, vec![n("b.test"), n("c.test"), n("a.test")]);
        assert!(remember_in(&mut known, &n("d.test"), 3));
        assert_eq!(known, vec![n("c.test"), n("a.test"), n("d.test")], "the oldest goes beyond the bound");
    }
}
