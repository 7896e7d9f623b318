//! `missive login`, `missive register` and `missive passwd`: a new device's session, the
//! server's key pinned on first contact, and the user's own password. Passwords are typed
//! at a hidden prompt when standard input is a terminal, or read from standard input with
//! `--password-stdin`; a login's is sent only once the server has shown it is the user's
//! own homeserver.

use std::io::{BufRead, IsTerminal};

use anyhow::{bail, Context};
use missive_cli::client::Client;
use missive_cli::profile::{Profile, SessionFile};
use missive_cli::Session;
use serde_json::json;

use super::parse_user;
use crate::connect::{check_server_name, connect, session_client};

/// Where the password comes from.
#[derive(Clone, Copy)]
pub enum PasswordFrom {
    /// The first line of standard input (`--password-stdin`).
    Stdin,
    /// A hidden prompt on the terminal; registering asks twice.
    Prompt,
}

impl PasswordFrom {
    /// Fails at once, before connecting, when the password could not be had.
    fn check(self) -> anyhow::Result<()> {
        if matches!(self, PasswordFrom::Prompt) && !std::io::stdin().is_terminal() {
            bail!("standard input is not a terminal, so the password cannot be asked for: pipe it in and pass --password-stdin");
        }
        Ok(())
    }
}

pub async fn login(
    profile: &Profile,
    json: bool,
    user: &str,
    server: &str,
    from: PasswordFrom,
    device_name: Option<String>,
) -> anyhow::Result<()> {
    let user = parse_user(user)?;
    from.check()?;
    let mut c = connect(profile, &user, server).await?;
    check_server_name(&c, &user, server).await?;
    let password = read_password(from, &format!("Password for {user}: "), false)?;
    let session = c.login(&user, &password, device_name).await?;
    finish_login(profile, &c, session, server, json).await?;
    c.close().await;
    Ok(())
}

pub async fn register(
    profile: &Profile,
    json: bool,
    user: &str,
    server: &str,
    from: PasswordFrom,
    token: Option<String>,
    device_name: Option<String>,
) -> anyhow::Result<()> {
    let user = parse_user(user)?;
    from.check()?;
    let mut c = connect(profile, &user, server).await?;
    check_server_name(&c, &user, server).await?;
    let password = read_password(from, &format!("New password for {user}: "), true)?;
    let session = c.register(&user, &password, token, device_name).await?;
    finish_login(profile, &c, session, server, json).await?;
    c.close().await;
    Ok(())
}

/// `missive passwd`: the current password, then the new one (asked twice at the prompt;
/// with `--password-stdin`, the first two lines of standard input).
pub async fn passwd(profile: &Profile, json: bool, from: PasswordFrom, logout_others: bool) -> anyhow::Result<()> {
    from.check()?;
    let (c, s) = session_client(profile).await?;
    let old = read_password(from, &format!("Current password for {}: ", s.user), false)?;
    let new = read_password(from, "New password: ", true)?;
    c.change_password(&old, &new, logout_others).await?;
    if json {
        println!("{}", json!({"type": "ok"}));
    } else if logout_others {
        println!("password changed; every other device of {} is logged out", s.user);
    } else {
        println!("password changed; your other devices stay logged in (--logout-others logs them out)");
    }
    c.close().await;
    Ok(())
}

fn read_password(from: PasswordFrom, prompt: &str, confirm: bool) -> anyhow::Result<String> {
    match from {
        PasswordFrom::Stdin => read_password_stdin(),
        PasswordFrom::Prompt => {
            let pw = rpassword::prompt_password(prompt).context("cannot read the password from the terminal")?;
            if pw.is_empty() {
                bail!("no password given");
            }
            if confirm && rpassword::prompt_password("Again: ").context("cannot read the password from the terminal")? != pw {
                bail!("the two passwords differ");
            }
            Ok(pw)
        }
    }
}

fn read_password_stdin() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("cannot read the password from standard input")?;
    let pw = line.trim_end_matches(['\n', '\r']).to_owned();
    if pw.is_empty() {
        bail!("no password on standard input");
    }
    Ok(pw)
}

async fn finish_login(profile: &Profile, c: &Client, session: Session, server: &str, json: bool) -> anyhow::Result<()> {
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
    publish_keys(profile, c).await;
    if json {
        println!("{}", json!({"type": "session", "user": session.user.as_str(), "device": session.device, "server": server}));
    } else {
        println!("logged in as {} (device {})", session.user, session.device);
    }
    Ok(())
}

/// Publishes the new device's keys (e2ee.md E3.1); a failure is said, and the next
/// command that sends tries again.
async fn publish_keys(profile: &Profile, c: &Client) {
    let published = match profile.require_session().and_then(|s| crate::connect::crypto(profile, &s)) {
        Ok(mut k) => k.publish(c).await,
        Err(e) => Err(e),
    };
    if let Err(e) = published {
        eprintln!("missive: warning: this device's keys are not published yet ({e:#}); the next command that sends tries again");
    }
}
