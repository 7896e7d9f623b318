//! Messages written while the homeserver is unreachable. Each waits in its own file in the
//! profile's `outbox/` folder, named so that names sort in the order they were written,
//! with the `client_msg_id` it was created with. A flush sends them in order and deletes a
//! file only once the server has acknowledged it; the server's idempotent send (spec §6.4)
//! makes a resend after a crash between the two harmless. A message the server refuses
//! for good moves to `outbox/failed/` with the reason, where `missive outbox` shows it
//! until it is retried (moved back, keeping its place and id) or dropped.
//!
//! Every file is written whole or not at all (temporary file, fsync, rename, fsync of the
//! folder) with mode 0600.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use missive_spec::{limits, ClientMsgId, Message, UserId};
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::e2ee::{send_text, Crypto};
use crate::profile::{create_private_dir, write_private};

/// Bound on the entries the outbox holds, waiting and failed together: queueing more is
/// refused with an error, so a long outage cannot fill the disk one message at a time.
pub const MAX_ENTRIES: usize = 1000;

/// Shortest prefix of a `client_msg_id` shown as an entry's id.
pub const SHORT_ID_LEN: usize = 8;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Queued {
    pub to: UserId,
    pub text: String,
    /// Hex of the 16-byte client message id.
    pub client_msg_id: String,
    pub created_ms: u64,
    /// Why the server refused it, for an entry in `failed/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Sent unencrypted (`--plaintext`); otherwise encrypted when it leaves (e2ee.md E4).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plaintext: bool,
}

impl Queued {
    /// A message to queue now, under the id it was (or would have been) sent with.
    pub fn new(to: UserId, text: String, id: ClientMsgId) -> Queued {
        let created_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Queued { to, text, client_msg_id: id.to_hex(), created_ms, reason: None, plaintext: false }
    }

    pub fn id(&self) -> anyhow::Result<ClientMsgId> {
        let b = hex::decode(&self.client_msg_id).context("bad client_msg_id in outbox")?;
        Ok(ClientMsgId::from_slice(&b)?)
    }
}

/// Where an entry is: waiting to be sent, or refused by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Waiting,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Failed => "failed",
        }
    }
}

/// One entry of the outbox and the file that holds it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    pub state: State,
    pub queued: Queued,
}

pub struct Outbox {
    dir: PathBuf,
    failed: PathBuf,
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

/// Refuses a body the server would refuse (spec §8), before anything is queued or sent.
pub fn check_size(text: &str) -> anyhow::Result<()> {
    if text.len() > limits::MAX_CONTENT_BODY {
        bail!(
            "the message is {} bytes; a message body may be at most {} bytes (spec §8): shorten it or split it",
            text.len(),
            limits::MAX_CONTENT_BODY
        );
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn entry_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let read = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.with_context(|| format!("cannot read {}", dir.display()))?,
    };
    let mut names: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')))
        .collect();
    names.sort();
    Ok(names)
}

fn read_entry(path: PathBuf, state: State) -> anyhow::Result<Entry> {
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let queued = serde_json::from_slice(&bytes).with_context(|| format!("corrupt {}", path.display()))?;
    Ok(Entry { path, state, queued })
}

impl Outbox {
    pub fn open(profile: &Path) -> anyhow::Result<Outbox> {
        let dir = profile.join("outbox");
        let failed = dir.join("failed");
        create_private_dir(&dir)?;
        Ok(Outbox { dir, failed })
    }

