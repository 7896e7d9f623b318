//! `missived`: the Missive homeserver binary. This file is the command table; account
//! and device commands are `user_commands.rs`, dead letters and peer removal
//! `queue_commands.rs`.

mod backup_commands;
mod check_command;
mod key_commands;
mod queue_commands;
mod user_commands;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use missive_federation::ServerKey;
use missive_server::admin::{self, AdminRequest, AdminResponse};
use missive_server::config::{self, Config};
use missive_server::logging::Logging;
use missive_server::signals::Signals;
use missive_spec::{RegistrationPolicy, ServerName};

#[derive(Parser)]
#[command(name = "missived", version = VERSION, about = "Missive homeserver")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `missived --version`; a build with the test-only `sabotage` feature says so, so that
/// scripts can refuse to serve with it.
const VERSION: &str = if cfg!(feature = "sabotage") {
    concat!(env!("CARGO_PKG_VERSION"), " (test build: deliberate faults compiled in, never serve with it)")
} else {
    env!("CARGO_PKG_VERSION")
};

/// Where the config is read from when `--config` is not given.
const DEFAULT_CONFIG: &str = "/etc/missive/missived.toml";

#[derive(Args)]
struct ConfigArg {
    /// The server's config file [env: MISSIVED_CONFIG; default: /etc/missive/missived.toml].
    #[arg(long = "config", env = "MISSIVED_CONFIG", default_value = DEFAULT_CONFIG, hide_default_value = true, hide_env = true)]
    path: PathBuf,
}

