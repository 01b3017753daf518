//! `scan`: the census of a keyspace before a campaign (sizes, predicted outcomes); reads the
//! store only, never the broker.

use std::process::ExitCode;

use clap::Args;
use ferry::progress::Progress;

use crate::args::StoreArg;

#[derive(Args)]
pub struct ScanArgs {
    #[command(flatten)]
    pub store: StoreArg,
    /// Only actors whose id starts with this.
    #[arg(long, env = "FERRY_ACTOR_PREFIX")]
    pub prefix: Option<String>,
    /// Print the census as JSON.
    #[arg(long, env = "FERRY_JSON")]
    pub json: bool,
}

pub async fn scan_cmd(args: ScanArgs) -> anyhow::Result<ExitCode> {
    let store = args.store.open_existing(2).await?;
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
