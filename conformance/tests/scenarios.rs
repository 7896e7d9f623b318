//! The load generator's scenarios, each at a small size against the test build of
//! `missived`: every one builds its state through the protocol and reports figures that
//! show it did (devices connected, every page walked, every queued message drained once).

use std::process::Command;

use serde_json::Value;

fn scenario(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_missive-conformance"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .env("MISSIVED", missive_conformance::harness::workspace_bin("missived"))
        .args(["load", "--users", "4", "--connections", "2", "--rate", "50", "--seconds", "1", "--json", "--quiet"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn live_ok(r: &Value) {
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["delivered"], r["offered"], "{r}");
}

#[test]
fn idle_devices_stay_connected_while_live_traffic_is_measured() {
    // More connections than the default per-address limit: allow_connections raised it.
    let r = scenario(&["--scenario", "idle", "--devices", "150", "--device-users", "10"]);
    assert_eq!(r["devices"], 150, "{r}");
    assert_eq!(r["dropped"], 0, "{r}");
    assert!(r["server_rss_mib_connected"].as_f64().unwrap() > 0.0, "{r}");
    live_ok(&r["live_before"]);
    live_ok(&r["live_connected"]);
}

#[test]
fn history_pages_walk_every_message_at_both_sizes() {
    let r = scenario(&["--scenario", "history", "--stored", "1500"]);
    assert_eq!(r["fill"]["messages"], 1500, "{r}");
    // Two pairs of users: the paged conversation holds every other message.
    assert_eq!(r["small"]["messages_walked"], 500, "{r}");
    assert_eq!(r["large"]["messages_walked"], 750, "{r}");
    assert_eq!(r["large"]["walk"]["count"], 15, "pages of 50: {r}");
}

#[test]
fn a_queue_behind_a_stopped_peer_drains_exactly_once_under_live_traffic() {
    let r = scenario(&["--scenario", "partition", "--queued", "1200"]);
    assert_eq!(r["drained"], 1200, "{r}");
    assert_eq!(r["duplicates"], 0, "{r}");
    assert!(r["drain_rate"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["first_drained_seconds"].as_f64().unwrap() <= r["drain_seconds"].as_f64().unwrap(), "{r}");
    live_ok(&r["live_before"]);
    live_ok(&r["live_draining"]);
}

#[test]
fn cold_start_serves_after_each_restart() {
    let r = scenario(&["--scenario", "cold-start", "--stored", "800", "--queued", "300", "--restarts", "2"]);
    assert_eq!(r["fill_local"]["messages"], 500, "{r}");
    assert_eq!(r["fill_queued"]["messages"], 300, "{r}");
    let restarts = r["restarts"].as_array().unwrap();
    assert_eq!(restarts.len(), 2, "{r}");
    assert!(restarts.iter().all(|s| s["serving_ms"].as_f64().unwrap() >= s["ready_ms"].as_f64().unwrap()), "{r}");
    let killed: Vec<bool> = restarts.iter().map(|s| s["after_kill"].as_bool().unwrap()).collect();
    assert_eq!(killed, [false, true], "a clean restart, then one after kill -9: {r}");
}
