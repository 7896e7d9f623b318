//! `missive listen`: prints events as they arrive, acknowledges delivery and saves the
//! position after each frame, until Ctrl-C.

use missive_cli::archive::Recorder;
use missive_cli::profile::Profile;
use missive_cli::receipts::ack_delivered;

use crate::connect;
use crate::follow::{Follow, Next};
use crate::show;

pub async fn listen(profile: &Profile, json: bool) -> anyhow::Result<()> {
    let mut follow = Follow::new(profile);
    let mut announced = false;
    let mut archive = Recorder::new(profile);
    let mut crypto = None;
    loop {
        match follow.next(std::future::pending::<()>()).await? {
            Next::Connected(_) | Next::Input(()) => {}
            Next::Unreachable(delay) => eprintln!("server unreachable; retrying in {delay:?}"),
            Next::Frame(c, mut f) => {
                let Some(s) = follow.session().cloned() else { continue };
                let me = s.user.clone();
                if crypto.is_none() {
                    crypto = Some(connect::crypto(profile, &s)?);
                }
                if let Some(k) = crypto.as_mut() {
                    k.open_events(&c, &mut f.events).await;
                    connect::say_notices(k);
                }
                if !json && !announced {
                    eprintln!("listening as {me} (Ctrl-C to stop)");
                    announced = true;
                }
                for e in &f.ephemeral {
                    show::ephemeral(json, e);
                }
                for e in &f.events {
                    show::event(json, e);
                }
                archive.record_events(&f.events);
                ack_delivered(&c, &me, &f.events).await?;
                follow.save_position(f.next)?;
            }
            Next::Lost(reason) => eprintln!("connection lost ({reason}); reconnecting"),
            Next::Interrupted => {
                follow.close().await;
                return Ok(());
            }
        }
    }
}
