//! The server's log: `tracing` events on standard error, as text lines or JSON objects
//! (`[log] format`), filtered by `[log] level` (or by `RUST_LOG`, which overrides it)
//! through a filter a reload can replace while it runs.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The installed subscriber's filter.
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` chose the filter: `[log] level` does not apply.
    from_env: bool,
}

impl Logging {
    /// Installs the global subscriber; `level` is a validated `[log] level`.
    pub fn init(level: &str, format: crate::config::LogFormat) -> Logging {
        let (filter, from_env) = match EnvFilter::try_from_default_env() {
            Ok(f) => (f, true),
            Err(_) => (EnvFilter::new(level), false),
        };
        let (filter, handle) = reload::Layer::new(filter);
        use std::io::IsTerminal;
        let text = tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
        let registry = tracing_subscriber::registry().with(filter);
        match format {
            crate::config::LogFormat::Text => registry.with(text).init(),
            crate::config::LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init(),
        }
        Logging { filter: handle, from_env }
    }

    /// Filters by `level` from now on. `Ok(false)`: `RUST_LOG` overrides it, nothing changed.
    pub fn set_level(&self, level: &str) -> anyhow::Result<bool> {
        if self.from_env {
            return Ok(false);
        }
        let filter = EnvFilter::builder().parse(level)?;
        self.filter.reload(filter)?;
        Ok(true)
    }
}
