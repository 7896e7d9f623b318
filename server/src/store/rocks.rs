//! RocksDB engine: one column family per [`Cf`], synced WAL writes.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, Options, ReadOptions, WriteBatch, WriteOptions, DB};

use super::{Batch, Cf, Direction, Op, Store, StoreError, StoreResult};

pub struct RocksStore {
    db: DB,
}

fn engine(e: rocksdb::Error) -> StoreError {
    StoreError::Engine(e.into_string())
}

impl RocksStore {
    pub fn open(path: &Path) -> StoreResult<RocksStore> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        let cfs = Cf::ALL.iter().map(|cf| {
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(cf.name(), o)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| {
            let s = e.into_string();
            if s.contains("LOCK") || s.contains("lock") {
                StoreError::Locked(path.display().to_string())
            } else {
                StoreError::Engine(s)
            }
        })?;
        Ok(RocksStore { db })
    }

    fn cf(&self, cf: Cf) -> StoreResult<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StoreError::Engine(format!("column family {} missing", cf.name())))
    }

    /// Flushes memtables so a clean shutdown leaves little WAL to replay.
    pub fn flush(&self) -> StoreResult<()> {
        for cf in Cf::ALL {
            self.db.flush_cf(self.cf(cf)?).map_err(engine)?;
        }
        Ok(())
    }
}

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
        self.db.get_cf(self.cf(cf)?, key).map_err(engine)
    }

    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: Option<&[u8]>,
        dir: Direction,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(prefix.to_vec());
        if let Some(end) = prefix_end(prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf)?, ro);
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

    fn write(&self, batch: Batch) -> StoreResult<()> {
        let mut wb = WriteBatch::default();
        for op in batch.ops {
            match op {
                Op::Put(cf, k, v) => wb.put_cf(self.cf(cf)?, k, v),
                Op::Delete(cf, k) => wb.delete_cf(self.cf(cf)?, k),
            }
        }
        let mut wo = WriteOptions::default();
        if crate::sabotage::active(crate::sabotage::Fault::AckBeforeSync) {
            wo.disable_wal(true);
        } else {
            wo.set_sync(true);
        }
        self.db.write_opt(wb, &wo).map_err(engine)
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
