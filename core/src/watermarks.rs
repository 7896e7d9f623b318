//! Watermarks: receipts are monotonic per (conversation, user, kind) and max-merged, so
//! repeats and stale receipts change nothing; a device's own read cursor moves the same
//! way. A moved watermark is an event for both users and, for a local user's receipt in
//! a conversation with a remote user, a signed unit queued for that user's server.

use missive_spec::federation::Unit;
use missive_spec::{DeviceId, EventKind, Receipt, ReceiptKind, Watermark};

use crate::records;
use crate::store::{keys, Cf, StoreResult};
use crate::{Core, Error, Tx};

impl Core {
    /// Raises a watermark if `up_to` is beyond it; `device` is set when a local device
    /// sent the receipt. Returns whether the watermark moved.
    pub fn receipt(&mut self, tx: &mut Tx, r: Receipt, device: Option<DeviceId>) -> Result<bool, Error> {
        if let (Some(d), ReceiptKind::Read) = (&device, r.kind) {
            let key = keys::read_cursor(r.user.localpart(), d, &r.conv);
            let cur = self.watermark(tx, Cf::ReadCursors, &key)?;
            if cur.as_ref().is_none_or(|c| *c < r.up_to) {
                tx.batch.put(Cf::ReadCursors, key.clone(), r.up_to.0.to_bytes());
                tx.watermarks.insert(key, r.up_to.clone());
            }
        }
        let key = keys::receipt(&r.conv, &r.user, r.kind);
        let cur = self.watermark(tx, Cf::Receipts, &key)?;
        if cur.as_ref().is_some_and(|c| *c >= r.up_to) {
            return Ok(false);
        }
        tx.batch.put(Cf::Receipts, key.clone(), r.up_to.0.to_bytes());
        tx.watermarks.insert(key, r.up_to.clone());
        for u in [&r.user, &r.peer] {
            // The receipts of someone the local user blocks do not reach them (§6.12).
            if u.is_on(&self.server) && !(u == &r.peer && self.blocks(tx, u.localpart(), &r.user)?) {
                self.push_event(tx, u.localpart(), EventKind::Receipt(r.clone()))?;
            }
        }
        if device.is_some() && !r.peer.is_on(&self.server) {
            let env = self.signer.sign(&Unit::Receipt(r.clone()));
            self.enqueue(tx, &r.peer.server_name(), &r.conv, &env)?;
        }
        Ok(true)
    }

    fn watermark(&self, tx: &Tx, cf: Cf, key: &[u8]) -> StoreResult<Option<Watermark>> {
        if let Some(w) = tx.watermarks.get(key) {
            return Ok(Some(w.clone()));
        }
        match self.store.get(cf, key)? {
            Some(v) => Ok(Some(records::watermark(cf.name(), &v)?)),
            None => Ok(None),
        }
    }
}
