//! `ferry-producer console`: a web console for campaigns and triage, served from the same
//! library calls as the CLI (`queue::status` for the campaigns and queues, `triage::summary`,
//! `triage::page` and `triage::show` for the dead letters, `triage::requeue`, `triage::purge`
//! and `verify::verify` for the actions), so what it shows and what it records are what
//! `status`, `dlq` and `verify` show and record.
//!
//! - `html.rs`: escaping, times, the page frame; `svg.rs`: the charts; `pages.rs`: the pages;
//! - `campaigns.rs`: what the Campaigns page reads; `auth.rs`: token, cookie, CSRF, Host;
//! - `routes.rs`: the HTTP routes and the guard every request passes.
//!
//! Invariants (the safety defaults):
//! - it refuses to start on a non-loopback address without an access token
//!   ([`ConsoleError::TokenRequired`]); with a token, every page but `/healthz` and the login
//!   needs it (bearer header or the login's cookie);
//! - every state-changing request is a POST carrying the viewer's CSRF token, checked before
//!   anything else; GETs change nothing (an action's GET is its confirmation page);
//! - `read_only` hides every action and refuses every action request;
//! - pages are server-rendered HTML with inline CSS and SVG, no script, nothing loaded from
//!   elsewhere; everything from data is escaped; the store and broker URLs are shown redacted
//!   and the token is never logged or shown;
//! - one action runs at a time (a second gets 409), so a double submit cannot interleave two
//!   requeues of the same letters.

pub mod auth;
pub mod campaigns;
pub mod html;
pub mod pages;
mod routes;
pub mod svg;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::queue::Topology;
use crate::store::{DynStore, StoreError};

pub use self::campaigns::BrokerView;

/// How the console runs.
#[derive(Clone)]
pub struct ConsoleConfig {
    /// Where to listen (`127.0.0.1:8080` by default in the binary).
    pub addr: SocketAddr,
    /// The store URL (it must exist; shown redacted).
    pub store_url: String,
    /// The store's layout (`--layout`).
    pub layout: crate::layout::Layout,
    /// The broker: queue depths and requeues by publishing. `None`: embedded mode (requeues
    /// re-run in this process, as `dlq --embedded`).
    pub broker: Option<BrokerView>,
    /// The access token (`FERRY_CONSOLE_TOKEN`); required on a non-loopback address.
    pub token: Option<String>,
    /// Hide and refuse every action.
    pub read_only: bool,
    /// Mark the login cookie `Secure` (the console is reached over HTTPS, e.g. an ingress).
    pub secure_cookie: bool,
    /// How long a read of the campaigns is reused, and how often the page reloads itself.
    pub refresh: Duration,
    /// How far back the throughput chart reaches.
    pub chart_window: Duration,
    /// Dead letters per list page.
    pub page_size: usize,
}

impl std::fmt::Debug for ConsoleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token; URLs redacted.
        f.debug_struct("ConsoleConfig")
            .field("addr", &self.addr)
            .field("store_url", &crate::store::redact_url(&self.store_url))
            .field("broker", &self.broker.as_ref().map(|b| crate::queue::amqp::redacted(&b.amqp_url)))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A non-loopback address without a token: anyone who can reach it could requeue and purge.
    #[error("--http {0} is not a loopback address: set an access token in FERRY_CONSOLE_TOKEN (or bind 127.0.0.1)")]
    TokenRequired(SocketAddr),
    #[error("the access token is empty")]
    EmptyToken,
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} (--http): {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("console server: {0}")]
    Serve(std::io::Error),
}

/// Checks the safety defaults before anything is opened.
pub fn check(config: &ConsoleConfig) -> Result<(), ConsoleError> {
    if config.token.as_deref().is_some_and(str::is_empty) {
        return Err(ConsoleError::EmptyToken);
    }
    if !config.addr.ip().is_loopback() && config.token.is_none() {
        return Err(ConsoleError::TokenRequired(config.addr));
    }
    Ok(())
}

