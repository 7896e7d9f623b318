//! Presence and typing (spec §12, §13): ephemeral, pushed to live subscriptions of the
//! users who share a conversation with the subject, and across federation to the servers
//! that host such users (coalesced there). Only last-seen times and settings are stored.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use missive_spec::{ConversationId, Ephemeral, ErrorCode, PresenceUpdate, ServerName, TypingUpdate, UserId};
use tokio::sync::mpsc;

use crate::accounts::now_ms;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::records::{self, PresenceRecord};
use crate::store::{keys, Batch, Cf, Direction, Store};

/// How long a typing notification lasts unless renewed (§13).
pub const TYPING_TTL_MS: u64 = 5_000;
/// At most one typing notification per conversation and user in this interval (§13).
pub const TYPING_MIN_INTERVAL_MS: u64 = 1_000;

pub struct Presence {
    server: ServerName,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    /// Live subscriptions per local user.
    live: Mutex<HashMap<String, usize>>,
    /// The last state heard for users of other servers.
    remote: Mutex<HashMap<UserId, PresenceUpdate>>,
    typing_sent: Mutex<HashMap<(String, ConversationId), u64>>,
    /// Updates for other servers: (destination, update), coalesced by the federation layer.
    outbound: mpsc::UnboundedSender<(ServerName, Ephemeral)>,
    /// Serialises read-modify-write of presence records.
    records: Mutex<()>,
}

impl Presence {
    pub fn new(
        server: ServerName,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        outbound: mpsc::UnboundedSender<(ServerName, Ephemeral)>,
    ) -> Arc<Presence> {
        Arc::new(Presence {
            server,
            store,
            hub,
            live: Mutex::default(),
            remote: Mutex::default(),
            typing_sent: Mutex::default(),
            outbound,
            records: Mutex::new(()),
        })
    }

    fn record(&self, localpart: &str) -> PresenceRecord {
        self.store
            .get(Cf::Presence, &keys::presence(localpart))
            .ok()
            .flatten()
            .and_then(|v| records::decode::<PresenceRecord>("presence", &v).ok())
            .unwrap_or_default()
    }

    fn update_record(&self, localpart: &str, f: impl FnOnce(&mut PresenceRecord)) {
        let _guard = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let mut rec = self.record(localpart);
        f(&mut rec);
        let mut b = Batch::default();
        b.put(Cf::Presence, keys::presence(localpart), records::encode(&rec));
        if let Err(e) = self.store.write(b) {
            tracing::warn!(error = %e, "cannot store presence record");
        }
    }

    /// A device of `user` subscribed: online from the first one on.
    pub fn connected(&self, user: &UserId) {
        let first = {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            let n = live.entry(user.localpart().to_owned()).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first {
            self.publish(user);
        }
    }

    /// A subscription of `user` ended: offline, last seen now, once the last one is gone.
    pub fn disconnected(&self, user: &UserId) {
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
            let now = now_ms();
            self.update_record(user.localpart(), |r| r.last_seen_ms = Some(now));
            self.publish(user);
        }
    }

    /// What others may see of `user` now.
    pub fn current(&self, user: &UserId) -> PresenceUpdate {
        if !user.is_on(&self.server) {
            let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            return remote.get(user).cloned().unwrap_or(PresenceUpdate { user: user.clone(), online: false, last_seen: None });
        }
        let online = self.live.lock().unwrap_or_else(|e| e.into_inner()).contains_key(user.localpart());
        let rec = self.record(user.localpart());
        let last_seen = if online || rec.hide_last_seen { None } else { rec.last_seen_ms };
        PresenceUpdate { user: user.clone(), online, last_seen }
    }

    pub fn set_hide_last_seen(&self, user: &UserId, hide: bool) {
        self.update_record(user.localpart(), |r| r.hide_last_seen = hide);
        self.publish(user);
    }

    /// Local users who share a conversation with `user`.
    fn local_contacts(&self, user: &UserId) -> Vec<String> {
        match self.store.scan(Cf::Contacts, &keys::contacts_of(user), None, Direction::Forward, 100_000) {
            Ok(rows) => rows.into_iter().filter_map(|(k, _)| keys::parse_contact(&k).map(|(_, l)| l)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read contacts");
                Vec::new()
            }
        }
    }

    /// Other servers hosting a user who shares a conversation with local `user`.
    fn remote_servers(&self, user: &UserId) -> HashSet<ServerName> {
        let rows = self.store.scan(Cf::UserConvs, &keys::user_conv_prefix(user.localpart()), None, Direction::Forward, 100_000);
        rows.unwrap_or_default()
            .into_iter()
            .filter_map(|(_, v)| UserId::parse(std::str::from_utf8(&v).ok()?).ok())
            .map(|p| p.server_name())
            .filter(|s| *s != self.server)
            .collect()
    }

    fn publish(&self, user: &UserId) {
        let update = self.current(user);
        for local in self.local_contacts(user) {
            self.hub.push_ephemeral(&local, Ephemeral::Presence(update.clone()));
        }
        for dest in self.remote_servers(user) {
            let _ = self.outbound.send((dest, Ephemeral::Presence(update.clone())));
        }
    }

    /// A presence update about a user of another server, from that server.
    pub fn remote_update(&self, update: PresenceUpdate) {
        self.remote.lock().unwrap_or_else(|e| e.into_inner()).insert(update.user.clone(), update.clone());
        for local in self.local_contacts(&update.user) {
            self.hub.push_ephemeral(&local, Ephemeral::Presence(update.clone()));
        }
    }

    /// `user` is typing to `with`; rate-limited, forwarded, never stored.
    pub fn typing(&self, user: &UserId, with: &UserId) -> Result<(), ApiError> {
        let conv = ConversationId::one_to_one(user, with);
        let now = now_ms();
        {
            let mut sent = self.typing_sent.lock().unwrap_or_else(|e| e.into_inner());
            let slot = sent.entry((user.localpart().to_owned(), conv)).or_insert(0);
            if now < *slot + TYPING_MIN_INTERVAL_MS {
                return Err(ApiError::new(ErrorCode::RateLimited, "one typing notification per second and conversation"));
            }
            *slot = now;
        }
        let update = TypingUpdate { conv, peer: with.clone(), user: user.clone(), until: now + TYPING_TTL_MS };
        if with.is_on(&self.server) {
            let to = with.localpart().to_owned();
            self.hub.push_ephemeral(&to, Ephemeral::Typing(update));
        } else {
            let _ = self.outbound.send((with.server_name(), Ephemeral::Typing(update)));
        }
        Ok(())
    }

    /// A typing notification from another server, for one of our users.
    pub fn remote_typing(&self, update: TypingUpdate) {
        let to = update.peer.localpart().to_owned();
        self.hub.push_ephemeral(&to, Ephemeral::Typing(update));
    }
}
