//! The conformance tests and the runner that selects and runs them.
//!
//! A [`Test`] has a stable name (`c2s.send.idempotent`), the spec requirement ids it
//! checks, a [`Tier`], and the optional [`Feature`]s it needs. Each test gets a fresh
//! [`Ctx`]: its own working directory, servers of the implementation under test started
//! through `impl.toml`, and mock peers; everything is killed when the test ends.

use std::future::Future;
use std::pin::Pin as StdPin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use missive_spec::{Event, EventKind, Message, UserId};

use crate::implementation::{Feature, ImplFile, PeerInfo, Sut};
use crate::mock_peer::MockPeer;
use crate::wire::{Client, Subscription};

mod client;
mod federation;
mod keys;
mod multi;
mod precision;

/// How binding a test is: `required` tests check MUSTs, `recommended` ones SHOULDs and
/// the reference server's documented behaviour where the spec leaves room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Required,
    Recommended,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Required => "required",
            Tier::Recommended => "recommended",
        }
    }
}

pub type TestFuture = StdPin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// One conformance test.
pub struct Test {
    pub name: &'static str,
    pub ids: &'static [&'static str],
    pub tier: Tier,
    pub needs: &'static [Feature],
    pub run: fn(Ctx) -> TestFuture,
}

/// Every test, in the order they run.
pub fn all() -> Vec<Test> {
    let mut v = client::tests();
    v.extend(federation::tests());
    v.extend(keys::tests());
    v.extend(multi::tests());
    v.extend(precision::tests());
    v
}

/// How long one test may run.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a test waits for something that should happen soon.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// What a test gets: a place for its servers and the implementation to start them with.
pub struct Ctx {
    imp: Arc<ImplFile>,
    work: tempfile::TempDir,
    servers: usize,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // MISSIVE_CONFORMANCE_KEEP=1 keeps every test's servers' data and logs.
        if std::env::var_os("MISSIVE_CONFORMANCE_KEEP").is_some() {
            let dir = std::mem::replace(&mut self.work, tempfile::tempdir().expect("a temporary directory"));
            eprintln!("kept {}", dir.keep().display());
        }
    }
}

impl Ctx {
    pub fn new(imp: Arc<ImplFile>) -> anyhow::Result<Ctx> {
        Ok(Ctx { imp, work: tempfile::Builder::new().prefix("missive-conformance-").tempdir()?, servers: 0 })
    }

    /// A server of the implementation, initialised (not started).
    pub async fn init_server(&mut self) -> anyhow::Result<Sut> {
        self.servers += 1;
        let name = format!("s{}.conformance.test", self.servers);
        Sut::init(self.imp.clone(), self.work.path(), &name).await
    }

    /// A started server with no peers.
    pub async fn server(&mut self) -> anyhow::Result<Sut> {
        let mut s = self.init_server().await?;
        s.start().await?;
        Ok(s)
    }

    /// A started server that pins `peers`.
    pub async fn server_with_peers(&mut self, peers: &[PeerInfo]) -> anyhow::Result<Sut> {
        let mut s = self.init_server().await?;
        for p in peers {
            s.pin(p).await?;
        }
        s.start().await?;
        Ok(s)
    }

    /// `n` started servers, each pinning all the others.
    pub async fn federated(&mut self, n: usize) -> anyhow::Result<Vec<Sut>> {
        let mut servers = Vec::new();
        for _ in 0..n {
            servers.push(self.init_server().await?);
        }
        for a in &servers {
            for b in &servers {
                if a.name != b.name {
                    a.pin(&b.peer_info()).await?;
                }
            }
        }
        for s in &mut servers {
            s.start().await?;
        }
        Ok(servers)
    }

    /// A mock homeserver with its own key on 127.0.0.1.
    pub fn mock(&self, name: &str) -> anyhow::Result<MockPeer> {
        MockPeer::start(name, [127, 0, 0, 1].into())
    }
}

/// The mock's identity, for a server under test to pin.
pub fn mock_info(m: &MockPeer) -> PeerInfo {
    PeerInfo { name: m.name.clone(), federation: m.addr, key: m.public() }
}

/// Polls `probe` until it yields a value, failing with `what` after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The messages among `events`.
pub fn messages(events: &[Event]) -> Vec<Message> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            EventKind::Message(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// Every event of the caller's stream, by repeated `sync` from position 0.
pub async fn sync_all(c: &Client) -> anyhow::Result<Vec<Event>> {
    let mut since = 0;
    let mut out = Vec::new();
    loop {
        let page = c.sync_page(since, Some(500)).await?;
        let n = page.events.len();
        out.extend(page.events);
        if n < 500 && !page.more {
            return Ok(out);
        }
        since = page.next;
    }
}

/// Reads `sub` until `n` events arrived in all, within [`DEADLINE`].
pub async fn collect(sub: &mut Subscription, mut got: Vec<Event>, n: usize) -> anyhow::Result<Vec<Event>> {
    let wait = async {
        while got.len() < n {
            match sub.next().await? {
                Some((_, evs)) => got.extend(evs),
                None => bail!("subscription ended after {} events", got.len()),
            }
        }
        Ok(got)
    };
    tokio::time::timeout(DEADLINE, wait).await.map_err(|_| anyhow!("events did not arrive within {DEADLINE:?}"))?
}

/// The whole conversation with `with`, oldest first, paging back from the newest.
pub async fn history_all(c: &Client, with: &UserId) -> anyhow::Result<Vec<Message>> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = c.history(with, Some(200), before, None).await.context("history")?;
        out.extend(page.messages);
        match page.older {
            Some(o) => before = Some(o),
            None => break,
        }
    }
    out.reverse();
    Ok(out)
}

/// The text of a message the suite sent.
pub fn text(m: &Message) -> String {
    m.content.as_text().unwrap_or("<not text>").to_owned()
}

/// Fails unless the messages are in strictly ascending canonical order (§4.6).
pub fn check_canonical(ms: &[Message], what: &str) -> anyhow::Result<()> {
    for w in ms.windows(2) {
        if w[0].order_key() >= w[1].order_key() {
            bail!("{what}: {:?} (seq {}) listed before {:?} (seq {}), against the canonical order", text(&w[0]), w[0].seq, text(&w[1]), w[1].seq);
        }
    }
    Ok(())
}

/// Defines a [`Test`] from an `async fn(Ctx) -> anyhow::Result<()>`.
macro_rules! test {
    ($name:literal, $tier:ident, [$($id:literal),* $(,)?], [$($need:ident),* $(,)?], $f:path) => {
        $crate::suite::Test {
            name: $name,
            ids: &[$($id),*],
            tier: $crate::suite::Tier::$tier,
            needs: &[$($crate::implementation::Feature::$need),*],
            run: |ctx| Box::pin($f(ctx)),
        }
    };
}
pub(crate) use test;
