//! Key layouts, one section per column family: built and parsed here only.
//!
//! Keys are big-endian composites. Variable-length text parts (localparts, server names)
//! are followed by a zero byte, which no identifier contains, so a shorter part sorts
//! before any longer one that extends it and prefixes never overlap.

use missive_spec::{ClientMsgId, ConversationId, DeviceId, OrderKey, ReceiptKind, ServerName, UserId};

fn text_part(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn split_text(b: &[u8]) -> Option<(&str, &[u8])> {
    let z = b.iter().position(|c| *c == 0)?;
    Some((std::str::from_utf8(&b[..z]).ok()?, &b[z + 1..]))
}

// users: localpart
pub fn user(localpart: &str) -> Vec<u8> {
    localpart.as_bytes().to_vec()
}

// devices: localpart 0 device
pub fn devices_of(localpart: &str) -> Vec<u8> {
    let mut k = Vec::new();
    text_part(&mut k, localpart);
    k
}
pub fn device(localpart: &str, device: &DeviceId) -> Vec<u8> {
    let mut k = devices_of(localpart);
    k.extend_from_slice(device.as_str().as_bytes());
    k
}
pub fn parse_device(k: &[u8]) -> Option<(String, DeviceId)> {
    let (local, rest) = split_text(k)?;
    Some((local.to_owned(), DeviceId::parse(std::str::from_utf8(rest).ok()?).ok()?))
}

// one_time_keys: localpart 0 device 0 key id BE (device_keys use `device`)
pub fn one_time_keys_of(localpart: &str, device: &DeviceId) -> Vec<u8> {
    let mut k = devices_of(localpart);
    text_part(&mut k, device.as_str());
    k
}
pub fn one_time_key(localpart: &str, device: &DeviceId, id: u64) -> Vec<u8> {
    let mut k = one_time_keys_of(localpart, device);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

// device_lists: user id
pub fn device_list(user: &UserId) -> Vec<u8> {
    user.as_str().as_bytes().to_vec()
}

// tokens: SHA-256 of the token
pub fn token(hash: &[u8; 32]) -> Vec<u8> {
    hash.to_vec()
}

// convs: conversation id
pub fn conv(conv: &ConversationId) -> Vec<u8> {
    conv.as_bytes().to_vec()
}

// messages: conversation id, order key bytes (rank BE, origin 0, seq BE)
pub fn messages_of(conv: &ConversationId) -> Vec<u8> {
    conv.as_bytes().to_vec()
}
pub fn message(conv: &ConversationId, key: &OrderKey) -> Vec<u8> {
    let mut k = messages_of(conv);
    k.extend_from_slice(&key.to_bytes());
    k
}
pub fn parse_message(k: &[u8]) -> Option<(ConversationId, OrderKey)> {
    if k.len() < ConversationId::LEN {
        return None;
    }
    let (c, rest) = k.split_at(ConversationId::LEN);
    Some((ConversationId::from_slice(c).ok()?, OrderKey::from_bytes(rest)?))
}

// msg_ids: conversation id, origin 0, origin_seq BE
pub fn msg_id(conv: &ConversationId, origin: &ServerName, seq: u64) -> Vec<u8> {
    let mut k = conv.as_bytes().to_vec();
    text_part(&mut k, origin.as_str());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}
pub fn parse_msg_id(k: &[u8]) -> Option<(ConversationId, ServerName, u64)> {
    if k.len() < ConversationId::LEN {
        return None;
    }
    let (c, rest) = k.split_at(ConversationId::LEN);
    let (origin, seq) = split_text(rest)?;
    Some((
        ConversationId::from_slice(c).ok()?,
        ServerName::parse(origin).ok()?,
        u64::from_be_bytes(seq.try_into().ok()?),
    ))
}

// send_ids: localpart 0 device 0 client_msg_id
pub fn send_id(localpart: &str, device: &DeviceId, id: &ClientMsgId) -> Vec<u8> {
    let mut k = Vec::new();
    text_part(&mut k, localpart);
    text_part(&mut k, device.as_str());
    k.extend_from_slice(id.as_bytes());
    k
}

// events: localpart 0 position BE
pub fn events_of(localpart: &str) -> Vec<u8> {
    let mut k = Vec::new();
    text_part(&mut k, localpart);
    k
}
pub fn event(localpart: &str, pos: u64) -> Vec<u8> {
    let mut k = events_of(localpart);
    k.extend_from_slice(&pos.to_be_bytes());
    k
}
pub fn parse_event(k: &[u8]) -> Option<(String, u64)> {
    let (local, rest) = split_text(k)?;
    Some((local.to_owned(), u64::from_be_bytes(rest.try_into().ok()?)))
}

// user_convs: localpart 0 conversation id
pub fn user_conv_prefix(localpart: &str) -> Vec<u8> {
    let mut k = Vec::new();
    text_part(&mut k, localpart);
    k
}
pub fn user_conv(localpart: &str, conv: &ConversationId) -> Vec<u8> {
    let mut k = Vec::new();
    text_part(&mut k, localpart);
    k.extend_from_slice(conv.as_bytes());
    k
}

// out_queue and dead_letters: destination 0 lane position BE. A conversation always maps
// to the same lane, so its units stay in order while other lanes move independently.
pub const LANES: u8 = 4;

pub fn lane_of(conv: &ConversationId) -> u8 {
    conv.as_bytes()[0] % LANES
}
pub fn queue_of(dest: &ServerName) -> Vec<u8> {
    let mut k = Vec::new();
    text_part(&mut k, dest.as_str());
    k
}
pub fn queue_lane(dest: &ServerName, lane: u8) -> Vec<u8> {
    let mut k = queue_of(dest);
    k.push(lane);
    k
}
pub fn queue(dest: &ServerName, lane: u8, pos: u64) -> Vec<u8> {
    let mut k = queue_lane(dest, lane);
    k.extend_from_slice(&pos.to_be_bytes());
    k
}
pub fn parse_queue(k: &[u8]) -> Option<(ServerName, u8, u64)> {
    let (dest, rest) = split_text(k)?;
    let (&lane, pos) = rest.split_first()?;
    Some((ServerName::parse(dest).ok()?, lane, u64::from_be_bytes(pos.try_into().ok()?)))
}

// held: the same layout as msg_ids
pub fn held(conv: &ConversationId, origin: &ServerName, seq: u64) -> Vec<u8> {
    msg_id(conv, origin, seq)
}

// receipts: conversation id, user id 0, kind (0 delivered, 1 read)
pub fn receipt(conv: &ConversationId, user: &UserId, kind: ReceiptKind) -> Vec<u8> {
    let mut k = conv.as_bytes().to_vec();
    text_part(&mut k, user.as_str());
    k.push(match kind {
        ReceiptKind::Delivered => 0,
        ReceiptKind::Read => 1,
    });
    k
}

// read_cursors: localpart 0 device 0 conversation id
pub fn read_cursor(localpart: &str, device: &DeviceId, conv: &ConversationId) -> Vec<u8> {
    let mut k = Vec::new();
    text_part(&mut k, localpart);
    text_part(&mut k, device.as_str());
    k.extend_from_slice(conv.as_bytes());
    k
}
pub fn read_cursors_of(localpart: &str, device: &DeviceId) -> Vec<u8> {
    let mut k = Vec::new();
    text_part(&mut k, localpart);
    text_part(&mut k, device.as_str());
    k
}

// contacts: user id 0 local localpart
pub fn contacts_of(user: &UserId) -> Vec<u8> {
    let mut k = Vec::new();
    text_part(&mut k, user.as_str());
    k
}
pub fn contact(user: &UserId, localpart: &str) -> Vec<u8> {
    let mut k = contacts_of(user);
    k.extend_from_slice(localpart.as_bytes());
    k
}
pub fn parse_contact(k: &[u8]) -> Option<(UserId, String)> {
    let (user, local) = split_text(k)?;
    Some((UserId::parse(user).ok()?, std::str::from_utf8(local).ok()?.to_owned()))
}

// blocks: localpart 0 blocked user id (§6.12)
pub fn blocks_of(localpart: &str) -> Vec<u8> {
    let mut k = Vec::new();
    text_part(&mut k, localpart);
    k
}
pub fn block(localpart: &str, user: &UserId) -> Vec<u8> {
    let mut k = blocks_of(localpart);
    k.extend_from_slice(user.as_str().as_bytes());
    k
}
pub fn parse_block(k: &[u8]) -> Option<(String, UserId)> {
    let (local, user) = split_text(k)?;
    Some((local.to_owned(), UserId::parse(std::str::from_utf8(user).ok()?).ok()?))
}

// presence: localpart
pub fn presence(localpart: &str) -> Vec<u8> {
    localpart.as_bytes().to_vec()
}

// active: localpart 0 active_ms BE conversation id. A user's conversations by their last
// activity: a reverse scan lists the most recently active first.
pub fn active_of(localpart: &str) -> Vec<u8> {
    let mut k = Vec::new();
    text_part(&mut k, localpart);
    k
}
pub fn active(localpart: &str, active_ms: u64, conv: &ConversationId) -> Vec<u8> {
    let mut k = active_of(localpart);
    k.extend_from_slice(&active_ms.to_be_bytes());
    k.extend_from_slice(conv.as_bytes());
    k
}
pub fn parse_active(k: &[u8]) -> Option<(String, u64, ConversationId)> {
    let (local, rest) = split_text(k)?;
    if rest.len() != 8 + ConversationId::LEN {
        return None;
    }
    let (ms, conv) = rest.split_at(8);
    Some((local.to_owned(), u64::from_be_bytes(ms.try_into().ok()?), ConversationId(conv.try_into().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrips(local in "[a-z0-9._=-]{1,16}", dev in "[A-Z0-9]{1,12}", origin in "[a-z]{1,8}(\\.[a-z]{1,5})?",
                      rank in any::<u64>(), seq in any::<u64>(), pos in any::<u64>(), c in any::<[u8; 32]>()) {
            let conv = ConversationId(c);
            let dev = DeviceId::parse(&dev).unwrap();
            let origin = ServerName::parse(&origin).unwrap();
            prop_assert_eq!(parse_device(&device(&local, &dev)), Some((local.clone(), dev)));
            let ok = OrderKey { rank, origin: origin.clone(), seq };
            prop_assert_eq!(parse_message(&message(&conv, &ok)), Some((conv, ok)));
            prop_assert_eq!(parse_msg_id(&msg_id(&conv, &origin, seq)), Some((conv, origin.clone(), seq)));
            prop_assert_eq!(parse_event(&event(&local, pos)), Some((local.clone(), pos)));
            let someone = UserId::parse(&format!("@{local}:{origin}")).unwrap();
            prop_assert_eq!(parse_contact(&contact(&someone, &local)), Some((someone.clone(), local.clone())));
            let lane = (rank % u64::from(LANES)) as u8;
            prop_assert_eq!(parse_queue(&queue(&origin, lane, pos)), Some((origin.clone(), lane, pos)));
            prop_assert!(queue(&origin, lane, pos).starts_with(&queue_lane(&origin, lane)));
            prop_assert_eq!(held(&conv, &origin, seq), msg_id(&conv, &origin, seq));
            prop_assert_eq!(parse_active(&active(&local, pos, &conv)), Some((local.clone(), pos, conv)));
            prop_assert!(active(&local, pos, &conv).starts_with(&active_of(&local)));
        }

        #[test]
        fn active_keys_sort_by_time(local in "[a-z]{1,8}", a in any::<u64>(), b in any::<u64>(), c in any::<[u8; 32]>()) {
            let conv = ConversationId(c);
            prop_assert_eq!(a.cmp(&b), active(&local, a, &conv).cmp(&active(&local, b, &conv)));
        }

        #[test]
        fn event_keys_sort_by_position(local in "[a-z]{1,8}", a in any::<u64>(), b in any::<u64>()) {
            prop_assert_eq!(a.cmp(&b), event(&local, a).cmp(&event(&local, b)));
        }
    }

    #[test]
    fn receipt_keys_are_distinct_per_user_and_kind() {
        let conv = ConversationId([7; 32]);
        let (a, b) = (UserId::parse("@a:x.test").unwrap(), UserId::parse("@ab:x.test").unwrap());
        let all = [
            receipt(&conv, &a, ReceiptKind::Delivered),
            receipt(&conv, &a, ReceiptKind::Read),
            receipt(&conv, &b, ReceiptKind::Delivered),
            receipt(&conv, &b, ReceiptKind::Read),
        ];
        let set: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(set.len(), 4);
        let d = DeviceId::parse("D1").unwrap();
        assert!(read_cursor("a", &d, &conv).starts_with(&read_cursors_of("a", &d)));
        assert!(!read_cursor("ab", &d, &conv).starts_with(&read_cursors_of("a", &d)));
    }

    #[test]
    fn one_users_prefix_never_covers_another() {
        // "al" must not see "alice"'s events.
        assert!(!event("alice", 1).starts_with(&events_of("al")));
    }
}
