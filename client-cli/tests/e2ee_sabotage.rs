//! A server that substitutes its user's device keys (the `substitute_device_keys` fault of
//! a test build of `missived`) is caught by a peer who verified that user: the CLI refuses
//! to send and says why (e2ee.md E6.3). One test per process: the fault is switched on
//! through the environment the servers inherit.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_substituted_device_key_stops_sending_to_a_verified_peer() {
    let (tmp, mut servers) = two_servers().await;
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    ok(&alice, &["login", "@alice:alpha.test", "--server", &servers[0].addr.to_string(), "--password-stdin"], Some("alice-password\n")).await;
    ok(&bob, &["login", "@bob:beta.test", "--server", &servers[1].addr.to_string(), "--password-stdin"], Some("bob-password\n")).await;

    // Both see the same safety number; alice marks bob verified and writes to him.
    let mut numbers = Vec::new();
    for (p, u) in [(&alice, "@bob:beta.test"), (&bob, "@alice:alpha.test")] {
        numbers.push(json_lines(&ok(p, &["--json", "verify", u], None).await)[0]["number"].as_str().unwrap().to_owned());
    }
    assert_eq!(numbers[0], numbers[1], "the two sides compute different safety numbers");
    assert_eq!(numbers[0].split(' ').count(), 12);
    ok(&alice, &["send", "@bob:beta.test", "verified and sent"], None).await;

    // Beta now hands out keys of its own making for bob's device.
    std::env::set_var("MISSIVED_SABOTAGE", "substitute_device_keys");
    servers[1].restart().await.unwrap();
    // Once alpha reaches the restarted beta again, alice's client sees the substitution.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let seen = loop {
        let out = run(&alice, &["verify", "--show", "@bob:beta.test"], None).await;
        if out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        assert!(std::time::Instant::now() < until, "alpha never reached beta again: {out:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(seen.contains("@bob:beta.test's devices changed: keys of device"), "{seen}");
    let out = run(&alice, &["send", "@bob:beta.test", "must not go"], None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sent to a substituted key: {stderr}");
    assert!(stderr.contains("changed since you verified") && stderr.contains("missive verify @bob:beta.test"), "{stderr}");
    assert!(run(&alice, &["outbox"], None).await.stdout.is_empty(), "the refused message must not wait to go out later");
}
