//! Password hashing on a fixed set of threads of its own. An argon2id hash takes 19 MiB;
//! computed on tokio's blocking pool, every new pool thread would keep an allocator arena
//! of that size after its hash, so a burst of logins would leave hundreds of MiB behind.
//! Here at most `threads` hashes run at once, each thread reuses its own memory, and the
//! jobs waiting for a thread are bounded (more callers wait to queue, one task each).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;

type Job = Box<dyn FnOnce() + Send>;

/// Jobs queued for the hashing threads; further callers wait for room.
const QUEUE: usize = 64;

pub struct Hasher {
    tx: mpsc::Sender<Job>,
}

impl Hasher {
    pub fn new(threads: usize) -> Hasher {
        let (tx, rx) = mpsc::channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("missive-hash-{i}")).spawn(move || loop {
                let job = rx.lock().unwrap_or_else(|e| e.into_inner()).blocking_recv();
                match job {
                    Some(job) => job(),
                    None => return,
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        Hasher { tx }
    }

    /// Runs `f` on a hashing thread once one is free.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        self.tx.send(job).await.map_err(|_| ApiError::internal())?;
        result.await.map_err(|_| ApiError::internal())
    }
}
