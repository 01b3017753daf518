//! `status`: queue depths, outcome counts, rate and ETA of a campaign, as text or JSON.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use ferry::store;

use crate::args::{BrokerArgs, StoreArg};

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[arg(long, env = "FERRY_CAMPAIGN")]
    pub campaign: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub async fn status_cmd(args: StatusArgs) -> anyhow::Result<ExitCode> {
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
