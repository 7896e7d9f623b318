//! The operator's account commands against a real `missived`: `user list|show|passwd|
//! disable|enable|remove` and `device list|revoke`, with the server running (admin socket)
//! and stopped (the database directly), `--json` output parsed, and the config found
//! through `MISSIVED_CONFIG` instead of `--config`.

mod common;

use std::process::{Output, Stdio};

use common::*;
use missive_conformance::harness::ServerProcess;
use missive_spec::ErrorCode;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// `missived ARGS` for `srv`, its config given by the environment.
async fn admin(srv: &ServerProcess, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = tokio::process::Command::new(missived())
        .args(args)
        .env("MISSIVED_CONFIG", &srv.config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        pipe.write_all(s.as_bytes()).await.unwrap();
    }
    drop(pipe);
    tokio::time::timeout(DEADLINE, child.wait_with_output()).await.expect("missived hung").unwrap()
}

/// Runs a command that must succeed; its `--json` lines.
async fn json(srv: &ServerProcess, args: &[&str], stdin: Option<&str>) -> Vec<Value> {
    let out = admin(srv, args, stdin).await;
    assert!(out.status.success(), "missived {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"))).collect()
}

fn state_of(users: &[Value], user: &str) -> (String, u64) {
    let u = users.iter().find(|u| u["user"] == user).unwrap_or_else(|| panic!("{user} not listed: {users:?}"));
    assert_eq!(u["type"], "user");
    (u["state"].as_str().unwrap().to_owned(), u["devices"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_accounts_and_devices_with_the_server_running_or_stopped() {
    let (_dir, mut srv) = server("alpha.test", "open").await;
    let alice = register(&srv, "alice").await;
    let laptop = login(&srv, "alice").await;
    let bob = register(&srv, "bob").await;

    let users = json(&srv, &["user", "list", "--json"], None).await;
    assert_eq!(users.len(), 2, "{users:?}");
    assert_eq!(state_of(&users, "@alice:alpha.test"), ("active".into(), 2));

    // Devices: listed, and one revoked while it is subscribed.
    let devices = json(&srv, &["device", "list", "alice", "--json"], None).await;
    assert_eq!(devices.len(), 2, "{devices:?}");
    assert!(devices.iter().all(|d| d["type"] == "device" && d["user"] == "@alice:alpha.test"));
    let shown = json(&srv, &["user", "show", "@alice:alpha.test", "--json"], None).await;
    assert_eq!((shown[0]["type"].as_str(), shown.len()), (Some("user"), 3), "{shown:?}");
    let laptop_id = laptop.devices().await.unwrap().into_iter().find(|d| d.current).unwrap().id;
    let (mut sub, _, _) = laptop.subscribe(0).await.unwrap();
    let revoked = json(&srv, &["device", "revoke", "alice", laptop_id.as_str(), "--json"], None).await;
    assert_eq!(revoked[0]["revoked"], serde_json::json!([laptop_id.as_str()]));
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match sub.next_frame().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the revoked device's subscription did not end");
    assert_eq!(ended.err().and_then(|e| e.code()), Some(ErrorCode::Unauthorized));
    let out = admin(&srv, &["device", "revoke", "alice", laptop_id.as_str()], None).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no device"), "{out:?}");

    // A new password, every device logged out.
    let done = json(&srv, &["user", "passwd", "alice", "--password-stdin", "--logout", "--json"], Some("a-new-password\n")).await;
    assert_eq!((done[0]["type"].as_str(), done[0]["revoked"].as_array().map(Vec::len)), (Some("ok"), Some(1)));
    assert_eq!(alice.devices().await.unwrap_err().code(), Some(ErrorCode::Unauthorized));
    let mut c = connect(&srv).await;
    assert_eq!(c.login(&uid("alice", &srv), &password("alice"), None).await.unwrap_err().code(), Some(ErrorCode::BadCredentials));
    c.login(&uid("alice", &srv), "a-new-password", None).await.unwrap();

    // Disabled: logged out, no login, until enabled again.
    json(&srv, &["user", "disable", "bob", "--json"], None).await;
    assert_eq!(bob.devices().await.unwrap_err().code(), Some(ErrorCode::Unauthorized));
    let mut b = connect(&srv).await;
    assert_eq!(b.login(&uid("bob", &srv), &password("bob"), None).await.unwrap_err().code(), Some(ErrorCode::BadCredentials));
    assert_eq!(state_of(&json(&srv, &["user", "list", "--json"], None).await, "@bob:alpha.test").0, "disabled");
    c.send_text(&uid("bob", &srv), "still reaches a disabled account").await.unwrap();
    json(&srv, &["user", "enable", "bob", "--json"], None).await;
    b.login(&uid("bob", &srv), &password("bob"), None).await.unwrap();

    // Removed: only with confirmation, and the id is never issued again.
    let out = admin(&srv, &["user", "remove", "bob"], None).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--yes"), "{out:?}");
    json(&srv, &["user", "remove", "bob", "--yes", "--json"], None).await;
    assert_eq!(b.devices().await.unwrap_err().code(), Some(ErrorCode::Unauthorized));
    let mut again = connect(&srv).await;
    let taken = again.register(&uid("bob", &srv), "another-password", None, None).await.unwrap_err();
    assert_eq!(taken.code(), Some(ErrorCode::UserExists));
    assert_eq!(c.send_text(&uid("bob", &srv), "gone?").await.unwrap_err().code(), Some(ErrorCode::UnknownUser));

    // With the server stopped, the same commands work on the database.
    srv.terminate().await.unwrap();
    let users = json(&srv, &["user", "list", "--json"], None).await;
    assert_eq!(state_of(&users, "@bob:alpha.test").0, "removed");
    json(&srv, &["user", "passwd", "alice", "--password-stdin", "--json"], Some("offline-password\n")).await;
    srv.restart().await.unwrap();
    let mut c = connect(&srv).await;
    c.login(&uid("alice", &srv), "offline-password", None).await.unwrap();

    // Without --config or MISSIVED_CONFIG the default path is tried and named.
    let out = tokio::process::Command::new(missived()).args(["user", "list"]).env_remove("MISSIVED_CONFIG").output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("MISSIVED_CONFIG") && err.contains("/etc/missive/missived.toml"), "{err}");
}
