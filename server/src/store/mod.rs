//! The server's store: the engine-neutral interface of the protocol core
//! ([`missive_core::store`]: [`Store`], [`Batch`], column families, key layouts, the
//! in-memory engine) and its RocksDB engine ([`rocks`]).

pub mod rocks;

pub use missive_core::store::*;

/// Runs store work on tokio's blocking pool: a RocksDB call may wait for the disk and
/// must never stall a runtime worker, which serves many connections.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> StoreResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Engine(format!("blocking task failed: {e}")))
}

