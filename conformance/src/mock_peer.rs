//! A fake homeserver for testing a server under test from the federation side. It holds
//! its own key, runs its own federation endpoint (so the server under test can connect to
//! it, e.g. to ask for a backfill), and sends whatever transactions a test builds — honest
//! or forged.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use missive_federation::framing::{read_frame, write_frame};
use missive_federation::tls::{self, Pin, PinnedServerVerifier};
use missive_federation::{envelope, PublicKey, ServerKey};
use missive_spec::federation::{
    txn_id, FedRequest, FedRequestFrame, FedResponse, FedResponseFrame, SignedUnit, Unit, UnitResult, FEDERATION_ALPN,
    MAX_FEDERATION_FRAME,
};
use missive_spec::{codec, Content, ConversationId, Deps, Message, ServerName, UserId, PROTOCOL_VERSION};

/// What the mock saw the server under test do.
#[derive(Debug, Default)]
pub struct Observed {
    pub backfills: Vec<(ConversationId, u64, u64)>,
    /// Units of every transaction it answered, one list per transaction.
    pub txns: Vec<Vec<SignedUnit>>,
    /// Every transaction that arrived, answered or not, in arrival order.
    pub attempts: Vec<Attempt>,
    /// Units it answered `accepted`, each once, in the order accepted.
    pub accepted: Vec<SignedUnit>,
    /// Units that came again after it had answered them `accepted`.
    pub resent_after_ack: Vec<SignedUnit>,
    /// Ephemeral requests received: their presence updates, one list per request.
    pub edus: Vec<Vec<missive_spec::PresenceUpdate>>,
}

/// One transaction as it arrived.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: Instant,
    pub id: Vec<u8>,
    pub units: usize,
    /// What the mock did with it.
    pub fate: Fate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Answered,
    /// Read, then the stream was reset with no answer.
    Dropped,
    /// Read, then the whole connection was closed.
    Disconnected,
    /// Never answered (a stalled conversation).
    Stalled,
}

/// Ways the mock misbehaves on purpose, as a receiver of transactions. Each count is
/// used up by the transactions that trigger it, in this order: drop, disconnect, partial.
#[derive(Debug, Clone, Default)]
pub struct Misbehaviour {
    /// Read the next N transactions, then reset their streams without answering.
    pub drop_next: usize,
    /// Read the next N transactions, then close the connection they came on.
    pub disconnect_next: usize,
    /// For the next N transactions, accept only the units at even positions and answer
    /// `retry` for the others.
    pub partial_next: usize,
    /// Wait this long before every answer.
    pub reply_delay: Duration,
}

/// What a transaction should meet, decided as it arrives.
enum Action {
    Drop,
    Disconnect,
    Answer { partial: bool, delay: Duration },
}

impl Misbehaviour {
    fn next_action(&mut self) -> Action {
        if self.drop_next > 0 {
            self.drop_next -= 1;
            return Action::Drop;
        }
        if self.disconnect_next > 0 {
            self.disconnect_next -= 1;
            return Action::Disconnect;
        }
        let partial = self.partial_next > 0;
        self.partial_next = self.partial_next.saturating_sub(1);
        Action::Answer { partial, delay: self.reply_delay }
    }
}

type UnitLog = Arc<Mutex<HashMap<(ConversationId, u64), SignedUnit>>>;

/// One device of a mock user in its key directory (e2ee.md E3).
#[derive(Debug, Clone)]
pub struct MockDevice {
    pub keys: missive_spec::e2ee::DeviceKeys,
    /// Handed out lowest first, each once.
    pub one_time: Vec<missive_spec::e2ee::OneTimeKey>,
    pub fallback: Option<missive_spec::e2ee::OneTimeKey>,
}

/// The mock's key directory: what it answers `keys_query` and `keys_claim` with.
pub type Directory = Arc<Mutex<HashMap<UserId, Vec<MockDevice>>>>;

