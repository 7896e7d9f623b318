//! `missive chat` for real: the full-screen chat driven in a real terminal (tmux) between
//! users of two federated `missived` processes, and line mode's promise that no message
//! or receipt shows twice across `chat`, `sync` and `chat` again.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use missive_conformance::harness::{workspace_bin, ServerProcess};
use serde_json::Value;

mod common;

use common::tmux::Tmux;
use common::*;

/// Polls `check` every 100 ms until it gives a value, failing after [`DEADLINE`].
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two users logged in on one server, or on two federated ones.
struct Users {
    _tmp: tempfile::TempDir,
    servers: Vec<ServerProcess>,
    alice: PathBuf,
    bob: PathBuf,
}

async fn login(profile: &Path, user: &str, srv: &ServerProcess) {
    let addr = srv.addr.to_string();
    ok(profile, &["login", user, "--server", &addr, "--password-stdin"], Some("password-1234\n")).await;
}

/// alice on `names[0]`, bob on the last of `names`, the servers pinned to each other.
async fn users(names: &[&str]) -> Users {
    let tmp = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let dir = tmp.path().join(name);
        let ip = std::net::IpAddr::from([127, 0, 0, 2 + i as u8]);
        ServerProcess::init_on(&workspace_bin("missived"), &dir, name, "closed", ip).await.unwrap();
        servers.push(ServerProcess::start(&workspace_bin("missived"), &dir, name).await.unwrap());
    }
    for a in &servers {
        for b in &servers {
            if a.name != b.name {
                a.pin_peer(b).await.unwrap();
            }
        }
    }
    let (first, last) = (&servers[0], &servers[servers.len() - 1]);
    first.add_user("alice", "password-1234").await.unwrap();
    last.add_user("bob", "password-1234").await.unwrap();
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    login(&alice, &format!("@alice:{}", first.name), first).await;
    login(&bob, &format!("@bob:{}", last.name), last).await;
    Users { _tmp: tmp, servers, alice, bob }
}

/// What identifies a shown message (`message` or `sent`) or receipt, to find repeats.
fn identity(v: &Value) -> Option<String> {
    match v["type"].as_str()? {
        "message" | "sent" => Some(format!("message {} {} {}", v["conv"], v["origin"], v["seq"])),
        "receipt" => Some(format!("receipt {} {} {} {}", v["conv"], v["user"], v["kind"], v["up_to"])),
        _ => None,
    }
}

