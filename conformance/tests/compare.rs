//! `missive-conformance compare` loads two builds alternately and prints the ratio of their
//! server CPU per message; here both are the same `missived`, briefly.

use std::process::Command;

#[test]
fn compare_runs_both_builds_in_turn_and_prints_the_ratio() {
    let missived = missive_conformance::harness::workspace_bin("missived");
    let out = Command::new(env!("CARGO_BIN_EXE_missive-conformance"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["compare", "--base"])
        .arg(&missived)
        .arg("--head")
        .arg(&missived)
        .args(["--users", "4", "--connections", "2", "--rate", "50", "--seconds", "1", "--rounds", "2", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let builds: Vec<&str> = lines.iter().filter_map(|v| v["build"].as_str()).collect();
    assert_eq!(builds, ["base", "head", "head", "base"], "runs alternate, base first in even rounds");
    assert!(lines.iter().filter(|v| v["build"].is_string()).all(|v| v["errors"] == 0 && v["cpu_us_per_msg"].as_f64().is_some_and(|c| c > 0.0)));
    let s = &lines.last().unwrap()["summary"];
    let (b, h, r) = (s["base_cpu_us_per_msg"].as_f64().unwrap(), s["head_cpu_us_per_msg"].as_f64().unwrap(), s["cpu_ratio"].as_f64().unwrap());
    assert!((r - h / b).abs() < 1e-9, "{s}");
}
