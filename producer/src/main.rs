//! `ferry-producer`: everything before and around a campaign: generating and importing v1
//! data, the census, enqueueing jobs, status, dead-letter triage and verification. Thin: parse
//! flags and env, set up logging, call the library, report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use ferry::campaign::CampaignFilters;
use ferry::progress::Progress;
use ferry::queue::Topology;
use ferry::queue::enqueue::{EnqueueConfig, enqueue};
use ferry::queue::topology;
use ferry::store;
use ferry::synth::keyspace::{Mix, SeedConfig, plan, seed};
use ferry::telemetry::{LogFormat, init_tracing, shutdown_signal};

#[derive(Parser)]
#[command(name = "ferry-producer", version, about = "Plan, enqueue and triage ferry campaigns")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value = "pretty", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a realistic synthetic v1 keyspace of real SQLite databases.
    Seed(SeedArgs),
    /// Load real SQLite files (and their sidecars) from a directory into the v1 layout.
    Import(ImportArgs),
    /// Census of the keyspace before a campaign: sizes and predicted outcomes (no broker).
    Scan(ScanArgs),
    /// Publish one job per actor for a campaign (resumable).
    Enqueue(EnqueueArgs),
    /// Queue depths, outcome counts, rate and ETA of a campaign.
    Status(StatusArgs),
}

#[derive(Args)]
struct BrokerArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "FERRY_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// Prefix of the exchange and queue names.
    #[arg(long, env = "FERRY_QUEUE_PREFIX", default_value = topology::DEFAULT_PREFIX)]
    queue_prefix: String,
    /// Work-queue delivery limit (must match the workers').
    #[arg(long, env = "FERRY_DELIVERY_LIMIT", default_value_t = topology::DEFAULT_DELIVERY_LIMIT)]
    delivery_limit: i64,
}

impl BrokerArgs {
    fn topology(&self) -> Topology {
        Topology { prefix: self.queue_prefix.clone(), delivery_limit: self.delivery_limit }
    }
}

#[derive(Args)]
struct ScanArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Only actors whose id starts with this.
    #[arg(long)]
    prefix: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EnqueueArgs {
    #[command(flatten)]
    store: StoreArg,
    #[command(flatten)]
    broker: BrokerArgs,
    /// Campaign name (also the resume key: the same name resumes).
    #[arg(long, env = "FERRY_CAMPAIGN")]
    campaign: String,
    /// Only actors whose id starts with this.
    #[arg(long)]
    prefix: Option<String>,
    /// Only the actor ids in this file (one per line).
    #[arg(long)]
    ids_file: Option<PathBuf>,
    /// Publish at most this many jobs.
    #[arg(long)]
    limit: Option<u64>,
    /// Also enqueue actors whose v2 is already migrated or native.
    #[arg(long)]
    include_migrated: bool,
    /// Jobs per second at most.
    #[arg(long, env = "FERRY_ENQUEUE_RATE")]
    rate: Option<f64>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    store: StoreArg,
    #[command(flatten)]
    broker: BrokerArgs,
    #[arg(long, env = "FERRY_CAMPAIGN")]
    campaign: Option<String>,
    #[arg(long)]
    json: bool,
}

async fn scan_cmd(args: ScanArgs) -> anyhow::Result<ExitCode> {
    let store = store::open(&args.store.store, 2).await.context("opening the store")?;
    let progress = Progress::new("scanning", None);
    let census = ferry::census::census(&*store, args.prefix.as_deref(), || progress.inc(1)).await?;
    progress.finish();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&census)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("census of {}", store.describe());
    println!("  actors under v1/            {:>12}", census.actors);
    println!("  with v1 SQLite data         {:>12}", census.with_v1_sqlite);
    println!("  invalid actor ids           {:>12}", census.invalid_actor_ids);
    println!("  v1 main bytes               {:>12.1} MiB", census.total_v1_bytes as f64 / 1048576.0);
    if let Some((actor, size)) = &census.largest {
        println!("  largest                     {actor} ({:.1} MiB)", *size as f64 / 1048576.0);
    }
    println!("size histogram");
    for (_, name) in ferry::census::SIZE_BUCKETS {
        println!("  {name:<27} {:>12}", census.size_histogram.get(name).copied().unwrap_or(0));
    }
    println!("predicted outcomes");
    for (outcome, n) in &census.predicted {
        let mib = census.predicted_bytes.get(outcome).copied().unwrap_or(0) as f64 / 1048576.0;
        println!("  {outcome:<27} {n:>12}   {mib:>10.1} MiB");
    }
    println!("note: {}", census.note);
    Ok(ExitCode::SUCCESS)
}

async fn enqueue_cmd(args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let ids = match &args.ids_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let mut ids = Vec::new();
            for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                ids.push(ferry::ActorId::parse(line.trim()).with_context(|| format!("{}:{}", path.display(), n + 1))?);
            }
            Some(ids)
        }
        None => None,
    };
    let cfg = EnqueueConfig {
        store_url: args.store.store,
        amqp_url: args.broker.amqp.clone(),
        topology: args.broker.topology(),
        campaign: args.campaign,
        filters: CampaignFilters {
            actor_prefix: args.prefix,
            ids_file: args.ids_file.map(|p| p.display().to_string()),
            limit: args.limit,
            include_migrated: args.include_migrated,
        },
        ids,
        rate: args.rate,
        recovery: None,
        progress: !args.json,
    };
    let summary = enqueue(cfg, shutdown_signal()).await.context("enqueue failed")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "campaign {}{}: published {} jobs ({:.0}/s), skipped {} without v1, {} already migrated, {} invalid ids{}",
            summary.campaign,
            if summary.resumed { " (resumed)" } else { "" },
            summary.published,
            summary.jobs_per_second,
            summary.skipped_no_v1,
            summary.skipped_migrated,
            summary.skipped_invalid_id,
            if summary.completed { "" } else { "; INTERRUPTED, run again to resume" },
        );
    }
    Ok(if summary.completed { ExitCode::SUCCESS } else { ExitCode::from(130) })
}

