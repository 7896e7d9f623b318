//! Load generator: N users on one or two homeservers, messages offered at a fixed rate
//! (open loop), latency measured from each message's *intended* send time — so a server
//! that falls behind is charged for the queue it causes (no coordinated omission) — into
//! HDR histograms: the sender's acknowledgement and the recipient's live delivery. Also
//! the server's RSS and CPU, read from /proc.
//!
//! Users share a few QUIC connections (requests carry their own token), so the run does
//! not hit the server's per-address connection cap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use missive_spec::{Content, UserId};
use serde::Serialize;

use crate::implementation::{ImplFile, Sut};
use crate::suite::messages;
use crate::wire::{new_client_msg_id, Client};

/// Where the recipients live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Local,
    Federated,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub mode: Mode,
    /// Senders and recipients in all (half each).
    pub users: usize,
    /// QUIC connections per server that the users share.
    pub connections: usize,
    /// Messages per second offered.
    pub rate: f64,
    pub seconds: f64,
    /// Message body size in bytes.
    pub body: usize,
    /// Show a progress bar.
    pub progress: bool,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ServerUsage {
    pub name: String,
    pub rss_mib_end: f64,
    pub rss_mib_peak: f64,
    /// CPU time over wall time during the run; 1.0 is one core busy.
    pub cpu_cores: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub mode: Mode,
    pub users: usize,
    pub offered_rate: f64,
    pub seconds: f64,
    pub offered: u64,
    pub acknowledged: u64,
    pub delivered: u64,
    pub errors: u64,
    /// Delivered messages per second of the run (first intended send to last delivery).
    pub throughput: f64,
    pub ack: Percentiles,
    pub delivery: Percentiles,
    pub servers: Vec<ServerUsage>,
}

/// /proc/PID/status VmRSS (MiB) and /proc/PID/stat utime+stime (seconds).
pub fn usage(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((rss_kib / 1024.0, ticks / 100.0))
}

/// Servers (one, or two pinned to each other) with their users, ready to load.
pub struct Bench {
    work: tempfile::TempDir,
    pub servers: Vec<Sut>,
    /// Senders live on the first server, recipients on the last.
    pub senders: Vec<(UserId, Client)>,
    pub recipients: Vec<(UserId, Client)>,
    connections: usize,
}

/// Messages of another tag than the run's, counted by a run's subscriptions as they
/// arrive: a queue draining while live traffic is measured.
pub struct Watch {
    tag: String,
    /// The recipients' stream positions to count from.
    from: Vec<u64>,
    seen: Mutex<Vec<u64>>,
    distinct: AtomicU64,
    duplicates: AtomicU64,
    expected: u64,
    first: Mutex<Option<Instant>>,
    done: Mutex<Option<Instant>>,
}

impl Watch {
    pub fn new(tag: &str, expected: u64, from: Vec<u64>) -> Arc<Watch> {
        Arc::new(Watch {
            tag: tag.to_owned(),
            from,
            seen: Mutex::new(vec![0; expected.div_ceil(64) as usize]),
            distinct: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            expected,
            first: Mutex::new(None),
            done: Mutex::new(None),
        })
    }

    fn saw(&self, n: u64, at: Instant) {
        let mut seen = self.seen.lock().unwrap();
        let Some(word) = seen.get_mut((n / 64) as usize) else { return };
        let bit = 1u64 << (n % 64);
        if *word & bit != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *word |= bit;
        self.first.lock().unwrap().get_or_insert(at);
        if self.distinct.fetch_add(1, Ordering::Relaxed) + 1 == self.expected {
            *self.done.lock().unwrap() = Some(at);
        }
    }

    /// Distinct messages seen, and messages seen more than once.
    pub fn counts(&self) -> (u64, u64) {
        (self.distinct.load(Ordering::Relaxed), self.duplicates.load(Ordering::Relaxed))
    }

    /// When the first message arrived.
    pub fn first_at(&self) -> Option<Instant> {
        *self.first.lock().unwrap()
    }

    /// When the last expected message arrived.
    pub fn done_at(&self) -> Option<Instant> {
        *self.done.lock().unwrap()
    }
}

impl Bench {
    pub async fn setup(imp: Arc<ImplFile>, mode: Mode, users: usize, connections: usize) -> anyhow::Result<Bench> {
        Bench::setup_allowing(imp, mode, users, connections, None).await
    }

