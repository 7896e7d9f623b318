//! The `missive` binary against a real `missived`: every command, `--json` output,
//! key pinning, interactive chat over pipes, and errors on standard error.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use missive_conformance::harness::{workspace_bin, ServerProcess};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::ChildStdout;

mod common;

use common::*;

fn texts(v: &[Value]) -> Vec<String> {
    v.iter().filter(|o| o["type"] == "message").map(|o| o["text"].as_str().unwrap().to_owned()).collect()
}

async fn next_json(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(DEADLINE, lines.next_line()).await.expect("no output in time").unwrap();
    serde_json::from_str(&line.expect("output ended")).unwrap()
}

/// `missive --json listen` running for `profile`, and its output lines.
fn listen_json(profile: &Path) -> (tokio::process::Child, Lines<BufReader<ChildStdout>>) {
    let mut child = missive()
        .arg("--profile")
        .arg(profile)
        .args(["--json", "listen"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// The next JSON line of the given type, skipping others (receipts interleave).
async fn next_of(lines: &mut Lines<BufReader<ChildStdout>>, kind: &str, skipped: &mut Vec<Value>) -> Value {
    loop {
        let v = next_json(lines).await;
        if v["type"] == kind {
            return v;
        }
        skipped.push(v);
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    srv: ServerProcess,
    alice: PathBuf,
    bob: PathBuf,
}

async fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let srv = ServerProcess::create(&workspace_bin("missived"), &tmp.path().join("srv"), "alpha.test", "closed")
        .await
        .unwrap();
    srv.add_user("alice", "alice-password").await.unwrap();
    srv.add_user("bob", "bob-password").await.unwrap();
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    let addr = srv.addr.to_string();
    let out = ok(&alice, &["--json", "login", "@alice:alpha.test", "--server", &addr, "--password-stdin"], Some("alice-password\n")).await;
    assert_eq!(json_lines(&out)[0]["type"], "session");
    ok(&bob, &["login", "@bob:alpha.test", "--server", &addr, "--password-stdin"], Some("bob-password\n")).await;
    Setup { _tmp: tmp, srv, alice, bob }
}

#[tokio::test]
async fn send_listen_sync_and_paged_history() {
    let s = setup().await;
    let (mut listen, mut lines) = listen_json(&s.bob);

    for i in 0..5 {
        let out = ok(&s.alice, &["--json", "send", "@bob:alpha.test", &format!("hello {i}")], None).await;
        let sent = &json_lines(&out)[0];
        assert_eq!(sent["type"], "sent");
        assert_eq!(sent["seq"], i + 1);
    }
    let mut skipped = Vec::new();
    for i in 0..5 {
        let m = next_of(&mut lines, "message", &mut skipped).await;
        assert_eq!(m["text"], format!("hello {i}"));
        assert_eq!(m["from"], "@alice:alpha.test");
    }
    listen.kill().await.unwrap();
    listen.wait().await.unwrap();

    // listen advanced the sync position: sync shows no message until alice writes again
    // (only the delivered receipts listen itself sent).
    let out = json_lines(&ok(&s.bob, &["--json", "sync"], None).await);
    assert_eq!(out.last().unwrap()["type"], "synced");
    assert!(texts(&out).is_empty(), "{out:?}");
    assert!(out.iter().filter(|o| o["type"] == "receipt").all(|o| o["kind"] == "delivered" && o["user"] == "@bob:alpha.test"));
    ok(&s.alice, &["send", "@bob:alpha.test", "one more"], None).await;
    let out = json_lines(&ok(&s.bob, &["--json", "sync"], None).await);
    assert_eq!(texts(&out), vec!["one more"]);
    let human = ok(&s.bob, &["sync"], None).await;
    assert!(!human.contains("alice:alpha.test:"), "a second sync shows no message again: {human:?}");

    // History pages newest first with cursors.
    let p1 = json_lines(&ok(&s.bob, &["--json", "history", "@alice:alpha.test", "--limit", "4"], None).await);
    assert_eq!(texts(&p1), vec!["one more", "hello 4", "hello 3", "hello 2"]);
    let cursor = p1.last().unwrap()["older"].as_str().unwrap().to_owned();
    let p2 = json_lines(&ok(&s.bob, &["--json", "history", "@alice:alpha.test", "--limit", "4", "--before", &cursor], None).await);
    assert_eq!(texts(&p2), vec!["hello 1", "hello 0"]);
    assert!(p2.last().unwrap()["older"].is_null());
    let human = ok(&s.alice, &["history", "@bob:alpha.test", "--limit", "1"], None).await;
    assert!(human.contains("@alice:alpha.test: one more") && human.contains("--before"), "{human}");
}

#[tokio::test]
async fn chat_sends_typed_lines_and_shows_incoming_ones() {
    let s = setup().await;
    ok(&s.alice, &["send", "@bob:alpha.test", "earlier"], None).await;
    let mut chat = missive()
        .arg("--profile")
        .arg(&s.bob)
        .args(["--json", "chat", "@alice:alpha.test"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = chat.stdin.take().unwrap();
    let mut lines = BufReader::new(chat.stdout.take().unwrap()).lines();
    // Recent history first.
    assert_eq!(next_json(&mut lines).await["text"], "earlier");

    stdin.write_all(b"hi alice, typed in chat\n").await.unwrap();
    let sent = next_json(&mut lines).await;
    assert_eq!((sent["type"].as_str(), sent["text"].as_str()), (Some("sent"), Some("hi alice, typed in chat")));
    let out = json_lines(&ok(&s.alice, &["--json", "sync"], None).await);
    assert!(texts(&out).contains(&"hi alice, typed in chat".to_owned()));

    ok(&s.alice, &["send", "@bob:alpha.test", "incoming while typing"], None).await;
    let mut skipped = Vec::new();
    let incoming = next_of(&mut lines, "message", &mut skipped).await;
    assert_eq!(incoming["text"], "incoming while typing");
    // alice's sync acknowledged bob's line: chat showed the state change.
    assert!(
        skipped.iter().any(|v| v["type"] == "receipt" && v["user"] == "@alice:alpha.test" && v["kind"] == "delivered"),
        "{skipped:?}"
    );

    // alice starts typing: bob's chat shows it.
    ok(&s.alice, &["typing", "@bob:alpha.test"], None).await;
    let typing = next_of(&mut lines, "typing", &mut skipped).await;
    assert_eq!(typing["user"], "@alice:alpha.test");

    // Ctrl-D: end of input quits cleanly.
    drop(stdin);
    let status = tokio::time::timeout(DEADLINE, chat.wait()).await.expect("chat did not quit").unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn changed_server_key_is_refused_loudly_and_errors_go_to_stderr() {
    let mut s = setup().await;
    // Errors: stderr, non-zero exit, nothing on stdout.
    let out = run(&s.alice, &["send", "@nobody:alpha.test", "x"], None).await;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_user"));
    let out = run(&s.alice, &["send", "not-a-user", "x"], None).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("@localpart:server.name"));

    // Replace the server with another key on the same address.
    let addr = s.srv.addr;
    s.srv.kill9().await;
    let other = s._tmp.path().join("impostor");
    ServerProcess::init(&workspace_bin("missived"), &other, "alpha.test", "open").await.unwrap();
    let cfg = other.join("missived.toml");
    // The client API is the first `listen` of the file: move it to the old address.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let start = text.find("listen = \"").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    let text = format!("{}listen = \"{addr}\"{}", &text[..start], &text[end..]);
    std::fs::write(&cfg, text).unwrap();
    let _impostor = ServerProcess::start(&workspace_bin("missived"), &other, "alpha.test").await.unwrap();

    let out = run(&s.alice, &["send", "@bob:alpha.test", "secret"], None).await;
    assert!(!out.status.success(), "a changed key must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HAS CHANGED") && err.contains("known_servers.json"), "{err}");
    let out = run(&s.alice, &["login", "@alice:alpha.test", "--server", &addr.to_string(), "--password-stdin"], Some("alice-password\n")).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("HAS CHANGED"));
}

#[tokio::test]
async fn logout_revokes_the_token_and_forgets_the_session() {
    let s = setup().await;
    let session: Value = serde_json::from_slice(&std::fs::read(s.alice.join("session.json")).unwrap()).unwrap();
    let token = session["token"].as_str().unwrap().to_owned();
    assert_eq!(json_lines(&ok(&s.alice, &["--json", "logout"], None).await)[0]["type"], "ok");
    let out = run(&s.alice, &["send", "@bob:alpha.test", "x"], None).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("not logged in"));
    let mut c = missive_cli::Client::connect(
        s.srv.addr,
        &missive_spec::ServerName::parse("alpha.test").unwrap(),
        missive_federation::tls::Pin::FirstUse,
    )
    .await
    .unwrap();
    c.set_token(Some(token));
    let e = c.sync(0, None).await.unwrap_err();
    assert_eq!(e.code(), Some(missive_spec::ErrorCode::Unauthorized));
    // bob's device is untouched.
    ok(&s.bob, &["sync"], None).await;
}

fn outbox_files(profile: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(profile.join("outbox"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "json")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

async fn bob_sees(s: &Setup) -> Vec<String> {
    let out = json_lines(&ok(&s.bob, &["--json", "history", "@alice:alpha.test", "--limit", "200"], None).await);
    let mut t = texts(&out);
    t.reverse();
    t
}

#[tokio::test]
async fn outbox_queues_while_the_server_is_down_and_flushes_in_order_exactly_once() {
    let mut s = setup().await;
    s.srv.terminate().await.unwrap();
    for i in 1..=3 {
        let out = ok(&s.alice, &["--json", "send", "@bob:alpha.test", &format!("offline {i}")], None).await;
        assert_eq!(json_lines(&out)[0]["type"], "queued");
    }
    let human = ok(&s.alice, &["send", "@bob:alpha.test", "offline 4"], None).await;
    assert!(human.contains("queued"), "{human}");
    let waiting = json_lines(&ok(&s.alice, &["--json", "outbox"], None).await);
    assert_eq!(waiting.iter().map(|v| v["text"].as_str().unwrap()).collect::<Vec<_>>(), vec!["offline 1", "offline 2", "offline 3", "offline 4"]);

    s.srv.restart().await.unwrap();
    let out = run(&s.alice, &["sync"], None).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sent 4 message(s) from the outbox"));
    assert!(outbox_files(&s.alice).is_empty());
    assert_eq!(bob_sees(&s).await, vec!["offline 1", "offline 2", "offline 3", "offline 4"]);

    // The crash window: acknowledged, but the CLI died before deleting the file. The next
    // run sends it again with the same client_msg_id; the server answers with the original
    // message and stores nothing new.
    s.srv.terminate().await.unwrap();
    ok(&s.alice, &["send", "@bob:alpha.test", "offline 5"], None).await;
    let file = outbox_files(&s.alice).pop().unwrap();
    let saved = std::fs::read(&file).unwrap();
    s.srv.restart().await.unwrap();
    ok(&s.alice, &["sync"], None).await;
    std::fs::write(&file, saved).unwrap();
    ok(&s.alice, &["sync"], None).await;
    assert!(outbox_files(&s.alice).is_empty());
    assert_eq!(bob_sees(&s).await, vec!["offline 1", "offline 2", "offline 3", "offline 4", "offline 5"]);
}

#[tokio::test]
async fn killing_the_cli_mid_flush_and_rerunning_sends_no_duplicate() {
    let mut s = setup().await;
    s.srv.terminate().await.unwrap();
    let want: Vec<String> = (0..20).map(|i| format!("queued {i}")).collect();
    for t in &want {
        ok(&s.alice, &["send", "@bob:alpha.test", t], None).await;
    }
    s.srv.restart().await.unwrap();
    // Kill a flushing CLI at several moments; each rerun picks up where the last stopped.
    for delay_ms in [5u64, 20, 60] {
        let mut child = missive().arg("--profile").arg(&s.alice).arg("sync").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    ok(&s.alice, &["sync"], None).await;
    assert!(outbox_files(&s.alice).is_empty());
    assert_eq!(bob_sees(&s).await, want);
}

#[tokio::test]
async fn listen_reconnects_after_the_server_restarts() {
    let mut s = setup().await;
    let (mut listen, mut lines) = listen_json(&s.bob);
    ok(&s.alice, &["send", "@bob:alpha.test", "before the restart"], None).await;
    let mut skipped = Vec::new();
    assert_eq!(next_of(&mut lines, "message", &mut skipped).await["text"], "before the restart");
    s.srv.kill9().await;
    // While the server is down, bob writes from another terminal: it waits in his outbox.
    let out = ok(&s.bob, &["--json", "send", "@alice:alpha.test", "written while down"], None).await;
    assert_eq!(json_lines(&out)[0]["type"], "queued");
    s.srv.restart().await.unwrap();
    ok(&s.alice, &["send", "@bob:alpha.test", "after the restart"], None).await;
    assert_eq!(next_of(&mut lines, "message", &mut skipped).await["text"], "after the restart");
    // listen reconnected and sent bob's outbox on the way.
    assert!(outbox_files(&s.bob).is_empty());
    let seen = json_lines(&ok(&s.alice, &["--json", "history", "@bob:alpha.test"], None).await);
    assert!(texts(&seen).contains(&"written while down".to_owned()), "{seen:?}");
    listen.kill().await.unwrap();
}

#[tokio::test]
async fn devices_are_listed_and_another_can_be_revoked() {
    let s = setup().await;
    let laptop = s._tmp.path().join("bob-laptop");
    let addr = s.srv.addr.to_string();
    ok(&laptop, &["login", "@bob:alpha.test", "--server", &addr, "--password-stdin", "--device-name", "laptop"], Some("bob-password\n")).await;
    let devices = json_lines(&ok(&s.bob, &["--json", "devices"], None).await);
    assert_eq!(devices.len(), 2);
    assert_eq!(devices.iter().filter(|d| d["current"] == true).count(), 1);
    let other = devices.iter().find(|d| d["current"] == false).unwrap();
    assert_eq!(other["name"], "laptop");
    let current = devices.iter().find(|d| d["current"] == true).unwrap()["id"].as_str().unwrap().to_owned();
    let out = run(&s.bob, &["revoke", &current], None).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("logout"));
    ok(&s.bob, &["revoke", other["id"].as_str().unwrap()], None).await;
    let out = run(&laptop, &["sync"], None).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unauthorized"));
    assert_eq!(json_lines(&ok(&s.bob, &["--json", "devices"], None).await).len(), 1);
}

#[tokio::test]
async fn conversations_list_last_message_unread_and_presence() {
    let s = setup().await;
    let out = run(&s.bob, &["conversations"], None).await;
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no conversations"), "{out:?}");
    for i in 0..3 {
        ok(&s.alice, &["send", "@bob:alpha.test", &format!("c{i}")], None).await;
    }
    let list = json_lines(&ok(&s.bob, &["--json", "conversations"], None).await);
    assert_eq!(list.len(), 1, "{list:?}");
    let c = &list[0];
    assert_eq!((c["type"].as_str(), c["with"].as_str()), (Some("conversation"), Some("@alice:alpha.test")));
    assert_eq!(c["unread"], 3);
    assert_eq!(c["last"]["text"], "c2");
    // Presence is not shared until bob has written too.
    assert!(c["online"].is_null(), "{c}");
    ok(&s.bob, &["send", "@alice:alpha.test", "hi"], None).await;
    let c = &json_lines(&ok(&s.alice, &["--json", "conversations"], None).await)[0];
    assert_eq!((c["unread"].as_u64(), c["last"]["text"].as_str()), (Some(1), Some("hi")));
    assert_eq!(c["online"], false, "bob holds no subscription: {c}");
    let human = ok(&s.alice, &["conversations"], None).await;
    assert!(human.contains("@bob:alpha.test") && human.contains("1 unread") && human.contains(": hi"), "{human}");
}
