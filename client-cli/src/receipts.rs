//! Which receipts the client sends for what it received: the decision is a plain function
//! of the events ([`delivered_up_to`]); [`ack_delivered`] only sends what it returns.

use std::collections::HashMap;

use missive_spec::{Event, EventKind, ReceiptKind, UserId, Watermark};

use crate::client::{Client, ClientError};

/// For each other user with a message among `events`, the newest such message: this
/// device has everything up to it.
pub fn delivered_up_to(me: &UserId, events: &[Event]) -> HashMap<UserId, Watermark> {
    let mut newest: HashMap<UserId, Watermark> = HashMap::new();
    for e in events {
        if let EventKind::Message(m) = &e.event {
            if m.from != *me {
                let w = Watermark(m.order_key());
                let slot = newest.entry(m.from.clone()).or_insert_with(|| w.clone());
                if *slot < w {
                    *slot = w;
                }
            }
        }
    }
    newest
}

/// Tells the server that this device now has the other users' messages among `events`:
/// one delivered receipt per conversation, up to the newest such message.
pub async fn ack_delivered(c: &Client, me: &UserId, events: &[Event]) -> Result<(), ClientError> {
    for (peer, w) in delivered_up_to(me, events) {
        c.receipt(&peer, ReceiptKind::Delivered, w).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use missive_spec::{Content, ConversationId, Deps, Message};

    fn event(pos: u64, from: &UserId, to: &UserId, seq: u64) -> Event {
        let mut deps = Deps::new();
        deps.set(from.server_name(), seq);
        let m = Message {
            to: to.clone(),
            ts: 0,
            seq,
            conv: ConversationId::one_to_one(from, to),
            deps,
            from: from.clone(),
            origin: from.server_name(),
            content: Content::text("hi"),
        };
        Event { pos, event: EventKind::Message(m) }
    }

    #[test]
    fn newest_message_of_each_other_user_and_none_of_ones_own() {
        let user = |s: &str| UserId::parse(s).unwrap();
        let (me, bob, carol) = (user("@me:alpha.test"), user("@bob:beta.test"), user("@carol:alpha.test"));
        let events =
            [event(1, &bob, &me, 2), event(2, &bob, &me, 1), event(3, &me, &bob, 9), event(4, &carol, &me, 1)];
        let acks = delivered_up_to(&me, &events);
        let key = |e: &Event| match &e.event {
            EventKind::Message(m) => Watermark(m.order_key()),
            _ => unreachable!(),
        };
        assert_eq!(acks.len(), 2);
        assert_eq!(acks[&bob], key(&events[0]), "the newest of bob's, whatever the order they came in");
        assert_eq!(acks[&carol], key(&events[3]));
        assert!(delivered_up_to(&me, &events[2..3]).is_empty(), "one's own messages need no receipt");
    }
}