#[derive(Default)]
struct Shared {
    log: UnitLog,
    observed: Arc<Mutex<Observed>>,
    stalled: Arc<Mutex<HashSet<ConversationId>>>,
    misbehave: Arc<Mutex<Misbehaviour>>,
    /// Content hashes it accepted, by identity, to answer repeats `duplicate`.
    seen: Mutex<HashMap<(ConversationId, String, u64), [u8; 32]>>,
    /// Its key's textual form, for `keys` (it never rotates).
    key: String,
    directory: Directory,
}

pub struct MockPeer {
    pub name: ServerName,
    pub key: ServerKey,
    pub endpoint: quinn::Endpoint,
    pub addr: SocketAddr,
    /// Units it answers backfill requests from, by (conversation, seq).
    pub log: UnitLog,
    pub observed: Arc<Mutex<Observed>>,
    /// Transactions carrying a unit of one of these conversations are never answered
    /// (a slow peer, as seen by the sender).
    pub stalled: Arc<Mutex<HashSet<ConversationId>>>,
    /// How it misbehaves from now on.
    pub misbehave: Arc<Mutex<Misbehaviour>>,
    /// Connection attempts it has seen, complete or not.
    pub handshakes: Arc<AtomicUsize>,
    /// Its users' device keys (e2ee.md E3), as a test sets them.
    pub directory: Directory,
}

impl MockPeer {
    /// Starts the mock's federation endpoint on `ip` with a fresh key.
    pub fn start(name: &str, ip: std::net::IpAddr) -> anyhow::Result<MockPeer> {
        Self::start_with_key(name, ip, ServerKey::generate())
    }

