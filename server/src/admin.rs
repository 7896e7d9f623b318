//! The operator's channel into a running server: a Unix socket in the data directory,
//! reachable only by the account that owns the data (mode 0600). `missived user …` and
//! `missived device …` use it while the server runs, and open the database directly when
//! it does not: either way the same [`Operations::execute`] does the work, through the writer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use missive_core::{AccountChange, QueueChange};
use missive_spec::federation::Unit;
use missive_spec::{codec, limits, DeviceId, DeviceInfo, ErrorCode, ServerName, UserId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::error::ApiError;
use crate::hub::Hub;
use crate::records::{self, DeviceRecord, UserRecord};
use crate::sequencer::Sequencer;
use crate::store::{keys, Cf, Direction, Store};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRequest {
    AddUser { user: UserId, password_hash: String },
    /// Every local account, removed ones included.
    Users {},
    /// One account and its devices.
    User { user: UserId },
    /// A new password; with `logout`, every device is revoked.
    SetPassword { user: UserId, password_hash: String, logout: bool },
    /// Disable (revoke every device, refuse logins) or enable an account.
    SetDisabled { user: UserId, disabled: bool },
    /// Remove an account for good; its id is never issued again.
    RemoveUser { user: UserId },
    /// Revoke one device of a user.
    RevokeDevice { user: UserId, device: DeviceId },
    /// Units peers refused for good.
    DeadLetters {},
    /// Queue dead letters again (ids from `DeadLetters`; empty: all of them).
    RetryDeadLetters { ids: Vec<String> },
    /// Delete dead letters (ids from `DeadLetters`; empty: all of them).
    DropDeadLetters { ids: Vec<String> },
    /// Drop everything queued for a peer, and forget the link.
    RemovePeer { name: ServerName },
    /// Re-read the config file and apply what can change live, as SIGHUP does
    /// ([`crate::reload::Reloadable`]); `missived peer add` sends it.
    #[serde(alias = "reload_peers")]
    Reload {},
    /// Federation link state per peer.
    Peers {},
    /// Write a consistent copy of the database to `dir` (absolute, must not exist) while
    /// serving: a RocksDB checkpoint.
    Checkpoint { dir: PathBuf },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminResponse {
    Ok {},
    Users { users: Vec<UserInfo> },
    User { user: UserInfo, devices: Vec<DeviceInfo> },
    /// The devices an account change revoked.
    Revoked { devices: Vec<DeviceId> },
    DeadLetters { letters: Vec<DeadLetterInfo> },
    /// How many units a queue change touched.
    Count { count: usize },
    Peers { peers: Vec<crate::federation::PeerStatus> },
    Error { message: String },
}

/// One account as the operator sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserInfo {
    pub user: UserId,
    pub created_ms: u64,
    /// `active`, `disabled` or `removed`.
    pub state: String,
    pub devices: usize,
}

/// One unit a peer refused for good, as the operator sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterInfo {
    /// `PEER/LANE/POSITION`: what `deadletters retry` and `drop` take.
    pub id: String,
    pub peer: ServerName,
    pub reason: String,
    /// `message`, `receipt`, or `unknown` (undecodable).
    pub kind: String,
    pub from: Option<UserId>,
    pub to: Option<UserId>,
    pub seq: Option<u64>,
}

/// What the operator's requests need: the writer, the store to read, and the hub to end
/// the subscriptions of revoked devices.
pub struct Operations {
    pub sequencer: Sequencer,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub server: ServerName,
}

/// Most accounts `missived user list` shows.
const MAX_LISTED_USERS: usize = 100_000;

