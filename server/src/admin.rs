//! The operator's channel into a running server: a Unix socket in the data directory,
//! reachable only by the account that owns the data (mode 0600). `missived user add` uses
//! it while the server runs, and opens the database directly when it does not.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use missive_spec::{codec, limits, UserId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::sequencer::Sequencer;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRequest {
    AddUser { user: UserId, password_hash: String },
    /// Re-read the config file and apply what can change live, as SIGHUP does
    /// ([`crate::reload::Reloadable`]); `missived peer add` sends it.
    #[serde(alias = "reload_peers")]
    Reload {},
    /// Federation link state per peer.
    Peers {},
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminResponse {
    Ok {},
    Peers { peers: Vec<crate::federation::PeerStatus> },
    Error { message: String },
}

/// What the admin socket needs from the running server.
pub struct AdminContext {
    pub sequencer: Sequencer,
    pub federation: Arc<crate::federation::Federation>,
    pub reloadable: Arc<crate::reload::Reloadable>,
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
        AdminRequest::AddUser { user, password_hash } => match ctx.sequencer.create_user(user.clone(), password_hash, None).await {
            Ok(()) => {
                tracing::info!(%user, "user added by operator");
                AdminResponse::Ok {}
            }
            Err(e) => AdminResponse::Error { message: e.to_string() },
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
