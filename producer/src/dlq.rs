//! `dlq`: dead-letter triage (summary, list, show, requeue with a recovery, export, purge, sweep) on
//! the store's triage index; only a fleet requeue talks to the broker. The library does the
//! reading and the moving, this file the flags and the printing.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry::layout::{Layout, RivetId, Uuid};
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
    /// Requeue by re-running the jobs in this process (embedded mode, no broker) instead of
    /// publishing them; reads are the same either way (they read only the store).
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
    /// Only actors whose id starts with this.
    #[arg(long, env = "FERRY_DLQ_ACTOR_PREFIX", value_parser = actor_prefix)]
    pub actor_prefix: Option<String>,
}

/// Value parser of `--actor-prefix`: the library's own check, at parse time.
fn actor_prefix(s: &str) -> Result<String, String> {
    triage::index::check_actor_prefix(s).map(|()| s.to_string())
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
        /// List at most this many (a page: its cost does not grow with the backlog).
        #[arg(long, env = "FERRY_DLQ_LIMIT", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Start after this cursor (printed on stderr after a page that has more).
        #[arg(long, env = "FERRY_DLQ_AFTER", requires = "limit")]
        after: Option<String>,
        /// Print the list as JSON.
        #[arg(long, env = "FERRY_JSON")]
        json: bool,
    },
    /// Everything known about one actor's dead letter, and its state in the store now
    /// (exit 4 when the actor has no dead letter).
    Show {
        /// The actor id (--layout rivet: its 30 base36 digits, or its UUID form UUID@LABEL).
        #[arg(env = "FERRY_ACTOR")]
        actor: String,
    },
    /// Move dead letters back to work (embedded: re-run them), optionally with a recovery
    /// (exit 4 when nothing was requeued). Needs --amqp unless --embedded.
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
    /// Take out the dead letters of actors whose v2 head is now settled (migrated, by ferry or
    /// by rivet, or native), recording each one's skip in its audit unless the audit already
    /// records the migration (or the native skip); letters of any other actor are left (exit 4
    /// when none was removed and none changed meanwhile).
    Sweep {
        #[command(flatten)]
        filter: DlqFilter,
        /// Count what would be removed; write nothing.
        #[arg(long, env = "FERRY_DLQ_DRY_RUN")]
        dry_run: bool,
        /// Print the counts as JSON.
        #[arg(long, env = "FERRY_JSON")]
        json: bool,
    },
}

pub fn dlq_filter(f: &DlqFilter, actors: Vec<String>) -> anyhow::Result<Filter> {
    let reason = match &f.reason {
        Some(r) => Some(ferry::DeadLetterReason::parse(r).with_context(|| format!("unknown reason {r:?}"))?),
        None => None,
    };
    Ok(Filter { reason, actors, campaign: f.campaign.clone(), actor_prefix: f.actor_prefix.clone() })
}

/// The actor `dlq show` names: an actor id; in the rivet layout a rivet id, given as its 30
/// base36 digits or as `UUID@LABEL` (`RivetId::uuid_display`, how rivet's own tools print it).
fn show_target(given: &str, layout: Layout) -> anyhow::Result<(ferry::ActorId, Option<RivetId>)> {
    if layout == Layout::Ferry {
        return Ok((ferry::ActorId::parse(given).context("actor id")?, None));
    }
    let id = match given.split_once('@') {
        Some((uuid, label)) => {
            let uuid = Uuid::parse_str(uuid).with_context(|| format!("actor {given:?}: not a UUID before '@'"))?;
            let label = label.parse::<u16>().with_context(|| format!("actor {given:?}: the label after '@'"))?;
            RivetId::new(uuid, label)
        }
        None => RivetId::parse(given).with_context(|| {
            format!("actor {given:?} is not a rivet id (--layout rivet: 30 base36 digits or UUID@LABEL)")
        })?,
    };
    Ok((id.to_actor(), Some(id)))
}

pub fn when(ms: i64) -> String {
    format!("{:.0}s ago", (ferry::clock::Clock::now_ms(&ferry::clock::SystemClock) - ms).max(0) as f64 / 1000.0)
}

