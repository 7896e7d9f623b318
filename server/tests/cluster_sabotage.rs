//! The cluster chaos run catches a server that forgets its idempotency records: with the
//! `forget_sends` fault (the test build's `sabotage` feature), retried sends are stored
//! twice and the checker says so. A file of its own, because the fault is switched on
//! through the environment of every `missived` this process starts. It exists where the
//! build has the faults: the workspace's test build (`.ci/run`), not `-p missive-server`.
#![cfg(feature = "sabotage")]

mod common;

use common::cluster::chaos;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_chaos_run_reports_duplicates_when_sends_are_not_idempotent() {
    std::env::set_var("MISSIVED_SABOTAGE", "forget_sends");
    let f = chaos(7, 6).await;
    assert!(f.retries_differ > 0 && f.duplicates > 0, "the checker missed the duplicates: {f:?}");
    assert_eq!(f.lost, 0, "{f:?}");
}
