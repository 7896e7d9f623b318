//! The device key store: one SQLite file in the profile (mode 0600) holding this device's
//! Olm account and sessions, the peers' devices as last seen and verified, and what this
//! device decrypted (a ciphertext opens once, so `history` reads it from here).
//!
//! Olm pickles are encrypted (vodozemac's pickle encryption) with a 32-byte key kept in
//! its own file beside the store, also 0600: a copy of the database alone does not give
//! the keys away; whoever can read the whole profile directory can read both, as with any
//! client that starts without a passphrase. Plaintext of decrypted messages is kept as the
//! message archive keeps it.
//!
//! Every change that spends a key (a session created, a message decrypted) happens in one
//! `BEGIN IMMEDIATE` transaction, so two `missive` commands of one profile never use the
//! same ratchet step twice.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// The store's file in the profile directory.
pub const FILE: &str = "e2ee.sqlite3";
/// The pickle key's file beside it.
pub const KEY_FILE: &str = "e2ee.key";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS account (
    device TEXT PRIMARY KEY,
    pickle TEXT NOT NULL,
    next_key_id INTEGER NOT NULL,
    pending BLOB                  -- an upload built but not yet acknowledged, sent again as is
);
CREATE TABLE IF NOT EXISTS session (
    device TEXT NOT NULL,         -- our device
    peer_key BLOB NOT NULL,       -- the other device's curve25519 key
    session_id TEXT NOT NULL,
    pickle TEXT NOT NULL,
    used INTEGER NOT NULL,        -- a counter: the newest session per peer key encrypts
    PRIMARY KEY (device, peer_key, session_id)
);
CREATE TABLE IF NOT EXISTS peer_device (
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    ed25519 BLOB NOT NULL,
    curve25519 BLOB NOT NULL,
    PRIMARY KEY (user, device)
);
CREATE TABLE IF NOT EXISTS peer (
    user TEXT PRIMARY KEY,
    had_keys INTEGER NOT NULL,    -- once a user published keys, plaintext to them is refused
    verified TEXT                 -- their half of the safety number when verified
);
CREATE TABLE IF NOT EXISTS sent (
    body BLOB PRIMARY KEY,        -- a sealed body this device made
    content BLOB NOT NULL,        -- CBOR of the Content it carries
    conv BLOB NOT NULL            -- the conversation it was sealed for
);
CREATE TABLE IF NOT EXISTS opened (
    conv BLOB NOT NULL,
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    content BLOB NOT NULL,        -- CBOR of the decrypted Content
    sender TEXT NOT NULL,         -- the message's sender, checked on every read
    PRIMARY KEY (conv, origin, seq)
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

pub struct Store {
    pub conn: Connection,
    pub key: [u8; 32],
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        let path = dir.join(FILE);
        let key = pickle_key(dir)?;
        let existed = path.exists();
        let conn = Connection::open(&path).with_context(|| format!("cannot open the device key store {}", path.display()))?;
        if !existed {
            restrict(&path)?;
        }
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(SCHEMA).with_context(|| format!("the device key store {}", path.display()))?;
        for side in ["-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(side);
            let _ = restrict(Path::new(&p));
        }
        Ok(Store { conn, key })
    }

    /// Runs `f` in an immediate (write-locked) transaction.
    pub fn locked<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>, &[u8; 32]) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let key = self.key;
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        let r = f(&tx, &key)?;
        tx.commit()?;
        Ok(r)
    }
}

/// The account row of a device: pickle, next key id, pending upload.
pub fn account(tx: &Connection, device: &str) -> anyhow::Result<Option<(String, u64, Option<Vec<u8>>)>> {
    Ok(tx
        .query_row("SELECT pickle, next_key_id, pending FROM account WHERE device = ?1", params![device], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, Option<Vec<u8>>>(2)?))
        })
        .optional()?)
}

pub fn save_account(tx: &Connection, device: &str, pickle: &str, next_key_id: u64, pending: Option<&[u8]>) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO account (device, pickle, next_key_id, pending) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (device) DO UPDATE SET pickle = ?2, next_key_id = ?3, pending = ?4",
        params![device, pickle, next_key_id as i64, pending],
    )?;
    Ok(())
}