    /// [`Bench::setup`], the servers first allowed `client_connections` client
    /// connections (the implementation file's `allow_connections`).
    pub async fn setup_allowing(
        imp: Arc<ImplFile>,
        mode: Mode,
        users: usize,
        connections: usize,
        client_connections: Option<usize>,
    ) -> anyhow::Result<Bench> {
        let work = tempfile::Builder::new().prefix("missive-load-").tempdir()?;
        let mut servers = vec![Sut::init(imp.clone(), work.path(), "a.load.test").await?];
        if mode == Mode::Federated {
            servers.push(Sut::init(imp.clone(), work.path(), "b.load.test").await?);
            servers[0].pin(&servers[1].peer_info()).await?;
            servers[1].pin(&servers[0].peer_info()).await?;
        }
        for s in &mut servers {
            if let Some(n) = client_connections {
                s.allow_connections(n).await?;
            }
            s.start().await?;
        }
        let half = (users / 2).max(1);
        let mut pools: Vec<Vec<Client>> = Vec::new();
        for s in &servers {
            pools.push(pool(s, connections).await?);
        }
        let mut senders = Vec::new();
        let mut recipients = Vec::new();
        let last = servers.len() - 1;
        for i in 0..half {
            for (list, si, prefix) in [(&mut senders, 0usize, "s"), (&mut recipients, last, "r")] {
                let (id, c) = servers[si].new_user(prefix).await?;
                let token = c.token().map(str::to_owned);
                c.close().await;
                let pool = &pools[si];
                list.push((id, pool[i % pool.len()].as_device(token)));
            }
        }
        Ok(Bench { work, servers, senders, recipients, connections })
    }

    /// Each sender's connection with the recipient it writes to.
    pub fn pairs(&self) -> Vec<(Client, UserId)> {
        self.senders.iter().zip(&self.recipients).map(|((_, c), (to, _))| (c.clone(), to.clone())).collect()
    }

    /// New connections to server `i` (after a restart) for the users who live there.
    pub async fn reconnect(&mut self, i: usize) -> anyhow::Result<()> {
        let conns = pool(&self.servers[i], self.connections).await?;
        let last = self.servers.len() - 1;
        let mut lists: Vec<&mut Vec<(UserId, Client)>> = Vec::new();
        if i == 0 {
            lists.push(&mut self.senders);
        }
        if i == last {
            lists.push(&mut self.recipients);
        }
        for list in lists {
            for (n, (_, c)) in list.iter_mut().enumerate() {
                let token = c.token().map(str::to_owned);
                *c = conns[n % conns.len()].as_device(token);
            }
        }
        Ok(())
    }

    /// One run at `rate` for `seconds`.
    pub async fn run(&self, opts: &LoadOptions) -> anyhow::Result<LoadReport> {
        self.run_watching(opts, None, Duration::ZERO).await
    }

