//! The profile's message archive: every message its commands printed or returned
//! (`sync`, `listen`, `history`, `send`, `chat`), kept in one SQLite file with a full-text
//! index (FTS5) over text bodies, so that `missive search` works offline and will keep
//! working once bodies are end-to-end encrypted and the server can no longer search.
//!
//! - [`Archive`] is the store: [`Archive::open`], [`Archive::record`] /
//!   [`Archive::record_all`], [`Archive::search`].
//! - [`Recorder`] is how commands use it: best effort, it never makes a command fail and
//!   says once on standard error when the archive cannot be written.
//!
//! A message is kept once per identity (conversation, origin, seq); seeing it again (a
//! `sync`, then a `history` page) changes nothing. Bodies of other content types are kept
//! but not indexed. Bounds: the archive grows with the messages the user sends and
//! receives (as a messaging client's history does) and is bounded only by the disk; what
//! one search returns is bounded by [`MAX_LIMIT`], and a query by [`MAX_QUERY_WORDS`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use missive_spec::{codec, Event, EventKind, Message, UserId};
use rusqlite::{params, Connection, OpenFlags, Transaction, TransactionBehavior};

use crate::profile::Profile;

/// The archive's file in the profile directory.
pub const FILE: &str = "archive.sqlite3";
/// Schema version kept in SQLite's `user_version`; a later version migrates from it.
pub const SCHEMA_VERSION: i64 = 1;
/// Marks the file as Missive's (SQLite's `application_id`): ASCII `MSVA`.
const APPLICATION_ID: i64 = 0x4d53_5641;
/// Most hits one search returns.
pub const MAX_LIMIT: u32 = 1000;
/// Words of a query beyond this many are ignored.
pub const MAX_QUERY_WORDS: usize = 32;
/// Tokens around the match in a hit's [`Hit::snippet`].
const SNIPPET_TOKENS: i64 = 24;
/// Start and end of a match inside [`Hit::snippet`].
pub const MATCH_START: &str = "\u{2}";
pub const MATCH_END: &str = "\u{3}";

/// Row ids order messages newest first without a sort: the message's timestamp in the
/// high bits, a counter for messages of the same millisecond in the low ones. A search
/// then walks the index backwards by row id and stops after `limit` hits.
const TS_SHIFT: u32 = 20;
/// Timestamps are the origin's claim: clamped below 2^43 ms (year 2248) so ids fit an i64.
const MAX_TS: u64 = (1 << (63 - TS_SHIFT)) - 1;

const SCHEMA: &str = "
CREATE TABLE message (
    id INTEGER PRIMARY KEY,      -- timestamp << 20 | counter: newest has the highest id
    conv BLOB NOT NULL,
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL,        -- the u64 origin_seq, bit for bit
    ts INTEGER NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    content_type TEXT NOT NULL,
    text TEXT,                   -- the body when it is text; what the index covers
    encoded BLOB NOT NULL,       -- the whole message as deterministic CBOR
    UNIQUE (conv, origin, seq)
);
CREATE INDEX message_sender ON message (sender);
CREATE INDEX message_recipient ON message (recipient);
CREATE VIRTUAL TABLE message_text USING fts5(
    text, content = 'message', content_rowid = 'id', tokenize = 'unicode61 remove_diacritics 2'
);
";

/// Why the archive could not be used. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot open the message archive {}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{} is not a Missive message archive ({why}); move it away and a new one is made", path.display())]
    Foreign { path: PathBuf, why: String },
    #[error("the message archive {} has schema version {found}, newer than this missive ({SCHEMA_VERSION})", path.display())]
    Newer { path: PathBuf, found: i64 },
    #[error("the message archive {}: {source}", path.display())]
    Sql { path: PathBuf, source: rusqlite::Error },
    #[error("the message archive {} holds an unreadable message: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
}

/// A message found by [`Archive::search`].
#[derive(Debug, Clone)]
pub struct Hit {
    pub message: Message,
    /// The text around the match, each matching word between [`MATCH_START`] and
    /// [`MATCH_END`]; `…` where text was left out.
    pub snippet: String,
}

