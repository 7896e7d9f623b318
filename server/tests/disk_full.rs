//! A full disk: `missived` keeps its data on a small tmpfs that the test fills. Writes fail
//! cleanly with `internal` and nothing half-done; the outbound sender, unable to record a
//! peer's acknowledgement, backs off instead of resending in a loop; once space returns,
//! the server writes again without a restart; a start on a full disk says so.
//!
//! Mounting a tmpfs needs root, which CI and the development machines have.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use missive_conformance::harness::ServerProcess;
use missive_conformance::mock_peer::{Fate, MockPeer};
use missive_spec::{Content, ErrorCode, UserId};

/// A tmpfs mounted for the test's lifetime.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u32) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(dir).status();
        assert!(ok.is_ok_and(|s| s.success()), "cannot mount a tmpfs at {} (the disk-full test needs root)", dir.display());
        Tmpfs(dir.to_owned())
    }

    /// Writes zeros into `file` until the file system refuses more.
    fn fill(&self, file: &Path) {
        let mut f = std::fs::File::create(file).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, missive_cli::ClientError>) -> Option<ErrorCode> {
    r.unwrap_err().code()
}

#[tokio::test]
async fn a_full_disk_fails_writes_cleanly_stops_no_peer_and_passes_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("disk"), 48);
    let data = fs.0.join("alpha");
    ServerProcess::init(missived(), &data, "alpha.test", "open").await.unwrap();
    let cfg = data.join("missived.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("retry_cap_ms = 60000", "retry_cap_ms = 1000");
    std::fs::write(&cfg, text).unwrap();
    let mut alpha = ServerProcess::start(missived(), &data, "alpha.test").await.unwrap();
    let mock = MockPeer::start("beta.test", [127, 0, 0, 8].into()).unwrap();
    alpha.pin_peer_raw("beta.test", &mock.addr.to_string(), &mock.public().to_text()).await.unwrap();
    let alice = register(&alpha, "alice").await;
    let bob = UserId::parse("@bob:beta.test").unwrap();

    let before = alice.send_text(&bob, "before the disk fills").await.unwrap();
    eventually("the first message at the peer", || async { (mock.received_texts().len() == 1).then_some(()) }).await;
    // The peer stops answering: the next message stays in alpha's queue.
    mock.misbehave.lock().unwrap().drop_next = usize::MAX;
    let queued = alice.send_text(&bob, "queued while the peer drops everything").await.unwrap();
    let dropped = || mock.observed.lock().unwrap().attempts.iter().filter(|a| a.fate == Fate::Dropped).count();
    eventually("alpha to try the peer", || async { (dropped() >= 1).then_some(()) }).await;

    // The disk fills.
    let filler = fs.0.join("filler");
    fs.fill(&filler);
    let failed_id = missive_cli::client::new_client_msg_id();
    let failed = alice.send(&bob, Content::text("sent on a full disk"), failed_id).await;
    assert_eq!(code(failed), Some(ErrorCode::Internal), "a send on a full disk did not fail cleanly");
    assert_eq!(code(alice.set_hide_last_seen(true).await), Some(ErrorCode::Internal), "settings claimed success on a full disk");

    // The peer answers again; alpha cannot record the answers and must back off rather
    // than send the same transaction again and again.
    let answered = || {
        mock.observed.lock().unwrap().attempts.iter().filter(|a| a.fate == Fate::Answered).map(|a| a.at).collect::<Vec<_>>()
    };
    let already = answered().len();
    mock.misbehave.lock().unwrap().drop_next = 0;
    let times = eventually("three answered attempts while the disk is full", || async {
        let t = answered();
        (t.len() >= already + 3).then(|| t[already..].to_vec())
    })
    .await;
    let spread = times[2] - times[0];
    println!("three resends while the disk was full took {spread:?}");
    assert!(spread >= Duration::from_millis(500), "alpha resent in a loop: three transactions within {spread:?}");

    // Space returns: writes work again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let after_id = missive_cli::client::new_client_msg_id();
    let after = eventually("a send to succeed once space is back", || async {
        alice.send(&bob, Content::text("after space returned"), after_id).await.ok()
    })
    .await;
    alice.set_hide_last_seen(true).await.expect("settings still fail with space back");
    eventually("alpha's queue toward the peer to drain", || async { (queue_depth(&alpha, "beta.test").await == 0).then_some(()) }).await;
    let texts = mock.received_texts();
    for t in ["before the disk fills", "queued while the peer drops everything", "after space returned"] {
        assert!(texts.iter().any(|x| x == t), "the peer never got {t:?}: {texts:?}");
    }
    // Every acknowledged message is in history; the one that failed is not.
    let history = full_history(&alice, &bob, 50).await;
    let keys: Vec<_> = history.iter().map(|m| m.order_key()).collect();
    for m in [&before, &queued, &after] {
        assert!(keys.contains(&m.order_key()), "acknowledged message {:?} lost", m.content.as_text());
    }
    assert!(!history.iter().any(|m| m.content.as_text() == Some("sent on a full disk")), "a failed send was stored");
    assert_eq!(history.len(), 3);

    // A start on a full disk says what is wrong and exits.
    alpha.terminate().await.unwrap();
    fs.fill(&filler);
    let run = tokio::process::Command::new(missived()).arg("run").arg("--config").arg(&cfg).kill_on_drop(true).output();
    let run = tokio::time::timeout(DEADLINE, run).await.expect("missived kept running on a full disk").unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "missived started on a full disk");
    assert!(stderr.contains("full"), "start-up on a full disk did not say so: {stderr}");
    std::fs::remove_file(&filler).unwrap();
    alpha.restart().await.unwrap();
    let alice = login(&alpha, "alice").await;
    assert_eq!(full_history(&alice, &bob, 50).await.len(), 3);
}
