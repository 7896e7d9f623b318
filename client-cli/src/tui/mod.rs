//! The full-screen `missive chat`: the state ([`app::App`]) changes with each terminal
//! event, stream frame, request answer and tick; [`draw::draw`] paints it; this module
//! is the shell that moves events in and requests out. Requests run on a task of their
//! own, so a slow server never freezes typing, and nothing but the draw call writes to
//! the terminal.

pub mod app;
pub mod draw;
pub mod input;

use std::io::Stdout;
use std::time::Duration;

use anyhow::Context;
use missive_cli::client::{Client, ClientError};
use missive_cli::e2ee::{send_text, Crypto};
use missive_cli::outbox::{Outbox, Queued};
use missive_cli::profile::Profile;
use missive_cli::archive::Recorder;
use missive_spec::{limits, ErrorCode, UserId};
use ratatui::crossterm::event::{self, DisableBracketedPaste, EnableBracketedPaste, Event};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{self, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::prelude::CrosstermBackend;
use ratatui::Terminal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use self::app::{Action, App, Connection, Done, Listed};
use crate::follow::{Follow, Next};

/// Conversations asked for at start and on each reconnection.
const LISTED: u32 = limits::CONVERSATIONS_MAX_LIMIT;
/// How often the screen updates without input (typing indicators expire, status fades).
const TICK: Duration = Duration::from_millis(250);
/// After a fatal-looking error of the connection (a refused session), wait this long
/// before trying again; the screen stays usable meanwhile.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(3);

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The terminal in raw mode on the alternate screen with bracketed paste, put back as it
/// was when dropped, and by the panic hook if the program panics.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

fn restore_terminal() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(std::io::stdout(), DisableBracketedPaste, LeaveAlternateScreen, ratatui::crossterm::cursor::Show);
}

impl Screen {
    fn enter() -> anyhow::Result<Screen> {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            hook(info);
        }));
        terminal::enable_raw_mode().context("cannot switch the terminal to raw mode")?;
        let screen = Screen { terminal: Terminal::new(CrosstermBackend::new(std::io::stdout()))? };
        execute!(std::io::stdout(), EnterAlternateScreen, EnableBracketedPaste)?;
        Ok(screen)
    }
}

