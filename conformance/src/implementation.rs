//! The implementation under test, as its `impl.toml` describes it, and its server
//! processes ([`Sut`]): initialised with a name, data directory, addresses and a key the
//! suite hands in; started and stopped through command templates; ready once it answers
//! `info` (spec §6.1) with that key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use missive_federation::{PublicKey, ServerKey};
use missive_spec::{Response, ServerName, UserId};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::wire::Client;

/// Optional behaviour an implementation may claim; tests that need one it does not claim
/// are skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    Federation,
    Receipts,
    Presence,
    Typing,
    Devices,
}

impl Feature {
    pub fn name(self) -> &'static str {
        match self {
            Feature::Federation => "federation",
            Feature::Receipts => "receipts",
            Feature::Presence => "presence",
            Feature::Typing => "typing",
            Feature::Devices => "devices",
        }
    }
}

/// A command template: argv, and optionally what to write to its standard input.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Template {
    Argv(Vec<String>),
    WithStdin { argv: Vec<String>, stdin: String },
}

impl Template {
    fn parts(&self) -> (&[String], Option<&str>) {
        match self {
            Template::Argv(a) => (a, None),
            Template::WithStdin { argv, stdin } => (argv, Some(stdin)),
        }
    }
}

/// `impl.toml`: how to run one implementation under the suite.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImplFile {
    /// The implementation's name, for reports.
    pub name: String,
    /// Creates a server: runs once per server, before `start`.
    pub init: Template,
    /// Runs the server in the foreground until it is signalled.
    pub start: Template,
    /// Creates a user while the server runs (optional: without it the suite registers
    /// users over the client protocol, which then must allow open registration).
    #[serde(default)]
    pub create_user: Option<Template>,
    /// Pins another server (name, federation address, key); runs after `init`, before
    /// `start`. Needed for every federation test.
    #[serde(default)]
    pub add_peer: Option<Template>,
    /// Raises the server's client connection limits, in all and from one address, to
    /// `{connections}`; runs after `init`, before `start`. Only the load generator's
    /// `idle` scenario needs it, to hold more connections than the defaults allow.
    #[serde(default)]
    pub allow_connections: Option<Template>,
    /// Seconds a server may take to answer `info` after `start`.
    #[serde(default = "default_start_timeout")]
    pub start_timeout_s: u64,
    /// Seconds a server may take to exit after SIGTERM.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_s: u64,
    /// The optional features this implementation claims.
    #[serde(default)]
    pub features: BTreeMap<String, bool>,
    /// Tests this implementation does not run, by name, with the reason.
    #[serde(default)]
    pub skip: BTreeMap<String, String>,
    /// Where the file was read from (for `{impl_dir}`).
    #[serde(skip)]
    pub dir: PathBuf,
    /// Values of `{env:VAR}` that win over the process environment (two builds in one
    /// run: `compare`).
    #[serde(skip)]
    pub env: BTreeMap<String, String>,
}

fn default_start_timeout() -> u64 {
    60
}
fn default_stop_timeout() -> u64 {
    30
}

/// The feature names `impl.toml` may use.
const FEATURES: [Feature; 5] = [Feature::Federation, Feature::Receipts, Feature::Presence, Feature::Typing, Feature::Devices];

