//! The chaos checker must catch a server that acknowledges writes before they are
//! durable. (The passing seeded run is a step of `.ci/run`, which prints its table.)

use std::process::Command;

fn chaos(fault: Option<&str>, seed: &str, messages: &str, seconds: &str, drain: &str) -> (Option<i32>, serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("chaos.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_missive-conformance"));
    cmd.args(["chaos", "--servers", "3", "--messages", messages, "--seconds", seconds, "--seed", seed, "--drain-seconds", drain])
        .arg("--impl")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("impls/missived.toml"))
        .arg("--json")
        .arg(&json)
        .env("MISSIVED", missive_conformance::harness::workspace_bin("missived"));
    match fault {
        Some(f) => cmd.env("MISSIVED_SABOTAGE", f),
        None => cmd.env_remove("MISSIVED_SABOTAGE"),
    };
    let out = cmd.output().expect("run missive-conformance chaos");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let report = std::fs::read_to_string(&json).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    (out.status.code(), report, stdout)
}

#[test]
fn the_checker_reports_acknowledged_sends_lost_by_a_server_that_acks_before_sync() {
    let (code, r, out) = chaos(Some("ack_before_sync"), "7", "120", "10", "20");
    println!("{out}");
    assert_eq!(code, Some(1), "the checker passed a server that loses acknowledged writes:\n{out}");
    assert!(r["lost"].as_u64().unwrap() > 0, "no loss reported:\n{out}");
}
