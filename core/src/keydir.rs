//! The key directory (e2ee.md E3, E5): each device's public keys, its one-time keys, each
//! handed out at most once, and its fallback key; and device-list changes told to every
//! user who shares a conversation with the user whose devices changed, across federation
//! through the durable queue like receipts.
//!
//! Signatures are checked by the shell before a command reaches the core (as for units):
//! the core keeps sizes, ownership, the ever-rising key ids and the bounds.

use std::collections::{BTreeMap, BTreeSet};

use missive_spec::e2ee::{ClaimedKey, DeviceKeys, DeviceListChange, OneTimeKey, MAX_KEY_DEVICES, MAX_ONE_TIME_KEYS};
use missive_spec::federation::Unit;
use missive_spec::{ConversationId, DeviceId, ErrorCode, EventKind, ServerName, UserId};

use crate::records::{self, KeyRecord};
use crate::store::{keys, Cf, Direction, Store, StoreResult};
use crate::{Core, Error, Tx};

/// What the server holds for a device after an upload (E3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCount {
    pub one_time: u32,
    pub fallback: bool,
}

/// What a device uploads (E3.1).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Upload {
    pub keys: Option<DeviceKeys>,
    pub fallback: Option<OneTimeKey>,
    pub one_time: Vec<OneTimeKey>,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::refused(ErrorCode::InvalidRequest, message)
}

/// A device's key record as stored, outside the writer.
pub fn key_record(store: &dyn Store, user: &UserId, device: &DeviceId) -> StoreResult<Option<KeyRecord>> {
    match store.get(Cf::DeviceKeys, &keys::device(user.localpart(), device))? {
        Some(v) => Ok(Some(records::decode("device_keys", &v)?)),
        None => Ok(None),
    }
}

/// E3.2: the device keys of a local user's devices, in device id order.
pub fn query(store: &dyn Store, user: &UserId) -> StoreResult<Vec<DeviceKeys>> {
    let rows = store.scan(Cf::DeviceKeys, &keys::devices_of(user.localpart()), None, Direction::Forward, MAX_KEY_DEVICES)?;
    rows.iter().map(|(_, v)| records::decode::<KeyRecord>("device_keys", v).map(|r| r.keys)).collect()
}

/// Whether a local user exists (a removed account's tombstone does not).
pub fn user_exists(store: &dyn Store, user: &UserId) -> StoreResult<bool> {
    match store.get(Cf::Users, &keys::user(user.localpart()))? {
        Some(v) => Ok(records::decode::<records::UserRecord>("users", &v)?.exists()),
        None => Ok(false),
    }
}

/// How many one-time keys the server holds for a device.
pub fn one_time_count(store: &dyn Store, user: &UserId, device: &DeviceId) -> StoreResult<u32> {
    Ok(store.count(Cf::OneTimeKeys, &keys::one_time_keys_of(user.localpart(), device))? as u32)
}