    /// Stores a message durably, unless it is too large or the outbox is full.
    pub fn push(&self, q: &Queued) -> anyhow::Result<PathBuf> {
        check_size(&q.text)?;
        let held = entry_files(&self.dir)?.len() + entry_files(&self.failed)?.len();
        if held >= MAX_ENTRIES {
            bail!("the outbox is full ({MAX_ENTRIES} messages); send them or drop some (`missive outbox`) before writing more");
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let name = format!("{nanos:024}-{}.json", q.client_msg_id);
        write_private(&self.dir, &name, &serde_json::to_vec_pretty(q)?)?;
        Ok(self.dir.join(name))
    }

    /// Waiting messages, oldest first.
    pub fn list(&self) -> anyhow::Result<Vec<(PathBuf, Queued)>> {
        entry_files(&self.dir)?.into_iter().map(|p| read_entry(p, State::Waiting).map(|e| (e.path, e.queued))).collect()
    }

    /// Every entry: waiting ones first, then failed ones, each oldest first.
    pub fn entries(&self) -> anyhow::Result<Vec<Entry>> {
        let waiting = entry_files(&self.dir)?.into_iter().map(|p| read_entry(p, State::Waiting));
        let failed = entry_files(&self.failed)?.into_iter().map(|p| read_entry(p, State::Failed));
        waiting.chain(failed).collect()
    }

    pub fn is_empty(&self) -> anyhow::Result<bool> {
        Ok(entry_files(&self.dir)?.is_empty())
    }

    /// The one entry whose `client_msg_id` starts with `id` (hex, any case).
    pub fn find(&self, id: &str) -> anyhow::Result<Entry> {
        let id = id.to_ascii_lowercase();
        if id.len() < 4 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
            bail!("{id:?} is not an outbox id: give at least 4 hex digits, as `missive outbox` shows them");
        }
        let mut found: Vec<Entry> = self.entries()?.into_iter().filter(|e| e.queued.client_msg_id.starts_with(&id)).collect();
        match found.len() {
            0 => bail!("no outbox entry has the id {id} (see `missive outbox`)"),
            1 => Ok(found.remove(0)),
            n => bail!("{n} outbox entries start with {id}; give more of the id"),
        }
    }

    /// Puts a failed entry back in the queue, in its old place and with its old id: it is
    /// sent with the next connection.
    pub fn retry(&self, id: &str) -> anyhow::Result<Queued> {
        let e = self.find(id)?;
        if e.state == State::Waiting {
            bail!("the message {} is already waiting to be sent", short_id(&e.queued.client_msg_id, SHORT_ID_LEN));
        }
        let name = file_name(&e.path)?;
        let mut q = e.queued;
        q.reason = None;
        write_private(&self.dir, &name, &serde_json::to_vec_pretty(&q)?)?;
        remove(&e.path)?;
        Ok(q)
    }

    /// Deletes an entry, waiting or failed, for good.
    pub fn drop_entry(&self, id: &str) -> anyhow::Result<Queued> {
        let e = self.find(id)?;
        remove(&e.path)?;
        Ok(e.queued)
    }

    /// Moves a refused entry to `failed/`, recording why.
    fn fail(&self, path: &Path, mut q: Queued, reason: String) -> anyhow::Result<Queued> {
        q.reason = Some(reason);
        create_private_dir(&self.failed)?;
        write_private(&self.failed, &file_name(path)?, &serde_json::to_vec_pretty(&q)?)?;
        remove(path)?;
        Ok(q)
    }

    /// Sends what waits, in order, stopping (and keeping the rest) if the server becomes
    /// unreachable. Each message is encrypted now, with the keys current when it leaves.
    pub async fn flush(&self, c: &Client, crypto: &mut Crypto) -> anyhow::Result<Flushed> {
        let mut out = Flushed::default();
        let all = self.list()?;
        let total = all.len();
        for (i, (path, q)) in all.into_iter().enumerate() {
            match send_text(c, crypto, &q.to, &q.text, q.id()?, q.plaintext).await {
                Ok(m) => {
                    remove(&path)?;
                    out.sent.push(m);
                }
                Err(e) if e.is_later() => {
                    out.waiting = total - i;
                    break;
                }
                Err(e) => {
                    let reason = match e.refusal() {
                        Some((code, message)) => format!("{code}: {message}"),
                        None => format!("{e:#}"),
                    };
                    out.failed.push((self.fail(&path, q, reason.clone())?, reason));
                }
            }
        }
        Ok(out)
    }
}

fn file_name(path: &Path) -> anyhow::Result<String> {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).with_context(|| format!("{} has no file name", path.display()))
}

