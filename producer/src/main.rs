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
use ferry::triage::{self, Filter, Source};
use ferry::verify::Selection;

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
    /// Dead-letter triage: summary, list, show, requeue with a recovery, export, purge.
    Dlq(DlqArgs),
    /// Rebuild migrated actors from v2 and compare with v1 and the migration's checksum.
    Verify(VerifyArgs),
    /// Print the RabbitMQ definitions (topology, worker user and permissions) for deploy/.
    Definitions(DefinitionsArgs),
}

#[derive(Args)]
struct DefinitionsArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Virtual host.
    #[arg(long, default_value = "/")]
    vhost: String,
    /// Password hash (`rabbitmqctl hash_password`) of the ferry-worker user; empty: no
    /// password, the user cannot log in until `rabbitmqctl change_password`.
    #[arg(long, env = "FERRY_WORKER_PASSWORD_HASH", default_value = "", hide_env_values = true)]
    worker_password_hash: String,
    /// Password hash of the ferry-operator user (producer, triage that moves); empty: none.
    #[arg(long, env = "FERRY_OPERATOR_PASSWORD_HASH", default_value = "", hide_env_values = true)]
    operator_password_hash: String,
    /// Password hash of the read-only ferry-triage user; empty: none.
    #[arg(long, env = "FERRY_TRIAGE_PASSWORD_HASH", default_value = "", hide_env_values = true)]
    triage_password_hash: String,
    /// Password hash of the ferry-monitor user (KEDA, management API); empty: none.
    #[arg(long, env = "FERRY_MONITOR_PASSWORD_HASH", default_value = "", hide_env_values = true)]
    monitor_password_hash: String,
}

#[derive(Args)]
struct DlqArgs {
    #[command(flatten)]
    store: StoreArg,
    #[command(flatten)]
    broker: BrokerArgs,
    /// Work on the embedded dead letters under ferry/dead/ instead of the broker's queue.
    #[arg(long, global = true)]
    embedded: bool,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Args, Clone)]
