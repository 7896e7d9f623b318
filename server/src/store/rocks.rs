//! RocksDB engine: one column family per [`Cf`], synced WAL writes.
//!
//! A failed write (a full disk, an I/O error) leaves RocksDB refusing every later write
//! until it is opened again. The engine notices, and before the next write checks that the
//! disk takes a probe file again; then it reopens the database (replaying its WAL), so the
//! server recovers without a restart once space returns. Reads keep working meanwhile.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use rocksdb::{ColumnFamilyDescriptor, Options, ReadOptions, WriteBatch, WriteOptions, DB};

use super::{Batch, Cf, Direction, Op, Store, StoreError, StoreResult};

/// Least time between two attempts to reopen a database whose writes failed.
const REOPEN_INTERVAL: Duration = Duration::from_millis(500);
/// Size of the file written to learn whether the disk takes writes again.
const PROBE_BYTES: usize = 1 << 20;

pub struct RocksStore {
    path: PathBuf,
    /// The options the database was opened with; they hold its statistics (WAL syncs).
    opts: Options,
    /// `None` only while a reopen is under way or failed.
    db: RwLock<Option<DB>>,
    /// A write failed: RocksDB refuses writes until the database is opened again.
    broken: AtomicBool,
    last_reopen: Mutex<Option<Instant>>,
}

fn engine(e: rocksdb::Error) -> StoreError {
    let s = e.into_string();
    if s.contains("No space left on device") || s.contains("NoSpace") {
        StoreError::NoSpace(s)
    } else {
        StoreError::Engine(s)
    }
}

fn options() -> Options {
    let mut opts = Options::default();
    // For `/metrics`: WAL sync counts and times (the fsync each acknowledged write waits for).
    opts.enable_statistics();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_max_background_jobs(2);
    // Reuse old WAL files: a synced write then overwrites blocks the file already has, so
    // the fsync flushes data only, without also writing the inode for a new size. WAL
    // files become reusable once every column family's memtable holding their writes is
    // flushed; past 64 MiB of WAL the oldest memtables are flushed, which also bounds
    // what a start replays.
    // RocksDB refuses writes without the WAL once logs are recycled: the test build's
    // fault that skips the WAL (acknowledging before anything is durable) keeps them off.
    if !crate::sabotage::active(crate::sabotage::Fault::AckBeforeSync) {
        opts.set_recycle_log_file_num(4);
    }
    opts.set_max_total_wal_size(64 << 20);
    opts
}

/// Block cache shared by every column family (RocksDB gives each its own otherwise).
const BLOCK_CACHE_BYTES: usize = 64 << 20;

/// Column family options: LZ4, a bloom filter per table so that a lookup of a key that
/// is not there (every new send's idempotency check) skips the table, and the shared
/// block cache.
fn cf_options() -> Options {
    static CACHE: std::sync::OnceLock<rocksdb::Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(|| rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES));
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_block_cache(cache);
    let mut o = Options::default();
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.set_block_based_table_factory(&table);
    o
}

fn open_db(path: &Path, opts: &Options) -> StoreResult<DB> {
    let cfs = Cf::ALL.iter().map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options()));
    DB::open_cf_descriptors(opts, path, cfs).map_err(|e| match engine(e) {
        StoreError::Engine(s) if s.contains("LOCK") || s.contains("lock") => StoreError::Locked(path.display().to_string()),
        StoreError::NoSpace(_) => StoreError::NoSpace(format!(
            "the disk holding {} is full: free some space, then start missived again",
            path.display()
        )),
        // RocksDB's own messages do not always name the path (a directory it cannot create).
        StoreError::Engine(s) => StoreError::Engine(format!("cannot open the database at {}: {s}", path.display())),
        other => other,
    })
}

fn cf_of(db: &DB, cf: Cf) -> StoreResult<&rocksdb::ColumnFamily> {
    db.cf_handle(cf.name()).ok_or_else(|| StoreError::Engine(format!("column family {} missing", cf.name())))
}

impl RocksStore {
    pub fn open(path: &Path) -> StoreResult<RocksStore> {
        let opts = options();
        let db = open_db(path, &opts)?;
        Ok(RocksStore { path: path.to_owned(), opts, db: RwLock::new(Some(db)), broken: AtomicBool::new(false), last_reopen: Mutex::new(None) })
    }

