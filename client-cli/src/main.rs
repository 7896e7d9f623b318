//! `missive`: the Missive command-line client.

use std::collections::HashSet;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use missive_cli::client::{message_state, new_client_msg_id, Client, ClientError};
use missive_cli::outbox::{Outbox, Queued};
use missive_cli::output::{
    message_json, message_json_with_state, message_line, message_line_with_state, page_json, receipt_json, receipt_line,
};
use missive_cli::profile::{Profile, SessionFile};
use missive_transport::tls::Pin;
use missive_transport::PublicKey;
use missive_spec::{limits, Cursor, DeviceId, Event, EventKind, Message, ReceiptKind, ServerName, UserId, Watermark};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

const JSON_HELP: &str = "\
With --json, every command prints one JSON object per line, each with a \"type\":
  session  {type, user, device, server}                      login, register
  sent     {type, conv, origin, seq, rank, from, to, ts,
            content_type, text | body_base64}                send
  message  {type, [pos], conv, origin, seq, rank, from, to,
            ts, content_type, text | body_base64, [state]}   history, sync, listen, chat
            (state: sent, delivered or read; on one's own messages in history and chat)
  receipt  {type, [pos], conv, user, peer, kind, up_to}      sync, listen, chat
            (user has kind (delivered, read) everything up to up_to {rank, origin, seq})
  device   {type, id, name, current, created_ms}             devices
  queued   {type, to, text, client_msg_id, created_ms}       send (server unreachable), outbox
  presence {type, user, online, last_seen}                   presence, listen, chat
  typing   {type, user, conv, until}                         listen, chat
  page     {type, count, older, newer}                       history (last line; cursors or null)
  synced   {type, pos, count}                                sync (last line)
  ok       {type}                                            logout
Errors go to standard error, and the exit status is non-zero.";

#[derive(Parser)]
#[command(name = "missive", version, about = "Missive messaging client", after_help = JSON_HELP)]
struct Cli {
    /// Profile directory holding the session and pinned server keys [default: ~/.missive].
    #[arg(long, env = "MISSIVE_PROFILE", global = true)]
    profile: Option<PathBuf>,
    /// Print one JSON object per line (see below).
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for the homeserver to answer before treating it as unreachable.
    #[arg(long, global = true, env = "MISSIVE_CONNECT_TIMEOUT_MS", value_name = "MS", default_value_t = 3000)]
    connect_timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Log in, creating a new device; pins the server's key on first contact.
    Login {
        /// Your user id, e.g. @alice:alpha.example.
        user: String,
        /// The homeserver's client address, HOST:PORT.
        #[arg(long)]
        server: String,
        /// Read the password from the first line of standard input.
        #[arg(long, required = true)]
        password_stdin: bool,
        /// A name for this device.
        #[arg(long)]
        device_name: Option<String>,
    },
    /// Create an account (where the server allows it) and log in.
    Register {
        user: String,
        #[arg(long)]
        server: String,
        #[arg(long, required = true)]
        password_stdin: bool,
        /// Registration token, if the server asks for one.
        #[arg(long)]
        token: Option<String>,
        #[arg(long)]
        device_name: Option<String>,
    },
    /// Send a text message. If the homeserver cannot be reached, the message waits in the
    /// profile's outbox and goes out, in order, with the next command that reaches it.
    Send { to: String, text: String },
    /// List messages waiting in the outbox.
    Outbox,
    /// Show a conversation, newest first, one page at a time.
    History {
        with: String,
        /// Page size (1-200).
        #[arg(long)]
        limit: Option<u32>,
        /// Show messages older than this cursor (from a previous page).
        #[arg(long, conflicts_with = "after")]
        before: Option<String>,
        /// Show messages newer than this cursor.
        #[arg(long)]
        after: Option<String>,
    },
    /// Print everything that arrived since the last sync, and remember the position.
    Sync,
    /// Print events as they arrive, until interrupted.
    Listen,
    /// Chat interactively: type lines to send; Ctrl-D or Ctrl-C quits.
    Chat { with: String },
    /// Revoke this device's access token and forget the session.
    Logout,
    /// Mark the conversation with a user as read, on every device.
    Read { with: String },
    /// List this user's devices.
    Devices,
    /// Whether a user you have a conversation with is online, or when last seen.
    Presence { user: String },
    /// Tell a user you are typing (it shows in their chat for a few seconds).
    Typing { with: String },
    /// Change settings: --hide-last-seen true|false.
    Settings {
        /// Hide when you were last seen from everyone.
        #[arg(long)]
        hide_last_seen: bool_arg::Bool,
    },
    /// Revoke another of this user's devices (see `missive devices`).
    Revoke { device: String },
}

mod bool_arg {
    /// `true` or `false` on the command line.
    #[derive(Clone, Copy, Debug, clap::ValueEnum)]
    pub enum Bool {
        True,
        False,
    }
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("missive: error: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("missive: error: {e:#}");
            1
        }
    };
    // Exit without waiting for a blocked standard-input reader.
    std::process::exit(code);
}

fn profile_dir(p: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match p {
        Some(p) => Ok(p),
        None => {
            let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("set --profile, MISSIVE_PROFILE or HOME"))?;
            Ok(PathBuf::from(home).join(".missive"))
        }
    }
}