impl Core {
    /// A key-directory record as this group sees it.
    fn kd_get(&self, tx: &Tx, cf: Cf, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        match tx.keydir.get(&(cf, key.to_vec())) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(cf, key),
        }
    }

    fn kd_put(&self, tx: &mut Tx, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        tx.batch.put(cf, key.clone(), value.clone());
        tx.keydir.insert((cf, key), Some(value));
    }

    fn kd_delete(&self, tx: &mut Tx, cf: Cf, key: Vec<u8>) {
        tx.batch.delete(cf, key.clone());
        tx.keydir.insert((cf, key), None);
    }

    /// The one-time keys of a device as this group sees them, by id.
    fn one_time_keys(&self, tx: &Tx, user: &UserId, device: &DeviceId) -> StoreResult<BTreeMap<Vec<u8>, Vec<u8>>> {
        let prefix = keys::one_time_keys_of(user.localpart(), device);
        // Bounded: an upload never leaves more than MAX_ONE_TIME_KEYS.
        let mut all: BTreeMap<Vec<u8>, Vec<u8>> =
            self.store.scan(Cf::OneTimeKeys, &prefix, None, Direction::Forward, MAX_ONE_TIME_KEYS + 1)?.into_iter().collect();
        for ((cf, k), v) in &tx.keydir {
            if *cf == Cf::OneTimeKeys && k.starts_with(&prefix) {
                match v {
                    Some(v) => all.insert(k.clone(), v.clone()),
                    None => all.remove(k),
                };
            }
        }
        Ok(all)
    }

    fn key_record_in(&self, tx: &Tx, user: &UserId, device: &DeviceId) -> StoreResult<Option<KeyRecord>> {
        match self.kd_get(tx, Cf::DeviceKeys, &keys::device(user.localpart(), device))? {
            Some(v) => Ok(Some(records::decode("device_keys", &v)?)),
            None => Ok(None),
        }
    }

    /// E3.1: a device publishes its keys. Device keys are set once per device; one-time
    /// and fallback keys must carry ids above every id the device uploaded before (keys
    /// at or below are skipped, so a repeated upload changes nothing).
    pub fn upload_keys(&mut self, tx: &mut Tx, user: &UserId, device: &DeviceId, up: Upload) -> Result<KeyCount, Error> {
        let (mut rec, new_device) = match (self.key_record_in(tx, user, device)?, up.keys) {
            (Some(rec), Some(k)) if rec.keys != k => {
                return Err(invalid("this device's keys are already published and never change; log in again for a new device"))
            }
            (Some(rec), _) => (rec, false),
            (None, Some(k)) => {
                if k.user != *user || k.device != *device || !k.well_formed() {
                    return Err(invalid("device keys must name the calling user and device, with 32-byte keys and a 64-byte signature"));
                }
                // The device may have been revoked since its request was read: no keys for
                // a device that is gone (they would outlive it).
                let id = (user.localpart().to_owned(), device.clone());
                let exists = !tx.removed.contains(&id)
                    && (tx.devices.contains_key(&id) || self.store.get(Cf::Devices, &keys::device(user.localpart(), device))?.is_some());
                if !exists {
                    return Err(Error::refused(ErrorCode::Unauthorized, "this device was revoked"));
                }
                let prefix = keys::devices_of(user.localpart());
                let added_now = tx.keydir.iter().filter(|((cf, k), v)| *cf == Cf::DeviceKeys && k.starts_with(&prefix) && v.is_some()).count() as u64;
                if self.store.count(Cf::DeviceKeys, &prefix)? + added_now >= MAX_KEY_DEVICES as u64 {
                    return Err(invalid(format!("at most {MAX_KEY_DEVICES} devices with keys; revoke one first")));
                }
                (KeyRecord { keys: k, fallback: None, max_id: 0 }, true)
            }
            (None, None) => return Err(invalid("publish the device keys first")),
        };
        let one_time: Vec<OneTimeKey> = up.one_time.into_iter().filter(|k| k.id > rec.max_id).collect();
        let fallback = up.fallback.filter(|k| k.id > rec.max_id);
        let mut ids = BTreeSet::new();
        for k in one_time.iter().chain(fallback.iter()) {
            if !k.well_formed() {
                return Err(invalid("a one-time or fallback key is 32 bytes with a 64-byte signature"));
            }
            if !ids.insert(k.id) {
                return Err(invalid(format!("key id {} appears twice", k.id)));
            }
        }
        let have = self.one_time_keys(tx, user, device)?.len();
        if have + one_time.len() > MAX_ONE_TIME_KEYS {
            return Err(invalid(format!("at most {MAX_ONE_TIME_KEYS} one-time keys per device; the server holds {have}")));
        }
        for k in &one_time {
            self.kd_put(tx, Cf::OneTimeKeys, keys::one_time_key(user.localpart(), device, k.id), records::encode(k));
        }
        rec.max_id = ids.last().copied().unwrap_or(rec.max_id).max(rec.max_id);
        if let Some(f) = fallback {
            rec.fallback = Some(f);
        }
        let count = KeyCount { one_time: (have + one_time.len()) as u32, fallback: rec.fallback.is_some() };
        self.kd_put(tx, Cf::DeviceKeys, keys::device(user.localpart(), device), records::encode(&rec));
        if new_device {
            self.device_list_changed(tx, user)?;
        }
        Ok(count)
    }

    /// E3.3: one key of each device asked for that has keys: its one-time key with the
    /// lowest id, removed in the same write so no one else ever gets it, or its fallback
    /// key when none is left.
    pub fn claim_keys(&mut self, tx: &mut Tx, user: &UserId, devices: &[DeviceId]) -> Result<Vec<ClaimedKey>, Error> {
        let wanted: BTreeSet<&DeviceId> = devices.iter().collect();
        if wanted.len() > MAX_KEY_DEVICES {
            return Err(invalid(format!("at most {MAX_KEY_DEVICES} devices per claim")));
        }
        let mut out = Vec::new();
        for d in wanted {
            let Some(rec) = self.key_record_in(tx, user, d)? else { continue };
            if let Some((k, v)) = self.one_time_keys(tx, user, d)?.into_iter().next() {
                let key: OneTimeKey = records::decode("one_time_keys", &v)?;
                self.kd_delete(tx, Cf::OneTimeKeys, k);
                out.push(ClaimedKey { key, device: d.clone(), fallback: false });
            } else if let Some(f) = rec.fallback {
                out.push(ClaimedKey { key: f, device: d.clone(), fallback: true });
            }
        }
        Ok(out)
    }

    /// A device is gone (revoked, logged out, its account removed): its keys leave the
    /// directory, and those who share a conversation with its user hear of it (E3.4).
    pub(crate) fn drop_device_keys(&mut self, tx: &mut Tx, user: &UserId, device: &DeviceId) -> Result<(), Error> {
        if self.key_record_in(tx, user, device)?.is_none() {
            return Ok(());
        }
        self.kd_delete(tx, Cf::DeviceKeys, keys::device(user.localpart(), device));
        for (k, _) in self.one_time_keys(tx, user, device)? {
            self.kd_delete(tx, Cf::OneTimeKeys, k);
        }
        self.device_list_changed(tx, user)
    }

    fn device_list_version(&self, tx: &Tx, user: &UserId) -> StoreResult<u64> {
        Ok(match self.kd_get(tx, Cf::DeviceLists, &keys::device_list(user))? {
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| crate::store::StoreError::Corrupt {
                cf: "device_lists",
                reason: "a version is 8 bytes".into(),
            })?),
            None => 0,
        })
    }

    /// Local users with a conversation both members have sent in with `user`.
    fn contacts(&self, user: &UserId) -> StoreResult<Vec<String>> {
        let rows = self.store.scan(Cf::Contacts, &keys::contacts_of(user), None, Direction::Forward, usize::MAX)?;
        Ok(rows.iter().filter_map(|(k, _)| keys::parse_contact(k)).map(|(_, local)| local).collect())
    }

    /// E5: a local user's device list changed: an event for the user's own devices and
    /// for every local user sharing a conversation with them, and one signed unit for each
    /// other server with such a user, queued in the same batch.
    fn device_list_changed(&mut self, tx: &mut Tx, user: &UserId) -> Result<(), Error> {
        let version = self.device_list_version(tx, user)? + 1;
        self.kd_put(tx, Cf::DeviceLists, keys::device_list(user), version.to_be_bytes().to_vec());
        let change = DeviceListChange { user: user.clone(), version };
        self.push_event(tx, user.localpart(), EventKind::Devices(change.clone()))?;
        for local in self.contacts(user)? {
            if local != user.localpart() {
                self.push_event(tx, &local, EventKind::Devices(change.clone()))?;
            }
        }
        let mut servers: BTreeSet<ServerName> = BTreeSet::new();
        for (_, v) in self.store.scan(Cf::UserConvs, &keys::user_conv_prefix(user.localpart()), None, Direction::Forward, usize::MAX)? {
            if let Some(peer) = std::str::from_utf8(&v).ok().and_then(|s| UserId::parse(s).ok()) {
                if !peer.is_on(&self.server) {
                    servers.insert(peer.server_name());
                }
            }
        }
        if !servers.is_empty() {
            let env = self.signer.sign(&Unit::Devices(change));
            // Not part of one conversation: the lane of the user's own id pair.
            let lane = ConversationId::one_to_one(user, user);
            for s in servers {
                self.enqueue(tx, &s, &lane, &env)?;
            }
        }
        Ok(())
    }

    /// E5: a peer's user changed devices: an event for each local user sharing a
    /// conversation with them, unless this version was seen already. Whether it was new.
    pub(crate) fn device_list_change(&mut self, tx: &mut Tx, c: DeviceListChange) -> Result<bool, Error> {
        if self.device_list_version(tx, &c.user)? >= c.version {
            return Ok(false);
        }
        self.kd_put(tx, Cf::DeviceLists, keys::device_list(&c.user), c.version.to_be_bytes().to_vec());
        for local in self.contacts(&c.user)? {
            self.push_event(tx, &local, EventKind::Devices(c.clone()))?;
        }
        Ok(true)
    }
}
