//! The key directory's requests (e2ee.md E3), for clients and for peers: signatures are
//! checked here, before the writer (`missive_core::keydir`) stores or hands out a key;
//! a remote user's keys are asked of their own server over the federation link.
//!
//! Bounds: an upload carries at most [`MAX_ONE_TIME_KEYS`] keys (and the server holds at
//! most that many per device); a claim names at most [`MAX_KEY_DEVICES`] devices; each
//! user may claim [`CLAIMS_PER_MINUTE`] times a minute and each peer server
//! [`PEER_CLAIMS_PER_MINUTE`] times, so nobody drains a user's one-time keys faster than
//! the user's devices replenish them (and the fallback key keeps sessions possible when
//! they do).

use std::sync::Arc;
use std::time::Instant;

use ed25519_dalek::{Signature, VerifyingKey};
use missive_core::keydir::{self, Upload};
use missive_spec::e2ee::{DeviceKeys, OneTimeKey, MAX_KEY_DEVICES, MAX_ONE_TIME_KEYS};
use missive_spec::federation::{FedErrorCode, FedRequest, FedResponse};
use missive_spec::{DeviceId, ErrorCode, Response, ServerName, UserId};

use crate::error::ApiError;
use crate::service::Service;

/// Claims one user may make a minute (each claim takes one key of each device named).
pub const CLAIMS_PER_MINUTE: u32 = 120;
/// Claims one peer server may make a minute, for all its users.
pub const PEER_CLAIMS_PER_MINUTE: u32 = 600;

fn verify(ed25519: &[u8], bytes: &[u8], sig: &[u8]) -> bool {
    let (Ok(k), Ok(s)) = (<[u8; 32]>::try_from(ed25519), <[u8; 64]>::try_from(sig)) else { return false };
    VerifyingKey::from_bytes(&k).is_ok_and(|k| k.verify_strict(bytes, &Signature::from_bytes(&s)).is_ok())
}

/// Whether device keys are well formed and signed by their own ed25519 key (E2.1).
pub fn device_keys_valid(k: &DeviceKeys) -> bool {
    k.well_formed() && verify(&k.ed25519, &k.signed_bytes(), &k.sig)
}

