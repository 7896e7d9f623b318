//! The messages `chat` has shown or sent, so that none shows twice: the live stream
//! repeats one's own sent messages, and a history page overlaps what the stream brought.
//! Every message either chat mode shows or sends passes through [`Seen::saw`].

use std::collections::{HashSet, VecDeque};

use missive_spec::{ConversationId, Message, ServerName};

/// Most message identities remembered; past it the oldest are forgotten first (a message
/// that old is far above any history page or backlog chat asks for again).
const REMEMBERED: usize = 100_000;

#[derive(Default)]
pub struct Seen {
    ids: HashSet<(ConversationId, ServerName, u64)>,
    order: VecDeque<(ConversationId, ServerName, u64)>,
}

impl Seen {
    /// Records that `m` is on screen; false when it already was.
    pub fn saw(&mut self, m: &Message) -> bool {
        let id = (m.conv, m.origin.clone(), m.seq);
        if !self.ids.insert(id.clone()) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }
}
