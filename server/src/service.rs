//! What each client request does (spec §6), independent of the transport that carried it.
//!
//! Store reads that may reach old data run on the blocking pool (one hop per request
//! where possible); the hot path's point lookups run in place ([`Service::read_hot`]);
//! writes go through the writer. Password hashes are computed at most `password_hashes` at a time
//! (`hashing.rs`), and a login attempt counts against its limits before its hash is
//! computed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use missive_spec::{
    limits, ConversationId, Cursor, DeviceId, DeviceInfo, ErrorCode, Event, OrderKey, Receipt, ReceiptKind, Watermark, RegistrationPolicy, Request,
    RequestFrame, Response, ServerName, Undeliverable, UserId, PROTOCOL_VERSION,
};
use missive_core::AccountChange;

use crate::accounts;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::records::{self, DeviceRecord, TokenRecord, UserRecord};
use crate::ratelimit::FailureLimiter;
use crate::sequencer::{NewDevice, Sequencer};
use crate::store::{keys, Cf, Direction, Store};

/// Who may register, from the configuration.
#[derive(Debug, Clone)]
pub struct Registration {
    pub policy: RegistrationPolicy,
    pub token: Option<String>,
}

/// Failed logins allowed per account, and per source address, in [`LOGIN_WINDOW`] (§6.2).
pub const LOGIN_FAILURES_PER_ACCOUNT: u32 = 5;
pub const LOGIN_FAILURES_PER_ADDRESS: u32 = 20;
pub const LOGIN_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Brute-force brakes on password and registration-token guessing.
pub struct Limits {
    pub accounts: FailureLimiter<UserId>,
    pub addresses: FailureLimiter<IpAddr>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            accounts: FailureLimiter::new(LOGIN_FAILURES_PER_ACCOUNT, LOGIN_WINDOW),
            addresses: FailureLimiter::new(LOGIN_FAILURES_PER_ADDRESS, LOGIN_WINDOW),
        }
    }
}

pub struct Service {
    pub limits: Limits,
    /// Computes password hashes (argon2id, 19 MiB each), a few at a time.
    pub hasher: crate::hashing::Hasher,
    pub store: Arc<dyn Store>,
    pub sequencer: Sequencer,
    pub hub: Arc<Hub>,
    pub presence: Arc<crate::presence::Presence>,
    pub server: ServerName,
    pub registration: Registration,
    /// Which servers this one federates with (federation.md F3.5).
    pub policy: Arc<crate::federation::policy::FederationPolicy>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Restored from a backup: how sends ask for and wait on reclaims (federation.md F12.3).
    pub reclaims: Option<Reclaims>,
    /// The server's key and rotation chain, for `keys` (§6.13).
    pub keys: Arc<crate::federation::OwnKeys>,
    /// Key claims per user (e2ee.md E3.3; `keydir.rs`).
    pub claims: FailureLimiter<UserId>,
    /// Key claims per peer server.
    pub peer_claims: FailureLimiter<ServerName>,
    /// The federation links, once started: a remote user's keys are asked of their server.
    pub federation: std::sync::OnceLock<Arc<crate::federation::Federation>>,
}

