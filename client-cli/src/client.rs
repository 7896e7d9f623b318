//! A client of the Missive client protocol (spec §5, §6) over QUIC.

use std::net::SocketAddr;

use missive_transport::framing::{read_frame, write_frame, FrameError};
use missive_transport::tls::{self, Pin, PinnedServerVerifier};
use missive_transport::PublicKey;
use missive_spec::wire::CLIENT_ALPN;
use missive_spec::{
    codec, limits, ClientMsgId, Content, ConversationSummary, Cursor, DeviceId, DeviceInfo, ErrorCode, Event, Message, ReceiptKind, Request,
    RequestFrame, Response, ResponseFrame, ServerName, Undeliverable, UserId, Watermark, PROTOCOL_VERSION,
};
use rand::RngCore;

/// Why a request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("server key changed: pinned {pinned}, server presented {presented}")]
    KeyMismatch { pinned: Box<PublicKey>, presented: Box<PublicKey> },
    #[error("{code}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("connection lost: {0}")]
    Connection(String),
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
}

impl ClientError {
    /// True when the server was not reached at all (nothing could have been sent).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Connect { .. })
    }
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> ClientError {
        match e {
            FrameError::Read(r) => ClientError::Connection(r.to_string()),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

/// A QUIC connection to one homeserver, optionally logged in as a device. Clones share the
/// connection; [`Client::as_device`] gives a handle that speaks for another device over it.
#[derive(Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    token: Option<String>,
    server_key: PublicKey,
}

/// A live event subscription (spec §6.5).
pub struct Subscription {
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Subscription {
    /// The next frame of stored events; ephemeral updates are dropped (see
    /// [`Subscription::next_frame`]). `Ok(None)` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<(u64, Vec<Event>)>, ClientError> {
        loop {
            match self.next_frame().await? {
                Some(f) if f.events.is_empty() && !f.ephemeral.is_empty() => continue,
                Some(f) => return Ok(Some((f.next, f.events))),
                None => return Ok(None),
            }
        }
    }

    /// The next frame: stored events and ephemeral updates (presence, typing).
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        let Some(body) = read_frame(&mut self.recv, limits::MAX_RESPONSE_FRAME).await? else {
            return Ok(None);
        };
        match decode_response(&body)? {
            Response::Events { next, events, ephemeral, .. } => Ok(Some(Frame { next, events, ephemeral })),
            Response::Error { code, message } => Err(ClientError::Server { code, message }),
            other => Err(ClientError::Protocol(format!("unexpected frame on subscription: {other:?}"))),
        }
    }
}

/// One answer to `sync`.
#[derive(Debug, Clone)]
pub struct SyncPage {
    /// The server stopped before the end of the stream: ask again from `next`.
    pub more: bool,
    pub next: u64,
    pub events: Vec<Event>,
}

fn decode_response(body: &[u8]) -> Result<Response, ClientError> {
    let f: ResponseFrame = codec::decode(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if f.v != PROTOCOL_VERSION {
        return Err(ClientError::Protocol(format!("response version {}", f.v)));
    }
    Ok(f.res)
}

fn unexpected(r: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {r:?}"))
}

/// How long [`Client::connect`] waits for a server to answer.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A fresh random client message id.
pub fn new_client_msg_id() -> ClientMsgId {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    ClientMsgId(b)
}

/// One subscription frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub next: u64,
    pub events: Vec<Event>,
    pub ephemeral: Vec<missive_spec::Ephemeral>,
}

/// A page of history, newest first, with cursors to move on and the receipt watermarks
/// that give each message its state.
#[derive(Debug, Clone)]
pub struct Page {
    pub messages: Vec<Message>,
    pub older: Option<Cursor>,
    pub newer: Option<Cursor>,
    /// The other user's read and delivered watermarks.
    pub read: Option<Watermark>,
    pub delivered: Option<Watermark>,
    /// The caller's own read position (highest of their devices).
    pub seen: Option<Watermark>,
    /// The caller's own messages on the page that the recipient's server refused.
    pub failed: Vec<Undeliverable>,
}

impl Page {
    /// Why the recipient's server refused `m`, if it did.
    pub fn failure(&self, m: &Message) -> Option<&str> {
        self.failed.iter().find(|u| u.conv == m.conv && u.origin == m.origin && u.seq == m.seq).map(|u| u.reason.as_str())
    }

