//! The CLI's local state: one directory per profile, so that several users can run on one
//! machine. It holds the session (server address, device, access token, sync position)
//! and the server keys pinned on first use, like SSH's `known_hosts`. The directory is
//! mode 0700 and every file in it 0600, set explicitly whatever the umask.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use missive_transport::PublicKey;
use missive_spec::{ServerName, UserId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const SESSION_FILE: &str = "session.json";
const KNOWN_SERVERS_FILE: &str = "known_servers.json";

/// A logged-in device, as remembered between commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionFile {
    pub user: UserId,
    /// The address given at login (`HOST:PORT`).
    pub server: String,
    pub device: String,
    pub token: String,
    /// Position in the user's event stream up to which `sync`/`listen` have shown events.
    #[serde(default)]
    pub sync_pos: u64,
}

pub struct Profile {
    dir: PathBuf,
}

impl Profile {
    /// Opens (creating, owner-only) the profile directory.
    pub fn open(dir: &Path) -> anyhow::Result<Profile> {
        create_private_dir(dir).context("cannot open the profile (set it with --profile or MISSIVE_PROFILE)")?;
        Ok(Profile { dir: dir.to_owned() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read<T: DeserializeOwned>(&self, name: &str) -> anyhow::Result<Option<T>> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("corrupt {}", path.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> anyhow::Result<()> {
        write_private(&self.dir, name, &serde_json::to_vec_pretty(value)?)
    }

    pub fn session(&self) -> anyhow::Result<Option<SessionFile>> {
        self.read(SESSION_FILE)
    }

    /// The session, or an error telling the user to log in.
    pub fn require_session(&self) -> anyhow::Result<SessionFile> {
        self.session()?.ok_or_else(|| {
            anyhow::anyhow!("not logged in (profile {}); run `missive login` first", self.dir.display())
        })
    }

    pub fn save_session(&self, s: &SessionFile) -> anyhow::Result<()> {
        self.write(SESSION_FILE, s)
    }

    pub fn clear_session(&self) -> anyhow::Result<()> {
        let path = self.dir.join(SESSION_FILE);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("cannot remove {}", path.display())),
            _ => Ok(()),
        }
    }

    fn known(&self) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(self.read(KNOWN_SERVERS_FILE)?.unwrap_or_default())
    }

    /// The key pinned for `server`, if it was met before.
    pub fn pinned(&self, server: &ServerName) -> anyhow::Result<Option<PublicKey>> {
        match self.known()?.get(server.as_str()) {
            Some(k) => Ok(Some(PublicKey::parse(k)?)),
            None => Ok(None),
        }
    }

    pub fn pin(&self, server: &ServerName, key: &PublicKey) -> anyhow::Result<()> {
        let mut known = self.known()?;
        known.insert(server.as_str().to_owned(), key.to_text());
        self.write(KNOWN_SERVERS_FILE, &known)
    }
}

/// Creates `dir` (and its parents) if missing and makes it owner-only (0700).
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (mode 0700)", dir.display()))?;
    }
    Ok(())
}

/// Replaces `dir/name` atomically and durably with an owner-only (0600) file: written to a
/// temporary file, synced, renamed into place, then the directory synced.
pub fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        // Set explicitly too: the umask can change the mode given at creation, and a file
        // left by an earlier crash keeps its old one.
        #[cfg(unix)]
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    written.with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