impl Operations {
    /// Carries out an account request; `None` for requests that need the running server.
    pub async fn execute(&self, req: AdminRequest) -> Option<AdminResponse> {
        let r = match req {
            AdminRequest::AddUser { user, password_hash } => {
                self.sequencer.create_user(user.clone(), password_hash, None).await.map(|()| {
                    tracing::info!(%user, "user added by operator");
                    AdminResponse::Ok {}
                })
            }
            AdminRequest::Users {} => {
                let (store, server) = (self.store.clone(), self.server.clone());
                blocking(move || list_users(&*store, &server)).await.map(|users| AdminResponse::Users { users })
            }
            AdminRequest::User { user } => {
                let store = self.store.clone();
                blocking(move || show_user(&*store, &user)).await.map(|(user, devices)| AdminResponse::User { user, devices })
            }
            AdminRequest::SetPassword { user, password_hash, logout } => {
                self.change(user, AccountChange::Password { hash: password_hash, logout_others: logout, keep: None }).await
            }
            AdminRequest::SetDisabled { user, disabled } => self.change(user, AccountChange::Disabled(disabled)).await,
            AdminRequest::RemoveUser { user } => self.change(user, AccountChange::Remove).await,
            AdminRequest::RevokeDevice { user, device } => {
                let store = self.store.clone();
                let (u, d) = (user.clone(), device.clone());
                match blocking(move || Ok(store.get(Cf::Devices, &keys::device(u.localpart(), &d))?.is_some())).await {
                    Ok(true) => self.sequencer.remove_device(user.clone(), device.clone()).await.map(|()| {
                        self.hub.wake(user.localpart());
                        tracing::info!(%user, %device, "device revoked by operator");
                        AdminResponse::Revoked { devices: vec![device] }
                    }),
                    Ok(false) => Err(ApiError::new(ErrorCode::InvalidRequest, format!("{user} has no device {device}"))),
                    Err(e) => Err(e),
                }
            }
            AdminRequest::DeadLetters {} => {
                let store = self.store.clone();
                blocking(move || dead_letters(&*store)).await.map(|letters| AdminResponse::DeadLetters { letters })
            }
            AdminRequest::RetryDeadLetters { ids } => self.queue(ids, QueueChange::RetryDead).await,
            AdminRequest::DropDeadLetters { ids } => self.queue(ids, QueueChange::DropDead).await,
            AdminRequest::RemovePeer { name } => {
                let r = self.sequencer.change_queue(QueueChange::DropDestination(name.clone())).await;
                if let Ok(n) = &r {
                    tracing::info!(peer = %name, dropped = n, "peer's queue dropped by operator");
                }
                r.map(|count| AdminResponse::Count { count })
            }
            AdminRequest::Reload {} | AdminRequest::Peers {} | AdminRequest::Checkpoint { .. } => return None,
        };
        Some(r.unwrap_or_else(|e| AdminResponse::Error { message: e.message }))
    }

    /// Retries or drops the dead letters named by `ids` (all when empty).
    async fn queue(&self, ids: Vec<String>, make: fn(Vec<Vec<u8>>) -> QueueChange) -> Result<AdminResponse, ApiError> {
        let keys = if ids.is_empty() {
            let store = self.store.clone();
            blocking(move || Ok(store.scan(Cf::DeadLetters, &[], None, Direction::Forward, MAX_DEAD_LETTERS)?.into_iter().map(|(k, _)| k).collect())).await?
        } else {
            ids.iter().map(|id| parse_letter_id(id)).collect::<Result<Vec<_>, _>>()?
        };
        let count = self.sequencer.change_queue(make(keys)).await?;
        Ok(AdminResponse::Count { count })
    }

