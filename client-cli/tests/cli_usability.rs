//! What a person meets around the messages themselves, against a real `missived`: the
//! hidden password prompt in a real terminal (tmux), the outbox with refused entries,
//! errors that say what is wrong, private profile files, completions and the man page.

use std::path::{Path, PathBuf};

use missive_conformance::harness::{workspace_bin, ServerProcess};

mod common;

use common::tmux::Tmux;
use common::*;

/// A server `alpha.test` with users alice and bob, alice logged in.
struct Setup {
    tmp: tempfile::TempDir,
    srv: ServerProcess,
    alice: PathBuf,
}

async fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let srv = ServerProcess::create(&workspace_bin("missived"), &tmp.path().join("srv"), "alpha.test", "closed").await.unwrap();
    srv.add_user("alice", "alice-password").await.unwrap();
    srv.add_user("bob", "bob-password").await.unwrap();
    let alice = tmp.path().join("alice");
    let addr = srv.addr.to_string();
    ok(&alice, &["login", "@alice:alpha.test", "--server", &addr, "--password-stdin"], Some("alice-password\n")).await;
    Setup { tmp, srv, alice }
}

#[tokio::test]
async fn the_outbox_shows_refused_messages_with_the_reason_and_retries_or_drops_them() {
    let mut s = setup().await;
    // bob's device publishes its keys, so messages to him can be encrypted (e2ee.md).
    let bob = s.tmp.path().join("bob");
    let addr = s.srv.addr.to_string();
    ok(&bob, &["login", "@bob:alpha.test", "--server", &addr, "--password-stdin"], Some("bob-password\n")).await;
    s.srv.terminate().await.unwrap();
    for (to, text) in [("@carol:alpha.test", "to carol"), ("@dave:alpha.test", "to dave"), ("@bob:alpha.test", "to bob")] {
        ok(&s.alice, &["send", to, text], None).await;
    }
    // Too large: refused at once, even while the server is away, and never queued.
    let big = "x".repeat(16_385);
    let err = fails(&s.alice, &["send", "@bob:alpha.test", &big], None).await;
    assert!(err.contains("16385 bytes") && err.contains("at most 16384"), "{err}");
    let listed = json_lines(&ok(&s.alice, &["--json", "outbox"], None).await);
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.iter().all(|v| v["type"] == "queued" && v["state"] == "waiting" && v["reason"].is_null()), "{listed:?}");

    // carol and dave do not exist: the server refuses those two for good, bob's goes.
    s.srv.restart().await.unwrap();
    let out = run(&s.alice, &["sync"], None).await;
    assert!(out.status.success());
    let listed = json_lines(&ok(&s.alice, &["--json", "outbox"], None).await);
    let failed: Vec<_> = listed.iter().map(|v| (v["text"].as_str().unwrap(), v["state"].as_str().unwrap())).collect();
    assert_eq!(failed, vec![("to carol", "failed"), ("to dave", "failed")]);
    let reason = listed[0]["reason"].as_str().unwrap();
    assert!(reason.contains("unknown_user") && reason.contains("@carol:alpha.test"), "{reason}");
    let human = ok(&s.alice, &["outbox"], None).await;
    assert!(human.contains("failed") && human.contains("refused by the server: unknown_user"), "{human}");
    let (carol_id, dave_id) = (listed[0]["id"].as_str().unwrap().to_owned(), listed[1]["id"].as_str().unwrap().to_owned());
    assert!(human.contains(&carol_id) && carol_id.len() >= 8, "ids are shown: {human}");

    // carol gets an account and a device; the retried message goes with the next connection.
    s.srv.add_user("carol", "carol-password").await.unwrap();
    let carol = s.tmp.path().join("carol");
    let addr = s.srv.addr.to_string();
    ok(&carol, &["login", "@carol:alpha.test", "--server", &addr, "--password-stdin"], Some("carol-password\n")).await;
    let retried = json_lines(&ok(&s.alice, &["--json", "outbox", "retry", &carol_id], None).await);
    assert_eq!((retried[0]["type"].as_str(), retried[0]["state"].as_str()), (Some("queued"), Some("waiting")));
    let out = run(&s.alice, &["sync"], None).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("sent 1 message(s) from the outbox"));
    let synced = json_lines(&ok(&carol, &["--json", "sync"], None).await);
    assert!(synced.iter().any(|v| v["type"] == "message" && v["text"] == "to carol"), "{synced:?}");

    // dave's is dropped; an unknown id says so.
    let dropped = json_lines(&ok(&s.alice, &["--json", "outbox", "drop", &dave_id], None).await);
    assert_eq!(dropped[0]["type"], "ok");
    assert!(ok(&s.alice, &["--json", "outbox"], None).await.is_empty());
    let err = fails(&s.alice, &["outbox", "drop", &dave_id], None).await;
    assert!(err.contains("no outbox entry"), "{err}");
}

