//! `missive sync`: everything since the saved position, page by page, then the position
//! saved and delivery acknowledged.

use missive_cli::archive::Recorder;
use missive_cli::profile::Profile;
use missive_cli::receipts::ack_delivered;
use missive_spec::limits;
use serde_json::json;

use crate::connect::{crypto, say_notices, session_client};
use crate::show;

pub async fn sync(profile: &Profile, json: bool) -> anyhow::Result<()> {
    let (c, mut s) = session_client(profile).await?;
    let mut crypto = crypto(profile, &s)?;
    let mut archive = Recorder::new(profile);
    let mut count = 0;
    loop {
        let page = c.sync_page(s.sync_pos, None).await?;
        let (next, mut events) = (page.next, page.events);
        crypto.open_events(&c, &mut events).await;
        say_notices(&mut crypto);
        for e in &events {
            show::event(json, e);
        }
        archive.record_events(&events);
        ack_delivered(&c, &s.user, &events).await?;
        count += events.len();
        s.sync_pos = next;
        profile.save_session(&s)?;
        if !page.more && events.len() < limits::SYNC_MAX_EVENTS as usize {
            break;
        }
    }
    if json {
        println!("{}", json!({"type": "synced", "pos": s.sync_pos, "count": count}));
    } else if count == 0 {
        eprintln!("nothing new");
    }
    c.close().await;
    Ok(())
}
