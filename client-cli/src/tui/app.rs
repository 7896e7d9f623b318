//! The state of the chat screen and how events change it: key presses, pastes, frames of
//! the event stream, answers to requests and clock ticks. Each change returns the
//! [`Action`]s (requests) it calls for; the caller performs them and feeds the answers
//! back as [`Done`]. Nothing here touches the network or the terminal, so every
//! transition is tested without either.

use std::collections::{BTreeMap, HashMap};

use missive_cli::client::{message_state, new_client_msg_id, Frame, Page};
use missive_cli::receipts::delivered_up_to;
use missive_core::ephemeral::TYPING_MIN_INTERVAL_MS;
use missive_spec::{
    limits, ClientMsgId, ConversationId, Cursor, DeviceInfo, Ephemeral, EventKind, Message, OrderKey, PresenceUpdate,
    Receipt, ReceiptKind, ServerName, Undeliverable, UserId, Watermark,
};
use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::input::Editor;
use crate::seen::Seen;

/// Most conversations kept; past it the least recently active one (not the open one) is
/// dropped from the list.
const MAX_CONVERSATIONS: usize = 1_000;
/// Most messages kept per conversation; past it the oldest are dropped (PgUp loads them
/// again from the server).
const MAX_KEPT: usize = 2_000;
/// A typing notification is sent at most this often while typing; the peer shows it for
/// five seconds (spec §13), so this keeps it up without coming near the server's limit.
pub const TYPING_EVERY_MS: u64 = 3_000;
/// How long a status message stays.
const STATUS_MS: u64 = 10_000;
/// Messages asked for when a conversation is opened or scrolled past its top.
pub const PAGE: u32 = 50;

/// A request the state asks the caller to make.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send {
        to: UserId,
        text: String,
        id: ClientMsgId,
    },
    Typing {
        with: UserId,
    },
    Receipt {
        with: UserId,
        kind: ReceiptKind,
        up_to: Watermark,
    },
    /// A page of history with `with`: the newest, or older than `before`.
    History {
        with: UserId,
        before: Option<Cursor>,
    },
    /// Whether `user` is online, or when last seen, for the header.
    Presence {
        user: UserId,
    },
    Devices,
}

/// The answer to an [`Action`].
#[derive(Debug)]
pub enum Done {
    Sent(Message),
    Page {
        with: UserId,
        older: bool,
        page: Page,
    },
    Devices(Vec<DeviceInfo>),
    Presence(PresenceUpdate),
    /// A request failed; `what` says which (`sending`, `loading history`, …).
    Failed {
        what: &'static str,
        error: String,
    },
}

/// One entry of the user's conversation list, as the server or the event stream gives it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub with: UserId,
    pub active_ms: u64,
    pub unread: u32,
    pub last: Option<Message>,
    pub presence: Option<PresenceUpdate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    Connecting,
    Online,
    /// Not connected, and why.
    Offline(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub text: String,
    pub error: bool,
    pub until_ms: u64,
}

/// A panel shown over the conversation (`/help`, `/devices`) until Esc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub title: String,
    pub lines: Vec<String>,
}

#[derive(Debug)]
pub struct Conversation {
    pub with: UserId,
    pub conv: ConversationId,
    /// Canonical order (spec §4.5).
    pub messages: BTreeMap<OrderKey, Message>,
    pub unread: u32,
    pub presence: Option<PresenceUpdate>,
    /// The peer is typing until then (ms since the epoch).
    pub typing_until: Option<u64>,
    /// The peer's receipt watermarks: they give one's own messages their state.
    pub read: Option<Watermark>,
    pub delivered: Option<Watermark>,
    /// One's own read position (any device).
    pub seen: Option<Watermark>,
    pub active_ms: u64,
    /// Where older history starts, once a page was loaded (`None`: nothing older).
    pub older: Option<Cursor>,
    pub loaded: bool,
    /// One's own messages the peer's server refused for good, by (origin, seq), with why.
    /// At most [`MAX_KEPT`]; past it the record starts again empty.
    pub failed: HashMap<(ServerName, u64), String>,
}

impl Conversation {
    fn new(me: &UserId, with: UserId) -> Conversation {
        Conversation {
            conv: ConversationId::one_to_one(me, &with),
            with,
            messages: BTreeMap::new(),
            unread: 0,
            presence: None,
            typing_until: None,
            read: None,
            delivered: None,
            seen: None,
            active_ms: 0,
            older: None,
            loaded: false,
            failed: HashMap::new(),
        }
    }