#[tokio::test]
async fn errors_say_what_is_wrong() {
    let s = setup().await;
    let addr = s.srv.addr.to_string();
    let other = s.tmp.path().join("other");

    // Another server's name: said before any password is read (standard input is empty).
    let err = fails(&other, &["login", "@alice:beta.test", "--server", &addr, "--password-stdin"], None).await;
    assert!(err.contains("alpha.test") && err.contains("beta.test") && err.contains("server names differ"), "{err}");

    // The federation port instead of the client port.
    let fed = s.srv.federation.to_string();
    let err = fails(&other, &["login", "@alice:alpha.test", "--server", &fed, "--password-stdin"], Some("alice-password\n")).await;
    assert!(err.contains("federation port"), "{err}");

    // Capitals in a user id.
    let err = fails(&s.alice, &["send", "@Bob:alpha.test", "hi"], None).await;
    assert!(err.contains("lower-case") && err.contains("@bob:alpha.test"), "{err}");

    // No terminal and no --password-stdin: says how to pass the password.
    let err = fails(&other, &["login", "@alice:alpha.test", "--server", &addr], Some("alice-password\n")).await;
    assert!(err.contains("--password-stdin") && err.contains("not a terminal"), "{err}");

    // I/O errors name the path, and say the cause once.
    let file = s.tmp.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let err = fails(&file.join("profile"), &["outbox"], None).await;
    assert!(err.contains(&file.join("profile").display().to_string()), "{err}");
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    std::fs::write(s.alice.join("outbox"), b"not a folder").unwrap();
    let err = fails(&s.alice, &["outbox"], None).await;
    assert!(err.contains(&s.alice.join("outbox").display().to_string()), "{err}");
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}

