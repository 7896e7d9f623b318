//! `missive search` against a real `missived`: what `send`, `sync` and `history` print is
//! kept in the profile's archive, once, in a file only its owner can read, and found
//! again offline; any text is a valid query; a broken archive never breaks `sync`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use missive_conformance::harness::{workspace_bin, ServerProcess};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

struct Users {
    _tmp: tempfile::TempDir,
    _srv: ServerProcess,
    alice: PathBuf,
    bob: PathBuf,
    carol: PathBuf,
}

async fn missive(profile: &Path, args: &[&str], password: Option<&str>) -> Output {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_missive"));
    c.env_remove("MISSIVE_PROFILE").arg("--profile").arg(profile).args(args).kill_on_drop(true);
    c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(p) = password {
        tokio::io::AsyncWriteExt::write_all(&mut stdin, format!("{p}\n").as_bytes()).await.unwrap();
    }
    drop(stdin);
    tokio::time::timeout(DEADLINE, child.wait_with_output()).await.expect("missive hung").unwrap()
}

/// Runs `missive --json ARGS`, which must succeed; its output lines as JSON.
async fn json(profile: &Path, args: &[&str]) -> Vec<Value> {
    let out = missive(profile, &[&["--json"], args].concat(), None).await;
    assert!(out.status.success(), "missive {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"))).collect()
}

/// The texts `missive search` found, newest first, after checking its summary line.
async fn found(profile: &Path, args: &[&str]) -> Vec<String> {
    let out = json(profile, &[&["search"], args].concat()).await;
    let (last, hits) = out.split_last().expect("search prints a summary line");
    assert_eq!(last["type"], "searched", "{out:?}");
    assert_eq!(last["count"].as_u64(), Some(hits.len() as u64));
    hits.iter()
        .map(|h| {
            assert_eq!(h["type"], "found", "{h}");
            h["text"].as_str().unwrap().to_owned()
        })
        .collect()
}

async fn users() -> Users {
    let tmp = tempfile::tempdir().unwrap();
    let srv = ServerProcess::create(&workspace_bin("missived"), &tmp.path().join("srv"), "alpha.test", "closed")
        .await
        .unwrap();
    let addr = srv.addr.to_string();
    let mut profiles = Vec::new();
    for name in ["alice", "bob", "carol"] {
        srv.add_user(name, &format!("{name}-password")).await.unwrap();
        let p = tmp.path().join(name);
        let user = format!("@{name}:alpha.test");
        let out =
            missive(&p, &["login", &user, "--server", &addr, "--password-stdin"], Some(&format!("{name}-password")))
                .await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        profiles.push(p);
    }
    let carol = profiles.pop().unwrap();
    let bob = profiles.pop().unwrap();
    let alice = profiles.pop().unwrap();
    Users { _tmp: tmp, _srv: srv, alice, bob, carol }
}

#[tokio::test]
async fn what_commands_showed_is_found_once_newest_first_and_by_conversation() {
    let u = users().await;
    for text in ["lunch tomorrow at noon?", "the quarterly report is ready", "Lunch moved to Friday"] {
        json(&u.alice, &["send", "@bob:alpha.test", text]).await;
    }
    json(&u.alice, &["send", "@carol:alpha.test", "lunch with carol instead"]).await;

    // Nothing seen yet, nothing found: search reads only what this profile kept.
    assert!(found(&u.bob, &["lunch"]).await.is_empty());
    let synced = json(&u.bob, &["sync"]).await;
    assert_eq!(synced.last().unwrap()["type"], "synced");
    assert_eq!(found(&u.bob, &["lunch"]).await, ["Lunch moved to Friday", "lunch tomorrow at noon?"]);
    assert_eq!(found(&u.bob, &["quart"]).await, ["the quarterly report is ready"], "the last word matches as a prefix");
    assert_eq!(found(&u.bob, &["lunch", "--limit", "1"]).await, ["Lunch moved to Friday"]);
    let out = json(&u.bob, &["search", "lunch", "--limit", "1"]).await;
    assert_eq!(out.last().unwrap()["more"], true);
    let hit = &out[0];
    assert_eq!((hit["from"].as_str(), hit["to"].as_str()), (Some("@alice:alpha.test"), Some("@bob:alpha.test")));
    assert_eq!(hit["content_type"], "text");

    // Seen again on a history page: still one hit each.
    let page = json(&u.bob, &["history", "@alice:alpha.test"]).await;
    assert_eq!(page.last().unwrap()["count"], 3);
    assert_eq!(found(&u.bob, &["lunch"]).await, ["Lunch moved to Friday", "lunch tomorrow at noon?"]);

    // alice's archive holds what she sent, in both conversations; --with keeps one.
    assert_eq!(
        found(&u.alice, &["lunch"]).await,
        ["lunch with carol instead", "Lunch moved to Friday", "lunch tomorrow at noon?"]
    );
    assert_eq!(
        found(&u.alice, &["lunch", "--with", "@bob:alpha.test"]).await,
        ["Lunch moved to Friday", "lunch tomorrow at noon?"]
    );
    assert_eq!(found(&u.alice, &["lunch", "--with", "@carol:alpha.test"]).await, ["lunch with carol instead"]);
    assert!(found(&u.carol, &["lunch"]).await.is_empty(), "carol has not synced");

    // The readable form: one line per hit, the match marked.
    let out = missive(&u.bob, &["search", "report"], None).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("@alice:alpha.test: the quarterly [report] is ready"), "{text}");
}

#[tokio::test]
async fn the_archive_is_owner_only_and_any_query_is_valid() {
    let u = users().await;
    json(&u.alice, &["send", "@bob:alpha.test", "meet \"AND\" (the team) at 10*"]).await;
    json(&u.bob, &["sync"]).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut checked = 0;
        for name in ["archive.sqlite3", "archive.sqlite3-wal", "archive.sqlite3-shm"] {
            for profile in [&u.alice, &u.bob] {
                if let Ok(md) = std::fs::metadata(profile.join(name)) {
                    assert_eq!(md.permissions().mode() & 0o777, 0o600, "{name} of {}", profile.display());
                    checked += 1;
                }
            }
        }
        assert!(checked >= 2, "both archives exist");
    }
    for q in
        ["\"", "AND (", "*", "meet\"", "(the", "NEAR(meet team)", "team OR", "'; DROP TABLE message; --", "^", "x:y"]
    {
        json(&u.bob, &["search", q]).await;
    }
    assert_eq!(found(&u.bob, &["\"AND\" (the"]).await, ["meet \"AND\" (the team) at 10*"]);
    assert_eq!(found(&u.bob, &["10*"]).await, ["meet \"AND\" (the team) at 10*"]);
    assert!(found(&u.bob, &["meet NOT team"]).await.is_empty(), "NOT is a word to find, not an operator");
}

#[tokio::test]
async fn a_broken_archive_is_named_and_never_fails_another_command() {
    let u = users().await;
    let archive = u.bob.join("archive.sqlite3");
    std::fs::write(&archive, b"this is not a database, just some bytes in the way").unwrap();
    json(&u.alice, &["send", "@bob:alpha.test", "still delivered"]).await;

    let out = missive(&u.bob, &["--json", "sync"], None).await;
    assert!(out.status.success(), "sync must not fail because of the archive");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("still delivered"), "{stdout}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.matches("archive.sqlite3").count(), 1, "said once, with the path: {stderr}");

    let out = missive(&u.bob, &["search", "delivered"], None).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&archive.display().to_string()) && stderr.contains("not a Missive message archive"),
        "{stderr}"
    );
}
