//! A real terminal for the client's interactive tests: a tmux server of its own (its own
//! socket), typed into with `send-keys`, read with `capture-pane`, killed when dropped.

use std::time::Duration;

use tokio::process::Command;

use super::DEADLINE;

pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// `None` when tmux is not installed.
    pub fn new() -> Option<Tmux> {
        let found = std::process::Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success());
        found.then(|| Tmux { socket: format!("missive-test-{}-{}", std::process::id(), rand::random::<u32>()) })
    }

    pub async fn tmux(&self, args: &[&str]) -> String {
        // -u: the screen is UTF-8 (box drawing, `…`) whatever the locale says.
        let out = Command::new("tmux").args(["-u", "-L", &self.socket]).args(args).output().await.unwrap();
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A `width`×`height` terminal named `name` running the shell command `command`.
    pub async fn start(&self, name: &str, width: u16, height: u16, command: &str) {
        let (w, h) = (width.to_string(), height.to_string());
        self.tmux(&["new-session", "-d", "-x", &w, "-y", &h, "-s", name, command]).await;
    }

    pub async fn typed(&self, name: &str, text: &str) {
        self.tmux(&["send-keys", "-t", name, "-l", text]).await;
    }

    pub async fn key(&self, name: &str, key: &str) {
        self.tmux(&["send-keys", "-t", name, key]).await;
    }

    pub async fn screen(&self, name: &str) -> String {
        self.tmux(&["capture-pane", "-p", "-t", name]).await
    }

    /// Polls the screen until `check` holds; fails with every screen after [`DEADLINE`].
    pub async fn until(&self, name: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let s = self.screen(name).await;
            if check(&s) {
                return s;
            }
            if tokio::time::Instant::now() >= deadline {
                let mut all = String::new();
                for other in self.tmux(&["list-sessions", "-F", "#{session_name}"]).await.lines() {
                    all += &format!("{other}'s screen:\n{}\n", self.screen(other).await);
                }
                panic!("timed out waiting for {what} on {name}'s screen\n{all}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn shows(&self, name: &str, text: &str) -> String {
        self.until(name, &format!("{text:?}"), |s| s.contains(text)).await
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux").arg("-L").arg(&self.socket).arg("kill-server").output();
    }
}