#[cfg(unix)]
#[tokio::test]
async fn profile_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let mut s = setup().await;
    let lax = s.tmp.path().join("lax");
    // A umask of 000 would leave everything world-readable if the modes were not set
    // explicitly.
    let sh = |line: String| {
        let p = lax.display();
        let line = format!("umask 000; MISSIVE_CONNECT_TIMEOUT_MS=300 {}", line.replace("PROFILE", &format!("'{p}'")));
        std::process::Command::new("sh").arg("-c").arg(line).status().unwrap().success()
    };
    let addr = s.srv.addr;
    assert!(sh(format!("printf 'bob-password\\n' | {BIN} --profile PROFILE login @bob:alpha.test --server {addr} --password-stdin")));
    s.srv.terminate().await.unwrap();
    assert!(sh(format!("{BIN} --profile PROFILE send @alice:alpha.test queued-while-away")));

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&lax), 0o700, "profile directory");
    assert_eq!(mode(&lax.join("outbox")), 0o700, "outbox directory");
    let mut files = vec![lax.join("session.json"), lax.join("known_servers.json")];
    files.extend(std::fs::read_dir(lax.join("outbox")).unwrap().map(|e| e.unwrap().path()));
    assert_eq!(files.len(), 3, "{files:?}");
    for f in files {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

#[tokio::test]
async fn login_asks_for_the_password_without_showing_it() {
    let s = setup().await;
    let bob = s.tmp.path().join("bob");
    let tmux = Tmux::new().expect("tmux is installed (scripts/deps)");
    let line = format!("{BIN} --profile {} login @bob:alpha.test --server {}; echo exit=$?; sleep 60", bob.display(), s.srv.addr);
    tmux.start("t", 200, 20, &line).await;
    tmux.shows("t", "Password for @bob:alpha.test:").await;
    tmux.typed("t", "bob-password").await;
    tmux.key("t", "Enter").await;
    let screen = tmux.shows("t", "exit=").await;
    assert!(screen.contains("logged in as @bob:alpha.test"), "{screen}");
    assert!(screen.contains("exit=0"), "{screen}");
    assert!(!screen.contains("bob-password"), "the password was echoed:\n{screen}");
    // The session works.
    let devices = json_lines(&ok(&bob, &["--json", "devices"], None).await);
    assert_eq!(devices[0]["type"], "device");
}

#[tokio::test]
async fn passwd_changes_the_password_at_a_hidden_prompt_and_can_log_out_the_other_devices() {
    let s = setup().await;
    let addr = s.srv.addr.to_string();
    let phone = s.tmp.path().join("phone");
    ok(&phone, &["login", "@alice:alpha.test", "--server", &addr, "--password-stdin"], Some("alice-password\n")).await;
    // At the terminal: the current password, then the new one twice, none of them shown.
    let tmux = Tmux::new().expect("tmux is installed (scripts/deps)");
    let line = format!("{BIN} --profile {} passwd; echo exit=$?; sleep 60", s.alice.display());
    tmux.start("t", 200, 20, &line).await;
    for (prompt, typed) in [("Current password for @alice:alpha.test:", "alice-password"), ("New password:", "a better secret"), ("Again:", "a better secret")] {
        tmux.shows("t", prompt).await;
        tmux.typed("t", typed).await;
        tmux.key("t", "Enter").await;
    }
    let screen = tmux.shows("t", "exit=").await;
    assert!(screen.contains("password changed") && screen.contains("exit=0"), "{screen}");
    assert!(!screen.contains("alice-password") && !screen.contains("better secret"), "a password was echoed:\n{screen}");
    // The other device stayed logged in; the old password no longer logs in, the new one does.
    ok(&phone, &["devices"], None).await;
    let laptop = s.tmp.path().join("laptop");
    let err = fails(&laptop, &["login", "@alice:alpha.test", "--server", &addr, "--password-stdin"], Some("alice-password\n")).await;
    assert!(err.contains("bad_credentials") || err.contains("wrong user or password"), "{err}");
    ok(&laptop, &["login", "@alice:alpha.test", "--server", &addr, "--password-stdin"], Some("a better secret\n")).await;
    // From a script, with every other device logged out.
    let out = ok(&s.alice, &["--json", "passwd", "--password-stdin", "--logout-others"], Some("a better secret\nthe best secret\n")).await;
    assert_eq!(json_lines(&out)[0]["type"], "ok");
    for other in [&phone, &laptop] {
        let err = fails(other, &["devices"], None).await;
        assert!(err.contains("unauthorized") || err.contains("log in"), "{err}");
    }
    ok(&s.alice, &["devices"], None).await;
    // A wrong current password changes nothing and says so.
    let err = fails(&s.alice, &["passwd", "--password-stdin"], Some("not it at all\nwhatever else\n")).await;
    assert!(err.contains("wrong password"), "{err}");
}

#[tokio::test]
async fn completions_and_the_man_page_come_from_the_command_definition() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("unused");
    let help = ok(&p, &["--help"], None).await;
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.contains(&"outbox") && commands.contains(&"completions") && commands.len() > 10, "{commands:?}");

    let bash = ok(&p, &["completions", "bash"], None).await;
    assert!(bash.contains("complete -F _missive") && bash.contains("retry"), "{bash}");
    let zsh = ok(&p, &["completions", "zsh"], None).await;
    assert!(zsh.starts_with("#compdef missive"), "{zsh}");
    let fish = ok(&p, &["completions", "fish"], None).await;
    assert!(fish.contains("complete -c missive"), "{fish}");

    let man = ok(&p, &["man"], None).await;
    assert!(man.lines().any(|l| l.starts_with(".TH missive 1")), "{man}");
    assert!(man.contains(".SH NAME") && man.contains(".SH SYNOPSIS") && man.contains(".SH SUBCOMMANDS"), "{man}");
    for c in &commands {
        assert!(man.contains(&format!("missive\\-{c}")), "{c} missing from the man page:\n{man}");
    }
    // Generating touches no profile.
    assert!(!p.exists());
}

/// `missive completions bash | head -1`: the reader goes first, and the client ends as
/// Unix tools do, by SIGPIPE, without a panic message.
#[test]
fn a_closed_output_pipe_ends_the_client_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(BIN).args(["completions", "bash"]).stdout(writer).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {stderr}", out.status);
}

