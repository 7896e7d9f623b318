//! Presence and typing, ephemeral state (spec §12, §13, F11): what crosses to other
//! servers is coalesced per destination, typing notifications are rate-limited and expire,
//! and what other servers say about their users is kept bounded and expires. Time is
//! passed in everywhere, so all of it is tested on injected time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use missive_spec::federation::FedRequest;
use missive_spec::{ConversationId, Ephemeral, PresenceUpdate, ServerName, TypingUpdate, UserId};

/// How long a typing notification lasts unless renewed (§13).
pub const TYPING_TTL_MS: u64 = 5_000;
/// At most one typing notification per conversation and user in this interval (§13).
pub const TYPING_MIN_INTERVAL_MS: u64 = 1_000;
/// How often a server repeats the presence of its online users to other servers (F11).
pub const REFRESH: Duration = Duration::from_secs(60);
/// How long a remote user stays online here without word from their server (F11).
pub const REMOTE_TTL_MS: u64 = 3 * 60_000;
/// Presence and typing updates toward one server are gathered this long, so a burst of
/// changes crosses as one request carrying the latest state of each user (F§11).
pub const EDU_COALESCE: Duration = Duration::from_millis(200);
/// Most updates in one ephemeral request.
pub const MAX_EDU_UPDATES: usize = 1_000;
/// Typing rate-limit entries kept before expired ones are dropped.
const TYPING_ENTRIES: usize = 100_000;

/// Updates waiting to cross to other servers: the latest per user (and conversation), per
/// destination, sent [`EDU_COALESCE`] after the first one arrived.
#[derive(Default)]
pub struct EduBatcher {
    pending: HashMap<ServerName, Pending>,
}

#[derive(Default)]
struct Pending {
    due: Option<Instant>,
    presence: HashMap<UserId, PresenceUpdate>,
    typing: HashMap<(UserId, ConversationId), TypingUpdate>,
}

impl EduBatcher {
    /// Adds an update for `dest` at `now`. Returns when `dest`'s batch is due if this update
    /// started it (the caller sets one timer per batch), `None` if it joined a waiting one.
    pub fn push(&mut self, now: Instant, dest: ServerName, e: Ephemeral) -> Option<Instant> {
        if matches!(e, Ephemeral::Unknown(_)) {
            return None;
        }
        let p = self.pending.entry(dest).or_default();
        match e {
            Ephemeral::Presence(u) => {
                p.presence.insert(u.user.clone(), u);
            }
            Ephemeral::Typing(t) => {
                p.typing.insert((t.user.clone(), t.conv), t);
            }
            Ephemeral::Unknown(_) => {}
        }
        if p.due.is_some() {
            return None;
        }
        let due = now + EDU_COALESCE;
        p.due = Some(due);
        Some(due)
    }

    /// The request for `dest` if its batch is due at `now`, in requests of at most
    /// [`MAX_EDU_UPDATES`] updates.
    pub fn take(&mut self, now: Instant, dest: &ServerName) -> Vec<FedRequest> {
        if self.pending.get(dest).is_none_or(|p| p.due.is_none_or(|d| d > now)) {
            return Vec::new();
        }
        let Some(p) = self.pending.remove(dest) else { return Vec::new() };
        let mut typing: Vec<TypingUpdate> = p.typing.into_values().collect();
        let mut presence: Vec<PresenceUpdate> = p.presence.into_values().collect();
        let mut out = Vec::new();
        while !typing.is_empty() || !presence.is_empty() {
            let t: Vec<_> = typing.drain(..typing.len().min(MAX_EDU_UPDATES)).collect();
            let room = MAX_EDU_UPDATES - t.len();
            let p: Vec<_> = presence.drain(..presence.len().min(room)).collect();
            out.push(FedRequest::Edu { typing: t, presence: p });
        }
        out
    }
}

/// One typing notification per (user, conversation) per [`TYPING_MIN_INTERVAL_MS`].
#[derive(Default)]
pub struct TypingLimiter {
    sent: HashMap<(String, ConversationId), u64>,
}

impl TypingLimiter {
    /// The notification `user` may send to `with` at `now_ms` (lasting [`TYPING_TTL_MS`]),
    /// or `None` while rate-limited.
    pub fn typing(&mut self, user: &UserId, with: &UserId, now_ms: u64) -> Option<TypingUpdate> {
        if self.sent.len() >= TYPING_ENTRIES {
            self.sent.retain(|_, at| now_ms < *at + TYPING_MIN_INTERVAL_MS);
        }
        let conv = ConversationId::one_to_one(user, with);
        let slot = self.sent.entry((user.localpart().to_owned(), conv)).or_insert(0);
        if *slot != 0 && now_ms < *slot + TYPING_MIN_INTERVAL_MS {
            return None;
        }
        *slot = now_ms;
        Some(TypingUpdate { conv, peer: with.clone(), user: user.clone(), until: now_ms + TYPING_TTL_MS })
    }
}

/// Whether a typing notification still shows at `now_ms`.
pub fn typing_shows(t: &TypingUpdate, now_ms: u64) -> bool {
    now_ms < t.until
}

