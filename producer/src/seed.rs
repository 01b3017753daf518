//! `seed` and `import`: put v1 data into a store, generated (a deterministic synthetic
//! keyspace of real SQLite databases) or loaded from SQLite files in a directory.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use ferry::layout::Layout;
use ferry::progress::Progress;
use ferry::store::{self, OpenMode};
use ferry::synth::keyspace::{Mix, SeedConfig, plan, seed};

use crate::args::StoreArg;
use crate::exit::Usage;

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
    /// Actor id prefix (default `actor`; ids are PREFIX-0000000, ...). Not with --layout rivet,
    /// whose ids are rivet ids of random UUIDs (the same ones again for the same --seed).
    #[arg(long, env = "FERRY_SEED_PREFIX")]
    pub prefix: Option<String>,
    /// With --layout rivet, a rehearsal: first create rivet's own universaldb objects (kv,
    /// global_version_seq, conflict_ranges and their types) in the URL's schema, which must not
    /// hold a kv table yet. Never on a real rivet deployment, whose engine owns them.
    #[arg(long, env = "FERRY_CREATE_RIVET_SCHEMA")]
    pub create_rivet_schema: bool,
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
    /// Directory of SQLite files; actor id = file name without extension (--layout rivet: a
    /// name that is a rivet id keeps it, any other file gets a fresh one, printed with it).
    #[arg(env = "FERRY_IMPORT_DIR")]
    pub dir: PathBuf,
    /// Print what was imported as JSON.
    #[arg(long, env = "FERRY_JSON")]
    pub json: bool,
}

pub async fn seed_cmd(args: SeedArgs) -> anyhow::Result<ExitCode> {
    let mix = Mix::parse(&args.mix).map_err(anyhow::Error::msg).context("--mix")?;
    let layout = args.store.layout;
    let prefix = match (&args.prefix, layout) {
        (Some(p), Layout::Rivet) => {
            return Err(
                Usage(format!("--prefix {p:?}: rivet ids carry no name; --layout rivet plants random ones")).into()
            );
        }
        (Some(p), Layout::Ferry) => p.clone(),
        (None, _) => "actor".to_string(),
    };
    if ferry::ActorId::parse(&format!("{prefix}-0000000")).is_err() {
        bail!("--prefix {prefix:?}: actor ids are [A-Za-z0-9_-], at most 64 bytes");
    }
    if args.create_rivet_schema && layout != Layout::Rivet {
        return Err(Usage("--create-rivet-schema creates rivet's objects: it needs --layout rivet".into()).into());
    }
    let cfg = SeedConfig {
        actors: args.actors,
        seed: args.seed,
        mix,
        max_mib: args.max_mib,
        large_share: args.large_share,
        medium_share: args.medium_share,
        prefix,
        layout,
        ..SeedConfig::default()
    };
    let mut opts = args.store.options(2, OpenMode::Create);
    // Loading fixtures is the one thing allowed to write v1 rows.
    opts.v1_writes = true;
    opts.create_rivet_schema = args.create_rivet_schema;
    let store = store::open_with(&args.store.store, &opts).await.context("opening the store")?;
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
    let mut opts = args.store.options(2, OpenMode::Create);
    opts.v1_writes = true;
    let store = store::open_with(&args.store.store, &opts).await.context("opening the store")?;
    let imported = ferry::import::import_dir(&*store, &args.dir).await.map_err(anyhow::Error::msg)?;
    let failed = imported.iter().filter(|i| i.error.is_some()).count();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&imported)?);
    } else {
        for i in &imported {
            match (&i.actor, &i.error) {
                (Some(actor), None) => {
                    // The rivet layout: the id and its UUID form, and whether it was assigned,
                    // so the operator can map each file to its actor.
                    let rivet = match (&i.rivet_uuid, i.assigned) {
                        (Some(uuid), true) => format!(" (rivet {uuid}, id assigned to {})", i.path.display()),
                        (Some(uuid), false) => format!(" (rivet {uuid})"),
                        (None, _) => String::new(),
                    };
                    println!("imported {actor}{rivet}: {} bytes {}", i.bytes, i.sidecars.join(" "));
                }
                (_, Some(e)) => println!("skipped {}: {e}", i.path.display()),
                (None, None) => {}
            }
        }
        println!("{} imported, {failed} skipped", imported.len() - failed);
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(crate::exit::PARTIAL) })
}
