//! What `/metrics` reports (Prometheus text, OpenMetrics flavour): counters and histograms
//! the server updates as it works, and figures read from the store at each scrape.
//!
//! Request kinds, error codes and event kinds are fixed lists. `peer` takes the name of
//! every server this one sent a transaction to or received units from since it started,
//! and is never dropped: as many series as servers met, which the connection limits and
//! the destinations of local users bound, not a fixed number.

use std::sync::Mutex;
use std::time::Duration;

use missive_spec::ServerName;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The request's name on the wire (`send`, `sync`, …, `subscribe`), or `bad_frame`
    /// for a frame that did not decode.
    pub kind: &'static str,
    /// `ok` or the error code answered.
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerOutcomeLabels {
    pub peer: String,
    /// `ok` (the peer answered), `failed` (no answer or refused transaction).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnitLabels {
    pub peer: String,
    /// The answer given for the unit (F5): `stored`, `duplicate`, `retry`, `rejected`, …
    pub result: &'static str,
}

fn latency() -> Histogram {
    // 50 µs to ~6.5 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// The instruments the server updates, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// Messages of local senders newly stored (an idempotent retry is not counted again).
    pub messages_accepted: Counter,
    /// Events written to devices' subscriptions and sync answers, by kind.
    pub events_delivered: Family<KindLabels, Counter>,
    pub client_connections: Gauge,
    pub subscriptions: Gauge,
    /// Commands per group write of the writer.
    pub writer_batch: Histogram,
    /// Time of a group write, WAL sync included.
    pub writer_commit: Histogram,
    pub transactions: Family<PeerOutcomeLabels, Counter>,
    pub transaction_seconds: Family<PeerLabels, Histogram, fn() -> Histogram>,
    pub units_received: Family<UnitLabels, Counter>,
    scraped: std::sync::Arc<Scraped>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("missive_client_requests", "Client requests answered, by request kind and answer code", requests.clone());
        let messages_accepted = Counter::default();
        registry.register("missive_messages_accepted", "Messages of local users accepted (durably stored, acknowledged)", messages_accepted.clone());
        let events_delivered = Family::<KindLabels, Counter>::default();
        registry.register(
            "missive_events_delivered",
            "Events sent to devices (subscriptions and sync), by kind: message, receipt, undeliverable",
            events_delivered.clone(),
        );
        let client_connections = Gauge::default();
        registry.register("missive_client_connections", "Client QUIC connections open", client_connections.clone());
        let subscriptions = Gauge::default();
        registry.register("missive_client_subscriptions", "Live event subscriptions", subscriptions.clone());
        let writer_batch = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register("missive_writer_batch_commands", "Commands committed together in one synced write", writer_batch.clone());
        let writer_commit = latency();
        registry.register(
            "missive_writer_commit_seconds",
            "Time of one group write of the writer, its WAL sync included",
            writer_commit.clone(),
        );
        let transactions = Family::<PeerOutcomeLabels, Counter>::default();
        registry.register(
            "missive_federation_transactions",
            "Transactions sent to a peer: answered (ok) or not (failed)",
            transactions.clone(),
        );
        let transaction_seconds = Family::<PeerLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency as fn() -> Histogram);
        registry.register(
            "missive_federation_transaction_seconds",
            "Time from sending a transaction to a peer until its answer",
            transaction_seconds.clone(),
        );
        let units_received = Family::<UnitLabels, Counter>::default();
        registry.register(
            "missive_federation_units_received",
            "Units received from peers, by the answer given to each",
            units_received.clone(),
        );
        let scraped = std::sync::Arc::new(Scraped::default());
        registry.register_collector(Box::new(ScrapedCollector(scraped.clone())));
        Metrics {
            registry,
            requests,
            messages_accepted,
            events_delivered,
            client_connections,
            subscriptions,
            writer_batch,
            writer_commit,
            transactions,
            transaction_seconds,
            units_received,
            scraped,
        }
    }
}

impl Metrics {
    pub fn request(&self, kind: &'static str, code: Option<missive_spec::wire::ErrorCode>) {
        let code = code.map_or("ok", |c| c.as_str());
        self.requests.get_or_create(&RequestLabels { kind, code }).inc();
    }

    pub fn commit(&self, commands: usize, took: Duration) {
        self.writer_batch.observe(commands as f64);
        self.writer_commit.observe(took.as_secs_f64());
    }

    pub fn units_received(&self, peer: &ServerName, results: &[missive_spec::federation::UnitResult]) {
        for r in results {
            self.units_received.get_or_create(&UnitLabels { peer: peer.to_string(), result: r.code() }).inc();
        }
    }

    pub fn transaction(&self, peer: &ServerName, answered: bool, took: Duration) {
        let outcome = if answered { "ok" } else { "failed" };
        self.transactions.get_or_create(&PeerOutcomeLabels { peer: peer.to_string(), outcome }).inc();
        if answered {
            self.transaction_seconds.get_or_create(&PeerLabels { peer: peer.to_string() }).observe(took.as_secs_f64());
        }
    }