/// What other servers said about their users, bounded and expiring. Time is passed in.
#[derive(Default)]
pub struct RemotePresence {
    /// user → (last update, when heard, ms). At most `capacity` entries (given on each
    /// insert): expired ones are dropped to make room, and an update for a new user is
    /// ignored while it is full.
    users: HashMap<UserId, (PresenceUpdate, u64)>,
}

impl RemotePresence {
    /// Records an update heard at `now`; false when it was refused for lack of room.
    pub fn insert(&mut self, update: PresenceUpdate, now: u64, capacity: usize) -> bool {
        if !self.users.contains_key(&update.user) && self.users.len() >= capacity {
            self.users.retain(|_, (u, heard)| u.online && now < *heard + REMOTE_TTL_MS);
            if self.users.len() >= capacity {
                return false;
            }
        }
        self.users.insert(update.user.clone(), (update, now));
        true
    }

    /// The user's state at `now`: an "online" not repeated within the TTL has expired and
    /// reads as offline, last seen when last heard.
    pub fn get(&self, user: &UserId, now: u64) -> PresenceUpdate {
        match self.users.get(user) {
            Some((u, heard)) if u.online && now >= *heard + REMOTE_TTL_MS => {
                PresenceUpdate { user: user.clone(), online: false, last_seen: Some(*heard) }
            }
            Some((u, _)) => u.clone(),
            None => PresenceUpdate { user: user.clone(), online: false, last_seen: None },
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn typing_is_rate_limited_and_expires_on_injected_time() {
        let (a, b) = (uid("@a:alpha.test"), uid("@b:beta.test"));
        let mut l = TypingLimiter::default();
        let t0 = 1_700_000_000_000;
        let t = l.typing(&a, &b, t0).expect("first notification");
        assert_eq!(t.until, t0 + TYPING_TTL_MS);
        assert!(typing_shows(&t, t0 + TYPING_TTL_MS - 1));
        assert!(!typing_shows(&t, t0 + TYPING_TTL_MS), "typing shows past its expiry");
        assert!(l.typing(&a, &b, t0 + TYPING_MIN_INTERVAL_MS - 1).is_none(), "a second one within the interval");
        assert!(l.typing(&a, &uid("@c:beta.test"), t0 + 1).is_some(), "another conversation has its own limit");
        let again = l.typing(&a, &b, t0 + TYPING_MIN_INTERVAL_MS).expect("allowed again after the interval");
        assert_eq!(again.until, t0 + TYPING_MIN_INTERVAL_MS + TYPING_TTL_MS, "renewed");
    }

    #[test]
    fn updates_to_one_server_are_coalesced_until_due() {
        let dest = ServerName::parse("beta.test").unwrap();
        let t0 = Instant::now();
        let mut b = EduBatcher::default();
        let online = |on| Ephemeral::Presence(PresenceUpdate { user: uid("@a:alpha.test"), online: on, last_seen: None });
        assert_eq!(b.push(t0, dest.clone(), online(true)), Some(t0 + EDU_COALESCE));
        for i in 0..50 {
            assert_eq!(b.push(t0 + Duration::from_millis(i), dest.clone(), online(i % 2 == 0)), None, "one timer per batch");
        }
        assert!(b.take(t0 + EDU_COALESCE - Duration::from_millis(1), &dest).is_empty(), "sent before it is due");
        let reqs = b.take(t0 + EDU_COALESCE, &dest);
        let [FedRequest::Edu { presence, typing }] = reqs.as_slice() else { panic!("one request: {reqs:?}") };
        assert!(typing.is_empty());
        assert_eq!(presence.len(), 1, "flaps of one user cross as one update");
        assert!(!presence[0].online, "the latest state wins");
        assert_eq!(b.push(t0 + EDU_COALESCE, dest.clone(), online(true)), Some(t0 + EDU_COALESCE * 2), "a new batch starts");
    }

    fn update(user: &str, online: bool) -> PresenceUpdate {
        PresenceUpdate { user: UserId::parse(user).unwrap(), online, last_seen: None }
    }

    #[test]
    fn remote_online_expires_without_word_and_the_table_stays_bounded() {
        let mut r = RemotePresence::default();
        let (a, b, c) = ("@a:beta.test", "@b:beta.test", "@c:beta.test");
        assert!(r.insert(update(a, true), 1_000, 2));
        assert!(r.get(&UserId::parse(a).unwrap(), 1_000 + REMOTE_TTL_MS - 1).online);
        let expired = r.get(&UserId::parse(a).unwrap(), 1_000 + REMOTE_TTL_MS);
        assert!(!expired.online, "a silent server's user stays online");
        assert_eq!(expired.last_seen, Some(1_000));
        assert!(r.insert(update(b, true), 2_000, 2));
        assert!(!r.insert(update(c, true), 3_000, 2), "a third user fits in a table of two");
        assert!(r.insert(update(a, true), 4_000, 2), "a known user is updated in place");
        // Once b's "online" expires, its place can go to someone else; a's still holds.
        assert!(r.insert(update(c, true), 2_000 + REMOTE_TTL_MS, 2));
        assert_eq!(r.len(), 2);
        assert!(r.get(&UserId::parse(c).unwrap(), 2_000 + REMOTE_TTL_MS).online);
        assert!(r.get(&UserId::parse(a).unwrap(), 2_000 + REMOTE_TTL_MS).online);
    }
}
