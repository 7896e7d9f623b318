//! `missive`: the Missive command-line client. This file is the command table: the
//! command line's definition and which module runs each command (`cmd/`). Connecting from
//! a profile is `connect.rs`, following the live event stream across reconnections is
//! `follow.rs`, printing is `show.rs`, and the full-screen chat is `tui/`. Every command
//! and argument carries help text (a test walks the tree); shell completions and the man
//! page are generated from this same definition (`missive completions`, `missive man`).

mod cmd;
mod connect;
mod follow;
mod seen;
mod show;
mod tui;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{CommandFactory, Parser, Subcommand};
use missive_cli::profile::Profile;

const JSON_HELP: &str = "\
With --json, every command prints one JSON object per line, each with a \"type\":
  session  {type, user, device, server}                      login, register
  sent     {type, conv, origin, seq, rank, from, to, ts,
            content_type, encrypted, text | body_base64}     send, chat
  message  {type, [pos], conv, origin, seq, rank, from, to,
            ts, content_type, encrypted, text | undecryptable
            | body_base64, [state]}                          history, sync, listen, chat
            (state: sent, delivered, read or failed; on one's own messages in history;
            undecryptable: why this device cannot open an encrypted message)
  devices  {type, pos, user}                                 sync, listen, chat
            (user's devices changed; a change is also said on standard error)
  safety_number {type, user, number, verified}               verify
  receipt  {type, [pos], conv, user, peer, kind, up_to}      sync, listen, chat
            (user has kind (delivered, read) everything up to up_to {rank, origin, seq})
  failed   {type, pos, conv, origin, seq, reason}            sync, listen, chat
            (the recipient's server refused your message #seq for good)
  device   {type, id, name, current, created_ms}             devices
  conversation {type, with, conv, active_ms, unread,
            unread_capped, online, last_seen, last}          conversations
            (last: the newest message's fields, or null; online and
            last_seen null when the peer's presence is not shared)
  queued   {type, id, state, reason, to, text,
            client_msg_id, created_ms}                       send, chat (server unreachable), outbox
            (state: waiting or failed; reason: why the server refused it, or null;
            id: the shortest prefix of client_msg_id, at least 8 hex digits, that
            tells the entries apart, for `outbox retry ID` and `outbox drop ID`)
  presence {type, user, online, last_seen}                   presence, listen, chat
  typing   {type, user, conv, until}                         listen, chat
  page     {type, count, older, newer}                       history (last line; cursors or null)
  synced   {type, pos, count}                                sync (last line)
  found    {type, conv, origin, seq, rank, from, to, ts,
            content_type, text | body_base64}                search (newest first)
  searched {type, count, more}                               search (last line)
  ok       {type}                                            logout, revoke, settings, passwd, outbox drop
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
    /// Log in, creating a new device; pins the server's key on first contact. Asks for the
    /// password at a hidden prompt, or reads it with --password-stdin.
    Login {
        /// Your user id, e.g. @alice:alpha.example.
        user: String,
        /// The homeserver's client address, HOST:PORT.
        #[arg(long)]
        server: String,
        /// Read the password from the first line of standard input instead of asking.
        #[arg(long)]
        password_stdin: bool,
        /// A name for this device.
        #[arg(long)]
        device_name: Option<String>,
    },
    /// Create an account (where the server allows it) and log in. Asks for the password
    /// twice at a hidden prompt, or reads it once with --password-stdin.
    Register {
        /// The user id to create, e.g. @alice:alpha.example.
        user: String,
        /// The homeserver's client address, HOST:PORT.
        #[arg(long)]
        server: String,
        /// Read the password from the first line of standard input instead of asking.
        #[arg(long)]
        password_stdin: bool,
        /// Registration token, if the server asks for one.
        #[arg(long)]
        token: Option<String>,
        /// A name for this device.
        #[arg(long)]
        device_name: Option<String>,
    },
    /// Send a text message (at most 16 384 bytes). If the homeserver cannot be reached, the
    /// message waits in the profile's outbox and goes out, in order, with the next command
    /// that reaches it.
    Send {
        /// The recipient, e.g. @bob:beta.example.
        to: String,
        /// The message.
        text: String,
        /// Send it unencrypted, readable by both servers (for bots and compliance
        /// archives); messages are end-to-end encrypted otherwise.
        #[arg(long)]
        plaintext: bool,
    },
    /// List the outbox: messages waiting to be sent, and those the server refused, with
    /// the reason (at most 1 000 entries).
    Outbox {
        #[command(subcommand)]
        action: Option<OutboxAction>,
    },
    /// Show a conversation, newest first, one page at a time.
    History {
        /// The other user, e.g. @bob:beta.example.
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
    /// Chat: full-screen in a terminal (conversation list, scrollback, states, typing;
    /// /help inside); with input or output redirected, or --json, typed lines are sent
    /// and arrivals printed, until /quit or the end of input.
    Chat {
        /// The user to chat with (required outside a terminal).
        with: Option<String>,
        /// Send unencrypted, readable by both servers; encrypted end to end otherwise.
        #[arg(long)]
        plaintext: bool,
    },
    /// Show the safety number you and a user share, and mark the user verified: compare
    /// it with theirs (in person, or over another channel you trust) first. Afterwards a
    /// new or changed device of theirs stops your messages to them until you verify again.
    Verify {
        /// The user, e.g. @bob:beta.example.
        user: String,
        /// Only show the number; change nothing.
        #[arg(long)]
        show: bool,
        /// The number you compared (from `--show`): marked verified only if it is still
        /// the number now.
        #[arg(long, conflicts_with = "show")]
        number: Option<String>,
    },
    /// Change your password: asks for the current one, then the new one twice.
    Passwd {
        /// Read the current and the new password from the first two lines of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Also log out every other device of yours.
        #[arg(long)]
        logout_others: bool,
    },
    /// Revoke this device's access token and forget the session.
    Logout,
    /// Mark the conversation with a user as read, on every device.
    Read {
        /// The other user, e.g. @bob:beta.example.
        with: String,
    },
    /// List this user's devices.
    Devices,
    /// Block a user, on all your devices: nothing of theirs reaches you (messages, receipts,
    /// typing, presence) until you unblock them; what they send meanwhile is never shown.
    /// They are not told.
    Block {
        /// The user, e.g. @mallory:beta.example.
        user: String,
    },
    /// Unblock a user: what they send from now on reaches you again.
    Unblock {
        /// The user, e.g. @mallory:beta.example.
        user: String,
    },
    /// The users you block.
    Blocked,
    /// Your conversations, most recently active first: last message, unread count, presence.
    Conversations {
        /// List at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Whether a user you have a conversation with is online, or when last seen.
    Presence {
        /// The user, e.g. @bob:beta.example.
        user: String,
    },
    /// Tell a user you are typing (it shows in their chat for a few seconds).
    Typing {
        /// The other user, e.g. @bob:beta.example.
        with: String,
    },
    /// Change settings: --hide-last-seen true|false.
    Settings {
        /// Hide when you were last seen from everyone.
        #[arg(long)]
        hide_last_seen: bool_arg::Bool,
    },
    /// Revoke another of this user's devices (see `missive devices`).
    Revoke {
        /// The device id, as `missive devices` lists it.
        device: String,
    },
    /// Print a shell completion script to standard output (see README: installing).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output, e.g. `missive man > missive.1`.
    Man,
}

#[derive(Subcommand)]
enum OutboxAction {
    /// Put a message the server refused back in the queue; it is sent, with its original
    /// id, by the next command that reaches the server.
    Retry {
        /// The entry's id as `missive outbox` shows it (any unique prefix, 4+ hex digits).
        id: String,
    },
    /// Delete a message from the outbox, waiting or refused, without sending it.
    Drop {
        /// The entry's id as `missive outbox` shows it (any unique prefix, 4+ hex digits).
        id: String,
    },
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
    // `missive … | head` ends quietly when the reader goes, as Unix tools do, instead of
    // panicking on the failed write (the Rust runtime ignores SIGPIPE).
    // SAFETY: restores the default disposition before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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

/// Writes what is generated from the command definition (completions, man page).
fn generate(command: &Command) -> anyhow::Result<bool> {
    let mut cmd = Cli::command();
    // Generated into memory first: clap_complete panics when it cannot write.
    let mut text = Vec::new();
    match command {
        Command::Completions { shell } => clap_complete::generate(*shell, &mut cmd, "missive", &mut text),
        Command::Man => clap_mangen::Man::new(cmd).render(&mut text)?,
        _ => return Ok(false),
    }
    std::io::stdout().lock().write_all(&text).context("cannot write to standard output")?;
    Ok(true)
}

fn password_from(password_stdin: bool) -> cmd::login::PasswordFrom {
    if password_stdin {
        cmd::login::PasswordFrom::Stdin
    } else {
        cmd::login::PasswordFrom::Prompt
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if generate(&cli.command)? {
        return Ok(());
    }
    connect::set_timeout(Duration::from_millis(cli.connect_timeout.max(1)));
    let profile = Profile::open(&profile_dir(cli.profile)?)?;
    let (p, json) = (&profile, cli.json);
    match cli.command {
        Command::Login { user, server, password_stdin, device_name } => {
            cmd::login::login(p, json, &user, &server, password_from(password_stdin), device_name).await
        }
        Command::Register { user, server, password_stdin, token, device_name } => {
            cmd::login::register(p, json, &user, &server, password_from(password_stdin), token, device_name).await
        }
        Command::Passwd { password_stdin, logout_others } => {
            cmd::login::passwd(p, json, password_from(password_stdin), logout_others).await
        }
        Command::Send { to, text, plaintext } => cmd::send::send(p, json, &to, &text, plaintext).await,
        Command::Outbox { action: None } => cmd::outbox::list(p, json),
        Command::Outbox { action: Some(OutboxAction::Retry { id }) } => cmd::outbox::retry(p, json, &id),
        Command::Outbox { action: Some(OutboxAction::Drop { id }) } => cmd::outbox::drop(p, json, &id),
        Command::History { with, limit, before, after } => cmd::history::history(p, json, &with, limit, before, after).await,
        Command::Sync => cmd::sync::sync(p, json).await,
        Command::Listen => cmd::listen::listen(p, json).await,
        Command::Search { text, with, limit } => cmd::search::search(p, json, &text, with.as_deref(), limit),
        Command::Chat { with, plaintext } => cmd::chat::chat(p, json, with.as_deref(), plaintext).await,
        Command::Verify { user, show, number } => cmd::verify::verify(p, json, &user, show, number.as_deref()).await,
        Command::Read { with } => cmd::history::read(p, json, &with).await,
        Command::Presence { user } => cmd::presence::presence(p, json, &user).await,
        Command::Typing { with } => cmd::presence::typing(p, json, &with).await,
        Command::Settings { hide_last_seen } => cmd::account::settings(p, json, matches!(hide_last_seen, bool_arg::Bool::True)).await,
        Command::Devices => cmd::account::devices(p, json).await,
        Command::Block { user } => cmd::account::block(p, json, &user, true).await,
        Command::Unblock { user } => cmd::account::block(p, json, &user, false).await,
        Command::Blocked => cmd::account::blocked(p, json).await,
        Command::Conversations { limit } => cmd::conversations::conversations(p, json, limit).await,
        Command::Revoke { device } => cmd::account::revoke(p, json, &device).await,
        Command::Logout => cmd::account::logout(p, json).await,
        Command::Completions { .. } | Command::Man => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand and argument, at any depth, says what it is for.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin && a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "missive", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }

    #[test]
    fn the_command_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
