//! A fake homeserver for testing a server under test from the federation side. It holds
//! its own key, runs its own federation endpoint (so the server under test can connect to
//! it, e.g. to ask for a backfill), and sends whatever transactions a test builds — honest
//! or forged.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use missive_federation::framing::{read_frame, write_frame};
use missive_federation::tls::{self, Pin, PinnedServerVerifier};
use missive_federation::{envelope, PublicKey, ServerKey};
use missive_spec::federation::{
    txn_id, FedRequest, FedRequestFrame, FedResponse, FedResponseFrame, SignedUnit, Unit, UnitResult, FEDERATION_ALPN,
    MAX_FEDERATION_FRAME,
};
use missive_spec::{codec, Content, ConversationId, Deps, Message, ServerName, UserId, PROTOCOL_VERSION};

/// What the mock saw the server under test ask for.
#[derive(Debug, Default)]
pub struct Observed {
    pub backfills: Vec<(ConversationId, u64, u64)>,
    pub txns: Vec<Vec<SignedUnit>>,
    /// Ephemeral requests received: their presence updates, one list per request.
    pub edus: Vec<Vec<missive_spec::PresenceUpdate>>,
}

pub struct MockPeer {
    pub name: ServerName,
    pub key: ServerKey,
    pub endpoint: quinn::Endpoint,
    pub addr: SocketAddr,
    /// Units it answers backfill requests from, by (conversation, seq).
    pub log: Arc<Mutex<HashMap<(ConversationId, u64), SignedUnit>>>,
    pub observed: Arc<Mutex<Observed>>,
    /// Transactions carrying a unit of one of these conversations are never answered
    /// (a slow peer, as seen by the sender).
    pub stalled: Arc<Mutex<HashSet<ConversationId>>>,
}

impl MockPeer {
    /// Starts the mock's federation endpoint on `ip` with a fresh key.
    pub fn start(name: &str, ip: std::net::IpAddr) -> anyhow::Result<MockPeer> {
        Self::start_with_key(name, ip, ServerKey::generate())
    }

    pub fn start_with_key(name: &str, ip: std::net::IpAddr, key: ServerKey) -> anyhow::Result<MockPeer> {
        tls::install_provider();
        let name = ServerName::parse(name)?;
        let sc = tls::federation_server_config(&key, name.as_str(), FEDERATION_ALPN, Duration::from_secs(30))?;
        let endpoint = quinn::Endpoint::server(sc, SocketAddr::new(ip, 0))?;
        let addr = endpoint.local_addr()?;
        let log: Arc<Mutex<HashMap<(ConversationId, u64), SignedUnit>>> = Arc::default();
        let observed: Arc<Mutex<Observed>> = Arc::default();
        let stalled: Arc<Mutex<HashSet<ConversationId>>> = Arc::default();
        let (ep, l, o, st) = (endpoint.clone(), log.clone(), observed.clone(), stalled.clone());
        tokio::spawn(async move {
            while let Some(inc) = ep.accept().await {
                let (l, o, st) = (l.clone(), o.clone(), st.clone());
                tokio::spawn(async move {
                    let Ok(conn) = inc.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let (l, o, st) = (l.clone(), o.clone(), st.clone());
                        tokio::spawn(async move {
                            let Ok(Some(body)) = read_frame(&mut recv, MAX_FEDERATION_FRAME).await else { return };
                            let Ok(f) = codec::decode::<FedRequestFrame>(&body) else { return };
                            let res = match f.req {
                                FedRequest::Backfill { conv, last, first } => {
                                    o.lock().unwrap().backfills.push((conv, first, last));
                                    let log = l.lock().unwrap();
                                    let units = (first..=last).map_while(|s| log.get(&(conv, s)).cloned()).collect();
                                    FedResponse::Units { units }
                                }
                                FedRequest::Edu { presence, .. } => {
                                    o.lock().unwrap().edus.push(presence);
                                    FedResponse::Ok {}
                                }
                                FedRequest::Txn { id, units } => {
                                    let stall = units.iter().any(|u| match envelope::open_trusted(u) {
                                        Ok(Unit::Message(m)) => st.lock().unwrap().contains(&m.conv),
                                        Ok(Unit::Receipt(r)) => st.lock().unwrap().contains(&r.conv),
                                        Err(_) => false,
                                    });
                                    if stall {
                                        // Keep the stream open and never answer.
                                        std::future::pending::<()>().await;
                                    }
                                    let results = vec![UnitResult::Accepted; units.len()];
                                    o.lock().unwrap().txns.push(units);
                                    FedResponse::TxnResult { id, results }
                                }
                            };
                            let body = codec::encode(&FedResponseFrame { v: PROTOCOL_VERSION, res });
                            let _ = write_frame(&mut send, &body).await;
                            let _ = send.finish();
                        });
                    }
                });
            }
        });
        Ok(MockPeer { name, key, endpoint, addr, log, observed, stalled })
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
