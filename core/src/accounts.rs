//! Accounts, devices and the other small records the writer keeps: presence facts that
//! outlive a restart, and the settlement of outbound transactions (queue rows removed,
//! refused units moved to dead letters).

use missive_spec::federation::Unit;
use missive_spec::{DeviceId, ErrorCode, EventKind, ServerName, Undeliverable, UserId};

use crate::link::Settlement;
use crate::records::{self, DeadLetter, DeviceRecord, PresenceRecord, TokenRecord, UserRecord};
use crate::store::{keys, Cf, Direction, StoreResult};
use crate::{Core, Error, Tx};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewDevice {
    pub id: DeviceId,
    pub name: Option<String>,
    pub token_hash: [u8; 32],
}

/// An operator's (or, for the password, the user's own) change to an account.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum AccountChange {
    /// A new password hash; with `logout_others`, every device but `keep` is revoked.
    Password { hash: String, logout_others: bool, keep: Option<DeviceId> },
    /// Disables (every device revoked, no login) or enables the account.
    Disabled(bool),
    /// Removes the account for good (§6.2).
    Remove,
    /// Starts (true) or ends (false) a block of that user (§6.12).
    Block(UserId, bool),
}

/// A change to a local user's stored presence facts.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub enum PresenceChange {
    /// The user's last subscription ended at this time (ms).
    LastSeen(u64),
    HideLastSeen(bool),
}

impl Core {
    fn user_exists(&self, tx: &Tx, user: &UserId) -> Result<bool, Error> {
        Ok(tx.users.contains(user.localpart()) || self.store.get(Cf::Users, &keys::user(user.localpart()))?.is_some())
    }

    pub fn create_user(&mut self, tx: &mut Tx, user: UserId, password_hash: String, device: Option<NewDevice>) -> Result<(), Error> {
        if self.user_exists(tx, &user)? {
            return Err(Error::refused(ErrorCode::UserExists, format!("{user} already exists")));
        }
        let rec = UserRecord { password_hash, created_ms: tx.now_ms, disabled: false, removed_ms: None };
        tx.users.insert(user.localpart().to_owned());
        self.save_user(tx, &user, rec);
        if let Some(d) = device {
            put_device(tx, &user, d);
        }
        Ok(())
    }

    /// The stored record of a local user, as this group has changed it.
    fn user_record(&self, tx: &Tx, user: &UserId) -> Result<UserRecord, Error> {
        if let Some(r) = tx.accounts.get(user.localpart()) {
            return Ok(r.clone());
        }
        match self.store.get(Cf::Users, &keys::user(user.localpart()))? {
            Some(v) => Ok(records::decode("users", &v)?),
            None => Err(Error::refused(ErrorCode::UnknownUser, format!("no such user {user}"))),
        }
    }

    fn save_user(&self, tx: &mut Tx, user: &UserId, rec: UserRecord) {
        tx.batch.put(Cf::Users, keys::user(user.localpart()), records::encode(&rec));
        tx.accounts.insert(user.localpart().to_owned(), rec);
    }

    /// Revokes every device of a user but `keep`; returns the devices revoked.
    fn remove_devices(&mut self, tx: &mut Tx, user: &UserId, keep: Option<&DeviceId>) -> Result<Vec<DeviceId>, Error> {
        let mut ids: Vec<DeviceId> = tx.devices.keys().filter(|(l, _)| l == user.localpart()).map(|(_, d)| d.clone()).collect();
        for (k, _) in self.store.scan(Cf::Devices, &keys::devices_of(user.localpart()), None, Direction::Forward, usize::MAX)? {
            ids.extend(keys::parse_device(&k).map(|(_, id)| id));
        }
        ids.sort();
        ids.dedup();
        let mut gone = Vec::new();
        for id in ids {
            if Some(&id) != keep {
                self.remove_device(tx, user, id.clone())?;
                gone.push(id);
            }
        }
        Ok(gone)
    }

    /// Applies an account change; returns the devices it revoked.
    pub fn change_account(&mut self, tx: &mut Tx, user: &UserId, change: AccountChange) -> Result<Vec<DeviceId>, Error> {
        match change {
            AccountChange::Password { hash, logout_others, keep } => self.set_password(tx, user, hash, logout_others, keep.as_ref()),
            AccountChange::Disabled(d) => self.set_disabled(tx, user, d),
            AccountChange::Remove => self.remove_user(tx, user),
            AccountChange::Block(other, on) => self.set_block(tx, user, other, on).map(|()| Vec::new()),
        }
    }

