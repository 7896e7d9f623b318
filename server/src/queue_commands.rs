//! `missived deadletters …` and `missived peer remove`: what waits for other servers,
//! through the admin socket of the running server or straight on the database.

use anyhow::{bail, Context};
use missive_server::admin::{self, AdminRequest, AdminResponse, DeadLetterInfo};
use missive_spec::ServerName;
use serde_json::json;

use crate::user_commands::{call, confirm_removal};
use crate::{ConfigArg, DeadLetterCommand};

fn letter_json(d: &DeadLetterInfo) -> serde_json::Value {
    json!({
        "type": "deadletter",
        "id": d.id,
        "peer": d.peer.as_str(),
        "reason": d.reason,
        "kind": d.kind,
        "from": d.from.as_ref().map(|u| u.as_str()),
        "to": d.to.as_ref().map(|u| u.as_str()),
        "seq": d.seq,
    })
}

fn count(json: bool, what: &str, res: AdminResponse) -> anyhow::Result<()> {
    let AdminResponse::Count { count } = res else { bail!("unexpected answer from the server") };
    if json {
        println!("{}", json!({"type": "ok", "change": what, "count": count}));
    } else {
        println!("{what}: {count} unit(s)");
    }
    Ok(())
}

/// An empty list means every dead letter to the server: the operator says so with `--all`.
fn named(ids: &[String], all: bool) -> anyhow::Result<()> {
    if ids.is_empty() && !all {
        bail!("name dead letters by id (see `missived deadletters list`), or pass --all");
    }
    Ok(())
}

pub async fn run(command: DeadLetterCommand) -> anyhow::Result<()> {
    match command {
        DeadLetterCommand::List { config, json } => {
            let AdminResponse::DeadLetters { letters } = call(&config.load()?, AdminRequest::DeadLetters {}).await? else {
                bail!("unexpected answer from the server");
            };
            for d in &letters {
                if json {
                    println!("{}", letter_json(d));
                } else {
                    let what = match (&d.from, &d.to, d.seq) {
                        (Some(f), Some(t), Some(seq)) => format!("message #{seq} {f} → {t}"),
                        (Some(f), Some(t), None) => format!("{} {f} → {t}", d.kind),
                        _ => d.kind.clone(),
                    };
                    println!("{}  {}  {what}", d.id, d.reason);
                }
            }
            if letters.is_empty() && !json {
                eprintln!("no dead letters");
            }
        }
        DeadLetterCommand::Retry { config, ids, all, json } => {
            named(&ids, all)?;
            count(json, "queued again", call(&config.load()?, AdminRequest::RetryDeadLetters { ids }).await?)?;
        }
        DeadLetterCommand::Drop { config, ids, all, json } => {
            named(&ids, all)?;
            count(json, "dropped", call(&config.load()?, AdminRequest::DropDeadLetters { ids }).await?)?;
        }
    }
    Ok(())
}

/// Unpins `name` (if pinned) and drops its queue, after confirmation.
pub async fn peer_remove(config: &ConfigArg, name: &str, yes: bool, json: bool) -> anyhow::Result<()> {
    let name = ServerName::parse(name)?;
    let loaded = config.load()?;
    if loaded.server_name == name {
        bail!("{name} is this server");
    }
    confirm_removal(name.as_str(), yes)?;
    let path = config.path.as_path();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut doc: toml_edit::DocumentMut = text.parse().with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut unpinned = false;
    if let Some(peers) = doc.get_mut("peers").and_then(|p| p.as_array_of_tables_mut()) {
        let before = peers.len();
        peers.retain(|t| t.get("name").and_then(|n| n.as_str()) != Some(name.as_str()));
        unpinned = peers.len() != before;
        if peers.is_empty() {
            doc.remove("peers");
        }
    }
    if unpinned {
        crate::rewrite_config(path, &doc.to_string())?;
    }
    let res = call(&loaded, AdminRequest::RemovePeer { name: name.clone() }).await?;
    let dropped = match res {
        AdminResponse::Count { count } => count,
        _ => 0,
    };
    if unpinned {
        if let Some(AdminResponse::Error { message }) = admin::call(&loaded.admin_socket(), &AdminRequest::Reload {}).await? {
            bail!("{name} unpinned, but the running server did not reload: {message}");
        }
    }
    if json {
        println!("{}", json!({"type": "ok", "change": "peer removed", "peer": name.as_str(), "unpinned": unpinned, "dropped": dropped}));
    } else {
        let pin = if unpinned { "unpinned" } else { "was not pinned" };
        println!("{name}: {pin}; dropped {dropped} queued unit(s)");
    }
    Ok(())
}
