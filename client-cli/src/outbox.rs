//! Messages written while the homeserver is unreachable. Each waits in its own file in the
//! profile's `outbox/` folder, named so that names sort in the order they were written,
//! with the `client_msg_id` it was created with. A flush sends them in order and deletes a
//! file only once the server has acknowledged it; the server's idempotent send (spec §6.4)
//! makes a resend after a crash between the two harmless.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use missive_spec::{ClientMsgId, Content, Message, UserId};
use serde::{Deserialize, Serialize};

use crate::client::{Client, ClientError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Queued {
    pub to: UserId,
    pub text: String,
    /// Hex of the 16-byte client message id.
    pub client_msg_id: String,
    pub created_ms: u64,
}

impl Queued {
    pub fn id(&self) -> anyhow::Result<ClientMsgId> {
        let b = hex::decode(&self.client_msg_id).context("bad client_msg_id in outbox")?;
        Ok(ClientMsgId::from_slice(&b)?)
    }
}

pub struct Outbox {
    dir: PathBuf,
}

/// What a flush did.
#[derive(Debug, Default)]
pub struct Flushed {
    pub sent: Vec<Message>,
    /// Refused by the server for good (moved to `outbox/failed/`), with the reason.
    pub failed: Vec<(Queued, String)>,
    /// Still waiting: the server became unreachable again.
    pub waiting: usize,
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Outbox {
    pub fn open(profile: &Path) -> anyhow::Result<Outbox> {
        let dir = profile.join("outbox");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Outbox { dir })
    }

    /// Stores a message durably (written, synced, renamed into place).
    pub fn push(&self, q: &Queued) -> anyhow::Result<PathBuf> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let name = format!("{nanos:024}-{}.json", q.client_msg_id);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(q)?)?;
        f.sync_all()?;
        let path = self.dir.join(name);
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.dir);
        Ok(path)
    }

    /// Waiting messages, oldest first.
    pub fn list(&self) -> anyhow::Result<Vec<(PathBuf, Queued)>> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json") && p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')))
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|p| {
                let q: Queued = serde_json::from_slice(&std::fs::read(&p)?).with_context(|| format!("corrupt {}", p.display()))?;
                Ok((p, q))
            })
            .collect()
    }

    pub fn is_empty(&self) -> anyhow::Result<bool> {
        Ok(self.list()?.is_empty())
    }

    /// Sends what waits, in order, stopping (and keeping the rest) if the server becomes
    /// unreachable.
    pub async fn flush(&self, c: &Client) -> anyhow::Result<Flushed> {
        let mut out = Flushed::default();
        let all = self.list()?;
        let total = all.len();
        for (i, (path, q)) in all.into_iter().enumerate() {
            match c.send(&q.to, Content::text(&q.text), q.id()?).await {
                Ok(m) => {
                    std::fs::remove_file(&path)?;
                    sync_dir(&self.dir);
                    out.sent.push(m);
                }
                Err(ClientError::Server { code, message }) => {
                    let failed = self.dir.join("failed");
                    std::fs::create_dir_all(&failed)?;
                    if let Some(name) = path.file_name() {
                        std::fs::rename(&path, failed.join(name))?;
                    }
                    out.failed.push((q, format!("{code}: {message}")));
                }
                Err(_) => {
                    out.waiting = total - i;
                    break;
                }
            }
        }
        Ok(out)
    }
}
