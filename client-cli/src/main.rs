//! `missive`: the Missive command-line client.

use std::collections::HashSet;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use missive_cli::client::{message_state, Client, ClientError};
use missive_cli::output::{
    message_json, message_json_with_state, message_line, message_line_with_state, page_json, receipt_json, receipt_line,
};
use missive_cli::profile::{Profile, SessionFile};
use missive_federation::tls::Pin;
use missive_federation::PublicKey;
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
    /// Send a text message.
    Send { to: String, text: String },
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
    /// Revoke another of this user's devices (see `missive devices`).
    Revoke { device: String },
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

/// Connects to the server of `user` at `addr`, checking the pinned key.
async fn connect(profile: &Profile, user: &UserId, addr: &str) -> anyhow::Result<Client> {
    let server = user.server_name();
    let sock = resolve(addr).await?;
    let pinned = profile.pinned(&server)?;
    let pin = pinned.map(Pin::Key).unwrap_or(Pin::FirstUse);
    match Client::connect(sock, &server, pin).await {
        Ok(c) => Ok(c),
        Err(ClientError::KeyMismatch { pinned, presented }) => Err(key_changed(&server, &pinned, &presented, profile)),
        Err(e) => Err(e.into()),
    }
}

async fn session_client(profile: &Profile) -> anyhow::Result<(Client, SessionFile)> {
    let s = profile.require_session()?;
    if profile.pinned(&s.user.server_name())?.is_none() {
        bail!("no pinned key for {}; log in again", s.user.server_name());
    }
    let mut c = connect(profile, &s.user, &s.server).await?;
    c.set_token(Some(s.token.clone()));
    Ok((c, s))
}

fn print_message(json: bool, kind: &str, m: &Message, pos: Option<u64>) {
    if json {
        println!("{}", message_json(kind, m, pos));
    } else {
        println!("{}", message_line(m));
    }
}

fn print_event(json: bool, e: &Event) {
    match &e.event {
        EventKind::Message(m) => print_message(json, "message", m, Some(e.pos)),
        EventKind::Receipt(r) if json => println!("{}", receipt_json(r, Some(e.pos))),
        EventKind::Receipt(r) => println!("{}", receipt_line(r)),
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
            let (c, _) = session_client(&profile).await?;
            let m = c.send_text(&to, &text).await?;
            if json {
                println!("{}", message_json("sent", &m, None));
            } else {
                println!("sent to {} (#{})", m.to, m.seq);
            }
            c.close().await;
        }
        Command::History { with, limit, before, after } => {
            let with = parse_user(&with)?;
            let (c, s) = session_client(&profile).await?;
            let page = c.history(&with, limit, before.map(Cursor), after.map(Cursor)).await?;
            for m in &page.messages {
                let state = (m.from == s.user).then(|| message_state(m, &page.read, &page.delivered));
                if json {
                    println!("{}", message_json_with_state("message", m, None, state));
                } else {
                    println!("{}", message_line_with_state(m, state));
                }
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
                let (next, events) = c.sync(s.sync_pos, None).await?;
                for e in &events {
                    print_event(json, e);
                }
                ack_delivered(&c, &s.user, &events).await?;
                count += events.len();
                s.sync_pos = next;
                profile.save_session(&s)?;
                if events.len() < limits::SYNC_MAX_EVENTS as usize {
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
    let (c, mut s) = session_client(profile).await?;
    let (mut sub, mut next, mut events) = c.subscribe(s.sync_pos).await?;
    if !json {
        eprintln!("listening as {} (Ctrl-C to stop)", s.user);
    }
    loop {
        for e in &events {
            print_event(json, e);
        }
        ack_delivered(&c, &s.user, &events).await?;
        if next != s.sync_pos {
            s.sync_pos = next;
            profile.save_session(&s)?;
        }
        tokio::select! {
            frame = sub.next() => match frame? {
                Some((n, evs)) => { next = n; events = evs; }
                None => bail!("the server ended the subscription"),
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    c.close().await;
    Ok(())
}

async fn chat(profile: &Profile, with: &UserId, json: bool) -> anyhow::Result<()> {
    let (c, s) = session_client(profile).await?;
    if *with == s.user {
        bail!("cannot chat with yourself");
    }
    let mut shown = HashSet::new();
    let page = c.history(with, Some(20), None, None).await?;
    for m in page.messages.iter().rev() {
        shown.insert((m.origin.clone(), m.seq));
        let state = (m.from == s.user).then(|| message_state(m, &page.read, &page.delivered));
        if json {
            println!("{}", message_json_with_state("message", m, None, state));
        } else {
            println!("{}", message_line_with_state(m, state));
        }
    }
    if let Some(newest) = page.messages.first() {
        c.receipt(with, ReceiptKind::Read, Watermark(newest.order_key())).await?;
    }
    let conv = missive_spec::ConversationId::one_to_one(&s.user, with);
    let (mut sub, _, mut events) = c.subscribe(s.sync_pos).await?;
    if !json {
        eprintln!("-- chatting with {with}; type a line and press Enter to send, Ctrl-D to quit --");
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
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
                EventKind::Receipt(_) => {}
            }
        }
        // On screen means delivered and read.
        if let Some(w) = newest_in {
            c.receipt(with, ReceiptKind::Delivered, w.clone()).await?;
            c.receipt(with, ReceiptKind::Read, w).await?;
        }
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(text) if text.trim().is_empty() => {}
                Some(text) => {
                    let m = c.send_text(with, &text).await?;
                    shown.insert((m.origin.clone(), m.seq));
                    if json {
                        println!("{}", message_json("sent", &m, None));
                    }
                }
                None => break,
            },
            frame = sub.next() => match frame? {
                Some((_, evs)) => events = evs,
                None => bail!("the server ended the subscription"),
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    c.close().await;
    Ok(())
}
