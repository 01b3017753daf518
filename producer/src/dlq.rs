//! `dlq`: dead-letter triage (summary, list, show, requeue with a recovery, export, purge) on
//! the broker's dead queue or the embedded `ferry/dead/` records; the library does the moving,
//! this file the flags and the printing.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ferry::store;
use ferry::triage::{self, Filter, Source};

use crate::args::{BrokerArgs, StoreArg};

#[derive(Args)]
pub struct DlqArgs {
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Work on the embedded dead letters under ferry/dead/ instead of the broker's queue.
    #[arg(long, global = true)]
    pub embedded: bool,
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Args, Clone)]
pub struct DlqFilter {
    /// Only dead letters with this reason.
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this campaign's.
    #[arg(long)]
    pub campaign: Option<String>,
}

#[derive(Subcommand)]
pub enum DlqCommand {
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

pub fn dlq_filter(f: &DlqFilter, actors: Vec<String>) -> anyhow::Result<Filter> {
    let reason = match &f.reason {
        Some(r) => Some(ferry::DeadLetterReason::parse(r).with_context(|| format!("unknown reason {r:?}"))?),
        None => None,
    };
    Ok(Filter { reason, actors, campaign: f.campaign.clone() })
}

pub fn when(ms: i64) -> String {
    format!("{:.0}s ago", (ferry::clock::Clock::now_ms(&ferry::clock::SystemClock) - ms).max(0) as f64 / 1000.0)
}

pub async fn dlq_cmd(args: DlqArgs) -> anyhow::Result<ExitCode> {
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