impl Hit {
    /// The snippet with the match marks replaced by `start` and `end`, on one line.
    pub fn marked(&self, start: &str, end: &str) -> String {
        self.snippet.replace(MATCH_START, start).replace(MATCH_END, end).replace(['\n', '\r'], " ")
    }
}

/// What [`Archive::search`] found.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// Newest first.
    pub hits: Vec<Hit>,
    /// More messages match than the limit let through.
    pub more: bool,
}

/// The message archive of one profile.
pub struct Archive {
    conn: Connection,
    path: PathBuf,
}

impl fmt::Debug for Archive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Archive").field("path", &self.path).finish()
    }
}

impl Archive {
    /// Opens the profile's archive, creating it (mode 0600) on first use.
    pub fn open(profile: &Profile) -> Result<Archive, ArchiveError> {
        Archive::open_path(&profile.dir().join(FILE))
    }

    /// Opens (or creates) an archive file.
    pub fn open_path(path: &Path) -> Result<Archive, ArchiveError> {
        create_private(path)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let sql = |source| ArchiveError::Sql { path: path.to_owned(), source };
        let conn = Connection::open_with_flags(path, flags).map_err(sql)?;
        // One writer (say `listen`) and readers (`search`) at once; a writer waits its turn.
        conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
        let archive = Archive { conn, path: path.to_owned() };
        archive.check_and_migrate()?;
        archive.conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
        // A crash may lose the last few messages recorded; the server still has them.
        archive.conn.pragma_update(None, "synchronous", "NORMAL").map_err(sql)?;
        for side in ["-wal", "-shm", "-journal"] {
            let mut p = path.as_os_str().to_owned();
            p.push(side);
            restrict(Path::new(&p))?;
        }
        Ok(archive)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> ArchiveError {
        match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => {
                ArchiveError::Foreign { path: self.path.clone(), why: "not an SQLite database".into() }
            }
            _ => ArchiveError::Sql { path: self.path.clone(), source },
        }
    }

    /// Refuses files that are not an archive of this or an older version; creates the
    /// schema in a new file.
    fn check_and_migrate(&self) -> Result<(), ArchiveError> {
        match self.check()? {
            SCHEMA_VERSION => Ok(()),
            0 => {
                // Two commands may meet a new file at once: the second finds the schema made.
                let tx =
                    Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(|e| self.sql(e))?;
                if self.check()? == 0 {
                    tx.execute_batch(SCHEMA).map_err(|e| self.sql(e))?;
                    tx.pragma_update(None, "application_id", APPLICATION_ID).map_err(|e| self.sql(e))?;
                    tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(|e| self.sql(e))?;
                }
                tx.commit().map_err(|e| self.sql(e))
            }
            found => Err(ArchiveError::Newer { path: self.path.clone(), found }),
        }
    }

