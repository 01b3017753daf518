//! `verify`: rebuild migrated actors from v2 and compare them with v1 and the migration's
//! checksum; reads only, exits 3 when any actor does not match.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use ferry::progress::Progress;
use ferry::verify::Selection;

use crate::args::StoreArg;

#[derive(Args)]
#[command(after_help = crate::exit::AFTER_HELP)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub store: StoreArg,
    /// Only this campaign's migrated actors.
    #[arg(long, env = "FERRY_CAMPAIGN", conflicts_with = "actor")]
    pub campaign: Option<String>,
    /// Only these actors (repeat the flag, or commas in the env variable).
    #[arg(long, env = "FERRY_VERIFY_ACTORS", value_delimiter = ',')]
    pub actor: Vec<String>,
    /// Print the report as JSON.
    #[arg(long, env = "FERRY_JSON")]
    pub json: bool,
}

pub async fn verify_cmd(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let store = args.store.open_existing(4).await?;
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
    if report.checked == 0 {
        return Ok(crate::exit::nothing("verify selected no migrated actor: nothing was checked"));
    }
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
    Ok(if report.clean() { ExitCode::SUCCESS } else { ExitCode::from(crate::exit::MISMATCH) })
}
