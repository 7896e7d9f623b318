//! Drawing the chat screen: a pure function of the [`App`] state. Conversations on the
//! left, the open conversation on the right (header with presence, messages with day
//! separators, times and states, the peer's typing), the input below, a status line last.

use missive_cli::output::utc;
use missive_spec::Message;
use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};
use ratatui::Frame;
use unicode_width::UnicodeWidthChar;

use super::app::{App, Connection, Conversation};

const LIST_WIDTH: u16 = 32;
/// Most rows the input box grows to.
const INPUT_ROWS: u16 = 8;

pub fn draw(f: &mut Frame, app: &App) {
    let area = f.area();
    let width = area.width.saturating_sub(2).max(1);
    let (input_rows, cursor) = app.editor.layout(width);
    let input_height = (input_rows.len() as u16).clamp(1, INPUT_ROWS) + 2;
    let [main, input, status] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(input_height), Constraint::Length(1)]).areas(area);
    let [list, conv] = Layout::horizontal([Constraint::Length(LIST_WIDTH), Constraint::Min(10)]).areas(main);

    draw_list(f, app, list);
    draw_conversation(f, app, conv);

    // The input: scrolled so that the cursor's row shows.
    let visible = usize::from(input_height - 2);
    let skip = usize::from(cursor.0).saturating_sub(visible - 1);
    let lines: Vec<Line> = input_rows.into_iter().skip(skip).take(visible).map(Line::from).collect();
    let title = match &app.open {
        Some(w) => format!(" to {w} · Enter sends · Alt-Enter new line · /help "),
        None => " /open @user:server · /help ".to_owned(),
    };
    f.render_widget(Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(title)), input);
    let y = input.y + 1 + cursor.0.saturating_sub(skip as u16);
    f.set_cursor_position(Position::new(input.x + 1 + cursor.1.min(width.saturating_sub(1)), y));

    f.render_widget(Paragraph::new(status_line(app)), status);
}

fn draw_list(f: &mut Frame, app: &App, area: Rect) {
    let inner = usize::from(area.width.saturating_sub(2));
    let lines: Vec<Line> = app
        .convs
        .iter()
        .map(|c| {
            let open = app.open.as_ref() == Some(&c.with);
            let dot = match &c.presence {
                Some(p) if p.online => "●",
                _ => "○",
            };
            let unread = if c.unread > 0 { format!(" ({})", c.unread) } else { String::new() };
            let name = truncate(c.with.as_str(), inner.saturating_sub(4 + unread.len()));
            let style = if open { Style::default().add_modifier(Modifier::REVERSED) } else { Style::default() };
            let unread_style = Style::default().fg(Color::Yellow).add_modifier(Modifier::BOLD);
            Line::from(vec![
                Span::styled(format!("{} {dot} {name}", if open { '>' } else { ' ' }), style),
                Span::styled(unread, unread_style),
            ])
        })
        .collect();
    let lines = if lines.is_empty() { vec![Line::from(" no conversations yet")] } else { lines };
    f.render_widget(Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" Conversations ")), area);
}

/// `online`, `last seen 2026-12-01 18:50`, or `offline`.
pub fn presence_text(c: &Conversation) -> Option<String> {
    let p = c.presence.as_ref()?;
    Some(match (p.online, p.last_seen) {
        (true, _) => "online".to_owned(),
        (false, Some(t)) => format!("last seen {}", &utc(t)[..16]),
        (false, None) => "offline".to_owned(),
    })
}

