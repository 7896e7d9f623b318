//! The suite's own client of the Missive client protocol (spec §5, §6): QUIC and TLS 1.3
//! with the server's key pinned ([`pin`]), length-prefixed frames ([`framing`]), one
//! stream per request and long-lived subscription streams. It shares only the wire types
//! and their CBOR codec with the server under test (`missive-spec`), nothing of the
//! `missive` client or of the reference server's transport, so that a misreading of the
//! spec shared by the reference client and server still shows as a failure here.
//!
//! [`Client`] is one connection, optionally speaking for a device; [`Subscription`] is a
//! live event stream.

pub mod framing;
pub mod pin;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::VerifyingKey;
use missive_spec::{
    codec, ClientMsgId, Content, ConversationSummary, Cursor, DeviceId, DeviceInfo, Ephemeral, ErrorCode, Event, Message, PresenceUpdate,
    ReceiptKind, Request, RequestFrame, Response, ResponseFrame, ServerName, UserId, Watermark, PROTOCOL_VERSION,
};
use rand::RngCore;

use framing::{FrameError, MAX_RESPONSE_BODY};
pub use pin::Pin;
use pin::ServerKeyCheck;

/// The client protocol's ALPN (§5.1).
pub const ALPN: &[u8] = b"missive-client/0";
/// How long [`Client::connect`] waits for the handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Keep-alive interval (§5.4: clients PING every 3 s) ...
const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// ... and how long a silent server may take before the connection counts as lost.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to finish a request's stream after its response frame.
const FINISH_WAIT: Duration = Duration::from_secs(5);

/// Why a request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("server key changed: pinned {}, server presented {}", key_text(pinned), key_text(presented))]
    KeyMismatch { pinned: Box<VerifyingKey>, presented: Box<VerifyingKey> },
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

    /// The server's error code, for an error answer.
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

/// A key in its textual form (§5.1): `ed25519:` and the key bytes in unpadded base64url.
pub fn key_text(k: &VerifyingKey) -> String {
    format!("ed25519:{}", URL_SAFE_NO_PAD.encode(k.as_bytes()))
}

/// The key of a textual form (§5.1), if it is one.
pub fn parse_key_text(s: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = URL_SAFE_NO_PAD.decode(s.strip_prefix("ed25519:")?).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// A fresh random client message id (§2.4: 128 random bits).
pub fn new_client_msg_id() -> ClientMsgId {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    ClientMsgId(b)
}

/// QUIC client configuration: TLS 1.3 only, the client ALPN, the server checked by
/// `check`. The server opens no streams; a response frame always fits a stream's window.
fn quic_config(check: Arc<ServerKeyCheck>) -> Result<quinn::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(check)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(|e: quinn::VarIntBoundsExceeded| e.to_string())?));
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_concurrent_bidi_streams(0u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.stream_receive_window(((MAX_RESPONSE_BODY + 64 * 1024) as u32).into());
    transport.receive_window((16u32 * 1024 * 1024).into());
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// A client endpoint (one UDP socket) of the address family of `addr`.
pub fn client_endpoint(addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    quinn::Endpoint::client(bind)
}

/// A QUIC connection to one homeserver, optionally speaking for a device. Clones share the
/// connection; [`Client::as_device`] gives a handle that speaks for another device over it
/// (requests are authenticated one by one, §5.3).
#[derive(Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    token: Option<String>,
    server_key: VerifyingKey,
}

/// A logged-in device.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: UserId,
    pub token: String,
    pub device: String,
}

/// One answer to `sync`.
#[derive(Debug, Clone)]
pub struct SyncPage {
    /// The server stopped before the end of the stream: ask again from `next`.
    pub more: bool,
    pub next: u64,
    pub events: Vec<Event>,
}

/// A page of history, newest first, with cursors to move on and the receipt watermarks.
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
    pub failed: Vec<missive_spec::Undeliverable>,
}

/// One subscription frame: stored events and ephemeral updates.
#[derive(Debug, Clone)]
pub struct Frame {
    pub next: u64,
    pub events: Vec<Event>,
    pub ephemeral: Vec<Ephemeral>,
}

