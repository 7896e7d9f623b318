//! `missive devices`, `revoke`, `settings` and `logout`: the account and its devices.

use anyhow::{anyhow, bail};
use missive_cli::profile::Profile;
use missive_spec::DeviceId;
use serde_json::json;

use crate::connect::session_client;
use crate::show;

pub async fn devices(profile: &Profile, json: bool) -> anyhow::Result<()> {
    let (c, _) = session_client(profile).await?;
    for d in c.devices().await? {
        if json {
            println!(
                "{}",
                json!({"type": "device", "id": d.id.as_str(), "name": d.name, "current": d.current, "created_ms": d.created_ms})
            );
        } else {
            let name = d.name.as_deref().unwrap_or("-");
            let mark = if d.current { "  (this device)" } else { "" };
            println!("{}  {}  created {}{mark}", d.id, name, missive_cli::output::utc(d.created_ms));
        }
    }
    c.close().await;
    Ok(())
}

pub async fn revoke(profile: &Profile, json: bool, device: &str) -> anyhow::Result<()> {
    let device = DeviceId::parse(device).map_err(|e| anyhow!("{e}"))?;
    let (c, s) = session_client(profile).await?;
    if device.as_str() == s.device {
        bail!("that is this device; use `missive logout`");
    }
    c.revoke_device(device.clone()).await?;
    show::ok(json, Some(&format!("revoked device {device}")));
    c.close().await;
    Ok(())
}

pub async fn block(profile: &Profile, json: bool, user: &str, on: bool) -> anyhow::Result<()> {
    let user = super::parse_user(user)?;
    let (c, _) = session_client(profile).await?;
    c.block(&user, on).await?;
    let said = if on { format!("blocked {user}: nothing of theirs reaches you until `missive unblock {user}`") } else { format!("unblocked {user}") };
    show::ok(json, Some(&said));
    c.close().await;
    Ok(())
}

pub async fn blocked(profile: &Profile, json: bool) -> anyhow::Result<()> {
    let (c, _) = session_client(profile).await?;
    let users = c.blocked().await?;
    for u in &users {
        if json {
            println!("{}", json!({"type": "blocked", "user": u.as_str()}));
        } else {
            println!("{u}");
        }
    }
    if users.is_empty() && !json {
        println!("(you block nobody)");
    }
    c.close().await;
    Ok(())
}

pub async fn settings(profile: &Profile, json: bool, hide_last_seen: bool) -> anyhow::Result<()> {
    let (c, _) = session_client(profile).await?;
    c.set_hide_last_seen(hide_last_seen).await?;
    show::ok(json, Some("settings saved"));
    c.close().await;
    Ok(())
}

pub async fn logout(profile: &Profile, json: bool) -> anyhow::Result<()> {
    let (c, _) = session_client(profile).await?;
    c.logout().await?;
    profile.clear_session()?;
    show::ok(json, Some("logged out"));
    c.close().await;
    Ok(())
}