    pub fn start_with_key(name: &str, ip: std::net::IpAddr, key: ServerKey) -> anyhow::Result<MockPeer> {
        tls::install_provider();
        let name = ServerName::parse(name)?;
        let sc = tls::federation_server_config(&key, name.as_str(), FEDERATION_ALPN)?;
        let endpoint = quinn::Endpoint::server(sc, SocketAddr::new(ip, 0))?;
        let addr = endpoint.local_addr()?;
        let shared = Arc::new(Shared { key: key.public().to_text(), ..Shared::default() });
        let ep = endpoint.clone();
        let sh = shared.clone();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let hs = handshakes.clone();
        tokio::spawn(async move {
            while let Some(inc) = ep.accept().await {
                hs.fetch_add(1, Ordering::SeqCst);
                let sh = sh.clone();
                tokio::spawn(async move {
                    let Ok(conn) = inc.await else { return };
                    // A federation endpoint lets a peer open streams only once it took it
                    // for who it claims to be; the mock takes everyone.
                    conn.set_max_concurrent_bi_streams(tls::FEDERATION_PEER_STREAMS.into());
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(serve_stream(sh.clone(), conn.clone(), send, recv));
                    }
                });
            }
        });
        Ok(MockPeer {
            name,
            key,
            endpoint,
            addr,
            log: shared.log.clone(),
            observed: shared.observed.clone(),
            stalled: shared.stalled.clone(),
            misbehave: shared.misbehave.clone(),
            handshakes,
            directory: shared.directory.clone(),
        })
    }

    /// Messages it accepted, in order, as (seq, text).
    pub fn accepted_messages(&self) -> Vec<Message> {
        let o = self.observed.lock().unwrap();
        o.accepted
            .iter()
            .filter_map(|u| match envelope::open_trusted(u) {
                Ok(Unit::Message(m)) => Some(m),
                _ => None,
            })
            .collect()
    }

    /// Texts of the message units it has received in transactions.
    pub fn received_texts(&self) -> Vec<String> {
        let o = self.observed.lock().unwrap();
        o.txns
            .iter()
            .flatten()
            .filter_map(|u| match envelope::open_trusted(u) {
                Ok(Unit::Message(m)) => m.content.as_text().map(str::to_owned),
                _ => None,
            })
            .collect()
    }

    /// The receipts it has received in transactions.
    pub fn received_receipts(&self) -> Vec<missive_spec::Receipt> {
        let o = self.observed.lock().unwrap();
        o.txns
            .iter()
            .flatten()
            .filter_map(|u| match envelope::open_trusted(u) {
                Ok(Unit::Receipt(r)) => Some(r),
                _ => None,
            })
            .collect()
    }

    pub fn public(&self) -> PublicKey {
        self.key.public()
    }

    /// Connects to the server under test, pinning its key and presenting the mock's.
    pub async fn connect(&self, server: &str, addr: SocketAddr, server_key: &str) -> anyhow::Result<quinn::Connection> {
        let pin = Pin::Key(PublicKey::parse(server_key)?);
        let cfg = tls::federation_client_config(PinnedServerVerifier::new(pin), &self.key, self.name.as_str(), FEDERATION_ALPN)?;
        Ok(self.endpoint.connect_with(cfg, addr, server)?.await?)
    }

    /// A message from `from` (a user of the mock) to `to` with the given seq and vector.
    pub fn message(&self, from: &UserId, to: &UserId, seq: u64, deps: &[(&ServerName, u64)], text: &str) -> Message {
        let mut d = Deps::new();
        for (s, n) in deps {
            d.set((*s).clone(), *n);
        }
        Message {
            to: to.clone(),
            ts: 1_795_000_000_000 + seq,
            seq,
            conv: ConversationId::one_to_one(from, to),
            deps: d,
            from: from.clone(),
            origin: self.name.clone(),
            content: Content::text(text),
        }
    }

    pub fn sign(&self, m: &Message) -> SignedUnit {
        envelope::sign(&self.key, &Unit::Message(m.clone()))
    }

    /// Signs any unit with the mock's key.
    pub fn key_sign(&self, u: &Unit) -> SignedUnit {
        envelope::sign(&self.key, u)
    }

    /// Signs and remembers a message, so backfill requests for it are answered.
    pub fn record(&self, m: &Message) -> SignedUnit {
        let u = self.sign(m);
        self.log.lock().unwrap().insert((m.conv, m.seq), u.clone());
        u
    }

    /// Sends one request and returns the server's answer.
    pub async fn request(conn: &quinn::Connection, req: FedRequest) -> anyhow::Result<FedResponse> {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, &codec::encode(&FedRequestFrame { v: PROTOCOL_VERSION, req })).await?;
        let _ = send.finish();
        let body = read_frame(&mut recv, MAX_FEDERATION_FRAME).await?.ok_or_else(|| anyhow!("no response"))?;
        Ok(codec::decode::<FedResponseFrame>(&body).context("bad response frame")?.res)
    }

    /// Sends a transaction with its correct id; returns the per-unit results.
    pub async fn send_txn(conn: &quinn::Connection, units: Vec<SignedUnit>) -> anyhow::Result<Vec<UnitResult>> {
        let id = txn_id(&units).to_vec();
        match Self::request(conn, FedRequest::Txn { id: id.clone(), units }).await? {
            FedResponse::TxnResult { id: got, results } if got == id => Ok(results),
            other => Err(anyhow!("unexpected answer: {other:?}")),
        }
    }
}

fn conv_of(u: &SignedUnit) -> Option<ConversationId> {
    match envelope::open_trusted(u) {
        Ok(Unit::Message(m)) => Some(m.conv),
        Ok(Unit::Receipt(r)) => Some(r.conv),
        Ok(Unit::Devices(_)) | Err(_) => None,
    }
}

