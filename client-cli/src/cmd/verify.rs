//! `missive verify`: the safety number two users compare (e2ee.md E6), and marking the
//! other user verified.

use missive_cli::profile::Profile;
use serde_json::json;

use super::parse_user;
use crate::connect::{crypto, say_notices, session_client};

pub async fn verify(profile: &Profile, json: bool, user: &str, show: bool, number: Option<&str>) -> anyhow::Result<()> {
    let peer = parse_user(user)?;
    let (c, s) = session_client(profile).await?;
    if peer == s.user {
        anyhow::bail!("a safety number is shared with someone else; name another user");
    }
    let mut crypto = crypto(profile, &s)?;
    let numbers = crypto.safety_number(&c, &peer).await;
    say_notices(&mut crypto);
    let now = numbers?;
    if let Some(compared) = number {
        let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
        if digits(compared) != digits(&now) {
            anyhow::bail!("the safety number is now {now}, not the one you compared: the devices of one of you changed; compare again");
        }
    }
    if !show {
        crypto.verify(&peer, &now)?;
    }
    let number = now;
    if json {
        println!("{}", json!({"type": "safety_number", "user": peer.as_str(), "number": number, "verified": !show}));
    } else {
        println!("safety number with {peer}:\n\n    {number}\n");
        if show {
            println!("compare it with the one {peer} sees; `missive verify {peer}` marks them verified");
        } else {
            println!("{peer} is now verified with these devices: if the number differs from theirs, do not trust this conversation.");
            println!("A new or changed device of theirs stops your messages until you verify again.");
        }
    }
    c.close().await;
    Ok(())
}