    fn db(&self) -> StoreResult<RwLockReadGuard<'_, Option<DB>>> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            return Err(StoreError::Engine(format!("the database at {} is being reopened", self.path.display())));
        }
        Ok(guard)
    }

    /// Flushes memtables so a clean shutdown leaves little WAL to replay.
    pub fn flush(&self) -> StoreResult<()> {
        let guard = self.db()?;
        let Some(db) = guard.as_ref() else { return Ok(()) };
        for cf in Cf::ALL {
            db.flush_cf(cf_of(db, cf)?).map_err(engine)?;
        }
        Ok(())
    }

    /// Whether writes are expected to succeed: the database is open and no write has
    /// failed since it was (after a failure it reopens at the next write, once the disk
    /// takes a probe file).
    pub fn writable(&self) -> StoreResult<()> {
        drop(self.db()?);
        if self.broken.load(Ordering::SeqCst) {
            return Err(StoreError::NoSpace(format!("the last write to {} failed; waiting for the disk", self.path.display())));
        }
        Ok(())
    }

    /// WAL syncs since the database was opened, and the time they took in all.
    pub fn wal_syncs(&self) -> (u64, Duration) {
        let h = self.opts.get_histogram_data(rocksdb::statistics::Histogram::WalFileSyncMicros);
        (h.count(), Duration::from_micros(h.sum()))
    }

    /// RocksDB's figures for operators, per column family: `(figure, column family, value)`
    /// for each of [`ROCKS_FIGURES`] the engine reports.
    pub fn figures(&self) -> StoreResult<Vec<(&'static str, &'static str, u64)>> {
        let guard = self.db()?;
        let Some(db) = guard.as_ref() else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for cf in Cf::ALL {
            let handle = cf_of(db, cf)?;
            for (name, property) in ROCKS_FIGURES {
                if let Some(v) = db.property_int_value_cf(handle, property).map_err(engine)? {
                    out.push((name, cf.name(), v));
                }
            }
        }
        Ok(out)
    }

    /// Writes a consistent copy of the database to `dir` (which must not exist) while
    /// writes go on: a RocksDB checkpoint, hard links for the table files where `dir` is on
    /// the same file system, with the WAL flushed into it.
    pub fn checkpoint(&self, dir: &Path) -> StoreResult<()> {
        let guard = self.db()?;
        let Some(db) = guard.as_ref() else { return Err(StoreError::Engine("database closed".into())) };
        let cp = rocksdb::checkpoint::Checkpoint::new(db).map_err(engine)?;
        cp.create_checkpoint(dir).map_err(engine)
    }

    /// After a failed write: once the disk takes a probe file again, opens the database
    /// anew. At most one attempt per [`REOPEN_INTERVAL`]; until one succeeds, writes fail.
    fn recover(&self) -> StoreResult<()> {
        {
            let mut last = self.last_reopen.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < REOPEN_INTERVAL) {
                return Err(StoreError::NoSpace(format!("writes to {} are failing; waiting for the disk", self.path.display())));
            }
            *last = Some(Instant::now());
        }
        self.probe()?;
        let mut guard = self.db.write().unwrap_or_else(|e| e.into_inner());
        // Close first: RocksDB holds a lock on the directory.
        *guard = None;
        let db = open_db(&self.path, &self.opts)?;
        *guard = Some(db);
        self.broken.store(false, Ordering::SeqCst);
        tracing::warn!(path = %self.path.display(), "database reopened; writes work again");
        Ok(())
    }

    /// Whether the disk takes a file of [`PROBE_BYTES`] (written, synced, removed).
    fn probe(&self) -> StoreResult<()> {
        use std::io::Write;
        let p = self.path.join("missive-space-probe");
        let written = std::fs::File::create(&p).and_then(|mut f| {
            f.write_all(&vec![0u8; PROBE_BYTES])?;
            f.sync_all()
        });
        let _ = std::fs::remove_file(&p);
        written.map_err(|e| StoreError::NoSpace(format!("the disk holding {} still refuses writes: {e}", self.path.display())))
    }
}

/// The RocksDB properties `/metrics` reports, under the names it reports them by.
pub const ROCKS_FIGURES: [(&str, &str); 5] = [
    ("estimated_keys", "rocksdb.estimate-num-keys"),
    ("live_data_bytes", "rocksdb.estimate-live-data-size"),
    ("sst_files_bytes", "rocksdb.total-sst-files-size"),
    ("memtable_bytes", "rocksdb.cur-size-all-mem-tables"),
    ("pending_compaction_bytes", "rocksdb.estimate-pending-compaction-bytes"),
];

