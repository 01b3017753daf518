//! `ferry-worker`: migrates actors. `local` runs a whole campaign in one process against the
//! store (embedded mode); `run` consumes jobs from RabbitMQ. Thin: parse flags and env, set up
//! logging, call the library, report.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use ferry::embedded::{LocalConfig, run_local};
use ferry::jobs::RetryPolicy;
use ferry::layout::Layout;
use ferry::migrate::MigrateConfig;
use ferry::queue::Topology;
use ferry::queue::worker::{FleetConfig, WorkerConfig};
use ferry::store::group::GroupConfig;
use ferry::telemetry::{LogFormat, default_worker_id, init_tracing, shutdown_signal};

/// The exit codes, for `--help` and the README.
const AFTER_HELP: &str = "\
Exit codes:
  0    done (run: stopped by SIGTERM/SIGINT after handing back or finishing its jobs)
  1    failed (the message says why)
  2    usage error
  130  local: interrupted before the end, run again to resume";

#[derive(Parser)]
#[command(
    name = "ferry-worker",
    version,
    propagate_version = true,
    about = "Migrate actor SQLite databases from v1 to v2",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value = "pretty", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embedded mode: scan the store and migrate every actor, no broker.
    Local(LocalArgs),
    /// Fleet mode: consume migration jobs from RabbitMQ.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: MigrateArgs,
    /// RabbitMQ URL, e.g. amqp://user:password@host:5672/%2f (required: no default broker).
    #[arg(long, env = "FERRY_AMQP_URL", hide_env_values = true)]
    amqp: String,
    /// Seconds to wait for the broker's TCP connection and AMQP handshake; a worker that never
    /// reached its broker exits, one that lost it reconnects.
    #[arg(long, env = "FERRY_AMQP_CONNECT_TIMEOUT_SECS", default_value_t = ferry::queue::amqp::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=600))]
    amqp_connect_timeout_secs: u64,
    /// Prefix of the exchange and queue names (1-64 bytes of [A-Za-z0-9_.-]).
    #[arg(long, env = "FERRY_QUEUE_PREFIX", default_value = ferry::queue::topology::DEFAULT_PREFIX, value_parser = queue_prefix)]
    queue_prefix: String,
    /// Seconds in-flight jobs may run after SIGTERM before they are handed back (0 to 3600).
    #[arg(long, env = "FERRY_SHUTDOWN_GRACE_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=3600))]
    shutdown_grace: u64,
    /// Address of /metrics, /healthz and /readyz (`off` to disable); give each worker on one
    /// host its own port.
    #[arg(long, env = "FERRY_HTTP_ADDR", default_value = "0.0.0.0:9090", value_parser = http_addr)]
    http: HttpAddr,
    /// Do not declare the topology (it was loaded from deploy/rabbitmq/definitions.json).
    #[arg(long, env = "FERRY_NO_DECLARE")]
    no_declare: bool,
    /// Attempts before a transient failure is dead-lettered as retries_exhausted (1 to 100).
    #[arg(long, env = "FERRY_MAX_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_attempts: u32,
    /// First retry delay in milliseconds (doubles with jitter, up to --retry-max-ms).
    #[arg(long, env = "FERRY_RETRY_MIN_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    retry_min_ms: u64,
    /// Longest retry delay in milliseconds (at least --retry-min-ms).
    #[arg(long, env = "FERRY_RETRY_MAX_MS", default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    retry_max_ms: u64,
    /// Work-queue delivery limit (must match the declared queue).
    #[arg(long, env = "FERRY_DELIVERY_LIMIT", default_value_t = ferry::queue::topology::DEFAULT_DELIVERY_LIMIT, value_parser = clap::value_parser!(i64).range(1..=1000))]
    delivery_limit: i64,
}

/// `--http`: an address, or `off`.
#[derive(Clone, Copy)]
struct HttpAddr(Option<SocketAddr>);

fn http_addr(s: &str) -> Result<HttpAddr, String> {
    match s {
        "off" => Ok(HttpAddr(None)),
        addr => addr.parse().map(|a| HttpAddr(Some(a))).map_err(|e| format!("{e}: HOST:PORT or off")),
    }
}

