//! `missived backup DIR` and `missived restore DIR --data-dir D`.
//!
//! A backup is a directory: `db/` (a RocksDB checkpoint: consistent at one instant, taken
//! while the server serves, with no pause), the config file and the server key (both mode
//! 0600; the key is secret, keep the backup so), and `backup.json` saying what it is. A
//! restore copies it into an empty data directory and marks the database restored, so that
//! the server, when it starts, first learns from its peers what it sent after the backup
//! point (federation.md F12) instead of numbering those messages again.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use missive_server::admin::{self, AdminRequest, AdminResponse};
use missive_server::config::{self, Config};
use missive_server::store::rocks::RocksStore;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{write_private, ConfigArg};

const MANIFEST: &str = "backup.json";

/// What `backup.json` says.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    #[serde(rename = "type")]
    kind: String,
    server_name: String,
    created_ms: u64,
    missived: String,
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Refuses a target that exists and is not an empty directory.
fn check_empty(dir: &Path, what: &str) -> anyhow::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("{} is not empty: give a new or empty directory for the {what}", dir.display());
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}

fn copy_private(from: &Path, to: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(from).with_context(|| format!("cannot read {}", from.display()))?;
    write_private(to, &text).with_context(|| format!("cannot write {}", to.display()))
}

fn size_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|es| {
            es.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => size_of(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

pub async fn backup(config: &ConfigArg, dir: &Path, json: bool) -> anyhow::Result<()> {
    let loaded = config.load()?;
    let existed = check_empty(dir, "backup")?;
    if !existed {
        create_private_dir(dir)?;
    }
    let dir = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
    let db = dir.join("db");
    // The running server writes the checkpoint itself; a stopped one is opened here.
    let live = match admin::call(&loaded.admin_socket(), &AdminRequest::Checkpoint { dir: db.clone() }).await? {
        Some(AdminResponse::Ok {}) => true,
        Some(AdminResponse::Error { message }) => bail!("the server could not write the backup: {message}"),
        Some(_) => bail!("unexpected answer from the server"),
        None => {
            let store = RocksStore::open(&loaded.db_dir())?;
            store.checkpoint(&db)?;
            false
        }
    };
    copy_private(&config.path, &dir.join(config::CONFIG_FILE))?;
    copy_private(&loaded.key_file, &dir.join(config::KEY_FILE))?;
    // The key's rotation chain (federation.md F2.7) belongs with it.
    let chain = missive_federation::RotationChain::path(&loaded.key_file);
    if chain.exists() {
        copy_private(&chain, &missive_federation::RotationChain::path(&dir.join(config::KEY_FILE)))?;
    }
    let manifest = Manifest {
        kind: "missive-backup".into(),
        server_name: loaded.server_name.to_string(),
        created_ms: missive_server::accounts::now_ms(),
        missived: env!("CARGO_PKG_VERSION").into(),
    };
    write_private(&dir.join(MANIFEST), &serde_json::to_string_pretty(&manifest)?)?;
    let bytes = size_of(&dir);
    if json {
        println!("{}", json!({"type": "backup", "server_name": manifest.server_name, "dir": dir, "bytes": bytes, "while_serving": live}));
    } else {
        println!("Backed up {} to {} ({:.1} MiB{})", manifest.server_name, dir.display(), bytes as f64 / 1048576.0, if live { ", while serving" } else { "" });
        println!("It holds the server key: keep it as private as the key itself.");
    }
    Ok(())
}

pub fn restore(from: &Path, data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let manifest: Manifest = serde_json::from_str(
        &std::fs::read_to_string(from.join(MANIFEST)).with_context(|| format!("{} holds no Missive backup (no {MANIFEST})", from.display()))?,
    )
    .with_context(|| format!("{} is not a Missive backup manifest", from.join(MANIFEST).display()))?;
    if manifest.kind != "missive-backup" || !from.join("db").is_dir() {
        bail!("{} holds no Missive backup", from.display());
    }
    let existed = check_empty(data_dir, "restored server")?;
    if !existed {
        create_private_dir(data_dir)?;
    }
    let db = data_dir.join("db");
    copy_tree(&from.join("db"), &db)?;
    // Marked at once: however the rest goes, this database never starts as if it had not
    // been restored (it would number again what peers already hold).
    let store = RocksStore::open(&db)?;
    let record = missive_core::restore::mark_restored(&store, missive_server::accounts::now_ms())?;
    drop(store);
    let chain = |dir: &Path| missive_federation::RotationChain::path(&dir.join(config::KEY_FILE));
    for (src, dst) in [
        (from.join(config::CONFIG_FILE), data_dir.join(config::CONFIG_FILE)),
        (from.join(config::KEY_FILE), data_dir.join(config::KEY_FILE)),
        (chain(from), chain(data_dir)),
    ] {
        if src.exists() {
            copy_private(&src, &dst)?;
        }
    }
    let config_path = data_dir.join(config::CONFIG_FILE);
    let loaded = Config::load(&config_path)?;
    if loaded.db_dir() != db && loaded.db_dir().canonicalize().ok() != db.canonicalize().ok() {
        bail!(
            "the restored config keeps its data in {}, not {}: set data_dir in {} before starting",
            loaded.db_dir().display(),
            db.display(),
            config_path.display()
        );
    }
    if !loaded.key_file.exists() {
        bail!(
            "the restored config names the key file {}, which does not exist; the backup's key is {}: set key_file in {}",
            loaded.key_file.display(),
            data_dir.join(config::KEY_FILE).display(),
            config_path.display()
        );
    }
    if json {
        println!(
            "{}",
            json!({"type": "restore", "server_name": manifest.server_name, "data_dir": data_dir, "backup_created_ms": manifest.created_ms, "event_floor": record.event_floor})
        );
    } else {
        println!("Restored {} into {} (backup of {} ms since the epoch).", manifest.server_name, data_dir.display(), manifest.created_ms);
        println!("Start it with: missived run --config {}", config_path.display());
        println!("It first asks each peer what it sent after the backup and takes those messages back; until it has, sends to that peer's users are refused with remote_unavailable.");
    }
    Ok(())
}

/// Copies a directory tree (files only; a checkpoint has no links of its own).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    create_private_dir(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let e = e?;
        let target: PathBuf = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target).with_context(|| format!("cannot copy {} to {}", e.path().display(), target.display()))?;
            std::fs::File::open(&target).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", target.display()))?;
        }
    }
    // The copy must be on disk before the database is opened and marked.
    std::fs::File::open(to).and_then(|d| d.sync_all()).ok();
    Ok(())
}
