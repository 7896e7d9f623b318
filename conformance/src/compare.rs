//! Two builds of `missived` under the same load, side by side in one sitting: runs
//! alternate between the builds (base first in even rounds, head first in odd ones) so
//! that whatever drifts on the machine — another process, the disk's fsync latency, the
//! CPU's clock — falls on both, and the summary gives each build's median server CPU per
//! delivered message and their ratio, so that a regression shows as a number
//! (`scripts/perf-compare` builds the two and calls this).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::implementation::ImplFile;
use crate::load::{fsync_latency, Bench, LoadOptions, LoadReport};

/// One build to load.
#[derive(Clone, Debug)]
pub struct Build {
    pub label: String,
    pub missived: PathBuf,
}

/// What one run of one build gave.
#[derive(Clone, Debug, Serialize)]
pub struct RunFigures {
    pub build: String,
    pub round: usize,
    pub delivered_per_s: f64,
    /// Server CPU time (all servers of the run) per delivered message, in µs.
    pub cpu_us_per_msg: Option<f64>,
    pub delivery_p50_ms: f64,
    pub delivery_p99_ms: f64,
    pub errors: u64,
    pub fsync_p50_ms: f64,
}

/// The medians of each build and head's over base's.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub base_cpu_us_per_msg: f64,
    pub head_cpu_us_per_msg: f64,
    /// head / base: below 1 is cheaper.
    pub cpu_ratio: f64,
    pub base_delivery_p99_ms: f64,
    pub head_delivery_p99_ms: f64,
}

/// Server CPU time per delivered message of a run, in µs (None when nothing was delivered).
pub fn cpu_us_per_message(r: &LoadReport) -> Option<f64> {
    let cores: f64 = r.servers.iter().map(|s| s.cpu_cores).sum();
    (r.throughput > 0.0).then(|| cores / r.throughput * 1e6)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// The summary of the runs of the builds labelled `base` and `head`.
pub fn summarize(runs: &[RunFigures], base: &str, head: &str) -> Option<Summary> {
    let of = |label: &str, f: fn(&RunFigures) -> Option<f64>| median(runs.iter().filter(|r| r.build == label).filter_map(f).collect());
    let cpu = |r: &RunFigures| r.cpu_us_per_msg;
    let p99 = |r: &RunFigures| Some(r.delivery_p99_ms);
    let (b, h) = (of(base, cpu)?, of(head, cpu)?);
    Some(Summary {
        base_cpu_us_per_msg: b,
        head_cpu_us_per_msg: h,
        cpu_ratio: h / b,
        base_delivery_p99_ms: of(base, p99)?,
        head_delivery_p99_ms: of(head, p99)?,
    })
}

/// Loads `base` and `head` in turn, `rounds` times each, fresh servers for every run.
pub async fn compare(
    imp: &ImplFile,
    base: &Build,
    head: &Build,
    opts: &LoadOptions,
    rounds: usize,
    mut show: impl FnMut(&RunFigures),
) -> anyhow::Result<Vec<RunFigures>> {
    let mut out = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 { [base, head] } else { [head, base] };
        for build in order {
            let figures = run_one(imp, build, opts, round).await?;
            show(&figures);
            out.push(figures);
        }
    }
    Ok(out)
}

async fn run_one(imp: &ImplFile, build: &Build, opts: &LoadOptions, round: usize) -> anyhow::Result<RunFigures> {
    let mut imp = imp.clone();
    imp.env.insert("MISSIVED".into(), build.missived.display().to_string());
    let bench = Bench::setup(Arc::new(imp), opts.mode, opts.users, opts.connections).await?;
    let disk = fsync_latency(bench.work_dir(), 200)?;
    let r = bench.run(opts).await?;
    Ok(RunFigures {
        build: build.label.clone(),
        round,
        delivered_per_s: r.throughput,
        cpu_us_per_msg: cpu_us_per_message(&r),
        delivery_p50_ms: r.delivery.p50_us as f64 / 1000.0,
        delivery_p99_ms: r.delivery.p99_us as f64 / 1000.0,
        errors: r.errors,
        fsync_p50_ms: disk.p50_us as f64 / 1000.0,
    })
}

/// `base (PATH)` for headings.
pub fn describe(b: &Build) -> String {
    format!("{} ({})", b.label, Path::new(&b.missived).display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(build: &str, cpu: f64, p99: f64) -> RunFigures {
        RunFigures {
            build: build.into(),
            round: 0,
            delivered_per_s: 1000.0,
            cpu_us_per_msg: Some(cpu),
            delivery_p50_ms: 1.0,
            delivery_p99_ms: p99,
            errors: 0,
            fsync_p50_ms: 0.2,
        }
    }

    #[test]
    fn the_summary_is_the_ratio_of_the_medians() {
        let runs = [run("base", 300.0, 4.0), run("head", 100.0, 2.0), run("base", 280.0, 5.0), run("head", 110.0, 1.0), run("base", 900.0, 3.0)];
        let s = summarize(&runs, "base", "head").unwrap();
        assert_eq!((s.base_cpu_us_per_msg, s.head_cpu_us_per_msg), (300.0, 105.0));
        assert!((s.cpu_ratio - 0.35).abs() < 1e-9);
        assert_eq!((s.base_delivery_p99_ms, s.head_delivery_p99_ms), (4.0, 1.5));
        assert_eq!(summarize(&runs[..1], "base", "head"), None, "no head run, no ratio");
    }
}
