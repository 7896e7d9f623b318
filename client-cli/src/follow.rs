//! Following the live event stream across server restarts: the one reconnect loop of
//! `listen` and `chat`. [`Follow::next`] connects with the saved session (sending the
//! outbox first), subscribes from the saved position, hands over each frame, and when the
//! connection goes away reconnects at once, then with backoff while the server stays
//! unreachable. The caller decides what to print and whether to save the position.

use std::future::Future;
use std::time::Duration;

use anyhow::bail;
use missive_cli::client::{Client, ClientError, Frame};
use missive_cli::profile::{Profile, SessionFile};
use missive_cli::Subscription;
use missive_core::backoff::Backoff;
use tokio::time::Instant;

use crate::connect::{session_client, unreachable};

/// What happened next while following.
pub enum Next<T> {
    /// Connected (again) with the saved session; the subscription opens on the next call.
    Connected(Client),
    /// A frame of the subscription; the first after [`Next::Connected`] holds the backlog
    /// from the saved position.
    Frame(Client, Frame),
    /// The caller's other input arrived (connected or not).
    Input(T),
    /// The server could not be reached; the next attempt goes after `Duration`.
    Unreachable(Duration),
    /// The connection went away; the next call reconnects.
    Lost(String),
    /// Ctrl-C.
    Interrupted,
}

enum State {
    /// Not connected: try at once (`None`) or after the backoff delay.
    Offline(Option<Instant>),
    Connected(Client, SessionFile),
    Subscribed(Client, SessionFile, Subscription),
    /// Lost, to be reported by the next call.
    Lost(String),
}

pub struct Follow<'p> {
    profile: &'p Profile,
    backoff: Backoff,
    state: State,
}

/// Reconnect delays: the project's backoff, doubling from 250 ms to at most 5 s, with
/// jitter so that many clients do not return to a restarted server at the same instant.
fn reconnect_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(250), Duration::from_secs(5))
}

/// How long to wait before the next connection attempt.
fn next_delay(b: &mut Backoff) -> Duration {
    use rand::Rng;
    let now = std::time::Instant::now();
    b.failure(now, rand::thread_rng().gen()).saturating_duration_since(now)
}

/// A subscription frame, or why the connection is gone (`Err(reason)`: reconnect). A
/// revoked token is fatal.
fn frame_or_lost(r: Result<Option<Frame>, ClientError>) -> anyhow::Result<Result<Frame, String>> {
    match r {
        Ok(Some(f)) => Ok(Ok(f)),
        Ok(None) => Ok(Err("the server ended the subscription".to_owned())),
        Err(ClientError::Server { code: missive_spec::ErrorCode::Unauthorized, message }) => bail!("unauthorized: {message}"),
        Err(e) => Ok(Err(e.to_string())),
    }
}

impl<'p> Follow<'p> {
    pub fn new(profile: &'p Profile) -> Follow<'p> {
        Follow { profile, backoff: reconnect_backoff(), state: State::Offline(None) }
    }

    /// The session the connection speaks for, while connected.
    pub fn session(&self) -> Option<&SessionFile> {
        match &self.state {
            State::Connected(_, s) | State::Subscribed(_, s, _) => Some(s),
            State::Offline(_) | State::Lost(_) => None,
        }
    }

    /// The connection, while there is one.
    pub fn client(&self) -> Option<&Client> {
        match &self.state {
            State::Connected(c, _) | State::Subscribed(c, _, _) => Some(c),
            State::Offline(_) | State::Lost(_) => None,
        }
    }

    /// Remembers that everything up to `next` was handled: the next subscription, in this
    /// process or the next one, starts there.
    pub fn save_position(&mut self, next: u64) -> anyhow::Result<()> {
        if let State::Connected(_, s) | State::Subscribed(_, s, _) = &mut self.state {
            if next != s.sync_pos {
                s.sync_pos = next;
                self.profile.save_session(s)?;
            }
        }
        Ok(())
    }

    /// The caller found the connection gone (a request failed): the next call reports it
    /// and reconnects.
    pub fn lost(&mut self, reason: String) {
        self.state = State::Lost(reason);
    }

    /// Closes the connection politely, if there is one.
    pub async fn close(&mut self) {
        if let State::Connected(c, _) | State::Subscribed(c, _, _) = std::mem::replace(&mut self.state, State::Offline(None)) {
            c.close().await;
        }
    }

    /// Waits for what happens next: a frame, `input` (a cancel-safe future: it is dropped
    /// when something else happens first), Ctrl-C, or a change of connection. Errors are
    /// fatal: a refused session, a revoked token, a failed subscription.
    pub async fn next<T>(&mut self, input: impl Future<Output = T>) -> anyhow::Result<Next<T>> {
        tokio::pin!(input);
        loop {
            match &mut self.state {
                State::Offline(None) => match session_client(self.profile).await {
                    Ok((c, s)) => {
                        self.backoff.reset();
                        self.state = State::Connected(c.clone(), s);
                        return Ok(Next::Connected(c));
                    }
                    Err(e) if unreachable(&e) => {
                        let delay = next_delay(&mut self.backoff);
                        self.state = State::Offline(Some(Instant::now() + delay));
                        return Ok(Next::Unreachable(delay));
                    }
                    Err(e) => return Err(e),
                },
                State::Offline(Some(at)) => {
                    let at = *at;
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => self.state = State::Offline(None),
                        x = &mut input => return Ok(Next::Input(x)),
                        _ = tokio::signal::ctrl_c() => return Ok(Next::Interrupted),
                    }
                }
                State::Connected(..) => {
                    let State::Connected(c, s) = std::mem::replace(&mut self.state, State::Offline(None)) else { continue };
                    let (sub, next, events) = c.subscribe(s.sync_pos).await?;
                    let handle = c.clone();
                    self.state = State::Subscribed(c, s, sub);
                    return Ok(Next::Frame(handle, Frame { next, events, ephemeral: Vec::new() }));
                }
                State::Subscribed(c, _, sub) => {
                    tokio::select! {
                        frame = sub.next_frame() => match frame_or_lost(frame)? {
                            Ok(f) => return Ok(Next::Frame(c.clone(), f)),
                            Err(lost) => {
                                self.state = State::Offline(None);
                                return Ok(Next::Lost(lost));
                            }
                        },
                        x = &mut input => return Ok(Next::Input(x)),
                        _ = tokio::signal::ctrl_c() => return Ok(Next::Interrupted),
                    }
                }
                State::Lost(reason) => {
                    let reason = std::mem::take(reason);
                    self.state = State::Offline(None);
                    return Ok(Next::Lost(reason));
                }
            }
        }
    }
}