    async fn change(&self, user: UserId, change: AccountChange) -> Result<AdminResponse, ApiError> {
        let what = match &change {
            AccountChange::Password { .. } => "password",
            AccountChange::Disabled(true) => "disabled",
            AccountChange::Disabled(false) => "enabled",
            AccountChange::Remove => "removed",
            AccountChange::Block(..) => "block",
        };
        let devices = self.sequencer.change_account(user.clone(), change).await?;
        self.hub.wake(user.localpart());
        tracing::info!(%user, change = %what, revoked = devices.len(), "account changed by operator");
        Ok(AdminResponse::Revoked { devices })
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    crate::store::blocking(f).await.map_err(ApiError::from)?
}

/// Most dead letters listed, retried or dropped at once.
const MAX_DEAD_LETTERS: usize = 100_000;

fn letter_id(dest: &ServerName, lane: u8, pos: u64) -> String {
    format!("{dest}/{lane}/{pos}")
}

fn parse_letter_id(id: &str) -> Result<Vec<u8>, ApiError> {
    let bad = || ApiError::invalid(format!("{id:?} is not a dead letter id (PEER/LANE/POSITION, as `deadletters list` shows)"));
    let mut parts = id.rsplitn(3, '/');
    let (pos, lane, dest) = (parts.next(), parts.next(), parts.next());
    let pos: u64 = pos.and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let lane: u8 = lane.and_then(|l| l.parse().ok()).filter(|l| *l < keys::LANES).ok_or_else(bad)?;
    let dest = dest.and_then(|d| ServerName::parse(d).ok()).ok_or_else(bad)?;
    Ok(keys::queue(&dest, lane, pos))
}

fn dead_letters(store: &dyn Store) -> Result<Vec<DeadLetterInfo>, ApiError> {
    let mut out = Vec::new();
    for (k, v) in store.scan(Cf::DeadLetters, &[], None, Direction::Forward, MAX_DEAD_LETTERS)? {
        let Some((peer, lane, pos)) = keys::parse_queue(&k) else { continue };
        let dl: records::DeadLetter = records::decode("dead_letters", &v)?;
        let (kind, from, to, seq) = match codec::decode::<Unit>(&dl.unit.unit) {
            Ok(Unit::Message(m)) => ("message", Some(m.from), Some(m.to), Some(m.seq)),
            Ok(Unit::Receipt(r)) => ("receipt", Some(r.user), Some(r.peer), None),
            Ok(Unit::Devices(c)) => ("devices", Some(c.user), None, None),
            _ => ("unknown", None, None, None),
        };
        out.push(DeadLetterInfo { id: letter_id(&peer, lane, pos), peer, reason: dl.reason, kind: kind.into(), from, to, seq });
    }
    Ok(out)
}

fn user_info(store: &dyn Store, user: UserId, rec: &UserRecord) -> Result<UserInfo, ApiError> {
    let devices = store.scan(Cf::Devices, &keys::devices_of(user.localpart()), None, Direction::Forward, usize::MAX)?.len();
    let state = if !rec.exists() {
        "removed"
    } else if rec.disabled {
        "disabled"
    } else {
        "active"
    };
    Ok(UserInfo { user, created_ms: rec.created_ms, state: state.into(), devices })
}

fn list_users(store: &dyn Store, server: &ServerName) -> Result<Vec<UserInfo>, ApiError> {
    let mut users = Vec::new();
    for (k, v) in store.scan(Cf::Users, &[], None, Direction::Forward, MAX_LISTED_USERS)? {
        let Some(user) = std::str::from_utf8(&k).ok().and_then(|l| UserId::new(l, server).ok()) else { continue };
        let rec: UserRecord = records::decode("users", &v)?;
        users.push(user_info(store, user, &rec)?);
    }
    Ok(users)
}

fn show_user(store: &dyn Store, user: &UserId) -> Result<(UserInfo, Vec<DeviceInfo>), ApiError> {
    let Some(v) = store.get(Cf::Users, &keys::user(user.localpart()))? else {
        return Err(ApiError::new(ErrorCode::UnknownUser, format!("no such user {user}")));
    };
    let rec: UserRecord = records::decode("users", &v)?;
    let mut devices = Vec::new();
    for (k, v) in store.scan(Cf::Devices, &keys::devices_of(user.localpart()), None, Direction::Forward, usize::MAX)? {
        let Some((_, id)) = keys::parse_device(&k) else { continue };
        let d: DeviceRecord = records::decode("devices", &v)?;
        devices.push(DeviceInfo { id, name: d.name, current: false, created_ms: d.created_ms });
    }
    Ok((user_info(store, user.clone(), &rec)?, devices))
}

/// Runs an account request with the server stopped: opens the database, starts a writer
/// over it, and stops it again.
pub async fn offline(config: &crate::config::Config, req: AdminRequest) -> anyhow::Result<AdminResponse> {
    if config.cluster.is_some() {
        // A write to this node's store alone would leave it apart from the other nodes.
        anyhow::bail!("this node is not running: in cluster mode, changes go through the cluster's log, so start this node (or run the command on a running one)");
    }
    let store: Arc<dyn Store> = Arc::new(crate::store::rocks::RocksStore::open(&config.db_dir())?);
    let hub = Arc::new(Hub::default());
    let ctx = crate::sequencer::WriterContext {
        server: config.server_name.clone(),
        key: Arc::new(missive_federation::ServerKey::load(&config.key_file)?),
        hub: hub.clone(),
        outbound: None,
        limits: Arc::new(crate::limits::LiveLimits::new(&config.limits)),
        metrics: Default::default(),
        linger: Default::default(),
        cluster: None,
    };
    let (sequencer, writer) = crate::sequencer::Sequencer::start(store.clone(), ctx)?;
    let ops = Operations { sequencer: sequencer.clone(), store, hub, server: config.server_name.clone() };
    let res = ops.execute(req).await;
    sequencer.stop().await;
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    res.ok_or_else(|| anyhow::anyhow!("the server is not running"))
}

/// What the admin socket needs from the running server.
pub struct AdminContext {
    pub ops: Operations,
    pub federation: Arc<crate::federation::Federation>,
    pub reloadable: Arc<crate::reload::Reloadable>,
    pub rocks: Arc<crate::store::rocks::RocksStore>,
}

/// The longest path a Unix socket can be bound at: `sun_path` (108 bytes on Linux, 104 on
/// the BSDs and macOS) holds it with its NUL.
pub const MAX_SOCKET_PATH: usize = if cfg!(any(target_os = "linux", target_os = "android")) { 107 } else { 103 };

/// Refuses a socket path the kernel could not bind, so that start-up stops before it
/// binds anything rather than running without its admin socket.
pub fn check_socket_path(path: &Path) -> anyhow::Result<()> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        bail!(
            "data dir path too long for the admin socket: {len} bytes, at most {MAX_SOCKET_PATH}; use a shorter data_dir ({})",
            path.display()
        );
    }
    Ok(())
}