/// How long a send to a server not yet reclaimed from after a restore waits for it.
const RECLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A restored server's sends and its reclaims (federation.md F12.3).
pub struct Reclaims {
    /// Servers a send went to that are not reclaimed from yet. Bounded; a full channel
    /// drops the ask.
    pub ask: tokio::sync::mpsc::Sender<missive_spec::ServerName>,
    /// Bumped whenever a reclaim completes.
    pub done: tokio::sync::watch::Receiver<u64>,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: UserId,
    pub device: DeviceId,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

pub fn encode_cursor(key: &OrderKey) -> Cursor {
    Cursor(URL_SAFE_NO_PAD.encode(key.to_bytes()))
}

fn decode_cursor(c: &Cursor) -> Result<OrderKey, ApiError> {
    URL_SAFE_NO_PAD
        .decode(&c.0)
        .ok()
        .and_then(|b| OrderKey::from_bytes(&b))
        .ok_or_else(|| ApiError::invalid("cursor was not issued by this server"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    Ok(crate::store::blocking(f).await?)
}

/// Room left in an `events` frame for its events: the response frame limit, less what the
/// rest of the frame can take (§6.5).
const EVENTS_FRAME_BUDGET: usize = limits::MAX_RESPONSE_FRAME - 4096;

impl Service {
    /// Answers every request but `subscribe`, which the transport streams itself. `from` is
    /// the client's address, for brute-force limits.
    pub async fn handle(self: &Arc<Self>, frame: RequestFrame, from: IpAddr) -> Response {
        let kind = frame.req.name();
        match self.dispatch(frame, from).await {
            Ok(r) => {
                self.metrics.request(kind, None);
                if let Response::Events { events, .. } = &r {
                    self.delivered(events);
                }
                r
            }
            Err(e) => {
                self.metrics.request(kind, Some(e.code));
                Response::Error { code: e.code, message: e.message }
            }
        }
    }

    /// §6.12: starts or ends a block; the caller's subscriptions reload whom they filter.
    async fn block(self: &Arc<Self>, auth: Option<String>, user: UserId, on: bool) -> Result<Response, ApiError> {
        let c = self.read(auth, |_, c| Ok(c)).await?;
        self.sequencer.change_account(c.user.clone(), missive_core::AccountChange::Block(user.clone(), on)).await?;
        self.hub.wake(c.user.localpart());
        tracing::info!(user = %c.user, other = %user, on, "block changed");
        Ok(Response::Ok {})
    }

    /// Whom `user` blocks, in id order (blocking).
    pub fn blocked(&self, user: &UserId) -> Result<Vec<UserId>, ApiError> {
        let rows = self.store.scan(Cf::Blocks, &keys::blocks_of(user.localpart()), None, Direction::Forward, limits::MAX_BLOCKED)?;
        let mut users: Vec<UserId> = rows.iter().filter_map(|(k, _)| keys::parse_block(k).map(|(_, u)| u)).collect();
        users.sort();
        Ok(users)
    }

    /// Counts events on their way to a device.
    pub fn delivered(&self, events: &[missive_spec::wire::Event]) {
        for e in events {
            let kind = match &e.event {
                missive_spec::wire::EventKind::Message(_) => "message",
                missive_spec::wire::EventKind::Receipt(_) => "receipt",
                missive_spec::wire::EventKind::Undeliverable(_) => "undeliverable",
                missive_spec::wire::EventKind::Devices(_) => "devices",
                missive_spec::wire::EventKind::Unknown(_) => "unknown",
            };
            self.metrics.events_delivered.get_or_create(&crate::metrics::KindLabels { kind }).inc();
        }
    }

    /// Runs `f` with the caller authenticated, on the blocking pool: the token lookup and
    /// the request's own reads take one hop off the runtime.
    pub(crate) async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        auth: Option<String>,
        f: impl FnOnce(&Service, Caller) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let me = self.clone();
        blocking(move || {
            let c = me.authenticate(auth.as_deref())?;
            f(&me, c)
        })
        .await?
    }

    /// Runs `f` with the caller authenticated, here on the runtime: for the hot path's
    /// point lookups (the caller's token, whether a user exists, whom they block), which
    /// the memtable or block cache answer in microseconds. A hop to the blocking pool
    /// costs more than such a read: two thread wake-ups per request, which profiles showed
    /// as a quarter of the runtime's CPU at 4,000 sends a second. Reads that may reach
    /// old data on disk (history, sync, scans) go through [`Service::read`].
    pub(crate) fn read_hot<T>(&self, auth: Option<&str>, f: impl FnOnce(&Service, Caller) -> Result<T, ApiError>) -> Result<T, ApiError> {
        let c = self.authenticate(auth)?;
        f(self, c)
    }

    async fn dispatch(self: &Arc<Self>, frame: RequestFrame, from: IpAddr) -> Result<Response, ApiError> {
        let auth = frame.auth;
        match frame.req {
            Request::Info {} => Ok(Response::Info {
                version: PROTOCOL_VERSION,
                server_name: self.server.clone(),
                registration: self.registration.policy,
            }),
            Request::Register { user, token, password, device_name } => {
                self.limited(&from, None)?;
                let r = self.register(user, token, password, device_name).await;
                if matches!(&r, Err(e) if e.code == ErrorCode::RegistrationClosed) {
                    self.limits.addresses.failed(&from, Instant::now());
                }
                r
            }
            Request::Login { user, password, device_name } => {
                let attempt = self.check_login(user.clone(), password, device_name);
                self.counted(user, from, attempt).await
            }
            Request::ChangePassword { old_password, new_password, logout_others } => {
                let c = self.read(auth, |_, c| Ok(c)).await?;
                let user = c.user.clone();
                let attempt = self.change_password(c, old_password, new_password, logout_others);
                self.counted(user, from, attempt).await
            }
            Request::Logout {} => {
                let c = self.read(auth, |_, c| Ok(c)).await?;
                self.sequencer.remove_device(c.user.clone(), c.device).await?;
                self.hub.wake(c.user.localpart());
                Ok(Response::Ok {})
            }
            Request::Send { to, content, client_msg_id } => {
                let c = self.read_hot(auth.as_deref(), |s, c| {
                    s.check_send(&c, &to, &content)?;
                    Ok(c)
                })?;
                let Some(reclaims) = &self.reclaims else {
                    return Ok(Response::Sent { message: self.sequencer.send(c.user, c.device, to, client_msg_id, content).await? });
                };
                // Restored from a backup: the writer refuses to number for a server not yet
                // reclaimed from (federation.md F12.3). Ask for it (a full channel means
                // many are under way; the user's next try asks again) and wait a little.
                let deadline = tokio::time::Instant::now() + RECLAIM_WAIT;
                let mut done = reclaims.done.clone();
                loop {
                    let sent = self.sequencer.send(c.user.clone(), c.device.clone(), to.clone(), client_msg_id, content.clone()).await;
                    match sent {
                        Err(e) if e.code == ErrorCode::RemoteUnavailable => {
                            let _ = reclaims.ask.try_send(to.server_name());
                            if tokio::time::timeout_at(deadline, done.changed()).await.is_err() {
                                return Err(e);
                            }
                        }
                        sent => return Ok(Response::Sent { message: sent? }),
                    }
                }
            }
            Request::History { with, after, limit, before } => self.read(auth, move |s, c| s.history(&c, with, after, limit, before)).await,
            Request::Conversations { limit, before } => self.read(auth, move |s, c| s.conversations(&c, limit, before)).await,
            Request::Sync { limit, since } => {
                let limit = limit.unwrap_or(limits::SYNC_MAX_EVENTS);
                self.read(auth, move |s, c| {
                    if limit == 0 || limit > limits::SYNC_MAX_EVENTS {
                        return Err(ApiError::invalid(format!("limit must be 1 to {}", limits::SYNC_MAX_EVENTS)));
                    }
                    let (more, next, events) = s.events(&c.user, since, limit)?;
                    Ok(Response::Events { more, next, events, ephemeral: Vec::new() })
                })
                .await
            }
            Request::Subscribe { .. } => Err(ApiError::invalid("subscribe is answered on its own stream")),
            Request::Receipt { kind, with, up_to } => {
                let receipt = self
                    .read(auth, move |s, c| {
                        if with == c.user {
                            return Err(err(ErrorCode::SelfMessage, "there is no conversation with oneself"));
                        }
                        let conv = ConversationId::one_to_one(&c.user, &with);
                        // A receipt names a message the caller has: one stored in this conversation.
                        if s.store.get(Cf::Messages, &keys::message(&conv, &up_to.0))?.is_none() {
                            return Err(ApiError::invalid("up_to names no message of this conversation"));
                        }
                        Ok((Receipt { conv, kind, peer: with, user: c.user, up_to }, c.device))
                    })
                    .await?;
                self.sequencer.receipts(vec![(receipt.0, Some(receipt.1))]).await?;
                Ok(Response::Ok {})
            }
            Request::Devices {} => {
                self.read(auth, |s, c| {
                    let rows = s.store.scan(Cf::Devices, &keys::devices_of(c.user.localpart()), None, Direction::Forward, 10_000)?;
                    let mut devices = Vec::with_capacity(rows.len());
                    for (k, v) in rows {
                        let Some((_, id)) = keys::parse_device(&k) else { continue };
                        let rec: DeviceRecord = records::decode("devices", &v)?;
                        devices.push(DeviceInfo { current: id == c.device, id, name: rec.name, created_ms: rec.created_ms });
                    }
                    Ok(Response::Devices { devices })
                })
                .await
            }
            Request::Presence { user } => {
                self.read(auth, move |s, c| {
                    // Only someone who shares a conversation with the user may see it; anyone
                    // else gets the same answer as for a user who does not exist.
                    if user != c.user && !s.shares_conversation(&c.user, &user)? {
                        return Err(err(ErrorCode::UnknownUser, format!("no such user {user}")));
                    }
                    // Someone the caller blocks shows offline, never seen (§6.12).
                    if s.store.get(Cf::Blocks, &keys::block(c.user.localpart(), &user))?.is_some() {
                        return Ok(Response::Presence { user, online: false, last_seen: None });
                    }
                    let p = s.presence.current(&user);
                    Ok(Response::Presence { user: p.user, online: p.online, last_seen: p.last_seen })
                })
                .await
            }
            Request::Settings { hide_last_seen } => {
                let c = self.read(auth, |_, c| Ok(c)).await?;
                self.presence.set_hide_last_seen(&c.user, hide_last_seen).await?;
                Ok(Response::Ok {})
            }
            Request::Block { user } => self.block(auth, user, true).await,
            Request::Unblock { user } => self.block(auth, user, false).await,
            Request::Keys {} => {
                let (current, rotations) = self.keys.answer();
                Ok(Response::Keys { current, rotations })
            }
            Request::KeysUpload { keys, fallback, one_time } => self.keys_upload(auth, keys, fallback, one_time).await,
            Request::KeysQuery { user } => self.keys_query(auth, user).await,
            Request::KeysClaim { user, devices } => self.keys_claim(auth, user, devices).await,
            Request::Blocked {} => self.read(auth, |s, c| Ok(Response::Blocked { users: s.blocked(&c.user)? })).await,
            Request::Typing { with } => {
                self.read(auth, move |s, c| {
                    if with == c.user || !s.shares_conversation(&c.user, &with)? {
                        return Err(err(ErrorCode::UnknownUser, format!("no conversation with {with}")));
                    }
                    s.presence.typing(&c.user, &with)?;
                    Ok(Response::Ok {})
                })
                .await
            }
            Request::RevokeDevice { device } => {
                let (c, device) = self
                    .read(auth, move |s, c| {
                        if s.store.get(Cf::Devices, &keys::device(c.user.localpart(), &device))?.is_none() {
                            return Err(ApiError::invalid(format!("you have no device {device}")));
                        }
                        Ok((c, device))
                    })
                    .await?;
                self.sequencer.remove_device(c.user.clone(), device.clone()).await?;
                self.hub.wake(c.user.localpart());
                tracing::info!(user = %c.user, %device, by = %c.device, "device revoked");
                Ok(Response::Ok {})
            }
        }
    }

    /// Refuses a login or registration while the account or the address is over its limit.
    fn limited(&self, from: &IpAddr, user: Option<&UserId>) -> Result<(), ApiError> {
        let now = Instant::now();
        let wait = user
            .and_then(|u| self.limits.accounts.check(u, now).err())
            .or_else(|| self.limits.addresses.check(from, now).err());
        match wait {
            Some(w) => Err(err(ErrorCode::RateLimited, format!("too many failed attempts; try again in {} s", w.as_secs() + 1))),
            None => Ok(()),
        }
    }

    /// Resolves an access token to its device.
    pub fn authenticate(&self, auth: Option<&str>) -> Result<Caller, ApiError> {
        let token = auth.ok_or_else(ApiError::unauthorized)?;
        let v = self.store.get(Cf::Tokens, &keys::token(&accounts::token_hash(token)))?;
        let rec: TokenRecord = records::decode("tokens", &v.ok_or_else(ApiError::unauthorized)?)?;
        Ok(Caller { user: rec.user, device: rec.device })
    }

    fn check_device_name(name: &Option<String>) -> Result<(), ApiError> {
        match name {
            Some(n) if n.len() > limits::MAX_DEVICE_NAME_LEN => Err(ApiError::invalid(format!(
                "device name is over {} bytes",
                limits::MAX_DEVICE_NAME_LEN
            ))),
            _ => Ok(()),
        }
    }

    fn new_session(&self, name: Option<String>) -> (NewDevice, String) {
        let token = accounts::new_token();
        let d = NewDevice { id: accounts::new_device_id(), name, token_hash: accounts::token_hash(&token) };
        (d, token)
    }

    async fn register(
        &self,
        user: UserId,
        token: Option<String>,
        password: String,
        device_name: Option<String>,
    ) -> Result<Response, ApiError> {
        match (self.registration.policy, &self.registration.token, token) {
            (RegistrationPolicy::Open, _, _) => {}
            (RegistrationPolicy::Token, Some(want), Some(got)) if accounts::token_hash(want) == accounts::token_hash(&got) => {}
            (RegistrationPolicy::Token, _, _) => {
                return Err(err(ErrorCode::RegistrationClosed, "registration needs a valid registration token"))
            }
            (RegistrationPolicy::Closed, _, _) => {
                return Err(err(ErrorCode::RegistrationClosed, "registration is closed on this server"))
            }
        }
        if !user.is_on(&self.server) {
            return Err(ApiError::invalid(format!("{user} does not belong to {}", self.server)));
        }
        accounts::check_password(&password)?;
        Self::check_device_name(&device_name)?;
        let hash = self.hasher.run(move || accounts::hash_password(&password)).await?;
        let (device, token) = self.new_session(device_name);
        let id = device.id.clone();
        self.sequencer.create_user(user.clone(), hash, Some(device)).await?;
        tracing::info!(%user, device = %id, "registered");
        Ok(Response::Session { user, token, device: id })
    }

    /// A login attempt (or a password change, §6.11) counts against the account's and the
    /// address's failure limits before its password is hashed, so concurrent attempts count
    /// (§6.2); it is given back if the attempt succeeds or fails for another reason than the
    /// credentials.
    async fn counted(
        self: &Arc<Self>,
        user: UserId,
        from: IpAddr,
        attempt: impl std::future::Future<Output = Result<Response, ApiError>>,
    ) -> Result<Response, ApiError> {
        let now = Instant::now();
        let wait = match self.limits.accounts.reserve(&user, now) {
            Err(w) => Some(w),
            Ok(()) => self.limits.addresses.reserve(&from, now).err().inspect(|_| self.limits.accounts.refund(&user)),
        };
        if let Some(w) = wait {
            return Err(err(ErrorCode::RateLimited, format!("too many failed attempts; try again in {} s", w.as_secs() + 1)));
        }
        let r = attempt.await;
        match &r {
            Err(e) if e.code == ErrorCode::BadCredentials => tracing::info!(%user, %from, "failed password check"),
            Ok(_) => {
                self.limits.accounts.succeeded(&user);
                self.limits.addresses.refund(&from);
            }
            Err(_) => {
                self.limits.accounts.refund(&user);
                self.limits.addresses.refund(&from);
            }
        }
        r
    }

    /// §6.11: the caller's current password, checked as a login checks it, then the new one
    /// set in one change of the writer (which also revokes the other devices if asked).
    async fn change_password(self: &Arc<Self>, c: Caller, old: String, new: String, logout_others: bool) -> Result<Response, ApiError> {
        if old.len() > limits::MAX_PASSWORD_LEN {
            return Err(ApiError::invalid("old password too long"));
        }
        accounts::check_password(&new)?;
        let rec = self.local_user_record(&c.user).await?;
        let hash = self
            .hasher
            .run(move || match rec {
                Some(r) if accounts::verify_password(&old, &r.password_hash) => Some(accounts::hash_password(&new)),
                _ => None,
            })
            .await?
            .ok_or_else(|| err(ErrorCode::BadCredentials, "wrong password"))?;
        let change = AccountChange::Password { hash, logout_others, keep: Some(c.device.clone()) };
        let revoked = self.sequencer.change_account(c.user.clone(), change).await?;
        self.hub.wake(c.user.localpart());
        tracing::info!(user = %c.user, device = %c.device, revoked = revoked.len(), "password changed by its user");
        Ok(Response::Ok {})
    }

    /// The account record of `user`, if it is a user of this server that was ever created.
    async fn local_user_record(&self, user: &UserId) -> Result<Option<UserRecord>, ApiError> {
        if !user.is_on(&self.server) {
            return Ok(None);
        }
        let (store, local) = (self.store.clone(), user.localpart().to_owned());
        blocking(move || match store.get(Cf::Users, &keys::user(&local))? {
            Some(v) => Ok(Some(records::decode::<UserRecord>("users", &v)?)),
            None => Ok(None),
        })
        .await?
    }

    async fn check_login(self: &Arc<Self>, user: UserId, password: String, device_name: Option<String>) -> Result<Response, ApiError> {
        Self::check_device_name(&device_name)?;
        if password.len() > limits::MAX_PASSWORD_LEN {
            return Err(ApiError::invalid("password too long"));
        }
        let rec = self.local_user_record(&user).await?;
        let ok = self.hasher.run(move || match rec {
            Some(r) if r.may_log_in() => accounts::verify_password(&password, &r.password_hash),
            // Disabled and removed accounts get the answer of an unknown user, after the same work.
            _ => {
                accounts::verify_dummy(&password);
                false
            }
        })
        .await?;
        if !ok {
            return Err(err(ErrorCode::BadCredentials, "wrong user or password"));
        }
        let (device, token) = self.new_session(device_name);
        let id = device.id.clone();
        self.sequencer.add_device(user.clone(), device).await?;
        tracing::info!(%user, device = %id, "logged in");
        Ok(Response::Session { user, token, device: id })
    }

    pub(crate) fn shares_conversation(&self, me: &UserId, other: &UserId) -> Result<bool, ApiError> {
        let conv = ConversationId::one_to_one(me, other);
        Ok(self.store.get(Cf::UserConvs, &keys::user_conv(me.localpart(), &conv))?.is_some())
    }

    fn local_user_exists(&self, user: &UserId) -> Result<bool, ApiError> {
        match self.store.get(Cf::Users, &keys::user(user.localpart()))? {
            Some(v) => Ok(records::decode::<UserRecord>("users", &v)?.exists()),
            None => Ok(false),
        }
    }

    fn check_send(&self, c: &Caller, to: &UserId, content: &missive_spec::Content) -> Result<(), ApiError> {
        if *to == c.user {
            return Err(err(ErrorCode::SelfMessage, "a user cannot message themself"));
        }
        if content.kind.is_empty() || content.kind.len() > limits::MAX_CONTENT_TYPE_LEN {
            return Err(err(ErrorCode::ContentTooLarge, format!("content type must be 1 to {} bytes", limits::MAX_CONTENT_TYPE_LEN)));
        }
        if content.body.len() > limits::MAX_CONTENT_BODY {
            return Err(err(
                ErrorCode::ContentTooLarge,
                format!("body of {} bytes exceeds {} bytes", content.body.len(), limits::MAX_CONTENT_BODY),
            ));
        }
        if !to.is_on(&self.server) && !self.policy.allows(&to.server_name()) {
            return Err(err(ErrorCode::RemoteUnavailable, format!("this server does not federate with {}", to.server_name())));
        }
        // A remote recipient is queued for its server whatever that server's state; only
        // local recipients can be checked here.
        if to.is_on(&self.server) && !self.local_user_exists(to)? {
            return Err(err(ErrorCode::UnknownUser, format!("no such user {to}")));
        }
        Ok(())
    }

    fn history(
        &self,
        c: &Caller,
        with: UserId,
        after: Option<Cursor>,
        limit: Option<u32>,
        before: Option<Cursor>,
    ) -> Result<Response, ApiError> {
        if with == c.user {
            return Err(err(ErrorCode::SelfMessage, "there is no conversation with oneself"));
        }
        if with.is_on(&self.server) && !self.local_user_exists(&with)? {
            return Err(err(ErrorCode::UnknownUser, format!("no such user {with}")));
        }
        let limit = limit.unwrap_or(limits::HISTORY_DEFAULT_LIMIT);
        if limit == 0 || limit > limits::HISTORY_MAX_LIMIT {
            return Err(ApiError::invalid(format!("limit must be 1 to {}", limits::HISTORY_MAX_LIMIT)));
        }
        let limit = limit as usize;
        let (anchor, dir) = match (&before, &after) {
            (Some(_), Some(_)) => return Err(ApiError::invalid("give before or after, not both")),
            (Some(b), None) => (Some(decode_cursor(b)?), Direction::Reverse),
            (None, Some(a)) => (Some(decode_cursor(a)?), Direction::Forward),
            (None, None) => (None, Direction::Reverse),
        };
        let conv = ConversationId::one_to_one(&c.user, &with);
        let store = &self.store;
        let me = c.user.clone();
        {
            let mark = |user: &UserId, kind| -> Result<Option<Watermark>, ApiError> {
                match store.get(Cf::Receipts, &keys::receipt(&conv, user, kind))? {
                    Some(v) => Ok(Some(records::watermark("receipts", &v)?)),
                    None => Ok(None),
                }
            };
            let (read, delivered, seen) =
                (mark(&with, ReceiptKind::Read)?, mark(&with, ReceiptKind::Delivered)?, mark(&me, ReceiptKind::Read)?);
            let prefix = keys::messages_of(&conv);
            let anchor_key = anchor.as_ref().map(|k| keys::message(&conv, k));
            let mut rows = store.scan(Cf::Messages, &prefix, anchor_key.as_deref(), dir, limit + 1)?;
            let more = rows.len() > limit;
            rows.truncate(limit);
            if dir == Direction::Forward {
                rows.reverse();
            }
            if rows.len() > 1 && crate::sabotage::active(crate::sabotage::Fault::ReorderPage) {
                rows.swap(0, 1);
            }
            let messages = rows
                .iter()
                .map(|(_, v)| records::stored_message(v))
                .collect::<Result<Vec<_>, _>>()?;
            let (newest, oldest) = match (messages.first(), messages.last()) {
                (Some(n), Some(o)) => (n.order_key(), o.order_key()),
                _ => return Ok(Response::Page { read, seen, newer: None, older: None, failed: Vec::new(), messages, delivered }),
            };
            let exists = |from: &OrderKey, d: Direction| -> Result<bool, ApiError> {
                Ok(!store.scan(Cf::Messages, &prefix, Some(&keys::message(&conv, from)), d, 1)?.is_empty())
            };
            let (has_older, has_newer) = match dir {
                Direction::Reverse => (more, exists(&newest, Direction::Forward)?),
                Direction::Forward => (exists(&oldest, Direction::Reverse)?, more),
            };
            // Refused messages on this page (§6.6), in one scan between its newest and oldest
            // keys. Only a local sender's messages are marked, and the caller is the
            // conversation's local member.
            let mut past_newest = keys::message(&conv, &newest);
            past_newest.push(0);
            let oldest_key = keys::message(&conv, &oldest);
            let failed = store
                .scan(Cf::Failed, &prefix, Some(&past_newest), Direction::Reverse, messages.len())?
                .into_iter()
                .take_while(|(k, _)| *k >= oldest_key)
                .map(|(_, v)| records::decode::<Undeliverable>("failed", &v))
                .collect::<Result<Vec<_>, _>>()?;
            // Messages kept from the caller, who blocked their sender (§6.12): the cursors
            // above still step over them.
            let withheld: std::collections::HashSet<Vec<u8>> = store
                .scan(Cf::Withheld, &prefix, Some(&past_newest), Direction::Reverse, messages.len())?
                .into_iter()
                .take_while(|(k, _)| *k >= oldest_key)
                .map(|(k, _)| k)
                .collect();
            let mut messages = messages;
            messages.retain(|m| m.to != me || !withheld.contains(&keys::message(&conv, &m.order_key())));
            Ok(Response::Page {
                read,
                seen,
                newer: has_newer.then(|| encode_cursor(&newest)),
                older: has_older.then(|| encode_cursor(&oldest)),
                failed,
                messages,
                delivered,
            })
        }
    }

    /// Events of `user` after position `since` (blocking): at most `limit`, and no more
    /// than fit in one response frame. Returns whether it stopped before the end of the
    /// stream, the position to ask for next, and the events.
    pub fn events(&self, user: &UserId, since: u64, limit: u32) -> Result<(bool, u64, Vec<Event>), ApiError> {
        let local = user.localpart();
        let from = keys::event(local, since);
        let rows = self.store.scan(Cf::Events, &keys::events_of(local), Some(&from), Direction::Forward, limit as usize)?;
        let mut more = rows.len() == limit as usize;
        let mut bytes = 0;
        let mut events = Vec::with_capacity(rows.len());
        for (_, v) in &rows {
            // A stored event is its own encoding; an array adds at most a few bytes each.
            bytes += v.len() + 9;
            if bytes > EVENTS_FRAME_BUDGET && !events.is_empty() {
                more = true;
                break;
            }
            events.push(records::decode::<Event>("events", v)?);
        }
        let next = events.last().map(|e| e.pos).unwrap_or(since);
        Ok((more, next, events))
    }
}
