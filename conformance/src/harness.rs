//! Runs real homeserver processes for tests: initialise a data directory, start, wait
//! for the ready line (with a deadline, never a fixed sleep), kill -9, stop with SIGTERM,
//! and restart on the same address.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// How long a server may take to become ready.
pub const START_DEADLINE: Duration = Duration::from_secs(60);

/// Finds a workspace binary next to the running test executable (target/<profile>/NAME),
/// or where the environment variable `<NAME>_BIN` (upper case, `-` as `_`) points.
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Tests run from `deps/`, example programs from `examples/`.
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir.join(name)
}

/// A UDP port on `ip` that is free now, for a server to bind moments later. It is drawn
/// at random from below the kernel's ephemeral range, so that no other process binding
/// port 0 in the meantime can be handed it, and never twice in one process.
pub fn free_udp_port(ip: IpAddr) -> anyhow::Result<u16> {
    use rand::Rng;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (low, high) = if ephemeral_low > 12_000 { (10_000, ephemeral_low - 1) } else { (49_152, 65_535) };
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(low..=high);
        if given.contains(&port) {
            continue;
        }
        // Free for UDP and TCP alike, so nothing else is listening there.
        if UdpSocket::bind((ip, port)).is_ok() && std::net::TcpListener::bind((ip, port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    anyhow::bail!("no free UDP port found on {ip} between {low} and {high}")
}

/// A `missived` process under test.
pub struct ServerProcess {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Client API address.
    pub addr: SocketAddr,
    /// Federation endpoint address.
    pub federation: SocketAddr,
    /// Public key, `ed25519:...`.
    pub key: String,
    /// The metrics and health listener (HTTP), when the ready line names one.
    pub metrics: Option<SocketAddr>,
    bin: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// `missived init` into `dir` with both endpoints on free ports of `ip`; returns the
    /// server's public key.
    pub async fn init_on(bin: &Path, dir: &Path, name: &str, registration: &str, ip: IpAddr) -> anyhow::Result<String> {
        let client = SocketAddr::new(ip, free_udp_port(ip)?);
        let federation = SocketAddr::new(ip, free_udp_port(ip)?);
        let out = Command::new(bin)
            .args(["init", "--server-name", name, "--data-dir"])
            .arg(dir)
            .args(["--client-listen", &client.to_string(), "--federation-listen", &federation.to_string()])
            // Any free port: the ready line says which.
            .args(["--metrics-listen", &SocketAddr::new(ip, 0).to_string()])
            .args(["--registration", registration])
            .output()
            .await
            .with_context(|| format!("cannot run {}", bin.display()))?;
        if !out.status.success() {
            bail!("missived init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("server key:").map(|k| k.trim().to_owned()))
            .ok_or_else(|| anyhow!("missived init printed no server key:\n{stdout}"))
    }

    /// `missived init` on 127.0.0.1.
    pub async fn init(bin: &Path, dir: &Path, name: &str, registration: &str) -> anyhow::Result<String> {
        Self::init_on(bin, dir, name, registration, [127, 0, 0, 1].into()).await
    }

    /// Initialises `dir` and starts a server there.
    pub async fn create(bin: &Path, dir: &Path, name: &str, registration: &str) -> anyhow::Result<ServerProcess> {
        Self::init(bin, dir, name, registration).await?;
        Self::start(bin, dir, name).await
    }

    /// Starts the server of an initialised `dir` and waits until it is ready.
    pub async fn start(bin: &Path, dir: &Path, name: &str) -> anyhow::Result<ServerProcess> {
        let config = dir.join("missived.toml");
        let (child, ready) = spawn(bin, &config, dir).await?;
        Ok(ServerProcess {
            name: name.to_owned(),
            dir: dir.to_owned(),
            config,
            addr: ready.client,
            federation: ready.federation,
            key: ready.key,
            metrics: ready.metrics,
            bin: bin.to_owned(),
            child: Some(child),
        })
    }

    /// Pins `other` in this server's config (the running server picks it up at once).
    pub async fn pin_peer(&self, other: &ServerProcess) -> anyhow::Result<()> {
        self.missived(&["peer", "add", "--config", &self.config.display().to_string(), &other.name, &other.federation.to_string(), &other.key], None)
            .await
            .map(|_| ())
    }

    /// Pins a peer given by name, address and key.
    pub async fn pin_peer_raw(&self, name: &str, address: &str, key: &str) -> anyhow::Result<()> {
        self.missived(&["peer", "add", "--config", &self.config.display().to_string(), name, address, key], None).await.map(|_| ())
    }

    /// `missived peers --json` of the running server, one JSON document per peer.
    pub async fn peers_json(&self) -> anyhow::Result<Vec<String>> {
        let out = self.missived(&["peers", "--json", "--config", &self.config.display().to_string()], None).await?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    async fn missived(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let mut child = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut pipe) = child.stdin.take() {
            if let Some(s) = stdin {
                pipe.write_all(s.as_bytes()).await?;
            }
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!("missived {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILL, no chance to flush anything.
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// The process id, while the server runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Sends the signal `name` (`HUP`, `TERM`, `INT`, ...) to the running server.
    pub async fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("server not running"))?;
        let status = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().await?;
        if !status.success() {
            bail!("kill -{name} {pid} failed: {status}");
        }
        Ok(())
    }

    /// Sends the signal `name`, then waits (up to 30 s) for the process to exit; returns
    /// its exit code (`None`: killed by a signal).
    pub async fn stop_with(&mut self, name: &str) -> anyhow::Result<Option<i32>> {
        if self.child.is_none() {
            return Ok(None);
        }
        self.signal(name).await?;
        let Some(mut c) = self.child.take() else { return Ok(None) };
        let status = tokio::time::timeout(Duration::from_secs(30), c.wait())
            .await
            .map_err(|_| anyhow!("server did not exit within 30 s of SIG{name}"))??;
        Ok(status.code())
    }

    /// SIGTERM, then wait (up to 30 s) for the process to exit; returns its exit code.
    pub async fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        self.stop_with("TERM").await
    }

    /// Starts again after a kill or stop, on the same addresses (fixed at init).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9().await;
        let (child, ready) = spawn(&self.bin, &self.config, &self.dir).await?;
        self.child = Some(child);
        self.addr = ready.client;
        self.federation = ready.federation;
        self.metrics = ready.metrics;
        self.key = ready.key;
        Ok(())
    }

    /// `missived user add` (works whether or not the server runs).
    pub async fn add_user(&self, localpart: &str, password: &str) -> anyhow::Result<()> {
        let config = self.config.display().to_string();
        self.missived(&["user", "add", "--config", &config, localpart, "--password-stdin"], Some(&format!("{password}\n")))
            .await
            .map(|_| ())
    }

    /// The running server's resident memory, in KiB (Linux `/proc`).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The server's log so far (standard error), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("missived.log")).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// What a server's ready line says.
struct Ready {
    client: SocketAddr,
    federation: SocketAddr,
    key: String,
    metrics: Option<SocketAddr>,
}

/// Starts `missived run` and waits for its ready line:
/// `missived: NAME ready, key KEY, client API on ADDR, federation on ADDR[, metrics on ADDR]`.
async fn spawn(bin: &Path, config: &Path, dir: &Path) -> anyhow::Result<(Child, Ready)> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("missived.log"))?;
    let mut child = Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = async {
        while let Some(line) = lines.next_line().await? {
            if !line.contains(" ready, ") {
                continue;
            }
            let field = |label: &str| {
                line.split(label).nth(1).map(|r| r.split(',').next().unwrap_or_default().trim().to_owned())
            };
            let (Some(k), Some(c), Some(f)) = (field("key "), field("client API on "), field("federation on ")) else {
                bail!("unexpected ready line {line:?}");
            };
            let metrics = field("metrics on ").map(|m| m.parse::<SocketAddr>()).transpose()?;
            return Ok::<_, anyhow::Error>(Ready { client: c.parse()?, federation: f.parse()?, key: k, metrics });
        }
        bail!("missived exited before it was ready")
    };
    let ready = match tokio::time::timeout(START_DEADLINE, ready).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            let log = std::fs::read_to_string(dir.join("missived.log")).unwrap_or_default();
            bail!("{e}; log:\n{log}");
        }
        Err(_) => bail!("missived not ready within {START_DEADLINE:?}"),
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, ready))
}