fn draw_conversation(f: &mut Frame, app: &App, area: Rect) {
    let width = usize::from(area.width.saturating_sub(2)).max(1);
    let height = usize::from(area.height.saturating_sub(2));
    if let Some(o) = &app.overlay {
        let lines: Vec<Line> = o.lines.iter().flat_map(|l| wrap(l, width)).map(Line::from).collect();
        let block = Block::default().borders(Borders::ALL).title(format!(" {} ", o.title));
        f.render_widget(Paragraph::new(lines).block(block), area);
        return;
    }
    let Some(c) = app.current() else {
        let hint = "Open a conversation: /open @user:server, or Tab through the list. /help lists the commands.";
        let lines: Vec<Line> = wrap(hint, width).into_iter().map(Line::from).collect();
        f.render_widget(Paragraph::new(lines).block(Block::default().borders(Borders::ALL)), area);
        return;
    };
    let title = match presence_text(c) {
        Some(p) => format!(" {} · {p} ", c.with),
        None => format!(" {} ", c.with),
    };
    let mut rows = conversation_rows(app, c, width);
    if c.typing_until.is_some() {
        rows.push(Line::styled(format!("{} is typing…", c.with), Style::default().fg(Color::DarkGray)));
    }
    let total = rows.len();
    let bottom = rows.len().saturating_sub(app.scroll.min(rows.len().saturating_sub(height)));
    let top = bottom.saturating_sub(height);
    let shown: Vec<Line> = rows.drain(top..bottom).collect();
    let mut block = Block::default().borders(Borders::ALL).title(title);
    if bottom < total {
        block = block.title_bottom(" more below: PgDn ");
    }
    f.render_widget(Paragraph::new(shown).block(block), area);
}

/// Every row of the open conversation, oldest first: day separators, messages wrapped to
/// `width`, one's own with their state, then messages waiting in the outbox.
fn conversation_rows<'a>(app: &App, c: &Conversation, width: usize) -> Vec<Line<'a>> {
    let mut rows = Vec::new();
    let mut day = String::new();
    if c.older.is_some() {
        rows.push(Line::styled("── older messages: PgUp ──", Style::default().fg(Color::DarkGray)));
    }
    for m in c.messages.values() {
        let when = utc(m.ts);
        if when[..10] != day {
            day = when[..10].to_owned();
            rows.push(Line::styled(format!("──── {day} ────"), Style::default().fg(Color::DarkGray)));
        }
        let mine = m.from == app.me;
        let who = if mine { "you".to_owned() } else { m.from.to_string() };
        let state = mine.then(|| format!("  [{}]", c.state_of(m)));
        push_message(&mut rows, &when[11..16], &who, &body(m), state, width);
    }
    for (_, text) in app.waiting.iter().filter(|(to, _)| *to == c.with) {
        push_message(&mut rows, "--:--", "you", text, Some("  [waiting]".to_owned()), width);
    }
    rows
}

fn push_message(rows: &mut Vec<Line<'_>>, time: &str, who: &str, body: &str, state: Option<String>, width: usize) {
    let text = format!("{time} {who}: {body}");
    let mut lines = wrap(&text, width);
    if let Some(s) = state {
        match lines.last_mut() {
            Some(last) if width_of(last) + width_of(&s) <= width => last.push_str(&s),
            _ => lines.push(s.trim_start().to_owned()),
        }
    }
    rows.extend(lines.into_iter().map(Line::from));
}

fn body(m: &Message) -> String {
    let shown = missive_cli::e2ee::shown(&m.content);
    match (shown.text, shown.undecryptable) {
        (_, Some(why)) => format!("[encrypted message this device cannot read: {why}]"),
        (Some(t), None) => t.to_owned(),
        (None, None) => format!("[{} payload, {} bytes]", shown.kind, shown.body.len()),
    }
}

fn width_of(s: &str) -> usize {
    s.chars().map(|c| c.width().unwrap_or(0)).sum()
}

fn truncate(s: &str, max: usize) -> String {
    if width_of(s) <= max {
        return s.to_owned();
    }
    let mut out = String::new();
    for c in s.chars() {
        if width_of(&out) + c.width().unwrap_or(0) + 1 > max {
            break;
        }
        out.push(c);
    }
    out.push('…');
    out
}

