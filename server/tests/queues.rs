//! The operator's hold on what waits for other servers, against real `missived`
//! processes: `deadletters list|retry|drop` and `peer remove` (a mistyped server name's
//! queue, a pinned peer), with `--json` output parsed.

mod common;

use std::process::Output;

use common::*;
use missive_conformance::harness::ServerProcess;
use serde_json::Value;

async fn admin(srv: &ServerProcess, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(missived()).args(args).arg("--config").arg(&srv.config).kill_on_drop(true).output();
    tokio::time::timeout(DEADLINE, run).await.expect("missived hung").unwrap()
}

async fn json(srv: &ServerProcess, args: &[&str]) -> Vec<Value> {
    let out = admin(srv, args).await;
    assert!(out.status.success(), "missived {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"))).collect()
}

async fn letters(srv: &ServerProcess) -> Vec<Value> {
    let l = json(srv, &["deadletters", "list", "--json"]).await;
    assert!(l.iter().all(|d| d["type"] == "deadletter"), "{l:?}");
    l
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_retried_and_dropped() {
    let (_d, s) = federated(&["alpha.test", "beta.test"]).await;
    let alice = register(&s[0], "alice").await;
    alice.send_text(&uid("nobody", &s[1]), "lost").await.unwrap();
    let first = eventually("a dead letter", || async {
        let l = letters(&s[0]).await;
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(first.len(), 1);
    let d = &first[0];
    assert_eq!((d["peer"].as_str(), d["reason"].as_str(), d["kind"].as_str()), (Some("beta.test"), Some("unknown_recipient"), Some("message")));
    assert_eq!(d["to"], "@nobody:beta.test");
    let id = d["id"].as_str().unwrap().to_owned();
    // Retried, it is sent again and refused again: a new dead letter replaces it.
    let done = json(&s[0], &["deadletters", "retry", &id, "--json"]).await;
    assert_eq!(done[0]["count"], 1);
    let again = eventually("the retried unit refused again", || async {
        let l = letters(&s[0]).await;
        (l.len() == 1 && l[0]["id"] != id.as_str()).then_some(l)
    })
    .await;
    let out = admin(&s[0], &["deadletters", "drop", "beta.test/9/1"]).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not a dead letter id"), "{out:?}");
    let out = admin(&s[0], &["deadletters", "drop"]).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--all"), "{out:?}");
    assert_eq!(json(&s[0], &["deadletters", "drop", "--all", "--json"]).await[0]["count"], 1);
    assert!(letters(&s[0]).await.is_empty(), "{again:?} still listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_peer_drops_its_queue_and_its_pin() {
    let (_d, s) = federated(&["alpha.test", "beta.test"]).await;
    let alice = register(&s[0], "alice").await;
    // A mistyped server name: queued for good, never pinned.
    alice.send_text(&missive_spec::UserId::parse("@bob:betta.test").unwrap(), "typo").await.unwrap();
    assert_eq!(queue_depth(&s[0], "betta.test").await, 1);
    let out = admin(&s[0], &["peer", "remove", "betta.test"]).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--yes"), "{out:?}");
    let done = json(&s[0], &["peer", "remove", "betta.test", "--yes", "--json"]).await;
    assert_eq!((done[0]["dropped"].as_u64(), done[0]["unpinned"].as_bool()), (Some(1), Some(false)));
    let listed = s[0].peers_json().await.unwrap();
    assert!(!listed.iter().any(|l| l.contains("betta.test")), "{listed:?}");
    // A pinned peer: the entry leaves the config, which still loads.
    let done = json(&s[0], &["peer", "remove", "beta.test", "--yes", "--json"]).await;
    assert_eq!(done[0]["unpinned"], true);
    let text = std::fs::read_to_string(&s[0].config).unwrap();
    assert!(!text.contains("beta.test"), "{text}");
    missive_server::config::Config::load(&s[0].config).unwrap();
}
