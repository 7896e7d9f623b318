//! Applying an edited `missived.toml` to a running server. SIGHUP and the admin `reload`
//! request (which `missived peer add` sends) both go through [`Reloadable::reload`].
//!
//! A reload reads and validates the whole file first: an invalid one is logged and changes
//! nothing. Then [`Reloadable::apply`] applies the settings that can change live, and every
//! other setting that changed is named by [`restart_needed`] and logged as needing a
//! restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use missive_federation::discovery::DiscoveryConfig;

use crate::config::{ClientSection, Config, FederationSection, RegistrationSection};
use crate::federation::Federation;
use crate::limits::LiveLimits;
use crate::logging::Logging;

/// The parts of a running server that follow its config file without a restart: the
/// `[[peers]]` pins, `[log] level`, and the `[limits]` that [`LiveLimits`] holds.
///
/// To make another setting live: give this struct a handle to what holds it, apply the new
/// value in [`Reloadable::apply`] (it was validated by `Config::parse`, so applying must
/// not fail), and stop reporting it in [`restart_needed`].
pub struct Reloadable {
    path: PathBuf,
    /// The configuration in effect. Held for a whole reload, so reloads take turns.
    current: Mutex<Config>,
    federation: Arc<Federation>,
    logging: Logging,
    limits: Arc<LiveLimits>,
}

impl Reloadable {
    /// `config` is what the server started with, read from `path`.
    pub fn new(path: &Path, config: Config, federation: Arc<Federation>, logging: Logging, limits: Arc<LiveLimits>) -> Reloadable {
        Reloadable { path: path.to_owned(), current: Mutex::new(config), federation, logging, limits }
    }

    /// Re-reads the config file and applies it, logging what changed; `trigger` (a signal,
    /// a request) is logged with it. On an error nothing has changed.
    pub fn reload(&self, trigger: &str) -> anyhow::Result<()> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let prepared = Config::load(&self.path).and_then(|new| {
            let discovery = new.discovery()?;
            Ok((new, discovery))
        });
        let (new, discovery) = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(trigger, error = %format!("{e:#}"), "config not reloaded; the server keeps running as it was");
                return Err(e);
            }
        };
        for setting in restart_needed(&current, &new) {
            tracing::warn!(trigger, "{setting} changed; restart to apply");
        }
        let (applied, at_restart) = self.limits.apply(&current.limits, &new.limits);
        for setting in at_restart {
            tracing::warn!(trigger, "limits.{setting} changed; restart to apply");
        }
        for setting in applied {
            tracing::info!(trigger, "limits.{setting} changed; applied");
        }
        self.apply(&current, &new, discovery);
        tracing::info!(trigger, peers = new.peers.len(), log_level = %new.log.level, "config reloaded");
        *current = new;
        Ok(())
    }

    /// Puts the live settings of `new` into effect; `old` is the configuration until now.
    fn apply(&self, old: &Config, new: &Config, discovery: DiscoveryConfig) {
        self.federation.discovery().set_statics(discovery.statics);
        // What waited for a peer that is pinned (or pinned differently) now goes at once,
        // not at the end of its backoff.
        let repinned = new.peers.iter().filter(|p| !old.peers.contains(p)).map(|p| p.name.clone());
        self.federation.repinned(repinned);
        if (&new.federation.allow, &new.federation.deny) != (&old.federation.allow, &old.federation.deny) {
            self.federation.set_policy(&new.federation);
            tracing::info!(allow = ?new.federation.allow, deny = ?new.federation.deny, "federation policy changed");
        }
        if new.log.level != old.log.level {
            match self.logging.set_level(&new.log.level) {
                Ok(true) => tracing::info!(level = %new.log.level, "log level changed"),
                Ok(false) => tracing::warn!("log.level changed, but RUST_LOG overrides it"),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "log.level not applied"),
            }
        }
    }
}

/// The settings, by their key in `missived.toml`, that differ between `old` and `new` and
/// take effect only when the server starts.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    // Taken apart field by field, so that a new setting cannot be added without deciding
    // here whether a reload applies it.
    let Config { server_name, data_dir, key_file, client, registration, federation, log, peers: _, limits: _, metrics, store, cluster } = new;
    // `log.level` and `peers` are applied live (`Reloadable::apply`); `limits` each apply live or
    // at a restart, as `LiveLimits::apply` decides and reports.
    let ClientSection { listen: client_listen, max_connections, max_connections_per_address } = client;
    let RegistrationSection { policy, token } = registration;
    let crate::config::MetricsSection { enabled: metrics_enabled, listen: metrics_listen } = metrics;
    let crate::config::StoreSection { group_commit_linger_us } = store;
    // `allow` and `deny` are applied live (`Reloadable::apply`).
    let FederationSection { listen, https_port, dns_server, ca_file, retry_base_ms, retry_cap_ms, allow_special_addresses, allow: _, deny: _ } =
        federation;
    let (c, r, f) = (&old.client, &old.registration, &old.federation);
    [
        ("server_name", *server_name != old.server_name),
        ("log.format", log.format != old.log.format),
        ("data_dir", *data_dir != old.data_dir),
        ("key_file", *key_file != old.key_file),
        ("client.listen", *client_listen != c.listen),
        ("client.max_connections", *max_connections != c.max_connections),
        ("client.max_connections_per_address", *max_connections_per_address != c.max_connections_per_address),
        ("metrics.enabled", *metrics_enabled != old.metrics.enabled),
        ("metrics.listen", *metrics_listen != old.metrics.listen),
        ("store.group_commit_linger_us", *group_commit_linger_us != old.store.group_commit_linger_us),
        ("cluster", *cluster != old.cluster),
        ("registration.policy", *policy != r.policy),
        ("registration.token", *token != r.token),
        ("federation.listen", *listen != f.listen),
        ("federation.https_port", *https_port != f.https_port),
        ("federation.dns_server", *dns_server != f.dns_server),
        ("federation.ca_file", *ca_file != f.ca_file),
        ("federation.retry_base_ms", *retry_base_ms != f.retry_base_ms),
        ("federation.retry_cap_ms", *retry_cap_ms != f.retry_cap_ms),
        ("federation.allow_special_addresses", *allow_special_addresses != f.allow_special_addresses),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(&format!("server_name = \"a.test\"\n{text}"), Path::new("/srv/missive")).unwrap()
    }

    #[test]
    fn names_each_changed_setting_that_needs_a_restart() {
        let old = parse("[client]\nlisten = \"127.0.0.1:7450\"\n");
        assert!(restart_needed(&old, &old.clone()).is_empty());
        let new = parse(
            "data_dir = \"elsewhere\"\n[client]\nlisten = \"127.0.0.1:7460\"\n\
             [registration]\npolicy = \"open\"\n[federation]\nlisten = \"127.0.0.1:7461\"\nretry_cap_ms = 1000\n",
        );
        assert_eq!(
            restart_needed(&old, &new),
            ["data_dir", "key_file", "client.listen", "registration.policy", "federation.listen", "federation.retry_cap_ms"]
        );
    }

    #[test]
    fn peers_and_log_level_are_not_named() {
        let old = parse("");
        let new = parse("[log]\nlevel = \"debug\"\n[[peers]]\nname = \"b.test\"\naddress = \"127.0.0.1:7451\"\n");
        assert!(restart_needed(&old, &new).is_empty());
    }
}
