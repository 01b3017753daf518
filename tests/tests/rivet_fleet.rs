//! End to end on rivet's own layout: the built binaries with `--layout rivet` on a PostgreSQL
//! schema holding rivet's universaldb objects, fed through the real RabbitMQ broker, as the
//! README's "Migrating a rivet deployment" runs them.
//!
//! What is proven, on a keyspace of every hard case that `ferry-producer seed --layout rivet
//! --create-rivet-schema` planted (rivet ids of random UUIDs):
//! - `scan`, `enqueue` and two `ferry-worker run` end every actor exactly as the ferry layout
//!   does (the generator plants the same case at each index in both layouts; each case's
//!   expected outcome is the ferry layout's, which `fleet.rs` holds it to); migrated actors
//!   read back from rivet's sqlite-storage rows equal to v1;
//! - the hot journal actor (a real SQLite hot journal) is dead-lettered `journal_sidecar`,
//!   `dlq show` names it by its rivet id and UUID, and `dlq requeue --recovery
//!   rollback_journal` migrates it;
//! - afterwards no row under the v1 actor-KV root changed (byte-equal snapshots of `X.kv`),
//!   every `X.kv` key is under that root or sqlite-storage's subspace (ferry's records are in
//!   `X.ferry_kv`), and `verify --layout rivet` passes.
//!
//! Needs PostgreSQL at `ferry::testing::postgres_url()` and RabbitMQ at
//! `ferry::testing::amqp_url()`; fails when either is down. The schema and the queue prefix
//! are unique to the test and removed at the end (also on failure).

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ferry::ActorId;
use ferry::DeadLetterReason;
use ferry::layout::{Layout, RivetId, rivet};
use ferry::migrate::{AuditRecord, OutcomeKind};
use ferry::store::{self, DynStore, OpenMode, OpenOptions, prefix_end};
use ferry::synth::keyspace::{Case, Expected, Mix, SeedConfig, plan};
use ferry::testing::{amqp_url, postgres_url, unique_name};
use ferry::v1::{ReadOptions, read_v1};
use ferry::v2::{Origin, read_v2};
use ferry_tests::{Broker, Proc, WorkerSpec, audits, bin, bounded, ended_as_planted, run_json, v2_head, wait_until};

/// The whole test finishes within this, or fails (processes killed, schema and queues removed).
const LIMIT: Duration = Duration::from_secs(240);
/// A worker asked to stop (SIGTERM) exits within this.
const STOP: Duration = Duration::from_secs(20);

/// Every hard case, a few of each in 120 actors (as `fleet.rs`).
const HARD_MIX: &str = "journal=0.04,wal=0.04,shm=0.03,corrupt=0.03,page_size=0.03,missing_chunk=0.03,oversize=0.02,\
                        bad_header=0.03,bad_meta=0.02,missing_main=0.02,not_aligned=0.02,native=0.03,no_v1=0.03";
const ACTORS: u64 = 120;
const SEED: u64 = 14;

/// The seed's settings in `layout`: what `ferry-producer seed` is run with below.
fn seed_config(layout: Layout) -> SeedConfig {
    SeedConfig {
        actors: ACTORS,
        seed: SEED,
        mix: Mix::parse(HARD_MIX).expect("the mix parses"),
        max_mib: 2,
        large_share: 0.03,
        layout,
        ..SeedConfig::default()
    }
}

/// A schema of the test server, dropped when this is dropped (also on failure).
struct Schema {
    name: String,
    url: String,
}

impl Schema {
    fn new() -> Schema {
        let name = unique_name("ferry_rivet_fleet");
        let base = postgres_url();
        let sep = if base.contains('?') { '&' } else { '?' };
        Schema { url: format!("{base}{sep}schema={name}"), name }
    }

    async fn client(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
            .await
            .context("PostgreSQL must be running for this test")?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Every `X.kv` row in `[start, end)`, in key order, as stored.
    async fn rows(&self, start: &[u8], end: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let client = self.client().await?;
        let sql = format!("SELECT key, value FROM {}.kv WHERE key >= $1 AND key < $2 ORDER BY key", self.name);
        Ok(client.query(&sql, &[&start, &end]).await?.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Every `X.kv` key outside both rivet subspaces ferry may touch.
    async fn foreign_kv_keys(&self) -> Result<Vec<Vec<u8>>> {
        let client = self.client().await?;
        let sql = format!("SELECT key FROM {}.kv ORDER BY key", self.name);
        let (v1, v2) = (rivet::v1_root(), rivet::v2_subspace());
        Ok(client
            .query(&sql, &[])
            .await?
            .into_iter()
            .map(|r| r.get::<_, Vec<u8>>(0))
            .filter(|k| !k.starts_with(&v1) && !k.starts_with(&v2))
            .collect())
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (url, name) = (postgres_url(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                if let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")).await;
                }
            });
        })
        .join();
    }
}

