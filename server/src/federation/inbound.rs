//! Inbound: connections from peers and what they ask. The peer's certificate key must be
//! one discovery returned for the name it claims; only then may it open streams, within a
//! per-peer request rate. Every unit is verified before it is decoded, checked by the
//! core's [`checks`], and received through the writer; gaps it reveals start a fill.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use missive_core::checks::{self, Checked};
use missive_core::gapfill;
use missive_federation::discovery::PeerInfo;
use missive_federation::envelope;
use missive_federation::framing::{read_request, write_frame, FrameError};
use missive_federation::tls;
use missive_spec::federation::{txn_id, FedErrorCode, FedRequest, FedRequestFrame, FedResponse, SignedUnit, UnitResult, MAX_FEDERATION_FRAME, MAX_TXN_UNITS};
use missive_spec::{codec, ServerName, PROTOCOL_VERSION};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::{fed_error, response, Federation, AUTHENTICATION_TIMEOUT};
use crate::ratelimit::TokenBucket;
use crate::store::blocking;

impl Federation {
    pub(super) async fn accept_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => {
                        let addr = incoming.remote_address();
                        let (max, per_address) = self.live.federation_connections();
                        let Some(slot) = self.slots.take_within(addr.ip(), max, per_address) else {
                            tracing::warn!(%addr, "federation connection refused: connection limit reached");
                            incoming.refuse();
                            continue;
                        };
                        let Ok(handshake) = self.handshakes.clone().try_acquire_owned() else {
                            tracing::warn!(%addr, "federation connection refused: too many handshakes in progress");
                            incoming.refuse();
                            continue;
                        };
                        let me = self.clone();
                        tokio::spawn(async move {
                            me.inbound_connection(incoming, addr, handshake).await;
                            drop(slot);
                        });
                    }
                    None => return,
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Completes the handshake and finds the peer's keys (bounded in time, and in number by
    /// `handshake`), then serves its requests.
    async fn inbound_connection(self: Arc<Self>, incoming: quinn::Incoming, addr: SocketAddr, handshake: OwnedSemaphorePermit) {
        let authenticated = tokio::time::timeout(AUTHENTICATION_TIMEOUT, self.authenticate(incoming, addr)).await;
        drop(handshake);
        let (conn, name, info) = match authenticated {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(_) => {
                tracing::warn!(%addr, "refusing peer: handshake and key discovery took over {AUTHENTICATION_TIMEOUT:?}");
                return;
            }
        };
        self.contacted(&name);
        let bucket = self.bucket(&name);
        // Only now may the peer open streams (F3.2).
        conn.set_max_concurrent_bi_streams(tls::FEDERATION_PEER_STREAMS.into());
        let span = tracing::info_span!("from", peer = %name);
        async move {
            loop {
                let (mut send, recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(_) => return,
                };
                let rate = self.live.requests_per_second();
                if !bucket.lock().unwrap_or_else(|e| e.into_inner()).take(Instant::now(), rate) {
                    let mut recv = recv;
                    let _ = recv.stop(0u32.into());
                    let msg = format!("at most {rate} requests per second");
                    if write_frame(&mut send, &response(fed_error(FedErrorCode::RateLimited, msg))).await.is_ok() {
                        let _ = send.finish();
                    }
                    continue;
                }
                let me = self.clone();
                let (name, info) = (name.clone(), info.clone());
                tokio::spawn(async move { me.inbound_stream(&name, &info, send, recv).await }.in_current_span());
            }
        }
        .instrument(span)
        .await
    }