#[tokio::test]
async fn nothing_shows_twice_across_chat_sync_and_chat() {
    let u = users(&["alpha.test"]).await;
    let (alice_id, bob_id) = ("@alice:alpha.test", "@bob:alpha.test");
    for text in ["one", "two"] {
        ok(&u.alice, &["send", bob_id, text], None).await;
    }
    // bob chats: reads what came, answers, leaves with /quit (never sent).
    let chat1 = json_lines(&ok(&u.bob, &["--json", "chat", alice_id], Some("answer\n/quit\nnot sent\n")).await);
    let texts = |v: &[Value]| -> Vec<String> {
        v.iter()
            .filter(|o| o["type"] == "message" || o["type"] == "sent")
            .map(|o| o["text"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(texts(&chat1), vec!["one", "two", "answer"], "{chat1:?}");
    // alice reads bob's answer, and writes again.
    let alice_sees = eventually("bob's answer at alice's", || async {
        let h = json_lines(&ok(&u.alice, &["--json", "history", bob_id], None).await);
        texts(&h).contains(&"answer".to_owned()).then_some(h)
    })
    .await;
    assert!(!texts(&alice_sees).contains(&"/quit".to_owned()) && !texts(&alice_sees).contains(&"not sent".to_owned()));
    ok(&u.alice, &["read", bob_id], None).await;
    ok(&u.alice, &["send", bob_id, "three"], None).await;
    let sync = json_lines(&ok(&u.bob, &["--json", "sync"], None).await);
    assert_eq!(texts(&sync), vec!["three"], "sync shows only what chat did not: {sync:?}");
    assert!(
        sync.iter().any(|o| o["type"] == "receipt" && o["user"] == alice_id && o["kind"] == "read"),
        "alice's read receipt is new to bob: {sync:?}"
    );
    ok(&u.alice, &["send", bob_id, "four"], None).await;
    let chat2 = json_lines(&ok(&u.bob, &["--json", "chat", alice_id], None).await);
    assert_eq!(texts(&chat2), vec!["four"], "{chat2:?}");

    let mut shown = HashSet::new();
    for v in chat1.iter().chain(&sync).chain(&chat2) {
        if let Some(id) = identity(v) {
            assert!(shown.insert(id.clone()), "shown twice: {id}\nchat: {chat1:?}\nsync: {sync:?}\nchat: {chat2:?}");
        }
    }
    // What chat showed, received or sent, is kept for search.
    for text in ["four", "answer"] {
        let found = json_lines(&ok(&u.bob, &["--json", "search", text], None).await);
        let hits: Vec<&Value> = found.iter().filter(|v| v["type"] == "found").collect();
        assert_eq!(hits.len(), 1, "{text}: {found:?}");
        assert_eq!(hits[0]["text"], text);
    }
}

#[tokio::test]
async fn line_mode_refuses_an_over_long_line_and_goes_on() {
    let u = users(&["alpha.test"]).await;
    let long = "x".repeat(missive_spec::limits::MAX_CONTENT_BODY + 1);
    let out = run(&u.bob, &["--json", "chat", "@alice:alpha.test"], Some(&format!("{long}\nstill here\n"))).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not sent: the line is 16385 bytes, over the limit of 16384 bytes"), "{stderr}");
    let sent: Vec<Value> =
        json_lines(&String::from_utf8_lossy(&out.stdout)).into_iter().filter(|v| v["type"] == "sent").collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["text"], "still here");
}

/// A 120x40 terminal named `name` running `missive chat ARGS` for `profile`; when chat
/// ends, the terminal says with which exit status and stays.
async fn chat(tmux: &Tmux, name: &str, profile: &Path, args: &str) {
    let command = format!(
        "MISSIVE_CONNECT_TIMEOUT_MS=500 '{}' --profile '{}' chat {args}; echo \"chat exited with $?\"; exec sleep 600",
        BIN,
        profile.display()
    );
    tmux.start(name, 120, 40, &command).await;
}

/// The row of the input box: the one above the status line, inside the box.
fn input_row(screen: &str) -> String {
    let rows: Vec<&str> = screen.lines().collect();
    rows.iter()
        .rev()
        .find(|r| r.starts_with('│'))
        .map(|r| r.trim_matches(|c| c == '│' || c == ' ').to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_screen_chat_in_tmux_between_two_servers() {
    let Some(tmux) = Tmux::new() else {
        eprintln!("SKIPPED: tmux is not installed (scripts/deps installs it)");
        return;
    };
    let mut u = users(&["alpha.test", "beta.test"]).await;
    let (alice_id, bob_id) = ("@alice:alpha.test", "@bob:beta.test");
    // Presence and typing cross once both have written (spec §12).
    ok(&u.alice, &["send", bob_id, "hello bob"], None).await;
    ok(&u.bob, &["send", alice_id, "hello alice"], None).await;
    eventually("bob's first message at alice's server", || async {
        let h = ok(&u.alice, &["--json", "history", bob_id], None).await;
        h.contains("hello alice").then_some(())
    })
    .await;

    // alice writes while no device of bob's is online: her message stays `sent`.
    chat(&tmux, "alice", &u.alice, bob_id).await;
    tmux.shows("alice", "@bob:beta.test: hello alice").await;
    tmux.typed("alice", "first ping").await;
    tmux.key("alice", "Enter").await;
    tmux.shows("alice", "you: first ping  [sent]").await;

    // bob starts without naming anyone: his device gets it (delivered), and opening the
    // conversation from the list reads it.
    chat(&tmux, "bob", &u.bob, "").await;
    let s = tmux.shows("bob", "@alice:alpha.test (").await;
    assert!(s.contains("Conversations"), "{s}");
    tmux.shows("alice", "you: first ping  [delivered]").await;
    tmux.key("bob", "Tab").await;
    tmux.shows("bob", "@alice:alpha.test: first ping").await;
    tmux.shows("alice", "you: first ping  [read]").await;

    // bob types half a line; alice types (bob sees it, until it expires), then sends.
    tmux.typed("bob", "half a li").await;
    tmux.until("bob", "the half line", |s| input_row(s) == "half a li").await;
    tmux.typed("alice", "are you there?").await;
    tmux.shows("bob", "@alice:alpha.test is typing…").await;
    tmux.until("bob", "the typing notice to expire", |s| !s.contains("is typing…")).await;
    tmux.key("alice", "Enter").await;
    let s = tmux.shows("bob", "@alice:alpha.test: are you there?").await;
    assert_eq!(input_row(&s), "half a li", "the half-typed line is intact:\n{s}");
    tmux.typed("bob", "ne").await;
    tmux.key("bob", "Enter").await;
    tmux.shows("alice", "@bob:beta.test: half a line").await;
    let s = tmux.shows("bob", "you: half a line  [").await;
    assert_eq!(input_row(&s), "", "sent whole, input emptied:\n{s}");

    // bob's server goes away and comes back: the session goes on.
    let beta = u.servers.len() - 1;
    u.servers[beta].kill9().await;
    tmux.shows("bob", "offline (").await;
    u.servers[beta].restart().await.unwrap();
    tmux.until("bob", "reconnection", |s| !s.contains("offline (")).await;
    tmux.typed("bob", "back again").await;
    tmux.key("bob", "Enter").await;
    tmux.shows("alice", "@bob:beta.test: back again").await;

    // /quit leaves cleanly: exit status 0, the terminal back from the alternate screen.
    for name in ["bob", "alice"] {
        tmux.typed(name, "/quit").await;
        tmux.key(name, "Enter").await;
        tmux.shows(name, "chat exited with 0").await;
        let alternate = tmux.tmux(&["display-message", "-p", "-t", name, "#{alternate_on}"]).await;
        assert_eq!(alternate.trim(), "0", "{name}'s terminal left the alternate screen");
    }
    // The screen keeps what it showed for search: what arrived live, what was sent
    // (asked before `history`, which keeps what it shows too).
    for text in ["back again", "first ping"] {
        let found = ok(&u.alice, &["--json", "search", text], None).await;
        assert!(json_lines(&found).iter().any(|v| v["type"] == "found" && v["text"] == text), "{text}: {found}");
    }
    let h = ok(&u.alice, &["--json", "history", bob_id], None).await;
    assert!(!h.contains("/quit"), "/quit is never sent: {h}");
}

/// A message the other server refuses shows `failed` in `history`, with the reason, for as
/// long as it is there (spec §6.6), not only in the event that announced it.
#[tokio::test]
async fn history_shows_a_refused_message_as_failed() {
    let u = users(&["alpha.test", "beta.test"]).await;
    let nobody = "@nobody:beta.test";
    // A user who never published keys gets plaintext only when asked for (e2ee.md E6.4).
    let refused = fails(&u.alice, &["send", nobody, "is anyone there?"], None).await;
    assert!(refused.contains("--plaintext"), "{refused}");
    ok(&u.alice, &["send", "--plaintext", nobody, "is anyone there?"], None).await;
    let line = eventually("the refusal in history", || async {
        let h = json_lines(&ok(&u.alice, &["--json", "history", nobody], None).await);
        h.into_iter().find(|v| v["type"] == "message" && v["state"] == "failed")
    })
    .await;
    assert_eq!(line["text"], "is anyone there?");
    let text = ok(&u.alice, &["history", nobody], None).await;
    assert!(text.contains("is anyone there? [failed: unknown_recipient]"), "{text}");
}
