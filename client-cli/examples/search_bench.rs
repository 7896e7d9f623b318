//! How fast the message archive finds a message among 100,000 kept locally, and how fast
//! it keeps them. Prints figures; asserts no time.
//!
//!     cargo run --release -p missive-cli --example search_bench [-- MESSAGES]
//!
//! Builds an archive in a temporary directory: 100,000 text messages (5 to 25 words each,
//! drawn from a 5,000-word vocabulary with a Zipf distribution, like natural text) between
//! one user and 50 peers, recorded in batches of 100 as `sync` pages arrive, one of them
//! holding a word no other has. Then times searches as `missive search` runs them (limit
//! 20, newest first): common words, rare words, a prefix, two words, one conversation
//! (`--with`), and the one message with the unique word.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use missive_cli::archive::Archive;
use missive_spec::{Content, ConversationId, Deps, Message, ServerName, UserId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PEERS: usize = 50;
const VOCABULARY: usize = 5000;
const BATCH: usize = 100;
const LIMIT: u32 = 20;
const NEEDLE: &str = "quetzalcoatl";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(100_000);
    let mut rng = StdRng::seed_from_u64(15);
    let words = vocabulary(&mut rng);
    let zipf = Zipf::new(VOCABULARY);
    let server = ServerName::parse("alpha.example")?;
    let me = UserId::parse("@alice:alpha.example")?;
    let peers: Vec<UserId> =
        (0..PEERS).map(|i| UserId::parse(&format!("@peer{i}:alpha.example"))).collect::<Result<_, _>>()?;
    let mut seqs = vec![0u64; PEERS];
    let start_ms = 1_767_225_600_000u64; // 2026-01-01
    let messages: Vec<Message> = (0..total)
        .map(|i| {
            let p = rng.gen_range(0..PEERS);
            seqs[p] += 1;
            let n = rng.gen_range(5..=25);
            let mut text: Vec<&str> = (0..n).map(|_| words[zipf.sample(&mut rng)].as_str()).collect();
            if i == total * 3 / 8 {
                text[n / 2] = NEEDLE;
            }
            let (from, to) = if rng.gen_bool(0.5) { (&me, &peers[p]) } else { (&peers[p], &me) };
            let mut deps = Deps::new();
            deps.set(server.clone(), seqs[p]);
            Message {
                to: to.clone(),
                ts: start_ms + i as u64 * 30_000,
                seq: seqs[p],
                conv: ConversationId::one_to_one(&me, &peers[p]),
                deps,
                from: from.clone(),
                origin: server.clone(),
                content: Content::text(&text.join(" ")),
            }
        })
        .collect();

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("archive.sqlite3");
    let archive = Archive::open_path(&path)?;
    let t = Instant::now();
    for batch in messages.chunks(BATCH) {
        archive.record_all(batch)?;
    }
    let took = t.elapsed();
    println!("search_bench: {total} messages, {PEERS} conversations, vocabulary {VOCABULARY} (Zipf), limit {LIMIT}");
    println!(
        "insert  {:>8.0} messages/s in batches of {BATCH} ({:.1} s); archive {:.1} MiB",
        total as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
        file_mib(&path)
    );
    let t = Instant::now();
    let again = archive.record_all(&messages[..10_000.min(total)])?;
    println!(
        "dedupe  {:>8.0} messages/s seen again ({again} new)",
        10_000.min(total) as f64 / t.elapsed().as_secs_f64()
    );
    let single: Vec<Message> =
        messages[..1000.min(total)].iter().map(|m| Message { seq: m.seq + 1_000_000, ..m.clone() }).collect();
    let t = Instant::now();
    for m in &single {
        archive.record(m)?;
    }
    println!(
        "insert  {:>8.0} messages/s one per transaction (as `send` records)",
        single.len() as f64 / t.elapsed().as_secs_f64()
    );
    drop(archive);

    let mut opens = hist();
    for _ in 0..200 {
        let t = Instant::now();
        let a = Archive::open_path(&path)?;
        record(&mut opens, t.elapsed());
        drop(a);
    }
    println!("open    {}", summary(&opens));

    let archive = Archive::open_path(&path)?;
    let common: Vec<String> = words[..10].to_vec();
    let rare: Vec<String> = words[3000..3200].to_vec();
    let prefixes: Vec<String> = words[100..300].iter().map(|w| w[..3.min(w.len())].to_owned()).collect();
    let pairs: Vec<String> = (0..200).map(|i| format!("{} {}", words[i % 10], words[400 + i])).collect();
    let cases: [(&str, &[String], bool); 5] = [
        ("common word", &common, false),
        ("rare word", &rare, false),
        ("prefix (3 letters)", &prefixes, false),
        ("two words", &pairs, false),
        ("common word --with", &common, true),
    ];
    for (name, queries, with) in cases {
        let mut h = hist();
        let mut found = 0;
        for round in 0..1000 {
            let q = &queries[round % queries.len()];
            let with = with.then(|| &peers[round % PEERS]);
            let t = Instant::now();
            let hits = archive.search(q, with, LIMIT)?.hits;
            record(&mut h, t.elapsed());
            found += hits.len();
        }
        println!("search  {name:<20} {}  ({:.1} hits/query)", summary(&h), found as f64 / 1000.0);
    }
    let mut h = hist();
    let mut needle = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        needle = archive.search(NEEDLE, None, LIMIT)?.hits;
        record(&mut h, t.elapsed());
    }
    println!("search  {:<20} {}", "the unique word", summary(&h));
    match needle.as_slice() {
        [hit] => println!("found   the one message among {} with {NEEDLE:?}: {}", archive.len()?, hit.marked("[", "]")),
        other => println!("MISSING: {} hits for {NEEDLE:?}", other.len()),
    }
    Ok(())
}

/// Pronounceable made-up words, all different.
fn vocabulary(rng: &mut StdRng) -> Vec<String> {
    const SYLLABLES: &[&str] =
        &["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "ga", "shi", "ter", "bon", "lan", "qua"];
    let mut seen = std::collections::HashSet::new();
    let mut words = Vec::with_capacity(VOCABULARY);
    while words.len() < VOCABULARY {
        let n = rng.gen_range(1..=4);
        let w: String = (0..n).map(|_| SYLLABLES[rng.gen_range(0..SYLLABLES.len())]).collect();
        if w != NEEDLE && seen.insert(w.clone()) {
            words.push(w);
        }
    }
    words
}

/// Word ranks with probability proportional to 1/rank.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Zipf {
        let mut sum = 0.0;
        let cumulative = (1..=n).map(|k| {
            sum += 1.0 / k as f64;
            sum
        });
        Zipf { cumulative: cumulative.collect() }
    }
    fn sample(&self, rng: &mut StdRng) -> usize {
        let x = rng.gen_range(0.0..*self.cumulative.last().unwrap_or(&1.0));
        self.cumulative.partition_point(|&c| c < x).min(self.cumulative.len() - 1)
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is valid")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(d.as_micros() as u64);
}

fn summary(h: &Histogram<u64>) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

fn file_mib(path: &std::path::Path) -> f64 {
    let mut bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    bytes += std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    bytes as f64 / (1024.0 * 1024.0)
}
