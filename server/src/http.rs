//! The operators' HTTP listener (`[metrics] listen`, loopback by default): `GET /metrics`
//! (Prometheus text), `GET /health` (the process and its writer live) and `GET /ready`
//! (store open and writable, every listener bound). Plain HTTP/1.1: put it behind a
//! proxy with TLS, or keep it on loopback or a private network.
//!
//! Bounds: [`MAX_CONNECTIONS`] connections at once (more are closed at accept), request
//! headers within [`HEADER_TIMEOUT`], connections closed after [`CONNECTION_LIFETIME`];
//! one scrape reads the store at a time (others wait for it), so scrapes cost at most one
//! key count of the queues, held units and dead letters at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::metrics::{Metrics, StoreFigures};

pub const MAX_CONNECTIONS: usize = 16;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// What the listener asks of the running server.
pub trait Probes: Send + Sync + 'static {
    /// Reads the figures of a scrape (on the blocking pool).
    fn figures(&self) -> anyhow::Result<StoreFigures>;
    /// Whether the writer still runs.
    fn live(&self) -> bool;
    /// Why the server cannot serve now, if it cannot (on the blocking pool).
    fn unready(&self) -> Option<String>;
}

pub struct Endpoints {
    pub metrics: Arc<Metrics>,
    pub probes: Arc<dyn Probes>,
    /// Set once every listener is bound and the server announced itself ready.
    pub ready: AtomicBool,
    scrape: tokio::sync::Mutex<()>,
}

impl Endpoints {
    pub fn new(metrics: Arc<Metrics>, probes: Arc<dyn Probes>) -> Arc<Endpoints> {
        Arc::new(Endpoints { metrics, probes, ready: AtomicBool::new(false), scrape: tokio::sync::Mutex::new(()) })
    }

    async fn answer(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        }
        match req.uri().path() {
            "/metrics" => self.metrics().await,
            "/health" => {
                if self.probes.live() {
                    text(StatusCode::OK, "ok\n".into())
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "the writer has stopped\n".into())
                }
            }
            "/ready" => {
                if !self.ready.load(Ordering::SeqCst) {
                    return text(StatusCode::SERVICE_UNAVAILABLE, "starting or stopping\n".into());
                }
                let probes = self.probes.clone();
                match crate::store::blocking(move || probes.unready()).await {
                    Ok(None) => text(StatusCode::OK, "ready\n".into()),
                    Ok(Some(why)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /health or /ready\n".into()),
        }
    }

    async fn metrics(&self) -> Response<Full<Bytes>> {
        let _one = self.scrape.lock().await;
        let probes = self.probes.clone();
        match crate::store::blocking(move || probes.figures()).await {
            Ok(Ok(f)) => self.metrics.set_scraped(f),
            // The counters still answer; the store figures keep their last values.
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the store's figures for /metrics"),
            Err(e) => tracing::warn!(error = %e, "cannot read the store's figures for /metrics"),
        }
        let mut res = Response::new(Full::new(Bytes::from(self.metrics.encode())));
        res.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        res
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

/// Binds the listener (an error names the address).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr} ([metrics] listen)"))
}

/// Serves until shutdown.
pub async fn serve(listener: TcpListener, endpoints: Arc<Endpoints>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, most likely: pause rather than spin.
                tracing::warn!(error = %e, "metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let e = endpoints.clone();
                async move { Ok::<_, Infallible>(e.answer(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}