impl ConfigArg {
    fn load(&self) -> anyhow::Result<Config> {
        if !self.path.exists() {
            bail!(
                "no config file at {}; pass --config PATH or set MISSIVED_CONFIG (`missived init` creates one)",
                self.path.display()
            );
        }
        Config::load(&self.path)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Policy {
    Closed,
    Open,
    Token,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a new server key, signed over to by the current one (peers and clients that
    /// pinned the old key follow it without a warning); the old key stays published as
    /// retired. Run with the server stopped.
    Rotate {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON object describing the rotation.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Create a data directory with a commented config and a new server key.
    Init {
        /// This server's DNS name, e.g. alpha.example.
        #[arg(long)]
        server_name: String,
        /// Directory for the config, the key and the database (created if missing).
        #[arg(long)]
        data_dir: PathBuf,
        /// UDP address of the client API.
        #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], config::DEFAULT_CLIENT_PORT)))]
        client_listen: SocketAddr,
        /// UDP address of the federation endpoint.
        #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], config::DEFAULT_FEDERATION_PORT)))]
        federation_listen: SocketAddr,
        /// TCP address of the metrics and health listener (/metrics, /health, /ready).
        #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], config::DEFAULT_METRICS_PORT)))]
        metrics_listen: SocketAddr,
        /// Who may register accounts.
        #[arg(long, value_enum, default_value_t = Policy::Closed)]
        registration: Policy,
        /// Use this ed25519 key (PKCS#8 PEM) instead of generating a new one; it is copied
        /// into the data directory.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Serve until SIGTERM or SIGINT (Ctrl-C); SIGHUP reloads the config file.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Log as text lines or as one JSON object per line [default: the config's `[log] format`].
        #[arg(long, value_enum)]
        log_format: Option<config::LogFormat>,
    },
    /// Manage accounts (works whether or not the server is running).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// List or revoke a user's devices (works whether or not the server is running).
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Manage pinned peer servers.
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// Units peers refused for good: list, send again, or delete them (works whether or not
    /// the server is running).
    Deadletters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Check the set-up: config, key file, ports, clock, the published key document and
    /// federation address, and each pinned peer; one OK / WARN / FAIL line each, with the
    /// fix. Exits 1 when any check fails.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON object per check and line.
        #[arg(long)]
        json: bool,
    },
    /// Write a backup to DIR (new or empty) while the server runs, or from a stopped one:
    /// a consistent copy of the database, the config and the server key.
    Backup {
        #[command(flatten)]
        config: ConfigArg,
        /// Where the backup goes (created, mode 0700).
        dir: PathBuf,
        /// One JSON object describing the backup.
        #[arg(long)]
        json: bool,
    },
    /// Make a new data directory from a backup. Once started, the server first learns
    /// from each peer what it sent after the backup, and takes those messages back.
    Restore {
        /// The backup (written by `missived backup`).
        dir: PathBuf,
        /// The data directory to create (new or empty).
        #[arg(long)]
        data_dir: PathBuf,
        /// One JSON object describing the restore.
        #[arg(long)]
        json: bool,
    },
    /// The server key.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Print the key document to publish at https://NAME/.well-known/missive/server.
    WellKnown {
        #[command(flatten)]
        config: ConfigArg,
        /// The federation address peers should use, HOST:PORT with a DNS name (else they
        /// use DNS SRV or NAME:7451).
        #[arg(long)]
        federation: Option<String>,
    },
    /// Cluster mode (`[cluster]`): the nodes serving this server name and the log.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// List federation peers of the running server: queue depth, link state, next retry.
    Peers {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON object per peer and line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The nodes (how far each applied the log, where it serves clients) and the log's
    /// stream (replicas, leader, each follower's lag), read from the NATS servers.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PeerCommand {
    /// Pin a peer: its federation address (HOST:PORT) and public key (ed25519:...).
    /// The running server picks the entry up at once.
    Add {
        #[command(flatten)]
        config: ConfigArg,
        name: String,
        address: String,
        key: String,
    },
    /// Unpin a peer and drop everything queued for it (also a mistyped server name that
    /// was never pinned). The queued units are lost: it asks for confirmation.
    Remove {
        #[command(flatten)]
        config: ConfigArg,
        name: String,
        /// Do not ask for confirmation (required when standard input is not a terminal).
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Every dead letter: its id, peer, reason and what it carried.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Queue dead letters again, at the end of their lanes.
    Retry {
        #[command(flatten)]
        config: ConfigArg,
        /// Ids as `list` shows them (PEER/LANE/POSITION).
        ids: Vec<String>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters for good.
    Drop {
        #[command(flatten)]
        config: ConfigArg,
        /// Ids as `list` shows them (PEER/LANE/POSITION).
        ids: Vec<String>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user; the password is read from the first line of standard input.
    Add {
        #[command(flatten)]
        config: ConfigArg,
        /// Localpart (alice) or full user id (@alice:alpha.example).
        name: String,
        /// Read the password from standard input (required: passwords never go in arguments).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// List every account: state (active, disabled, removed), devices, creation time.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON object per user and line.
        #[arg(long)]
        json: bool,
    },
    /// One account and its devices.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// Localpart or full user id.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an account for good: its devices are revoked and its id is never issued again.
    Remove {
        #[command(flatten)]
        config: ConfigArg,
        /// Localpart or full user id.
        name: String,
        /// Do not ask for confirmation (required when standard input is not a terminal).
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Set a new password, read from the first line of standard input.
    Passwd {
        #[command(flatten)]
        config: ConfigArg,
        /// Localpart or full user id.
        name: String,
        /// Read the password from standard input (required: passwords never go in arguments).
        #[arg(long, required = true)]
        password_stdin: bool,
        /// Also log out every device of the user.
        #[arg(long)]
        logout: bool,
        #[arg(long)]
        json: bool,
    },
    /// Disable an account: every device is logged out and logins are refused; messages
    /// to it are still accepted.
    Disable {
        #[command(flatten)]
        config: ConfigArg,
        /// Localpart or full user id.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Enable a disabled account again.
    Enable {
        #[command(flatten)]
        config: ConfigArg,
        /// Localpart or full user id.
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// A user's devices.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Localpart or full user id.
        user: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke one device of a user: its token stops working at once.
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        /// Localpart or full user id.
        user: String,
        device: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        die_quietly_on_closed_pipe();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("missived: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(real_main(cli)) {
        eprintln!("missived: error: {e:#}");
        std::process::exit(1);
    }
}

/// An operator command piped into `head` or `grep -q` ends quietly when the reader goes,
/// as Unix tools do, instead of panicking on the failed write. (The Rust runtime ignores
/// SIGPIPE; the server itself keeps ignoring it: a closed pipe is an error it handles.)
fn die_quietly_on_closed_pipe() {
    // SAFETY: restores the default disposition before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { server_name, data_dir, client_listen, federation_listen, metrics_listen, registration, key } => {
            init(&server_name, &data_dir, [client_listen, federation_listen, metrics_listen], registration, key.as_deref())
        }
        Command::Run { config, log_format } => {
            let loaded = config.load()?;
            let logging = Logging::init(&loaded.log.level, log_format.unwrap_or(loaded.log.format));
            let signals = Signals::register().context("cannot handle signals")?;
            missive_server::server::run(&config.path, loaded, logging, signals).await
        }
        Command::Peer { command: PeerCommand::Add { config, name, address, key } } => peer_add(&config, &name, &address, &key).await,
        Command::Peer { command: PeerCommand::Remove { config, name, yes, json } } => queue_commands::peer_remove(&config, &name, yes, json).await,
        Command::Deadletters { command } => queue_commands::run(command).await,
        Command::Peers { config, json } => peers(&config.load()?, json).await,
        Command::Cluster { command: ClusterCommand::Status { config, json } } => missive_server::cluster::status(&config.load()?, json).await,
        Command::Check { config, json } => check_command::check(&config, json).await,
        Command::Key { command: KeyCommand::Rotate { config, json } } => key_commands::rotate(&config, json).await,
        Command::Backup { config, dir, json } => backup_commands::backup(&config, &dir, json).await,
        Command::Restore { dir, data_dir, json } => backup_commands::restore(&dir, &data_dir, json),
        Command::WellKnown { config, federation } => check_command::well_known(&config, federation.as_deref()),
        Command::User { command } => user_commands::run(command).await,
        Command::Device { command } => user_commands::device(command).await,
    }
}

/// `listen`: the client API, federation and metrics addresses.
fn init(name: &str, dir: &Path, listen: [SocketAddr; 3], policy: Policy, key: Option<&Path>) -> anyhow::Result<()> {
    let [client, federation, metrics] = listen;
    let name = ServerName::parse(name)?;
    let policy = match policy {
        Policy::Closed => RegistrationPolicy::Closed,
        Policy::Open => RegistrationPolicy::Open,
        Policy::Token => RegistrationPolicy::Token,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config_path = dir.join(config::CONFIG_FILE);
    let key_path = dir.join(config::KEY_FILE);
    if config_path.exists() || key_path.exists() {
        bail!("{} already holds a Missive server; refusing to overwrite it", dir.display());
    }
    let key = match key {
        Some(path) => ServerKey::load(path)?,
        None => ServerKey::generate(),
    };
    key.save_new(&key_path)?;
    let mut text = config::template(&name, client, federation, metrics, policy);
    if policy == RegistrationPolicy::Token {
        let token = missive_server::accounts::new_token();
        text = text.replace("# token = \"a long random string\"", &format!("token = \"{token}\""));
    }
    write_private(&config_path, &text).with_context(|| format!("cannot write {}", config_path.display()))?;
    println!("Created Missive server {name} in {}", dir.display());
    println!("  config:      {}", config_path.display());
    println!("  server key:  {}", key.public());
    println!("  fingerprint: {}", key.public().fingerprint());
    println!("Start it with: missived run --config {}", config_path.display());
    println!("Another server pins this one with:");
    // A wildcard address is no address to reach: peers dial the server's name instead.
    let reach = if federation.ip().is_unspecified() { format!("{name}:{}", federation.port()) } else { federation.to_string() };
    println!("  missived peer add --config THEIR_CONFIG {name} {reach} {}", key.public());
    if federation.ip().is_unspecified() {
        println!("(federation listens on every address of this machine: {reach} must reach it; give its public address instead if {name} does not resolve here)");
    }
    Ok(())
}

/// Replaces the config file with `text`, atomically, keeping the file's mode; refuses a
/// text that does not load.
fn rewrite_config(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    // A leftover from an interrupted run may be more open than we want; start afresh.
    let _ = std::fs::remove_file(&tmp);
    write_private(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    // The rewrite keeps whatever mode the operator gave the file.
    std::fs::set_permissions(&tmp, std::fs::metadata(path)?.permissions())?;
    if let Err(e) = Config::load(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// Creates `path` readable by its owner only (mode 0600): `missived.toml` may hold the
/// registration token.
pub(crate) fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

async fn peer_add(config: &ConfigArg, name: &str, address: &str, key: &str) -> anyhow::Result<()> {
    let path = config.path.as_path();
    let name = ServerName::parse(name)?;
    let key = missive_federation::PublicKey::parse(key)?;
    if !address.contains(':') || address.rsplit_once(':').is_none_or(|(_, p)| p.parse::<u16>().is_err()) {
        bail!("address {address:?} is not HOST:PORT");
    }
    let config = config.load()?;
    if config.server_name == name {
        bail!("{name} is this server");
    }
    if config.peers.iter().any(|p| p.name == name) {
        bail!("{name} is already a peer in {}; edit the file to change it", path.display());
    }
    let mut text = std::fs::read_to_string(path)?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("\n[[peers]]\nname = \"{name}\"\naddress = \"{address}\"\nkey = \"{key}\"\n"));
    rewrite_config(path, &text).context("the new peer entry does not load")?;
    match admin::call(&config.admin_socket(), &AdminRequest::Reload {}).await? {
        Some(AdminResponse::Error { message }) => bail!("peer saved, but the running server did not reload: {message}"),
        Some(_) => println!("pinned {name} at {address}; the running server uses it now"),
        None => println!("pinned {name} at {address}"),
    }
    Ok(())
}

async fn peers(config: &Config, json: bool) -> anyhow::Result<()> {
    let peers = match admin::call(&config.admin_socket(), &AdminRequest::Peers {}).await? {
        Some(AdminResponse::Peers { peers }) => peers,
        Some(AdminResponse::Error { message }) => bail!("{message}"),
        Some(other) => bail!("unexpected answer {other:?}"),
        None => bail!("the server is not running (no {})", config.admin_socket().display()),
    };
    if json {
        for p in &peers {
            let mut o = serde_json::to_value(p)?;
            if let Some(m) = o.as_object_mut() {
                m.insert("type".into(), "peer".into());
            }
            println!("{o}");
        }
        return Ok(());
    }
    println!("{:<30} {:>7} {:<5} {:>8} {:>14} {:>14}  last error", "peer", "queued", "link", "failures", "last success", "next retry");
    let now = missive_server::accounts::now_ms();
    for p in peers {
        let ago = p.last_success_ms.map(|t| format!("{}s ago", now.saturating_sub(t) / 1000)).unwrap_or_else(|| "never".into());
        let next = p.next_retry_in_ms.map(|ms| format!("in {:.1}s", ms as f64 / 1000.0)).unwrap_or_else(|| "now".into());
        println!(
            "{:<30} {:>7} {:<5} {:>8} {:>14} {:>14}  {}",
            p.name.as_str(),
            p.queue_depth,
            if p.up { "up" } else { "down" },
            p.failures,
            ago,
            next,
            p.last_error.unwrap_or_default()
        );
    }
    Ok(())
}
