//! The client API over QUIC (spec §5): one request per bidirectional stream, answered with
//! one response frame; `subscribe` streams event frames until either side stops. A bad
//! frame gets a typed error on its own stream (`bad_frame` for the frame, `invalid_request`
//! for a known request's arguments, §5.2); the connection and the server go on.
//! A request frame must arrive within the read deadline, and request bodies being read
//! share one byte budget (`framing::BodyBudget`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use missive_federation::framing::{read_request, write_frame, BodyBudget, FrameError};
use missive_spec::codec::{self, DecodeError};
use missive_spec::{limits, ErrorCode, Request, Response, ResponseFrame, PROTOCOL_VERSION};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use crate::error::ApiError;
use crate::service::Service;

/// Counts requests in flight so shutdown can let them finish.
#[derive(Default)]
pub struct Inflight {
    n: AtomicUsize,
    idle: Notify,
}

pub struct InflightGuard(Arc<Inflight>);

impl Inflight {
    pub fn enter(self: &Arc<Self>) -> InflightGuard {
        self.n.fetch_add(1, Ordering::SeqCst);
        InflightGuard(self.clone())
    }
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.n.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// How long a stream's last frame may take to be acknowledged before it is given up.
const FINISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Events a live subscription reads in place after a wake-up; when more are waiting, the
/// rest is read as a backlog, on the blocking pool.
const LIVE_READ_EVENTS: u32 = 64;

pub struct Api {
    pub service: Arc<Service>,
    pub shutdown: watch::Receiver<bool>,
    pub inflight: Arc<Inflight>,
    pub slots: Arc<Slots>,
    /// Time a client has to deliver one request frame, among others.
    pub live: Arc<crate::limits::LiveLimits>,
    pub bodies: BodyBudget,
}

/// Connection slots, in all and per address.
pub struct Slots {
    max: usize,
    max_per_address: usize,
    used: std::sync::Mutex<(usize, std::collections::HashMap<std::net::IpAddr, usize>)>,
}

pub struct Slot(Arc<Slots>, std::net::IpAddr);

impl Slots {
    pub fn new(max: usize, max_per_address: usize) -> Arc<Slots> {
        Arc::new(Slots { max, max_per_address, used: Default::default() })
    }

    pub fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<Slot> {
        self.take_within(ip, self.max, self.max_per_address)
    }

    /// Takes a slot under limits given now (they may have changed since start-up).
    pub fn take_within(self: &Arc<Self>, ip: std::net::IpAddr, max: usize, max_per_address: usize) -> Option<Slot> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let per = used.1.get(&ip).copied().unwrap_or(0);
        if used.0 >= max || per >= max_per_address {
            return None;
        }
        used.0 += 1;
        used.1.insert(ip, per + 1);
        Some(Slot(self.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut used = self.0.used.lock().unwrap_or_else(|e| e.into_inner());
        used.0 = used.0.saturating_sub(1);
        if let Some(n) = used.1.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                used.1.remove(&self.1);
            }
        }
    }
}

fn response(res: Response) -> Vec<u8> {
    codec::encode(&ResponseFrame { v: PROTOCOL_VERSION, res })
}

fn error_frame(code: ErrorCode, message: impl Into<String>) -> Vec<u8> {
    response(Response::Error { code, message: message.into() })
}

