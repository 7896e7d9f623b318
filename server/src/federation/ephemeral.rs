//! Presence and typing across servers: best effort, never queued durably. Updates for
//! one destination are gathered by the core's [`EduBatcher`] and sent as one request when
//! the batch is due; updates from a peer are checked and handed to presence.

use std::sync::Arc;
use std::time::Instant;

use missive_core::ephemeral::{EduBatcher, MAX_EDU_UPDATES};
use missive_spec::federation::{FedErrorCode, FedResponse};
use missive_spec::{ConversationId, Ephemeral, PresenceUpdate, ServerName, TypingUpdate};
use tokio::sync::mpsc;

use super::{fed_error, Federation};
use crate::store::blocking;

impl Federation {
    /// Gathers ephemeral updates per destination and sends each batch when it is due.
    pub fn start_edus(self: &Arc<Self>, mut rx: mpsc::UnboundedReceiver<(ServerName, Ephemeral)>) {
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((dest, e)) = rx.recv().await {
                let Some(due) = me.edus().push(Instant::now(), dest.clone(), e) else { continue };
                let me = me.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(due.into()).await;
                    let requests = me.edus().take(Instant::now(), &dest);
                    let peer = me.peer(&dest);
                    for req in requests {
                        let sent = async {
                            let conn = me.connection(&peer).await?;
                            me.request(&conn, req).await
                        };
                        if let Err(e) = sent.await {
                            tracing::debug!(peer = %dest, error = %e, "ephemeral update not delivered");
                        }
                    }
                });
            }
        });
    }

    fn edus(&self) -> std::sync::MutexGuard<'_, EduBatcher> {
        self.edus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Presence and typing from `peer`: only about its own users, typing only to ours in
    /// the conversation of the two.
    pub(super) async fn receive_edus(self: &Arc<Self>, peer: &ServerName, typing: Vec<TypingUpdate>, presence: Vec<PresenceUpdate>) -> FedResponse {
        if typing.len() + presence.len() > MAX_EDU_UPDATES {
            return fed_error(FedErrorCode::TooMany, format!("at most {MAX_EDU_UPDATES} updates per request"));
        }
        let presence: Vec<_> = presence.into_iter().filter(|p| p.user.is_on(peer)).collect();
        let typing: Vec<_> = typing
            .into_iter()
            .filter(|t| t.user.is_on(peer) && t.peer.is_on(&self.server) && t.conv == ConversationId::one_to_one(&t.user, &t.peer))
            .collect();
        if !presence.is_empty() || !typing.is_empty() {
            let (me, peer) = (self.clone(), peer.clone());
            let _ = blocking(move || {
                me.presence.remote_updates(&peer, presence);
                typing.into_iter().for_each(|t| me.presence.remote_typing(t));
            })
            .await;
        }
        FedResponse::Ok {}
    }
}
