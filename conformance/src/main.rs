//! `missive-conformance`: runs the Missive conformance suite against any implementation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use missive_conformance::implementation::ImplFile;
use missive_conformance::report;
use missive_conformance::runner::{self, Coverage, TierChoice};

#[derive(Parser)]
#[command(name = "missive-conformance", version, about = "Missive conformance suite: checks a homeserver against the spec")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the suite against the implementation described by an impl.toml.
    Run {
        /// The implementation file (see conformance/README.md).
        #[arg(long = "impl")]
        implementation: PathBuf,
        /// Run only tests whose name contains this, or matches it with `*` wildcards
        /// (repeat for several: a test runs if it matches any).
        #[arg(long)]
        filter: Vec<String>,
        /// required, recommended or all.
        #[arg(long, default_value = "all")]
        tier: String,
        /// Also write JUnit XML here.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Also write JSON lines here (one per test, then a summary).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Tests run at once (each starts its own servers).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
    },
    /// Chaos run: servers behind fault proxies, partitions, loss, kill -9s; then an
    /// independent check that nothing acknowledged was lost, duplicated or misordered.
    Chaos {
        /// The implementation file.
        #[arg(long = "impl", default_value = "conformance/impls/missived.toml")]
        implementation: PathBuf,
        #[arg(long, default_value_t = 3)]
        servers: usize,
        #[arg(long, default_value_t = 3)]
        users_per_server: usize,
        /// Sends in all, spread evenly over the run.
        #[arg(long, default_value_t = 300)]
        messages: usize,
        /// How long faults are injected.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Seeds the plan and every fault: the same seed replays the same schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How long queues may take to drain once everything is healed.
        #[arg(long, default_value_t = 90)]
        drain_seconds: u64,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Load generator: users on one server (local) or two (federated), messages offered
    /// at a fixed rate, latency from each message's intended send time. --scenario runs
    /// one of the scenarios instead: idle devices, history, partition, cold-start.
    Load {
        #[command(flatten)]
        shape: LoadShape,
        /// live (steady traffic), idle (--devices idle connections, then live traffic),
        /// history (--stored messages, then history pages), partition (--queued messages
        /// behind a stopped peer, then the drain under live traffic), cold-start (--stored
        /// messages and --queued units, then restarts).
        #[arg(long, default_value = "live")]
        scenario: String,
        /// idle: connected devices, each a live subscription on its own connection.
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// idle: the users those devices belong to (each registered, argon2id and all).
        #[arg(long, default_value_t = 200)]
        device_users: usize,
        /// history, cold-start: messages stored first.
        #[arg(long, default_value_t = 100_000)]
        stored: u64,
        /// partition, cold-start: messages queued for a stopped peer.
        #[arg(long, default_value_t = 100_000)]
        queued: u64,
        /// Sends in flight while storing or queueing.
        #[arg(long, default_value_t = 256)]
        fill_concurrency: usize,
        /// cold-start: restarts measured.
        #[arg(long, default_value_t = 3)]
        restarts: usize,
        /// Messages offered per second (open loop).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Search for the highest rate whose delivery p99 stays under --p99-bound-ms,
        /// starting at --rate and doubling, then bisecting.
        #[arg(long)]
        saturate: bool,
        #[arg(long, default_value_t = 5.0)]
        p99_bound_ms: f64,
        /// Print JSON (one object per run) instead of text.
        #[arg(long)]
        json: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Two builds of missived under the same load, alternating, several rounds: each run's
    /// figures, then the median server CPU per delivered message of each and their ratio
    /// (scripts/perf-compare builds the two and runs this).
    Compare {
        /// The build to compare against (a missived binary).
        #[arg(long)]
        base: PathBuf,
        /// The build under test.
        #[arg(long)]
        head: PathBuf,
        #[command(flatten)]
        shape: LoadShape,
        /// Messages offered per second (the same for both).
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Runs of each build.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Print JSON (one object per run, then the summary) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the tests: name, tier, features needed, spec ids.
    List,
    /// Which spec requirements the suite checks, and which it does not.
    Coverage,
}

/// The load `load` and `compare` offer, but for its rate.
#[derive(clap::Args)]
struct LoadShape {
    #[arg(long = "impl", default_value = "conformance/impls/missived.toml")]
    implementation: PathBuf,
    /// local or federated.
    #[arg(long, default_value = "local")]
    mode: String,
    /// Users in all: half send, half receive (live subscriptions).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// QUIC connections per server that the users share.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Message body bytes.
    #[arg(long, default_value_t = 100)]
    body: usize,
}

impl LoadShape {
    fn options(&self, rate: f64, progress: bool) -> anyhow::Result<missive_conformance::load::LoadOptions> {
        use missive_conformance::load::Mode;
        let mode = match self.mode.as_str() {
            "local" => Mode::Local,
            "federated" => Mode::Federated,
            other => anyhow::bail!("--mode {other:?}: expected local or federated"),
        };
        let LoadShape { users, connections, seconds, body, .. } = *self;
        Ok(missive_conformance::load::LoadOptions { mode, users, connections, rate, seconds, body, progress })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("missive-conformance: cannot start runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(real_main(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("missive-conformance: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    // The reference implementation file finds missived through MISSIVED; default to the
    // one built beside this binary.
    if std::env::var_os("MISSIVED").is_none() {
        let beside = missive_conformance::harness::workspace_bin("missived");
        if beside.exists() {
            std::env::set_var("MISSIVED", beside);
        }
    }
    match cli.command {
        Command::Run { implementation, filter, tier, junit, json, jobs } => {
            let tier = TierChoice::parse(&tier).with_context(|| format!("--tier {tier:?}: expected required, recommended or all"))?;
            let imp = Arc::new(ImplFile::load(&implementation)?);
            let tests = runner::select(&filter, tier);
            if tests.is_empty() {
                anyhow::bail!("no test matches the filter");
            }
            println!("{}", report::banner(&imp.name));
            println!("running {} tests, {} at a time", tests.len(), jobs.max(1));
            let results = runner::run(imp.clone(), tests, jobs, |r| println!("{}", report::line(r))).await;
            println!("{}", report::summary(&results));
            if let Some(p) = junit {
                std::fs::write(&p, report::junit(&imp.name, &results)).with_context(|| format!("cannot write {}", p.display()))?;
            }
            if let Some(p) = json {
                std::fs::write(&p, report::json_lines(&imp.name, &results)).with_context(|| format!("cannot write {}", p.display()))?;
            }
            let failed = report::counts(&results, None).failed;
            Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Chaos { implementation, servers, users_per_server, messages, seconds, seed, drain_seconds, json } => {
            let imp = Arc::new(ImplFile::load(&implementation)?);
            let opts = missive_conformance::chaos::ChaosOptions { servers, users_per_server, messages, seconds, seed, drain_seconds };
            println!("{}", report::banner(&imp.name));
            let r = missive_conformance::chaos::run(imp, &opts, |m| println!("... {m}")).await?;
            println!("{}", missive_conformance::chaos::table(&r));
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&r)?).with_context(|| format!("cannot write {}", p.display()))?;
            }
            Ok(if r.passed { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Load { shape, scenario, devices, device_users, stored, queued, fill_concurrency, restarts, rate, saturate, p99_bound_ms, json, quiet } => {
            use missive_conformance::load::{self, Bench};
            use missive_conformance::scenarios::{self, Scenario, ScenarioOptions};
            let chosen = Scenario::parse(&scenario)
                .with_context(|| format!("--scenario {scenario:?}: expected live, idle, history, partition or cold-start"))?;
            if chosen != Scenario::Live {
                anyhow::ensure!(!saturate, "--saturate goes with --scenario live only");
                let imp = Arc::new(ImplFile::load(&shape.implementation)?);
                let live = shape.options(rate, false)?;
                let o = ScenarioOptions { live, devices, device_users, stored, queued, fill_concurrency, restarts };
                let say = |m: &str| {
                    if !quiet {
                        eprintln!("... {m}");
                    }
                };
                let (text, value) = match chosen {
                    Scenario::Idle => {
                        let r = scenarios::idle(imp, &o, say).await?;
                        (scenarios::idle_text(&r), serde_json::to_value(&r)?)
                    }
                    Scenario::History => {
                        let r = scenarios::history(imp, &o, say).await?;
                        (scenarios::history_text(&r), serde_json::to_value(&r)?)
                    }
                    Scenario::Partition => {
                        let r = scenarios::partition(imp, &o, say).await?;
                        (scenarios::partition_text(&r), serde_json::to_value(&r)?)
                    }
                    Scenario::ColdStart => {
                        let r = scenarios::cold_start(imp, &o, say).await?;
                        (scenarios::cold_start_text(&r), serde_json::to_value(&r)?)
                    }
                    Scenario::Live => unreachable!("handled below"),
                };
                println!("{}", if json { value.to_string() } else { text });
                return Ok(ExitCode::SUCCESS);
            }
            let opts = shape.options(rate, !quiet && !json)?;
            let mode = opts.mode;
            let imp = Arc::new(ImplFile::load(&shape.implementation)?);
            let bench = Bench::setup(imp, mode, opts.users, opts.connections).await?;
            let disk = load::fsync_latency(bench.work_dir(), 200)?;
            if json {
                println!("{}", serde_json::json!({"fsync": disk}));
            } else {
                println!(
                    "disk: fsync p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (200 appends of 4 KiB + fdatasync in the data directory)",
                    disk.p50_us as f64 / 1000.0,
                    disk.p99_us as f64 / 1000.0,
                    disk.max_us as f64 / 1000.0
                );
            }
            let show = |r: &load::LoadReport| {
                if json {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                } else {
                    println!("{}\n", load::text(r));
                }
            };
            if saturate {
                let bound = std::time::Duration::from_secs_f64(p99_bound_ms / 1000.0);
                let (best, _) = load::saturate(&bench, &opts, bound, show).await?;
                if json {
                    println!("{}", serde_json::json!({"saturation": {"mode": mode, "p99_bound_ms": p99_bound_ms, "highest_rate": best}}));
                } else {
                    println!("saturation: {best:.0} msg/s is the highest offered rate with every message delivered and delivery p99 under {p99_bound_ms} ms");
                }
            } else {
                show(&bench.run(&opts).await?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare { base, head, shape, rate, rounds, json } => {
            use missive_conformance::compare::{self, Build};
            let opts = shape.options(rate, false)?;
            for p in [&base, &head] {
                anyhow::ensure!(p.is_file(), "{} is not a missived binary", p.display());
            }
            let imp = ImplFile::load(&shape.implementation)?;
            let (base, head) = (Build { label: "base".into(), missived: base }, Build { label: "head".into(), missived: head });
            if !json {
                println!("base: {}\nhead: {}", compare::describe(&base), compare::describe(&head));
                let missive_conformance::load::LoadOptions { mode, users, seconds, body, .. } = &opts;
                println!("{mode:?}, {users} users, {rate} msg/s offered for {seconds} s, {body}-byte bodies, {rounds} rounds alternating\n");
                println!("{:<5} {:>5} {:>10} {:>12} {:>14} {:>14} {:>7} {:>10}", "build", "round", "msg/s", "CPU µs/msg", "delivery p50", "delivery p99", "errors", "fsync p50");
            }
            let runs = compare::compare(&imp, &base, &head, &opts, rounds, |r| {
                if json {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                } else {
                    let cpu = r.cpu_us_per_msg.map_or("-".to_owned(), |c| format!("{c:.1}"));
                    println!(
                        "{:<5} {:>5} {:>10.0} {:>12} {:>11.2} ms {:>11.2} ms {:>7} {:>7.3} ms",
                        r.build, r.round, r.delivered_per_s, cpu, r.delivery_p50_ms, r.delivery_p99_ms, r.errors, r.fsync_p50_ms
                    );
                }
            })
            .await?;
            let summary = compare::summarize(&runs, "base", "head").context("no run delivered anything: nothing to compare")?;
            if json {
                println!("{}", serde_json::json!({ "summary": summary }));
            } else {
                println!(
                    "\nserver CPU per delivered message (median): base {:.1} µs, head {:.1} µs; head/base = {:.3}",
                    summary.base_cpu_us_per_msg, summary.head_cpu_us_per_msg, summary.cpu_ratio
                );
                println!("delivery p99 (median): base {:.2} ms, head {:.2} ms", summary.base_delivery_p99_ms, summary.head_delivery_p99_ms);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List => {
            for t in missive_conformance::suite::all() {
                let needs: Vec<&str> = t.needs.iter().map(|f| f.name()).collect();
                println!("{:<36} {:<12} {:<20} {}", t.name, t.tier.name(), needs.join(","), t.ids.join(" "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Coverage => {
            let tests = missive_conformance::suite::all();
            let cov = Coverage::of(tests.iter().flat_map(|t| t.ids.iter().copied()));
            let reqs = missive_spec::requirements::all();
            println!(
                "{} of {} server requirements are checked by at least one test ({:.1}%)",
                cov.tested.len(),
                cov.total(),
                cov.percent()
            );
            println!("not checked:");
            for id in &cov.untested {
                if let Some(r) = reqs.iter().find(|r| &r.id == id) {
                    let text: String = r.text.chars().take(90).collect();
                    println!("  {:<15} {:<6} {text}", r.id, r.section);
                }
            }
            println!("client duties (out of a server suite's reach): {}", cov.client_duties);
            Ok(ExitCode::SUCCESS)
        }
    }
}
