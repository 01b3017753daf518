//! `dlq`: dead-letter triage (summary, list, show, requeue with a recovery, export, purge) on
//! the broker's dead queue or the embedded `ferry/dead/` records; the library does the moving,
//! this file the flags and the printing.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry::store;
use ferry::triage::{self, Filter, Source};

use crate::args::{GlobalBrokerArgs, GlobalStoreArg};

#[derive(Args)]
#[command(after_help = crate::exit::AFTER_HELP)]
pub struct DlqArgs {
    #[command(flatten)]
    pub store: GlobalStoreArg,
    #[command(flatten)]
    pub broker: GlobalBrokerArgs,
    /// Work on the embedded dead letters under ferry/dead/ instead of the broker's queue.
    #[arg(long, env = "FERRY_DLQ_EMBEDDED", global = true)]
    pub embedded: bool,
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Args, Clone)]
pub struct DlqFilter {
    /// Only dead letters with this reason.
    #[arg(long, env = "FERRY_DLQ_REASON")]
    pub reason: Option<String>,
    /// Only this campaign's.
    #[arg(long, env = "FERRY_CAMPAIGN")]
    pub campaign: Option<String>,
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Dead letters grouped by reason and campaign.
    Summary {
        /// Print the summary as JSON.
        #[arg(long, env = "FERRY_JSON")]
        json: bool,
    },
    /// One line per dead letter.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// List at most this many.
        #[arg(long, env = "FERRY_DLQ_LIMIT", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Print the list as JSON.
        #[arg(long, env = "FERRY_JSON")]
        json: bool,
    },
    /// Everything known about one actor's dead letter, and its state in the store now
    /// (exit 4 when the actor has no dead letter).
    Show {
        /// The actor id.
        #[arg(env = "FERRY_ACTOR")]
        actor: String,
    },
    /// Move dead letters back to work (embedded: re-run them), optionally with a recovery
    /// (exit 4 when nothing was requeued).
    Requeue {
        #[command(flatten)]
        filter: DlqFilter,
        /// Actors to requeue (default: every dead letter the filter selects).
        #[arg(env = "FERRY_DLQ_ACTORS", value_delimiter = ',')]
        actors: Vec<String>,
        /// rollback_journal, checkpoint_wal, discard_shm or force.
        #[arg(long, env = "FERRY_DLQ_RECOVERY")]
        recovery: Option<String>,
        /// Requeue even when the recovery does not fit the reason.
        #[arg(long, env = "FERRY_DLQ_FORCE")]
        force: bool,
        /// Print what was requeued as JSON.
        #[arg(long, env = "FERRY_JSON")]
        json: bool,
    },
    /// Print dead letters for tickets and spreadsheets.
    Export {
        #[command(flatten)]
        filter: DlqFilter,
        /// Output format.
        #[arg(long, env = "FERRY_DLQ_FORMAT", value_parser = ["json", "csv"], default_value = "json")]
        format: String,
    },
    /// Drop dead letters (noted in each actor's audit record).
    Purge {
        #[command(flatten)]
        filter: DlqFilter,
        /// Confirm the purge.
        #[arg(long, env = "FERRY_DLQ_YES")]
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
    // Every missing or bad setting is reported before anything is opened.
    let url = args.store.url()?;
    let source = if args.embedded {
        Source::Embedded
    } else {
        Source::Broker {
            amqp_url: args.broker.amqp()?.to_string(),
            topology: args.broker.topology.topology()?,
            connect_timeout: args.broker.connect_timeout(),
        }
    };
    let store = store::open_existing(url, 2).await.context("opening the store")?;
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
            letters.truncate(limit.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX)));
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
            if state.dead_letters.is_empty() {
                let known = if state.audit.is_some() || state.v2_head.is_some() || state.v1_files.main.is_some() {
                    "its state in the store is printed above"
                } else {
                    "the store has no v1, v2 or audit record of it either"
                };
                return Ok(crate::exit::nothing(format_args!("actor {actor} has no dead letter ({known})")));
            }
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
            if done.actors.is_empty() {
                return Ok(crate::exit::nothing(if done.skipped.is_empty() {
                    "no dead letter matched: nothing requeued".to_string()
                } else {
                    format!("every matching dead letter was skipped ({}): nothing requeued", done.skipped.len())
                }));
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
                return Err(crate::exit::Usage("purge drops dead letters for good: add --yes to confirm".into()).into());
            }
            let n = triage::purge(&store, &source, &dlq_filter(&filter, vec![])?).await?;
            println!("purged {n} dead letters (noted in each actor's audit record)");
        }
    }
    Ok(ExitCode::SUCCESS)
}