/// Value parser of `--queue-prefix`: the library's own check, at parse time.
fn queue_prefix(s: &str) -> Result<String, String> {
    ferry::queue::topology::check_prefix(s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let migrate = args.common.migrate_config();
    let cfg = FleetConfig {
        store_url: args.common.store.clone(),
        layout: args.common.layout,
        worker: WorkerConfig {
            amqp_url: args.amqp,
            connect_timeout: Duration::from_secs(args.amqp_connect_timeout_secs),
            topology: Topology::checked(&args.queue_prefix, args.delivery_limit).context("topology")?,
            concurrency: u16::try_from(args.common.concurrency).context("--concurrency")?,
            shutdown_grace: Duration::from_secs(args.shutdown_grace),
            declare: !args.no_declare,
            worker_id: migrate.worker_id.clone(),
        },
        migrate,
        retry: RetryPolicy {
            max_attempts: args.max_attempts,
            min_delay: Duration::from_millis(args.retry_min_ms),
            max_delay: Duration::from_millis(args.retry_max_ms),
        },
        memory_budget: args.common.memory_budget_mib << 20,
        http: args.http.0,
    };
    ferry::queue::worker::run(cfg, shutdown_signal()).await.context("worker failed")?;
    Ok(ExitCode::SUCCESS)
}

/// Settings every mode shares.
#[derive(Args, Clone)]
struct MigrateArgs {
    /// Store URL: sqlite:PATH or postgres://... (required: no default store).
    #[arg(long, env = "FERRY_STORE", hide_env_values = true)]
    store: String,
    /// Which rows the store holds: ferry (its own keyspace in one kv table) or rivet (a rivet
    /// engine's own universaldb rows, on postgres://...?schema=X; ferry's records in
    /// X.ferry_kv).
    #[arg(long, env = "FERRY_LAYOUT", value_enum, default_value_t = Layout::Ferry)]
    layout: Layout,
    /// Jobs worked on at once (1 to 1024).
    #[arg(long, env = "FERRY_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,
    /// Bytes of v1 data in flight across jobs, in MiB (at least 1).
    #[arg(long, env = "FERRY_MEMORY_BUDGET_MIB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    memory_budget_mib: u64,
    /// Largest main file migrated, in MiB (bigger is dead-lettered as oversize).
    #[arg(long, env = "FERRY_MAX_SIZE_MIB", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    max_size_mib: u64,
    /// Skip PRAGMA quick_check (on by default).
    #[arg(long, env = "FERRY_NO_QUICK_CHECK")]
    no_quick_check: bool,
    /// Name of this worker in leases, audits and dead letters (default: host-pid).
    #[arg(long, env = "FERRY_WORKER_ID")]
    worker_id: Option<String>,
    /// Lease time to live, in seconds (1 to 86400).
    #[arg(long, env = "FERRY_LEASE_TTL_SECS", default_value_t = 60, value_parser = clap::value_parser!(i64).range(1..=86_400))]
    lease_ttl_secs: i64,
    /// Longest wait, in milliseconds, for small actors ready at about the same time to commit
    /// together in one store transaction (0 to 1000; a group that holds every job that could
    /// join it commits at once).
    #[arg(long, env = "FERRY_GROUP_WAIT_MS", default_value_t = ferry::store::group::DEFAULT_GROUP_WAIT.as_millis() as u64, value_parser = clap::value_parser!(u64).range(0..=1000))]
    group_wait_ms: u64,
    /// Most small actors committed in one store transaction (1 turns grouping off; 1 to 1024).
    /// A group also stays under the store's 10 MB transaction limit.
    #[arg(long, env = "FERRY_GROUP_MAX", default_value_t = ferry::store::group::DEFAULT_GROUP_MAX as u64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    group_max: u64,
}

impl MigrateArgs {
    fn migrate_config(&self) -> MigrateConfig {
        MigrateConfig {
            worker_id: self.worker_id.clone().unwrap_or_else(default_worker_id),
            max_size: self.max_size_mib << 20,
            lease_ttl_ms: self.lease_ttl_secs * 1000,
            quick_check: !self.no_quick_check,
            group: GroupConfig {
                max_wait: Duration::from_millis(self.group_wait_ms),
                // At most 1024 (the parser's range).
                max_txns: usize::try_from(self.group_max).unwrap_or(1),
            },
            ..MigrateConfig::default()
        }
    }
}

#[derive(Args)]
struct LocalArgs {
    #[command(flatten)]
    common: MigrateArgs,
    /// When the store has no v1 data, first generate a demo keyspace of N actors.
    #[arg(long, env = "FERRY_SEED_DEMO", value_parser = clap::value_parser!(u64).range(1..))]
    seed_demo: Option<u64>,
    /// Run actors dead-lettered by an earlier run again (default: leave them for triage).
    #[arg(long, env = "FERRY_RETRY_DEAD")]
    retry_dead: bool,
    /// Print the summary as JSON.
    #[arg(long, env = "FERRY_JSON")]
    json: bool,
}

async fn local(args: LocalArgs) -> anyhow::Result<ExitCode> {
    let cfg = LocalConfig {
        store_url: args.common.store.clone(),
        layout: args.common.layout,
        concurrency: usize::try_from(args.common.concurrency).context("--concurrency")?,
        seed_demo: args.seed_demo,
        migrate: args.common.migrate_config(),
        memory_budget: args.common.memory_budget_mib << 20,
        retry_dead: args.retry_dead,
        ..LocalConfig::default()
    };
    let summary = run_local(cfg, shutdown_signal()).await.context("embedded run failed")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", summary.table());
    }
    Ok(if summary.completed { ExitCode::SUCCESS } else { ExitCode::from(130) })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Command::Run(run) = &cli.command
        && run.retry_max_ms < run.retry_min_ms
    {
        Cli::command()
            .error(
                ErrorKind::ArgumentConflict,
                format!("--retry-max-ms {} is below --retry-min-ms {}", run.retry_max_ms, run.retry_min_ms),
            )
            .exit();
    }
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Local(args) => local(args).await,
        Command::Run(args) => run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[path = "../../tests/src/cli_check.rs"]
mod ferry_cli_check;

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::{Cli, ferry_cli_check};

    #[test]
    fn every_flag_reads_an_env_variable_and_has_help() {
        assert!(ferry_cli_check::count(&Cli::command()) > 20, "{}", ferry_cli_check::count(&Cli::command()));
        let missing = ferry_cli_check::missing_env_or_help(&Cli::command());
        assert!(missing.is_empty(), "args without an env variable or help: {missing:#?}");
    }

    #[test]
    fn secret_bearing_flags_never_print_their_env_values() {
        let shown = ferry_cli_check::secret_env_values_shown(&Cli::command());
        assert!(shown.is_empty(), "secret flags whose env value --help would print: {shown:?}");
    }

    #[test]
    fn the_command_tree_is_valid() {
        Cli::command().debug_assert();
    }
}
