//! `missive`: the Missive command-line client. This file is the command table: the
//! command line's definition and which module runs each command (`cmd/`). Connecting from
//! a profile is `connect.rs`, following the live event stream across reconnections is
//! `follow.rs`, and printing is `show.rs`.

mod cmd;
mod connect;
mod follow;
mod show;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use missive_cli::profile::Profile;

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
  found    {type, conv, origin, seq, rank, from, to, ts,
            content_type, text | body_base64}                search (newest first)
  searched {type, count, more}                               search (last line)
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
    /// Search the messages this profile has seen (kept locally), newest first.
    Search {
        /// Words to find; the last one may be the start of a word.
        text: String,
        /// Only the conversation with this user.
        #[arg(long)]
        with: Option<String>,
        /// Most hits to show (1-1000).
        #[arg(long, default_value_t = cmd::search::DEFAULT_LIMIT,
              value_parser = clap::value_parser!(u32).range(1..=missive_cli::archive::MAX_LIMIT as i64))]
        limit: u32,
    },
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    connect::set_timeout(Duration::from_millis(cli.connect_timeout.max(1)));
    let profile = Profile::open(&profile_dir(cli.profile)?)?;
    let (p, json) = (&profile, cli.json);
    match cli.command {
        Command::Login { user, server, password_stdin: _, device_name } => cmd::login::login(p, json, &user, &server, device_name).await,
        Command::Register { user, server, password_stdin: _, token, device_name } => {
            cmd::login::register(p, json, &user, &server, token, device_name).await
        }
        Command::Send { to, text } => cmd::send::send(p, json, &to, &text).await,
        Command::Outbox => cmd::send::outbox(p, json),
        Command::History { with, limit, before, after } => cmd::history::history(p, json, &with, limit, before, after).await,
        Command::Sync => cmd::sync::sync(p, json).await,
        Command::Listen => cmd::listen::listen(p, json).await,
        Command::Search { text, with, limit } => cmd::search::search(p, json, &text, with.as_deref(), limit),
        Command::Chat { with } => cmd::chat::chat(p, json, &with).await,
        Command::Read { with } => cmd::history::read(p, json, &with).await,
        Command::Presence { user } => cmd::presence::presence(p, json, &user).await,
        Command::Typing { with } => cmd::presence::typing(p, json, &with).await,
        Command::Settings { hide_last_seen } => cmd::account::settings(p, json, matches!(hide_last_seen, bool_arg::Bool::True)).await,
        Command::Devices => cmd::account::devices(p, json).await,
        Command::Revoke { device } => cmd::account::revoke(p, json, &device).await,
        Command::Logout => cmd::account::logout(p, json).await,
    }
}
