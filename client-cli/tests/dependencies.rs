//! The client links its transport, not the server's: no certificate generation (rcgen) and
//! no discovery (reqwest, hickory) among what `missive` and its library are built from,
//! as `cargo tree -p missive-cli -e normal` lists it.

use std::process::Command;

const FORBIDDEN: &[&str] = &["missive-federation", "rcgen", "reqwest", "hickory-"];

#[test]
fn the_client_links_no_discovery_and_no_certificate_generation() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--locked", "--offline", "-p", "missive-cli", "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("cannot run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8(out.stdout).expect("cargo tree printed UTF-8");
    let linked: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(linked.contains(&"missive-transport"), "cargo tree lists the transport: {tree}");
    let bad: Vec<&&str> = linked.iter().filter(|n| FORBIDDEN.iter().any(|f| n.starts_with(f))).collect();
    assert!(bad.is_empty(), "missive-cli links {bad:?}; what a client needs belongs in missive-transport");
}