    /// Remembers that the other server refused one of one's own messages (§10.5).
    fn mark_failed(&mut self, u: &Undeliverable) {
        if self.failed.len() >= MAX_KEPT {
            self.failed.clear();
        }
        self.failed.insert((u.origin.clone(), u.seq), u.reason.clone());
    }

    /// The state of one of one's own messages: sent, delivered, read or failed.
    pub fn state_of(&self, m: &Message) -> &'static str {
        if self.failed.contains_key(&(m.origin.clone(), m.seq)) {
            return "failed";
        }
        message_state(m, &self.read, &self.delivered)
    }

    /// The newest message from the peer.
    fn newest_from_peer(&self) -> Option<Watermark> {
        self.messages.values().rev().find(|m| m.from == self.with).map(|m| Watermark(m.order_key()))
    }

    fn insert(&mut self, m: Message) {
        self.active_ms = self.active_ms.max(m.ts);
        self.messages.insert(m.order_key(), m);
        while self.messages.len() > MAX_KEPT {
            self.messages.pop_first();
            if self.older.is_none() {
                // What was dropped can only come back through a fresh first page.
                self.loaded = false;
            }
        }
    }

    /// Peer messages after one's own read position, among those held.
    fn count_unread(&self) -> u32 {
        let n = self
            .messages
            .values()
            .filter(|m| m.from == self.with && self.seen.as_ref().is_none_or(|s| Watermark(m.order_key()) > *s))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// Raises a watermark; receipts only ever move forward.
fn raise(slot: &mut Option<Watermark>, w: &Watermark) {
    if slot.as_ref().is_none_or(|s| s < w) {
        *slot = Some(w.clone());
    }
}

pub const HELP: &[&str] = &[
    "Enter sends; Alt-Enter or Ctrl-J starts a new line; pasted text stays as typed.",
    "PgUp/PgDn scroll the conversation; Tab / Shift-Tab switch conversations.",
    "Ctrl-W deletes a word, Ctrl-U the line; Ctrl-C or /quit leaves.",
    "",
    "/open @user:server   open (or start) the conversation with a user",
    "/read                mark the open conversation as read",
    "/devices             list this user's devices",
    "/help                this help; Esc closes it",
    "/quit                leave",
    "//text               send a line starting with /",
];

pub struct App {
    pub me: UserId,
    /// Most recently active first; at most [`MAX_CONVERSATIONS`].
    pub convs: Vec<Conversation>,
    pub open: Option<UserId>,
    pub editor: Editor,
    /// Rows scrolled up from the newest message.
    pub scroll: usize,
    /// Rows of the conversation pane (set by the caller from the terminal size), for
    /// paging.
    pub rows: u16,
    pub status: Option<Status>,
    pub connection: Connection,
    pub overlay: Option<Overlay>,
    /// Messages written while offline, waiting in the outbox (at most what the editor
    /// sends while offline; cleared when the connection is back and the outbox sent).
    pub waiting: Vec<(UserId, String)>,
    pub quit: bool,
    pub now_ms: u64,
    seen: Seen,
    /// When the last typing notification went out.
    typing_last_ms: Option<u64>,
    /// The earliest time the next may go.
    typing_next_ms: u64,
    /// A key was pressed while the next could not go yet: it goes when it may.
    typing_due: bool,
}

impl App {
    pub fn new(me: UserId, open: Option<UserId>, now_ms: u64) -> App {
        let mut app = App {
            me,
            convs: Vec::new(),
            open: None,
            editor: Editor::default(),
            scroll: 0,
            rows: 20,
            status: None,
            connection: Connection::Connecting,
            overlay: None,
            waiting: Vec::new(),
            quit: false,
            now_ms,
            seen: Seen::default(),
            typing_last_ms: None,
            typing_next_ms: 0,
            typing_due: false,
        };
        if let Some(with) = open {
            app.conversation(&with);
            app.open = Some(with);
        }
        app
    }

    /// The open conversation.
    pub fn current(&self) -> Option<&Conversation> {
        let with = self.open.as_ref()?;
        self.convs.iter().find(|c| c.with == *with)
    }

    fn current_mut(&mut self) -> Option<&mut Conversation> {
        let with = self.open.clone()?;
        self.convs.iter_mut().find(|c| c.with == with)
    }

    /// The conversation with `with`, added to the list if new.
    fn conversation(&mut self, with: &UserId) -> &mut Conversation {
        let i = match self.convs.iter().position(|c| c.with == *with) {
            Some(i) => i,
            None => {
                if self.convs.len() >= MAX_CONVERSATIONS {
                    let open = self.open.clone();
                    if let Some(i) = self.convs.iter().rposition(|c| Some(&c.with) != open.as_ref()) {
                        self.convs.remove(i);
                    }
                }
                self.convs.push(Conversation::new(&self.me, with.clone()));
                self.convs.len() - 1
            }
        };
        &mut self.convs[i]
    }

    fn sort(&mut self) {
        self.convs.sort_by_key(|c| std::cmp::Reverse(c.active_ms));
    }

    pub fn info(&mut self, text: impl Into<String>) {
        self.status = Some(Status { text: text.into(), error: false, until_ms: self.now_ms + STATUS_MS });
    }

    pub fn error(&mut self, text: impl Into<String>) {
        self.status = Some(Status { text: text.into(), error: true, until_ms: self.now_ms + STATUS_MS });
    }

    /// Every message this screen shows or sends comes through here once.
    fn saw(&mut self, m: &Message) -> bool {
        self.seen.saw(m)
    }

    /// The peer of a message in one of the user's conversations.
    fn peer_of<'m>(&self, m: &'m Message) -> &'m UserId {
        if m.from == self.me {
            &m.to
        } else {
            &m.from
        }
    }

    // ---- events ------------------------------------------------------------------------

    /// The clock moved: typing notices and the status expire, and a typing notification
    /// held back by the rate limit goes out.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        self.advance(now_ms);
        if self.typing_due && now_ms >= self.typing_next_ms && !self.editor.is_empty() {
            return self.typing();
        }
        Vec::new()
    }

    fn advance(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        for c in &mut self.convs {
            if c.typing_until.is_some_and(|t| t <= now_ms) {
                c.typing_until = None;
            }
        }
        if self.status.as_ref().is_some_and(|s| s.until_ms <= now_ms) {
            self.status = None;
        }
    }

    pub fn connection(&mut self, c: Connection) {
        if c == Connection::Online {
            // The outbox went out with the connection; its messages come back in the stream.
            self.waiting.clear();
            // A read receipt may have been lost with the connection: the next page of the
            // open conversation says where reading stands.
            if let Some(c) = self.current_mut() {
                c.seen = None;
            }
        }
        self.connection = c;
    }

    /// A terminal event.
    pub fn terminal(&mut self, e: Event, now_ms: u64) -> Vec<Action> {
        self.advance(now_ms);
        match e {
            Event::Key(k) if k.kind != KeyEventKind::Release => self.key(k),
            Event::Paste(s) => {
                if self.editor.insert_str(&s).is_err() {
                    self.error(format!("paste refused: the input holds at most {} bytes", super::input::MAX_INPUT));
                }
                self.typing()
            }
            Event::Resize(..) | Event::Key(_) | Event::FocusGained | Event::FocusLost | Event::Mouse(_) => Vec::new(),
        }
    }

    fn key(&mut self, k: KeyEvent) -> Vec<Action> {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        let alt = k.modifiers.intersects(KeyModifiers::ALT | KeyModifiers::SHIFT);
        if self.overlay.is_some() && k.code == KeyCode::Esc {
            self.overlay = None;
            return Vec::new();
        }
        let page = usize::from(self.rows.max(2) / 2);
        match k.code {
            KeyCode::Char('c') if ctrl => self.quit = true,
            KeyCode::Char('d') if ctrl && self.editor.is_empty() => self.quit = true,
            KeyCode::Enter if alt => return self.insert('\n'),
            KeyCode::Char('j') if ctrl => return self.insert('\n'),
            KeyCode::Enter => return self.submit(),
            KeyCode::Char('a') if ctrl => self.editor.home(),
            KeyCode::Char('e') if ctrl => self.editor.end(),
            KeyCode::Char('w') if ctrl => self.editor.delete_word(),
            KeyCode::Char('u') if ctrl => self.editor.delete_to_line_start(),
            KeyCode::Char(_) if ctrl => {}
            KeyCode::Char(c) => return self.insert(c),
            KeyCode::Backspace => self.editor.backspace(),
            KeyCode::Delete => self.editor.delete(),
            KeyCode::Left => self.editor.left(),
            KeyCode::Right => self.editor.right(),
            KeyCode::Home => self.editor.home(),
            KeyCode::End => self.editor.end(),
            KeyCode::PageUp => return self.scroll_up(page),
            KeyCode::PageDown => self.scroll = self.scroll.saturating_sub(page),
            KeyCode::Tab => return self.switch(1),
            KeyCode::BackTab => return self.switch(self.convs.len().saturating_sub(1)),
            KeyCode::Esc => self.overlay = None,
            _ => {}
        }
        Vec::new()
    }

    fn insert(&mut self, c: char) -> Vec<Action> {
        if self.editor.insert(c).is_err() {
            self.error(format!("the input holds at most {} bytes", super::input::MAX_INPUT));
        }
        self.typing()
    }

    /// A typing notification for the open conversation, at most every [`TYPING_EVERY_MS`],
    /// and never for a command.
    fn typing(&mut self) -> Vec<Action> {
        let Some(with) = self.open.clone() else { return Vec::new() };
        if self.editor.text().starts_with('/') && !self.editor.text().starts_with("//") {
            return Vec::new();
        }
        if self.now_ms < self.typing_next_ms {
            self.typing_due = true;
            return Vec::new();
        }
        self.typing_due = false;
        self.typing_last_ms = Some(self.now_ms);
        self.typing_next_ms = self.now_ms + TYPING_EVERY_MS;
        vec![Action::Typing { with }]
    }

    /// A message went (its arrival ends the peer's typing notice) or another conversation
    /// opened: the next keystroke may notify again as soon as the server allows.
    fn typing_may_renew(&mut self) {
        self.typing_due = false;
        self.typing_next_ms = self.typing_last_ms.map_or(0, |t| t + TYPING_MIN_INTERVAL_MS);
    }

    fn scroll_up(&mut self, by: usize) -> Vec<Action> {
        self.scroll += by;
        // Past the top of what is held: ask for the page before it.
        let rows = self.current().map_or(0, |c| c.messages.len());
        match self.current() {
            Some(c) if self.scroll + usize::from(self.rows) > rows && c.older.is_some() => {
                vec![Action::History { with: c.with.clone(), before: c.older.clone() }]
            }
            _ => Vec::new(),
        }
    }

    fn switch(&mut self, by: usize) -> Vec<Action> {
        if self.convs.is_empty() {
            return Vec::new();
        }
        let next = match self.open.as_ref().and_then(|w| self.convs.iter().position(|c| c.with == *w)) {
            Some(i) => (i + by) % self.convs.len(),
            None => 0,
        };
        let with = self.convs[next].with.clone();
        self.open_conversation(with)
    }

    /// Opens the conversation with `with`: loads it, or marks it read if loaded.
    pub fn open_conversation(&mut self, with: UserId) -> Vec<Action> {
        self.conversation(&with);
        self.open = Some(with.clone());
        self.scroll = 0;
        self.typing_may_renew();
        match self.current() {
            Some(c) if !c.loaded => {
                vec![Action::History { with: with.clone(), before: None }, Action::Presence { user: with }]
            }
            _ => self.mark_read(),
        }
    }

    /// A read receipt for the open conversation, if it has something unread.
    fn mark_read(&mut self) -> Vec<Action> {
        let Some(c) = self.current_mut() else { return Vec::new() };
        c.unread = 0;
        match c.newest_from_peer() {
            Some(w) if c.seen.as_ref().is_none_or(|s| *s < w) => {
                c.seen = Some(w.clone());
                vec![Action::Receipt { with: c.with.clone(), kind: ReceiptKind::Read, up_to: w }]
            }
            _ => Vec::new(),
        }
    }

    fn submit(&mut self) -> Vec<Action> {
        let text = self.editor.text().to_owned();
        if text.trim().is_empty() {
            return Vec::new();
        }
        if let Some(command) = text.strip_prefix('/').filter(|t| !t.starts_with('/')) {
            self.editor.take();
            return self.command(command.trim());
        }
        // `//text` sends `/text`.
        let text = match text.strip_prefix("//") {
            Some(rest) => format!("/{rest}"),
            None => text,
        };
        let Some(to) = self.open.clone() else {
            self.error("no conversation is open: /open @user:server starts one");
            return Vec::new();
        };
        if text.len() > limits::MAX_CONTENT_BODY {
            self.error(format!(
                "not sent: the message is {} bytes, over the limit of {} bytes; shorten it",
                text.len(),
                limits::MAX_CONTENT_BODY
            ));
            return Vec::new();
        }
        self.editor.take();
        self.scroll = 0;
        self.typing_may_renew();
        vec![Action::Send { to, text, id: new_client_msg_id() }]
    }

    fn command(&mut self, command: &str) -> Vec<Action> {
        let (name, arg) = command.split_once(char::is_whitespace).map_or((command, ""), |(n, a)| (n, a.trim()));
        match name {
            "quit" | "q" => self.quit = true,
            "help" => {
                self.overlay =
                    Some(Overlay { title: "Help".into(), lines: HELP.iter().map(|l| l.to_string()).collect() })
            }
            "read" => {
                if self.open.is_none() {
                    self.error("no conversation is open");
                }
                return self.mark_read();
            }
            "devices" => return vec![Action::Devices],
            "open" | "chat" => match UserId::parse(arg) {
                Ok(with) if with == self.me => self.error("cannot chat with yourself"),
                Ok(with) => return self.open_conversation(with),
                Err(e) => self.error(format!("/open @user:server: {e}")),
            },
            _ => self.error(format!("unknown command /{name}; /help lists them")),
        }
        Vec::new()
    }

    /// A frame of the event stream: new messages, receipts, presence and typing. Returns
    /// the delivered receipts for what arrived, and a read receipt for the open
    /// conversation.
    pub fn frame(&mut self, f: &Frame, now_ms: u64) -> Vec<Action> {
        self.advance(now_ms);
        let mut actions: Vec<Action> = delivered_up_to(&self.me, &f.events)
            .into_iter()
            .map(|(with, up_to)| Action::Receipt { with, kind: ReceiptKind::Delivered, up_to })
            .collect();
        let mut open_has_new = false;
        for e in &f.events {
            match &e.event {
                EventKind::Message(m) => {
                    if !self.saw(m) {
                        continue;
                    }
                    let peer = self.peer_of(m).clone();
                    let is_open = self.open.as_ref() == Some(&peer);
                    let c = self.conversation(&peer);
                    let from_peer = m.from == c.with;
                    c.insert(m.clone());
                    if from_peer {
                        c.typing_until = None;
                        if is_open {
                            open_has_new = true;
                        } else {
                            c.unread = c.unread.saturating_add(1);
                        }
                    }
                }
                EventKind::Receipt(r) => self.receipt(r),
                EventKind::Undeliverable(u) => {
                    let Some(c) = self.convs.iter_mut().find(|c| c.conv == u.conv) else { continue };
                    c.mark_failed(u);
                    let text = format!("your message #{} to {} could not be delivered: {}", u.seq, c.with, u.reason);
                    self.error(text);
                }
                EventKind::Devices(_) | EventKind::Unknown(_) => {}
            }
        }
        for e in &f.ephemeral {
            match e {
                Ephemeral::Presence(p) => {
                    if let Some(c) = self.convs.iter_mut().find(|c| c.with == p.user) {
                        c.presence = Some(p.clone());
                    }
                }
                Ephemeral::Typing(t) if t.user != self.me => {
                    let c = self.conversation(&t.user);
                    if c.conv == t.conv {
                        c.typing_until = Some(t.until);
                    }
                }
                Ephemeral::Typing(_) | Ephemeral::Unknown(_) => {}
            }
        }
        self.sort();
        if open_has_new {
            actions.extend(self.mark_read());
        }
        actions
    }

    /// A receipt changes state marks only: the peer's moves one's own messages to
    /// delivered or read; one's own (from any device) moves the read position.
    fn receipt(&mut self, r: &Receipt) {
        if r.user == self.me {
            if r.kind == ReceiptKind::Read {
                let c = self.conversation(&r.peer);
                raise(&mut c.seen, &r.up_to);
                c.unread = c.unread.min(c.count_unread());
            }
            return;
        }
        let c = self.conversation(&r.user);
        match r.kind {
            ReceiptKind::Read => raise(&mut c.read, &r.up_to),
            ReceiptKind::Delivered => raise(&mut c.delivered, &r.up_to),
        }
    }

    /// The conversation list from the server (or what the stream showed so far).
    pub fn listed(&mut self, list: Vec<Listed>) {
        for l in list {
            if let Some(m) = &l.last {
                self.saw(m);
            }
            let c = self.conversation(&l.with);
            c.active_ms = c.active_ms.max(l.active_ms);
            c.unread = l.unread;
            if l.presence.is_some() {
                c.presence = l.presence;
            }
            if let Some(m) = l.last {
                c.insert(m);
            }
        }
        self.sort();
    }

    /// The answer to a request.
    pub fn done(&mut self, d: Done, now_ms: u64) -> Vec<Action> {
        self.advance(now_ms);
        match d {
            Done::Sent(m) => {
                self.saw(&m);
                let peer = m.to.clone();
                self.conversation(&peer).insert(m);
                self.sort();
                Vec::new()
            }
            Done::Page { with, older, page } => self.page(with, older, page),
            Done::Devices(list) => {
                let lines = list
                    .iter()
                    .map(|d| {
                        let name = d.name.as_deref().unwrap_or("(no name)");
                        let this = if d.current { "  (this device)" } else { "" };
                        format!("{}  {name}  since {}{this}", d.id.as_str(), missive_cli::output::utc(d.created_ms))
                    })
                    .collect();
                self.overlay = Some(Overlay { title: "Devices (Esc closes)".into(), lines });
                Vec::new()
            }
            Done::Presence(p) => {
                if let Some(c) = self.convs.iter_mut().find(|c| c.with == p.user) {
                    c.presence = Some(p);
                }
                Vec::new()
            }
            Done::Failed { what, error } => {
                self.error(format!("{what} failed: {error}"));
                Vec::new()
            }
        }
    }

    fn page(&mut self, with: UserId, older: bool, page: Page) -> Vec<Action> {
        for m in &page.messages {
            self.saw(m);
        }
        let c = self.conversation(&with);
        // Refusals the server remembers (§6.6), also those whose event came before this run.
        for u in &page.failed {
            c.mark_failed(u);
        }
        // Inserted whether seen or not: an older page brings back what was dropped.
        for m in page.messages {
            c.insert(m);
        }
        if let Some(w) = &page.read {
            raise(&mut c.read, w);
        }
        if let Some(w) = &page.delivered {
            raise(&mut c.delivered, w);
        }
        if let Some(w) = &page.seen {
            raise(&mut c.seen, w);
        }
        if older || !c.loaded {
            c.older = page.older;
        }
        c.loaded = true;
        c.unread = c.count_unread();
        self.sort();
        if self.open.as_ref() == Some(&with) {
            self.mark_read()
        } else {
            Vec::new()
        }
    }

    /// A message written while offline went to the outbox.
    pub fn queued(&mut self, to: UserId, text: String) {
        self.waiting.push((to, text));
        self.info("the server is unreachable: the message waits in the outbox and goes out on reconnection");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use missive_spec::{Content, Deps, Event as StreamEvent, TypingUpdate};
    use ratatui::crossterm::event::KeyEvent;

    pub fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    pub fn msg(from: &UserId, to: &UserId, seq: u64, ts: u64, text: &str) -> Message {
        let mut deps = Deps::new();
        deps.set(from.server_name(), seq);
        Message {
            to: to.clone(),
            ts,
            seq,
            conv: ConversationId::one_to_one(from, to),
            deps,
            from: from.clone(),
            origin: from.server_name(),
            content: Content::text(text),
        }
    }

    pub fn frame(events: Vec<EventKind>, ephemeral: Vec<Ephemeral>) -> Frame {
        let events =
            events.into_iter().enumerate().map(|(i, event)| StreamEvent { pos: i as u64 + 1, event }).collect();
        Frame { next: 100, events, ephemeral }
    }

    pub fn keys(app: &mut App, s: &str) -> Vec<Action> {
        let mut out = Vec::new();
        for c in s.chars() {
            out.extend(app.terminal(Event::Key(KeyEvent::from(KeyCode::Char(c))), app.now_ms));
        }
        out
    }

    pub fn enter(app: &mut App) -> Vec<Action> {
        app.terminal(Event::Key(KeyEvent::from(KeyCode::Enter)), app.now_ms)
    }

    fn sends(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| if let Action::Send { text, .. } = a { Some(text.as_str()) } else { None })
            .collect()
    }

    pub fn two() -> (UserId, UserId, App) {
        let (bob, alice) = (user("@bob:beta.test"), user("@alice:alpha.test"));
        let app = App::new(bob.clone(), Some(alice.clone()), 1_000_000);
        (bob, alice, app)
    }

    #[test]
    fn a_message_arriving_leaves_the_half_typed_line_alone() {
        let (bob, alice, mut app) = two();
        keys(&mut app, "I am typing a long repl");
        let actions =
            app.frame(&frame(vec![EventKind::Message(msg(&alice, &bob, 1, 5, "are you there?"))], vec![]), 1_000_100);
        assert_eq!(app.editor.text(), "I am typing a long repl");
        assert!(actions.contains(&Action::Receipt {
            with: alice.clone(),
            kind: ReceiptKind::Delivered,
            up_to: Watermark(msg(&alice, &bob, 1, 5, "").order_key())
        }));
        assert!(
            actions.iter().any(|a| matches!(a, Action::Receipt { kind: ReceiptKind::Read, .. })),
            "open: read at once"
        );
        keys(&mut app, "y");
        assert_eq!(sends(&enter(&mut app)), vec!["I am typing a long reply"]);
        assert!(app.editor.is_empty());
    }

    #[test]
    fn quit_and_commands_are_never_sent() {
        let (_, _, mut app) = two();
        keys(&mut app, "/help");
        assert!(enter(&mut app).is_empty());
        assert!(app.overlay.is_some());
        keys(&mut app, "/nonsense");
        assert!(enter(&mut app).is_empty());
        assert!(app.status.as_ref().is_some_and(|s| s.error && s.text.contains("unknown command")));
        keys(&mut app, "//slash");
        assert_eq!(sends(&enter(&mut app)), vec!["/slash"]);
        keys(&mut app, "/quit");
        assert!(enter(&mut app).is_empty());
        assert!(app.quit);
    }

    #[test]
    fn over_long_input_is_refused_whole_and_kept_for_editing() {
        let (_, _, mut app) = two();
        let long = "x".repeat(limits::MAX_CONTENT_BODY + 1);
        app.terminal(Event::Paste(long.clone()), app.now_ms);
        assert!(sends(&enter(&mut app)).is_empty());
        assert_eq!(app.editor.text(), long, "never truncated");
        assert!(app.status.as_ref().is_some_and(|s| s.error && s.text.contains("16384")));
        app.terminal(Event::Key(KeyEvent::from(KeyCode::Backspace)), app.now_ms);
        assert_eq!(sends(&enter(&mut app)).len(), 1, "at the limit it goes");
    }

    #[test]
    fn multi_line_with_alt_enter_and_ctrl_j() {
        let (_, _, mut app) = two();
        keys(&mut app, "one");
        app.terminal(Event::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT)), app.now_ms);
        keys(&mut app, "two");
        app.terminal(Event::Key(KeyEvent::new(KeyCode::Char('j'), KeyModifiers::CONTROL)), app.now_ms);
        keys(&mut app, "three");
        assert_eq!(sends(&enter(&mut app)), vec!["one\ntwo\nthree"]);
    }

    #[test]
    fn typing_notifications_are_rate_limited_and_shown_until_they_expire() {
        let (bob, alice, mut app) = two();
        let typed = |a: &[Action]| a.iter().filter(|a| matches!(a, Action::Typing { .. })).count();
        assert_eq!(typed(&keys(&mut app, "hello")), 1, "one for a burst of keys");
        assert_eq!(typed(&app.tick(app.now_ms + TYPING_EVERY_MS - 1)), 0);
        assert_eq!(typed(&app.tick(app.now_ms + 1)), 1, "keys typed meanwhile renew it when the interval ends");
        assert_eq!(typed(&app.tick(app.now_ms + TYPING_EVERY_MS)), 0, "no keys, no renewal");
        assert_eq!(typed(&keys(&mut app, "!")), 1, "a key after the interval");
        // Sent: the next message's typing may go as soon as the server allows (1 s), and
        // a burst of keys before that is announced then, not lost.
        enter(&mut app);
        assert_eq!(typed(&keys(&mut app, "next")), 0);
        assert_eq!(typed(&app.tick(app.now_ms + TYPING_MIN_INTERVAL_MS - 1)), 0);
        assert_eq!(typed(&app.tick(app.now_ms + 1)), 1);
        app.editor.take();
        app.tick(app.now_ms + TYPING_EVERY_MS);
        assert_eq!(typed(&keys(&mut app, "/x")), 0);

        let t = TypingUpdate {
            conv: ConversationId::one_to_one(&bob, &alice),
            peer: bob.clone(),
            user: alice.clone(),
            until: app.now_ms + 5_000,
        };
        app.frame(&frame(vec![], vec![Ephemeral::Typing(t)]), app.now_ms);
        assert!(app.current().unwrap().typing_until.is_some());
        app.tick(app.now_ms + 5_000);
        assert!(app.current().unwrap().typing_until.is_none(), "expired at `until`");
    }

    #[test]
    fn receipts_move_states_once_and_never_back() {
        let (bob, alice, mut app) = two();
        let mine = msg(&bob, &alice, 1, 5, "hi");
        app.done(Done::Sent(mine.clone()), app.now_ms);
        let state = |app: &App| app.current().unwrap().state_of(&mine);
        assert_eq!(state(&app), "sent");
        let receipt = |kind| Receipt {
            conv: mine.conv,
            kind,
            peer: bob.clone(),
            user: alice.clone(),
            up_to: Watermark(mine.order_key()),
        };
        app.frame(&frame(vec![EventKind::Receipt(receipt(ReceiptKind::Delivered))], vec![]), app.now_ms);
        assert_eq!(state(&app), "delivered");
        app.frame(&frame(vec![EventKind::Receipt(receipt(ReceiptKind::Read))], vec![]), app.now_ms);
        assert_eq!(state(&app), "read");
        app.frame(&frame(vec![EventKind::Receipt(receipt(ReceiptKind::Delivered))], vec![]), app.now_ms);
        assert_eq!(state(&app), "read", "a replayed older receipt changes nothing");
        let refused = missive_spec::Undeliverable {
            seq: mine.seq,
            conv: mine.conv,
            origin: mine.origin.clone(),
            reason: "unknown_recipient".into(),
        };
        let other = msg(&bob, &alice, 2, 6, "later");
        app.done(Done::Sent(other.clone()), app.now_ms);
        app.frame(&frame(vec![EventKind::Undeliverable(refused)], vec![]), app.now_ms);
        assert_eq!(state(&app), "failed");
        assert_eq!(app.current().unwrap().state_of(&other), "sent", "only the refused one");
        assert!(app.status.as_ref().is_some_and(|s| s.error && s.text.contains("could not be delivered")));
        // The stream repeats one's own message: it stays one message.
        app.frame(&frame(vec![EventKind::Message(mine.clone())], vec![]), app.now_ms);
        assert_eq!(app.current().unwrap().messages.len(), 2);
    }

    #[test]
    fn unread_counts_for_other_conversations_and_clear_on_opening() {
        let (bob, alice, mut app) = two();
        let carol = user("@carol:beta.test");
        let actions = app.frame(
            &frame(
                vec![
                    EventKind::Message(msg(&carol, &bob, 1, 7, "psst")),
                    EventKind::Message(msg(&carol, &bob, 2, 8, "psst")),
                ],
                vec![],
            ),
            app.now_ms,
        );
        assert!(!actions.iter().any(|a| matches!(a, Action::Receipt { kind: ReceiptKind::Read, .. })));
        let c = app.convs.iter().find(|c| c.with == carol).unwrap();
        assert_eq!(c.unread, 2);
        assert_eq!(app.convs[0].with, carol, "most recently active first");
        assert_eq!(app.open, Some(alice));
        // Tab opens carol's conversation: not loaded yet, so its history first.
        let actions = app.terminal(Event::Key(KeyEvent::from(KeyCode::Tab)), app.now_ms);
        assert_eq!(actions[0], Action::History { with: carol.clone(), before: None });
        let page = Page { messages: vec![], older: None, newer: None, read: None, delivered: None, seen: None, failed: vec![] };
        let actions = app.done(Done::Page { with: carol.clone(), older: false, page }, app.now_ms);
        assert!(matches!(&actions[..], [Action::Receipt { kind: ReceiptKind::Read, .. }]), "{actions:?}");
        assert_eq!(app.current().unwrap().unread, 0);
    }

    #[test]
    fn a_page_marks_the_messages_the_other_server_refused() {
        let (bob, _, mut app) = two();
        let nobody = user("@nobody:gamma.test");
        let (lost, fine) = (msg(&bob, &nobody, 1, 5, "lost"), msg(&bob, &nobody, 2, 6, "fine"));
        let refused = missive_spec::Undeliverable { seq: 1, conv: lost.conv, origin: lost.origin.clone(), reason: "unknown_recipient".into() };
        let page = Page {
            messages: vec![fine.clone(), lost.clone()],
            older: None,
            newer: None,
            read: None,
            delivered: None,
            seen: None,
            failed: vec![refused],
        };
        app.done(Done::Page { with: nobody.clone(), older: false, page }, app.now_ms);
        let c = app.convs.iter().find(|c| c.with == nobody).unwrap();
        assert_eq!((c.state_of(&lost), c.state_of(&fine)), ("failed", "sent"));
    }

    #[test]
    fn the_server_list_fills_the_conversations_most_recent_first() {
        let (bob, alice, mut app) = two();
        let carol = user("@carol:gamma.test");
        let online = PresenceUpdate { user: carol.clone(), online: true, last_seen: None };
        app.listed(vec![
            Listed { with: carol.clone(), active_ms: 9, unread: 3, last: Some(msg(&carol, &bob, 4, 9, "hey")), presence: Some(online) },
            Listed { with: alice.clone(), active_ms: 5, unread: 0, last: None, presence: None },
        ]);
        assert_eq!(app.convs.iter().map(|c| c.with.clone()).collect::<Vec<_>>(), vec![carol.clone(), alice]);
        let c = &app.convs[0];
        assert_eq!((c.unread, c.messages.len()), (3, 1));
        assert!(c.presence.as_ref().is_some_and(|p| p.online));
        assert!(!c.loaded, "opening it still loads its history");
    }

    #[test]
    fn errors_only_set_the_status_line() {
        let (_, _, mut app) = two();
        keys(&mut app, "draft");
        app.done(Done::Failed { what: "sending", error: "too_large".into() }, app.now_ms);
        assert!(!app.quit);
        assert_eq!(app.editor.text(), "draft");
        assert!(app.status.as_ref().is_some_and(|s| s.error));
        app.tick(app.now_ms + STATUS_MS);
        assert!(app.status.is_none(), "and the status goes away");
    }
}
