//! `missive history` and `missive read`: pages of a conversation, and marking it read.

use anyhow::bail;
use missive_cli::archive::Recorder;
use missive_cli::output::page_json;
use missive_cli::profile::Profile;
use missive_spec::{Cursor, ReceiptKind, Watermark};

use super::parse_user;
use crate::connect::{crypto, say_notices, session_client};
use crate::show;

pub async fn history(
    profile: &Profile,
    json: bool,
    with: &str,
    limit: Option<u32>,
    before: Option<String>,
    after: Option<String>,
) -> anyhow::Result<()> {
    let with = parse_user(with)?;
    let (c, s) = session_client(profile).await?;
    let mut page = c.history(&with, limit, before.map(Cursor), after.map(Cursor)).await?;
    let mut crypto = crypto(profile, &s)?;
    crypto.open_messages(&c, &mut page.messages).await;
    say_notices(&mut crypto);
    for m in &page.messages {
        show::page_message(json, m, &s.user, &page);
    }
    Recorder::new(profile).record_all(&page.messages);
    // Shown means read.
    if let Some(newest) = page.messages.first() {
        let w = Watermark(newest.order_key());
        if page.seen.as_ref().is_none_or(|s| *s < w) {
            c.receipt(&with, ReceiptKind::Read, w).await?;
        }
    }
    if json {
        println!("{}", page_json(&page.older, &page.newer, page.messages.len()));
    } else if let Some(o) = &page.older {
        println!("-- older messages: missive history {with} --before {}", o.0);
    }
    c.close().await;
    Ok(())
}

pub async fn read(profile: &Profile, json: bool, with: &str) -> anyhow::Result<()> {
    let with = parse_user(with)?;
    let (c, _) = session_client(profile).await?;
    let page = c.history(&with, Some(1), None, None).await?;
    match page.messages.first() {
        Some(m) => c.receipt(&with, ReceiptKind::Read, Watermark(m.order_key())).await?,
        None => bail!("no conversation with {with} yet"),
    }
    show::ok(json, Some(&format!("marked the conversation with {with} as read")));
    c.close().await;
    Ok(())
}