struct DlqFilter {
    /// Only dead letters with this reason.
    #[arg(long)]
    reason: Option<String>,
    /// Only this campaign's.
    #[arg(long)]
    campaign: Option<String>,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Dead letters grouped by reason and campaign.
    Summary {
        #[arg(long)]
        json: bool,
    },
    /// One line per dead letter.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Everything known about one actor's dead letter, and its state in the store now.
    Show { actor: String },
    /// Move dead letters back to work (embedded: re-run them), optionally with a recovery.
    Requeue {
        #[command(flatten)]
        filter: DlqFilter,
        /// Actors to requeue (default: every dead letter the filter selects).
        actors: Vec<String>,
        /// rollback_journal, checkpoint_wal, discard_shm or force.
        #[arg(long)]
        recovery: Option<String>,
        /// Requeue even when the recovery does not fit the reason.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print dead letters for tickets and spreadsheets.
    Export {
        #[command(flatten)]
        filter: DlqFilter,
        #[arg(long, value_parser = ["json", "csv"], default_value = "json")]
        format: String,
    },
    /// Drop dead letters (noted in each actor's audit record).
    Purge {
        #[command(flatten)]
        filter: DlqFilter,
        /// Confirm the purge.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Only this campaign's migrated actors.
    #[arg(long, conflicts_with = "actor")]
    campaign: Option<String>,
    /// Only these actors.
    #[arg(long)]
    actor: Vec<String>,
    #[arg(long)]
    json: bool,
}

fn dlq_filter(f: &DlqFilter, actors: Vec<String>) -> anyhow::Result<Filter> {
    let reason = match &f.reason {
        Some(r) => Some(ferry::DeadLetterReason::parse(r).with_context(|| format!("unknown reason {r:?}"))?),
        None => None,
    };
    Ok(Filter { reason, actors, campaign: f.campaign.clone() })
}

fn when(ms: i64) -> String {
    format!("{:.0}s ago", (ferry::clock::Clock::now_ms(&ferry::clock::SystemClock) - ms).max(0) as f64 / 1000.0)
}

async fn dlq_cmd(args: DlqArgs) -> anyhow::Result<ExitCode> {
    let store = store::open(&args.store.store, 2).await.context("opening the store")?;
    let source = if args.embedded {
        Source::Embedded
    } else {
        Source::Broker { amqp_url: args.broker.amqp.clone(), topology: args.broker.topology() }
    };
    match args.command {
        DlqCommand::Summary { json } => {
            let letters = triage::list(&store, &source, &Filter::default()).await?;
            let groups = triage::summarize(&letters);
            if json {
                println!("{}", serde_json::to_string_pretty(&groups)?);
            } else {
                println!(
                    "{:<24} {:<20} {:>8} {:>8} {:>12} {:>12} {:>12}",
                    "reason", "campaign", "letters", "actors", "oldest", "newest", "v1 MiB"
                );
                for g in &groups {
                    println!(
                        "{:<24} {:<20} {:>8} {:>8} {:>12} {:>12} {:>12.1}",
                        g.reason,
                        g.campaign,
                        g.count,
                        g.actors,
                        when(g.oldest_ms),
                        when(g.newest_ms),
                        g.v1_bytes as f64 / 1048576.0
                    );
                }
                println!("{} dead letters", letters.len());
            }
        }
        DlqCommand::List { filter, limit, json } => {
            let mut letters = triage::list(&store, &source, &dlq_filter(&filter, vec![])?).await?;
            letters.truncate(limit.unwrap_or(usize::MAX));
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                for d in &letters {
                    let size = d.v1_files.as_ref().and_then(|f| f.main).map_or("-".into(), |n| n.to_string());
                    println!(
                        "{:<24} {:<20} {:<24} attempts={} main={} {}",
                        d.actor_id, d.campaign, d.reason, d.attempts, size, d.error
                    );
                }
            }
        }
        DlqCommand::Show { actor } => {
            let actor = ferry::ActorId::parse(&actor).context("actor id")?;
            let state = triage::show(&store, &source, &actor).await?;
            println!("{}", serde_json::to_string_pretty(&state)?);
        }
        DlqCommand::Requeue { filter, actors, recovery, force, json } => {
            let recovery = match recovery {
                Some(r) => Some(r.parse::<ferry::Recovery>().map_err(anyhow::Error::msg)?),
                None => None,
            };
            let done = triage::requeue(&store, &source, &dlq_filter(&filter, actors)?, recovery, force).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                println!("requeued {} actors ({} dead letters removed)", done.actors.len(), done.dead_letters_removed);
                for (actor, outcome) in &done.outcomes {
                    println!("  {actor}: {outcome}");
                }
                for why in &done.skipped {
                    println!("  skipped {why}");
                }
            }
        }
        DlqCommand::Export { filter, format } => {
            let letters = triage::list(&store, &source, &dlq_filter(&filter, vec![])?).await?;
            if format == "csv" {
                print!("{}", triage::to_csv(&letters));
            } else {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            }
        }
        DlqCommand::Purge { filter, yes } => {
            if !yes {
                bail!("purge drops dead letters for good: add --yes to confirm");
            }
            let n = triage::purge(&store, &source, &dlq_filter(&filter, vec![])?).await?;
            println!("purged {n} dead letters (noted in each actor's audit record)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify_cmd(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let store = store::open(&args.store.store, 4).await.context("opening the store")?;
    let selection = match (args.campaign, args.actor.is_empty()) {
        (Some(c), _) => Selection::Campaign(c),
        (None, false) => Selection::Actors(
            args.actor
                .iter()
                .map(|a| ferry::ActorId::parse(a).with_context(|| format!("actor {a:?}")))
                .collect::<Result<_, _>>()?,
        ),
        (None, true) => Selection::All,
    };
    let progress = Progress::new("verifying", None);
    let report = ferry::verify::verify(&*store, &selection, || progress.inc(1)).await?;
    progress.finish();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("verified {} actors", report.checked);
        for (verdict, n) in &report.counts {
            println!("  {verdict:<16} {n:>10}");
        }
        for p in &report.problems {
            println!("  {} {:?}: {}", p.actor, p.verdict, p.detail.as_deref().unwrap_or(""));
        }
    }
    Ok(if report.clean() { ExitCode::SUCCESS } else { ExitCode::from(3) })
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
            "campaign {}{}: published {} jobs ({:.0}/s), skipped {} without v1, {} native v2, {} already migrated, {} invalid ids{}",
            summary.campaign,
            if summary.resumed { " (resumed)" } else { "" },
            summary.published,
            summary.jobs_per_second,
            summary.skipped_no_v1,
            summary.skipped_native_v2,
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
    /// Share of actors of 64 KiB to 1 MiB (the rest are a few pages).
    #[arg(long, default_value_t = 0.09)]
    medium_share: f64,
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
        medium_share: args.medium_share,
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
        Command::Dlq(args) => dlq_cmd(args).await,
        Command::Verify(args) => verify_cmd(args).await,
        Command::Definitions(args) => {
            let hashes = topology::PasswordHashes {
                worker: args.worker_password_hash,
                operator: args.operator_password_hash,
                triage: args.triage_password_hash,
                monitor: args.monitor_password_hash,
            };
            let defs = args.broker.topology().deploy_definitions(&args.vhost, &hashes);
            println!("{}", serde_json::to_string_pretty(&defs).unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-producer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