/// A live event subscription (§6.5). Dropping it ends the subscription.
pub struct Subscription {
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Subscription {
    /// The next frame of stored events; frames of only ephemeral updates are skipped (see
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

    /// The next frame; an error frame (`unauthorized` after logout, `shutting_down`)
    /// becomes [`ClientError::Server`].
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        let Some(body) = framing::read_frame(&mut self.recv, MAX_RESPONSE_BODY).await? else {
            return Ok(None);
        };
        match decode_response(&body)? {
            Response::Events { next, events, ephemeral, .. } => Ok(Some(Frame { next, events, ephemeral })),
            Response::Error { code, message } => Err(ClientError::Server { code, message }),
            other => Err(ClientError::Protocol(format!("unexpected frame on a subscription: {other:?}"))),
        }
    }
}

/// A response body as a version-0 response (§5.3).
fn decode_response(body: &[u8]) -> Result<Response, ClientError> {
    let f: ResponseFrame = codec::decode(body).map_err(|e| ClientError::Protocol(format!("undecodable response frame: {e}")))?;
    if f.v != PROTOCOL_VERSION {
        return Err(ClientError::Protocol(format!("response frame of version {}", f.v)));
    }
    Ok(f.res)
}

fn unexpected(r: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {r:?}"))
}

fn expect_ok(r: Response) -> Result<(), ClientError> {
    match r {
        Response::Ok {} => Ok(()),
        r => Err(unexpected(r)),
    }
}

impl Client {
    /// Connects with the server's key pinned, giving up after [`DEFAULT_CONNECT_TIMEOUT`].
    pub async fn connect(addr: SocketAddr, server: &ServerName, pin: impl Into<Pin>) -> Result<Client, ClientError> {
        Self::connect_within(addr, server, pin, DEFAULT_CONNECT_TIMEOUT).await
    }

    /// Connects, failing with [`ClientError::Connect`] if the handshake takes longer than
    /// `timeout` (a server that is down does not answer at all), and with
    /// [`ClientError::KeyMismatch`] if the server presents another key than the pin.
    pub async fn connect_within(addr: SocketAddr, server: &ServerName, pin: impl Into<Pin>, timeout: Duration) -> Result<Client, ClientError> {
        let endpoint = client_endpoint(addr).map_err(|e| ClientError::Connect { addr, reason: e.to_string() })?;
        Self::connect_via(&endpoint, addr, server, pin, timeout).await
    }

    /// Connects through `endpoint`, which other connections may share: the load
    /// generator opens tens of thousands of connections over a few UDP sockets.
    pub async fn connect_via(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server: &ServerName,
        pin: impl Into<Pin>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let pin = pin.into();
        let cerr = |reason: String| ClientError::Connect { addr, reason };
        let check = Arc::new(ServerKeyCheck::new(pin));
        let endpoint = endpoint.clone();
        let connecting = endpoint.connect_with(quic_config(check.clone()).map_err(cerr)?, addr, server.as_str()).map_err(|e| cerr(e.to_string()))?;
        let result = tokio::time::timeout(timeout, connecting).await.map_err(|_| cerr(format!("no answer within {timeout:?}")))?;
        match (result, pin, check.seen()) {
            (Ok(conn), _, Some(server_key)) => Ok(Client { endpoint, conn, token: None, server_key }),
            (Ok(_), _, None) => Err(cerr("the handshake ended without a server key".into())),
            (Err(_), Pin::Key(pinned), Some(presented)) if pinned != presented => Err(ClientError::KeyMismatch { pinned: Box::new(pinned), presented: Box::new(presented) }),
            (Err(e), _, _) => Err(cerr(e.to_string())),
        }
    }

    /// The key the server presented.
    pub fn server_key(&self) -> VerifyingKey {
        self.server_key
    }

    /// The QUIC connection, for tests that open streams by hand.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// A handle on the same connection whose requests carry `token`.
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
    /// [`ClientError::Server`]. The request is not held to the request size limit, so that
    /// tests can cross it.
    pub async fn request(&self, req: Request) -> Result<Response, ClientError> {
        let frame = RequestFrame { v: PROTOCOL_VERSION, req, auth: self.token.clone() };
        let body = self.raw(&framing::frame(&codec::encode(&frame))).await?;
        match decode_response(&body)? {
            Response::Error { code, message } => Err(ClientError::Server { code, message }),
            r => Ok(r),
        }
    }

