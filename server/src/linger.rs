//! Group commit's linger: how long the writer waits for more commands before it writes a
//! small group.
//!
//! Every group costs one synced write, and on a virtual disk the sync alone costs the
//! kernel 100–250 µs of CPU (BENCHMARKS.md). At a few thousand commands a second, one
//! arrives every few hundred microseconds: a writer that writes at once syncs for one or
//! two commands each time. Waiting a fraction of a millisecond gathers several into one
//! sync. At low rates nothing more would come within the wait, so the writer does not wait
//! at all, and idle latency is unchanged.
//!
//! A wait pays only when commands arrive independently of each other. A client that sends
//! its next command only after the reply to the last would only be slowed down: when a wait
//! gathers nothing, waiting is suspended for the next [`SUSPEND_GROUPS`] groups.
//!
//! Pure: time comes in as arguments, so tests drive it without a clock.

use std::time::{Duration, Instant};

/// A group this large is written at once.
pub const TARGET_GROUP: usize = 8;
/// After a wait that gathered nothing, this many groups are written without waiting.
pub const SUSPEND_GROUPS: u32 = 16;
/// Time constant of the arrival rate's decay: commands older than a few of these no
/// longer count.
const HORIZON: Duration = Duration::from_millis(20);

#[derive(Debug)]
pub struct Linger {
    /// Longest wait; zero: never wait.
    max: Duration,
    /// Commands per second: each group's commands, decaying with [`HORIZON`].
    rate: f64,
    last: Option<Instant>,
    suspended: u32,
}

impl Linger {
    pub fn new(max: Duration) -> Linger {
        Linger { max, rate: 0.0, last: None, suspended: 0 }
    }

    /// A group of `commands` starts at `now`: updates the arrival rate.
    pub fn observe(&mut self, commands: usize, now: Instant) {
        let tau = HORIZON.as_secs_f64();
        if let Some(last) = self.last {
            self.rate *= (-now.saturating_duration_since(last).as_secs_f64() / tau).exp();
        }
        self.rate += commands as f64 / tau;
        self.last = Some(now);
    }

    /// How long to wait for more before writing a group that holds `have` commands; `None`:
    /// write now. Asked once per group that holds commands.
    pub fn wait(&mut self, have: usize) -> Option<Duration> {
        if have == 0 {
            return None;
        }
        if self.suspended > 0 {
            self.suspended -= 1;
            return None;
        }
        if self.max.is_zero() || have >= TARGET_GROUP || self.rate <= 0.0 {
            return None;
        }
        let gap = Duration::from_secs_f64(1.0 / self.rate);
        // Not even one more command is expected within the longest wait.
        if gap > self.max {
            return None;
        }
        let more = u32::try_from(TARGET_GROUP - have).unwrap_or(u32::MAX);
        Some(gap.saturating_mul(more).min(self.max))
    }

    /// A wait gathered `more` commands (counted in the rate).
    pub fn gathered(&mut self, more: usize) {
        self.rate += more as f64 / HORIZON.as_secs_f64();
        if more == 0 {
            self.suspended = SUSPEND_GROUPS;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, micros: u64) -> Instant {
        start + Duration::from_micros(micros)
    }

    /// Feeds `groups` groups of `size` commands, `every` µs apart.
    fn steady(l: &mut Linger, start: Instant, groups: u64, size: usize, every: u64) -> Instant {
        for g in 0..groups {
            l.observe(size, at(start, g * every));
        }
        at(start, groups * every)
    }

    #[test]
    fn waits_only_when_more_commands_are_expected_within_the_bound() {
        let start = Instant::now();
        // 4 000 commands a second, one per group: one every 250 µs.
        let mut busy = Linger::new(Duration::from_micros(500));
        steady(&mut busy, start, 400, 1, 250);
        let w = busy.wait(1).expect("a busy writer waits");
        assert!(w > Duration::from_micros(400) && w <= Duration::from_micros(500), "{w:?}");
        assert_eq!(busy.wait(TARGET_GROUP), None, "a full group is written at once");
        // 200 commands a second: the next is 5 ms away, far beyond the bound.
        let mut quiet = Linger::new(Duration::from_micros(500));
        steady(&mut quiet, start, 50, 1, 5_000);
        assert_eq!(quiet.wait(1), None, "a quiet writer must not add latency");
        // Turned off.
        let mut off = Linger::new(Duration::ZERO);
        steady(&mut off, start, 400, 1, 250);
        assert_eq!(off.wait(1), None);
    }

    #[test]
    fn the_wait_shrinks_as_the_rate_grows() {
        let start = Instant::now();
        let mut l = Linger::new(Duration::from_millis(1));
        // 40 000 a second: 25 µs apart; seven more take 175 µs.
        steady(&mut l, start, 4_000, 1, 25);
        let w = l.wait(1).unwrap();
        assert!(w >= Duration::from_micros(150) && w <= Duration::from_micros(200), "{w:?}");
    }

    #[test]
    fn a_wait_that_gathers_nothing_suspends_waiting() {
        let start = Instant::now();
        let mut l = Linger::new(Duration::from_micros(500));
        let mut t = steady(&mut l, start, 400, 1, 250);
        assert!(l.wait(1).is_some());
        l.gathered(0);
        for _ in 0..SUSPEND_GROUPS {
            assert_eq!(l.wait(1), None, "waiting must stay suspended");
            l.observe(1, t);
            t += Duration::from_micros(250);
        }
        assert!(l.wait(1).is_some(), "waiting resumes after the suspension");
        l.gathered(3);
        l.observe(4, t);
        assert!(l.wait(1).is_some(), "a wait that gathered commands keeps waiting on");
    }

    #[test]
    fn an_idle_spell_ends_waiting() {
        let start = Instant::now();
        let mut l = Linger::new(Duration::from_micros(500));
        let t = steady(&mut l, start, 400, 1, 250);
        // One command after a second of silence, then one more 100 ms later.
        l.observe(1, t + Duration::from_secs(1));
        l.observe(1, t + Duration::from_millis(1_100));
        assert_eq!(l.wait(1), None, "{l:?}");
    }
}
