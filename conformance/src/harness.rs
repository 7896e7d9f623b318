//! Runs real homeserver processes for tests: initialise a data directory, start, wait
//! for the ready line (with a deadline, never a fixed sleep), kill -9, stop with SIGTERM,
//! and restart on the same address.

use std::net::SocketAddr;
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
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// A `missived` process under test.
pub struct ServerProcess {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub addr: SocketAddr,
    bin: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// `missived init` into `dir` with the client API on an ephemeral loopback port.
    pub async fn init(bin: &Path, dir: &Path, name: &str, registration: &str) -> anyhow::Result<()> {
        let out = Command::new(bin)
            .args(["init", "--server-name", name, "--data-dir"])
            .arg(dir)
            .args(["--client-listen", "127.0.0.1:0", "--registration", registration])
            .output()
            .await
            .with_context(|| format!("cannot run {}", bin.display()))?;
        if !out.status.success() {
            bail!("missived init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Initialises `dir` and starts a server there.
    pub async fn create(bin: &Path, dir: &Path, name: &str, registration: &str) -> anyhow::Result<ServerProcess> {
        Self::init(bin, dir, name, registration).await?;
        Self::start(bin, dir, name).await
    }

    /// Starts the server of an initialised `dir` and waits until it is ready.
    pub async fn start(bin: &Path, dir: &Path, name: &str) -> anyhow::Result<ServerProcess> {
        let config = dir.join("missived.toml");
        let (child, addr) = spawn(bin, &config, dir).await?;
        Ok(ServerProcess { name: name.to_owned(), dir: dir.to_owned(), config, addr, bin: bin.to_owned(), child: Some(child) })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// SIGKILL, no chance to flush anything.
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// SIGTERM, then wait (up to 30 s) for the process to exit; returns its exit code.
    pub async fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        let Some(mut c) = self.child.take() else { return Ok(None) };
        let pid = c.id().ok_or_else(|| anyhow!("server already exited"))?;
        Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        let status = tokio::time::timeout(Duration::from_secs(30), c.wait())
            .await
            .map_err(|_| anyhow!("server did not exit within 30 s of SIGTERM"))??;
        Ok(status.code())
    }

    /// Starts again after a kill or stop, on the same client address.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9().await;
        let text = std::fs::read_to_string(&self.config)?;
        let mut out = String::new();
        for line in text.lines() {
            if line.trim_start().starts_with("listen =") {
                out.push_str(&format!("listen = \"{}\"\n", self.addr));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        std::fs::write(&self.config, out)?;
        let (child, addr) = spawn(&self.bin, &self.config, &self.dir).await?;
        self.child = Some(child);
        self.addr = addr;
        Ok(())
    }

    /// `missived user add` (works whether or not the server runs).
    pub async fn add_user(&self, localpart: &str, password: &str) -> anyhow::Result<()> {
        let mut child = Command::new(&self.bin)
            .args(["user", "add", "--config"])
            .arg(&self.config)
            .args([localpart, "--password-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(format!("{password}\n").as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!("missived user add failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
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

async fn spawn(bin: &Path, config: &Path, dir: &Path) -> anyhow::Result<(Child, SocketAddr)> {
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
            if let Some(addr) = line.split("client API on ").nth(1) {
                return Ok::<_, anyhow::Error>(addr.trim().parse::<SocketAddr>()?);
            }
        }
        bail!("missived exited before it was ready")
    };
    let addr = match tokio::time::timeout(START_DEADLINE, ready).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            let log = std::fs::read_to_string(dir.join("missived.log")).unwrap_or_default();
            bail!("{e}; log:\n{log}");
        }
        Err(_) => bail!("missived not ready within {START_DEADLINE:?}"),
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}