/// What the routes share.
pub(crate) struct State {
    pub store: DynStore,
    pub config: ConsoleConfig,
    pub keys: auth::Keys,
    /// The last [`campaigns::Overview`] read, and when.
    pub overview: tokio::sync::Mutex<Option<(Instant, Arc<campaigns::Overview>)>>,
    /// Held while an action runs.
    pub action: tokio::sync::Mutex<()>,
    /// The footer: redacted store and broker.
    pub footer: String,
}

impl State {
    pub fn source(&self) -> crate::triage::Source {
        match &self.config.broker {
            Some(b) => crate::triage::Source::Broker {
                amqp_url: b.amqp_url.clone(),
                topology: b.topology.clone(),
                connect_timeout: b.connect_timeout,
            },
            None => crate::triage::Source::Embedded,
        }
    }
}

/// Serves the console until `shutdown` resolves. Logs the address it is bound to
/// (`bound=ADDR`), never the token.
pub async fn run(
    config: ConsoleConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ConsoleError> {
    check(&config)?;
    let opts = crate::store::OpenOptions::new(4, crate::store::OpenMode::Existing).layout(config.layout);
    let store = crate::store::open_with(&config.store_url, &opts).await?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|source| ConsoleError::Bind { addr: config.addr, source })?;
    let bound = listener.local_addr().map_err(ConsoleError::Serve)?;
    let footer = format!(
        "store {} · broker {}",
        crate::store::redact_url(&config.store_url),
        config.broker.as_ref().map_or("none (embedded)".to_string(), |b| format!(
            "{} prefix {}",
            crate::queue::amqp::redacted(&b.amqp_url),
            b.topology.prefix
        )),
    );
    tracing::info!(
        %bound,
        read_only = config.read_only,
        login = config.token.is_some(),
        store = %crate::store::redact_url(&config.store_url),
        "serving the console"
    );
    let state = Arc::new(State {
        store,
        keys: auth::Keys::new(config.token.clone()),
        config,
        overview: tokio::sync::Mutex::new(None),
        action: tokio::sync::Mutex::new(()),
        footer,
    });
    axum::serve(listener, routes::router(state)).with_graceful_shutdown(shutdown).await.map_err(ConsoleError::Serve)
}

/// A broker view from the CLI's settings.
pub fn broker(amqp_url: String, topology: Topology, connect_timeout: Duration) -> BrokerView {
    BrokerView { amqp_url, topology, connect_timeout }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(addr: &str, token: Option<&str>) -> ConsoleConfig {
        ConsoleConfig {
            addr: addr.parse().unwrap(),
            store_url: "postgres://u:hunter2@db/x".into(),
            layout: crate::layout::Layout::Ferry,
            broker: None,
            token: token.map(String::from),
            read_only: false,
            secure_cookie: false,
            refresh: Duration::from_secs(5),
            chart_window: Duration::from_secs(3600),
            page_size: 50,
        }
    }

    #[test]
    fn a_non_loopback_address_needs_a_token() {
        assert!(check(&config("127.0.0.1:8080", None)).is_ok());
        assert!(check(&config("[::1]:8080", None)).is_ok());
        let e = check(&config("0.0.0.0:8080", None)).unwrap_err();
        assert!(matches!(e, ConsoleError::TokenRequired(_)) && e.to_string().contains("FERRY_CONSOLE_TOKEN"), "{e}");
        assert!(check(&config("0.0.0.0:8080", Some("t"))).is_ok());
        assert!(matches!(check(&config("0.0.0.0:8080", Some(""))), Err(ConsoleError::EmptyToken)));
    }

    #[test]
    fn debug_shows_neither_the_token_nor_passwords() {
        let shown = format!("{:?}", config("0.0.0.0:1", Some("tok-123")));
        assert!(!shown.contains("tok-123") && !shown.contains("hunter2"), "{shown}");
    }
}