/// Sessions with one peer device key, newest first: (session id, pickle).
pub fn sessions(tx: &Connection, device: &str, peer_key: &[u8]) -> anyhow::Result<Vec<(String, String)>> {
    let mut st = tx.prepare_cached("SELECT session_id, pickle FROM session WHERE device = ?1 AND peer_key = ?2 ORDER BY used DESC")?;
    let rows = st.query_map(params![device, peer_key], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn save_session(tx: &Connection, device: &str, peer_key: &[u8], session_id: &str, pickle: &str) -> anyhow::Result<()> {
    let used: i64 = tx.query_row("SELECT coalesce(max(used), 0) + 1 FROM session", [], |r| r.get(0))?;
    tx.execute(
        "INSERT INTO session (device, peer_key, session_id, pickle, used) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (device, peer_key, session_id) DO UPDATE SET pickle = ?4, used = ?5",
        params![device, peer_key, session_id, pickle, used],
    )?;
    Ok(())
}

/// A peer's devices as last seen: (device, ed25519, curve25519).
pub fn known_devices(tx: &Connection, user: &str) -> anyhow::Result<Vec<(String, Vec<u8>, Vec<u8>)>> {
    let mut st = tx.prepare_cached("SELECT device, ed25519, curve25519 FROM peer_device WHERE user = ?1 ORDER BY device")?;
    let rows = st.query_map(params![user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn set_known_devices(tx: &Connection, user: &str, devices: &[(String, Vec<u8>, Vec<u8>)]) -> anyhow::Result<()> {
    tx.execute("DELETE FROM peer_device WHERE user = ?1", params![user])?;
    for (d, ed, curve) in devices {
        tx.execute("INSERT INTO peer_device (user, device, ed25519, curve25519) VALUES (?1, ?2, ?3, ?4)", params![user, d, ed, curve])?;
    }
    if !devices.is_empty() {
        tx.execute(
            "INSERT INTO peer (user, had_keys) VALUES (?1, 1) ON CONFLICT (user) DO UPDATE SET had_keys = 1",
            params![user],
        )?;
    }
    Ok(())
}

/// Whether the user ever published keys, and their verified half of the safety number.
pub fn peer(tx: &Connection, user: &str) -> anyhow::Result<(bool, Option<String>)> {
    Ok(tx
        .query_row("SELECT had_keys, verified FROM peer WHERE user = ?1", params![user], |r| Ok((r.get::<_, i64>(0)? != 0, r.get(1)?)))
        .optional()?
        .unwrap_or((false, None)))
}

pub fn set_verified(tx: &Connection, user: &str, digits: &str) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO peer (user, had_keys, verified) VALUES (?1, 1, ?2) ON CONFLICT (user) DO UPDATE SET verified = ?2",
        params![user, digits],
    )?;
    Ok(())
}

/// What this device opened of a message before: its content (CBOR) and its sender.
pub fn opened(tx: &Connection, conv: &[u8], origin: &str, seq: u64) -> anyhow::Result<Option<(Vec<u8>, String)>> {
    Ok(tx
        .query_row(
            "SELECT content, sender FROM opened WHERE conv = ?1 AND origin = ?2 AND seq = ?3",
            params![conv, origin, seq as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

pub fn save_opened(tx: &Connection, conv: &[u8], origin: &str, seq: u64, content: &[u8], sender: &str) -> anyhow::Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO opened (conv, origin, seq, content, sender) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![conv, origin, seq as i64, content, sender],
    )?;
    Ok(())
}

pub fn meta(tx: &Connection, name: &str) -> anyhow::Result<Option<u64>> {
    Ok(tx.query_row("SELECT value FROM meta WHERE name = ?1", params![name], |r| r.get::<_, i64>(0)).optional()?.map(|v| v as u64))
}

pub fn set_meta(tx: &Connection, name: &str, value: u64) -> anyhow::Result<()> {
    tx.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)", params![name, value as i64])?;
    Ok(())
}

/// Remembers what a sealed body this device made carries: no ciphertext is made for the
/// sending device, and its own message may come back on the event stream before the
/// send's answer does.
pub fn save_sent(tx: &Connection, body: &[u8], content: &[u8], conv: &[u8]) -> anyhow::Result<()> {
    tx.execute("INSERT OR REPLACE INTO sent (body, content, conv) VALUES (?1, ?2, ?3)", params![body, content, conv])?;
    Ok(())
}

pub fn forget_sent(tx: &Connection, body: &[u8]) -> anyhow::Result<()> {
    tx.execute("DELETE FROM sent WHERE body = ?1", params![body])?;
    Ok(())
}

/// What a sealed body of this device carries, and the conversation it was sealed for.
pub fn sent(tx: &Connection, body: &[u8]) -> anyhow::Result<Option<(Vec<u8>, Vec<u8>)>> {
    Ok(tx.query_row("SELECT content, conv FROM sent WHERE body = ?1", params![body], |r| Ok((r.get(0)?, r.get(1)?))).optional()?)
}

/// The pickle key: read from its file, or made (32 random bytes, mode 0600) on first use.
fn pickle_key(dir: &Path) -> anyhow::Result<[u8; 32]> {
    let path = dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(b) => b.as_slice().try_into().map_err(|_| anyhow::anyhow!("{} is not a 32-byte key; the device key store cannot be read", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Written whole beside it, then linked in place: a reader never sees half a
            // key, and of two commands making one at once the first link wins.
            let key: [u8; 32] = rand::random();
            let tmp = dir.join(format!("{KEY_FILE}.{}.tmp", std::process::id()));
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let written = opts.open(&tmp).and_then(|mut f| {
                use std::io::Write;
                f.write_all(&key)?;
                f.sync_all()
            });
            written.with_context(|| format!("cannot create {}", tmp.display()))?;
            restrict(&tmp)?;
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => Ok(key),
                // Another command made it first.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => pickle_key(dir),
                Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
            }
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn restrict(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    Ok(())
}