/// `missive block`, `blocked` and `unblock` against a real server: what bob sends while
/// blocked never shows in alice's history, and bob's send succeeds all the same.
#[tokio::test]
async fn block_keeps_a_user_out_and_unblock_lets_them_back() {
    let s = setup().await;
    let bob = s.tmp.path().join("bob");
    let addr = s.srv.addr.to_string();
    ok(&bob, &["login", "@bob:alpha.test", "--server", &addr, "--password-stdin"], Some("bob-password\n")).await;
    ok(&bob, &["send", "@alice:alpha.test", "before"], None).await;
    let out = ok(&s.alice, &["--json", "block", "@bob:alpha.test"], None).await;
    assert_eq!(json_lines(&out)[0]["type"], "ok");
    let listed = json_lines(&ok(&s.alice, &["--json", "blocked"], None).await);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0]["type"].as_str(), listed[0]["user"].as_str()), (Some("blocked"), Some("@bob:alpha.test")));
    ok(&bob, &["send", "@alice:alpha.test", "while blocked"], None).await;
    let err = fails(&s.alice, &["block", "@alice:alpha.test"], None).await;
    assert!(err.contains("oneself"), "{err}");
    ok(&s.alice, &["unblock", "@bob:alpha.test"], None).await;
    assert!(ok(&s.alice, &["blocked"], None).await.contains("nobody"));
    ok(&bob, &["send", "@alice:alpha.test", "after"], None).await;
    let shown: Vec<String> = json_lines(&ok(&s.alice, &["--json", "history", "@bob:alpha.test"], None).await)
        .iter()
        .filter_map(|v| v["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(shown, ["after", "before"], "alice's history with bob, newest first");
}

/// The operator of alpha rotates its key. Alice's client and the peer beta, which both
/// pinned the old key, follow the hand-over without a warning; a message signed with the
/// old key and still queued for beta is delivered and verifies there; messages flow both
/// ways after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_key_is_followed_by_clients_and_peers_without_warning() {
    let (tmp, mut servers) = two_servers().await;
    let bin = workspace_bin("missived");
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    let (alpha_addr, beta_addr) = (servers[0].addr.to_string(), servers[1].addr.to_string());
    ok(&alice, &["login", "@alice:alpha.test", "--server", &alpha_addr, "--password-stdin"], Some("alice-password\n")).await;
    ok(&bob, &["login", "@bob:beta.test", "--server", &beta_addr, "--password-stdin"], Some("bob-password\n")).await;
    let texts = |out: &str| -> Vec<String> { json_lines(out).iter().filter_map(|v| v["text"].as_str().map(str::to_owned)).collect() };
    let bob_history = || async { texts(&ok(&bob, &["--json", "history", "@alice:alpha.test"], None).await) };
    ok(&alice, &["send", "@bob:beta.test", "before"], None).await;
    wait_for("beta has the first message", || async { bob_history().await.contains(&"before".to_owned()) }).await;

    // Queued under the old key while beta is away.
    servers[1].terminate().await.unwrap();
    ok(&alice, &["send", "@bob:beta.test", "queued under the old key"], None).await;
    let old_key = servers[0].key.clone();
    servers[0].terminate().await.unwrap();
    let config = servers[0].config.display().to_string();
    let rotated = std::process::Command::new(&bin).args(["key", "rotate", "--json", "--config", &config]).output().unwrap();
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    let r = &json_lines(&String::from_utf8_lossy(&rotated.stdout))[0];
    assert_eq!((r["type"].as_str(), r["old"].as_str()), (Some("key_rotated"), Some(old_key.as_str())));
    servers[0].restart().await.unwrap();
    assert_eq!(Some(servers[0].key.as_str()), r["new"].as_str(), "alpha did not start with the new key");
    let doc = std::process::Command::new(&bin).args(["well-known", "--config", &config]).output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&doc.stdout).unwrap();
    assert!(doc["keys"].as_array().unwrap().iter().any(|k| k["key"] == old_key.as_str() && k["valid_until_ms"].is_u64()), "{doc}");
    servers[1].restart().await.unwrap();

    // Alice's client follows without the changed-key warning.
    let out = run(&alice, &["send", "@bob:beta.test", "after the rotation"], None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("WARNING") && stderr.contains("rotated its key"), "{stderr}");
    let out = run(&alice, &["sync"], None).await;
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("rotated"), "the new key is pinned once");

    // Beta follows too: the old-key message verifies, the new ones arrive, in order.
    wait_for("beta has every message", || async { bob_history().await.len() == 3 }).await;
    assert_eq!(bob_history().await, ["after the rotation", "queued under the old key", "before"]);
    ok(&bob, &["send", "@alice:alpha.test", "reply"], None).await;
    wait_for("alpha has bob's reply", || async {
        texts(&ok(&alice, &["--json", "history", "@bob:beta.test"], None).await).contains(&"reply".to_owned())
    })
    .await;
    let beta_log = servers[1].log();
    assert!(beta_log.contains("following it"), "{beta_log}");
    for bad in ["WARN", "unknown_key", "bad_signature"] {
        assert!(!beta_log.lines().any(|l| l.contains(bad) && !l.contains("link down") && !l.contains("connection lost")), "beta logged {bad}:\n{beta_log}");
    }
}

/// Polls `check` every 100 ms until it holds, failing after 30 s.
async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
