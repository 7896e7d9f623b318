//! After a restore from a backup (federation.md F12.3): learning from each peer what this
//! server sent it after the backup point, taking those units back, and asking for the
//! peer's units it lost, before numbering new messages for the peer's users. What to ask
//! and what may be stored is the core's (`missive_core::restore`); this moves the bytes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use missive_core::restore::{self, RestoreRecord};
use missive_federation::envelope;
use missive_spec::federation::{FedRequest, FedResponse, HighWaterMark, Unit};
use missive_spec::ServerName;
use tokio::sync::{mpsc, watch};

use super::Federation;
use crate::store::{blocking, Cf, Direction, StoreResult};

/// Reclaims asked for by sends under way at once; a send toward yet another server is
/// answered `remote_unavailable` and asks again later. Those of the servers the database
/// knows are not counted: there is one per server, retrying until done.
const MAX_RECLAIMS: usize = 64;
/// Pause between attempts toward a peer that could not be reached.
const RETRY: Duration = Duration::from_secs(2);

impl Federation {
    /// Starts reclaiming from every server the restored database shares a conversation
    /// with or owes units to, retrying until each is done, and from any other server a
    /// local user sends to (`asked`), once per ask.
    pub async fn start_reclaim(self: &Arc<Self>, record: RestoreRecord, mut asked: mpsc::Receiver<ServerName>, done: watch::Sender<u64>) -> anyhow::Result<()> {
        let done = Arc::new(done);
        let known = {
            let (store, me) = (self.store.clone(), self.server.clone());
            blocking(move || servers_in_conversations(&*store, &me)).await??
        };
        let mut names: HashSet<ServerName> = known.into_iter().collect();
        names.extend(self.queued_destinations().await?);
        // Reclaims under way, each with whether it retries until done.
        let running = Arc::new(std::sync::Mutex::new(HashMap::new()));
        for name in names.into_iter().filter(|n| !record.reclaimed.contains(n)) {
            self.spawn_reclaim(name, true, running.clone(), done.clone());
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut shutdown = me.shutdown.clone();
            loop {
                tokio::select! {
                    name = asked.recv() => match name {
                        Some(name) => me.spawn_reclaim(name, false, running.clone(), done.clone()),
                        None => return,
                    },
                    _ = shutdown.changed() => return,
                }
            }
        });
        Ok(())
    }

    /// One reclaim task for `peer` unless one runs or [`MAX_RECLAIMS`] do; `persist`:
    /// try again until it succeeds (else once).
    fn spawn_reclaim(self: &Arc<Self>, peer: ServerName, persist: bool, running: Arc<std::sync::Mutex<HashMap<ServerName, bool>>>, done: Arc<watch::Sender<u64>>) {
        {
            let mut r = running.lock().unwrap_or_else(|e| e.into_inner());
            if r.contains_key(&peer) || (!persist && r.values().filter(|p| !**p).count() >= MAX_RECLAIMS) {
                return;
            }
            r.insert(peer.clone(), persist);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut shutdown = me.shutdown.clone();
            loop {
                match me.reclaim_from(&peer).await {
                    Ok(()) => {
                        done.send_modify(|n| *n += 1);
                        break;
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "cannot learn from a peer what this restored server sent it"),
                }
                if !persist {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = shutdown.changed() => break,
                }
            }
            running.lock().unwrap_or_else(|e| e.into_inner()).remove(&peer);
        });
    }

    /// F12.3 with one peer: `high_water` page by page, each conversation reclaimed and its
    /// gap asked for, then the peer marked reclaimed.
    async fn reclaim_from(self: &Arc<Self>, peer: &ServerName) -> Result<(), String> {
        let p = self.peer(peer);
        let conn = self.connection(&p).await?;
        let mut after = None;
        let (mut reclaimed, mut convs) = (0, 0);
        loop {
            let (next, marks) = match self.request(&conn, FedRequest::HighWater { after }).await? {
                FedResponse::HighWater { next, convs } => (next, convs),
                FedResponse::Error { code, message } => return Err(format!("high_water refused: {code:?}: {message}")),
                other => return Err(format!("unexpected answer to high_water: {other:?}")),
            };
            for mark in marks {
                convs += 1;
                reclaimed += self.reclaim_conversation(&conn, peer, &mark).await?;
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        self.sequencer.reclaimed(peer.clone()).await.map_err(|e| e.message)?;
        tracing::info!(%peer, conversations = convs, reclaimed, "learnt what this restored server had sent; numbering again");
        Ok(())
    }

    /// Takes back our units of one conversation that the peer holds and we lack, and asks
    /// for its units we lack; how many of ours were stored.
    async fn reclaim_conversation(self: &Arc<Self>, conn: &quinn::Connection, peer: &ServerName, mark: &HighWaterMark) -> Result<usize, String> {
        let mut stored = 0;
        let mut fill = None;
        loop {
            let plan = {
                let (store, me, peer, mark) = (self.store.clone(), self.server.clone(), peer.clone(), *mark);
                blocking(move || restore::plan(&*store, &me, &peer, &mark)).await.and_then(|r| r).map_err(|e| e.to_string())?
            };
            fill = fill.or(plan.fill);
            let Some((first, last)) = plan.reclaim else {
                // The peer's units we lost may depend on ours: asked for once ours are back.
                if let Some(f) = fill {
                    self.want_gap(f);
                }
                return Ok(stored);
            };
            let units = match self.request(conn, FedRequest::Reclaim { conv: mark.conv, last, first }).await? {
                FedResponse::Units { units } => units,
                FedResponse::Error { code, message } => return Err(format!("reclaim refused: {code:?}: {message}")),
                other => return Err(format!("unexpected answer to reclaim: {other:?}")),
            };
            let mut ours = Vec::with_capacity(units.len());
            for env in units {
                match envelope::verify_for_peer(&env, &self.own_keys(), &self.retired_keys()) {
                    Ok(Unit::Message(m)) => ours.push((env, m)),
                    Ok(Unit::Receipt(_) | Unit::Devices(_)) => return Err("reclaim answered a unit that is not a message".into()),
                    Err(e) => return Err(format!("a reclaimed unit does not verify with this server's keys: {e}")),
                }
            }
            let n = self.sequencer.reclaim(ours).await.map_err(|e| e.message)?;
            if n == 0 {
                return Err(format!("{peer} reported our messages {first}..{last} of {} but sent none back", mark.conv));
            }
            stored += n;
        }
    }
}

/// Every other server with a member in a stored conversation.
fn servers_in_conversations(store: &dyn crate::store::Store, me: &ServerName) -> StoreResult<HashSet<ServerName>> {
    let mut out = HashSet::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let rows = store.scan(Cf::Convs, &[], after.as_deref(), Direction::Forward, 1000)?;
        for (_, v) in &rows {
            let rec: missive_core::records::ConvRecord = missive_core::records::decode("convs", v)?;
            out.extend(rec.members.iter().map(|u| u.server_name()).filter(|s| s != me));
        }
        match rows.last() {
            Some((k, _)) if rows.len() == 1000 => after = Some(k.clone()),
            _ => return Ok(out),
        }
    }
}