    /// The file's schema version (0: empty), or why it is not an archive.
    fn check(&self) -> Result<i64, ArchiveError> {
        let app: i64 = self.conn.pragma_query_value(None, "application_id", |r| r.get(0)).map_err(|e| self.sql(e))?;
        let version: i64 = self.conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| self.sql(e))?;
        if app != APPLICATION_ID {
            let tables: i64 =
                self.conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0)).map_err(|e| self.sql(e))?;
            if app != 0 || version != 0 || tables != 0 {
                return Err(ArchiveError::Foreign {
                    path: self.path.clone(),
                    why: format!("an SQLite database of another program (application id {app:#x})"),
                });
            }
        }
        Ok(version)
    }

    /// Keeps a message; false if it was already kept.
    pub fn record(&self, m: &Message) -> Result<bool, ArchiveError> {
        Ok(self.record_all([m])? == 1)
    }

    /// Keeps messages in one transaction; returns how many were new.
    pub fn record_all<'a>(&self, messages: impl IntoIterator<Item = &'a Message>) -> Result<usize, ArchiveError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.sql(e))?;
        let mut new = 0;
        for m in messages {
            if self.insert(m).map_err(|e| self.sql(e))? {
                new += 1;
            }
        }
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(new)
    }

    fn insert(&self, m: &Message) -> rusqlite::Result<bool> {
        let id = self.free_id(m.ts)?;
        let text = crate::e2ee::shown(&m.content).text;
        let inserted = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO message (id, conv, origin, seq, ts, sender, recipient, content_type, text, encoded)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            id,
            m.conv.as_bytes().as_slice(),
            m.origin.as_str(),
            m.seq as i64,
            m.ts.min(MAX_TS) as i64,
            m.from.as_str(),
            m.to.as_str(),
            m.content.kind,
            text,
            codec::encode(m)
        ])?;
        // Ignored: this (conversation, origin, seq) is already kept.
        if inserted == 0 {
            return Ok(false);
        }
        if let Some(t) = text {
            self.conn
                .prepare_cached("INSERT INTO message_text (rowid, text) VALUES (?1, ?2)")?
                .execute(params![id, t])?;
        }
        Ok(true)
    }

    /// The next free row id for a message of timestamp `ts` (see [`TS_SHIFT`]).
    fn free_id(&self, ts: u64) -> rusqlite::Result<i64> {
        let base = (ts.min(MAX_TS) << TS_SHIFT) as i64;
        let end = base + ((1 << TS_SHIFT) - 1);
        let next: i64 = self
            .conn
            .prepare_cached("SELECT coalesce(max(id) + 1, ?1) FROM message WHERE id >= ?1 AND id <= ?2")?
            .query_row(params![base, end], |r| r.get(0))?;
        if next <= end {
            return Ok(next);
        }
        // A million messages in one millisecond (a server can claim anything): after the
        // newest; such a message sorts as newer than it is.
        self.conn.query_row("SELECT max(id) + 1 FROM message", [], |r| r.get(0))
    }

    /// Messages whose text has every word of `query` (the last one as a prefix), newest
    /// first, at most `limit` (capped at [`MAX_LIMIT`]); only those exchanged with `with`
    /// when given. Any input is a valid query: words are taken from it, never its syntax.
    pub fn search(&self, query: &str, with: Option<&UserId>, limit: u32) -> Result<Found, ArchiveError> {
        let Some(q) = fts_query(query) else { return Ok(Found::default()) };
        let mut stmt = self
            .conn
            .prepare(
                "SELECT m.encoded, snippet(message_text, 0, ?4, ?5, '…', ?6)
                 FROM message_text JOIN message m ON m.id = message_text.rowid
                 WHERE message_text MATCH ?1 AND (?2 IS NULL OR m.sender = ?2 OR m.recipient = ?2)
                 ORDER BY message_text.rowid DESC LIMIT ?3",
            )
            .map_err(|e| self.sql(e))?;
        let limit = limit.min(MAX_LIMIT) as usize;
        // One more than asked tells whether there are more.
        let rows_wanted = limit as i64 + 1;
        let rows = stmt
            .query_map(params![q, with.map(|u| u.as_str()), rows_wanted, MATCH_START, MATCH_END, SNIPPET_TOKENS], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.sql(e))?;
        let mut hits = Vec::new();
        for row in rows {
            let (encoded, snippet) = row.map_err(|e| self.sql(e))?;
            let message = codec::decode(&encoded)
                .map_err(|e| ArchiveError::Corrupt { path: self.path.clone(), why: e.to_string() })?;
            hits.push(Hit { message, snippet });
        }
        let more = hits.len() > limit;
        hits.truncate(limit);
        Ok(Found { hits, more })
    }

    /// How many messages are kept.
    pub fn len(&self) -> Result<u64, ArchiveError> {
        let n: i64 = self.conn.query_row("SELECT count(*) FROM message", [], |r| r.get(0)).map_err(|e| self.sql(e))?;
        Ok(n.max(0) as u64)
    }

    pub fn is_empty(&self) -> Result<bool, ArchiveError> {
        Ok(self.len()? == 0)
    }
}

/// An FTS5 query for what the user typed: its words, each quoted (so `AND`, `(`, `"` or
/// `*` are plain text), all required, the last as a prefix. None when it has no word.
pub fn fts_query(input: &str) -> Option<String> {
    let words: Vec<&str> =
        input.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).take(MAX_QUERY_WORDS).collect();
    let (last, rest) = words.split_last()?;
    let mut q: String = rest.iter().map(|w| format!("\"{w}\" ")).collect();
    q.push_str(&format!("\"{last}\"*"));
    Some(q)
}

