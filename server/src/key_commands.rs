//! `missived key rotate`: a new server key, handed over to by the old one (federation.md
//! F2.7), so that peers and clients that pinned the old key follow without a warning.

use anyhow::{bail, Context};
use missive_federation::{RotationChain, ServerKey};
use missive_server::admin::{self, AdminRequest};
use serde_json::json;

use crate::ConfigArg;

pub async fn rotate(config: &ConfigArg, json: bool) -> anyhow::Result<()> {
    let loaded = config.load()?;
    // The running server signs with the key it loaded: the new one takes over at a start,
    // and the statement says from when.
    if admin::call(&loaded.admin_socket(), &AdminRequest::Peers {}).await.ok().flatten().is_some() {
        bail!("missived is running: stop it, rotate, then start it again (it signs with the key it started with)");
    }
    let key_file = &loaded.key_file;
    let old = ServerKey::load(key_file)?;
    let new = ServerKey::generate();
    let now = missive_server::accounts::now_ms();
    let statement = old.hand_over(&new.public(), &loaded.server_name, now);
    // Keep the old private key beside the new one (it signs nothing more), write the new
    // key aside, append the statement, then replace the key file. A start refuses a chain
    // that does not end at the key it finds, so a crash in between is seen, not served.
    let mut kept = key_file.as_os_str().to_owned();
    kept.push(format!(".retired-{}", old.public().key_id()));
    old.save_new(std::path::Path::new(&kept)).context("cannot keep the old key")?;
    let mut tmp = key_file.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    new.save_new(&tmp)?;
    RotationChain::append(key_file, &statement)?;
    std::fs::rename(&tmp, key_file).with_context(|| format!("cannot replace {}", key_file.display()))?;
    if json {
        println!(
            "{}",
            json!({"type": "key_rotated", "old": old.public().to_text(), "new": new.public().to_text(), "fingerprint": new.public().fingerprint(), "valid_until_ms": now})
        );
    } else {
        println!("New server key {} ({})", new.public(), new.public().fingerprint());
        println!("The old key {} signed the hand-over; it stays published as retired.", old.public());
        println!("Start missived again. Publish the new key document (`missived well-known`) if peers read it over HTTPS.");
    }
    Ok(())
}