    /// The connection, once the peer's certificate carries a key discovery returned for the
    /// one server name it names (F3.2); `None` after closing it otherwise.
    async fn authenticate(self: &Arc<Self>, incoming: quinn::Incoming, addr: SocketAddr) -> Option<(quinn::Connection, ServerName, PeerInfo)> {
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "federation handshake failed");
                return None;
            }
        };
        let Some((key, names)) = tls::peer_identity(&conn) else {
            conn.close(1u32.into(), b"no usable certificate");
            return None;
        };
        let name = match names.as_slice() {
            [one] => ServerName::parse(one).ok(),
            _ => None,
        };
        let Some(name) = name else {
            conn.close(1u32.into(), b"certificate must name exactly one server");
            return None;
        };
        // Before discovery: a refused server costs no lookup (F3.5).
        if !self.policy.allows(&name) {
            tracing::info!(peer = %name, %addr, "refusing peer: federation policy");
            conn.close(super::policy::REFUSED_CLOSE_CODE.into(), super::policy::REFUSED_REASON);
            return None;
        }
        let info = match self.discovery.resolve(&name).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(peer = %name, %addr, error = %e, "refusing peer: cannot discover its keys");
                conn.close(2u32.into(), b"cannot discover your keys");
                return None;
            }
        };
        if info.keys.contains(&key) {
            return Some((conn, name, info));
        }
        // It may have rotated its key (F2.7): follow a rotation its pinned key signed.
        let followed = match self.follow_rotation(&name, &info).await {
            Ok(()) => self.discovery.resolve(&name).await.ok().filter(|i| i.keys.contains(&key)),
            Err(e) => {
                tracing::debug!(peer = %name, error = %e, "no key rotation to follow");
                // A key document is read afresh next time.
                self.discovery.forget(&name);
                None
            }
        };
        match followed {
            Some(info) => Some((conn, name, info)),
            None => {
                tracing::warn!(peer = %name, %addr, presented = %key, "refusing peer: key is not one discovery returned");
                conn.close(2u32.into(), b"key not pinned for that server name");
                None
            }
        }
    }

    /// The request budget `name` shares over its connections.
    fn bucket(&self, name: &ServerName) -> Arc<Mutex<TokenBucket>> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = buckets.get(name).and_then(Weak::upgrade) {
            return b;
        }
        if buckets.len() >= self.live.federation_connections().0 {
            buckets.retain(|_, b| b.strong_count() > 0);
        }
        let b = Arc::new(Mutex::new(TokenBucket::new(self.live.requests_per_second(), Instant::now())));
        buckets.insert(name.clone(), Arc::downgrade(&b));
        b
    }

    async fn inbound_stream(self: Arc<Self>, peer: &ServerName, info: &PeerInfo, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let res = match read_request(&mut recv, MAX_FEDERATION_FRAME, self.live.read_timeout(), &self.bodies).await {
            Ok(Some(frame)) => match codec::decode::<FedRequestFrame>(&frame.body) {
                Ok(f) if f.v != PROTOCOL_VERSION => fed_error(FedErrorCode::UnsupportedVersion, format!("version {}", f.v)),
                Ok(f) => {
                    drop(frame);
                    self.handle(peer, info, f.req).await
                }
                Err(e) => fed_error(FedErrorCode::BadFrame, e.to_string()),
            },
            Ok(None) => return,
            Err(FrameError::Decode(e)) => {
                let _ = recv.stop(0u32.into());
                fed_error(FedErrorCode::FrameTooLarge, e.to_string())
            }
            Err(e @ FrameError::Timeout(_)) => {
                tracing::warn!(error = %e, "request frame too slow; stream reset");
                let _ = recv.stop(0u32.into());
                fed_error(FedErrorCode::BadFrame, e.to_string())
            }
            Err(e) => fed_error(FedErrorCode::BadFrame, e.to_string()),
        };
        if write_frame(&mut send, &response(res)).await.is_ok() {
            let _ = send.finish();
        }
    }

    async fn handle(self: &Arc<Self>, peer: &ServerName, info: &PeerInfo, req: FedRequest) -> FedResponse {
        // A connection opened before the policy refused its server (F3.5).
        if !self.policy.allows(peer) {
            return fed_error(FedErrorCode::Forbidden, "this server does not federate with yours");
        }
        match req {
            FedRequest::Txn { id, units } => {
                if units.len() > MAX_TXN_UNITS {
                    return fed_error(FedErrorCode::TooMany, format!("at most {MAX_TXN_UNITS} units per transaction"));
                }
                if txn_id(&units)[..] != id[..] {
                    return fed_error(FedErrorCode::BadTxnId, "transaction id does not match its units");
                }
                let results = self.receive_units(peer, info, units).await;
                FedResponse::TxnResult { id, results }
            }
            FedRequest::Backfill { conv, last, first } => {
                let (store, me, peer) = (self.store.clone(), self.server.clone(), peer.clone());
                blocking(move || gapfill::serve(&*store, &me, &peer, conv, first, last))
                    .await
                    .unwrap_or_else(|_| fed_error(FedErrorCode::Internal, "storage fault"))
            }
            FedRequest::HighWater { after } => {
                if let Err(wait) = self.high_water_limit.reserve(peer, Instant::now()) {
                    let msg = format!("at most {} high_water requests a minute; again in {} s", super::HIGH_WATER_PER_MINUTE, wait.as_secs() + 1);
                    return fed_error(FedErrorCode::RateLimited, msg);
                }
                let (store, me, peer) = (self.store.clone(), self.server.clone(), peer.clone());
                blocking(move || missive_core::restore::high_water(&*store, &me, &peer, after))
                    .await
                    .unwrap_or_else(|_| fed_error(FedErrorCode::Internal, "storage fault"))
            }
            FedRequest::Reclaim { conv, last, first } => {
                let (store, peer) = (self.store.clone(), peer.clone());
                blocking(move || missive_core::restore::serve_reclaim(&*store, &peer, conv, first, last))
                    .await
                    .unwrap_or_else(|_| fed_error(FedErrorCode::Internal, "storage fault"))
            }
            FedRequest::Keys {} => {
                let (current, rotations) = self.own.answer();
                FedResponse::Keys { current, rotations }
            }
            FedRequest::Edu { typing, presence } => self.receive_edus(peer, typing, presence).await,
            FedRequest::KeysQuery { user } => match self.service.get() {
                Some(s) => s.peer_keys_query(user).await,
                None => fed_error(FedErrorCode::ShuttingDown, "not serving yet"),
            },
            FedRequest::KeysClaim { user, devices } => match self.service.get() {
                Some(s) => s.peer_keys_claim(peer, user, devices).await,
                None => fed_error(FedErrorCode::ShuttingDown, "not serving yet"),
            },
        }
    }

    /// Verifies, checks and stores units from `peer`; one result per unit.
    pub(super) async fn receive_units(self: &Arc<Self>, peer: &ServerName, info: &PeerInfo, units: Vec<SignedUnit>) -> Vec<UnitResult> {
        let n = units.len();
        // Signatures and store reads: work for the blocking pool, not a runtime worker.
        let checked = {
            let (me, peer, info) = (self.clone(), peer.clone(), info.clone());
            blocking(move || me.check_units(&peer, &info, units)).await
        };
        let Ok(checked) = checked else { return vec![UnitResult::Retry; n] };
        match self.sequencer.receive(checked).await {
            Ok((results, gaps)) => {
                gaps.into_iter().for_each(|b| self.want_gap(b));
                self.metrics.units_received(peer, &results);
                results
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store inbound units; the peer will retry");
                vec![UnitResult::Retry; n]
            }
        }
    }

    /// Verifies the units' signatures (together: [`envelope::verify_all_for_peer`]), then
    /// checks each.
    fn check_units(&self, peer: &ServerName, info: &PeerInfo, envs: Vec<SignedUnit>) -> Vec<Result<Checked, UnitResult>> {
        let units = if crate::sabotage::active(crate::sabotage::Fault::SkipSignatureCheck) {
            envs.iter().map(envelope::open_trusted).collect()
        } else {
            envelope::verify_all_for_peer(&envs, &info.keys, &info.old_keys)
        };
        envs.into_iter()
            .zip(units)
            .map(|(env, unit)| checks::unit(&*self.store, &self.server, peer, env, unit.map_err(|e| e.result())?))
            .collect()
    }
}