pub async fn dlq_cmd(args: DlqArgs) -> anyhow::Result<ExitCode> {
    // Every missing or bad setting is reported before anything is opened.
    args.store.url()?;
    let source = match (&args.command, args.embedded) {
        (DlqCommand::Requeue { .. }, false) => Some(Source::Broker {
            amqp_url: args.broker.amqp()?.to_string(),
            topology: args.broker.topology.topology()?,
            connect_timeout: args.broker.connect_timeout(),
        }),
        (DlqCommand::Requeue { .. }, true) => Some(Source::Embedded),
        _ => None,
    };
    let store = args.store.open_existing(4).await?;
    match args.command {
        DlqCommand::Summary { json } => print_summary(&triage::summary(&store).await?, json)?,
        DlqCommand::List { filter, limit, after, json } => {
            let filter = dlq_filter(&filter, vec![])?;
            match limit {
                Some(n) => {
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    let page = triage::page(&store, &filter, n, after.as_deref()).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&page.letters)?);
                    } else {
                        page.letters.iter().for_each(|d| print!("{}", line(d)));
                    }
                    if let Some(next) = page.next {
                        eprintln!("more: --after {next}");
                    }
                }
                None => stream(&store, &filter, if json { Format::Json } else { Format::Lines }).await?,
            }
        }
        DlqCommand::Show { actor } => {
            let (actor, rivet) = show_target(&actor, store.layout())?;
            let state = triage::show(&store, &actor).await?;
            let mut shown = serde_json::to_value(&state)?;
            if let Some(id) = rivet {
                // An operator may know the actor by either form: print both beside the state.
                shown["rivet_id"] = id.to_string().into();
                shown["rivet_uuid"] = id.uuid_display().into();
            }
            println!("{}", serde_json::to_string_pretty(&shown)?);
            if state.dead_letters.is_empty() {
                let known = if state.requeue.is_some() {
                    "it was requeued and its job has not run yet"
                } else if state.audit.is_some() || state.v2_head.is_some() || state.v1_files.main.is_some() {
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
            // Checked above: a requeue always has a source.
            let source = source.expect("requeue source");
            let done = triage::requeue(&store, &source, &dlq_filter(&filter, actors)?, recovery, force).await?;
            return print_requeued(&done, json);
        }
        DlqCommand::Export { filter, format } => {
            let format = if format == "csv" { Format::Csv } else { Format::Json };
            stream(&store, &dlq_filter(&filter, vec![])?, format).await?;
        }
        DlqCommand::Purge { filter, yes } => {
            if !yes {
                return Err(crate::exit::Usage("purge drops dead letters for good: add --yes to confirm".into()).into());
            }
            let n = triage::purge(&store, &dlq_filter(&filter, vec![])?).await?;
            println!("purged {n} dead letters (noted in each actor's audit record)");
        }
        DlqCommand::Sweep { filter, dry_run, json } => {
            let worker = ferry::telemetry::default_worker_id();
            let swept = triage::sweep(&store, &dlq_filter(&filter, vec![])?, dry_run, &worker).await?;
            return print_swept(&swept, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(summary: &triage::Summary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<20} {:>8} {:>8} {:>12} {:>12} {:>12}",
        "reason", "campaign", "letters", "actors", "oldest", "newest", "v1 MiB"
    );
    for g in &summary.groups {
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
    println!("{} dead letters", summary.dead_letters);
    if summary.requeues_pending > 0 {
        println!("{} requeued actors waiting for a worker", summary.requeues_pending);
    }
    Ok(())
}

fn line(d: &ferry::jobs::DeadLetter) -> String {
    let size = d.v1_files.as_ref().and_then(|f| f.main).map_or("-".into(), |n| n.to_string());
    format!(
        "{:<24} {:<20} {:<24} attempts={} main={} {}\n",
        d.actor_id, d.campaign, d.reason, d.attempts, size, d.error
    )
}

fn print_requeued(done: &triage::Requeued, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(done)?);
    } else {
        println!("requeued {} actors ({} dead letters removed)", done.actors.len(), done.dead_letters_removed);
        if !done.republished.is_empty() {
            println!("published again {} requeues left by an interrupted command", done.republished.len());
        }
        for (actor, outcome) in &done.outcomes {
            println!("  {actor}: {outcome}");
        }
        for why in &done.skipped {
            println!("  skipped {why}");
        }
    }
    if done.actors.is_empty() && done.republished.is_empty() {
        return Ok(crate::exit::nothing(if done.skipped.is_empty() {
            "no dead letter matched: nothing requeued".to_string()
        } else {
            format!("every matching dead letter was skipped ({}): nothing requeued", done.skipped.len())
        }));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_swept(swept: &triage::Swept, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(swept)?);
    } else {
        let verb = if swept.dry_run { "would remove" } else { "removed" };
        println!(
            "checked {} dead letters: {verb} {} of settled actors ({} migrated, {} native)",
            swept.checked,
            swept.removed(),
            swept.migrated,
            swept.native
        );
        if swept.changed > 0 {
            println!("left {} that changed while the sweep read them (run it again to look at them)", swept.changed);
        }
    }
    if swept.removed() == 0 && swept.changed == 0 {
        return Ok(crate::exit::nothing("no dead letter of a settled actor matched: nothing removed"));
    }
    Ok(ExitCode::SUCCESS)
}

/// How a streamed listing is printed.
#[derive(Clone, Copy)]
enum Format {
    Lines,
    Json,
    Csv,
}

/// Prints every selected dead letter as it is read: memory stays one batch whatever the
/// backlog.
async fn stream(store: &store::DynStore, filter: &Filter, format: Format) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut first = true;
    let mut failed: Option<std::io::Error> = None;
    match format {
        Format::Csv => write!(out, "{}", triage::CSV_HEADER)?,
        Format::Json => write!(out, "[")?,
        Format::Lines => {}
    }
    triage::each_letter(store, filter, |d| {
        let written = match format {
            Format::Lines => write!(out, "{}", line(d)),
            Format::Csv => write!(out, "{}", triage::csv_row(d)),
            Format::Json => {
                let sep = if first { "\n" } else { ",\n" };
                first = false;
                // Plain data: serialization cannot fail.
                write!(out, "{sep}{}", serde_json::to_string_pretty(d).expect("dead letter serializes"))
            }
        };
        if let Err(e) = written {
            failed.get_or_insert(e);
        }
        Ok(())
    })
    .await?;
    if let Some(e) = failed {
        return Err(e).context("writing the listing");
    }
    if let Format::Json = format {
        writeln!(out, "\n]")?;
    }
    out.flush()?;
    Ok(())
}
