//! Helpers shared by the `missive` binary's tests: running it with a profile and standard
//! input, and reading its `--json` output.
#![allow(dead_code)]

pub mod tmux;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How long any one step may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);
pub const BIN: &str = env!("CARGO_BIN_EXE_missive");

/// `missive` with no profile from the environment and a short connect timeout, so that a
/// stopped server is noticed quickly.
pub fn missive() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("MISSIVE_PROFILE").env("MISSIVE_CONNECT_TIMEOUT_MS", "500").kill_on_drop(true);
    c
}

/// Runs `missive --profile PROFILE ARGS` to its end, with `stdin` piped in (closed at
/// once when `None`).
pub async fn run(profile: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = missive()
        .arg("--profile")
        .arg(profile)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or_default().as_bytes()).await.unwrap();
    drop(pipe);
    tokio::time::timeout(DEADLINE, child.wait_with_output()).await.expect("missive hung").unwrap()
}

/// Standard output of a command that must succeed.
pub async fn ok(profile: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = run(profile, args, stdin).await;
    assert!(out.status.success(), "missive {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Standard error of a command that must fail, and print nothing on standard output.
pub async fn fails(profile: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = run(profile, args, stdin).await;
    assert!(!out.status.success(), "missive {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "an error prints nothing on standard output");
    String::from_utf8(out.stderr).unwrap()
}

pub fn json_lines(s: &str) -> Vec<Value> {
    s.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"))).collect()
}

/// Two servers pinned to each other on loopback: alpha.test on 127.0.0.2 with the user
/// alice (password `alice-password`) and beta.test on 127.0.0.3 with bob
/// (`bob-password`), their data in the returned directory.
pub async fn two_servers() -> (tempfile::TempDir, Vec<missive_conformance::harness::ServerProcess>) {
    use missive_conformance::harness::{workspace_bin, ServerProcess};
    let tmp = tempfile::tempdir().unwrap();
    let bin = workspace_bin("missived");
    let mut servers = Vec::new();
    for (i, name) in ["alpha.test", "beta.test"].into_iter().enumerate() {
        let data = tmp.path().join(name);
        ServerProcess::init_on(&bin, &data, name, "closed", [127, 0, 0, 2 + i as u8].into()).await.unwrap();
        servers.push(ServerProcess::start(&bin, &data, name).await.unwrap());
    }
    servers[0].pin_peer(&servers[1]).await.unwrap();
    servers[1].pin_peer(&servers[0]).await.unwrap();
    servers[0].add_user("alice", "alice-password").await.unwrap();
    servers[1].add_user("bob", "bob-password").await.unwrap();
    (tmp, servers)
}
