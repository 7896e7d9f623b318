//! Several servers of the implementation under test federating with each other: every
//! message arrives exactly once and both ends of a conversation show one order.

use std::collections::BTreeMap;

use anyhow::{ensure, Context};
use missive_spec::{Message, UserId};

use super::client::join_all;
use super::{check_canonical, eventually, history_all, test, text, Ctx, Test};
use crate::implementation::Sut;
use crate::wire::Client;

pub fn tests() -> Vec<Test> {
    vec![
        test!("multi.exactly_once", Required, ["FED-SEND-3", "FED-SEND-4", "FED-RECV-14", "CORE-ORDER-1", "FED-TLS-1"], [Federation], exactly_once),
        test!("multi.kill9_mid_stream", Required, ["FED-SEND-1", "FED-SEND-6", "FED-RECV-13", "C2S-SEND-1"], [Federation], kill9_mid_stream),
    ]
}

struct User {
    id: UserId,
    client: Client,
    server: usize,
}

async fn users(servers: &mut [Sut], per_server: usize) -> anyhow::Result<Vec<User>> {
    let mut out = Vec::new();
    for (i, s) in servers.iter_mut().enumerate() {
        for _ in 0..per_server {
            let (id, client) = s.new_user("u").await?;
            out.push(User { id, client, server: i });
        }
    }
    Ok(out)
}

/// Every user sends `n` messages to every user on another server, all at once.
async fn exchange(us: &[User], n: usize, tag: &str) -> anyhow::Result<BTreeMap<(usize, usize), Vec<String>>> {
    let mut sent = BTreeMap::new();
    let mut jobs = Vec::new();
    for (i, a) in us.iter().enumerate() {
        for (j, b) in us.iter().enumerate() {
            if a.server == b.server {
                continue;
            }
            let texts: Vec<String> = (0..n).map(|k| format!("{tag}:{i}>{j}:{k}")).collect();
            sent.insert((i, j), texts.clone());
            jobs.push(async move {
                for t in &texts {
                    a.client.send_text(&b.id, t).await.with_context(|| format!("{} sending {t}", a.id))?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
    }
    for r in join_all(jobs).await {
        r?;
    }
    Ok(sent)
}

/// Waits until both ends of every conversation hold all its messages, then checks: each
/// once, nothing unexpected, one canonical order on both ends.
async fn check(us: &[User], sent: &BTreeMap<(usize, usize), Vec<String>>) -> anyhow::Result<()> {
    for (i, a) in us.iter().enumerate() {
        for (j, b) in us.iter().enumerate() {
            if i >= j || a.server == b.server {
                continue;
            }
            let mut want: Vec<String> = sent.get(&(i, j)).into_iter().chain(sent.get(&(j, i))).flatten().cloned().collect();
            want.sort();
            let total = want.len();
            let (ha, hb) = eventually(&format!("{total} messages on both ends of {} and {}", a.id, b.id), || async {
                let ha = history_all(&a.client, &b.id).await.ok()?;
                let hb = history_all(&b.client, &a.id).await.ok()?;
                (ha.len() >= total && hb.len() >= total).then_some((ha, hb))
            })
            .await?;
            for (who, h) in [(&a.id, &ha), (&b.id, &hb)] {
                let mut got: Vec<String> = h.iter().map(text).collect();
                got.sort();
                ensure!(got == want, "{who}'s conversation holds {} messages, expected each of {total} once (duplicates or strangers)", got.len());
                check_canonical(h, &format!("{who}'s history"))?;
                for (x, y) in [(i, j), (j, i)] {
                    let order: Vec<String> = h.iter().map(text).filter(|t| sent[&(x, y)].contains(t)).collect();
                    ensure!(order == sent[&(x, y)], "{who}'s history has one sender's messages out of send order");
                }
            }
            let ids = |h: &[Message]| h.iter().map(|m| (m.origin.clone(), m.seq)).collect::<Vec<_>>();
            ensure!(ids(&ha) == ids(&hb), "{} and {} show the conversation in different orders", a.id, b.id);
            ensure!(ha == hb, "{} and {} hold different bytes for the same messages", a.id, b.id);
        }
    }
    Ok(())
}

async fn exactly_once(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut servers = ctx.federated(3).await?;
    let us = users(&mut servers, 2).await?;
    let sent = exchange(&us, 10, "e").await?;
    check(&us, &sent).await
}

async fn kill9_mid_stream(mut ctx: Ctx) -> anyhow::Result<()> {
    let mut servers = ctx.federated(2).await?;
    let us = users(&mut servers, 2).await?;
    let first = exchange(&us, 15, "before").await?;
    // Kill the second server while its queue still holds units, and bring it back.
    servers[1].restart_after_kill9().await?;
    let mut us2 = Vec::new();
    for u in us {
        let client = if u.server == 1 {
            let token = u.client.token().map(str::to_owned);
            let mut c = servers[1].connect().await?;
            c.set_token(token);
            c
        } else {
            u.client
        };
        us2.push(User { id: u.id, client, server: u.server });
    }
    let second = exchange(&us2, 5, "after").await?;
    let mut sent = first;
    for (k, v) in second {
        sent.entry(k).or_default().extend(v);
    }
    check(&us2, &sent).await
}
