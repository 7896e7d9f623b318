//! `missived user …` and `missived device …`: accounts and devices, through the admin
//! socket of the running server, or straight on the database when it is stopped.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{anyhow, bail, Context};
use missive_server::admin::{self, AdminRequest, AdminResponse, UserInfo};
use missive_server::config::Config;
use missive_spec::{DeviceId, DeviceInfo, UserId};
use serde_json::json;

use crate::{DeviceCommand, UserCommand};

/// Sends an account request to the running server, or carries it out on the database
/// when no server runs.
async fn call(config: &Config, req: AdminRequest) -> anyhow::Result<AdminResponse> {
    let res = match admin::call(&config.admin_socket(), &req).await? {
        Some(r) => r,
        None => admin::offline(config, req).await?,
    };
    match res {
        AdminResponse::Error { message } => bail!("{message}"),
        r => Ok(r),
    }
}

/// A localpart (alice) or a full user id of this server.
fn user_of(config: &Config, name: &str) -> anyhow::Result<UserId> {
    let user = if name.starts_with('@') { UserId::parse(name)? } else { UserId::new(name, &config.server_name)? };
    if !user.is_on(&config.server_name) {
        bail!("{user} does not belong to {}", config.server_name);
    }
    Ok(user)
}

fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("cannot read the password from standard input")?;
    let pw = line.trim_end_matches(['\n', '\r']).to_owned();
    if pw.is_empty() {
        bail!("no password on standard input");
    }
    missive_server::accounts::check_password(&pw).map_err(|e| anyhow!(e.message))?;
    Ok(pw)
}

async fn hash(password: String) -> anyhow::Result<String> {
    Ok(tokio::task::spawn_blocking(move || missive_server::accounts::hash_password(&password)).await?)
}

fn user_json(u: &UserInfo) -> serde_json::Value {
    json!({"type": "user", "user": u.user.as_str(), "state": u.state, "devices": u.devices, "created_ms": u.created_ms})
}

fn device_json(user: &UserId, d: &DeviceInfo) -> serde_json::Value {
    json!({"type": "device", "user": user.as_str(), "id": d.id.as_str(), "name": d.name, "created_ms": d.created_ms})
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(ms: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64) {
        Ok(t) => format!("{} {:02}:{:02}:{:02}", t.date(), t.hour(), t.minute(), t.second()),
        Err(_) => format!("{ms} ms"),
    }
}

/// What an account change did, said once.
fn report(json: bool, user: &UserId, what: &str, res: AdminResponse) {
    let revoked: Vec<String> = match res {
        AdminResponse::Revoked { devices } => devices.iter().map(|d| d.as_str().to_owned()).collect(),
        _ => Vec::new(),
    };
    if json {
        println!("{}", json!({"type": "ok", "user": user.as_str(), "change": what, "revoked": revoked}));
    } else if revoked.is_empty() {
        println!("{user}: {what}");
    } else {
        println!("{user}: {what}; logged out {} device(s): {}", revoked.len(), revoked.join(", "));
    }
}

/// Asks the operator to type the user id before a removal; `--yes` skips it.
fn confirm_removal(user: &UserId, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("removing {user} cannot be undone; pass --yes to confirm");
    }
    eprint!("Removing {user} logs out its devices and retires the id for good. Type the user id to confirm: ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != user.as_str() {
        bail!("not confirmed; nothing was changed");
    }
    Ok(())
}

pub async fn run(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add { config, name, password_stdin: _ } => {
            let config = config.load()?;
            let user = user_of(&config, &name)?;
            let password_hash = hash(read_password()?).await?;
            call(&config, AdminRequest::AddUser { user: user.clone(), password_hash }).await?;
            println!("added {user}");
        }
        UserCommand::List { config, json } => {
            let AdminResponse::Users { users } = call(&config.load()?, AdminRequest::Users {}).await? else {
                bail!("unexpected answer from the server");
            };
            for u in &users {
                if json {
                    println!("{}", user_json(u));
                } else {
                    println!("{:<40} {:<8} {:>2} device(s)  created {}", u.user.as_str(), u.state, u.devices, utc(u.created_ms));
                }
            }
        }
        UserCommand::Show { config, name, json } => {
            let config = config.load()?;
            let user = user_of(&config, &name)?;
            let AdminResponse::User { user: info, devices } = call(&config, AdminRequest::User { user: user.clone() }).await? else {
                bail!("unexpected answer from the server");
            };
            if json {
                println!("{}", user_json(&info));
                for d in &devices {
                    println!("{}", device_json(&user, d));
                }
            } else {
                println!("{}  {}  created {}", info.user, info.state, utc(info.created_ms));
                for d in &devices {
                    println!("  device {}  {}  created {}", d.id, d.name.as_deref().unwrap_or("-"), utc(d.created_ms));
                }
            }
        }
        UserCommand::Remove { config, name, yes, json } => {
            let config = config.load()?;
            let user = user_of(&config, &name)?;
            confirm_removal(&user, yes)?;
            let res = call(&config, AdminRequest::RemoveUser { user: user.clone() }).await?;
            report(json, &user, "removed", res);
        }
        UserCommand::Passwd { config, name, password_stdin: _, logout, json } => {
            let config = config.load()?;
            let user = user_of(&config, &name)?;
            let password_hash = hash(read_password()?).await?;
            let res = call(&config, AdminRequest::SetPassword { user: user.clone(), password_hash, logout }).await?;
            report(json, &user, "password changed", res);
        }
        UserCommand::Disable { config, name, json } => {
            let config = config.load()?;
            let user = user_of(&config, &name)?;
            let res = call(&config, AdminRequest::SetDisabled { user: user.clone(), disabled: true }).await?;
            report(json, &user, "disabled", res);
        }
        UserCommand::Enable { config, name, json } => {
            let config = config.load()?;
            let user = user_of(&config, &name)?;
            let res = call(&config, AdminRequest::SetDisabled { user: user.clone(), disabled: false }).await?;
            report(json, &user, "enabled", res);
        }
    }
    Ok(())
}

pub async fn device(command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::List { config, user, json } => {
            let config = config.load()?;
            let user = user_of(&config, &user)?;
            let AdminResponse::User { devices, .. } = call(&config, AdminRequest::User { user: user.clone() }).await? else {
                bail!("unexpected answer from the server");
            };
            for d in &devices {
                if json {
                    println!("{}", device_json(&user, d));
                } else {
                    println!("{}  {}  created {}", d.id, d.name.as_deref().unwrap_or("-"), utc(d.created_ms));
                }
            }
        }
        DeviceCommand::Revoke { config, user, device, json } => {
            let config = config.load()?;
            let user = user_of(&config, &user)?;
            let device = DeviceId::parse(&device).map_err(|e| anyhow!("{e}"))?;
            let res = call(&config, AdminRequest::RevokeDevice { user: user.clone(), device }).await?;
            report(json, &user, "device revoked", res);
        }
    }
    Ok(())
}
