//! Live wake-ups for subscriptions. Per local user: a watch channel carrying the head of
//! their event stream (subscribers read the events from the store, so a slow subscriber
//! can never miss one), and a broadcast channel of ephemeral updates (presence, typing),
//! which are never stored and may be dropped for a subscriber that lags.

use std::collections::HashMap;
use std::sync::Mutex;

use missive_spec::Ephemeral;
use tokio::sync::{broadcast, watch};

/// Ephemeral updates a lagging subscriber may have queued before older ones are dropped.
const EPHEMERAL_BACKLOG: usize = 64;

#[derive(Default)]
pub struct Hub {
    heads: Mutex<HashMap<String, watch::Sender<u64>>>,
    ephemeral: Mutex<HashMap<String, broadcast::Sender<Ephemeral>>>,
    /// Counts [`Hub::wake`]s, of any user: a subscription that sees it moved reads its
    /// user's block list again (cheap to miss nothing, as blocks change rarely).
    wakes: std::sync::atomic::AtomicU64,
}

impl Hub {
    pub fn subscribe(&self, localpart: &str) -> watch::Receiver<u64> {
        let mut m = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(localpart.to_owned()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// Called after a write is durable: `localpart`'s stream now reaches `head`.
    pub fn notify(&self, localpart: &str, head: u64) {
        let mut m = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = m.get(localpart) {
            if tx.receiver_count() == 0 {
                m.remove(localpart);
            } else {
                tx.send_replace(head);
            }
        }
    }

    /// Wakes `localpart`'s subscriptions without new events, so that each checks its
    /// token again (a device was logged out or revoked).
    pub fn wake(&self, localpart: &str) {
        self.wakes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let m = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = m.get(localpart) {
            tx.send_modify(|_| {});
        }
    }

    /// How many wake-ups (block changes, logouts) there have been.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn subscribe_ephemeral(&self, localpart: &str) -> broadcast::Receiver<Ephemeral> {
        let mut m = self.ephemeral.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(localpart.to_owned()).or_insert_with(|| broadcast::channel(EPHEMERAL_BACKLOG).0).subscribe()
    }

    /// Pushes an ephemeral update to `localpart`'s live subscriptions, if any.
    pub fn push_ephemeral(&self, localpart: &str, e: Ephemeral) {
        let mut m = self.ephemeral.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = m.get(localpart) {
            if tx.receiver_count() == 0 {
                m.remove(localpart);
            } else {
                let _ = tx.send(e);
            }
        }
    }
}
