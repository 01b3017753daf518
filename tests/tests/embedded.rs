//! End to end: the built `ferry-producer seed` and `ferry-worker local` binaries on a real
//! SQLite store; every actor's audit outcome matches what the generator planted, v2 equals v1
//! for every migrated actor, and a second run changes nothing.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use ferry::ActorId;
use ferry::keys;
use ferry::migrate::{AuditRecord, OutcomeKind};
use ferry::store::{self, DynStore, KeyRange, KeyValue};
use ferry::synth::keyspace::{Expected, Mix, SeedConfig, plan};
use ferry::v1::{ReadOptions, read_v1};
use ferry::v2::read_v2;
use ferry_tests::bin;

async fn snapshot(store: &DynStore, prefix: &[u8]) -> Result<Vec<KeyValue>> {
    Ok(store.scan(&KeyRange::prefix(prefix), usize::MAX >> 1).await?)
}

fn run(cmd: &mut Command) -> Result<serde_json::Value> {
    let out = cmd.output().context("spawning")?;
    ensure!(out.status.success(), "{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).with_context(|| format!("stdout: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_run_ends_every_actor_as_planted_and_a_second_run_changes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite:{}", dir.path().join("ferry.db").display());
    let actors = 240u64;
    let mix = "journal=0.05,wal=0.05,shm=0.03,corrupt=0.03,page_size=0.03,missing_chunk=0.03,oversize=0.02,bad_header=0.02,bad_meta=0.02,missing_main=0.02,not_aligned=0.02,native=0.03,no_v1=0.03";
    run(Command::new(bin("ferry-producer"))
        .args([
            "seed",
            "--store",
            &url,
            "--json",
            "--seed",
            "7",
            "--mix",
            mix,
            "--max-mib",
            "3",
            "--large-share",
            "0.02",
            "--actors",
        ])
        .arg(actors.to_string()))?;
    let summary =
        run(Command::new(bin("ferry-worker")).args(["local", "--store", &url, "--concurrency", "4", "--json"]))?;
    assert_eq!(summary["completed"], true);
    assert_eq!(summary["actors"], actors);

    let store = store::open(&url, 2).await?;
    let cfg = SeedConfig {
        actors,
        seed: 7,
        mix: Mix::parse(mix).map_err(anyhow::Error::msg)?,
        max_mib: 3,
        large_share: 0.02,
        ..SeedConfig::default()
    };
    let planted = plan(&cfg);
    let mut by_outcome: BTreeMap<String, u64> = BTreeMap::new();
    for actor in &planted {
        let raw = store.get(&keys::audit(&actor.id)).await?.with_context(|| format!("{}: no audit", actor.id))?;
        let audit = AuditRecord::decode(&raw).context("audit decodes")?;
        *by_outcome.entry(audit.outcome.as_str().into()).or_default() += 1;
        match actor.case.expected() {
            Expected::Outcome(kind) => {
                assert_eq!(audit.outcome, kind, "{} ({:?})", actor.id, actor.case)
            }
            Expected::DeadLetter(reason) => {
                assert_eq!(audit.outcome, OutcomeKind::DeadLettered, "{} ({:?})", actor.id, actor.case);
                assert_eq!(audit.reason, Some(reason), "{}", actor.id);
                assert!(store.get(&keys::dead(&actor.id)).await?.is_some(), "{}: no ferry/dead record", actor.id);
            }
        }
        if audit.outcome == OutcomeKind::Migrated {
            assert_v2_equals_v1(&store, &actor.id, &audit).await?;
        }
    }
    for (outcome, n) in &by_outcome {
        assert_eq!(summary["outcomes"][outcome], *n, "summary count of {outcome}");
    }

    let v1_before = snapshot(&store, keys::V1_PREFIX).await?;
    let v2_before = snapshot(&store, keys::V2_PREFIX).await?;
    let dead_before = snapshot(&store, keys::DEAD_PREFIX).await?;
    let again = run(Command::new(bin("ferry-worker")).args(["local", "--store", &url, "--json"]))?;
    assert_eq!(again["outcomes"]["migrated"], serde_json::Value::Null, "second run migrated something: {again}");
    assert_eq!(again["outcomes"]["skipped_already_migrated"], by_outcome["migrated"]);
    assert_eq!(again["left_for_triage"], by_outcome["dead_lettered"]);
    assert_eq!(snapshot(&store, keys::V1_PREFIX).await?, v1_before, "v1 changed");
    assert_eq!(snapshot(&store, keys::V2_PREFIX).await?, v2_before, "v2 changed");
    assert_eq!(snapshot(&store, keys::DEAD_PREFIX).await?, dead_before, "dead letters changed");
    Ok(())
}

async fn assert_v2_equals_v1(store: &DynStore, actor: &ActorId, audit: &AuditRecord) -> Result<()> {
    let v1 = read_v1(&**store, actor, ReadOptions::default()).await.with_context(|| format!("{actor}: v1"))?;
    let v2 = read_v2(&**store, actor).await.with_context(|| format!("{actor}: v2"))?;
    assert!(v1.main == v2.file, "{actor}: v2 differs from v1");
    let checksum = ferry::checksum::DatabaseChecksum::of_file(&v1.main, 4096).hex();
    assert_eq!(audit.checksum.as_deref(), Some(checksum.as_str()), "{actor}: checksum");
    Ok(())
}

#[test]
fn generator_is_deterministic_and_plants_exactly_the_mix() {
    let cfg = SeedConfig { actors: 1000, seed: 42, ..SeedConfig::default() };
    let a = plan(&cfg);
    assert_eq!(a, plan(&cfg), "same seed, same plan");
    assert_ne!(a, plan(&SeedConfig { seed: 43, ..cfg.clone() }), "another seed, another plan");
    for (case, n) in cfg.mix.counts(cfg.actors) {
        assert_eq!(a.iter().filter(|p| p.case == case).count() as u64, n, "{case:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_keyspaces_are_identical_for_the_same_seed() -> Result<()> {
    let cfg = SeedConfig { actors: 60, seed: 9, max_mib: 2, large_share: 0.05, ..SeedConfig::default() };
    let mut snapshots = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir()?;
        let store = store::open(&format!("sqlite:{}", dir.path().join("s.db").display()), 1).await?;
        ferry::synth::keyspace::seed(&*store, &cfg, |_| {}).await.map_err(anyhow::Error::msg)?;
        snapshots.push(snapshot(&store, b"").await?);
    }
    assert!(snapshots[0] == snapshots[1], "two seeds of the same config differ");
    Ok(())
}
