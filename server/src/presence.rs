//! Presence and typing (spec §12, §13): ephemeral, pushed to live subscriptions of the
//! users who share a conversation with the subject, and across federation to the servers
//! that host such users (coalesced there). Only last-seen times and settings are stored,
//! through the writer.
//!
//! What other servers say about their users is kept only for users who share a
//! conversation with one of ours, for at most `remote_presence_users` of them, and an
//! "online" expires unless its server repeats it (every [`REFRESH`]); the rules, with
//! time passed in, are the protocol core's ([`missive_core::ephemeral`]).
//!
//! Every method that reads the store is blocking: async callers go through
//! [`crate::store::blocking`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use missive_spec::{Ephemeral, ErrorCode, PresenceUpdate, ServerName, TypingUpdate, UserId};
use tokio::sync::mpsc;

use crate::accounts::now_ms;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::records::{self, PresenceRecord};
use crate::sequencer::{PresenceChange, Sequencer};
use crate::store::{blocking, keys, Cf, Direction, Store};

use missive_core::ephemeral::{RemotePresence, TypingLimiter, REFRESH};

pub struct Presence {
    server: ServerName,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    sequencer: Sequencer,
    /// Live subscriptions per local user; an entry exists only while one does.
    live: Mutex<HashMap<String, usize>>,
    remote: Mutex<RemotePresence>,
    limits: Arc<crate::limits::LiveLimits>,
    /// Last typing notification per (user, conversation).
    typing: Mutex<TypingLimiter>,
    /// Updates for other servers: (destination, update), coalesced by the federation layer.
    outbound: mpsc::UnboundedSender<(ServerName, Ephemeral)>,
}

impl Presence {
    pub fn new(
        server: ServerName,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        sequencer: Sequencer,
        outbound: mpsc::UnboundedSender<(ServerName, Ephemeral)>,
        limits: Arc<crate::limits::LiveLimits>,
    ) -> Arc<Presence> {
        Arc::new(Presence {
            server,
            store,
            hub,
            sequencer,
            live: Mutex::default(),
            remote: Mutex::default(),
            limits,
            typing: Mutex::default(),
            outbound,
        })
    }

