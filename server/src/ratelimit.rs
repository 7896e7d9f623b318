//! Counting failures per key (an account, a source address) in a sliding window, so
//! password guessing is slowed without locking anyone out for long. Time is passed in.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Beyond this many tracked keys, expired entries are dropped on the next insert.
const PRUNE_ABOVE: usize = 100_000;

pub struct FailureLimiter<K> {
    max_failures: u32,
    window: Duration,
    entries: Mutex<HashMap<K, (u32, Instant)>>,
}

impl<K: Hash + Eq + Clone> FailureLimiter<K> {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        FailureLimiter { max_failures, window, entries: Mutex::new(HashMap::new()) }
    }

    /// `Err(wait)` while `key` has used up its failures in the current window.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some((n, start)) if *n >= self.max_failures && now < *start + self.window => Err(*start + self.window - now),
            _ => Ok(()),
        }
    }

    /// Records a failure; a window starts at the first failure after the last one expired.
    pub fn failed(&self, key: &K, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() > PRUNE_ABOVE {
            let window = self.window;
            entries.retain(|_, (_, start)| now < *start + window);
        }
        let e = entries.entry(key.clone()).or_insert((0, now));
        if now >= e.1 + self.window {
            *e = (0, now);
        }
        e.0 += 1;
    }

    /// A success forgets the key's failures.
    pub fn succeeded(&self, key: &K) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_failures_until_the_window_passes() {
        let l = FailureLimiter::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(l.check(&"alice", t0).is_ok(), "attempt {i}");
            l.failed(&"alice", t0 + Duration::from_secs(i));
        }
        assert_eq!(l.check(&"alice", t0 + Duration::from_secs(10)), Err(Duration::from_secs(50)));
        assert!(l.check(&"bob", t0).is_ok(), "other keys are unaffected");
        assert!(l.check(&"alice", t0 + Duration::from_secs(60)).is_ok(), "the window passed");
        l.failed(&"alice", t0 + Duration::from_secs(61));
        assert!(l.check(&"alice", t0 + Duration::from_secs(62)).is_ok(), "a new window counts from one");
        l.succeeded(&"alice");
        assert!(l.check(&"alice", t0 + Duration::from_secs(62)).is_ok());
    }
}
