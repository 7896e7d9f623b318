//! Key rotation across federation (federation.md F2.7): answering `keys` with this server's
//! chain, and following a statically pinned peer's rotation when it presents a new key —
//! only along a chain its old key signed, remembered in the store across restarts.

use std::time::{Duration, Instant};

use missive_federation::discovery::{PeerInfo, Rotated};
use missive_federation::tls::{self, Pin, PinnedServerVerifier};
use missive_federation::PublicKey;
use missive_spec::federation::{FedRequest, FedResponse, FEDERATION_ALPN};
use missive_spec::rotation::SignedRotation;
use missive_spec::ServerName;
use serde::{Deserialize, Serialize};

use super::Federation;
use crate::store::{blocking, Cf, Direction};

/// Prefix of the `Cf::Meta` records of followed rotations: `pin/NAME`.
const LEARNT_PREFIX: &[u8] = b"pin/";
/// Least time between two attempts to follow one peer's rotation.
const RETRY: Duration = Duration::from_secs(10);

/// This server's keys: the one it signs with and the chain that led to it.
pub struct OwnKeys {
    pub current: PublicKey,
    pub chain: Vec<SignedRotation>,
    pub retired: Vec<(PublicKey, u64)>,
}

impl OwnKeys {
    pub fn new(current: PublicKey, chain: Vec<SignedRotation>) -> OwnKeys {
        let retired = missive_federation::RotationChain::retired(&chain);
        OwnKeys { current, chain, retired }
    }

    /// The `keys` answer (F2.7, core.md §6.13).
    pub fn answer(&self) -> (String, Vec<SignedRotation>) {
        (self.current.to_text(), self.chain.clone())
    }
}

/// A followed rotation as stored.
#[derive(Serialize, Deserialize)]
struct Learnt {
    from: String,
    key: String,
    retired: Vec<(String, u64)>,
}

impl Federation {
    /// Applies the rotations followed before this start.
    pub async fn load_rotations(&self) -> anyhow::Result<()> {
        let store = self.store.clone();
        let rows = blocking(move || store.scan(Cf::Meta, LEARNT_PREFIX, None, Direction::Forward, 100_000)).await??;
        for (k, v) in rows {
            let (Ok(name), Ok(l)) = (ServerName::parse(&String::from_utf8_lossy(&k[LEARNT_PREFIX.len()..])), serde_json::from_slice::<Learnt>(&v)) else {
                continue;
            };
            let parse = |s: &str| PublicKey::parse(s).ok();
            let (Some(from), Some(key)) = (parse(&l.from), parse(&l.key)) else { continue };
            let retired = l.retired.iter().filter_map(|(k, t)| Some((parse(k)?, *t))).collect();
            self.discovery.learn_rotation(&name, Rotated { from, key, retired });
        }
        Ok(())
    }

    /// `peer`, statically pinned, presented a key it was not pinned with: connect to its
    /// address, see the key it presents there, and if its chain leads there from the
    /// pinned key, expect that key from now on (F2.7). Whoever shows a key on an inbound
    /// connection only makes us look at the real server; at most one look per peer every
    /// [`RETRY`].
    pub(super) async fn follow_rotation(&self, peer: &ServerName, info: &PeerInfo) -> Result<(), String> {
        let pinned = self.discovery.static_keys(peer);
        if pinned.is_empty() {
            // Its keys come from its key document, which is read again instead (F2.2).
            return Err("the peer's keys come from its key document".into());
        }
        // One look at a time (an inbound and an outbound connection may both ask): who
        // waited learns what the look before found.
        let _one = self.rotation_lock.lock().await;
        {
            // Bounded by the static peers.
            let tried = self.rotation_tries.lock().unwrap_or_else(|e| e.into_inner());
            match tried.get(peer) {
                Some((t, true)) if t.elapsed() < RETRY => return Ok(()),
                Some((t, false)) if t.elapsed() < RETRY => return Err("looked a short while ago".into()),
                _ => {}
            }
        }
        let outcome = self.look_for_rotation(peer, info, &pinned).await;
        self.rotation_tries.lock().unwrap_or_else(|e| e.into_inner()).insert(peer.clone(), (Instant::now(), outcome.is_ok()));
        outcome
    }

    async fn look_for_rotation(&self, peer: &ServerName, info: &PeerInfo, pinned: &[PublicKey]) -> Result<(), String> {
        // A link that accepts whatever key the server at the pinned address presents, for
        // one `keys` request and nothing else.
        let verifier = PinnedServerVerifier::new(Pin::FirstUse);
        let cfg = tls::federation_client_config(verifier.clone(), &self.key, self.server.as_str(), FEDERATION_ALPN).map_err(|e| e.to_string())?;
        let connecting = self.endpoint.connect_with(cfg, info.addr, peer.as_str()).map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(super::REQUEST_TIMEOUT, connecting).await.map_err(|_| "timed out".to_string())?.map_err(|e| e.to_string())?;
        let seen = verifier.seen().ok_or("no key presented")?;
        if info.keys.contains(&seen) {
            conn.close(0u32.into(), b"keys read");
            return Err("the server presents the key already expected".into());
        }
        let answer = self.request(&conn, FedRequest::Keys {}).await;
        conn.close(0u32.into(), b"keys read");
        let (current, chain) = match answer? {
            FedResponse::Keys { current, rotations } => (current, rotations),
            other => return Err(format!("unexpected answer to keys: {other:?}")),
        };
        if PublicKey::parse(&current).ok().as_ref() != Some(&seen) {
            return Err("the peer's keys answer names another current key than it presented".into());
        }
        let (from, retired) = pinned
            .iter()
            .find_map(|k| missive_federation::rotation::follow(peer, k, &seen, &chain).ok().map(|r| (*k, r)))
            .ok_or_else(|| format!("{peer} presents {seen}, and no rotation statement by its pinned key leads there"))?;
        let learnt = Learnt {
            from: from.to_text(),
            key: seen.to_text(),
            retired: retired.iter().map(|(k, t)| (k.to_text(), *t)).collect(),
        };
        let key = [LEARNT_PREFIX, peer.as_str().as_bytes()].concat();
        self.sequencer.put_meta(key, serde_json::to_vec(&learnt).map_err(|e| e.to_string())?).await.map_err(|e| e.message)?;
        tracing::info!(%peer, old = %from, new = %seen, "peer rotated its key; following it (signed by its old key)");
        self.discovery.learn_rotation(peer, Rotated { from, key: seen, retired });
        Ok(())
    }
}
