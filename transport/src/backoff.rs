//! Retry timing toward one peer: exponential backoff with jitter and a cap, reset the
//! moment the peer is heard from. Time and randomness are passed in.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
    next: Option<Instant>,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, failures: 0, next: None }
    }

    /// Records a failed attempt at `now`; `jitter` in [0, 1) spreads retries of many
    /// servers apart. Returns when to try next: half the exponential delay, plus up to the
    /// other half at random.
    pub fn failure(&mut self, now: Instant, jitter: f64) -> Instant {
        let exp = self.base.saturating_mul(1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX));
        let full = exp.min(self.cap);
        let delay = full / 2 + full.mul_f64(jitter.clamp(0.0, 1.0) / 2.0);
        self.failures = self.failures.saturating_add(1);
        let at = now + delay;
        self.next = Some(at);
        at
    }

    /// The peer answered or contacted us: the next attempt may go at once.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.next = None;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When the next attempt may start (`None`: now).
    pub fn next_attempt(&self) -> Option<Instant> {
        self.next
    }

    pub fn ready(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| now >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_then_caps_then_resets() {
        let t0 = Instant::now();
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        assert!(b.ready(t0));
        let d: Vec<Duration> = (0..12).map(|_| b.failure(t0, 0.0) - t0).collect();
        assert_eq!(d[0], Duration::from_millis(50));
        assert_eq!(d[1], Duration::from_millis(100));
        assert_eq!(d[2], Duration::from_millis(200));
        assert_eq!(*d.last().unwrap(), Duration::from_secs(5), "capped at half the cap without jitter");
        assert!(!b.ready(t0));
        b.reset();
        assert!(b.ready(t0));
        assert_eq!(b.failure(t0, 0.0) - t0, Duration::from_millis(50));
    }

    proptest! {
        #[test]
        fn delay_within_bounds(fails in 0u32..100, jitter in 0.0f64..1.0) {
            let t0 = Instant::now();
            let cap = Duration::from_secs(60);
            let mut b = Backoff::new(Duration::from_millis(200), cap);
            for _ in 0..fails { b.failure(t0, jitter); }
            let d = b.failure(t0, jitter) - t0;
            prop_assert!(d <= cap);
            prop_assert!(d >= Duration::from_millis(100));
        }
    }
}
