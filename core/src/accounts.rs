//! Accounts, devices and the other small records the writer keeps: presence facts that
//! outlive a restart, and the settlement of outbound transactions (queue rows removed,
//! refused units moved to dead letters).

use missive_spec::{DeviceId, ErrorCode, UserId};

use crate::link::Settlement;
use crate::records::{self, DeviceRecord, PresenceRecord, TokenRecord, UserRecord};
use crate::store::{keys, Cf, Direction};
use crate::{Core, Error, Tx};

pub struct NewDevice {
    pub id: DeviceId,
    pub name: Option<String>,
    pub token_hash: [u8; 32],
}

/// A change to a local user's stored presence facts.
#[derive(Debug, Clone, Copy)]
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
        let rec = UserRecord { password_hash, created_ms: tx.now_ms };
        tx.batch.put(Cf::Users, keys::user(user.localpart()), records::encode(&rec));
        tx.users.insert(user.localpart().to_owned());
        if let Some(d) = device {
            put_device(tx, &user, d);
        }
        Ok(())
    }

    pub fn add_device(&mut self, tx: &mut Tx, user: &UserId, d: NewDevice) -> Result<(), Error> {
        if !self.user_exists(tx, user)? {
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
        }
        Ok(())
    }
}

fn put_device(tx: &mut Tx, user: &UserId, d: NewDevice) {
    let rec = DeviceRecord { name: d.name, created_ms: tx.now_ms, token_hash: d.token_hash };
    tx.batch.put(Cf::Devices, keys::device(user.localpart(), &d.id), records::encode(&rec));
    let tok = TokenRecord { user: user.clone(), device: d.id.clone() };
    tx.batch.put(Cf::Tokens, keys::token(&d.token_hash), records::encode(&tok));
    tx.devices.insert((user.localpart().to_owned(), d.id), d.token_hash);
}
