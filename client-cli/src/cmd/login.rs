//! `missive login` and `missive register`: a new device's session, and the server's key
//! pinned on first contact.

use std::io::BufRead;

use anyhow::{bail, Context};
use missive_cli::client::Client;
use missive_cli::profile::{Profile, SessionFile};
use missive_cli::Session;
use serde_json::json;

use super::parse_user;
use crate::connect::connect;

pub async fn login(profile: &Profile, json: bool, user: &str, server: &str, device_name: Option<String>) -> anyhow::Result<()> {
    let user = parse_user(user)?;
    let password = read_password()?;
    let mut c = connect(profile, &user, server).await?;
    let session = c.login(&user, &password, device_name).await?;
    finish_login(profile, &c, session, server, json)?;
    c.close().await;
    Ok(())
}

pub async fn register(
    profile: &Profile,
    json: bool,
    user: &str,
    server: &str,
    token: Option<String>,
    device_name: Option<String>,
) -> anyhow::Result<()> {
    let user = parse_user(user)?;
    let password = read_password()?;
    let mut c = connect(profile, &user, server).await?;
    let session = c.register(&user, &password, token, device_name).await?;
    finish_login(profile, &c, session, server, json)?;
    c.close().await;
    Ok(())
}

fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("cannot read the password from standard input")?;
    let pw = line.trim_end_matches(['\n', '\r']).to_owned();
    if pw.is_empty() {
        bail!("no password on standard input");
    }
    Ok(pw)
}

fn finish_login(profile: &Profile, c: &Client, session: Session, server: &str, json: bool) -> anyhow::Result<()> {
    let name = session.user.server_name();
    if profile.pinned(&name)?.is_none() {
        profile.pin(&name, &c.server_key())?;
        eprintln!("pinned the key of {name}: {} ({})", c.server_key(), c.server_key().fingerprint());
    }
    profile.save_session(&SessionFile {
        user: session.user.clone(),
        server: server.to_owned(),
        device: session.device.clone(),
        token: session.token,
        sync_pos: 0,
    })?;
    if json {
        println!("{}", json!({"type": "session", "user": session.user.as_str(), "device": session.device, "server": server}));
    } else {
        println!("logged in as {} (device {})", session.user, session.device);
    }
    Ok(())
}