impl Screen {
    /// Paints everything again (something else wrote to the terminal). Without asking the
    /// terminal where its cursor is, as `Terminal::clear` would: the answer would go to
    /// the thread that reads key presses.
    fn repaint(&mut self) -> anyhow::Result<()> {
        execute!(std::io::stdout(), terminal::Clear(terminal::ClearType::All))?;
        self.terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
        Ok(())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Terminal events, read on a thread of their own. Bounded: the reader waits while 256
/// events are unhandled.
fn terminal_events() -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(256);
    std::thread::spawn(move || {
        while let Ok(e) = event::read() {
            if tx.blocking_send(e).is_err() {
                return;
            }
        }
    });
    rx
}

/// A request with the connection it goes over.
struct Job {
    client: Client,
    action: Action,
}

/// What the request task reports.
enum Answer {
    Done(Done),
    /// What the key store noticed (a changed device of a peer), to show.
    Notices(Vec<String>),
    /// The connection broke while sending: the message goes to the outbox.
    SendLost {
        to: UserId,
        text: String,
        id: missive_spec::ClientMsgId,
        conn: usize,
        reason: String,
    },
}

/// Runs requests one after another, in the order the screen asked for them (so sends keep
/// their order). Both channels hold at most 256 entries; the screen waits when full.
/// Messages are encrypted here (unless `plaintext`) and history pages opened, with a key
/// store of the task's own.
fn request_task(mut crypto: Crypto, plaintext: bool) -> (mpsc::Sender<Job>, mpsc::Receiver<Answer>) {
    let (job_tx, mut jobs) = mpsc::channel::<Job>(256);
    let (answer_tx, answers) = mpsc::channel(256);
    tokio::spawn(async move {
        while let Some(Job { client: c, action }) = jobs.recv().await {
            let answer = match action {
                Action::Send { to, text, id } => match send_text(&c, &mut crypto, &to, &text, id, plaintext).await {
                    Ok(m) => Some(Answer::Done(Done::Sent(m))),
                    Err(e) if e.is_connection() => {
                        Some(Answer::SendLost { to, text, id, conn: c.connection().stable_id(), reason: e.to_string() })
                    }
                    Err(e) => Some(Answer::Done(Done::Failed { what: "sending", error: e.to_string() })),
                },
                // The server limits typing notifications too; a refusal is not worth a word.
                Action::Typing { with } => match c.typing(&with).await {
                    // The screen keeps to the server's limit; a refusal at its edge is harmless.
                    Ok(()) | Err(ClientError::Server { code: ErrorCode::RateLimited, .. }) => None,
                    Err(e) => Some(Answer::Done(Done::Failed { what: "a typing notification", error: e.to_string() })),
                },
                Action::Receipt { with, kind, up_to } => c
                    .receipt(&with, kind, up_to)
                    .await
                    .err()
                    .map(|e| Answer::Done(Done::Failed { what: "a receipt", error: e.to_string() })),
                Action::History { with, before } => {
                    let older = before.is_some();
                    Some(Answer::Done(match c.history(&with, Some(app::PAGE), before, None).await {
                        Ok(mut page) => {
                            crypto.open_messages(&c, &mut page.messages).await;
                            Done::Page { with, older, page }
                        }
                        Err(e) => Done::Failed { what: "loading history", error: e.to_string() },
                    }))
                }
                Action::Presence { user } => c.presence(&user).await.ok().map(|p| Answer::Done(Done::Presence(p))),
                Action::Devices => Some(Answer::Done(match c.devices().await {
                    Ok(d) => Done::Devices(d),
                    Err(e) => Done::Failed { what: "listing devices", error: e.to_string() },
                })),
            };
            let notices = crypto.take_notices();
            for a in answer.into_iter().chain((!notices.is_empty()).then_some(Answer::Notices(notices))) {
                if answer_tx.send(a).await.is_err() {
                    return;
                }
            }
        }
    });
    (job_tx, answers)
}

/// The user's most recently active conversations, for the list (which then grows with
/// what the event stream and opened conversations bring).
async fn conversations(c: &Client) -> Result<Vec<Listed>, ClientError> {
    let (list, _older) = c.conversations(Some(LISTED), None).await?;
    Ok(list
        .into_iter()
        .map(|s| Listed { with: s.with, active_ms: s.active_ms, unread: s.unread, last: s.last, presence: s.presence })
        .collect())
}

enum Input {
    Terminal(Option<Event>),
    Answer(Option<Box<Answer>>),
    Tick,
    Quit,
}

pub async fn run(profile: &Profile, peer: Option<UserId>, plaintext: bool) -> anyhow::Result<()> {
    let session = profile.require_session()?;
    let me = session.user.clone();
    let mut crypto = crate::connect::crypto(profile, &session)?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut screen = Screen::enter()?;
    let mut events = terminal_events();
    let (jobs, mut answers) = request_task(crate::connect::crypto(profile, &session)?, plaintext);
    let mut app = App::new(me, None, now_ms());
    if let Some(with) = peer {
        // Its history and presence are asked for once connected.
        app.open_conversation(with);
    }
    let mut pending: Vec<Action> = Vec::new();
    let mut follow = Follow::new(profile);
    let mut hold_until: Option<tokio::time::Instant> = None;
    // What the screen shows is kept for `missive search`, like `sync` and `history` keep it.
    let mut archive = Recorder::quiet(profile);
    loop {
        let size = screen.terminal.size()?;
        app.rows = size.height.saturating_sub(6);
        screen.terminal.draw(|f| draw::draw(f, &app))?;
        if app.quit {
            break;
        }
        let input = async {
            tokio::select! {
                e = events.recv() => Input::Terminal(e),
                a = answers.recv() => Input::Answer(a.map(Box::new)),
                _ = tokio::time::sleep(TICK) => Input::Tick,
                _ = hangup.recv() => Input::Quit,
                _ = term.recv() => Input::Quit,
            }
        };
        let next = match hold_until {
            Some(at) => tokio::select! {
                x = input => Ok(Next::Input(x)),
                _ = tokio::time::sleep_until(at) => { hold_until = None; continue; }
            },
            None => follow.next(input).await,
        };
        let now = now_ms();
        match next {
            Err(e) => {
                app.connection(Connection::Offline(format!("{e:#}")));
                hold_until = Some(tokio::time::Instant::now() + RETRY_AFTER_ERROR);
            }
            Ok(Next::Connected(c)) => {
                app.connection(Connection::Online);
                // Connecting may have reported on standard error (the outbox): repaint all.
                screen.repaint()?;
                match conversations(&c).await {
                    Ok(list) => app.listed(list),
                    Err(e) => app.error(format!("listing conversations failed: {e}")),
                }
                if let Some(with) = app.open.clone() {
                    pending.push(Action::History { with: with.clone(), before: None });
                    pending.push(Action::Presence { user: with });
                }
            }
            Ok(Next::Frame(c, mut f)) => {
                crypto.open_events(&c, &mut f.events).await;
                for n in crypto.take_notices() {
                    app.error(n);
                }
                archive.record_events(&f.events);
                pending.extend(app.frame(&f, now));
                if let Err(e) = follow.save_position(f.next) {
                    app.error(format!("{e:#}"));
                }
            }
            Ok(Next::Input(Input::Terminal(Some(e)))) => pending.extend(app.terminal(e, now)),
            Ok(Next::Input(Input::Terminal(None) | Input::Quit | Input::Answer(None))) | Ok(Next::Interrupted) => {
                app.quit = true
            }
            Ok(Next::Input(Input::Answer(Some(answer)))) => match *answer {
                Answer::Done(d) => {
                    match &d {
                        Done::Sent(m) => archive.record(m),
                        Done::Page { page, .. } => archive.record_all(&page.messages),
                        _ => {}
                    }
                    pending.extend(app.done(d, now))
                }
                Answer::Notices(notices) => notices.into_iter().for_each(|n| app.error(n)),
                Answer::SendLost { to, text, id, conn, reason } => {
                    queue(profile, &mut app, to, text, id, plaintext);
                    if follow.client().is_some_and(|c| c.connection().stable_id() == conn) {
                        follow.lost(reason);
                    }
                }
            },
            Ok(Next::Input(Input::Tick)) => pending.extend(app.tick(now)),
            Ok(Next::Unreachable(delay)) => app.connection(Connection::Offline(format!(
                "server unreachable, next try in {} s",
                delay.as_secs().max(1)
            ))),
            Ok(Next::Lost(reason)) => app.connection(Connection::Offline(reason)),
        }
        if let Some(warning) = archive.take_warning() {
            app.error(warning);
        }
        for action in pending.drain(..) {
            match (follow.client(), action) {
                (Some(c), action) => {
                    if jobs.send(Job { client: c.clone(), action }).await.is_err() {
                        app.error("the request task ended");
                    }
                }
                (None, Action::Send { to, text, id }) => queue(profile, &mut app, to, text, id, plaintext),
                // Receipts, typing and pages wait for the connection: what is still
                // unread or unloaded then is asked for again.
                (
                    None,
                    Action::History { .. } | Action::Receipt { .. } | Action::Typing { .. } | Action::Presence { .. },
                ) => {}
                (None, Action::Devices) => app.error("not connected: /devices needs the server"),
            }
        }
    }
    drop(screen);
    follow.close().await;
    Ok(())
}

/// Puts a message written while offline into the profile's outbox.
fn queue(profile: &Profile, app: &mut App, to: UserId, text: String, id: missive_spec::ClientMsgId, plaintext: bool) {
    let q = Queued { plaintext, ..Queued::new(to.clone(), text.clone(), id) };
    match Outbox::open(profile.dir()).and_then(|o| o.push(&q)) {
        Ok(_) => app.queued(to, text),
        Err(e) => app.error(format!("not sent, and the outbox refused it: {e:#}")),
    }
}