fn parse_user(s: &str) -> anyhow::Result<UserId> {
    UserId::parse(s).map_err(|e| anyhow!("{e}"))
}

fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("cannot read the password from standard input")?;
    let pw = line.trim_end_matches(['\n', '\r']).to_owned();
    if pw.is_empty() {
        bail!("no password on standard input");
    }
    Ok(pw)
}

async fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("cannot resolve {server} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| anyhow!("{server} resolves to no address"))
}

fn key_changed(server: &ServerName, pinned: &PublicKey, presented: &PublicKey, profile: &Profile) -> anyhow::Error {
    anyhow!(
        "\n@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
         @   WARNING: THE KEY OF SERVER {server} HAS CHANGED!\n\
         @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
         Someone may be impersonating the server, or its operator replaced the key.\n\
         pinned:    {pinned} ({})\n\
         presented: {presented} ({})\n\
         Refusing to connect. If the operator confirms the new key, remove \"{server}\" from\n\
         {}/known_servers.json and log in again.",
        pinned.fingerprint(),
        presented.fingerprint(),
        profile.dir().display()
    )
}

static CONNECT_TIMEOUT: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();

/// Connects to the server of `user` at `addr`, checking the pinned key.
async fn connect(profile: &Profile, user: &UserId, addr: &str) -> anyhow::Result<Client> {
    let server = user.server_name();
    let sock = resolve(addr).await?;
    let pinned = profile.pinned(&server)?;
    let pin = pinned.map(Pin::Key).unwrap_or(Pin::FirstUse);
    let timeout = *CONNECT_TIMEOUT.get_or_init(|| missive_cli::client::DEFAULT_CONNECT_TIMEOUT);
    match Client::connect_within(sock, &server, pin, timeout).await {
        Ok(c) => Ok(c),
        Err(ClientError::KeyMismatch { pinned, presented }) => Err(key_changed(&server, &pinned, &presented, profile)),
        Err(e) => Err(e.into()),
    }
}

/// True when the error means the server was not reached at all.
fn unreachable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ClientError>().is_some_and(|c| c.is_unreachable())
}

/// Connects with the saved session and first sends whatever waits in the outbox.
async fn session_client(profile: &Profile) -> anyhow::Result<(Client, SessionFile)> {
    let (c, s, _) = session_client_flushed(profile).await?;
    Ok((c, s))
}

/// Like [`session_client`]; also returns how many outbox messages still wait.
async fn session_client_flushed(profile: &Profile) -> anyhow::Result<(Client, SessionFile, usize)> {
    let s = profile.require_session()?;
    if profile.pinned(&s.user.server_name())?.is_none() {
        bail!("no pinned key for {}; log in again", s.user.server_name());
    }
    let mut c = connect(profile, &s.user, &s.server).await?;
    c.set_token(Some(s.token.clone()));
    let waiting = flush_outbox(profile, &c).await?;
    Ok((c, s, waiting))
}

/// Sends the outbox in order; reports on standard error. Returns how many still wait.
async fn flush_outbox(profile: &Profile, c: &Client) -> anyhow::Result<usize> {
    let outbox = Outbox::open(profile.dir())?;
    if outbox.is_empty()? {
        return Ok(0);
    }
    let f = outbox.flush(c).await?;
    if !f.sent.is_empty() {
        eprintln!("sent {} message(s) from the outbox", f.sent.len());
    }
    for (q, why) in &f.failed {
        eprintln!("missive: the server refused a queued message to {}: {why} (kept in outbox/failed)", q.to);
    }
    Ok(f.waiting)
}