    /// Writes `bytes` as they are on a new stream, finishes it, and returns the body of the
    /// one response frame, checking that the server then finishes the stream (§5.4).
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
        let body = framing::read_frame(&mut recv, MAX_RESPONSE_BODY)
            .await?
            .ok_or_else(|| ClientError::Protocol("the stream ended without a response frame".into()))?;
        tokio::time::timeout(FINISH_WAIT, framing::expect_end(&mut recv))
            .await
            .map_err(|_| ClientError::Protocol(format!("the stream was not finished within {FINISH_WAIT:?} of its response frame (§5.4)")))??;
        Ok(body)
    }

    pub async fn info(&self) -> Result<Response, ClientError> {
        self.request(Request::Info {}).await
    }

    /// Logs in; on success the client speaks for the new device.
    pub async fn login(&mut self, user: &UserId, password: &str, device_name: Option<String>) -> Result<Session, ClientError> {
        let r = self.request(Request::Login { user: user.clone(), password: password.into(), device_name }).await?;
        self.take_session(r)
    }

    /// Registers; on success the client speaks for the new user's first device.
    pub async fn register(&mut self, user: &UserId, password: &str, token: Option<String>, device_name: Option<String>) -> Result<Session, ClientError> {
        let r = self.request(Request::Register { user: user.clone(), token, password: password.into(), device_name }).await?;
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
        expect_ok(self.request(Request::Logout {}).await?)
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

    pub async fn history(&self, with: &UserId, limit: Option<u32>, before: Option<Cursor>, after: Option<Cursor>) -> Result<Page, ClientError> {
        match self.request(Request::History { with: with.clone(), after, limit, before }).await? {
            Response::Page { read, seen, newer, older, failed, messages, delivered } => Ok(Page { messages, older, newer, read, delivered, seen, failed }),
            r => Err(unexpected(r)),
        }
    }

    /// Says that this user has `kind` everything up to `up_to` in the conversation with `with`.
    pub async fn receipt(&self, with: &UserId, kind: ReceiptKind, up_to: Watermark) -> Result<(), ClientError> {
        expect_ok(self.request(Request::Receipt { kind, with: with.clone(), up_to }).await?)
    }

    /// Whether `user` is online, or when last seen.
    pub async fn presence(&self, user: &UserId) -> Result<PresenceUpdate, ClientError> {
        match self.request(Request::Presence { user: user.clone() }).await? {
            Response::Presence { user, online, last_seen } => Ok(PresenceUpdate { user, online, last_seen }),
            r => Err(unexpected(r)),
        }
    }

    pub async fn set_hide_last_seen(&self, hide: bool) -> Result<(), ClientError> {
        expect_ok(self.request(Request::Settings { hide_last_seen: hide }).await?)
    }

    pub async fn typing(&self, with: &UserId) -> Result<(), ClientError> {
        expect_ok(self.request(Request::Typing { with: with.clone() }).await?)
    }

    /// One page of the caller's conversations (§6.10) and the cursor of the next.
    pub async fn conversations(&self, limit: Option<u32>, before: Option<Cursor>) -> Result<(Vec<ConversationSummary>, Option<Cursor>), ClientError> {
        match self.request(Request::Conversations { limit, before }).await? {
            Response::Conversations { older, conversations } => Ok((conversations, older)),
            r => Err(unexpected(r)),
        }
    }

    pub async fn block(&self, user: &UserId) -> Result<(), ClientError> {
        expect_ok(self.request(Request::Block { user: user.clone() }).await?)
    }

    pub async fn unblock(&self, user: &UserId) -> Result<(), ClientError> {
        expect_ok(self.request(Request::Unblock { user: user.clone() }).await?)
    }

    pub async fn keys(&self) -> Result<(String, Vec<missive_spec::rotation::SignedRotation>), ClientError> {
        match self.request(Request::Keys {}).await? {
            Response::Keys { current, rotations } => Ok((current, rotations)),
            r => Err(unexpected(r)),
        }
    }

    pub async fn blocked(&self) -> Result<Vec<UserId>, ClientError> {
        match self.request(Request::Blocked {}).await? {
            Response::Blocked { users } => Ok(users),
            r => Err(unexpected(r)),
        }
    }

    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        match self.request(Request::Devices {}).await? {
            Response::Devices { devices } => Ok(devices),
            r => Err(unexpected(r)),
        }
    }

    pub async fn change_password(&self, old_password: &str, new_password: &str, logout_others: bool) -> Result<(), ClientError> {
        let req = Request::ChangePassword { old_password: old_password.into(), new_password: new_password.into(), logout_others };
        expect_ok(self.request(req).await?)
    }

    /// e2ee.md E3.1: (one-time keys held, fallback key held).
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

    /// E3.2.
    pub async fn keys_query(&self, user: &UserId) -> Result<Vec<missive_spec::e2ee::DeviceKeys>, ClientError> {
        match self.request(Request::KeysQuery { user: user.clone() }).await? {
            Response::DeviceKeys { devices, .. } => Ok(devices),
            r => Err(unexpected(r)),
        }
    }

    /// E3.3.
    pub async fn keys_claim(&self, user: &UserId, devices: Vec<DeviceId>) -> Result<Vec<missive_spec::e2ee::ClaimedKey>, ClientError> {
        match self.request(Request::KeysClaim { user: user.clone(), devices }).await? {
            Response::Claimed { keys } => Ok(keys),
            r => Err(unexpected(r)),
        }
    }

    /// The id of the device this client speaks for.
    pub async fn device_id(&self) -> Result<DeviceId, ClientError> {
        self.devices()
            .await?
            .into_iter()
            .find(|d| d.current)
            .map(|d| d.id)
            .ok_or_else(|| ClientError::Protocol("devices lists no current device".into()))
    }

    pub async fn revoke_device(&self, device: DeviceId) -> Result<(), ClientError> {
        expect_ok(self.request(Request::RevokeDevice { device }).await?)
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

    /// Opens a subscription and reads its first frame (the backlog, possibly empty).
    pub async fn subscribe(&self, since: u64) -> Result<(Subscription, u64, Vec<Event>), ClientError> {
        let frame = RequestFrame { v: PROTOCOL_VERSION, req: Request::Subscribe { since }, auth: self.token.clone() };
        let lost = |e: String| ClientError::Connection(e);
        let (mut send, recv) = self.conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
        // The client's side stays open: finishing it is not how a subscription ends.
        send.write_all(&framing::frame(&codec::encode(&frame))).await.map_err(|e| lost(e.to_string()))?;
        let mut sub = Subscription { _send: send, recv };
        match sub.next().await? {
            Some((next, events)) => Ok((sub, next, events)),
            None => Err(ClientError::Protocol("the subscription ended at once".into())),
        }
    }

    /// Closes the connection politely and waits until the server was told.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_crate_agrees_with_the_spec_text() {
        assert_eq!(missive_spec::wire::CLIENT_ALPN, ALPN);
    }

    /// A server endpoint built the way the reference server builds its own.
    fn server(key: &missive_federation::ServerKey) -> quinn::Endpoint {
        let cfg = missive_federation::tls::server_config(key, "alpha.test", ALPN, Duration::from_secs(5)).unwrap();
        let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let accepting = ep.clone();
        tokio::spawn(async move {
            while let Some(inc) = accepting.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = inc.await {
                        conn.closed().await;
                    }
                });
            }
        });
        ep
    }

    #[tokio::test]
    async fn the_pinned_key_is_accepted_and_another_refused() {
        let (k, other) = (missive_federation::ServerKey::generate(), missive_federation::ServerKey::generate());
        let ep = server(&k);
        let addr = ep.local_addr().unwrap();
        let name = ServerName::parse("alpha.test").unwrap();
        let c = Client::connect(addr, &name, k.public()).await.unwrap();
        assert_eq!(c.server_key(), k.public().0);
        c.close().await;
        let first = Client::connect(addr, &name, Pin::FirstUse).await.unwrap();
        assert_eq!(first.server_key(), k.public().0);
        first.close().await;
        match Client::connect(addr, &name, other.public()).await {
            Err(ClientError::KeyMismatch { pinned, presented }) => {
                assert_eq!((*pinned, *presented), (other.public().0, k.public().0));
            }
            Err(e) => panic!("expected a key mismatch, got {e}"),
            Ok(_) => panic!("a server with another key was accepted"),
        }
    }
}
