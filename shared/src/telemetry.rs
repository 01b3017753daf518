//! Process plumbing shared by the binaries: tracing setup and the shutdown signal.
//!
//! Owns the rule that no `RUST_LOG` or `--log-format` can put a credential or a payload in the
//! logs: a fixed ceiling per library that the environment cannot raise.

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The filter used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info,lapin=warn,amq_protocol=warn";

/// The most any `RUST_LOG` can show of each crate. ferry's own crates (every target starting
/// with `ferry`: `ferry`, `ferry_producer`, `ferry_worker`) are fully under `RUST_LOG`; their
/// events carry ids, counts and redacted URLs, never payloads. Every other crate is capped,
/// because below these levels libraries log what must never reach a log:
/// - `lapin` and `amq_protocol*` trace every frame: the SASL PLAIN response (the broker
///   password as a byte list) and message bodies;
/// - `lapin::returned_messages` warns with a returned message's whole body;
/// - `tokio_postgres` (through the `log` bridge) debugs every statement's parameters: whole
///   v1 chunks and v2 pages;
/// - `rustls`, `hyper`, `h2`, `tower`, `axum`, `deadpool`, `hickory*`, ... debug or trace
///   handshakes, requests and connection details.
///
/// An allow-list rather than a deny-list: a dependency added later is capped too.
pub const LIBRARY_CEILING: &[(&str, Level)] = &[
    ("ferry", Level::TRACE),
    ("lapin::returned_messages", Level::ERROR),
    ("lapin", Level::WARN),
    ("amq_protocol", Level::WARN),
];

/// The ceiling of every target not in [`LIBRARY_CEILING`].
pub const OTHER_CRATES_CEILING: Level = Level::INFO;

/// The fixed filter of [`LIBRARY_CEILING`], applied on top of `RUST_LOG`: an event is written
/// only when both allow it. It also covers `log` records (bridged by `tracing-log`, with the
/// `log` target, e.g. `tokio_postgres::query`).
pub fn ceiling() -> Targets {
    Targets::new().with_targets(LIBRARY_CEILING.iter().copied()).with_default(OTHER_CRATES_CEILING)
}

/// Installs the global tracing subscriber: `RUST_LOG` filters (default [`DEFAULT_FILTER`])
/// under the fixed [`ceiling`], so no `RUST_LOG` can make a library log a credential or a
/// payload. Logs go to stderr so stdout stays for reports; colours only when stderr is a
/// terminal (and `NO_COLOR` is unset). JSON lines have `message` at the top level and the
/// current span's fields (a job's `actor`, `campaign`, `worker`) under `span`.
pub fn init_tracing(format: LogFormat) {
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stderr().is_terminal() && !no_color;
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let layer = match format {
        LogFormat::Pretty => layer.boxed(),
        LogFormat::Json => layer.json().flatten_event(true).with_current_span(true).with_span_list(false).boxed(),
    };
    // Another subscriber already installed (tests): keep it.
    let _ = tracing_subscriber::registry().with(layer.with_filter(ceiling().and(env))).try_init();
}

/// The span of one job: every line logged while a job runs or is settled carries its actor,
/// campaign and worker (a name that is not known is left out). At ERROR level, so it is on
/// whenever any ferry line is.
pub fn job_span(actor: Option<&str>, campaign: Option<&str>, worker: &str) -> tracing::Span {
    tracing::error_span!("job", actor, campaign, worker)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received");
}

/// This process's name in leases, audits and dead letters: `FERRY_WORKER_ID`, else
/// `{hostname}-{pid}`.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "ferry".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_holds_libraries_down_and_leaves_ferry_free() {
        let c = ceiling();
        for target in ["ferry", "ferry::jobs::run", "ferry_producer", "ferry_worker"] {
            assert!(c.would_enable(target, &Level::TRACE), "{target}");
        }
        // What logs credentials and payloads below these levels stays below them.
        for (target, highest_off) in [
            ("lapin::channel", Level::INFO),
            ("lapin::returned_messages", Level::WARN),
            ("amq_protocol_tcp", Level::INFO),
            ("tokio_postgres::query", Level::DEBUG),
            ("deadpool.postgres", Level::DEBUG),
            ("rustls::client::hs", Level::DEBUG),
            ("some_future_dependency", Level::DEBUG),
        ] {
            assert!(!c.would_enable(target, &highest_off), "{target} at {highest_off}");
        }
        assert!(c.would_enable("tokio_postgres::connection", &Level::INFO));
        assert!(c.would_enable("lapin::channel", &Level::WARN));
    }
}
