//! Gaps: asking an origin for the units missing below held ones, and the sweep that
//! finds gaps nobody is filling (held units survive restarts; the requests do not). When
//! to ask, how much and how often to try again is the core's [`GapFill`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use missive_core::gapfill::{self, GapFill, Step};
use missive_spec::federation::{FedRequest, FedResponse};
use missive_spec::{ConversationId, ServerName};

use super::outbound::jitter;
use super::Federation;
use crate::sequencer::Backfill;
use crate::store::blocking;

/// How often held units are looked over for gaps nobody is filling (also at start-up).
const HELD_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

impl Federation {
    /// Looks over held units at start-up and every [`HELD_SWEEP_INTERVAL`].
    pub(super) fn start_sweep(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut shutdown = me.shutdown.clone();
            loop {
                let store = me.store.clone();
                match blocking(move || gapfill::held_gaps(&*store)).await.and_then(|r| r) {
                    Ok(gaps) => gaps.into_iter().for_each(|b| me.want_gap(b)),
                    Err(e) => tracing::error!(error = %e, "cannot look over held units"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(HELD_SWEEP_INTERVAL) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
    }

    /// Wants `b` filled: starts a fill unless one of its gap is running.
    pub(super) fn want_gap(self: &Arc<Self>, b: Backfill) {
        if !self.gaps().want(&b) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move { me.fill(b.conv, b.origin).await });
    }

    fn gaps(&self) -> std::sync::MutexGuard<'_, GapFill> {
        self.gaps.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn fill(self: Arc<Self>, conv: ConversationId, origin: ServerName) {
        loop {
            let (store, o) = (self.store.clone(), origin.clone());
            let head = match blocking(move || gapfill::head_of(&*store, &conv, &o)).await.and_then(|r| r) {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a conversation's head");
                    self.gaps().failed(conv, &origin, Instant::now(), jitter());
                    continue;
                }
            };
            let step = self.gaps().next(conv, &origin, head, Instant::now());
            match step {
                Step::Done => return,
                Step::Wait(at) => tokio::time::sleep_until(at.into()).await,
                Step::Ask { first, last } => {
                    tracing::info!(%conv, %origin, first, last, "asking origin for missing units");
                    if let Err(e) = self.request_backfill(&origin, conv, first, last).await {
                        tracing::warn!(%origin, error = %e, "backfill failed");
                        self.gaps().failed(conv, &origin, Instant::now(), jitter());
                    }
                }
            }
        }
    }

    async fn request_backfill(self: &Arc<Self>, origin: &ServerName, conv: ConversationId, first: u64, last: u64) -> Result<(), String> {
        let peer = self.peer(origin);
        let info = self.discovery.resolve(origin).await.map_err(|e| e.to_string())?;
        let conn = self.connection(&peer).await?;
        match self.request(&conn, FedRequest::Backfill { conv, last, first }).await? {
            FedResponse::Units { units } if units.is_empty() => Err("origin has none of the missing units".into()),
            FedResponse::Units { units } => {
                let results = self.receive_units(origin, &info, units).await;
                match results.iter().find(|r| !r.delivered()) {
                    Some(r) => Err(format!("backfilled unit refused: {r:?}")),
                    None => Ok(()),
                }
            }
            FedResponse::Error { code, message } => Err(format!("{code:?}: {message}")),
            other => Err(format!("unexpected answer to backfill: {other:?}")),
        }
    }
}
