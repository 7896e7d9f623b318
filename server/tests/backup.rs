//! `missived backup` while serving and `missived restore`, with a peer that kept receiving
//! after the backup point (federation.md F12): nothing acknowledged before the backup is
//! lost, what the server sent after it comes back from the peer, and the peer never sees
//! a `seq` numbered twice.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use missive_conformance::harness::ServerProcess;
use missive_spec::{ErrorCode, Message};

async fn missived_ok(args: &[&str]) -> String {
    let out = tokio::process::Command::new(missived()).args(args).output().await.unwrap();
    assert!(out.status.success(), "missived {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn text_of(m: &Message) -> String {
    m.content.as_text().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_server_takes_back_what_it_sent_after_the_backup() {
    let (dir, mut servers) = federated(&["alpha.test", "beta.test"]).await;
    let (alice, bob) = (register(&servers[0], "alice").await, register(&servers[1], "bob").await);
    let (alice_id, bob_id) = (uid("alice", &servers[0]), uid("bob", &servers[1]));
    for i in 0..5 {
        bob.send_text(&alice_id, &format!("bob before {i}")).await.unwrap();
    }

    // Alice sends without pause while the backup is taken.
    let acked: Arc<Mutex<Vec<Message>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let alice = Arc::new(alice);
    let load = {
        let (alice, bob_id, acked, stop) = (alice.clone(), bob_id.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let m = alice.send_text(&bob_id, &format!("alice {i}")).await.unwrap();
                acked.lock().unwrap().push(m);
                i += 1;
            }
        })
    };
    eventually("alice's first messages", || async { (acked.lock().unwrap().len() >= 20).then_some(()) }).await;
    let before_backup: Vec<Message> = acked.lock().unwrap().clone();
    let backup = dir.path().join("backup");
    let out = missived_ok(&["backup", "--json", "--config", &servers[0].config.display().to_string(), &backup.display().to_string()]).await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((v["type"].as_str(), v["while_serving"].as_bool()), (Some("backup"), Some(true)), "{out}");
    let at_backup = acked.lock().unwrap().len();
    eventually("alice's messages after the backup", || async { (acked.lock().unwrap().len() >= at_backup + 20).then_some(()) }).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    load.await.unwrap();
    let all_sent: Vec<Message> = acked.lock().unwrap().clone();
    // Bob answers after the backup point too.
    for i in 0..3 {
        bob.send_text(&alice_id, &format!("bob after {i}")).await.unwrap();
    }
    let sent_texts: Vec<String> = all_sent.iter().map(text_of).collect();
    eventually("beta stored all of alice's messages", || async {
        let have = texts(&full_history(&bob, &alice_id, 200).await);
        sent_texts.iter().all(|t| have.contains(t)).then_some(())
    })
    .await;
    eventually("alpha stored bob's replies", || async {
        let have = texts(&full_history(&alice, &bob_id, 200).await);
        have.contains(&"bob after 2".to_owned()).then_some(())
    })
    .await;

    // The disk is lost; the backup comes back in a new data directory.
    servers[0].kill9().await;
    let restored_dir = dir.path().join("alpha-restored");
    let out = missived_ok(&["restore", "--json", &backup.display().to_string(), "--data-dir", &restored_dir.display().to_string()]).await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((v["type"].as_str(), v["server_name"].as_str()), (Some("restore"), Some("alpha.test")), "{out}");
    assert!(v["event_floor"].as_u64().unwrap() > 1 << 32, "{out}");
    // A second restore into the same directory is refused: it is not empty.
    let again = tokio::process::Command::new(missived())
        .args(["restore", &backup.display().to_string(), "--data-dir", &restored_dir.display().to_string()])
        .output()
        .await
        .unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not empty"));
    let alpha = ServerProcess::start(missived(), &restored_dir, "alpha.test").await.unwrap();
    let beta = &servers[1];
    let alice = login(&alpha, "alice").await;

    // Everything acknowledged before the backup is there; what alpha sent after it came
    // back from beta, and bob's replies it had lost were filled in.
    let want: Vec<String> = all_sent.iter().map(text_of).chain((0..3).map(|i| format!("bob after {i}"))).collect();
    let history = eventually("alpha's history complete again", || async {
        let h = full_history(&alice, &bob_id, 200).await;
        let have = texts(&h);
        want.iter().all(|t| have.contains(t)).then_some(h)
    })
    .await;
    assert!(before_backup.iter().all(|m| history.contains(m)), "a message acknowledged before the backup is missing");
    assert!(all_sent.iter().all(|m| history.contains(m)), "a reclaimed message differs from what was sent");
    assert_eq!(history.len(), all_sent.len() + 8, "a message is there twice");

    // New messages are numbered after what beta had: no equivocation, in order at beta.
    let next = eventually("alpha numbering again for beta's users", || async {
        match alice.send_text(&bob_id, "after the restore").await {
            Ok(m) => Some(m),
            Err(missive_cli::ClientError::Server { code: ErrorCode::RemoteUnavailable, .. }) => None,
            Err(e) => panic!("send failed: {e}"),
        }
    })
    .await;
    let last_before = all_sent.iter().map(|m| m.seq).max().unwrap();
    assert_eq!(next.seq, last_before + 1, "numbered {} after {last_before}", next.seq);
    eventually("beta delivered the new message", || async {
        let h = full_history(&bob, &alice_id, 5).await;
        (h.first().map(text_of).as_deref() == Some("after the restore")).then_some(())
    })
    .await;
    assert!(!beta.log().contains("equivocation"), "beta saw equivocation:\n{}", beta.log());
    assert!(alpha.log().contains("numbering again"), "{}", alpha.log());

    // A device that had read past the backup point still gets what is new.
    let (mut sub, _, backlog) = alice.subscribe(u64::from(u32::MAX)).await.unwrap();
    assert!(!backlog.is_empty(), "the events since the restore lie above the saved position");
    bob.send_text(&alice_id, "to the restored server").await.unwrap();
    let said = |evs: &[missive_spec::wire::Event]| {
        evs.iter().any(|e| matches!(&e.event, missive_spec::wire::EventKind::Message(m) if text_of(m) == "to the restored server"))
    };
    let mut got = backlog;
    while !said(&got) {
        let n = got.len() + 1;
        got = collect(&mut sub, got, n).await;
    }
    assert!(Path::new(&restored_dir.join("server.key")).exists());
}
