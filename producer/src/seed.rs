//! `seed` and `import`: put v1 data into a store, generated (a deterministic synthetic
//! keyspace of real SQLite databases) or loaded from SQLite files in a directory.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use ferry::progress::Progress;
use ferry::store;
use ferry::synth::keyspace::{Mix, SeedConfig, plan, seed};

use crate::args::StoreArg;

#[derive(Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub store: StoreArg,
    /// Number of actors.
    #[arg(long, env = "FERRY_SEED_ACTORS", value_parser = clap::value_parser!(u64).range(1..))]
    pub actors: u64,
    /// Random seed: the same seed gives the same keyspace.
    #[arg(long, env = "FERRY_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Hard-case shares, e.g. journal=0.02,wal=0.01 (or `default`, `none`).
    #[arg(long, env = "FERRY_SEED_MIX", default_value = "default")]
    pub mix: String,
    /// Largest database of the long tail, in MiB.
    #[arg(long, env = "FERRY_SEED_MAX_MIB", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_mib: u64,
    /// Share of actors in the long tail (over 1 MiB).
    #[arg(long, env = "FERRY_SEED_LARGE_SHARE", default_value_t = 0.01, value_parser = crate::args::share)]
    pub large_share: f64,
    /// Share of actors of 64 KiB to 1 MiB (the rest are a few pages).
    #[arg(long, env = "FERRY_SEED_MEDIUM_SHARE", default_value_t = 0.09, value_parser = crate::args::share)]
    pub medium_share: f64,
    /// Actor id prefix.
    #[arg(long, env = "FERRY_SEED_PREFIX", default_value = "actor")]
    pub prefix: String,
    /// Write each actor's planted case and expected outcome to this JSON file.
    #[arg(long, env = "FERRY_SEED_MANIFEST")]
    pub manifest: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long, env = "FERRY_JSON")]
    pub json: bool,
}

#[derive(Args)]
#[command(after_help = crate::exit::AFTER_HELP)]
pub struct ImportArgs {
    #[command(flatten)]
    pub store: StoreArg,
    /// Directory of SQLite files; actor id = file name without extension.
    #[arg(env = "FERRY_IMPORT_DIR")]
    pub dir: PathBuf,
    /// Print what was imported as JSON.
    #[arg(long, env = "FERRY_JSON")]
    pub json: bool,
}

pub async fn seed_cmd(args: SeedArgs) -> anyhow::Result<ExitCode> {
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

pub async fn import_cmd(args: ImportArgs) -> anyhow::Result<ExitCode> {
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
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(crate::exit::PARTIAL) })
}