fn queue_message(profile: &Profile, to: &UserId, text: &str, id: missive_spec::ClientMsgId, json: bool) -> anyhow::Result<()> {
    let outbox = Outbox::open(profile.dir())?;
    let q = Queued { to: to.clone(), text: text.to_owned(), client_msg_id: id.to_hex(), created_ms: now_ms() };
    outbox.push(&q)?;
    let waiting = outbox.list()?.len();
    if json {
        println!("{}", queued_json(&q));
    } else {
        println!("server unreachable: queued for {to} ({waiting} waiting); it goes out with the next command that reaches the server");
    }
    Ok(())
}

fn queued_json(q: &Queued) -> String {
    json!({"type": "queued", "to": q.to.as_str(), "text": q.text, "client_msg_id": q.client_msg_id, "created_ms": q.created_ms}).to_string()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn print_message(json: bool, kind: &str, m: &Message, pos: Option<u64>) {
    if json {
        println!("{}", message_json(kind, m, pos));
    } else {
        println!("{}", message_line(m));
    }
}

/// A message from a history page; one's own carry their state (sent, delivered, read).
fn print_page_message(json: bool, m: &Message, me: &UserId, page: &missive_cli::Page) {
    let state = (m.from == *me).then(|| message_state(m, &page.read, &page.delivered));
    if json {
        println!("{}", message_json_with_state("message", m, None, state));
    } else {
        println!("{}", message_line_with_state(m, state));
    }
}

/// Reconnect delays: the project's backoff, doubling from 250 ms to at most 5 s, with
/// jitter so that many clients do not return to a restarted server at the same instant.
fn reconnect_backoff() -> missive_transport::backoff::Backoff {
    missive_transport::backoff::Backoff::new(std::time::Duration::from_millis(250), std::time::Duration::from_secs(5))
}

/// How long to wait before the next connection attempt.
fn next_delay(b: &mut missive_transport::backoff::Backoff) -> std::time::Duration {
    use rand::Rng;
    let now = std::time::Instant::now();
    b.failure(now, rand::thread_rng().gen()).saturating_duration_since(now)
}

fn print_event(json: bool, e: &Event) {
    match &e.event {
        EventKind::Message(m) => print_message(json, "message", m, Some(e.pos)),
        EventKind::Receipt(r) if json => println!("{}", receipt_json(r, Some(e.pos))),
        EventKind::Receipt(r) => println!("{}", receipt_line(r)),
        // A kind this version does not know (spec §6.5): skipped.
        EventKind::Unknown(_) => {}
    }
}

fn print_ephemeral(json: bool, e: &missive_spec::Ephemeral) {
    if json {
        println!("{}", missive_cli::output::ephemeral_json(e));
    } else {
        println!("{}", missive_cli::output::ephemeral_line(e));
    }
}

/// A subscription frame, or why the connection is gone (`Err(reason)`: reconnect). A
/// revoked token is fatal.
fn frame_or_lost(r: Result<Option<missive_cli::client::Frame>, ClientError>) -> anyhow::Result<Result<missive_cli::client::Frame, String>> {
    match r {
        Ok(Some(f)) => Ok(Ok(f)),
        Ok(None) => Ok(Err("the server ended the subscription".to_owned())),
        Err(ClientError::Server { code: missive_spec::ErrorCode::Unauthorized, message }) => bail!("unauthorized: {message}"),
        Err(e) => Ok(Err(e.to_string())),
    }
}

/// Tells the server that this device now has the other users' messages among `events`:
/// one delivered receipt per conversation, up to the newest such message.
async fn ack_delivered(c: &Client, me: &UserId, events: &[Event]) -> anyhow::Result<()> {
    let mut newest: std::collections::HashMap<UserId, Watermark> = std::collections::HashMap::new();
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
    for (peer, w) in newest {
        c.receipt(&peer, ReceiptKind::Delivered, w).await?;
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let _ = CONNECT_TIMEOUT.set(std::time::Duration::from_millis(cli.connect_timeout.max(1)));
    let profile = Profile::open(&profile_dir(cli.profile)?)?;
    let json = cli.json;
    match cli.command {
        Command::Login { user, server, password_stdin: _, device_name } => {
            let user = parse_user(&user)?;
            let password = read_password()?;
            let mut c = connect(&profile, &user, &server).await?;
            let session = c.login(&user, &password, device_name).await?;
            finish_login(&profile, &c, session, &server, json)?;
            c.close().await;
        }
        Command::Register { user, server, password_stdin: _, token, device_name } => {
            let user = parse_user(&user)?;
            let password = read_password()?;
            let mut c = connect(&profile, &user, &server).await?;
            let session = c.register(&user, &password, token, device_name).await?;
            finish_login(&profile, &c, session, &server, json)?;
            c.close().await;
        }
        Command::Send { to, text } => {
            let to = parse_user(&to)?;
            profile.require_session()?;
            let id = new_client_msg_id();
            let (c, _, waiting) = match session_client_flushed(&profile).await {
                Ok(x) => x,
                Err(e) if unreachable(&e) => return queue_message(&profile, &to, &text, id, json),
                Err(e) => return Err(e),
            };
            if waiting > 0 {
                // Older messages could not all go: keep the order by queueing this one too.
                return queue_message(&profile, &to, &text, id, json);
            }
            match c.send(&to, missive_spec::Content::text(&text), id).await {
                Ok(m) => {
                    if json {
                        println!("{}", message_json("sent", &m, None));
                    } else {
                        println!("sent to {} (#{})", m.to, m.seq);
                    }
                }
                // The request may or may not have arrived: queue it with the same id; the
                // server's idempotent send makes the retry safe.
                Err(ClientError::Connection(_)) => queue_message(&profile, &to, &text, id, json)?,
                Err(e) => return Err(e.into()),
            }
            c.close().await;
        }
        Command::Outbox => {
            let outbox = Outbox::open(profile.dir())?;
            let waiting = outbox.list()?;
            for (_, q) in &waiting {
                if json {
                    println!("{}", queued_json(q));
                } else {
                    println!("{} to {}: {}", missive_cli::output::utc(q.created_ms), q.to, q.text);
                }
            }
            if !json && waiting.is_empty() {
                eprintln!("the outbox is empty");
            }
        }
        Command::History { with, limit, before, after } => {
            let with = parse_user(&with)?;
            let (c, s) = session_client(&profile).await?;
            let page = c.history(&with, limit, before.map(Cursor), after.map(Cursor)).await?;
            for m in &page.messages {
                print_page_message(json, m, &s.user, &page);
            }
            // Shown means read.
            if let Some(newest) = page.messages.first() {
                let w = Watermark(newest.order_key());
                if page.seen.as_ref().is_none_or(|s| *s < w) {
                    c.receipt(&with, ReceiptKind::Read, w).await?;
                }
            }
            if json {
                println!("{}", page_json(&page.older, &page.newer, page.messages.len()));
            } else if let Some(o) = &page.older {
                println!("-- older messages: missive history {with} --before {}", o.0);
            }
            c.close().await;
        }
        Command::Sync => {
            let (c, mut s) = session_client(&profile).await?;
            let mut count = 0;
            loop {
                let page = c.sync_page(s.sync_pos, None).await?;
                let (next, events) = (page.next, page.events);
                for e in &events {
                    print_event(json, e);
                }
                ack_delivered(&c, &s.user, &events).await?;
                count += events.len();
                s.sync_pos = next;
                profile.save_session(&s)?;
                if !page.more && events.len() < limits::SYNC_MAX_EVENTS as usize {
                    break;
                }
            }
            if json {
                println!("{}", json!({"type": "synced", "pos": s.sync_pos, "count": count}));
            } else if count == 0 {
                eprintln!("nothing new");
            }
            c.close().await;
        }
        Command::Listen => listen(&profile, json).await?,
        Command::Chat { with } => chat(&profile, &parse_user(&with)?, json).await?,
        Command::Read { with } => {
            let with = parse_user(&with)?;
            let (c, _) = session_client(&profile).await?;
            let page = c.history(&with, Some(1), None, None).await?;
            match page.messages.first() {
                Some(m) => c.receipt(&with, ReceiptKind::Read, Watermark(m.order_key())).await?,
                None => bail!("no conversation with {with} yet"),
            }
            if json {
                println!("{}", json!({"type": "ok"}));
            } else {
                println!("marked the conversation with {with} as read");
            }
            c.close().await;
        }
        Command::Presence { user } => {
            let user = parse_user(&user)?;
            let (c, _) = session_client(&profile).await?;
            let p = c.presence(&user).await?;
            let e = missive_spec::Ephemeral::Presence(p);
            if json {
                print_ephemeral(true, &e);
            } else {
                println!("{}", missive_cli::output::ephemeral_line(&e).trim_start_matches("-- "));
            }
            c.close().await;
        }
        Command::Typing { with } => {
            let with = parse_user(&with)?;
            let (c, _) = session_client(&profile).await?;
            c.typing(&with).await?;
            if json {
                println!("{}", json!({"type": "ok"}));
            }
            c.close().await;
        }
        Command::Settings { hide_last_seen } => {
            let (c, _) = session_client(&profile).await?;
            c.set_hide_last_seen(matches!(hide_last_seen, bool_arg::Bool::True)).await?;
            if json {
                println!("{}", json!({"type": "ok"}));
            } else {
                println!("settings saved");
            }
            c.close().await;
        }
        Command::Devices => {
            let (c, _) = session_client(&profile).await?;
            for d in c.devices().await? {
                if json {
                    println!(
                        "{}",
                        json!({"type": "device", "id": d.id.as_str(), "name": d.name, "current": d.current, "created_ms": d.created_ms})
                    );
                } else {
                    let name = d.name.as_deref().unwrap_or("-");
                    let mark = if d.current { "  (this device)" } else { "" };
                    println!("{}  {}  created {}{mark}", d.id, name, missive_cli::output::utc(d.created_ms));
                }
            }
            c.close().await;
        }
        Command::Revoke { device } => {
            let device = DeviceId::parse(&device).map_err(|e| anyhow!("{e}"))?;
            let (c, s) = session_client(&profile).await?;
            if device.as_str() == s.device {
                bail!("that is this device; use `missive logout`");
            }
            c.revoke_device(device.clone()).await?;
            if json {
                println!("{}", json!({"type": "ok"}));
            } else {
                println!("revoked device {device}");
            }
            c.close().await;
        }
        Command::Logout => {
            let (c, _) = session_client(&profile).await?;
            c.logout().await?;
            profile.clear_session()?;
            if json {
                println!("{}", json!({"type": "ok"}));
            } else {
                println!("logged out");
            }
            c.close().await;
        }
    }
    Ok(())
}

fn finish_login(
    profile: &Profile,
    c: &Client,
    session: missive_cli::Session,
    server: &str,
    json: bool,
) -> anyhow::Result<()> {
    let name = session.user.server_name();
    if profile.pinned(&name)?.is_none() {
        profile.pin(&name, &c.server_key())?;
        eprintln!("pinned the key of {name}: {} ({})", c.server_key(), c.server_key().fingerprint());
    }
    profile.save_session(&SessionFile {
        user: session.user.clone(),
        server: server.to_owned(),
        device: session.device.clone(),
        token: session.token,
        sync_pos: 0,
    })?;
    if json {
        println!("{}", json!({"type": "session", "user": session.user.as_str(), "device": session.device, "server": server}));
    } else {
        println!("logged in as {} (device {})", session.user, session.device);
    }
    Ok(())
}

async fn listen(profile: &Profile, json: bool) -> anyhow::Result<()> {
    let mut announced = false;
    let mut backoff = reconnect_backoff();
    loop {
        let (c, mut s) = match session_client(profile).await {
            Ok(x) => x,
            Err(e) if unreachable(&e) => {
                let delay = next_delay(&mut backoff);
                eprintln!("server unreachable; retrying in {delay:?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        backoff.reset();
        let (mut sub, mut next, mut events) = c.subscribe(s.sync_pos).await?;
        if !json && !announced {
            eprintln!("listening as {} (Ctrl-C to stop)", s.user);
            announced = true;
        }
        let lost = loop {
            for e in &events {
                print_event(json, e);
            }
            ack_delivered(&c, &s.user, &events).await?;
            if next != s.sync_pos {
                s.sync_pos = next;
                profile.save_session(&s)?;
            }
            tokio::select! {
                frame = sub.next_frame() => match frame_or_lost(frame)? {
                    Ok(f) => {
                        for e in &f.ephemeral {
                            print_ephemeral(json, e);
                        }
                        next = f.next;
                        events = f.events;
                    }
                    Err(lost) => break lost,
                },
                _ = tokio::signal::ctrl_c() => {
                    c.close().await;
                    return Ok(());
                }
            }
        };
        eprintln!("connection lost ({lost}); reconnecting");
    }
}

async fn chat(profile: &Profile, with: &UserId, json: bool) -> anyhow::Result<()> {
    let me = profile.require_session()?.user;
    if *with == me {
        bail!("cannot chat with yourself");
    }
    let conv = missive_spec::ConversationId::one_to_one(&me, with);
    // Standard input is read on its own task so typed lines survive reconnections.
    let (line_tx, mut lines) = tokio::sync::mpsc::channel::<Option<String>>(64);
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            let line = stdin.next_line().await.ok().flatten();
            let eof = line.is_none();
            if line_tx.send(line).await.is_err() || eof {
                return;
            }
        }
    });
    let mut shown = HashSet::new();
    let mut first = true;
    let mut backoff = reconnect_backoff();
    loop {
        let (c, s) = match session_client(profile).await {
            Ok(x) => x,
            Err(e) if unreachable(&e) => {
                if first {
                    eprintln!("-- the server is unreachable; lines you type are queued --");
                    first = false;
                }
                // Keep taking lines while offline.
                let wait = tokio::time::sleep(next_delay(&mut backoff));
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        line = lines.recv() => match line.flatten() {
                            Some(text) if text.trim().is_empty() => {}
                            Some(text) => queue_message(profile, with, &text, new_client_msg_id(), json)?,
                            None => return Ok(()),
                        },
                        _ = &mut wait => break,
                        _ = tokio::signal::ctrl_c() => return Ok(()),
                    }
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        backoff.reset();
        let page = c.history(with, Some(20), None, None).await?;
        for m in page.messages.iter().rev() {
            if shown.insert((m.origin.clone(), m.seq)) {
                print_page_message(json, m, &s.user, &page);
            }
        }
        if let Some(newest) = page.messages.first() {
            c.receipt(with, ReceiptKind::Read, Watermark(newest.order_key())).await?;
        }
        let (mut sub, _, mut events) = c.subscribe(s.sync_pos).await?;
        if !json && first {
            eprintln!("-- chatting with {with}; type a line and press Enter to send, Ctrl-D to quit --");
        }
        first = false;
        let lost = loop {
            let mut newest_in: Option<Watermark> = None;
            for e in events.drain(..) {
                match e.event {
                    EventKind::Message(m) => {
                        if m.conv == conv && shown.insert((m.origin.clone(), m.seq)) {
                            print_message(json, "message", &m, Some(e.pos));
                            if m.from == *with {
                                let w = Watermark(m.order_key());
                                if newest_in.as_ref().is_none_or(|n| *n < w) {
                                    newest_in = Some(w);
                                }
                            }
                        }
                    }
                    // The other user's receipts change the state of our messages.
                    EventKind::Receipt(r) if r.conv == conv && r.user == *with => {
                        if json {
                            println!("{}", receipt_json(&r, Some(e.pos)));
                        } else {
                            println!("{}", receipt_line(&r));
                        }
                    }
                    EventKind::Receipt(_) | EventKind::Unknown(_) => {}
                }
            }
            // On screen means delivered and read.
            if let Some(w) = newest_in {
                c.receipt(with, ReceiptKind::Delivered, w.clone()).await?;
                c.receipt(with, ReceiptKind::Read, w).await?;
            }
            tokio::select! {
                line = lines.recv() => match line.flatten() {
                    Some(text) if text.trim().is_empty() => {}
                    Some(text) => {
                        let id = new_client_msg_id();
                        match c.send(with, missive_spec::Content::text(&text), id).await {
                            Ok(m) => {
                                shown.insert((m.origin.clone(), m.seq));
                                if json {
                                    println!("{}", message_json("sent", &m, None));
                                }
                            }
                            Err(ClientError::Connection(e)) => {
                                queue_message(profile, with, &text, id, json)?;
                                break e;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    None => {
                        c.close().await;
                        return Ok(());
                    }
                },
                frame = sub.next_frame() => match frame_or_lost(frame)? {
                    Ok(f) => {
                        for e in &f.ephemeral {
                            let about_peer = match e {
                                missive_spec::Ephemeral::Presence(p) => p.user == *with,
                                missive_spec::Ephemeral::Typing(t) => t.user == *with && t.conv == conv,
                                missive_spec::Ephemeral::Unknown(_) => false,
                            };
                            if about_peer {
                                print_ephemeral(json, e);
                            }
                        }
                        events = f.events;
                    }
                    Err(lost) => break lost,
                },
                _ = tokio::signal::ctrl_c() => {
                    c.close().await;
                    return Ok(());
                }
            }
        };
        eprintln!("-- connection lost ({lost}); reconnecting --");
    }
}