    fn set_block(&mut self, tx: &mut Tx, user: &UserId, other: UserId, on: bool) -> Result<(), Error> {
        if other == *user {
            return Err(Error::refused(ErrorCode::InvalidRequest, "one cannot block oneself"));
        }
        let present = self.blocks(tx, user.localpart(), &other)?;
        let key = keys::block(user.localpart(), &other);
        match (on, present) {
            (true, false) => {
                // Blocks added earlier in this group are not in the store yet.
                let pending = tx.blocks.iter().filter(|(k, on)| **on && k.starts_with(&keys::blocks_of(user.localpart()))).count() as u64;
                if self.store.count(Cf::Blocks, &keys::blocks_of(user.localpart()))? + pending >= missive_spec::limits::MAX_BLOCKED as u64 {
                    return Err(Error::refused(ErrorCode::InvalidRequest, format!("at most {} users may be blocked", missive_spec::limits::MAX_BLOCKED)));
                }
                tx.batch.put(Cf::Blocks, key.clone(), tx.now_ms.to_be_bytes().to_vec());
                tx.blocks.insert(key, true);
            }
            (false, true) => {
                tx.batch.delete(Cf::Blocks, key.clone());
                tx.blocks.insert(key, false);
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether local user `localpart` blocks `other` (§6.12), this group's changes included.
    pub fn blocks(&self, tx: &Tx, localpart: &str, other: &UserId) -> StoreResult<bool> {
        let key = keys::block(localpart, other);
        if let Some(on) = tx.blocks.get(&key) {
            return Ok(*on);
        }
        Ok(self.store.get(Cf::Blocks, &key)?.is_some())
    }

    fn set_password(&mut self, tx: &mut Tx, user: &UserId, password_hash: String, logout_others: bool, keep: Option<&DeviceId>) -> Result<Vec<DeviceId>, Error> {
        let mut rec = self.user_record(tx, user)?;
        if !rec.exists() {
            return Err(Error::refused(ErrorCode::UnknownUser, format!("{user} was removed")));
        }
        rec.password_hash = password_hash;
        self.save_user(tx, user, rec);
        if logout_others {
            return self.remove_devices(tx, user, keep);
        }
        Ok(Vec::new())
    }

    fn set_disabled(&mut self, tx: &mut Tx, user: &UserId, disabled: bool) -> Result<Vec<DeviceId>, Error> {
        let mut rec = self.user_record(tx, user)?;
        if !rec.exists() {
            return Err(Error::refused(ErrorCode::UnknownUser, format!("{user} was removed")));
        }
        rec.disabled = disabled;
        self.save_user(tx, user, rec);
        if disabled {
            return self.remove_devices(tx, user, None);
        }
        Ok(Vec::new())
    }

    /// Removes an account: every device revoked, the record kept as a tombstone so that
    /// the id is never issued again (§6.2). Its messages stay in the conversations of the
    /// people it wrote to.
    fn remove_user(&mut self, tx: &mut Tx, user: &UserId) -> Result<Vec<DeviceId>, Error> {
        let mut rec = self.user_record(tx, user)?;
        if !rec.exists() {
            return Err(Error::refused(ErrorCode::UnknownUser, format!("{user} was already removed")));
        }
        rec.removed_ms = Some(tx.now_ms);
        rec.password_hash = String::new();
        self.save_user(tx, user, rec);
        self.remove_devices(tx, user, None)
    }

    pub fn add_device(&mut self, tx: &mut Tx, user: &UserId, d: NewDevice) -> Result<(), Error> {
        if !self.user_exists(tx, user)? || self.user_record(tx, user).is_ok_and(|r| !r.may_log_in()) {
            return Err(Error::refused(ErrorCode::BadCredentials, "wrong user or password"));
        }
        put_device(tx, user, d);
        Ok(())
    }

    /// Removes a device, its token and its read cursors; the user's watermarks stay.
    pub fn remove_device(&mut self, tx: &mut Tx, user: &UserId, device: DeviceId) -> Result<(), Error> {
        let id = (user.localpart().to_owned(), device.clone());
        if tx.removed.contains(&id) {
            return Ok(());
        }
        let hash = match tx.devices.get(&id) {
            Some(h) => Some(*h),
            None => match self.store.get(Cf::Devices, &keys::device(user.localpart(), &device))? {
                Some(v) => Some(records::decode::<DeviceRecord>("devices", &v)?.token_hash),
                None => None,
            },
        };
        self.drop_device_keys(tx, user, &device)?;
        if let Some(h) = hash {
            tx.batch.delete(Cf::Tokens, keys::token(&h));
            tx.batch.delete(Cf::Devices, keys::device(user.localpart(), &device));
            let prefix = keys::read_cursors_of(user.localpart(), &device);
            for (k, _) in self.store.scan(Cf::ReadCursors, &prefix, None, Direction::Forward, usize::MAX)? {
                tx.watermarks.remove(&k);
                tx.batch.delete(Cf::ReadCursors, k);
            }
        }
        tx.removed.insert(id);
        Ok(())
    }

    /// Changes a local user's presence record; returns the record as it will be stored.
    pub fn presence(&mut self, tx: &mut Tx, localpart: String, change: PresenceChange) -> Result<PresenceRecord, Error> {
        let mut rec = match tx.presence.get(&localpart) {
            Some(r) => r.clone(),
            None => match self.store.get(Cf::Presence, &keys::presence(&localpart))? {
                Some(v) => records::decode("presence", &v)?,
                None => PresenceRecord::default(),
            },
        };
        match change {
            PresenceChange::LastSeen(ms) => rec.last_seen_ms = Some(rec.last_seen_ms.unwrap_or(0).max(ms)),
            PresenceChange::HideLastSeen(hide) => rec.hide_last_seen = hide,
        }
        tx.batch.put(Cf::Presence, keys::presence(&localpart), records::encode(&rec));
        tx.presence.insert(localpart, rec.clone());
        Ok(rec)
    }

    /// Settles an outbound transaction (see [`crate::link::Settlement`]): removes the
    /// queue rows the peer took and moves the ones it refused for good to dead letters.
    /// Remembers each lane's highest settled position, so that the lane's next unit gets a
    /// higher one even if the lane is now empty (its sender reads on after what it settled).
    pub fn settle(&mut self, tx: &mut Tx, s: &Settlement) -> Result<(), Error> {
        for k in s.delivered.iter().chain(s.dead.iter().map(|(k, _)| k)) {
            if let Some((dest, lane, pos)) = keys::parse_queue(k) {
                let p = self.lane_position(&dest, lane)?;
                *p = (*p).max(pos);
            }
        }
        for k in &s.delivered {
            tx.batch.delete(Cf::OutQueue, k.clone());
        }
        for (k, dl) in &s.dead {
            tx.batch.put(Cf::DeadLetters, k.clone(), records::encode(dl));
            tx.batch.delete(Cf::OutQueue, k.clone());
            // A refused message of a local user: every device of the sender learns it (§10.5).
            if let Ok(Unit::Message(m)) = missive_spec::codec::decode::<Unit>(&dl.unit.unit) {
                if m.from.is_on(&self.server) && m.origin == self.server {
                    let key = keys::message(&m.conv, &m.order_key());
                    let u = Undeliverable { seq: m.seq, conv: m.conv, origin: m.origin, reason: dl.reason.clone() };
                    tx.batch.put(Cf::Failed, key, records::encode(&u));
                    self.push_event(tx, m.from.localpart(), EventKind::Undeliverable(u))?;
                }
            }
        }
        Ok(())
    }
}

/// An operator's change to what waits for other servers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum QueueChange {
    /// Drops every unit queued for a destination (a peer removed, a mistyped name).
    DropDestination(ServerName),
    /// Puts dead letters (by their keys) back at the end of their lanes, to be sent again.
    RetryDead(Vec<Vec<u8>>),
    /// Deletes dead letters (by their keys).
    DropDead(Vec<Vec<u8>>),
}

impl Core {
    /// Applies an operator's queue change; returns how many units it touched.
    pub fn change_queue(&mut self, tx: &mut Tx, change: QueueChange) -> Result<usize, Error> {
        match change {
            QueueChange::DropDestination(dest) => {
                let rows = self.store.scan(Cf::OutQueue, &keys::queue_of(&dest), None, Direction::Forward, usize::MAX)?;
                for (k, _) in &rows {
                    tx.batch.delete(Cf::OutQueue, k.clone());
                }
                Ok(rows.len())
            }
            QueueChange::RetryDead(ids) => {
                let mut n = 0;
                for k in ids {
                    let (Some((dest, lane, _)), Some(v)) = (keys::parse_queue(&k), self.store.get(Cf::DeadLetters, &k)?) else { continue };
                    let dl: DeadLetter = records::decode("dead_letters", &v)?;
                    // Sent again: no longer failed, unless refused again.
                    if let Ok(Unit::Message(m)) = missive_spec::codec::decode::<Unit>(&dl.unit.unit) {
                        tx.batch.delete(Cf::Failed, keys::message(&m.conv, &m.order_key()));
                    }
                    let p = self.lane_position(&dest, lane)?;
                    *p += 1;
                    let pos = *p;
                    tx.batch.put(Cf::OutQueue, keys::queue(&dest, lane, pos), records::encode(&dl.unit));
                    tx.batch.delete(Cf::DeadLetters, k);
                    tx.outbound.insert(dest);
                    n += 1;
                }
                Ok(n)
            }
            QueueChange::DropDead(ids) => {
                let mut n = 0;
                for k in ids {
                    if self.store.get(Cf::DeadLetters, &k)?.is_some() {
                        tx.batch.delete(Cf::DeadLetters, k);
                        n += 1;
                    }
                }
                Ok(n)
            }
        }
    }
}

fn put_device(tx: &mut Tx, user: &UserId, d: NewDevice) {
    let rec = DeviceRecord { name: d.name, created_ms: tx.now_ms, token_hash: d.token_hash };
    tx.batch.put(Cf::Devices, keys::device(user.localpart(), &d.id), records::encode(&rec));
    let tok = TokenRecord { user: user.clone(), device: d.id.clone() };
    tx.batch.put(Cf::Tokens, keys::token(&d.token_hash), records::encode(&tok));
    tx.devices.insert((user.localpart().to_owned(), d.id), d.token_hash);
}
