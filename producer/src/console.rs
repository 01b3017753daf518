//! `console`: the web console for campaigns and triage (`ferry::console`). Flags, then the
//! library; it serves until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::args::{StoreArg, TopologyArgs};
use crate::exit::Usage;

#[derive(Args)]
#[command(after_help = crate::exit::AFTER_HELP)]
pub struct ConsoleArgs {
    /// Address to serve the console on. Loopback by default; any other address needs
    /// FERRY_CONSOLE_TOKEN.
    #[arg(long, env = "FERRY_CONSOLE_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    #[command(flatten)]
    pub store: StoreArg,
    /// RabbitMQ URL, e.g. amqp://user:password@host:5672/%2f, for queue depths and requeues
    /// (required unless --embedded).
    #[arg(long, env = "FERRY_AMQP_URL", hide_env_values = true, required_unless_present = "embedded")]
    pub amqp: Option<String>,
    /// Seconds to wait for the broker's TCP connection and AMQP handshake.
    #[arg(long, env = "FERRY_AMQP_CONNECT_TIMEOUT_SECS", default_value_t = ferry::queue::amqp::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=600))]
    pub amqp_connect_timeout_secs: u64,
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// No broker: no queue depths, and requeues re-run the jobs in the console's process
    /// (as `dlq --embedded`).
    #[arg(long, env = "FERRY_CONSOLE_EMBEDDED", conflicts_with = "amqp")]
    pub embedded: bool,
    /// Access token every request must carry (Authorization: Bearer, or the login form's
    /// cookie). Prefer the env variable: a flag shows in the process list.
    #[arg(long, env = "FERRY_CONSOLE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Show everything, offer and accept no action (requeue, purge, verify).
    #[arg(long, env = "FERRY_CONSOLE_READ_ONLY")]
    pub read_only: bool,
    /// Mark the login cookie Secure (set when the console is reached over HTTPS).
    #[arg(long, env = "FERRY_CONSOLE_SECURE_COOKIE")]
    pub secure_cookie: bool,
    /// Seconds a read of the campaigns is reused (one audit scan per interval however many
    /// watch), and the Campaigns page's reload interval (0: read on every request, no reload).
    #[arg(long, env = "FERRY_CONSOLE_REFRESH_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub refresh_secs: u64,
    /// Hours the throughput chart reaches back.
    #[arg(long, env = "FERRY_CONSOLE_CHART_HOURS", default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=168))]
    pub chart_hours: u64,
    /// Dead letters per list page.
    #[arg(long, env = "FERRY_CONSOLE_PAGE_SIZE", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub page_size: u64,
}

pub async fn console_cmd(args: ConsoleArgs) -> anyhow::Result<ExitCode> {
    let broker = match (&args.amqp, args.embedded) {
        (Some(url), false) => Some(ferry::console::broker(
            url.clone(),
            args.topology.topology()?,
            Duration::from_secs(args.amqp_connect_timeout_secs),
        )),
        // clap requires one of them and refuses both.
        _ => None,
    };
    let config = ferry::console::ConsoleConfig {
        addr: args.http,
        store_url: args.store.store,
        layout: args.store.layout,
        broker,
        token: args.token,
        read_only: args.read_only,
        secure_cookie: args.secure_cookie,
        refresh: Duration::from_secs(args.refresh_secs),
        chart_window: Duration::from_secs(args.chart_hours * 3600),
        page_size: usize::try_from(args.page_size).unwrap_or(50),
    };
    // The safety defaults are a usage error: nothing is opened when they do not hold.
    ferry::console::check(&config).map_err(|e| Usage(e.to_string()))?;
    ferry::console::run(config, ferry::telemetry::shutdown_signal()).await.context("console")?;
    Ok(ExitCode::SUCCESS)
}
