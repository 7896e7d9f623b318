//! An in-memory engine behind the same [`Store`] interface: ordered maps, one per column
//! family, and batches applied atomically under one lock. For tests and simulations.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Batch, Cf, Direction, Op, Store, StoreResult};

/// One column family: keys in order.
type Family = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default)]
pub struct MemStore {
    cfs: Mutex<BTreeMap<&'static str, Family>>,
}

impl Store for MemStore {
    fn get(&self, cf: Cf, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let cfs = self.cfs.lock().unwrap_or_else(|e| e.into_inner());
        Ok(cfs.get(cf.name()).and_then(|m| m.get(key)).cloned())
    }

    fn scan(&self, cf: Cf, prefix: &[u8], from: Option<&[u8]>, dir: Direction, limit: usize) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let cfs = self.cfs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = cfs.get(cf.name()) else { return Ok(Vec::new()) };
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let pick = |(k, v): (&Vec<u8>, &Vec<u8>)| (k.clone(), v.clone());
        let rows: Vec<(Vec<u8>, Vec<u8>)> = match dir {
            Direction::Forward => {
                let start = match from {
                    Some(f) if f >= prefix => Excluded(f.to_vec()),
                    _ => Included(prefix.to_vec()),
                };
                m.range((start, Unbounded)).take_while(|(k, _)| k.starts_with(prefix)).take(limit).map(pick).collect()
            }
            Direction::Reverse => {
                let end = match from {
                    Some(f) => Excluded(f.to_vec()),
                    None => Unbounded,
                };
                m.range((Included(prefix.to_vec()), end)).rev().filter(|(k, _)| k.starts_with(prefix)).take(limit).map(pick).collect()
            }
        };
        Ok(rows)
    }

    fn write(&self, batch: Batch) -> StoreResult<()> {
        let mut cfs = self.cfs.lock().unwrap_or_else(|e| e.into_inner());
        for op in batch.ops {
            match op {
                Op::Put(cf, k, v) => {
                    cfs.entry(cf.name()).or_default().insert(k, v);
                }
                Op::Delete(cf, k) => {
                    cfs.entry(cf.name()).or_default().remove(&k);
                }
            }
        }
        Ok(())
    }
}