/// The admin socket's file, removed when this is dropped: `server::run` holds it, so the
/// file goes on every way out of it, a failed start-up included.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the admin socket at `path`, readable and writable by the owner only.
pub fn bind(path: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    check_socket_path(path)?;
    // We hold the database lock, so no other server owns a socket here: a leftover is stale.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("cannot bind admin socket {}", path.display()))?;
    let file = SocketFile(path.to_owned());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict admin socket {}", path.display()))?;
    }
    Ok((listener, file))
}

async fn read_msg(s: &mut UnixStream) -> anyhow::Result<Vec<u8>> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).await?;
    let len = codec::frame_len(h, limits::MAX_REQUEST_FRAME)?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok(body)
}

/// Serves admin requests on a listener from [`bind`] until shutdown.
pub async fn serve(listener: UnixListener, ctx: AdminContext, mut shutdown: watch::Receiver<bool>) {
    let ctx = Arc::new(ctx);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => { tracing::warn!(error = %e, "admin accept failed"); continue; }
                };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &ctx).await {
                        tracing::warn!(error = %e, "admin request failed");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
}

async fn handle(mut stream: UnixStream, ctx: &AdminContext) -> anyhow::Result<()> {
    let req: AdminRequest = codec::decode(&read_msg(&mut stream).await?)?;
    let res = match req {
        AdminRequest::Reload {} => match ctx.reloadable.reload("admin request") {
            Ok(()) => AdminResponse::Ok {},
            Err(e) => AdminResponse::Error { message: format!("{e:#}") },
        },
        AdminRequest::Peers {} => match ctx.federation.status().await {
            Ok(peers) => AdminResponse::Peers { peers },
            Err(e) => AdminResponse::Error { message: format!("{e:#}") },
        },
        AdminRequest::Checkpoint { dir } => {
            let rocks = ctx.rocks.clone();
            match tokio::task::spawn_blocking(move || rocks.checkpoint(&dir)).await {
                Ok(Ok(())) => AdminResponse::Ok {},
                Ok(Err(e)) => AdminResponse::Error { message: e.to_string() },
                Err(e) => AdminResponse::Error { message: e.to_string() },
            }
        }
        AdminRequest::RemovePeer { name } => {
            let r = ctx.ops.execute(AdminRequest::RemovePeer { name: name.clone() }).await;
            ctx.federation.forget(&name);
            r.unwrap_or(AdminResponse::Ok {})
        }
        req => match ctx.ops.execute(req).await {
            Some(r) => r,
            None => AdminResponse::Error { message: "not an account request".into() },
        },
    };
    stream.write_all(&codec::frame(&codec::encode(&res))).await?;
    Ok(())
}

/// Sends one request to a running server. `Ok(None)` when no server listens on `path`.
pub async fn call(path: &Path, req: &AdminRequest) -> anyhow::Result<Option<AdminResponse>> {
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) => bail!("cannot reach the running server at {}: {e}", path.display()),
    };
    stream.write_all(&codec::frame(&codec::encode(req))).await?;
    Ok(Some(codec::decode(&read_msg(&mut stream).await?)?))
}
