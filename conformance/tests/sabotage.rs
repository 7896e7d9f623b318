//! The suite must fail a broken server. `missived` in this build carries deliberate faults
//! (its `sabotage` feature), switched on one at a time through `MISSIVED_SABOTAGE`; for
//! each, the suite is run through its command line against `conformance/impls/missived.toml`
//! and must report the failure that the fault causes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn impl_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("impls/missived.toml")
}

struct Run {
    code: Option<i32>,
    results: Vec<serde_json::Value>,
    stdout: String,
}

impl Run {
    fn failed(&self) -> Vec<String> {
        self.results.iter().filter(|r| r["result"] == "fail").filter_map(|r| r["test"].as_str().map(str::to_owned)).collect()
    }
}

fn suite(fault: Option<&str>, filters: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_missive-conformance"));
    cmd.arg("run").arg("--impl").arg(impl_file()).arg("--json").arg(&json);
    for f in filters {
        cmd.args(["--filter", f]);
    }
    cmd.env("MISSIVED", missive_conformance::harness::workspace_bin("missived"));
    match fault {
        Some(f) => cmd.env("MISSIVED_SABOTAGE", f),
        None => cmd.env_remove("MISSIVED_SABOTAGE"),
    };
    let out = cmd.output().expect("run missive-conformance");
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    Run {
        code: out.status.code(),
        results: text.lines().filter_map(|l| serde_json::from_str(l).ok()).filter(|v: &serde_json::Value| v.get("test").is_some()).collect(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// Runs the tests of `filters` with `fault` on: the suite must exit 1 and fail `expected`.
fn caught(fault: &str, filters: &[&str], expected: &str) {
    let run = suite(Some(fault), filters);
    println!("{fault}:\n{}", run.stdout);
    assert_eq!(run.code, Some(1), "the suite did not fail with {fault} switched on:\n{}", run.stdout);
    assert!(run.failed().iter().any(|t| t == expected), "{fault}: {expected} did not fail; failed: {:?}\n{}", run.failed(), run.stdout);
}

#[test]
fn the_same_tests_pass_without_sabotage() {
    let run = suite(None, &["fed.recv.*", "c2s.history.*", "c2s.send.*"]);
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert!(run.results.len() >= 15, "only {} tests ran", run.results.len());
}

#[test]
fn skipped_signature_checks_are_caught() {
    caught("skip_signature_check", &["fed.recv.*"], "fed.recv.signature");
}

#[test]
fn a_unit_stored_twice_is_caught() {
    caught("store_twice", &["fed.recv.*"], "fed.recv.duplicate");
}

#[test]
fn a_reordered_history_page_is_caught() {
    caught("reorder_page", &["c2s.history.*"], "c2s.history.paging");
}

#[test]
fn acknowledging_before_the_write_is_durable_is_caught() {
    caught("ack_before_sync", &["c2s.send.*"], "c2s.send.durable");
}
