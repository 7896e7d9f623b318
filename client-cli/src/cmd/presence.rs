//! `missive presence` and `missive typing`: the ephemeral state of people one talks with.

use missive_cli::output::ephemeral_line;
use missive_cli::profile::Profile;
use missive_spec::Ephemeral;

use super::parse_user;
use crate::connect::session_client;
use crate::show;

pub async fn presence(profile: &Profile, json: bool, user: &str) -> anyhow::Result<()> {
    let user = parse_user(user)?;
    let (c, _) = session_client(profile).await?;
    let p = c.presence(&user).await?;
    let e = Ephemeral::Presence(p);
    if json {
        show::ephemeral(true, &e);
    } else {
        println!("{}", ephemeral_line(&e).trim_start_matches("-- "));
    }
    c.close().await;
    Ok(())
}

pub async fn typing(profile: &Profile, json: bool, with: &str) -> anyhow::Result<()> {
    let with = parse_user(with)?;
    let (c, _) = session_client(profile).await?;
    c.typing(&with).await?;
    show::ok(json, None);
    c.close().await;
    Ok(())
}