fn remove(path: &Path) -> anyhow::Result<()> {
    std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// The first `len` hex digits of a client message id.
pub fn short_id(client_msg_id: &str, len: usize) -> &str {
    client_msg_id.get(..len).unwrap_or(client_msg_id)
}

/// How many hex digits (at least [`SHORT_ID_LEN`]) tell every entry apart.
pub fn short_id_len(entries: &[Entry]) -> usize {
    let mut ids: Vec<&str> = entries.iter().map(|e| e.queued.client_msg_id.as_str()).collect();
    ids.sort_unstable();
    let shared = ids.windows(2).map(|w| w[0].bytes().zip(w[1].bytes()).take_while(|(a, b)| a == b).count()).max().unwrap_or(0);
    (shared + 1).max(SHORT_ID_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(id: &str, text: &str) -> Queued {
        Queued {
            to: UserId::parse("@bob:alpha.example").unwrap(),
            text: text.into(),
            client_msg_id: id.into(),
            created_ms: 1,
            reason: None,
            plaintext: false,
        }
    }

    #[test]
    fn oversized_bodies_are_refused_before_queueing() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path()).unwrap();
        let big = "x".repeat(limits::MAX_CONTENT_BODY + 1);
        let e = o.push(&queued("00112233445566778899aabbccddeeff", &big)).unwrap_err();
        assert!(e.to_string().contains("at most 16384 bytes"), "{e}");
        assert!(o.entries().unwrap().is_empty());
        o.push(&queued("00112233445566778899aabbccddeeff", &"x".repeat(limits::MAX_CONTENT_BODY))).unwrap();
    }

    #[test]
    fn failed_entries_are_listed_retried_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path()).unwrap();
        let a = o.push(&queued("aaaa0000000000000000000000000000", "one")).unwrap();
        o.push(&queued("bbbb0000000000000000000000000000", "two")).unwrap();
        let q = o.list().unwrap().remove(0).1;
        o.fail(&a, q, "unknown_user: no such user".into()).unwrap();
        let states: Vec<_> = o.entries().unwrap().iter().map(|e| (e.queued.text.clone(), e.state, e.queued.reason.clone())).collect();
        assert_eq!(
            states,
            vec![("two".into(), State::Waiting, None), ("one".into(), State::Failed, Some("unknown_user: no such user".into()))]
        );
        assert!(o.retry("bbbb").is_err(), "a waiting entry cannot be retried");
        assert!(o.find("00").is_err() && o.find("cccc").is_err());
        o.retry("AAAA").unwrap();
        let texts: Vec<_> = o.list().unwrap().into_iter().map(|(_, q)| (q.text, q.reason)).collect();
        assert_eq!(texts, vec![("one".into(), None), ("two".into(), None)], "the retried entry keeps its place");
        o.drop_entry("bbbb0").unwrap();
        assert_eq!(o.entries().unwrap().len(), 1);
    }

    #[test]
    fn short_ids_grow_until_they_differ() {
        let entry = |id: &str| Entry { path: PathBuf::new(), state: State::Waiting, queued: queued(id, "") };
        assert_eq!(short_id_len(&[entry("0123456789abcdef0123456789abcdef")]), SHORT_ID_LEN);
        let two = [entry("0123456789abcdef0123456789abcdef"), entry("0123456789ab0000000000000000000")];
        assert_eq!(short_id_len(&two), 13);
    }

    #[test]
    fn the_outbox_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path()).unwrap();
        for i in 0..MAX_ENTRIES {
            o.push(&queued(&format!("{i:032x}"), "m")).unwrap();
        }
        let e = o.push(&queued("ffffffffffffffffffffffffffffffff", "m")).unwrap_err();
        assert!(e.to_string().contains("the outbox is full"), "{e}");
    }
}
