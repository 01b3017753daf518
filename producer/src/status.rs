//! `status`: queue depths, outcome counts, rate and ETA of a campaign, as text or JSON.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use ferry::queue::status::{StatusError, status};

use crate::args::{BrokerArgs, StoreArg};

#[derive(Args)]
#[command(after_help = crate::exit::AFTER_HELP)]
pub struct StatusArgs {
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Only this campaign (default: every campaign in the store); exit 4 when it is unknown.
    #[arg(long, env = "FERRY_CAMPAIGN")]
    pub campaign: Option<String>,
    /// Print the status as JSON.
    #[arg(long, env = "FERRY_JSON")]
    pub json: bool,
}

pub async fn status_cmd(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let store = args.store.open_existing(2).await?;
    let topology = args.broker.topology.topology()?;
    let got =
        status(&*store, &args.broker.amqp, args.broker.connect_timeout(), &topology, args.campaign.as_deref()).await;
    let s = match got {
        Err(e @ StatusError::UnknownCampaign(_)) => return Ok(crate::exit::nothing(e)),
        other => other.context("status")?,
    };
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
    let eta = match (s.eta_seconds, s.eta_note) {
        (_, Some(note)) => format!("unknown: {note}"),
        (Some(e), None) => format!("{e:.0} s"),
        (None, None) => "unknown".into(),
    };
    println!("rate {:.1} jobs/s (over the last {:.0} s), ETA {eta}", s.rate_per_second, s.rate_span_seconds);
    Ok(ExitCode::SUCCESS)
}
