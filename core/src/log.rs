//! The conversation log: numbering (`origin_seq` without gaps), `deps` from the
//! conversation's heads, idempotent sends on `(device, client_msg_id)`, the events that
//! tell local users, and the outbound queue entry that carries a message or receipt to
//! another server — all in the batch of the change that makes them.

use missive_spec::federation::{SignedUnit, Unit};
use missive_spec::{ClientMsgId, Content, ConversationId, Deps, DeviceId, Event, EventKind, Message, ServerName, UserId};

use crate::records::{self, ConvRecord, MsgIdRecord, SendIdRecord};
use crate::store::{keys, Cf, Direction, StoreResult};
use crate::{Core, Error, Tx};

/// A unit that never leaves this server, in an envelope without a signature so that it is
/// stored like every other (a verifier refuses it: it names no key).
pub fn unsigned(unit: &Unit) -> SignedUnit {
    SignedUnit { key: String::new(), sig: Vec::new(), unit: missive_spec::codec::encode(unit) }
}

impl Core {
    /// A local user's message: numbered, stored with its events and, for a remote
    /// recipient, queued for its server — or, for a `client_msg_id` already used by this
    /// device, the message that id created.
    #[allow(clippy::too_many_arguments)]
    pub fn send(&mut self, tx: &mut Tx, from: UserId, device: DeviceId, to: UserId, client_msg_id: ClientMsgId, content: Content) -> Result<Message, Error> {
        let send_key = keys::send_id(from.localpart(), &device, &client_msg_id);
        let forget = self.faults.forget_sends();
        if let Some(m) = tx.sends.get(&send_key).filter(|_| !forget) {
            return Ok(m.clone());
        }
        if let Some(v) = self.store.get(Cf::SendIds, &send_key)?.filter(|_| !forget) {
            let rec: SendIdRecord = records::decode("send_ids", &v)?;
            let mut full = keys::messages_of(&rec.conv);
            full.extend_from_slice(&rec.key);
            let bytes = self.store.get(Cf::Messages, &full)?.ok_or_else(|| crate::store::StoreError::Corrupt {
                cf: "send_ids",
                reason: format!("send id points at a missing message in {}", rec.conv),
            })?;
            return Ok(records::stored_message(&bytes)?);
        }
        self.may_number_for(&to.server_name())?;
        let conv_id = ConversationId::one_to_one(&from, &to);
        let mut conv = self.conv(&conv_id, &from, &to)?;
        let me = self.server.clone();
        let seq = conv.heads.get(&me) + 1;
        let mut deps = conv.heads.clone();
        deps.set(me.clone(), seq);
        let msg = Message { to: to.clone(), ts: tx.now_ms, seq, conv: conv_id, deps, from, origin: me, content };
        // A conversation of two of our own users never leaves this server, and no peer may
        // ask for it (F7): its messages are stored without a signature.
        let unit = Unit::Message(msg.clone());
        let env = if to.is_on(&self.server) { unsigned(&unit) } else { self.signer.sign(&unit) };
        self.store_message(tx, &mut conv, &env, &msg, env.hash())?;
        tx.batch.put(Cf::SendIds, send_key.clone(), records::encode(&SendIdRecord::new(conv_id, &msg.order_key())));
        if !to.is_on(&self.server) {
            self.enqueue(tx, &to.server_name(), &conv_id, &env)?;
        }
        self.save_conv(tx, conv_id, conv);
        tx.sends.insert(send_key, msg.clone());
        Ok(msg)
    }

    /// Stores a message (local or remote) with its index entries and events, and moves
    /// the conversation's head for its origin.
    pub(crate) fn store_message(&mut self, tx: &mut Tx, conv: &mut ConvRecord, env: &SignedUnit, msg: &Message, hash: [u8; 32]) -> StoreResult<()> {
        let key = msg.order_key();
        tx.batch.put(Cf::Messages, keys::message(&msg.conv, &key), records::encode(env));
        let id = MsgIdRecord { key: key.to_bytes(), hash };
        tx.batch.put(Cf::MsgIds, keys::msg_id(&msg.conv, &msg.origin, msg.seq), records::encode(&id));
        tx.stored.insert((msg.conv, msg.origin.clone(), msg.seq), hash);
        conv.heads.set(msg.origin.clone(), msg.seq);
        // The two users share the conversation (§12: presence, typing) from the moment
        // both have sent in it; the indexes that say so are written then, once.
        let shared_now = !conv.senders.contains(&msg.from) && {
            conv.senders.push(msg.from.clone());
            conv.senders.len() == 2
        };
        // Activity never goes back in time, whatever the clock does, so that the entry
        // replaced is always the one the record names.
        let (was, now) = (conv.active_ms, conv.active_ms.max(tx.now_ms));
        conv.active_ms = now;
        for (user, peer) in [(&msg.from, &msg.to), (&msg.to, &msg.from)] {
            if user.is_on(&self.server) {
                if was != now {
                    if was != 0 {
                        tx.batch.delete(Cf::Active, keys::active(user.localpart(), was, &msg.conv));
                    }
                    tx.batch.put(Cf::Active, keys::active(user.localpart(), now, &msg.conv), peer.as_str().as_bytes().to_vec());
                }
                if shared_now {
                    tx.batch.put(Cf::UserConvs, keys::user_conv(user.localpart(), &msg.conv), peer.as_str().as_bytes().to_vec());
                    tx.batch.put(Cf::Contacts, keys::contact(peer, user.localpart()), Vec::new());
                }
                // A recipient who blocks the sender never gets the message (§6.12); the
                // indexes above stay as for any message, and read around it.
                if user == &msg.to && self.blocks(tx, user.localpart(), &msg.from)? {
                    tx.batch.put(Cf::Withheld, keys::message(&msg.conv, &key), Vec::new());
                } else {
                    self.push_event(tx, user.localpart(), EventKind::Message(msg.clone()))?;
                }
            }
        }
        Ok(())
    }

