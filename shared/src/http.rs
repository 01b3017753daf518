//! The worker's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive), `/readyz` (connected to the broker and consuming).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the process-wide Prometheus recorder (once; later calls get the same handle) and
/// registers every ferry series at zero ([`crate::metrics::register`]).
pub fn install_metrics() -> PrometheusHandle {
    use metrics_exporter_prometheus::Matcher;
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(crate::metrics::MIGRATION_SECONDS.into()),
                    &crate::metrics::SECONDS_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::metrics::JOB_V1_BYTES.into()),
                        &crate::metrics::BYTES_BUCKETS,
                    )
                });
            let handle = match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => handle,
                // Another recorder is installed (a test harness): render from a private one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            crate::metrics::register();
            handle
        })
        .clone()
}

/// Readiness as the consumer loop reports it.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
        metrics::gauge!(crate::metrics::CONSUMING).set(if ready { 1.0 } else { 0.0 });
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Serves the endpoints on `addr` until the returned task is aborted.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    ready: Readiness,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .route("/healthz", get(|| std::future::ready("ok")))
        .route(
            "/readyz",
            get(move || {
                let status = if ready.get() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                };
                std::future::ready(status)
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok((bound, task))
}
