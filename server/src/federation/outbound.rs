//! Outbound: one sender task per lane of each destination's durable queue. It reads the
//! lane in order after what it settled, sends a transaction on its own stream, and has
//! the writer record what the peer answered; the decisions — what goes in a transaction,
//! what leaves the queue, what becomes a dead letter, when to try again — are the core's
//! [`Link`]. A slow conversation holds up only its lane.

use std::sync::Arc;
use std::time::Instant;

use missive_core::link::{self, Link, Txn};
use missive_spec::federation::{FedRequest, FedResponse, UnitResult};
use rand::Rng;

use super::{Federation, Peer};
use crate::accounts::now_ms;
use crate::store::blocking;

impl Federation {
    pub(super) async fn sender(self: Arc<Self>, peer: Arc<Peer>, lane: u8) {
        let mut shutdown = self.shutdown.clone();
        let wake = &peer.wake[usize::from(lane)];
        loop {
            if *shutdown.borrow() || peer.gone.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let next = peer.link().next_attempt(Instant::now());
            let wait_until = match next {
                Some(at) => Some(at),
                None => {
                    let after = peer.link().read_after(lane).map(<[u8]>::to_vec);
                    let (store, dest) = (self.store.clone(), peer.name.clone());
                    let rows = blocking(move || link::next_rows(&*store, &dest, lane, after.as_deref())).await.and_then(|r| r);
                    match rows {
                        Ok(rows) if rows.is_empty() => None,
                        Ok(rows) => {
                            let rows = self.signed_now(rows);
                            self.deliver(&peer, Link::build(lane, rows)).await;
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the outbound queue");
                            let at = peer.link().local_failure(format!("cannot read the outbound queue: {e}"), Instant::now(), jitter());
                            Some(at)
                        }
                    }
                }
            };
            let sleep = async {
                match wait_until {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = sleep => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Sends one transaction and has the writer record the outcome (F5). A failure here or
    /// at the peer backs the link off alike.
    async fn deliver(&self, peer: &Arc<Peer>, txn: Txn) {
        let results = if txn.units.is_empty() {
            Vec::new()
        } else {
            let started = Instant::now();
            let answer = self.transact(peer, &txn).await;
            self.metrics.transaction(&peer.name, answer.is_ok(), started.elapsed());
            match answer {
                Ok(r) => r,
                Err(e) => {
                    *peer.conn.lock().await = None;
                    self.discovery.forget(&peer.name);
                    peer.link().remote_failure(e, Instant::now(), jitter());
                    return;
                }
            }
        };
        let settlement = peer.link().settle(&txn, &results);
        let progress = settlement.progress.clone();
        match self.sequencer.settle(settlement).await {
            Ok(()) => {
                if let Some(at) = peer.link().settled(&progress, Instant::now(), now_ms(), jitter()) {
                    tracing::warn!(retry_in = ?at.saturating_duration_since(Instant::now()), "peer asked to retry some units");
                }
            }
            Err(e) => {
                // The peer has them: sending them again is safe (it answers duplicate), but
                // not at once, or a disk that refuses writes would make this a storm.
                tracing::error!(error = %e.message, "cannot record acknowledgements; units will be sent again after a pause");
                peer.link().local_failure(format!("cannot record acknowledgements: {}", e.message), Instant::now(), jitter());
            }
        }
    }

    async fn transact(&self, peer: &Arc<Peer>, txn: &Txn) -> Result<Vec<UnitResult>, String> {
        let conn = self.connection(peer).await?;
        let n = txn.units.len();
        match self.request(&conn, FedRequest::Txn { id: txn.id.clone(), units: txn.units.clone() }).await? {
            FedResponse::TxnResult { id, results } if id == txn.id && results.len() == n => Ok(results),
            FedResponse::Error { code, message } => Err(format!("peer refused the transaction: {code:?}: {message}")),
            other => Err(format!("unexpected answer to a transaction: {other:?}")),
        }
    }
}

impl Federation {
    /// Receipts and device-list changes queued before a key rotation, signed again with
    /// the current key: a retired key verifies only messages (F6.2, F2.7). Messages keep
    /// their signatures.
    fn signed_now(&self, rows: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
        if self.own.chain.is_empty() {
            return rows;
        }
        let current = self.own.current.key_id();
        rows.into_iter()
            .map(|(k, v)| {
                let Ok(u) = missive_core::records::decode::<missive_spec::federation::SignedUnit>("out_queue", &v) else { return (k, v) };
                if u.key == current {
                    return (k, v);
                }
                match missive_spec::codec::decode::<missive_spec::federation::Unit>(&u.unit) {
                    Ok(unit @ (missive_spec::federation::Unit::Receipt(_) | missive_spec::federation::Unit::Devices(_))) => {
                        (k, missive_core::records::encode(&missive_federation::envelope::sign(&self.key, &unit)))
                    }
                    _ => (k, v),
                }
            })
            .collect()
    }
}

/// Spreads retries of many servers apart.
pub(super) fn jitter() -> f64 {
    rand::thread_rng().gen()
}