    /// Repeats the presence of every online local user to the servers of their contacts
    /// every [`REFRESH`], until the process ends.
    pub fn start_refresh(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.tick().await;
            loop {
                tick.tick().await;
                let online: Vec<String> = me.live.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
                let me = me.clone();
                let _ = blocking(move || {
                    for local in online {
                        if let Ok(user) = UserId::new(&local, &me.server) {
                            let update = me.current(&user);
                            for dest in me.remote_servers(&user) {
                                let _ = me.outbound.send((dest, Ephemeral::Presence(update.clone())));
                            }
                        }
                    }
                })
                .await;
            }
        });
    }

    fn record(&self, localpart: &str) -> PresenceRecord {
        self.store
            .get(Cf::Presence, &keys::presence(localpart))
            .ok()
            .flatten()
            .and_then(|v| records::decode::<PresenceRecord>("presence", &v).ok())
            .unwrap_or_default()
    }

    /// A device of `user` subscribed: online from the first one on.
    pub async fn connected(self: &Arc<Self>, user: &UserId) {
        let first = {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            let n = live.entry(user.localpart().to_owned()).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first {
            self.publish_async(user).await;
        }
    }

    /// A subscription of `user` ended: offline, last seen now, once the last one is gone.
    pub async fn disconnected(self: Arc<Self>, user: UserId) {
        let last = {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            match live.get_mut(user.localpart()) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    live.remove(user.localpart());
                    true
                }
                None => false,
            }
        };
        if last {
            let change = PresenceChange::LastSeen(now_ms());
            if let Err(e) = self.sequencer.presence(user.localpart().to_owned(), change).await {
                tracing::warn!(%user, error = %e, "cannot store last-seen time");
            }
            self.publish_async(&user).await;
        }
    }

    /// What others may see of `user` now (blocking).
    pub fn current(&self, user: &UserId) -> PresenceUpdate {
        if !user.is_on(&self.server) {
            return self.remote.lock().unwrap_or_else(|e| e.into_inner()).get(user, now_ms());
        }
        let online = self.live.lock().unwrap_or_else(|e| e.into_inner()).contains_key(user.localpart());
        let rec = self.record(user.localpart());
        let last_seen = if online || rec.hide_last_seen { None } else { rec.last_seen_ms };
        PresenceUpdate { user: user.clone(), online, last_seen }
    }

    /// Stores the setting (through the writer), then tells contacts. Fails, changing
    /// nothing, when the write fails.
    pub async fn set_hide_last_seen(self: &Arc<Self>, user: &UserId, hide: bool) -> Result<(), ApiError> {
        self.sequencer.presence(user.localpart().to_owned(), PresenceChange::HideLastSeen(hide)).await?;
        self.publish_async(user).await;
        Ok(())
    }

    /// Local users who share a conversation with `user` (blocking).
    fn local_contacts(&self, user: &UserId) -> Vec<String> {
        match self.store.scan(Cf::Contacts, &keys::contacts_of(user), None, Direction::Forward, 100_000) {
            Ok(rows) => rows.into_iter().filter_map(|(k, _)| keys::parse_contact(&k).map(|(_, l)| l)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read contacts");
                Vec::new()
            }
        }
    }

    /// Other servers hosting a user who shares a conversation with local `user` (blocking).
    fn remote_servers(&self, user: &UserId) -> HashSet<ServerName> {
        let rows = self.store.scan(Cf::UserConvs, &keys::user_conv_prefix(user.localpart()), None, Direction::Forward, 100_000);
        rows.unwrap_or_default()
            .into_iter()
            .filter_map(|(_, v)| UserId::parse(std::str::from_utf8(&v).ok()?).ok())
            .map(|p| p.server_name())
            .filter(|s| *s != self.server)
            .collect()
    }

    async fn publish_async(self: &Arc<Self>, user: &UserId) {
        let (me, user) = (self.clone(), user.clone());
        if let Err(e) = blocking(move || me.publish(&user)).await {
            tracing::warn!(error = %e, "cannot publish presence");
        }
    }

    /// Pushes `user`'s state to local contacts and their servers (blocking).
    fn publish(&self, user: &UserId) {
        let update = self.current(user);
        for local in self.local_contacts(user) {
            self.hub.push_ephemeral(&local, Ephemeral::Presence(update.clone()));
        }
        for dest in self.remote_servers(user) {
            let _ = self.outbound.send((dest, Ephemeral::Presence(update.clone())));
        }
    }

    /// Presence updates from `peer` about its users (blocking). Kept and passed on only for
    /// users who share a conversation with a local user; others are ignored (F11).
    pub fn remote_updates(&self, peer: &ServerName, updates: Vec<PresenceUpdate>) {
        let now = now_ms();
        for update in updates {
            let contacts = self.local_contacts(&update.user);
            if contacts.is_empty() {
                continue;
            }
            let capacity = self.limits.remote_presence_users();
            if !self.remote.lock().unwrap_or_else(|e| e.into_inner()).insert(update.clone(), now, capacity) {
                tracing::warn!(%peer, user = %update.user, "remote presence table full; update ignored");
                continue;
            }
            for local in contacts {
                self.hub.push_ephemeral(&local, Ephemeral::Presence(update.clone()));
            }
        }
    }

    /// How many remote users' presence is remembered.
    pub fn remote_len(&self) -> usize {
        self.remote.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// `user` is typing to `with`; rate-limited, forwarded, never stored.
    pub fn typing(&self, user: &UserId, with: &UserId) -> Result<(), ApiError> {
        let update = self.typing.lock().unwrap_or_else(|e| e.into_inner()).typing(user, with, now_ms());
        let Some(update) = update else {
            return Err(ApiError::new(ErrorCode::RateLimited, "one typing notification per second and conversation"));
        };
        if with.is_on(&self.server) {
            let to = with.localpart().to_owned();
            self.hub.push_ephemeral(&to, Ephemeral::Typing(update));
        } else {
            let _ = self.outbound.send((with.server_name(), Ephemeral::Typing(update)));
        }
        Ok(())
    }

    /// A typing notification from another server, for one of our users.
    /// A typing notification from another server for one of our users (blocking): shown
    /// only if the two share the conversation (§12), like typing between local users.
    pub fn remote_typing(&self, update: TypingUpdate) {
        let to = update.peer.localpart().to_owned();
        match self.store.get(Cf::Contacts, &keys::contact(&update.user, &to)) {
            Ok(Some(_)) => self.hub.push_ephemeral(&to, Ephemeral::Typing(update)),
            Ok(None) => tracing::debug!(from = %update.user, "typing from a user who shares no conversation; ignored"),
            Err(e) => tracing::warn!(error = %e, "cannot read contacts"),
        }
    }
}