/// Answers one request stream of the server under test.
async fn serve_stream(sh: Arc<Shared>, conn: quinn::Connection, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let Ok(Some(body)) = read_frame(&mut recv, MAX_FEDERATION_FRAME).await else { return };
    let Ok(f) = codec::decode::<FedRequestFrame>(&body) else { return };
    let res = match f.req {
        FedRequest::Backfill { conv, last, first } => {
            sh.observed.lock().unwrap().backfills.push((conv, first, last));
            let log = sh.log.lock().unwrap();
            let units = (first..=last).map_while(|s| log.get(&(conv, s)).cloned()).collect();
            FedResponse::Units { units }
        }
        // The mock holds none of the server's units (it is never asked after a restore).
        FedRequest::HighWater { .. } => FedResponse::HighWater { next: None, convs: Vec::new() },
        FedRequest::Reclaim { .. } => FedResponse::Units { units: Vec::new() },
        FedRequest::Keys {} => FedResponse::Keys { current: sh.key.clone(), rotations: Vec::new() },
        FedRequest::KeysQuery { user } => {
            let dir = sh.directory.lock().unwrap();
            let devices = dir.get(&user).map(|ds| ds.iter().map(|d| d.keys.clone()).collect()).unwrap_or_default();
            FedResponse::DeviceKeys { user, devices }
        }
        FedRequest::KeysClaim { user, devices } => {
            let mut dir = sh.directory.lock().unwrap();
            let mut keys = Vec::new();
            for d in dir.get_mut(&user).into_iter().flatten().filter(|d| devices.contains(&d.keys.device)) {
                let device = d.keys.device.clone();
                match (d.one_time.is_empty(), &d.fallback) {
                    (false, _) => keys.push(missive_spec::e2ee::ClaimedKey { key: d.one_time.remove(0), device, fallback: false }),
                    (true, Some(f)) => keys.push(missive_spec::e2ee::ClaimedKey { key: f.clone(), device, fallback: true }),
                    (true, None) => {}
                }
            }
            FedResponse::Claimed { keys }
        }
        FedRequest::Edu { presence, .. } => {
            sh.observed.lock().unwrap().edus.push(presence);
            FedResponse::Ok {}
        }
        FedRequest::Txn { id, units } => {
            let stall = {
                let st = sh.stalled.lock().unwrap();
                units.iter().any(|u| conv_of(u).is_some_and(|c| st.contains(&c)))
            };
            let action = if stall { None } else { Some(sh.misbehave.lock().unwrap().next_action()) };
            let fate = match action {
                None => Fate::Stalled,
                Some(Action::Drop) => Fate::Dropped,
                Some(Action::Disconnect) => Fate::Disconnected,
                Some(Action::Answer { .. }) => Fate::Answered,
            };
            sh.observed.lock().unwrap().attempts.push(Attempt { at: Instant::now(), id: id.clone(), units: units.len(), fate });
            let (partial, delay) = match action {
                // Keep the stream open and never answer.
                None => return std::future::pending().await,
                Some(Action::Drop) => {
                    let _ = send.reset(0u32.into());
                    return;
                }
                Some(Action::Disconnect) => {
                    conn.close(0u32.into(), b"mock peer disconnects");
                    return;
                }
                Some(Action::Answer { partial, delay }) => (partial, delay),
            };
            tokio::time::sleep(delay).await;
            let results = units.iter().enumerate().map(|(i, u)| if partial && i % 2 == 1 { UnitResult::Retry } else { admit(&sh, u) }).collect();
            sh.observed.lock().unwrap().txns.push(units);
            FedResponse::TxnResult { id, results }
        }
    };
    let body = codec::encode(&FedResponseFrame { v: PROTOCOL_VERSION, res });
    let _ = write_frame(&mut send, &body).await;
    let _ = send.finish();
}

/// A well-behaved receiver's answer for one unit (no checks beyond dedupe).
/// The one user the mock has not got: messages to it are refused for good.
pub const NOBODY: &str = "nobody";

fn admit(sh: &Shared, u: &SignedUnit) -> UnitResult {
    let Ok(unit) = envelope::open_trusted(u) else { return UnitResult::BadUnit };
    let Unit::Message(m) = unit else {
        sh.observed.lock().unwrap().accepted.push(u.clone());
        return UnitResult::Accepted;
    };
    if m.to.localpart() == NOBODY {
        return UnitResult::UnknownRecipient;
    }
    let hash = u.hash();
    let mut seen = sh.seen.lock().unwrap();
    match seen.get(&(m.conv, m.origin.to_string(), m.seq)) {
        Some(h) if *h == hash => {
            sh.observed.lock().unwrap().resent_after_ack.push(u.clone());
            UnitResult::Duplicate
        }
        Some(_) => UnitResult::Equivocation,
        None => {
            seen.insert((m.conv, m.origin.to_string(), m.seq), hash);
            sh.observed.lock().unwrap().accepted.push(u.clone());
            UnitResult::Accepted
        }
    }
}