    /// The state of one of the caller's own messages on this page: failed (§10.5), or as
    /// the watermarks say (§10.3).
    pub fn state(&self, m: &Message) -> &'static str {
        match self.failure(m) {
            Some(_) => "failed",
            None => message_state(m, &self.read, &self.delivered),
        }
    }
}

/// The state of one of the caller's own messages (§10.3).
pub fn message_state(m: &Message, read: &Option<Watermark>, delivered: &Option<Watermark>) -> &'static str {
    let key = Watermark(m.order_key());
    if read.as_ref().is_some_and(|r| *r >= key) {
        "read"
    } else if delivered.as_ref().is_some_and(|d| *d >= key) {
        "delivered"
    } else {
        "sent"
    }
}

impl Client {
    /// Connects and checks the server's key against `pin`, giving up after
    /// [`DEFAULT_CONNECT_TIMEOUT`].
    pub async fn connect(addr: SocketAddr, server: &ServerName, pin: Pin) -> Result<Client, ClientError> {
        Self::connect_within(addr, server, pin, DEFAULT_CONNECT_TIMEOUT).await
    }

    /// Connects, failing with [`ClientError::Connect`] if the handshake takes longer than
    /// `timeout` (a server that is down does not answer at all).
    pub async fn connect_within(
        addr: SocketAddr,
        server: &ServerName,
        pin: Pin,
        timeout: std::time::Duration,
    ) -> Result<Client, ClientError> {
        tls::install_provider();
        let cerr = |reason: String| ClientError::Connect { addr, reason };
        let bind: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| cerr(e.to_string()))?;
        let verifier = PinnedServerVerifier::new(pin.clone());
        endpoint.set_default_client_config(tls::client_config(verifier.clone(), CLIENT_ALPN).map_err(|e| cerr(e.to_string()))?);
        let connecting = endpoint.connect(addr, server.as_str()).map_err(|e| cerr(e.to_string()))?;
        let result = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| cerr(format!("no answer within {timeout:?}")))?;
        match result {
            Ok(conn) => {
                let server_key = verifier.seen().ok_or_else(|| cerr("server presented no key".into()))?;
                Ok(Client { endpoint, conn, token: None, server_key })
            }
            Err(e) => match (pin, verifier.seen()) {
                (Pin::Key(pinned), Some(presented)) if pinned != presented => {
                    Err(ClientError::KeyMismatch { pinned: Box::new(pinned), presented: Box::new(presented) })
                }
                _ => Err(cerr(e.to_string())),
            },
        }
    }

    /// The QUIC connection, for callers that speak the framing themselves.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The key the server presented (pinned or first seen).
    pub fn server_key(&self) -> PublicKey {
        self.server_key
    }

    /// A handle on the same connection whose requests carry `token` (requests are
    /// authenticated one by one, so many devices can share a connection).
    pub fn as_device(&self, token: Option<String>) -> Client {
        Client { token, ..self.clone() }
    }

    /// The access token requests carry, if logged in.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn set_token(&mut self, token: Option<String>) {
        self.token = token;
    }

    /// Sends one request on its own stream and returns the response; error frames become
    /// [`ClientError::Server`].
    pub async fn request(&self, req: Request) -> Result<Response, ClientError> {
        let frame = RequestFrame { v: PROTOCOL_VERSION, req, auth: self.token.clone() };
        let body = self.raw(&codec::frame(&codec::encode(&frame))).await?;
        match decode_response(&body)? {
            Response::Error { code, message } => Err(ClientError::Server { code, message }),
            r => Ok(r),
        }
    }

    /// Writes `bytes` as-is on a new stream and returns the body of the response frame.
    pub async fn raw(&self, bytes: &[u8]) -> Result<Vec<u8>, ClientError> {
        let lost = |e: String| ClientError::Connection(e);
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
        // The server may stop reading early (an oversized frame) and still answer: read
        // the response whatever became of the write.
        let written = send.write_all(bytes).await;
        let _ = send.finish();
        if let Err(quinn::WriteError::ConnectionLost(e)) = written {
            return Err(lost(e.to_string()));
        }
        read_frame(&mut recv, limits::MAX_RESPONSE_FRAME)
            .await?
            .ok_or_else(|| ClientError::Protocol("stream ended without a response".into()))
    }

    /// §6.13: the server's current key and rotation chain.
    pub async fn keys(&self) -> Result<(String, Vec<missive_spec::rotation::SignedRotation>), ClientError> {
        match self.request(Request::Keys {}).await? {
            Response::Keys { current, rotations } => Ok((current, rotations)),
            r => Err(unexpected(r)),
        }
    }

    /// E3.1: publishes this device's keys; how many one-time keys the server holds, and
    /// whether it holds a fallback key.
    pub async fn keys_upload(
        &self,
        keys: Option<missive_spec::e2ee::DeviceKeys>,
        fallback: Option<missive_spec::e2ee::OneTimeKey>,
        one_time: Vec<missive_spec::e2ee::OneTimeKey>,
    ) -> Result<(u32, bool), ClientError> {
        match self.request(Request::KeysUpload { keys, fallback, one_time }).await? {
            Response::KeyCount { one_time, fallback } => Ok((one_time, fallback)),
            r => Err(unexpected(r)),
        }
    }

    /// E3.2: the device keys of `user`'s devices.
    pub async fn keys_query(&self, user: &UserId) -> Result<Vec<missive_spec::e2ee::DeviceKeys>, ClientError> {
        match self.request(Request::KeysQuery { user: user.clone() }).await? {
            Response::DeviceKeys { devices, .. } => Ok(devices),
            r => Err(unexpected(r)),
        }
    }

    /// E3.3: one key of each of `devices` of `user`.
    pub async fn keys_claim(&self, user: &UserId, devices: Vec<DeviceId>) -> Result<Vec<missive_spec::e2ee::ClaimedKey>, ClientError> {
        match self.request(Request::KeysClaim { user: user.clone(), devices }).await? {
            Response::Claimed { keys } => Ok(keys),
            r => Err(unexpected(r)),
        }
    }

    pub async fn info(&self) -> Result<Response, ClientError> {
        self.request(Request::Info {}).await
    }

    /// Logs in; on success the client uses the new device's token.
    pub async fn login(&mut self, user: &UserId, password: &str, device_name: Option<String>) -> Result<Session, ClientError> {
        let r = self.request(Request::Login { user: user.clone(), password: password.into(), device_name }).await?;
        self.take_session(r)
    }

    pub async fn register(
        &mut self,
        user: &UserId,
        password: &str,
        token: Option<String>,
        device_name: Option<String>,
    ) -> Result<Session, ClientError> {
        let r = self
            .request(Request::Register { user: user.clone(), token, password: password.into(), device_name })
            .await?;
        self.take_session(r)
    }

    fn take_session(&mut self, r: Response) -> Result<Session, ClientError> {
        match r {
            Response::Session { user, token, device } => {
                self.token = Some(token.clone());
                Ok(Session { user, token, device: device.to_string() })
            }
            r => Err(unexpected(r)),
        }
    }

    pub async fn logout(&self) -> Result<(), ClientError> {
        match self.request(Request::Logout {}).await? {
            Response::Ok {} => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    pub async fn send(&self, to: &UserId, content: Content, client_msg_id: ClientMsgId) -> Result<Message, ClientError> {
        match self.request(Request::Send { to: to.clone(), content, client_msg_id }).await? {
            Response::Sent { message } => Ok(message),
            r => Err(unexpected(r)),
        }
    }

    pub async fn send_text(&self, to: &UserId, text: &str) -> Result<Message, ClientError> {
        self.send(to, Content::text(text), new_client_msg_id()).await
    }

    pub async fn history(
        &self,
        with: &UserId,
        limit: Option<u32>,
        before: Option<Cursor>,
        after: Option<Cursor>,
    ) -> Result<Page, ClientError> {
        match self.request(Request::History { with: with.clone(), after, limit, before }).await? {
            Response::Page { read, seen, newer, older, failed, messages, delivered } => {
                Ok(Page { messages, older, newer, read, delivered, seen, failed })
            }
            r => Err(unexpected(r)),
        }
    }

    /// Says that this user has `kind` everything up to `up_to` in the conversation with `with`.
    pub async fn receipt(&self, with: &UserId, kind: ReceiptKind, up_to: Watermark) -> Result<(), ClientError> {
        match self.request(Request::Receipt { kind, with: with.clone(), up_to }).await? {
            Response::Ok {} => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// Whether `user` is online, or when last seen (only for users one has a conversation with).
    pub async fn presence(&self, user: &UserId) -> Result<missive_spec::PresenceUpdate, ClientError> {
        match self.request(Request::Presence { user: user.clone() }).await? {
            Response::Presence { user, online, last_seen } => Ok(missive_spec::PresenceUpdate { user, online, last_seen }),
            r => Err(unexpected(r)),
        }
    }

    pub async fn set_hide_last_seen(&self, hide: bool) -> Result<(), ClientError> {
        match self.request(Request::Settings { hide_last_seen: hide }).await? {
            Response::Ok {} => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    pub async fn typing(&self, with: &UserId) -> Result<(), ClientError> {
        match self.request(Request::Typing { with: with.clone() }).await? {
            Response::Ok {} => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// One page of the caller's conversations, most recently active first (§6.10), and
    /// the cursor of the next page if there is one.
    pub async fn conversations(&self, limit: Option<u32>, before: Option<Cursor>) -> Result<(Vec<ConversationSummary>, Option<Cursor>), ClientError> {
        match self.request(Request::Conversations { limit, before }).await? {
            Response::Conversations { older, conversations } => Ok((conversations, older)),
            r => Err(unexpected(r)),
        }
    }

    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        match self.request(Request::Devices {}).await? {
            Response::Devices { devices } => Ok(devices),
            r => Err(unexpected(r)),
        }
    }

    /// §6.11: sets a new password; with `logout_others`, every other device is revoked.
    pub async fn change_password(&self, old_password: &str, new_password: &str, logout_others: bool) -> Result<(), ClientError> {
        let req = Request::ChangePassword { old_password: old_password.to_owned(), new_password: new_password.to_owned(), logout_others };
        match self.request(req).await? {
            Response::Ok {} => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// §6.12: starts (`on`) or ends a block of `user`.
    pub async fn block(&self, user: &UserId, on: bool) -> Result<(), ClientError> {
        let req = if on { Request::Block { user: user.clone() } } else { Request::Unblock { user: user.clone() } };
        match self.request(req).await? {
            Response::Ok {} => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// §6.12: whom this account blocks.
    pub async fn blocked(&self) -> Result<Vec<UserId>, ClientError> {
        match self.request(Request::Blocked {}).await? {
            Response::Blocked { users } => Ok(users),
            r => Err(unexpected(r)),
        }
    }

    pub async fn revoke_device(&self, device: DeviceId) -> Result<(), ClientError> {
        match self.request(Request::RevokeDevice { device }).await? {
            Response::Ok {} => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    pub async fn sync(&self, since: u64, limit: Option<u32>) -> Result<(u64, Vec<Event>), ClientError> {
        self.sync_page(since, limit).await.map(|p| (p.next, p.events))
    }

    /// One `sync` answer; ask again from `next` while `more` is true (§6.5).
    pub async fn sync_page(&self, since: u64, limit: Option<u32>) -> Result<SyncPage, ClientError> {
        match self.request(Request::Sync { limit, since }).await? {
            Response::Events { more, next, events, .. } => Ok(SyncPage { more, next, events }),
            r => Err(unexpected(r)),
        }
    }

    /// Opens a subscription; the first frame (backlog, possibly empty) is already read.
    /// The subscription also makes this device count as online (spec §12).
    pub async fn subscribe(&self, since: u64) -> Result<(Subscription, u64, Vec<Event>), ClientError> {
        let frame = RequestFrame { v: PROTOCOL_VERSION, req: Request::Subscribe { since }, auth: self.token.clone() };
        let (mut send, recv) = self.conn.open_bi().await.map_err(|e| ClientError::Connection(e.to_string()))?;
        write_frame(&mut send, &codec::encode(&frame)).await.map_err(|e| ClientError::Connection(e.to_string()))?;
        let mut sub = Subscription { _send: send, recv };
        match sub.next().await? {
            Some((next, events)) => Ok((sub, next, events)),
            None => Err(ClientError::Protocol("subscription ended at once".into())),
        }
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

/// A logged-in device.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: UserId,
    pub token: String,
    pub device: String,
}