impl Api {
    /// Accepts connections until shutdown.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => {
                        let peer = incoming.remote_address();
                        let Some(slot) = self.slots.take(peer.ip()) else {
                            tracing::warn!(%peer, "connection refused: connection limit reached");
                            incoming.refuse();
                            continue;
                        };
                        let api = self.clone();
                        tokio::spawn(async move {
                            api.connection(incoming).await;
                            drop(slot);
                        }
                        .instrument(tracing::info_span!("client", %peer)));
                    }
                    None => break,
                },
                _ = shutdown.changed() => break,
            }
        }
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "handshake failed");
                return;
            }
        };
        tracing::debug!("connected");
        let _open = crate::metrics::Held::new(&self.service.metrics.client_connections);
        self.service.sequencer.catch_up().await;
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    let api = self.clone();
                    let from = conn.remote_address().ip();
                    tokio::spawn(async move { api.stream(send, recv, from).await }.in_current_span());
                }
                Err(e) => {
                    tracing::debug!(reason = %e, "connection closed");
                    return;
                }
            }
        }
    }

    async fn stream(self: Arc<Self>, mut send: quinn::SendStream, mut recv: quinn::RecvStream, from: std::net::IpAddr) {
        let _guard = self.inflight.enter();
        if *self.shutdown.borrow() {
            let _ = write_frame(&mut send, &error_frame(ErrorCode::ShuttingDown, "server is shutting down")).await;
            self.finish(send, true).await;
            return;
        }
        let frame = match read_request(&mut recv, limits::MAX_REQUEST_FRAME, self.live.read_timeout(), &self.bodies).await {
            Ok(Some(f)) => codec::decode_request(&f.body).map_err(FrameError::Decode),
            // Finished before a frame began: no request, so no answer, and a clean end
            // rather than a reset (§5.4).
            Ok(None) => {
                let _ = send.finish();
                return;
            }
            Err(e) => Err(e),
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let (code, msg) = match &e {
                    FrameError::Decode(d @ DecodeError::TooLarge { .. }) => {
                        // Do not read the rest of an oversized frame.
                        let _ = recv.stop(0u32.into());
                        (d.code(), d.to_string())
                    }
                    FrameError::Decode(d) => (d.code(), d.to_string()),
                    FrameError::Truncated => (ErrorCode::BadFrame, e.to_string()),
                    FrameError::Timeout(_) => {
                        let _ = recv.stop(0u32.into());
                        (ErrorCode::BadFrame, e.to_string())
                    }
                    FrameError::Read(_) => return,
                };
                tracing::debug!(%code, error = %msg, "rejected frame");
                self.service.metrics.request("bad_frame", Some(code));
                let _ = write_frame(&mut send, &error_frame(code, msg)).await;
                let _ = send.finish();
                return;
            }
        };
        if let Request::Subscribe { since } = frame.req {
            let end = self.subscribe(&mut send, frame.auth, since).await;
            self.service.metrics.request("subscribe", end.as_ref().err().map(|e| e.code));
            if let Err(e) = end {
                let _ = write_frame(&mut send, &error_frame(e.code, e.message)).await;
            }
            // A subscription's last frame (`shutting_down`, `unauthorized`) must arrive.
            self.finish(send, true).await;
            return;
        }
        // Boxed: a request's future is large (every request's state), and inline it would
        // size every stream task by it, the long-lived subscriptions included.
        let res = Box::pin(self.service.handle(frame, from)).await;
        if write_frame(&mut send, &response(res)).await.is_ok() {
            self.finish(send, false).await;
        }
    }

    /// Finishes a stream. When its last frame must reach the client — always for
    /// `last_word`, and for every answer once shutdown began — waits (bounded) until the
    /// client acknowledged the stream's data, holding this request in flight: shutdown
    /// closes connections only when none is, and closing discards data not yet delivered.
    async fn finish(&self, mut send: quinn::SendStream, last_word: bool) {
        let _ = send.finish();
        if last_word || *self.shutdown.borrow() {
            let _ = tokio::time::timeout(FINISH_TIMEOUT, send.stopped()).await;
        }
    }

    /// Streams the caller's events after `since`: first one frame with the backlog (empty
    /// when there is none, so the client knows it is subscribed), then a frame whenever
    /// more are durable.
    async fn subscribe(&self, send: &mut quinn::SendStream, auth: Option<String>, since: u64) -> Result<(), ApiError> {
        let service = self.service.clone();
        let token = auth.clone();
        let caller = crate::store::blocking(move || service.authenticate(token.as_deref())).await??;
        let mut wake = self.service.hub.subscribe(caller.user.localpart());
        let mut ephemeral = self.service.hub.subscribe_ephemeral(caller.user.localpart());
        // Online while this subscription lives (the connection's keep-alives are the
        // heartbeat; a dead client's connection times out and ends it).
        self.service.presence.connected(&caller.user).await;
        struct Offline(Arc<crate::presence::Presence>, missive_spec::UserId);
        impl Drop for Offline {
            fn drop(&mut self) {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(self.0.clone().disconnected(self.1.clone()));
                }
            }
        }
        let _offline = Offline(self.service.presence.clone(), caller.user.clone());
        let _subscribed = crate::metrics::Held::new(&self.service.metrics.subscriptions);
        let mut shutdown = self.shutdown.clone();
        let mut pos = since;
        let mut first = true;
        // Reading a backlog (possibly old, on disk) rather than following live writes.
        let mut catching_up = true;
        // Whom the caller blocks: their typing and presence are dropped (§6.12). Read again
        // whenever the hub's count of wake-ups (block changes, logouts, of anyone) moved
        // since it was last read; counted before reading, so no change is missed.
        let mut blocked = std::collections::HashSet::new();
        let mut blocks_read_at: Option<u64> = None;
        loop {
            wake.borrow_and_update();
            let wakes = self.service.hub.wakes();
            let reload = blocks_read_at != Some(wakes);
            let limit = if catching_up { limits::SYNC_MAX_EVENTS } else { LIVE_READ_EVENTS };
            let read = move |service: &crate::service::Service, c: crate::service::Caller| {
                let (more, next, events) = service.events(&c.user, pos, limit)?;
                let blocked = if reload { Some(service.blocked(&c.user)?) } else { None };
                Ok::<_, ApiError>((more, next, events, blocked))
            };
            // A backlog (possibly old, on disk) and the block list (up to 10 000 rows) are
            // read on the blocking pool. Following live writes, a wake-up reads in place
            // the few events just written, which the memtable holds; more than
            // LIVE_READ_EVENTS waiting count as a backlog. Either way the token is checked
            // first: a logged-out device stops receiving at once.
            let (more, next, events, now_blocked) = if catching_up || reload {
                let (service, token) = (self.service.clone(), auth.clone());
                crate::store::blocking(move || service.read_hot(token.as_deref(), read)).await??
            } else {
                self.service.read_hot(auth.as_deref(), read)?
            };
            catching_up = more;
            if let Some(list) = now_blocked {
                blocked = list.into_iter().collect();
                blocks_read_at = Some(wakes);
            }
            if first || !events.is_empty() {
                first = false;
                pos = next;
                self.service.delivered(&events);
                if write_frame(send, &response(Response::Events { more, next, events, ephemeral: Vec::new() })).await.is_err() {
                    return Ok(());
                }
                if more {
                    continue;
                }
            }
            tokio::select! {
                changed = wake.changed() => if changed.is_err() { return Ok(()) },
                e = ephemeral.recv() => match e {
                    Ok(missive_spec::Ephemeral::Presence(p)) if blocked.contains(&p.user) => {}
                    Ok(missive_spec::Ephemeral::Typing(t)) if blocked.contains(&t.user) => {}
                    Ok(e) => {
                        let frame = Response::Events { more: false, next: pos, events: Vec::new(), ephemeral: vec![e] };
                        if write_frame(send, &response(frame)).await.is_err() {
                            return Ok(());
                        }
                    }
                    // Ephemeral updates may be dropped for a subscriber that lags.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return Ok(()),
                },
                _ = send.stopped() => return Ok(()),
                _ = shutdown.changed() => {
                    return Err(ApiError::new(ErrorCode::ShuttingDown, "server is shutting down"));
                }
            }
        }
    }
}