    /// Replaces the figures read at scrape time.
    pub fn set_scraped(&self, figures: StoreFigures) {
        *self.scraped.0.lock().unwrap_or_else(|e| e.into_inner()) = figures;
    }

    /// The whole registry in the text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One more on a gauge while it lives (a connection, a subscription).
pub struct Held(Gauge);

impl Held {
    pub fn new(gauge: &Gauge) -> Held {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One destination's outbound queue.
#[derive(Debug, Clone, Default)]
pub struct QueueFigures {
    pub peer: String,
    pub depth: u64,
    /// Age of the oldest message at the head of one of its lanes (receipts carry no time).
    pub oldest_seconds: f64,
    pub up: bool,
}

/// What a scrape reads from the store and the links.
#[derive(Debug, Clone, Default)]
pub struct StoreFigures {
    pub queues: Vec<QueueFigures>,
    pub held_units: u64,
    pub dead_letters: u64,
    pub wal_syncs: u64,
    pub wal_sync_seconds: f64,
    /// `(figure, column family, value)`
    pub rocks: Vec<(&'static str, &'static str, u64)>,
    pub process: ProcessFigures,
}

/// The process's resident memory and CPU time, from `/proc/self` (zero where absent).
#[derive(Debug, Clone, Default)]
pub struct ProcessFigures {
    pub resident_bytes: u64,
    pub cpu_seconds: f64,
}

impl ProcessFigures {
    pub fn read() -> ProcessFigures {
        // SAFETY: sysconf only reads configuration values.
        let (page, ticks) = unsafe { (libc::sysconf(libc::_SC_PAGESIZE), libc::sysconf(libc::_SC_CLK_TCK)) };
        let resident_pages = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
            .unwrap_or(0);
        // Fields 14 and 15 (utime, stime) follow the command name in parentheses.
        let cpu_ticks = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1.split_whitespace().skip(11).take(2).map(|v| v.parse::<u64>().ok()).collect::<Option<Vec<_>>>()?;
                Some(rest.iter().sum::<u64>())
            })
            .unwrap_or(0);
        ProcessFigures {
            resident_bytes: resident_pages * page.max(0) as u64,
            cpu_seconds: if ticks > 0 { cpu_ticks as f64 / ticks as f64 } else { 0.0 },
        }
    }
}

#[derive(Debug, Default)]
struct Scraped(Mutex<StoreFigures>);

#[derive(Debug)]
struct ScrapedCollector(std::sync::Arc<Scraped>);

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue + Send + Sync + std::fmt::Debug + 'static>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl prometheus_client::collector::Collector for ScrapedCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let f = self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        gauge(&mut encoder, "missive_held_units", "Units from peers held behind a gap (F6.3)", f.held_units as i64)?;
        gauge(&mut encoder, "missive_dead_letters", "Units peers refused for good, kept for the operator (missived deadletters)", f.dead_letters as i64)?;
        let c = ConstCounter::new(f.wal_syncs);
        c.encode(encoder.encode_descriptor("missive_store_wal_syncs", "WAL syncs (fsync) of the database", None, c.metric_type())?)?;
        let c = ConstCounter::new(f.wal_sync_seconds);
        c.encode(encoder.encode_descriptor("missive_store_wal_sync_seconds", "Time spent in WAL syncs (fsync)", None, c.metric_type())?)?;

        gauge(&mut encoder, "process_resident_memory_bytes", "Resident memory of the process", f.process.resident_bytes as i64)?;
        let c = ConstCounter::new(f.process.cpu_seconds);
        c.encode(encoder.encode_descriptor("process_cpu_seconds", "CPU time of the process, user and system", None, c.metric_type())?)?;

        type PerPeer = fn(&QueueFigures) -> f64;
        let per_peer: [(&str, &str, PerPeer); 3] = [
            ("missive_federation_queue_depth", "Units queued for a peer, waiting for its acknowledgement", |q| q.depth as f64),
            (
                "missive_federation_queue_oldest_seconds",
                "Age of the oldest message at the head of a peer's queue (0 when none)",
                |q| q.oldest_seconds,
            ),
            ("missive_federation_peer_up", "1 while the last exchange with the peer succeeded", |q| if q.up { 1.0 } else { 0.0 }),
        ];
        for (name, help, value) in per_peer {
            let mut family = encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
            for q in &f.queues {
                ConstGauge::new(value(q)).encode(family.encode_family(&[("peer", q.peer.as_str())])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "missive_rocksdb",
            "RocksDB figures per column family: estimated_keys, live_data_bytes, sst_files_bytes, memtable_bytes, pending_compaction_bytes",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (figure, cf, v) in &f.rocks {
            ConstGauge::new(*v as i64).encode(family.encode_family(&[("figure", *figure), ("cf", *cf)])?)?;
        }
        Ok(())
    }
}