fn one_time_key_valid(k: &OneTimeKey, owner: &DeviceKeys, fallback: bool) -> bool {
    k.well_formed() && verify(&owner.ed25519, &k.signed_bytes(&owner.user, &owner.device, fallback), &k.sig)
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

/// What a peer answered to a query or claim, checked: only its own user's devices, within
/// the bounds, each claimed key for a device asked for.
fn remote_devices(user: &UserId, res: FedResponse) -> Result<Vec<DeviceKeys>, String> {
    match res {
        FedResponse::DeviceKeys { user: u, devices } if u == *user => {
            if devices.len() > MAX_KEY_DEVICES || devices.iter().any(|d| d.user != *user || !d.well_formed()) {
                return Err("the user's server answered with devices that are not the user's".into());
            }
            Ok(devices)
        }
        FedResponse::Error { code, message } => Err(format!("{code:?}: {message}")),
        other => Err(format!("unexpected answer: {other:?}")),
    }
}

impl Service {
    /// E3.1: `keys_upload`.
    pub(crate) async fn keys_upload(
        self: &Arc<Self>,
        auth: Option<String>,
        keys: Option<DeviceKeys>,
        fallback: Option<OneTimeKey>,
        one_time: Vec<OneTimeKey>,
    ) -> Result<Response, ApiError> {
        if one_time.len() > MAX_ONE_TIME_KEYS {
            return Err(invalid(format!("at most {MAX_ONE_TIME_KEYS} one-time keys per upload")));
        }
        let (c, stored) = self
            .read(auth, |s, c| {
                let stored = keydir::key_record(&*s.store, &c.user, &c.device)?;
                Ok((c, stored))
            })
            .await?;
        let owner = match (&keys, stored) {
            (Some(k), _) => {
                if !device_keys_valid(k) {
                    return Err(invalid("the device keys' signature does not verify with their ed25519 key"));
                }
                k.clone()
            }
            (None, Some(r)) => r.keys,
            (None, None) => return Err(invalid("publish the device keys first")),
        };
        if one_time.iter().any(|k| !one_time_key_valid(k, &owner, false)) {
            return Err(invalid("a one-time key's signature does not verify with the device's ed25519 key"));
        }
        if fallback.as_ref().is_some_and(|k| !one_time_key_valid(k, &owner, true)) {
            return Err(invalid("the fallback key's signature does not verify with the device's ed25519 key"));
        }
        let count = self.sequencer.upload_keys(c.user.clone(), c.device.clone(), Upload { keys, fallback, one_time }).await?;
        self.hub.wake(c.user.localpart());
        Ok(Response::KeyCount { fallback: count.fallback, one_time: count.one_time })
    }

    /// E3.2: `keys_query`, for a local user from the store, for a remote one from their
    /// server.
    pub(crate) async fn keys_query(self: &Arc<Self>, auth: Option<String>, user: UserId) -> Result<Response, ApiError> {
        let _ = self.read(auth, |_, c| Ok(c)).await?;
        let devices = match user.is_on(&self.server) {
            true => {
                let (store, u) = (self.store.clone(), user.clone());
                let exists = crate::store::blocking(move || keydir::user_exists(&*store, &u)).await??;
                if !exists {
                    return Err(ApiError::new(ErrorCode::UnknownUser, format!("{user} does not exist")));
                }
                self.local_device_keys(user.clone()).await?
            }
            false => {
                let res = self.ask_remote(&user.server_name(), FedRequest::KeysQuery { user: user.clone() }).await?;
                remote_devices(&user, res).map_err(|e| remote_unavailable(&user, e))?
            }
        };
        Ok(Response::DeviceKeys { user, devices })
    }

    /// E3.3: `keys_claim`, in the writer for a local user, by the user's server for a
    /// remote one.
    pub(crate) async fn keys_claim(self: &Arc<Self>, auth: Option<String>, user: UserId, devices: Vec<DeviceId>) -> Result<Response, ApiError> {
        let c = self.read(auth, |_, c| Ok(c)).await?;
        if devices.len() > MAX_KEY_DEVICES {
            return Err(invalid(format!("at most {MAX_KEY_DEVICES} devices per claim")));
        }
        if let Err(wait) = self.claims.reserve(&c.user, Instant::now()) {
            let msg = format!("at most {CLAIMS_PER_MINUTE} key claims a minute; again in {} s", wait.as_secs() + 1);
            return Err(ApiError::new(ErrorCode::RateLimited, msg));
        }
        let keys = match user.is_on(&self.server) {
            true => self.sequencer.claim_keys(user, devices).await?,
            false => {
                let res = self.ask_remote(&user.server_name(), FedRequest::KeysClaim { user: user.clone(), devices: devices.clone() }).await?;
                match res {
                    FedResponse::Claimed { keys } if keys.iter().all(|k| devices.contains(&k.device)) && keys.len() <= devices.len() => keys,
                    FedResponse::Claimed { .. } => {
                        return Err(remote_unavailable(&user, "the user's server handed out keys of devices not asked for".into()))
                    }
                    FedResponse::Error { code, message } => return Err(remote_unavailable(&user, format!("{code:?}: {message}"))),
                    other => return Err(remote_unavailable(&user, format!("unexpected answer: {other:?}"))),
                }
            }
        };
        Ok(Response::Claimed { keys })
    }

    async fn local_device_keys(self: &Arc<Self>, user: UserId) -> Result<Vec<DeviceKeys>, ApiError> {
        let store = self.store.clone();
        let mut devices = crate::store::blocking(move || keydir::query(&*store, &user)).await??;
        if crate::sabotage::active(crate::sabotage::Fault::SubstituteDeviceKeys) {
            devices = devices.into_iter().map(substitute).collect();
        }
        Ok(devices)
    }

    async fn ask_remote(&self, server: &ServerName, req: FedRequest) -> Result<FedResponse, ApiError> {
        let Some(fed) = self.federation.get() else {
            return Err(ApiError::new(ErrorCode::RemoteUnavailable, "federation is not running"));
        };
        if !self.policy.allows(server) {
            return Err(ApiError::new(ErrorCode::RemoteUnavailable, format!("{server} is refused by this server's federation policy")));
        }
        fed.ask(server, req).await.map_err(|e| ApiError::new(ErrorCode::RemoteUnavailable, format!("{server}: {e}")))
    }

    /// A peer's `keys_query` (E3.2) for a user of this server.
    pub async fn peer_keys_query(self: &Arc<Self>, user: UserId) -> FedResponse {
        if !user.is_on(&self.server) {
            return FedResponse::Error { code: FedErrorCode::Forbidden, message: format!("{user} is not a user of this server") };
        }
        match self.local_device_keys(user.clone()).await {
            Ok(devices) => FedResponse::DeviceKeys { user, devices },
            Err(e) => FedResponse::Error { code: FedErrorCode::Internal, message: e.message },
        }
    }

    /// A peer's `keys_claim` (E3.3) for a user of this server.
    pub async fn peer_keys_claim(self: &Arc<Self>, peer: &ServerName, user: UserId, devices: Vec<DeviceId>) -> FedResponse {
        if !user.is_on(&self.server) {
            return FedResponse::Error { code: FedErrorCode::Forbidden, message: format!("{user} is not a user of this server") };
        }
        if devices.len() > MAX_KEY_DEVICES {
            return FedResponse::Error { code: FedErrorCode::TooMany, message: format!("at most {MAX_KEY_DEVICES} devices per claim") };
        }
        if let Err(wait) = self.peer_claims.reserve(peer, Instant::now()) {
            let message = format!("at most {PEER_CLAIMS_PER_MINUTE} key claims a minute; again in {} s", wait.as_secs() + 1);
            return FedResponse::Error { code: FedErrorCode::RateLimited, message };
        }
        match self.sequencer.claim_keys(user, devices).await {
            Ok(keys) => FedResponse::Claimed { keys },
            Err(e) => FedResponse::Error { code: FedErrorCode::Internal, message: e.message },
        }
    }
}

fn remote_unavailable(user: &UserId, why: String) -> ApiError {
    ApiError::new(ErrorCode::RemoteUnavailable, format!("cannot get the keys of {user} from their server: {why}"))
}

/// The `substitute_device_keys` fault: each device's keys replaced by fresh ones, signed
/// by the fresh key, as a server that wants to read along would.
fn substitute(k: DeviceKeys) -> DeviceKeys {
    use ed25519_dalek::Signer;
    let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let mut fake = DeviceKeys {
        sig: Vec::new(),
        ed25519: signing.verifying_key().to_bytes().to_vec(),
        curve25519: rand::random::<[u8; 32]>().to_vec(),
        ..k
    };
    fake.sig = signing.sign(&fake.signed_bytes()).to_bytes().to_vec();
    fake
}
