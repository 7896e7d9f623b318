//! Reaching the homeserver from a profile: resolving its address, checking its key
//! against the pinned one and its name against the user's, logging in with the saved
//! session and sending the outbox. Failures that have a known cause (a changed key, a
//! federation port, another server's name) are said in words here.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use missive_cli::archive::Recorder;
use missive_cli::client::{Client, ClientError};
use missive_cli::e2ee::Crypto;
use missive_cli::outbox::Outbox;
use missive_cli::profile::{Profile, SessionFile};
use missive_spec::{Response, ServerName, UserId};
use missive_transport::tls::Pin;
use missive_transport::PublicKey;

static CONNECT_TIMEOUT: OnceLock<Duration> = OnceLock::new();

/// How long every connection attempt of this process waits for the server (set once).
pub fn set_timeout(timeout: Duration) {
    let _ = CONNECT_TIMEOUT.set(timeout);
}

async fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("cannot resolve {server} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| anyhow!("{server} resolves to no address"))
}

fn key_changed(server: &ServerName, pinned: &PublicKey, presented: &PublicKey, profile: &Profile) -> anyhow::Error {
    anyhow!(
        "\n@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
         @   WARNING: THE KEY OF SERVER {server} HAS CHANGED!\n\
         @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
         Someone may be impersonating the server, or its operator replaced the key.\n\
         pinned:    {pinned} ({})\n\
         presented: {presented} ({})\n\
         Refusing to connect. If the operator confirms the new key, remove \"{server}\" from\n\
         {}/known_servers.json and log in again.",
        pinned.fingerprint(),
        presented.fingerprint(),
        profile.dir().display()
    )
}

/// Connects to the server of `user` at `addr`, checking the pinned key.
pub async fn connect(profile: &Profile, user: &UserId, addr: &str) -> anyhow::Result<Client> {
    let server = user.server_name();
    let sock = resolve(addr).await?;
    let pinned = profile.pinned(&server)?;
    let pin = pinned.map(Pin::Key).unwrap_or(Pin::FirstUse);
    let timeout = *CONNECT_TIMEOUT.get_or_init(|| missive_cli::client::DEFAULT_CONNECT_TIMEOUT);
    match Client::connect_within(sock, &server, pin, timeout).await {
        Ok(c) => Ok(c),
        Err(ClientError::KeyMismatch { pinned, presented }) => {
            // The operator may have rotated the key: follow it only if the pinned key
            // signed the hand-over (CLI-TLS-5); anything else is the loud warning.
            match follow_rotation(sock, &server, &pinned, &presented, timeout).await {
                Ok(()) => {
                    profile.pin(&server, &presented)?;
                    eprintln!("missive: {server} rotated its key, signed by the key pinned before; now pinned: {}", presented.fingerprint());
                    Client::connect_within(sock, &server, Pin::Key(*presented), timeout).await.map_err(Into::into)
                }
                Err(_) => Err(key_changed(&server, &pinned, &presented, profile)),
            }
        }
        Err(ClientError::Connect { reason, .. }) if refused_our_protocol(&reason) => Err(anyhow!(
            "{addr} is a QUIC server that does not speak the Missive client protocol (it refused the client ALPN): \
             is it a homeserver's federation port? The client port is `[client] listen` in missived.toml (7450 by default)"
        )),
        Err(e) => Err(e.into()),
    }
}

/// Asks the server presenting `presented`, over a connection that accepts that key for
/// this one request, for its rotation chain, and checks it leads from `pinned` there.
async fn follow_rotation(sock: SocketAddr, server: &ServerName, pinned: &PublicKey, presented: &PublicKey, timeout: Duration) -> anyhow::Result<()> {
    let c = Client::connect_within(sock, server, Pin::Key(*presented), timeout).await?;
    let answer = c.keys().await;
    c.close().await;
    let (current, chain) = answer?;
    if PublicKey::parse(&current)? != *presented {
        bail!("the server's keys answer names another key than it presented");
    }
    missive_transport::rotation::follow(server, pinned, presented, &chain)?;
    Ok(())
}

/// Whether the handshake failed because the server offers none of our application
/// protocols: the TLS alert `no_application_protocol` (120), which a Missive federation
/// listener sends to a client that offers the client ALPN.
fn refused_our_protocol(reason: &str) -> bool {
    const NO_APPLICATION_PROTOCOL: u8 = 120;
    let code = quinn::TransportErrorCode::crypto(NO_APPLICATION_PROTOCOL).to_string();
    reason.match_indices(&code).any(|(i, m)| !reason[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// Refuses, before any password is sent, a server whose name is not the one in `user`.
pub async fn check_server_name(c: &Client, user: &UserId, addr: &str) -> anyhow::Result<()> {
    let expected = user.server_name();
    match c.info().await? {
        Response::Info { server_name, .. } if server_name == expected => Ok(()),
        Response::Info { server_name, .. } => bail!(
            "the server at {addr} is {server_name}, but {user} belongs to {expected}: the server names differ. \
             Log in as @{}:{server_name}, or give --server the address of {expected}'s homeserver",
            user.localpart()
        ),
        other => bail!("the server at {addr} answered info with {other:?}"),
    }
}

/// True when the error means the server was not reached at all.
pub fn unreachable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ClientError>().is_some_and(|c| c.is_unreachable())
}

/// Connects with the saved session and first sends whatever waits in the outbox.
pub async fn session_client(profile: &Profile) -> anyhow::Result<(Client, SessionFile)> {
    let (c, s, _) = session_client_flushed(profile).await?;
    Ok((c, s))
}

/// Like [`session_client`]; also returns how many outbox messages still wait.
pub async fn session_client_flushed(profile: &Profile) -> anyhow::Result<(Client, SessionFile, usize)> {
    let s = profile.require_session()?;
    if profile.pinned(&s.user.server_name())?.is_none() {
        bail!("no pinned key for {}; log in again", s.user.server_name());
    }
    let mut c = connect(profile, &s.user, &s.server).await?;
    c.set_token(Some(s.token.clone()));
    let waiting = flush_outbox(profile, &c).await?;
    Ok((c, s, waiting))
}

/// The logged-in device's key store.
pub fn crypto(profile: &Profile, s: &SessionFile) -> anyhow::Result<Crypto> {
    Crypto::open(profile, &s.user, &s.device)
}

/// Says on standard error what the key store noticed (a peer's new or changed device).
pub fn say_notices(crypto: &mut Crypto) {
    for n in crypto.take_notices() {
        eprintln!("missive: {n}");
    }
}

/// Sends the outbox in order; reports on standard error. Returns how many still wait.
async fn flush_outbox(profile: &Profile, c: &Client) -> anyhow::Result<usize> {
    let outbox = Outbox::open(profile.dir())?;
    if outbox.is_empty()? {
        return Ok(0);
    }
    let s = profile.require_session()?;
    let mut crypto = Crypto::open(profile, &s.user, &s.device)?;
    let f = outbox.flush(c, &mut crypto).await;
    say_notices(&mut crypto);
    let f = f?;
    Recorder::new(profile).record_all(&f.sent);
    if !f.sent.is_empty() {
        eprintln!("sent {} message(s) from the outbox", f.sent.len());
    }
    for (q, why) in &f.failed {
        eprintln!("missive: the server refused a queued message to {}: {why} (`missive outbox` lists it; `missive outbox retry ID` or `drop ID`)", q.to);
    }
    Ok(f.waiting)
}