/// Creates the file owner-only if it does not exist, and makes it owner-only if it does.
fn create_private(path: &Path) -> Result<(), ArchiveError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path).map_err(|source| ArchiveError::Open { path: path.to_owned(), source })?;
    restrict(path)
}

/// Sets mode 0600 on `path` if it exists (whatever the umask made of it).
fn restrict(path: &Path) -> Result<(), ArchiveError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(path) {
            Ok(md) if md.permissions().mode() & 0o777 != 0o600 => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|source| ArchiveError::Open { path: path.to_owned(), source })?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ArchiveError::Open { path: path.to_owned(), source }),
        }
    }
    Ok(())
}

/// How commands keep what they show: the archive opened on first use, and a failure to
/// open or write it said once instead of failing the command: on standard error, or, for
/// the full-screen chat, which has none, through [`Recorder::take_warning`].
///
/// ```ignore
/// let mut archive = Recorder::new(profile);
/// archive.record_events(&frame.events);
/// ```
pub struct Recorder {
    path: PathBuf,
    archive: Option<Archive>,
    /// Set once the user was told; nothing more is tried or said after that.
    failed: bool,
    /// Keep the warning for [`Recorder::take_warning`] instead of printing it.
    quiet: bool,
    warning: Option<String>,
}

impl Recorder {
    /// A recorder that says a failure on standard error.
    pub fn new(profile: &Profile) -> Recorder {
        Recorder { path: profile.dir().join(FILE), archive: None, failed: false, quiet: false, warning: None }
    }

    /// A recorder that keeps a failure for [`Recorder::take_warning`].
    pub fn quiet(profile: &Profile) -> Recorder {
        Recorder { quiet: true, ..Recorder::new(profile) }
    }

    /// The failure to say, once, from a [`Recorder::quiet`] recorder.
    pub fn take_warning(&mut self) -> Option<String> {
        self.warning.take()
    }

    /// Keeps the messages, if the archive can be written. Nothing is opened for none.
    pub fn record_all<'a>(&mut self, messages: impl IntoIterator<Item = &'a Message>) {
        let mut messages = messages.into_iter().peekable();
        if self.failed || messages.peek().is_none() {
            return;
        }
        let result = match &self.archive {
            Some(a) => a.record_all(messages),
            None => Archive::open_path(&self.path).and_then(|a| {
                let r = a.record_all(messages);
                self.archive = Some(a);
                r
            }),
        };
        let Err(e) = result else { return };
        self.failed = true;
        let warning = format!("warning: {e}; messages are not kept for `missive search`");
        if self.quiet {
            self.warning = Some(warning);
        } else {
            eprintln!("missive: {warning}");
        }
    }

    pub fn record(&mut self, m: &Message) {
        self.record_all([m]);
    }

    /// Keeps the messages among stream events.
    pub fn record_events(&mut self, events: &[Event]) {
        self.record_all(events.iter().filter_map(|e| match &e.event {
            EventKind::Message(m) => Some(m),
            _ => None,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::fts_query;

    #[test]
    fn queries_are_words_never_syntax() {
        assert_eq!(fts_query("hello").as_deref(), Some("\"hello\"*"));
        assert_eq!(fts_query("  Lunch AND (tomorrow").as_deref(), Some("\"Lunch\" \"AND\" \"tomorrow\"*"));
        assert_eq!(fts_query("say \"hi\" NEAR/2 *x*").as_deref(), Some("\"say\" \"hi\" \"NEAR\" \"2\" \"x\"*"));
        assert_eq!(fts_query("\" ( * - ^ :"), None);
        assert_eq!(fts_query("naïve café").as_deref(), Some("\"naïve\" \"café\"*"));
        assert_eq!(fts_query(&"w ".repeat(100)).map(|q| q.matches('"').count()), Some(2 * super::MAX_QUERY_WORDS));
    }
}
