//! `ferry-worker`: migrates actors. `local` runs a whole campaign in one process against the
//! store (embedded mode); `run` consumes jobs from RabbitMQ. Thin: parse flags and env, set up
//! logging, call the library, report.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry::embedded::{LocalConfig, run_local};
use ferry::jobs::RetryPolicy;
use ferry::migrate::MigrateConfig;
use ferry::queue::Topology;
use ferry::queue::worker::{FleetConfig, WorkerConfig};
use ferry::telemetry::{LogFormat, default_worker_id, init_tracing, shutdown_signal};

#[derive(Parser)]
#[command(name = "ferry-worker", version, about = "Migrate actor SQLite databases from v1 to v2")]
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
    /// RabbitMQ URL.
    #[arg(long, env = "FERRY_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// Prefix of the exchange and queue names.
    #[arg(long, env = "FERRY_QUEUE_PREFIX", default_value = ferry::queue::topology::DEFAULT_PREFIX)]
    queue_prefix: String,
    /// Seconds in-flight jobs may run after SIGTERM before they are handed back.
    #[arg(long, env = "FERRY_SHUTDOWN_GRACE_SECS", default_value_t = 60)]
    shutdown_grace: u64,
    /// Address of /metrics, /healthz and /readyz (`off` to disable).
    #[arg(long, env = "FERRY_HTTP_ADDR", default_value = "0.0.0.0:9090")]
    http: String,
    /// Do not declare the topology (it was loaded from deploy/rabbitmq/definitions.json).
    #[arg(long, env = "FERRY_NO_DECLARE")]
    no_declare: bool,
    /// Attempts before a transient failure is dead-lettered as retries_exhausted.
    #[arg(long, env = "FERRY_MAX_ATTEMPTS", default_value_t = 8)]
    max_attempts: u32,
    /// First retry delay in milliseconds (doubles with jitter, up to --retry-max-ms).
    #[arg(long, env = "FERRY_RETRY_MIN_MS", default_value_t = 1000)]
    retry_min_ms: u64,
    #[arg(long, env = "FERRY_RETRY_MAX_MS", default_value_t = 120_000)]
    retry_max_ms: u64,
    /// Work-queue delivery limit (must match the declared queue).
    #[arg(long, env = "FERRY_DELIVERY_LIMIT", default_value_t = ferry::queue::topology::DEFAULT_DELIVERY_LIMIT)]
    delivery_limit: i64,
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let http = match args.http.as_str() {
        "off" | "" => None,
        addr => Some(addr.parse().with_context(|| format!("--http {addr}"))?),
    };
    let migrate = args.common.migrate_config();
    let cfg = FleetConfig {
        store_url: args.common.store.clone(),
        worker: WorkerConfig {
            amqp_url: args.amqp,
            topology: Topology { prefix: args.queue_prefix, delivery_limit: args.delivery_limit },
            concurrency: u16::try_from(args.common.concurrency.max(1)).context("--concurrency")?,
            shutdown_grace: Duration::from_secs(args.shutdown_grace),
            declare: !args.no_declare,
            worker_id: migrate.worker_id.clone(),
        },
        migrate,
        retry: RetryPolicy {
            max_attempts: args.max_attempts.max(1),
            min_delay: Duration::from_millis(args.retry_min_ms),
            max_delay: Duration::from_millis(args.retry_max_ms.max(args.retry_min_ms)),
        },
        memory_budget: args.common.memory_budget_mib << 20,
        http,
    };
    ferry::queue::worker::run(cfg, shutdown_signal()).await.context("worker failed")?;
    Ok(ExitCode::SUCCESS)
}

/// Settings every mode shares.
#[derive(Args, Clone)]
struct MigrateArgs {
    /// Store URL: sqlite:PATH or postgres://...
    #[arg(long, env = "FERRY_STORE", default_value = "sqlite:./ferry.db")]
    store: String,
    /// Jobs worked on at once.
    #[arg(long, env = "FERRY_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,
    /// Bytes of v1 data in flight across jobs, in MiB.
    #[arg(long, env = "FERRY_MEMORY_BUDGET_MIB", default_value_t = 1024)]
    memory_budget_mib: u64,
    /// Largest main file migrated, in MiB (bigger is dead-lettered as oversize).
    #[arg(long, env = "FERRY_MAX_SIZE_MIB", default_value_t = 128)]
    max_size_mib: u64,
    /// Skip PRAGMA quick_check (on by default).
    #[arg(long, env = "FERRY_NO_QUICK_CHECK")]
    no_quick_check: bool,
    /// Name of this worker in leases, audits and dead letters (default: host-pid).
    #[arg(long, env = "FERRY_WORKER_ID")]
    worker_id: Option<String>,
    /// Lease time to live, in seconds.
    #[arg(long, env = "FERRY_LEASE_TTL_SECS", default_value_t = 60)]
    lease_ttl_secs: i64,
}

impl MigrateArgs {
    fn migrate_config(&self) -> MigrateConfig {
        MigrateConfig {
            worker_id: self.worker_id.clone().unwrap_or_else(default_worker_id),
            max_size: self.max_size_mib << 20,
            lease_ttl_ms: self.lease_ttl_secs * 1000,
            quick_check: !self.no_quick_check,
            ..MigrateConfig::default()
        }
    }
}

#[derive(Args)]
struct LocalArgs {
    #[command(flatten)]
    common: MigrateArgs,
    /// When the store has no v1 data, first generate a demo keyspace of N actors.
    #[arg(long, env = "FERRY_SEED_DEMO")]
    seed_demo: Option<u64>,
    /// Run actors dead-lettered by an earlier run again (default: leave them for triage).
    #[arg(long)]
    retry_dead: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

async fn local(args: LocalArgs) -> anyhow::Result<ExitCode> {
    let cfg = LocalConfig {
        store_url: args.common.store.clone(),
        concurrency: args.common.concurrency,
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
    let cli = Cli::parse();
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
