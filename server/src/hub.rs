//! Live-event wake-ups: one watch channel per local user carrying the head of their
//! event stream. Subscribers read events from the store; the hub only says "there is more",
//! so a slow subscriber can never miss or lose an event.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

#[derive(Default)]
pub struct Hub {
    heads: Mutex<HashMap<String, watch::Sender<u64>>>,
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
}