/// The smallest key greater than every key starting with `prefix`, if any.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl Store for RocksStore {
    fn get(&self, cf: Cf, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let guard = self.db()?;
        let Some(db) = guard.as_ref() else { return Ok(None) };
        db.get_cf(cf_of(db, cf)?, key).map_err(engine)
    }

    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: Option<&[u8]>,
        dir: Direction,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let guard = self.db()?;
        let Some(db) = guard.as_ref() else { return Ok(Vec::new()) };
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(prefix.to_vec());
        if let Some(end) = prefix_end(prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let mut it = db.raw_iterator_cf_opt(cf_of(db, cf)?, ro);
        match (dir, from) {
            (Direction::Forward, None) => it.seek_to_first(),
            (Direction::Reverse, None) => it.seek_to_last(),
            (Direction::Forward, Some(k)) => {
                it.seek(k);
                if it.valid() && it.key() == Some(k) {
                    it.next();
                }
            }
            (Direction::Reverse, Some(k)) => {
                it.seek_for_prev(k);
                if it.valid() && it.key() == Some(k) {
                    it.prev();
                }
            }
        }
        let mut out = Vec::new();
        while it.valid() && out.len() < limit {
            if let (Some(k), Some(v)) = (it.key(), it.value()) {
                out.push((k.to_vec(), v.to_vec()));
            }
            match dir {
                Direction::Forward => it.next(),
                Direction::Reverse => it.prev(),
            }
        }
        it.status().map_err(engine)?;
        Ok(out)
    }

    fn count(&self, cf: Cf, prefix: &[u8]) -> StoreResult<u64> {
        let guard = self.db()?;
        let Some(db) = guard.as_ref() else { return Ok(0) };
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(prefix.to_vec());
        if let Some(end) = prefix_end(prefix) {
            ro.set_iterate_upper_bound(end);
        }
        // Keys only are compared; nothing is copied.
        let mut it = db.raw_iterator_cf_opt(cf_of(db, cf)?, ro);
        it.seek_to_first();
        let mut n = 0;
        while it.valid() {
            n += 1;
            it.next();
        }
        it.status().map_err(engine)?;
        Ok(n)
    }

    fn write(&self, batch: Batch) -> StoreResult<()> {
        self.write_with(batch, true)
    }

    fn write_unsynced(&self, batch: Batch) -> StoreResult<()> {
        self.write_with(batch, false)
    }
}

impl RocksStore {
    /// A write through the WAL, synced or left to the kernel to write back: a killed
    /// process loses neither, a crashed machine the unsynced ones.
    fn write_with(&self, batch: Batch, sync: bool) -> StoreResult<()> {
        if self.broken.load(Ordering::SeqCst) {
            self.recover()?;
        }
        let guard = self.db()?;
        let Some(db) = guard.as_ref() else { return Err(StoreError::Engine("database closed".into())) };
        let mut wb = WriteBatch::default();
        for op in batch.ops {
            match op {
                Op::Put(cf, k, v) => wb.put_cf(cf_of(db, cf)?, k, v),
                Op::Delete(cf, k) => wb.delete_cf(cf_of(db, cf)?, k),
            }
        }
        let mut wo = WriteOptions::default();
        if crate::sabotage::active(crate::sabotage::Fault::AckBeforeSync) {
            wo.disable_wal(true);
        } else {
            wo.set_sync(sync);
        }
        db.write_opt(wb, &wo).map_err(|e| {
            self.broken.store(true, Ordering::SeqCst);
            engine(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_respect_prefix_bounds_and_direction() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path()).unwrap();
        let mut b = Batch::default();
        for k in [&b"a\x01"[..], b"a\x02", b"a\x03", b"a\xff", b"b\x00", b"\x00"] {
            b.put(Cf::Events, k.to_vec(), k.to_vec());
        }
        s.write(b).unwrap();
        let keys = |v: Vec<(Vec<u8>, Vec<u8>)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(s.scan(Cf::Events, b"a", None, Direction::Forward, 10).unwrap()),
            vec![b"a\x01".to_vec(), b"a\x02".to_vec(), b"a\x03".to_vec(), b"a\xff".to_vec()]
        );
        assert_eq!(
            keys(s.scan(Cf::Events, b"a", Some(b"a\x03"), Direction::Reverse, 10).unwrap()),
            vec![b"a\x02".to_vec(), b"a\x01".to_vec()]
        );
        assert_eq!(
            keys(s.scan(Cf::Events, b"a", Some(b"a\x01"), Direction::Forward, 2).unwrap()),
            vec![b"a\x02".to_vec(), b"a\x03".to_vec()]
        );
        assert_eq!(keys(s.scan(Cf::Events, b"a", None, Direction::Reverse, 1).unwrap()), vec![b"a\xff".to_vec()]);
        // A second process cannot open the same database.
        assert!(matches!(RocksStore::open(dir.path()), Err(StoreError::Locked(_))));
    }
}
