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
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::metrics::GROUP_SIZE.into()),
                        &crate::metrics::GROUP_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::metrics::JOB_STEP_SECONDS.into()),
                        &crate::metrics::STEP_BUCKETS,
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

/// Readiness: consuming from the broker (as the consumer loop reports it) and not misdirected
/// (the jobs delivered name campaigns this worker's store holds; see
/// [`CampaignGate`](crate::jobs::gate::CampaignGate)).
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    consuming: Arc<AtomicBool>,
    misdirected: Arc<AtomicBool>,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.consuming.store(ready, Ordering::SeqCst);
        metrics::gauge!(crate::metrics::CONSUMING).set(if ready { 1.0 } else { 0.0 });
    }

    /// Jobs name campaigns the store does not have: the worker is pointed at the wrong store.
    pub fn set_misdirected(&self, misdirected: bool) {
        self.misdirected.store(misdirected, Ordering::SeqCst);
    }

    pub fn get(&self) -> bool {
        self.consuming.load(Ordering::SeqCst) && !self.misdirected.load(Ordering::SeqCst)
    }

    /// Why the worker is not ready, for `/readyz`.
    fn why_not(&self) -> Option<&'static str> {
        if self.misdirected.load(Ordering::SeqCst) {
            Some("not ready: jobs name campaigns this worker's store has no record of (wrong --store?)")
        } else if !self.consuming.load(Ordering::SeqCst) {
            Some("not ready: not consuming")
        } else {
            None
        }
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
                let status = match ready.why_not() {
                    None => (StatusCode::OK, "ready"),
                    Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
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