    /// [`Bench::run`], its subscriptions also counting `watch`'s messages, and kept open
    /// after the run for up to `watch_for` until all of them arrived.
    pub async fn run_watching(&self, opts: &LoadOptions, watch: Option<Arc<Watch>>, watch_for: Duration) -> anyhow::Result<LoadReport> {
        let total = (opts.rate * opts.seconds).round() as u64;
        if total == 0 {
            bail!("rate × seconds offers no message");
        }
        let interval = Duration::from_secs_f64(1.0 / opts.rate);
        let body_len = opts.body.max(8);
        let new_hist = || Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("valid bounds");
        let ack = Arc::new(Mutex::new(new_hist()));
        let delivery = Arc::new(Mutex::new(new_hist()));
        let (acked, delivered, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let run_tag = format!("{:x}", rand::random::<u32>());

        // Recipients follow their streams live from where they are now, or from where the
        // watch starts counting (its messages may already be there: the first frame).
        let mut live = Vec::new();
        for (i, (_, c)) in self.recipients.iter().enumerate() {
            let head = match watch.as_ref().and_then(|w| w.from.get(i)) {
                Some(h) => *h,
                None => sync_head(c).await?,
            };
            let (sub, _, backlog) = c.subscribe(head).await?;
            live.push((sub, backlog));
        }
        // Message n is meant to leave at start + n × interval.
        let start = Instant::now() + Duration::from_millis(20);
        let intended = move |n: u64| start + interval.mul_f64(n as f64);
        let mut subs = Vec::new();
        for (mut sub, backlog) in live {
            let (delivery, delivered, tag, watch) = (delivery.clone(), delivered.clone(), run_tag.clone(), watch.clone());
            subs.push(tokio::spawn(async move {
                let mut backlog = Some(backlog);
                loop {
                    let events = match backlog.take() {
                        Some(events) => events,
                        None => match sub.next().await {
                            Ok(Some((_, events))) => events,
                            _ => break,
                        },
                    };
                    let now = Instant::now();
                    for m in messages(&events) {
                        if let Some(w) = &watch {
                            if let Some(n) = body_number(&m.content.body, &w.tag) {
                                w.saw(n, now);
                                continue;
                            }
                        }
                        let Some(n) = body_number(&m.content.body, &tag) else { continue };
                        let t0 = intended(n);
                        let us = now.saturating_duration_since(t0).as_micros() as u64;
                        let _ = delivery.lock().unwrap().record(us.max(1));
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }

        let cpu0: Vec<Option<(f64, f64)>> = self.servers.iter().map(|s| s.pid().and_then(usage)).collect();
        let bar = opts.progress.then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} sent · {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        let mut peak = vec![0f64; self.servers.len()];
        // The pacer: a thread of its own, because the runtime's timers tick in whole
        // milliseconds and would add up to one to every measured latency.
        let (pace_tx, mut paced) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
        std::thread::spawn(move || {
            for n in 0..total {
                let t0 = intended(n);
                let now = Instant::now();
                if t0 > now {
                    std::thread::sleep(t0 - now);
                }
                if pace_tx.send((n, t0)).is_err() {
                    return;
                }
            }
        });
        let mut inflight = tokio::task::JoinSet::new();
        while let Some((n, t0)) = paced.recv().await {
            let (from, to) = {
                let i = (n as usize) % self.senders.len();
                (&self.senders[i].1, &self.recipients[i].0)
            };
            let b = stamped_body(&run_tag, n, body_len);
            let (c, to, ack, acked2, errors2) = (from.clone(), to.clone(), ack.clone(), acked.clone(), errors.clone());
            inflight.spawn(async move {
                match c.send(&to, Content { body: b, kind: "bench".into() }, new_client_msg_id()).await {
                    Ok(_) => {
                        let us = t0.elapsed().as_micros() as u64;
                        let _ = ack.lock().unwrap().record(us.max(1));
                        acked2.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            while let Some(r) = inflight.try_join_next() {
                let _ = r;
            }
            if n % 256 == 0 {
                if let Some(b) = &bar {
                    b.set_position(n);
                    b.set_message(format!("{} acked, {} delivered", acked.load(Ordering::Relaxed), delivered.load(Ordering::Relaxed)));
                }
                for (i, s) in self.servers.iter().enumerate() {
                    if let Some((rss, _)) = s.pid().and_then(usage) {
                        peak[i] = peak[i].max(rss);
                    }
                }
            }
        }
        while inflight.join_next().await.is_some() {}
        // Deliveries still on their way: wait for them (a run that cannot keep up shows it
        // in its latencies and in delivered < offered).
        let drain_until = Instant::now() + Duration::from_secs(30);
        while delivered.load(Ordering::Relaxed) < acked.load(Ordering::Relaxed) && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let cpu_end: Vec<Option<(f64, f64)>> = self.servers.iter().map(|s| s.pid().and_then(usage)).collect();
        // Figures are for the run: what arrives while the watch goes on is not counted.
        let delivered_n = delivered.load(Ordering::Relaxed);
        let delivery = Percentiles::of(&delivery.lock().unwrap());
        if let Some(w) = &watch {
            let until = Instant::now() + watch_for;
            while w.done_at().is_none() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for s in subs {
            s.abort();
        }
        let servers = self
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (rss, cpu) = match (cpu0[i], cpu_end[i]) {
                    (Some((_, c0)), Some((rss, c1))) => (rss, (c1 - c0) / elapsed),
                    _ => (0.0, 0.0),
                };
                ServerUsage { name: s.name.to_string(), rss_mib_end: rss, rss_mib_peak: peak[i].max(rss), cpu_cores: cpu }
            })
            .collect();
        let ack = Percentiles::of(&ack.lock().unwrap());
        Ok(LoadReport {
            mode: opts.mode,
            users: self.senders.len() + self.recipients.len(),
            offered_rate: opts.rate,
            seconds: opts.seconds,
            offered: total,
            acknowledged: acked.load(Ordering::Relaxed),
            delivered: delivered_n,
            errors: errors.load(Ordering::Relaxed),
            throughput: delivered_n as f64 / elapsed,
            ack,
            delivery,
            servers,
        })
    }
}

/// `n` connections to `s`.
async fn pool(s: &Sut, n: usize) -> anyhow::Result<Vec<Client>> {
    let mut conns = Vec::new();
    for _ in 0..n.max(1) {
        conns.push(s.connect().await?);
    }
    Ok(conns)
}

/// The head of a user's event stream.
pub async fn sync_head(c: &Client) -> anyhow::Result<u64> {
    let mut since = 0;
    loop {
        let (next, events) = c.sync(since, Some(500)).await.context("sync")?;
        if events.len() < 500 {
            return Ok(next);
        }
        since = next;
    }
}

/// A body of at least `size` bytes stamped `TAG:N:`.
pub fn stamped_body(tag: &str, n: u64, size: usize) -> Vec<u8> {
    let mut b = format!("{tag}:{n}:").into_bytes();
    if b.len() < size {
        b.resize(size, b'x');
    }
    b
}

/// The message number in a body stamped `TAG:N:` by this run.
fn body_number(body: &[u8], tag: &str) -> Option<u64> {
    let s = std::str::from_utf8(&body[..body.len().min(40)]).ok()?;
    let rest = s.strip_prefix(tag)?.strip_prefix(':')?;
    rest.split(':').next()?.parse().ok()
}

/// The disk's fsync latency where the servers keep their data: `n` appends of 4 KiB, each
/// followed by `fdatasync`, as a WAL write is. Benchmarks print it so that figures from
/// different machines can be compared.
pub fn fsync_latency(dir: &std::path::Path, n: usize) -> anyhow::Result<Percentiles> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let block = vec![0x5au8; 4096];
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        h.record((t.elapsed().as_micros() as u64).max(1))?;
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(Percentiles::of(&h))
}

impl Bench {
    /// Where the servers keep their data.
    pub fn work_dir(&self) -> &std::path::Path {
        self.work.path()
    }
}

/// One report as text.
pub fn text(r: &LoadReport) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    let line = |name: &str, p: &Percentiles| {
        format!(
            "{name:<9} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  p99.9 {:>8.2} ms  max {:>8.2} ms  ({} samples)",
            ms(p.p50_us),
            ms(p.p90_us),
            ms(p.p99_us),
            ms(p.p999_us),
            ms(p.max_us),
            p.count
        )
    };
    let mut s = format!(
        "{:?} delivery, {} users, offered {:.0} msg/s for {:.0} s: {} offered, {} acknowledged, {} delivered, {} errors; throughput {:.0} msg/s\n",
        r.mode, r.users, r.offered_rate, r.seconds, r.offered, r.acknowledged, r.delivered, r.errors, r.throughput
    );
    s.push_str(&line("ack", &r.ack));
    s.push('\n');
    s.push_str(&line("delivery", &r.delivery));
    for u in &r.servers {
        s.push_str(&format!("\nserver {}: RSS {:.0} MiB (peak {:.0} MiB), CPU {:.2} cores", u.name, u.rss_mib_end, u.rss_mib_peak, u.cpu_cores));
    }
    s
}

/// Saturation search: the highest offered rate whose delivery p99 stays under `bound`
/// and whose messages are all delivered. Doubles from `start`, then bisects.
pub async fn saturate(bench: &Bench, base: &LoadOptions, bound: Duration, mut report: impl FnMut(&LoadReport)) -> anyhow::Result<(f64, Vec<LoadReport>)> {
    let ok = |r: &LoadReport| r.errors == 0 && r.delivered >= r.offered && r.delivery.p99_us <= bound.as_micros() as u64;
    let mut runs = Vec::new();
    let mut good = 0.0;
    let mut bad = None;
    let mut rate = base.rate;
    for _ in 0..12 {
        let r = bench.run(&LoadOptions { rate, ..base.clone() }).await?;
        report(&r);
        let pass = ok(&r);
        runs.push(r);
        if pass {
            good = rate;
            rate *= 2.0;
        } else {
            bad = Some(rate);
            break;
        }
    }
    if let Some(mut hi) = bad {
        let mut lo = good;
        for _ in 0..4 {
            let mid = (lo + hi) / 2.0;
            if mid - lo < lo * 0.05 + 1.0 {
                break;
            }
            let r = bench.run(&LoadOptions { rate: mid, ..base.clone() }).await?;
            report(&r);
            if ok(&r) {
                lo = mid;
            } else {
                hi = mid;
            }
            runs.push(r);
        }
        good = lo;
    }
    Ok((good, runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_their_number() {
        assert_eq!(body_number(b"ab12:77:xxxxxx", "ab12"), Some(77));
        assert_eq!(body_number(b"zz:77:", "ab12"), None);
    }
}
