//! Start-up and graceful shutdown of a homeserver: store, writer, client API, admin socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use missive_federation::discovery::Discovery;
use missive_federation::{tls, ServerKey};
use missive_spec::federation::FEDERATION_ALPN;
use missive_spec::wire::CLIENT_ALPN;
use tokio::sync::watch;

use crate::api::{Api, Inflight};
use crate::config::Config;
use crate::federation::{Federation, FederationTiming};
use crate::hub::Hub;
use crate::logging::Logging;
use crate::reload::Reloadable;
use crate::sequencer::{Sequencer, WriterContext};
use crate::service::{Registration, Service};
use crate::signals::Signals;
use crate::store::rocks::RocksStore;
use crate::store::Store;

/// Longest replay of the cluster's log at start before the node gives up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients send keep-alives every 3 s; one silent this long is gone (and offline).
const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs the server until SIGTERM or SIGINT, reloading `config_path` at SIGHUP, then shuts
/// down without losing accepted work.
pub async fn run(config_path: &std::path::Path, config: Config, logging: Logging, mut signals: Signals) -> anyhow::Result<()> {
    tls::install_provider();
    crate::sabotage::announce();
    let admin_path = config.admin_socket();
    crate::admin::check_socket_path(&admin_path)?;
    let key = Arc::new(ServerKey::load(&config.key_file)?);
    let chain = missive_federation::RotationChain::load(&config.key_file)?;
    if let Some(last) = chain.last() {
        let (_, _, new) = missive_federation::rotation::open(last)?;
        if new != key.public() {
            anyhow::bail!(
                "{} hands over to {new}, but {} holds {}: a key rotation was interrupted; put the key it names in place (server.key.new) or remove the last line of the rotations file",
                missive_federation::RotationChain::path(&config.key_file).display(),
                config.key_file.display(),
                key.public()
            );
        }
    }
    let own = Arc::new(crate::federation::OwnKeys::new(key.public(), chain));
    let rocks = Arc::new(RocksStore::open(&config.db_dir())?);
    // Bound once the database lock is ours; the file goes when `run` returns, however.
    let (admin_listener, _admin_file) = crate::admin::bind(&admin_path)?;
    let store: Arc<dyn Store> = rocks.clone();
    let hub = Arc::new(Hub::default());
    let (queued_tx, queued_rx) = tokio::sync::mpsc::unbounded_channel();
    let limits = &config.limits;
    let live = Arc::new(crate::limits::LiveLimits::new(limits));
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let cluster = match &config.cluster {
        Some(c) => Some(crate::cluster::ClusterLog::connect(c, &config.server_name, &*store).await?),
        None => None,
    };
    let ctx = WriterContext {
        server: config.server_name.clone(),
        key: key.clone(),
        hub: hub.clone(),
        outbound: Some(queued_tx),
        limits: live.clone(),
        metrics: metrics.clone(),
        linger: config.store.linger(),
        cluster: cluster.as_ref().map(|log| log.progress.clone()),
    };
    // Start-up reads every queue's head and every held unit: work for the blocking pool.
    let writer_store = store.clone();
    let (mut sequencer, writer) = crate::store::blocking(move || Sequencer::start(writer_store, ctx)).await??;
    if let Some(log) = &cluster {
        sequencer = sequencer.with_log(log.clone());
        log.follow(sequencer.writer());
        // Serve nothing older than what the log held when this node started.
        log.catch_up(CATCH_UP_TIMEOUT).await?;
        tracing::info!(node = %log.node, applied = log.applied().0, "caught up with the cluster's log");
    }
    let (edu_tx, edu_rx) = tokio::sync::mpsc::unbounded_channel();
    let presence = crate::presence::Presence::new(
        config.server_name.clone(),
        store.clone(),
        hub.clone(),
        sequencer.clone(),
        edu_tx,
        live.clone(),
    );
    presence.start_refresh();
    let policy = Arc::new(crate::federation::policy::FederationPolicy::new(&config.federation));
    // Restored from a backup: reclaim from peers before numbering for them (F12.3).
    let restored = missive_core::restore::load(&*store)?;
    let (reclaimed_tx, reclaimed_rx) = tokio::sync::watch::channel(0u64);
    let (reclaims, reclaims_rx) = match restored.is_some() {
        true => {
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            (Some(crate::service::Reclaims { ask: tx, done: reclaimed_rx }), Some(rx))
        }
        false => (None, None),
    };
    let service = Arc::new(Service {
        policy: policy.clone(),
        limits: Default::default(),
        hasher: crate::hashing::Hasher::new(limits.password_hashes),
        store: store.clone(),
        sequencer: sequencer.clone(),
        hub: hub.clone(),
        presence: presence.clone(),
        server: config.server_name.clone(),
        registration: Registration { policy: config.registration.policy, token: config.registration.token.clone() },
        metrics: metrics.clone(),
        reclaims,
        keys: own.clone(),
        claims: crate::ratelimit::FailureLimiter::new(crate::keydir::CLAIMS_PER_MINUTE, Duration::from_secs(60)),
        peer_claims: crate::ratelimit::FailureLimiter::new(crate::keydir::PEER_CLAIMS_PER_MINUTE, Duration::from_secs(60)),
        federation: Default::default(),
    });

    let server_config = tls::server_config(&key, config.server_name.as_str(), CLIENT_ALPN, CLIENT_IDLE_TIMEOUT)?;
    let endpoint = tls::bind_endpoint(config.client.listen, server_config, &key, b"client")
        .with_context(|| format!("cannot listen on {}", config.client.listen))?;
    let addr: SocketAddr = endpoint.local_addr()?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let fed_config = tls::federation_server_config(&key, config.server_name.as_str(), FEDERATION_ALPN)?;
    let fed_endpoint = tls::bind_endpoint(config.federation.listen, fed_config, &key, b"federation")
        .with_context(|| format!("cannot listen for federation on {}", config.federation.listen))?;
    let fed_addr = fed_endpoint.local_addr()?;
    let discovery = Arc::new(Discovery::new(config.discovery()?)?);
    let timing = FederationTiming {
        // Validated: 1 ≤ retry_base_ms ≤ retry_cap_ms.
        retry_base: Duration::from_millis(config.federation.retry_base_ms),
        retry_cap: Duration::from_millis(config.federation.retry_cap_ms),
    };
    let federation = Federation::new(
        config.server_name.clone(),
        key.clone(),
        fed_endpoint.clone(),
        discovery,
        store,
        sequencer.clone(),
        timing,
        presence,
        shutdown_rx.clone(),
        crate::federation::FederationLimits { handshakes: limits.federation_handshakes, body_bytes: limits.federation_request_bytes },
        live.clone(),
        policy.clone(),
        metrics.clone(),
        own.clone(),
    );
    let _ = service.federation.set(federation.clone());
    federation.serve_keys_for(service.clone());
    federation.load_rotations().await?;
    federation.start(queued_rx).await?;
    federation.start_edus(edu_rx);
    if let (Some(record), Some(rx)) = (restored, reclaims_rx) {
        tracing::warn!(reclaimed = record.reclaimed.len(), "restored from a backup: learning from peers what this server sent them");
        federation.start_reclaim(record, rx, reclaimed_tx).await?;
    }
    let inflight = Arc::new(Inflight::default());
    let slots = crate::api::Slots::new(config.client.max_connections, config.client.max_connections_per_address);
    let admin_store = service.store.clone();
    let api = Arc::new(Api {
        service,
        shutdown: shutdown_rx.clone(),
        inflight: inflight.clone(),
        slots,
        live: live.clone(),
        bodies: missive_federation::framing::BodyBudget::new(limits.client_request_bytes),
    });
    let serving = tokio::spawn(api.serve(endpoint.clone()));
    if let (Some(log), Some(c)) = (&cluster, &config.cluster) {
        log.announce(config.server_name.clone(), c.replicas, addr, shutdown_rx.clone()).await?;
    }
    let reloadable = Arc::new(Reloadable::new(config_path, config.clone(), federation.clone(), logging, live.clone()));
    let admin_ctx = crate::admin::AdminContext {
        ops: crate::admin::Operations { sequencer: sequencer.clone(), store: admin_store, hub, server: config.server_name.clone() },
        federation: federation.clone(),
        reloadable: reloadable.clone(),
        rocks: rocks.clone(),
    };
    let admin = tokio::spawn(crate::admin::serve(admin_listener, admin_ctx, shutdown_rx.clone()));
    let probes = Arc::new(ServerProbes { rocks: rocks.clone(), federation: federation.clone(), sequencer: sequencer.clone() });
    let endpoints = crate::http::Endpoints::new(metrics, probes);
    let metrics_addr = match config.metrics.enabled {
        true => {
            let listener = crate::http::bind(config.metrics.listen).await?;
            let addr = listener.local_addr()?;
            tokio::spawn(crate::http::serve(listener, endpoints.clone(), shutdown_rx.clone()));
            Some(addr)
        }
        false => None,
    };
    endpoints.ready.store(true, std::sync::atomic::Ordering::SeqCst);

    tracing::info!(server = %config.server_name, key = %key.public(), client = %addr, federation = %fed_addr, "serving");
    // The line tests and scripts wait for: the server accepts requests from here on.
    let metrics_note = metrics_addr.map(|a| format!(", metrics on {a}")).unwrap_or_default();
    println!("missived: {} ready, key {}, client API on {addr}, federation on {fed_addr}{metrics_note}", config.server_name, key.public());

    signals.until_stopped(&reloadable).await;
    endpoints.ready.store(false, std::sync::atomic::Ordering::SeqCst);
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = serving.await;
    if tokio::time::timeout(DRAIN_TIMEOUT, inflight.wait_idle()).await.is_err() {
        tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; closing anyway");
    }
    endpoint.close(0u32.into(), b"server shutting down");
    fed_endpoint.close(0u32.into(), b"server shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    let _ = admin.await;
    sequencer.stop().await;
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    rocks.flush()?;
    tracing::info!("stopped");
    Ok(())
}

/// What `/metrics`, `/health` and `/ready` read of the running server.
struct ServerProbes {
    rocks: Arc<RocksStore>,
    federation: Arc<Federation>,
    sequencer: Sequencer,
}

impl crate::http::Probes for ServerProbes {
    fn figures(&self) -> anyhow::Result<crate::metrics::StoreFigures> {
        use crate::store::{Cf, Store};
        let (wal_syncs, synced) = self.rocks.wal_syncs();
        Ok(crate::metrics::StoreFigures {
            queues: self.federation.queue_figures(crate::accounts::now_ms())?,
            held_units: self.rocks.count(Cf::Held, &[])?,
            dead_letters: self.rocks.count(Cf::DeadLetters, &[])?,
            wal_syncs,
            wal_sync_seconds: synced.as_secs_f64(),
            rocks: self.rocks.figures()?,
            process: crate::metrics::ProcessFigures::read(),
        })
    }

    fn live(&self) -> bool {
        self.sequencer.running()
    }

    fn unready(&self) -> Option<String> {
        if !self.sequencer.running() {
            return Some("the writer has stopped".into());
        }
        self.rocks.writable().err().map(|e| e.to_string())
    }
}
