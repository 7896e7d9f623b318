//! What a unit from a peer must satisfy once its signature verified (F6.2): it speaks for
//! a user of the sending server, to an existing local user, in the conversation of those
//! two users, within the size and shape limits.

use missive_spec::federation::{SignedUnit, Unit, UnitResult};
use missive_spec::{limits, ConversationId, Message, Receipt, ServerName};

use crate::inbox::InboundUnit;
use crate::store::{keys, Cf, Store};

/// A unit that passed its checks.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Checked {
    Message(InboundUnit),
    Receipt(Receipt),
    Devices(missive_spec::e2ee::DeviceListChange),
}

/// Checks a verified unit from `peer` for this server (`me`). `env` is the envelope as
/// received: it is what gets stored.
pub fn unit(store: &dyn Store, me: &ServerName, peer: &ServerName, env: SignedUnit, unit: Unit) -> Result<Checked, UnitResult> {
    let msg = match unit {
        Unit::Message(m) => m,
        Unit::Receipt(r) => return receipt(store, me, peer, r).map(Checked::Receipt),
        // A device-list change speaks for a user of the sending server (e2ee.md E5).
        Unit::Devices(c) if c.user.is_on(peer) => return Ok(Checked::Devices(c)),
        Unit::Devices(_) => return Err(UnitResult::WrongOrigin),
    };
    if msg.origin != *peer || !msg.from.is_on(peer) {
        return Err(UnitResult::WrongOrigin);
    }
    if !msg.to.is_on(me) {
        return Err(UnitResult::UnknownRecipient);
    }
    if msg.conv != ConversationId::one_to_one(&msg.from, &msg.to) {
        return Err(UnitResult::ConvMismatch);
    }
    if !message_limits_hold(&msg, me) {
        return Err(UnitResult::InvalidUnit);
    }
    local_user(store, &msg.to)?;
    let hash = env.hash();
    Ok(Checked::Message(InboundUnit { env, msg, hash }))
}

/// A receipt speaks for a user of the sending server about a conversation with one of
/// ours (F§10).
fn receipt(store: &dyn Store, me: &ServerName, peer: &ServerName, r: Receipt) -> Result<Receipt, UnitResult> {
    if !r.user.is_on(peer) {
        return Err(UnitResult::WrongOrigin);
    }
    if !r.peer.is_on(me) {
        return Err(UnitResult::UnknownRecipient);
    }
    if r.conv != ConversationId::one_to_one(&r.user, &r.peer) {
        return Err(UnitResult::ConvMismatch);
    }
    local_user(store, &r.peer)?;
    Ok(r)
}

fn local_user(store: &dyn Store, user: &missive_spec::UserId) -> Result<(), UnitResult> {
    // A removed account's tombstone is no recipient.
    match store.get(Cf::Users, &keys::user(user.localpart())) {
        Ok(Some(v)) => match crate::records::decode::<crate::records::UserRecord>("users", &v) {
            Ok(r) if r.exists() => Ok(()),
            Ok(_) => Err(UnitResult::UnknownRecipient),
            Err(_) => Err(UnitResult::Retry),
        },
        Ok(None) => Err(UnitResult::UnknownRecipient),
        Err(_) => Err(UnitResult::Retry),
    }
}

/// Size and shape limits of a message unit (F§6): content as for local sends; the vector
/// names only the two servers of a 1:1 conversation and carries the unit's own seq.
pub fn message_limits_hold(m: &Message, receiver: &ServerName) -> bool {
    m.seq >= 1
        && m.seq <= limits::MAX_SEQ
        && m.deps.get(&m.origin) == m.seq
        && m.deps.iter().all(|(s, _)| *s == m.origin || s == receiver)
        && !m.content.kind.is_empty()
        && m.content.kind.len() <= limits::MAX_CONTENT_TYPE_LEN
        && m.content.body.len() <= limits::MAX_CONTENT_BODY
}
