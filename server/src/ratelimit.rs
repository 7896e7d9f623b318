//! Counting failures per key (an account, a source address) in a sliding window, so
//! password guessing is slowed without locking anyone out for long; and token buckets
//! for request rates. Time is passed in.

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

    /// Counts an attempt as a failure before it is made, so that concurrent attempts see
    /// each other: `Err(wait)` when `key` has no failures left. Undo with [`Self::refund`]
    /// if the attempt did not fail.
    pub fn reserve(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        self.prune(&mut entries, now);
        let e = entries.entry(key.clone()).or_insert((0, now));
        if now >= e.1 + self.window {
            *e = (0, now);
        }
        if e.0 >= self.max_failures {
            return Err(e.1 + self.window - now);
        }
        e.0 += 1;
        Ok(())
    }

    /// Gives back an attempt [`Self::reserve`] counted, which did not fail after all.
    pub fn refund(&self, key: &K) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get_mut(key) {
            e.0 = e.0.saturating_sub(1);
        }
    }

    fn prune(&self, entries: &mut HashMap<K, (u32, Instant)>, now: Instant) {
        if entries.len() > PRUNE_ABOVE {
            let window = self.window;
            entries.retain(|_, (_, start)| now < *start + window);
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

/// A token bucket: up to `per_second` requests in a burst, refilled at `per_second` (the
/// rate is passed on each take, so it can change while the bucket lives).
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, now: Instant) -> TokenBucket {
        TokenBucket { tokens: f64::from(per_second), last: now }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant, per_second: u32) -> bool {
        let rate = f64::from(per_second);
        self.tokens = (self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
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

    #[test]
    fn reservations_count_concurrent_attempts_and_refunds_give_them_back() {
        let l = FailureLimiter::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(l.reserve(&"alice", t0).is_ok(), "attempt {i}");
        }
        assert_eq!(l.reserve(&"alice", t0 + Duration::from_secs(1)), Err(Duration::from_secs(59)), "a fourth attempt in flight");
        l.refund(&"alice");
        assert!(l.reserve(&"alice", t0).is_ok(), "a refunded attempt is available again");
        assert!(l.reserve(&"alice", t0 + Duration::from_secs(60)).is_ok(), "the window passed");
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        assert_eq!((0..15).filter(|_| b.take(t0, 10)).count(), 10, "burst of one second's worth");
        assert!(!b.take(t0 + Duration::from_millis(50), 10), "half a token");
        assert!(b.take(t0 + Duration::from_millis(100), 10));
        assert_eq!((0..20).filter(|_| b.take(t0 + Duration::from_secs(10), 10)).count(), 10, "never more than the burst");
        assert_eq!((0..20).filter(|_| b.take(t0 + Duration::from_secs(20), 2)).count(), 2, "a lower rate applies at once");
    }
}