async fn status_cmd(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let store = store::open(&args.store.store, 2).await.context("opening the store")?;
    let s = ferry::queue::status::status(&*store, &args.broker.amqp, &args.broker.topology(), args.campaign.as_deref())
        .await
        .context("status")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("campaign {}", s.campaign.as_deref().unwrap_or("(all)"));
    println!("queues");
    for q in std::iter::once(&s.work).chain(&s.retry).chain(std::iter::once(&s.dead)) {
        println!("  {:<32} {:>10} messages {:>4} consumers", q.name, q.messages, q.consumers);
    }
    println!("outcomes");
    for (k, v) in &s.outcomes {
        println!("  {k:<32} {v:>10}");
    }
    for (k, v) in &s.dead_letters {
        println!("  dead letter: {k:<19} {v:>10}");
    }
    if let Some(n) = s.enqueued {
        println!("  enqueued                         {n:>10}");
    }
    println!(
        "rate {:.1} jobs/s (last 5 min), ETA {}",
        s.rate_per_second,
        s.eta_seconds.map_or("unknown".into(), |e| format!("{:.0} s", e))
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
struct StoreArg {
    /// Store URL: sqlite:PATH or postgres://...
    #[arg(long, env = "FERRY_STORE", default_value = "sqlite:./ferry.db")]
    store: String,
}

#[derive(Args)]
struct SeedArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Number of actors.
    #[arg(long, env = "FERRY_SEED_ACTORS")]
    actors: u64,
    /// Random seed: the same seed gives the same keyspace.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Hard-case shares, e.g. journal=0.02,wal=0.01 (or `default`, `none`).
    #[arg(long, default_value = "default")]
    mix: String,
    /// Largest database of the long tail, in MiB.
    #[arg(long, default_value_t = 16)]
    max_mib: u64,
    /// Share of actors in the long tail (over 1 MiB).
    #[arg(long, default_value_t = 0.01)]
    large_share: f64,
    /// Actor id prefix.
    #[arg(long, default_value = "actor")]
    prefix: String,
    /// Write each actor's planted case and expected outcome to this JSON file.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ImportArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Directory of SQLite files; actor id = file name without extension.
    dir: PathBuf,
    #[arg(long)]
    json: bool,
}

async fn seed_cmd(args: SeedArgs) -> anyhow::Result<ExitCode> {
    let mix = Mix::parse(&args.mix).map_err(anyhow::Error::msg).context("--mix")?;
    if ferry::ActorId::parse(&format!("{}-0000000", args.prefix)).is_err() {
        bail!("--prefix {:?}: actor ids are [A-Za-z0-9_-], at most 64 bytes", args.prefix);
    }
    let cfg = SeedConfig {
        actors: args.actors,
        seed: args.seed,
        mix,
        max_mib: args.max_mib,
        large_share: args.large_share,
        prefix: args.prefix,
        ..SeedConfig::default()
    };
    let store = store::open(&args.store.store, 2).await.context("opening the store")?;
    if let Some(path) = &args.manifest {
        let manifest: Vec<_> = plan(&cfg)
            .iter()
            .map(|a| serde_json::json!({"actor_id": a.id, "case": a.case, "expected": a.case.expected()}))
            .collect();
        std::fs::write(path, serde_json::to_vec_pretty(&manifest)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let progress = Progress::new("seeding", Some(cfg.actors));
    let mut last = 0;
    let report = seed(&*store, &cfg, |n| {
        progress.inc(n - last);
        last = n;
    })
    .await
    .map_err(anyhow::Error::msg)
    .context("seeding")?;
    progress.finish();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "seeded {} actors ({:.1} MiB of v1 main files) in {:.1} s into {}",
            report.actors,
            report.v1_bytes as f64 / 1048576.0,
            report.seconds,
            store.describe()
        );
        for (case, n) in &report.by_case {
            println!("  {case:<16} {n:>8}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn import_cmd(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let store = store::open(&args.store.store, 2).await.context("opening the store")?;
    let imported = ferry::import::import_dir(&*store, &args.dir).await.map_err(anyhow::Error::msg)?;
    let failed = imported.iter().filter(|i| i.error.is_some()).count();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&imported)?);
    } else {
        for i in &imported {
            match (&i.actor, &i.error) {
                (Some(actor), None) => println!("imported {actor}: {} bytes {}", i.bytes, i.sidecars.join(" ")),
                (_, Some(e)) => println!("skipped {}: {e}", i.path.display()),
                (None, None) => {}
            }
        }
        println!("{} imported, {failed} skipped", imported.len() - failed);
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Seed(args) => seed_cmd(args).await,
        Command::Import(args) => import_cmd(args).await,
        Command::Scan(args) => scan_cmd(args).await,
        Command::Enqueue(args) => enqueue_cmd(args).await,
        Command::Status(args) => status_cmd(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-producer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