/// `s` cut into rows of at most `width` columns, at line ends and by character (control
/// characters from the network are shown as `�`, never sent to the terminal).
pub fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut rows = vec![String::new()];
    let mut col = 0;
    for c in s.chars() {
        if c == '\n' {
            rows.push(String::new());
            col = 0;
            continue;
        }
        let c = if c.is_control() { '\u{fffd}' } else { c };
        let w = c.width().unwrap_or(0);
        if col + w > width && col > 0 {
            rows.push(String::new());
            col = 0;
        }
        if let Some(r) = rows.last_mut() {
            r.push(c);
        }
        col += w;
    }
    rows
}

fn status_line(app: &App) -> Line<'static> {
    let conn = match &app.connection {
        Connection::Connecting => Span::styled(" connecting… ", Style::default().fg(Color::Yellow)),
        Connection::Online => Span::styled(format!(" {} ", app.me), Style::default().fg(Color::Green)),
        Connection::Offline(why) => {
            Span::styled(format!(" offline ({why}); reconnecting "), Style::default().fg(Color::Red))
        }
    };
    let mut spans = vec![conn];
    if let Some(s) = &app.status {
        let style =
            if s.error { Style::default().fg(Color::Red).add_modifier(Modifier::BOLD) } else { Style::default() };
        spans.push(Span::styled(format!(" {}", s.text.replace('\n', " ")), style));
    }
    Line::from(spans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tui::app::tests::{frame, keys, msg, two};
    use crate::tui::app::Done;
    use missive_spec::{EventKind, PresenceUpdate};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen(app: &App, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, app)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h).map(|y| (0..w).map(|x| buf[(x, y)].symbol().to_owned()).collect::<String>()).collect()
    }

    #[test]
    fn layout_list_header_messages_states_typing_input_and_status() {
        let (bob, alice, mut app) = two();
        let day1 = 1_795_366_800_000; // 2026-11-22 17:00 UTC
        app.frame(
            &frame(
                vec![EventKind::Message(msg(&alice, &bob, 1, day1, "are you there?"))],
                vec![missive_spec::Ephemeral::Presence(PresenceUpdate {
                    user: alice.clone(),
                    online: true,
                    last_seen: None,
                })],
            ),
            app.now_ms,
        );
        app.done(Done::Sent(msg(&bob, &alice, 1, day1 + 86_400_000, "yes")), app.now_ms);
        keys(&mut app, "half a li");
        let s = screen(&app, 100, 16);
        let all = s.join("\n");
        assert!(s[0].contains("Conversations") && s[0].contains("@alice:alpha.test · online"), "{all}");
        assert!(s[1].contains("> ● @alice:alpha.test"), "{all}");
        assert!(all.contains("──── 2026-11-22 ────") && all.contains("──── 2026-11-23 ────"), "{all}");
        assert!(all.contains("17:00 @alice:alpha.test: are you there?"), "{all}");
        assert!(all.contains("17:00 you: yes  [sent]"), "{all}");
        assert!(s[13].contains("half a li"), "the input sits above the status line: {all}");
        assert!(s[15].contains("connecting"), "{all}");
    }

    #[test]
    fn scrolled_up_shows_older_rows_and_says_more_is_below() {
        let (bob, alice, mut app) = two();
        let events =
            (1..=30).map(|i| EventKind::Message(msg(&alice, &bob, i, 1_000 * i, &format!("line {i}")))).collect();
        app.frame(&frame(events, vec![]), app.now_ms);
        let s = screen(&app, 80, 12).join("\n");
        assert!(s.contains("line 30") && !s.contains("line 20"), "{s}");
        app.scroll = 10;
        let s = screen(&app, 80, 12).join("\n");
        assert!(s.contains("line 20") && !s.contains("line 30") && s.contains("more below"), "{s}");
    }

    #[test]
    fn wraps_by_width_and_hides_control_characters() {
        assert_eq!(wrap("abcdef", 4), vec!["abcd", "ef"]);
        assert_eq!(wrap("a\u{1b}[2Jb\nc", 10), vec!["a\u{fffd}[2Jb", "c"]);
        assert_eq!(truncate("@alice:alpha.example", 8), "@alice:…");
    }
}