/// `ferry-producer ARGS --store URL --layout rivet`, nothing inherited from a `FERRY_*`
/// environment.
fn producer(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("ferry-producer"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FERRY_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).args(["--store", url, "--layout", "rivet"]).env("RUST_LOG", "warn");
    cmd
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("spawning {cmd:?}"))
}

/// The store as the test reads it: rivet's layout, no v1 writes.
async fn open(url: &str) -> Result<DynStore> {
    let opts = OpenOptions::new(4, OpenMode::Existing).layout(Layout::Rivet);
    store::open_with(url, &opts).await.context("opening the rivet store")
}

async fn audit_of(store: &DynStore, actor: &ActorId) -> Result<Option<AuditRecord>> {
    Ok(audits(store).await?.remove(actor.as_str()))
}

/// Checks each planted actor's end against its case: the ferry layout's outcome, v2 equal to
/// v1 for the migrated ones (read back through rivet's rows), no v2 for the rejected ones.
async fn check_as_planted(store: &DynStore, planted: &[(ActorId, Case)]) -> Result<()> {
    let audits = audits(store).await?;
    for (actor, case) in planted {
        let audit = audits.get(actor.as_str()).with_context(|| format!("{actor} ({case:?}): no audit record"))?;
        ensure!(
            ended_as_planted(*case, audit),
            "{actor} ({case:?}) ended {} {:?} ({:?}), expected {:?}",
            audit.outcome,
            audit.reason,
            audit.error,
            case.expected()
        );
        let head = v2_head(store, actor).await?;
        match case.expected() {
            Expected::Outcome(OutcomeKind::Migrated) => {
                let head = head.with_context(|| format!("{actor}: migrated without a v2 head"))?;
                ensure!(head.origin == Origin::MigratedFromV1, "{actor}: head {head:?}");
                let v1 =
                    read_v1(&**store, actor, ReadOptions::default()).await.with_context(|| format!("{actor}: v1"))?;
                let v2 = read_v2(&**store, actor).await.with_context(|| format!("{actor}: v2"))?;
                ensure!(
                    v1.main == v2.file,
                    "{actor}: v2 ({} bytes) differs from v1 ({})",
                    v2.file.len(),
                    v1.main.len()
                );
            }
            Expected::Outcome(OutcomeKind::SkippedNativeV2) => {
                ensure!(head.is_some_and(|h| h.origin == Origin::Native), "{actor}: native head changed");
            }
            Expected::Outcome(_) | Expected::DeadLetter(_) => {
                ensure!(head.is_none(), "{actor} ({case:?}): v2 written: {head:?}");
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rivet_fleet_ends_every_actor_as_the_ferry_layout_and_never_writes_under_p() -> Result<()> {
    bin("ferry-worker");
    bounded(LIMIT, rivet_fleet()).await
}

async fn rivet_fleet() -> Result<()> {
    let schema = Schema::new();
    let url = schema.url.clone();
    let logs = tempfile::tempdir()?;

    // The generator plants the same case at each index whatever the layout: the rivet run is
    // held to exactly what a ferry-layout run of this seed ends in.
    let planted: Vec<(ActorId, Case)> = plan(&seed_config(Layout::Rivet)).into_iter().map(|a| (a.id, a.case)).collect();
    let ferry_cases: Vec<Case> = plan(&seed_config(Layout::Ferry)).into_iter().map(|a| a.case).collect();
    ensure!(planted.iter().map(|(_, c)| *c).eq(ferry_cases), "the layouts plant different cases");
    for (actor, _) in &planted {
        RivetId::from_actor(actor).with_context(|| format!("{actor}: planted id is not a rivet id"))?;
    }
    for case in Case::HARD {
        ensure!(planted.iter().any(|(_, c)| *c == case), "no {case:?} actor planted: raise ACTORS");
    }

    // A rehearsal schema, made by the command the README gives.
    let cfg = seed_config(Layout::Rivet);
    let seeded = run_json(producer(&url, &["seed", "--create-rivet-schema", "--json", "--mix", HARD_MIX]).args([
        "--actors",
        &cfg.actors.to_string(),
        "--seed",
        &cfg.seed.to_string(),
        "--max-mib",
        &cfg.max_mib.to_string(),
        "--large-share",
        &cfg.large_share.to_string(),
    ]))?;
    ensure!(seeded["actors"] == ACTORS, "{seeded}");
    // Seeding again with the flag is refused: the schema holds a kv table now.
    let again = output(&mut producer(&url, &["seed", "--create-rivet-schema", "--actors", "1"]))?;
    ensure!(!again.status.success(), "a second --create-rivet-schema succeeded");
    ensure!(String::from_utf8_lossy(&again.stderr).contains("already exists"), "{again:?}");

    let (v1_start, v1_end) = (rivet::v1_root(), prefix_end(&rivet::v1_root()));
    let v1_before = schema.rows(&v1_start, &v1_end).await?;
    ensure!(!v1_before.is_empty(), "seed wrote no v1 rows");

    // The census reads rivet's rows.
    let census = run_json(&mut producer(&url, &["scan", "--json"]))?;
    ensure!(census["actors"] == ACTORS, "census: {census}");
    let no_v1 = planted.iter().filter(|(_, c)| *c == Case::NoV1).count() as u64;
    ensure!(census["with_v1_sqlite"] == ACTORS - no_v1, "census: {census}");

    let broker = Broker::new("rivet_fleet").await?;
    let topology = &broker.topology;
    let campaign = "rivet-rehearsal";
    let enqueued = run_json(producer(&url, &["enqueue", "--json", "--campaign", campaign]).args([
        "--amqp",
        &amqp_url(),
        "--queue-prefix",
        &topology.prefix,
    ]))?;
    ensure!(enqueued["completed"] == true && enqueued["skipped_invalid_id"] == 0, "{enqueued}");

    let store = open(&url).await?;
    let spec = |hint: &str| WorkerSpec::new(&url, topology, hint).concurrency(3).args(&["--layout", "rivet"]);
    let mut workers: Vec<Proc> = vec![spec("rw1").start(logs.path())?, spec("rw2").start(logs.path())?];
    wait_until(Duration::from_secs(150), "every planted actor has an audit record", || {
        let store = store.clone();
        async move { Ok(audits(&store).await?.len() >= ACTORS as usize) }
    })
    .await?;
    wait_until(Duration::from_secs(30), "the work and retry queues drain", || async {
        Ok(broker.pending().await? == 0)
    })
    .await?;
    check_as_planted(&store, &planted).await.inspect_err(|_| workers.iter_mut().for_each(|w| w.settle()))?;

    // The hot journal: dead-lettered, shown by both forms of its rivet id, then recovered.
    let (journal, _) = planted.iter().find(|(_, c)| *c == Case::Journal).context("a journal actor")?;
    let id = RivetId::from_actor(journal)?;
    let shown = output(&mut producer(&url, &["dlq", "show", &id.uuid_display()]))?;
    ensure!(shown.status.success(), "dlq show {}: {shown:?}", id.uuid_display());
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout)?;
    ensure!(shown["rivet_id"] == journal.as_str() && shown["rivet_uuid"] == id.uuid_display(), "{shown}");
    ensure!(shown["dead_letters"][0]["reason"] == DeadLetterReason::JournalSidecar.as_str(), "{shown}");
    let requeued = run_json(
        producer(&url, &["dlq", "requeue", journal.as_str(), "--recovery", "rollback_journal", "--json"]).args([
            "--amqp",
            &amqp_url(),
            "--queue-prefix",
            &topology.prefix,
        ]),
    )?;
    ensure!(requeued["actors"].as_array().is_some_and(|a| a.len() == 1), "{requeued}");
    wait_until(Duration::from_secs(60), "the journal actor is migrated with rollback_journal", || {
        let store = store.clone();
        async move {
            let audit = audit_of(&store, journal).await?;
            Ok(audit.is_some_and(|a| a.outcome == OutcomeKind::Migrated))
        }
    })
    .await?;
    let audit = audit_of(&store, journal).await?.context("journal audit")?;
    ensure!(audit.recovery.map(|r| r.to_string()).as_deref() == Some("rollback_journal"), "{audit:?}");
    let head = v2_head(&store, journal).await?.context("journal head")?;
    ensure!(head.origin == Origin::MigratedFromV1, "{head:?}");
    for w in &mut workers {
        w.stop(STOP).await?;
    }

    // Nothing under any actor's `P` changed, nothing of ferry's is in X.kv.
    let v1_after = schema.rows(&v1_start, &v1_end).await?;
    if v1_after != v1_before {
        let changed: Vec<String> = v1_before
            .iter()
            .zip(&v1_after)
            .filter(|(a, b)| a != b)
            .take(5)
            .map(|(a, _)| ferry::keys::printable(&a.0))
            .collect();
        bail!("v1 rows changed ({} before, {} after), e.g. {changed:?}", v1_before.len(), v1_after.len());
    }
    let foreign = schema.foreign_kv_keys().await?;
    ensure!(
        foreign.is_empty(),
        "{} X.kv keys outside the v1 root and sqlite-storage, e.g. {:?}",
        foreign.len(),
        foreign.iter().take(5).map(|k| ferry::keys::printable(k)).collect::<Vec<_>>()
    );

    // verify reads every migrated actor back from rivet's rows.
    let verified = run_json(&mut producer(&url, &["verify", "--json"]))?;
    let migrated = planted.iter().filter(|(_, c)| *c == Case::Normal).count() + 1;
    ensure!(verified["checked"] == migrated as u64, "{verified}");
    ensure!(verified["problems"].as_array().is_some_and(|p| p.is_empty()), "{verified}");

    let by_case = planted.iter().fold(BTreeMap::<&str, usize>::new(), |mut m, (_, c)| {
        *m.entry(c.name()).or_default() += 1;
        m
    });
    eprintln!("rivet fleet: {by_case:?} ended as on the ferry layout; v1 rows {} byte-equal", v1_after.len());
    broker.delete().await
}