impl ImplFile {
    pub fn load(path: &Path) -> anyhow::Result<ImplFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut f: ImplFile = toml::from_str(&text).with_context(|| format!("{} is not a valid implementation file", path.display()))?;
        for name in f.features.keys() {
            if !FEATURES.iter().any(|x| x.name() == name) {
                bail!("{}: unknown feature {name:?} (known: federation, receipts, presence, typing, devices)", path.display());
            }
        }
        f.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if f.dir.as_os_str().is_empty() {
            f.dir = PathBuf::from(".");
        }
        Ok(f)
    }

    pub fn claims(&self, feature: Feature) -> bool {
        self.features.get(feature.name()).copied().unwrap_or(false)
    }

    /// Expands `{placeholder}`s: the given values, `{env:VAR}` and `{impl_dir}`.
    pub fn expand(&self, s: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..].find('}').ok_or_else(|| anyhow!("unclosed {{ in {s:?}"))? + open;
            let name = &rest[open + 1..close];
            let value = if let Some(var) = name.strip_prefix("env:") {
                self.env.get(var).cloned().map_or_else(|| std::env::var(var), Ok).map_err(|_| anyhow!("{s:?} needs the environment variable {var}, which is not set"))?
            } else if name == "impl_dir" {
                self.dir.display().to_string()
            } else {
                values
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| anyhow!("unknown placeholder {{{name}}} in {s:?}"))?
            };
            out.push_str(&value);
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn command(&self, t: &Template, values: &[(&str, String)]) -> anyhow::Result<(Command, Option<String>, String)> {
        let (argv, stdin) = t.parts();
        let argv = argv.iter().map(|a| self.expand(a, values)).collect::<anyhow::Result<Vec<_>>>()?;
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("empty command template"))?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        let stdin = stdin.map(|s| self.expand(s, values)).transpose()?;
        Ok((cmd, stdin, argv.join(" ")))
    }

    /// Runs a template to completion; fails with its output if it exits non-zero.
    async fn run(&self, t: &Template, values: &[(&str, String)]) -> anyhow::Result<()> {
        let (mut cmd, stdin, shown) = self.command(t, values)?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {shown}"))?;
        if let Some(mut pipe) = child.stdin.take() {
            if let Some(s) = stdin {
                pipe.write_all(s.as_bytes()).await?;
            }
        }
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .map_err(|_| anyhow!("{shown} did not finish within 60 s"))??;
        if !out.status.success() {
            bail!(
                "{shown} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// What a server under test needs to pin another server.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub name: ServerName,
    pub federation: SocketAddr,
    pub key: PublicKey,
}

/// One server of the implementation under test.
pub struct Sut {
    pub name: ServerName,
    pub data_dir: PathBuf,
    pub client: SocketAddr,
    pub federation: SocketAddr,
    pub key: PublicKey,
    key_file: PathBuf,
    log: PathBuf,
    imp: Arc<ImplFile>,
    child: Option<Child>,
    users: usize,
}

impl Sut {
    /// Creates the server's key and runs `init` with free ports on 127.0.0.1.
    pub async fn init(imp: Arc<ImplFile>, work: &Path, name: &str) -> anyhow::Result<Sut> {
        let name = ServerName::parse(name)?;
        let ip = [127, 0, 0, 1].into();
        let client = SocketAddr::new(ip, crate::harness::free_udp_port(ip)?);
        let federation = SocketAddr::new(ip, crate::harness::free_udp_port(ip)?);
        let key = ServerKey::generate();
        let key_file = work.join(format!("{name}.key.pem"));
        key.save_new(&key_file)?;
        let sut = Sut {
            data_dir: work.join(name.as_str()),
            log: work.join(format!("{name}.log")),
            name,
            client,
            federation,
            key: key.public(),
            key_file,
            imp,
            child: None,
            users: 0,
        };
        sut.imp.run(&sut.imp.init, &sut.values()).await.context("init")?;
        Ok(sut)
    }

    fn values(&self) -> Vec<(&'static str, String)> {
        vec![
            ("name", self.name.to_string()),
            ("data_dir", self.data_dir.display().to_string()),
            ("client_addr", self.client.to_string()),
            ("federation_addr", self.federation.to_string()),
            ("key_file", self.key_file.display().to_string()),
            ("key", self.key.to_text()),
        ]
    }

    pub fn peer_info(&self) -> PeerInfo {
        PeerInfo { name: self.name.clone(), federation: self.federation, key: self.key }
    }

    /// Pins `peer` with the `add_peer` template (before `start`).
    pub async fn pin(&self, peer: &PeerInfo) -> anyhow::Result<()> {
        let t = self.imp.add_peer.as_ref().ok_or_else(|| anyhow!("the implementation file has no add_peer command"))?;
        let mut v = self.values();
        v.push(("peer_name", peer.name.to_string()));
        v.push(("peer_addr", peer.federation.to_string()));
        v.push(("peer_key", peer.key.to_text()));
        self.imp.run(t, &v).await.context("add_peer")
    }

    /// Allows `n` client connections (the `allow_connections` template; before `start`).
    pub async fn allow_connections(&self, n: usize) -> anyhow::Result<()> {
        let t = self.imp.allow_connections.as_ref().ok_or_else(|| anyhow!("the implementation file has no allow_connections command"))?;
        let mut v = self.values();
        v.push(("connections", n.to_string()));
        self.imp.run(t, &v).await.context("allow_connections")
    }

    /// Runs `start` and waits until the server answers `info` with its name, presenting
    /// the key it was given.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let (mut cmd, _, shown) = self.imp.command(&self.imp.start, &self.values())?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {shown}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(self.imp.start_timeout_s);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!("{} exited before it was ready ({status}); log:\n{}", self.name, self.log_tail());
            }
            let probe = async {
                let c = Client::connect_within(self.client, &self.name, self.key, Duration::from_millis(500)).await?;
                let r = c.info().await;
                c.close().await;
                r
            };
            if let Ok(Response::Info { server_name, .. }) = probe.await {
                if server_name != self.name {
                    bail!("{} answers info with server name {server_name}", self.name);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not answer info within {} s; log:\n{}", self.name, self.imp.start_timeout_s, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            // The whole process group, in case `start` is a wrapper script.
            let _ = std::process::Command::new("kill").args([sig, "--", &format!("-{pid}")]).status();
        }
    }

    /// The process id of the running `start` command.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether `start` ran and the process has not been stopped or killed since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: nothing gets a chance to flush.
    pub async fn kill9(&mut self) {
        self.signal("-KILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait().await;
        }
    }

    /// SIGTERM, and wait for the exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.signal("-TERM");
        if let Some(mut c) = self.child.take() {
            tokio::time::timeout(Duration::from_secs(self.imp.stop_timeout_s), c.wait())
                .await
                .map_err(|_| anyhow!("{} did not exit within {} s of SIGTERM", self.name, self.imp.stop_timeout_s))??;
        }
        Ok(())
    }

    /// kill -9, then start again on the same data and addresses.
    pub async fn restart_after_kill9(&mut self) -> anyhow::Result<()> {
        self.kill9().await;
        self.start().await
    }

    /// A new connection, pinned to the server's key.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(self.client, &self.name, self.key).await?)
    }

    /// A user id on this server.
    pub fn user_id(&self, local: &str) -> UserId {
        UserId::new(local, &self.name).expect("suite localparts are valid")
    }

    /// A new user, logged in on a new device: created with `create_user` when the
    /// implementation has it, else registered over the protocol.
    pub async fn new_user(&mut self, prefix: &str) -> anyhow::Result<(UserId, Client)> {
        self.users += 1;
        let local = format!("{prefix}{}", self.users);
        let id = self.user_id(&local);
        let password = password_of(&local);
        let mut c = self.connect().await?;
        match &self.imp.create_user {
            Some(t) => {
                let mut v = self.values();
                v.push(("localpart", local.clone()));
                v.push(("user", id.to_string()));
                v.push(("password", password.clone()));
                self.imp.run(t, &v).await.context("create_user")?;
                c.login(&id, &password, None).await.with_context(|| format!("login as {id}"))?;
            }
            None => {
                c.register(&id, &password, None, None).await.with_context(|| format!("register {id}"))?;
            }
        }
        Ok((id, c))
    }

    /// Another device of an existing user.
    pub async fn login(&self, user: &UserId) -> anyhow::Result<Client> {
        let mut c = self.connect().await?;
        c.login(user, &password_of(user.localpart()), None).await.with_context(|| format!("login as {user}"))?;
        Ok(c)
    }

    /// The last lines of the server's output.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Sut {
    fn drop(&mut self) {
        self.signal("-KILL");
    }
}

/// The password the suite uses for a localpart.
pub fn password_of(local: &str) -> String {
    format!("conformance-{local}-pw")
}
