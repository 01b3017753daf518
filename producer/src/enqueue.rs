//! `enqueue`: publish one job per actor of a campaign (resumable from its checkpoint); the
//! library scans, publishes and checkpoints, this file reads the flags and prints the summary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use ferry::campaign::CampaignFilters;
use ferry::queue::enqueue::{EnqueueConfig, enqueue};
use ferry::telemetry::shutdown_signal;

use crate::args::{BrokerArgs, StoreArg};

#[derive(Args)]
#[command(after_help = crate::exit::AFTER_HELP)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Campaign name (also the resume key: the same name resumes).
    #[arg(long, env = "FERRY_CAMPAIGN")]
    pub campaign: String,
    /// Only actors whose id starts with this.
    #[arg(long, env = "FERRY_ACTOR_PREFIX")]
    pub prefix: Option<String>,
    /// Only the actor ids in this file (one per line).
    #[arg(long, env = "FERRY_IDS_FILE")]
    pub ids_file: Option<PathBuf>,
    /// Publish at most this many jobs.
    #[arg(long, env = "FERRY_ENQUEUE_LIMIT", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Also enqueue actors whose v2 is already migrated or native.
    #[arg(long, env = "FERRY_INCLUDE_MIGRATED")]
    pub include_migrated: bool,
    /// Jobs per second at most (above 0; default: unlimited).
    #[arg(long, env = "FERRY_ENQUEUE_RATE", value_parser = crate::args::positive_f64)]
    pub rate: Option<f64>,
    /// Seconds the store and broker may keep failing transiently (reconnecting, resuming from
    /// the checkpoint) with no progress before enqueue gives up; 0 gives up at the first error.
    #[arg(long, env = "FERRY_ENQUEUE_RETRY_BUDGET_SECS", default_value_t = ferry::queue::enqueue::DEFAULT_RETRY_BUDGET.as_secs())]
    pub retry_budget_secs: u64,
    /// Print the summary as JSON.
    #[arg(long, env = "FERRY_JSON")]
    pub json: bool,
}

pub async fn enqueue_cmd(args: EnqueueArgs) -> anyhow::Result<ExitCode> {
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
        layout: args.store.layout,
        amqp_url: args.broker.amqp.clone(),
        amqp_connect_timeout: args.broker.connect_timeout(),
        topology: args.broker.topology.topology()?,
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
        retry_budget: std::time::Duration::from_secs(args.retry_budget_secs),
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
    Ok(if summary.completed { ExitCode::SUCCESS } else { ExitCode::from(crate::exit::INTERRUPTED) })
}