    /// Indexes by activity (§6.10) up to `n` conversations stored before the index
    /// existed, after `after` in key order: each takes the time of its newest message,
    /// clamped to now. Returns where to go on from, or `None` when every conversation has
    /// been looked at. The writer runs it at start until done; indexed records are skipped,
    /// so a second run changes nothing.
    pub fn index_activity(&mut self, tx: &mut Tx, after: Option<ConversationId>, n: usize) -> StoreResult<Option<ConversationId>> {
        let from = after.map(|c| keys::conv(&c));
        let rows = self.store.scan(Cf::Convs, &[], from.as_deref(), Direction::Forward, n)?;
        let mut last = None;
        for (k, v) in &rows {
            let Ok(id) = <[u8; ConversationId::LEN]>::try_from(k.as_slice()).map(ConversationId) else { continue };
            last = Some(id);
            let mut conv: ConvRecord = records::decode("convs", v)?;
            if conv.active_ms != 0 {
                continue;
            }
            let Some((_, newest)) = self.store.scan(Cf::Messages, &keys::messages_of(&id), None, Direction::Reverse, 1)?.into_iter().next() else {
                continue;
            };
            conv.active_ms = records::stored_message(&newest)?.ts.clamp(1, tx.now_ms.max(1));
            if let [a, b] = conv.members.as_slice() {
                for (user, peer) in [(a, b), (b, a)] {
                    if user.is_on(&self.server) {
                        tx.batch.put(Cf::Active, keys::active(user.localpart(), conv.active_ms, &id), peer.as_str().as_bytes().to_vec());
                    }
                }
            }
            self.save_conv(tx, id, conv);
        }
        Ok(if rows.len() < n { None } else { last })
    }

    /// Appends an event to a local user's stream.
    pub(crate) fn push_event(&mut self, tx: &mut Tx, localpart: &str, kind: EventKind) -> StoreResult<()> {
        let pos = self.head(localpart)? + 1;
        let ev = Event { pos, event: kind };
        tx.batch.put(Cf::Events, keys::event(localpart, pos), records::encode(&ev));
        self.heads.insert(localpart.to_owned(), pos);
        tx.wake.insert(localpart.to_owned(), pos);
        Ok(())
    }

    /// Queues a unit for a peer, in the lane of its conversation, in the same batch as
    /// the change that made it.
    pub(crate) fn enqueue(&mut self, tx: &mut Tx, dest: &ServerName, conv: &ConversationId, env: &SignedUnit) -> StoreResult<()> {
        let lane = keys::lane_of(conv);
        let p = self.lane_position(dest, lane)?;
        *p += 1;
        let pos = *p;
        tx.batch.put(Cf::OutQueue, keys::queue(dest, lane, pos), records::encode(env));
        tx.outbound.insert(dest.clone());
        Ok(())
    }

    /// The last position handed out or settled in a lane (the lane's last stored key the
    /// first time it is looked at).
    pub(crate) fn lane_position(&mut self, dest: &ServerName, lane: u8) -> StoreResult<&mut u64> {
        let slot = (dest.clone(), lane);
        let initial = match self.queues.get(&slot) {
            Some(_) => 0,
            None => self.last_key(Cf::OutQueue, &keys::queue_lane(dest, lane))?.and_then(|k| keys::parse_queue(&k)).map_or(0, |(_, _, p)| p),
        };
        Ok(self.queues.entry(slot).or_insert(initial))
    }

    /// The conversation's record, if it exists (cached).
    pub(crate) fn stored_conv(&mut self, conv: &ConversationId) -> StoreResult<Option<ConvRecord>> {
        if let Some(c) = self.convs.get(conv) {
            return Ok(Some(c.clone()));
        }
        let Some(v) = self.store.get(Cf::Convs, &keys::conv(conv))? else { return Ok(None) };
        let rec: ConvRecord = records::decode("convs", &v)?;
        self.convs.insert(*conv, rec.clone());
        Ok(Some(rec))
    }

    /// The conversation's record, or a new one of `a` and `b`.
    pub(crate) fn conv(&mut self, conv: &ConversationId, a: &UserId, b: &UserId) -> StoreResult<ConvRecord> {
        if let Some(rec) = self.stored_conv(conv)? {
            return Ok(rec);
        }
        let mut members = vec![a.clone(), b.clone()];
        members.sort();
        Ok(ConvRecord { members, heads: Deps::new(), senders: Vec::new(), active_ms: 0 })
    }

    pub(crate) fn save_conv(&mut self, tx: &mut Tx, id: ConversationId, conv: ConvRecord) {
        tx.batch.put(Cf::Convs, keys::conv(&id), records::encode(&conv));
        self.convs.insert(id, conv);
    }

    fn last_key(&self, cf: Cf, prefix: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.store.scan(cf, prefix, None, Direction::Reverse, 1)?.into_iter().next().map(|(k, _)| k))
    }

    fn head(&mut self, localpart: &str) -> StoreResult<u64> {
        if let Some(h) = self.heads.get(localpart) {
            return Ok(*h);
        }
        let stored = self.last_key(Cf::Events, &keys::events_of(localpart))?.and_then(|k| keys::parse_event(&k)).map(|(_, p)| p).unwrap_or(0);
        let head = stored.max(self.event_floor());
        self.heads.insert(localpart.to_owned(), head);
        Ok(head)
    }
}
