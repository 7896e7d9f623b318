//! The signals `missived run` obeys: SIGHUP reloads the config file, SIGTERM and SIGINT
//! stop the server cleanly.

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::reload::Reloadable;

/// Handlers for the signals the server obeys. Registered before start-up: from then on a
/// signal waits for the server instead of killing it by its default action (SIGHUP's
/// included) before it can remove its admin socket.
pub struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    pub fn register() -> std::io::Result<Signals> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Reloads the configuration on every SIGHUP; returns at SIGTERM or SIGINT.
    pub async fn until_stopped(&mut self, reloadable: &Reloadable) {
        loop {
            tokio::select! {
                Some(()) = self.hangup.recv() => {
                    // An error is logged by `reload`, and the server carries on as it was.
                    let _ = reloadable.reload("SIGHUP");
                }
                _ = self.terminate.recv() => {
                    tracing::info!("SIGTERM received");
                    return;
                }
                _ = self.interrupt.recv() => {
                    tracing::info!("SIGINT received");
                    return;
                }
            }
        }
    }
}
