//! End to end: dead-letter triage, recovery and verification, with the built `ferry-worker`
//! and `ferry-producer` binaries against a real SQLite store and the real RabbitMQ broker.
//!
//! - embedded mode: hot-journal, WAL and SHM actors are dead-lettered with their reasons, a
//!   requeue without (or with an unfitting) recovery leaves them rejected, and the fitting
//!   recovery migrates exactly the committed rows, recorded in the audit, v1 untouched;
//! - broker: listing and summarizing leave the dead-letter queue as it was, a requeue moves
//!   exactly the selected dead letters (duplicates collapsed, the recovery set on each job), a
//!   listing or requeue killed half-way loses nothing; a job the broker itself dead-lettered at
//!   its delivery limit is triaged as `delivery_limit`, the same however often it is listed;
//! - `verify` finds a clean campaign clean, planted v1 drift as `v1_drift` and planted v2
//!   damage as `v2_corrupt`;
//! - `dlq export --format csv` and `dlq purge` (refused without `--yes`, audited with it).
//!
//! Broker tests need RabbitMQ at `ferry::testing::amqp_url()` and fail when it is down. Each
//! uses its own queue prefix, deleted at the end (also on failure).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry::checksum::DatabaseChecksum;
use ferry::jobs::{DeadLetter, Job};
use ferry::keys;
use ferry::migrate::{AuditRecord, OutcomeKind};
use ferry::queue::Topology;
use ferry::queue::topology::DEAD_KEY;
use ferry::store::{DynStore, KeyRange, KeyValue, Txn};
use ferry::synth::sqlite::{self as fixtures, DbFiles, DbSpec};
use ferry::synth::write_v1;
use ferry::testing::{Backend, TestStore, amqp_url, unique_name};
use ferry::v1::FileTag;
use ferry::v1::keys::chunk_key;
use ferry::v2::{DBHead, Origin, read_v2};
use ferry::{ActorId, DeadLetterReason, Recovery};
use ferry_tests::Proc;
use ferry_tests::bin;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers (kept in this file: tests/src/lib.rs belongs to another suite's work in progress).
// ---------------------------------------------------------------------------------------------

fn id(s: &str) -> ActorId {
    ActorId::parse(s).expect("valid test actor id")
}

fn msg<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Fails the test if `fut` takes longer than `limit`; dropping it kills its processes and
/// deletes its queues.
async fn bounded<T>(limit: Duration, fut: impl Future<Output = Result<T>>) -> Result<T> {
    // Building the binaries (once per test process) is not part of the bound.
    bin("ferry-producer");
    bin("ferry-worker");
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => bail!("test did not finish within {limit:?}"),
    }
}

/// Polls `check` until it holds; fails after `timeout` with the last observation.
async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(bool, String)>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let (done, seen) = check().await?;
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A command with no ferry settings inherited from the environment.
fn command(name: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    for (k, _) in std::env::vars() {
        if k.starts_with("FERRY_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).output().with_context(|| format!("spawning {cmd:?}"))
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    ensure!(out.status.success(), "{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

fn run_json(cmd: &mut Command) -> Result<Value> {
    let stdout = run_ok(cmd)?;
    serde_json::from_str(&stdout).with_context(|| format!("stdout of {cmd:?} is not JSON: {stdout}"))
}

/// Runs a command that did nothing: it exits 4 ("nothing matched") and still prints its JSON
/// report.
fn run_json_nothing(cmd: &mut Command) -> Result<Value> {
    let out = output(cmd)?;
    ensure!(
        out.status.code() == Some(4),
        "{cmd:?}: exit {}, not 4: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stderr).contains("nothing requeued"), "{cmd:?} does not say why");
    serde_json::from_slice(&out.stdout).with_context(|| format!("stdout of {cmd:?} is not JSON"))
}

/// Where `ferry-producer dlq` reads dead letters.
#[derive(Clone)]
enum Dlq {
    Embedded,
    Broker { prefix: String, delivery_limit: i64 },
}

fn dlq(store_url: &str, source: &Dlq, args: &[&str]) -> Command {
    let mut cmd = command("ferry-producer");
    cmd.args(["dlq", "--store", store_url]);
    match source {
        Dlq::Embedded => {
            cmd.arg("--embedded");
        }
        Dlq::Broker { prefix, delivery_limit } => {
            cmd.args(["--amqp", &amqp_url(), "--queue-prefix", prefix, "--delivery-limit"]);
            cmd.arg(delivery_limit.to_string());
        }
    }
    cmd.args(args);
    cmd
}

fn verify_cmd(store_url: &str, args: &[&str]) -> Command {
    let mut cmd = command("ferry-producer");
    cmd.args(["verify", "--store", store_url, "--json"]).args(args);
    cmd
}

fn local_run(store_url: &str) -> Command {
    let mut cmd = command("ferry-worker");
    cmd.args(["local", "--store", store_url, "--concurrency", "2", "--json"]);
    cmd
}

async fn snapshot(store: &DynStore, prefix: &[u8]) -> Result<Vec<KeyValue>> {
    Ok(store.scan(&KeyRange::prefix(prefix), usize::MAX >> 1).await?)
}

async fn audit(store: &DynStore, actor: &ActorId) -> Result<AuditRecord> {
    let raw = store.get(&keys::audit(actor)).await?.with_context(|| format!("{actor}: no audit record"))?;
    AuditRecord::decode(&raw).with_context(|| format!("{actor}: audit record does not decode"))
}

async fn head(store: &DynStore, actor: &ActorId) -> Result<Option<DBHead>> {
    match store.get(&ferry::v2::keys::meta(actor)).await? {
        Some(raw) => Ok(Some(DBHead::decode(&raw).map_err(msg)?)),
        None => Ok(None),
    }
}

/// The migrated file as v2 holds it, checked against the audit's checksum.
async fn migrated_file(store: &DynStore, actor: &ActorId) -> Result<(Vec<u8>, AuditRecord)> {
    let v2 = read_v2(&**store, actor).await.with_context(|| format!("{actor}: v2 read-back"))?;
    ensure!(v2.head.origin == Origin::MigratedFromV1, "{actor}: head origin {:?}", v2.head.origin);
    let audit = audit(store, actor).await?;
    let checksum = DatabaseChecksum::of_file(&v2.file, 4096).hex();
    ensure!(audit.checksum.as_deref() == Some(checksum.as_str()), "{actor}: audit checksum vs v2 read-back");
    ensure!(audit.pages == Some(v2.head.db_size_pages), "{actor}: audit pages vs head");
    Ok((v2.file, audit))
}

fn items(file: &[u8]) -> Result<i64> {
    fixtures::item_count(file).map_err(msg)
}

fn integrity(file: &[u8]) -> Result<String> {
    fixtures::integrity_check(file).map_err(msg)
}

fn plain(spec: &DbSpec) -> Result<DbFiles> {
    Ok(DbFiles { main: fixtures::database(spec).map_err(msg)?, ..DbFiles::default() })
}

async fn write(store: &DynStore, actor: &ActorId, files: &DbFiles) -> Result<()> {
    Ok(write_v1(&**store, actor, files).await?)
}

/// A dead letter as the worker writes it.
fn dead_letter(actor: &str, campaign: &str, reason: DeadLetterReason, n: i64) -> DeadLetter {
    let job = Job::new(campaign, id(actor), 1_763_900_000_000 + n, None);
    DeadLetter {
        actor_id: actor.to_string(),
        campaign: campaign.to_string(),
        reason,
        phase: "read".into(),
        error: format!("actor {actor}: read: planted {reason}, with a comma"),
        attempts: 1,
        worker: "test-worker".into(),
        at_ms: 1_763_900_000_000 + n,
        v1_files: Some(ferry::v1::V1Files { main: Some(8192), journal: Some(512), wal: None, shm: None }),
        recovery: None,
        message: String::from_utf8(job.encode()).expect("job JSON is UTF-8"),
    }
}

/// A minimal RFC 4180 reader (quoted fields may hold commas, quotes and newlines).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let (mut rows, mut row, mut field, mut quoted) = (Vec::new(), Vec::new(), String::new(), false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, '\r') => {}
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

const CSV_HEADER: &str =
    "actor_id,campaign,reason,phase,attempts,worker,at_ms,main_bytes,journal_bytes,wal_bytes,shm_bytes,recovery,error";

fn worker_run(store_url: &str, prefix: &str) -> Command {
    let mut cmd = command("ferry-worker");
    cmd.args(["run", "--store", store_url, "--amqp", &amqp_url(), "--queue-prefix", prefix]);
    cmd.args(["--concurrency", "4", "--http", "off", "--retry-min-ms", "100", "--retry-max-ms", "1000"]);
    cmd.args(["--lease-ttl-secs", "5", "--shutdown-grace", "20"]);
    cmd
}

/// A unique queue prefix on the test broker with its topology declared; every queue and
/// exchange is deleted when this is dropped (also when the test fails).
struct Broker {
    topology: Topology,
    conn: Connection,
    ch: Channel,
}

impl Broker {
    async fn new(tag: &str, delivery_limit: i64) -> Result<Broker> {
        let topology = Topology { prefix: unique_name(tag), delivery_limit };
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.with_context(|| {
            format!("RabbitMQ must be running for this test ({})", ferry::queue::amqp::redacted(&amqp_url()))
        })?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        topology.declare(&ch).await?;
        Ok(Broker { topology, conn, ch })
    }

    fn prefix(&self) -> &str {
        &self.topology.prefix
    }

    fn source(&self) -> Dlq {
        Dlq::Broker { prefix: self.topology.prefix.clone(), delivery_limit: self.topology.delivery_limit }
    }

    /// Ready messages of a queue (a passive declare: reads nothing).
    async fn count(&self, queue: &str) -> Result<u32> {
        let opts = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        Ok(self.ch.queue_declare(queue.into(), opts, FieldTable::default()).await?.message_count())
    }

    async fn dead(&self) -> Result<u32> {
        self.count(&self.topology.dead_queue()).await
    }

    async fn work(&self) -> Result<u32> {
        self.count(&self.topology.work_queue()).await
    }

    async fn wait_count(&self, queue: &str, expected: u32, timeout: Duration) -> Result<()> {
        wait_until(&format!("{queue} to hold {expected} messages"), timeout, || async {
            let n = self.count(queue).await?;
            Ok((n == expected, n.to_string()))
        })
        .await
    }

    /// Publishes dead letters to the dead-letter exchange, all confirmed.
    async fn publish_dead(&self, letters: &[DeadLetter]) -> Result<()> {
        let mut confirms = Vec::new();
        for d in letters {
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(format!("{}/{}", d.campaign, d.actor_id).as_str().into());
            let confirm = self
                .ch
                .basic_publish(
                    self.topology.dead_exchange().as_str().into(),
                    DEAD_KEY.into(),
                    BasicPublishOptions::default(),
                    &d.encode(),
                    props,
                )
                .await?;
            confirms.push(confirm);
        }
        for c in confirms {
            ensure!(c.await?.is_ack(), "the broker nacked a dead letter");
        }
        Ok(())
    }

    /// Every ready message of a queue, fetched without ack on a channel that is then closed,
    /// so they all go back.
    async fn peek(&self, queue: &str) -> Result<Vec<Vec<u8>>> {
        let ch = self.conn.create_channel().await?;
        let mut bodies = Vec::new();
        while let Some(m) = ch.basic_get(queue.into(), BasicGetOptions::default()).await? {
            bodies.push(m.delivery.data.clone());
        }
        ch.close(200, "peeked".into()).await?;
        Ok(bodies)
    }

    async fn peek_dead(&self) -> Result<Vec<DeadLetter>> {
        let bodies = self.peek(&self.topology.dead_queue()).await?;
        bodies.iter().map(|b| DeadLetter::decode(b).context("a dead-letter body does not decode")).collect()
    }

    async fn peek_jobs(&self) -> Result<Vec<Job>> {
        let bodies = self.peek(&self.topology.work_queue()).await?;
        bodies.iter().map(|b| Job::parse(b).map_err(msg)).collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let topology = self.topology.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                if let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = topology.delete(&ch).await;
                    }
                    let _ = conn.close(200, "test done".into()).await;
                }
            });
        })
        .join();
    }
}

// ---------------------------------------------------------------------------------------------
// Embedded mode: recovery of journal, WAL and SHM rejections.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_journal_actor_is_dead_lettered_stays_rejected_without_recovery_and_rolls_back_to_its_committed_rows()
-> Result<()> {
    bounded(Duration::from_secs(120), async {
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        let committed = 40u32;
        let files = fixtures::hot_journal(&DbSpec { rows: committed, payload: 300, page_size: 4096, seed: 11 }, 300)
            .map_err(msg)?;
        // What a crash leaves: the main file alone holds uncommitted pages, so migrating it as
        // it is would not give the committed database.
        let main_alone = (items(&files.main).ok(), integrity(&files.main).ok());
        ensure!(
            main_alone != (Some(i64::from(committed)), Some("ok".to_string())),
            "fixture: the main file alone already reads as the committed database: {main_alone:?}"
        );
        let actor = id("journal-actor");
        let normal = id("normal-actor");
        write(&store, &actor, &files).await?;
        write(&store, &normal, &plain(&DbSpec::small(3))?).await?;
        let v1_before = snapshot(&store, keys::V1_PREFIX).await?;

        let summary = run_json(&mut local_run(&ts.url))?;
        assert_eq!(summary["outcomes"]["migrated"], 1, "{summary}");
        assert_eq!(summary["outcomes"]["dead_lettered"], 1, "{summary}");
        assert_eq!(summary["dead_letters"]["journal_sidecar"], 1, "{summary}");
        let rejected = audit(&store, &actor).await?;
        assert_eq!(rejected.outcome, OutcomeKind::DeadLettered);
        assert_eq!(rejected.reason, Some(DeadLetterReason::JournalSidecar));
        assert!(store.get(&keys::dead(&actor)).await?.is_some(), "no ferry/dead record");
        assert_eq!(head(&store, &actor).await?, None, "a rejected actor has no v2 head");

        let shown = run_json(&mut dlq(&ts.url, &Dlq::Embedded, &["show", actor.as_str()]))?;
        assert_eq!(shown["dead_letters"][0]["reason"], "journal_sidecar", "{shown}");
        assert_eq!(shown["v1_files"]["journal"], files.journal.as_ref().map(|j| j.len()).unwrap_or(0), "{shown}");

        // Without a recovery the journal is still there: rejected again, nothing written.
        let again = run_json(&mut dlq(&ts.url, &Dlq::Embedded, &["requeue", actor.as_str(), "--json"]))?;
        assert_eq!(again["outcomes"][actor.as_str()], "dead_lettered: journal_sidecar", "{again}");
        assert_eq!(again["dead_letters_removed"], 0, "{again}");
        assert!(store.get(&keys::dead(&actor)).await?.is_some(), "the dead letter must stay");
        assert_eq!(audit(&store, &actor).await?.reason, Some(DeadLetterReason::JournalSidecar));
        assert_eq!(head(&store, &actor).await?, None, "nothing may reach v2 without the recovery");

        // A recovery that does not fit the reason is refused.
        let wrong =
            dlq(&ts.url, &Dlq::Embedded, &["requeue", actor.as_str(), "--recovery", "checkpoint_wal", "--json"]);
        let wrong = run_json_nothing(&mut { wrong })?;
        assert_eq!(wrong["actors"], serde_json::json!([]), "{wrong}");
        assert!(wrong["skipped"][0].as_str().is_some_and(|s| s.contains("does not fit")), "{wrong}");
        assert_eq!(head(&store, &actor).await?, None);

        let fixed = run_json(&mut dlq(
            &ts.url,
            &Dlq::Embedded,
            &["requeue", actor.as_str(), "--recovery", "rollback_journal", "--json"],
        ))?;
        assert_eq!(fixed["outcomes"][actor.as_str()], "migrated", "{fixed}");
        assert_eq!(fixed["dead_letters_removed"], 1, "{fixed}");
        assert!(store.get(&keys::dead(&actor)).await?.is_none(), "the dead letter of a migrated actor is removed");
        let (file, audit) = migrated_file(&store, &actor).await?;
        assert_eq!(items(&file)?, i64::from(committed), "exactly the last committed rows");
        assert_eq!(integrity(&file)?, "ok");
        assert_eq!(audit.outcome, OutcomeKind::Migrated);
        assert_eq!(audit.recovery, Some(Recovery::RollbackJournal), "the audit names the recovery");
        let listed = run_json(&mut dlq(&ts.url, &Dlq::Embedded, &["list", "--json"]))?;
        assert_eq!(listed, serde_json::json!([]), "no dead letters left");

        // Verification replays the journal the same way and finds the migration sound.
        let report = run_json(&mut verify_cmd(&ts.url, &[]))?;
        assert_eq!(report["checked"], 2, "{report}");
        assert_eq!(report["problems"], serde_json::json!([]), "{report}");

        assert!(snapshot(&store, keys::V1_PREFIX).await? == v1_before, "v1 must be byte-identical");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_actor_migrates_every_committed_row_with_checkpoint_wal_and_shm_only_actor_with_discard_shm() -> Result<()>
{
    bounded(Duration::from_secs(120), async {
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        let (in_main, in_wal) = (30u32, 25u32);
        let wal_files =
            fixtures::wal(&DbSpec { rows: in_main, payload: 200, page_size: 4096, seed: 21 }, in_wal).map_err(msg)?;
        ensure!(wal_files.wal.as_ref().is_some_and(|w| !w.is_empty()), "fixture: no WAL");
        // The last rows are committed only in the WAL: the main file alone lacks them.
        assert_eq!(items(&wal_files.main)?, i64::from(in_main), "fixture: main file alone");
        let shm_rows = 12u32;
        let shm_files = fixtures::checkpointed_main(
            &fixtures::wal(&DbSpec { rows: shm_rows, payload: 100, page_size: 4096, seed: 22 }, 0).map_err(msg)?,
        )
        .map_err(msg)?;
        ensure!(shm_files.shm.is_some() && shm_files.wal.is_none(), "fixture: SHM only");
        let (wal_actor, shm_actor) = (id("wal-actor"), id("shm-actor"));
        write(&store, &wal_actor, &wal_files).await?;
        write(&store, &shm_actor, &shm_files).await?;
        let v1_before = snapshot(&store, keys::V1_PREFIX).await?;

        let summary = run_json(&mut local_run(&ts.url))?;
        assert_eq!(summary["dead_letters"]["wal_sidecar"], 1, "{summary}");
        assert_eq!(summary["dead_letters"]["shm_sidecar"], 1, "{summary}");
        assert_eq!(audit(&store, &wal_actor).await?.reason, Some(DeadLetterReason::WalSidecar));
        assert_eq!(audit(&store, &shm_actor).await?.reason, Some(DeadLetterReason::ShmSidecar));

        // discard_shm does not fit a WAL rejection (it would lose the WAL's rows).
        let refused = run_json_nothing(&mut dlq(
            &ts.url,
            &Dlq::Embedded,
            &["requeue", wal_actor.as_str(), "--recovery", "discard_shm", "--json"],
        ))?;
        assert_eq!(refused["actors"], serde_json::json!([]), "{refused}");
        assert_eq!(head(&store, &wal_actor).await?, None);

        let wal_done = run_json(&mut dlq(
            &ts.url,
            &Dlq::Embedded,
            &["requeue", "--reason", "wal_sidecar", "--recovery", "checkpoint_wal", "--json"],
        ))?;
        assert_eq!(wal_done["actors"], serde_json::json!([wal_actor.as_str()]), "{wal_done}");
        assert_eq!(wal_done["outcomes"][wal_actor.as_str()], "migrated", "{wal_done}");
        let (file, audit_wal) = migrated_file(&store, &wal_actor).await?;
        assert_eq!(items(&file)?, i64::from(in_main + in_wal), "every committed row, the WAL's included");
        assert_eq!(integrity(&file)?, "ok");
        assert_eq!(audit_wal.recovery, Some(Recovery::CheckpointWal));
        assert!(store.get(&keys::dead(&shm_actor)).await?.is_some(), "the SHM actor was not selected");

        let shm_done = run_json(&mut dlq(
            &ts.url,
            &Dlq::Embedded,
            &["requeue", shm_actor.as_str(), "--recovery", "discard_shm", "--json"],
        ))?;
        assert_eq!(shm_done["outcomes"][shm_actor.as_str()], "migrated", "{shm_done}");
        let (file, audit_shm) = migrated_file(&store, &shm_actor).await?;
        assert!(file == shm_files.main, "discard_shm migrates the main file byte for byte");
        assert_eq!(items(&file)?, i64::from(shm_rows));
        assert_eq!(integrity(&file)?, "ok");
        assert_eq!(audit_shm.recovery, Some(Recovery::DiscardShm));
        assert_eq!(snapshot(&store, keys::DEAD_PREFIX).await?.len(), 0, "no dead letters left");

        let report = run_json(&mut verify_cmd(&ts.url, &[]))?;
        assert_eq!(report["checked"], 2, "{report}");
        assert_eq!(report["problems"], serde_json::json!([]), "{report}");
        assert!(snapshot(&store, keys::V1_PREFIX).await? == v1_before, "v1 must be byte-identical");
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Broker: list, summary, requeue, interruption.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_listing_keeps_dead_letters_and_requeue_moves_exactly_the_selected_ones_with_their_recovery()
-> Result<()> {
    bounded(Duration::from_secs(180), async {
        let broker = Broker::new("ferry_t_triage", 10).await?;
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        let logs = tempfile::tempdir()?;
        let campaign = "triage-c1";
        let committed = 20u32;
        let journal = fixtures::hot_journal(&DbSpec { rows: committed, payload: 100, page_size: 4096, seed: 31 }, 200)
            .map_err(msg)?;
        let wal = fixtures::wal(&DbSpec { rows: 10, payload: 100, page_size: 4096, seed: 32 }, 5).map_err(msg)?;
        let corrupt = DbFiles { main: fixtures::scribbled(&DbSpec::small(33)).map_err(msg)?, ..DbFiles::default() };
        let mut planted: BTreeMap<ActorId, Option<DeadLetterReason>> = BTreeMap::new();
        for i in 0..6 {
            let a = id(&format!("n-{i}"));
            write(&store, &a, &plain(&DbSpec::small(40 + i))?).await?;
            planted.insert(a, None);
        }
        for (name, files, reason, n) in [
            ("j", &journal, DeadLetterReason::JournalSidecar, 3),
            ("w", &wal, DeadLetterReason::WalSidecar, 2),
            ("c", &corrupt, DeadLetterReason::IntegrityCheckFailed, 1),
        ] {
            for i in 0..n {
                let a = id(&format!("{name}-{i}"));
                write(&store, &a, files).await?;
                planted.insert(a, Some(reason));
            }
        }
        let journal_actors: BTreeSet<String> = planted
            .iter()
            .filter(|(_, r)| **r == Some(DeadLetterReason::JournalSidecar))
            .map(|(a, _)| a.to_string())
            .collect();
        let rejected = planted.values().filter(|r| r.is_some()).count() as u32;

        let mut enqueue = command("ferry-producer");
        enqueue.args(["enqueue", "--store", &ts.url, "--amqp", &amqp_url(), "--queue-prefix", broker.prefix()]);
        enqueue.args(["--campaign", campaign, "--json"]);
        let enqueued = run_json(&mut enqueue)?;
        assert_eq!(enqueued["published"], planted.len(), "{enqueued}");

        let mut worker = Proc::spawn("worker-1", worker_run(&ts.url, broker.prefix()), logs.path())?;
        wait_until("the campaign to end", Duration::from_secs(60), || async {
            let (dead, work) = (broker.dead().await?, broker.work().await?);
            let mut audited = 0;
            for a in planted.keys() {
                if store.get(&keys::audit(a)).await?.is_some() {
                    audited += 1;
                }
            }
            Ok((
                dead == rejected && work == 0 && audited == planted.len(),
                format!("dead={dead} work={work} audited={audited}"),
            ))
        })
        .await
        .with_context(|| worker.log_tail())?;
        worker.sigterm()?;
        ensure!(worker.wait_exit(Duration::from_secs(30)).await?.success(), "worker exit: {}", worker.log_tail());
        for (a, reason) in &planted {
            let audit = audit(&store, a).await?;
            match reason {
                Some(r) => assert_eq!((audit.outcome, audit.reason), (OutcomeKind::DeadLettered, Some(*r)), "{a}"),
                None => assert_eq!(audit.outcome, OutcomeKind::Migrated, "{a}"),
            }
        }

        // A duplicate of one actor's dead letter (a job that was dead-lettered twice).
        let letters = broker.peek_dead().await?;
        assert_eq!(letters.len() as u32, rejected);
        let dup = letters.iter().find(|d| d.reason == DeadLetterReason::JournalSidecar).context("a journal letter")?;
        broker.publish_dead(std::slice::from_ref(dup)).await?;
        let total = rejected + 1;
        broker.wait_count(&broker.topology.dead_queue(), total, Duration::from_secs(10)).await?;

        // Reading is not consuming.
        let listed = run_json(&mut dlq(&ts.url, &broker.source(), &["list", "--json"]))?;
        assert_eq!(listed.as_array().map(Vec::len), Some(total as usize), "{listed}");
        broker.wait_count(&broker.topology.dead_queue(), total, Duration::from_secs(10)).await?;
        let summary = run_json(&mut dlq(&ts.url, &broker.source(), &["summary", "--json"]))?;
        let groups: BTreeMap<String, (u64, u64)> = summary
            .as_array()
            .context("summary is an array")?
            .iter()
            .map(|g| {
                (
                    g["reason"].as_str().unwrap_or("").to_string(),
                    (g["count"].as_u64().unwrap_or(0), g["actors"].as_u64().unwrap_or(0)),
                )
            })
            .collect();
        let expected: BTreeMap<String, (u64, u64)> = [
            ("integrity_check_failed".to_string(), (1, 1)),
            ("journal_sidecar".to_string(), (4, 3)),
            ("wal_sidecar".to_string(), (2, 2)),
        ]
        .into();
        assert_eq!(groups, expected, "{summary}");
        broker.wait_count(&broker.topology.dead_queue(), total, Duration::from_secs(10)).await?;
        let shown = run_json(&mut dlq(&ts.url, &broker.source(), &["show", &dup.actor_id]))?;
        assert_eq!(shown["dead_letters"].as_array().map(Vec::len), Some(2), "{shown}");
        broker.wait_count(&broker.topology.dead_queue(), total, Duration::from_secs(10)).await?;

        // A recovery that fits none of the selection moves nothing.
        let none = run_json_nothing(&mut dlq(
            &ts.url,
            &broker.source(),
            &["requeue", "--reason", "wal_sidecar", "--recovery", "rollback_journal", "--json"],
        ))?;
        assert_eq!(none["actors"], serde_json::json!([]), "{none}");
        assert_eq!(none["skipped"].as_array().map(Vec::len), Some(2), "{none}");
        broker.wait_count(&broker.topology.dead_queue(), total, Duration::from_secs(10)).await?;
        assert_eq!(broker.work().await?, 0);

        let moved = run_json(&mut dlq(
            &ts.url,
            &broker.source(),
            &["requeue", "--reason", "journal_sidecar", "--recovery", "rollback_journal", "--json"],
        ))?;
        let moved_actors: BTreeSet<String> =
            moved["actors"].as_array().context("actors")?.iter().filter_map(|a| a.as_str().map(String::from)).collect();
        assert_eq!(moved_actors, journal_actors, "{moved}");
        assert_eq!(moved["dead_letters_removed"], 4, "{moved}");
        broker.wait_count(&broker.topology.dead_queue(), total - 4, Duration::from_secs(10)).await?;
        broker.wait_count(&broker.topology.work_queue(), 3, Duration::from_secs(10)).await?;
        let jobs = broker.peek_jobs().await?;
        assert_eq!(jobs.len(), 3, "one job per actor, duplicates collapsed");
        let job_actors: BTreeSet<String> = jobs.iter().map(|j| j.actor_id.to_string()).collect();
        assert_eq!(job_actors, journal_actors);
        for j in &jobs {
            assert_eq!(j.recovery, Some(Recovery::RollbackJournal), "{j:?}");
            assert_eq!(j.campaign, campaign);
        }
        let left: Vec<DeadLetterReason> = broker.peek_dead().await?.iter().map(|d| d.reason).collect();
        assert!(left.iter().all(|r| *r != DeadLetterReason::JournalSidecar), "{left:?}");

        // The requeued jobs migrate the committed rows.
        let mut worker = Proc::spawn("worker-2", worker_run(&ts.url, broker.prefix()), logs.path())?;
        wait_until("the requeued actors to migrate", Duration::from_secs(60), || async {
            let mut migrated = 0;
            for a in &journal_actors {
                if audit(&store, &id(a)).await?.outcome == OutcomeKind::Migrated {
                    migrated += 1;
                }
            }
            let work = broker.work().await?;
            Ok((migrated == journal_actors.len() && work == 0, format!("migrated={migrated} work={work}")))
        })
        .await
        .with_context(|| worker.log_tail())?;
        worker.sigterm()?;
        ensure!(worker.wait_exit(Duration::from_secs(30)).await?.success(), "worker exit: {}", worker.log_tail());
        for a in &journal_actors {
            let (file, audit) = migrated_file(&store, &id(a)).await?;
            assert_eq!(audit.recovery, Some(Recovery::RollbackJournal), "{a}");
            assert_eq!(items(&file)?, i64::from(committed), "{a}");
        }
        assert_eq!(broker.dead().await?, total - 4, "the other dead letters stay");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_listing_and_requeue_lose_no_dead_letter() -> Result<()> {
    bounded(Duration::from_secs(240), async {
        // A generous delivery limit: this test reads the work queue more than once.
        let broker = Broker::new("ferry_t_interrupt", 1000).await?;
        let ts = TestStore::new(Backend::Sqlite).await;
        let logs = tempfile::tempdir()?;
        let n = 600u32;
        let actors: BTreeSet<String> = (0..n).map(|i| format!("i-{i:05}")).collect();
        let letters: Vec<DeadLetter> = actors
            .iter()
            .enumerate()
            .map(|(i, a)| dead_letter(a, "interrupt", DeadLetterReason::JournalSidecar, i as i64))
            .collect();
        broker.publish_dead(&letters).await?;
        let dead_q = broker.topology.dead_queue();
        broker.wait_count(&dead_q, n, Duration::from_secs(10)).await?;

        // A reader that fetches without ack and drops its handles without acking or closing.
        {
            let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            for _ in 0..50 {
                ch.basic_get(dead_q.as_str().into(), BasicGetOptions::default()).await?.context("a dead letter")?;
            }
            assert_eq!(broker.dead().await?, n - 50, "50 held unacked");
            drop(ch);
            drop(conn);
        }
        broker.wait_count(&dead_q, n, Duration::from_secs(15)).await?;

        // `dlq list` killed (SIGKILL) while it holds fetched messages.
        let mut interrupted = false;
        for attempt in 0..5 {
            let mut list = Proc::spawn(
                &format!("list-{attempt}"),
                dlq(&ts.url, &broker.source(), &["list", "--json"]),
                logs.path(),
            )?;
            loop {
                let ready = broker.dead().await?;
                if ready < n - 20 && list.running() {
                    list.sigkill()?;
                    eprintln!("dlq list killed holding {} messages (attempt {attempt})", n - ready);
                    interrupted = true;
                    break;
                }
                if !list.running() {
                    break;
                }
            }
            broker.wait_count(&dead_q, n, Duration::from_secs(15)).await?;
            if interrupted {
                break;
            }
        }
        ensure!(interrupted, "could not catch `dlq list` while it held messages");

        // `dlq requeue` killed after it started moving.
        let requeue_args = ["requeue", "--reason", "journal_sidecar", "--recovery", "rollback_journal", "--json"];
        let mut requeue = Proc::spawn("requeue", dlq(&ts.url, &broker.source(), &requeue_args), logs.path())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while broker.work().await? < 5 {
            ensure!(requeue.running(), "the requeue ended before it could be interrupted: {}", requeue.log_tail());
            ensure!(Instant::now() < deadline, "the requeue moved nothing in 30 s: {}", requeue.log_tail());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ensure!(requeue.running(), "the requeue finished before it could be interrupted");
        requeue.sigkill()?;
        // Its unacked dead letters go back to the queue once the broker sees the connection die.
        let deadline = Instant::now() + Duration::from_secs(30);
        let last = loop {
            let dead: BTreeSet<String> = broker.peek_dead().await?.into_iter().map(|d| d.actor_id).collect();
            let work: BTreeSet<String> =
                broker.peek_jobs().await?.into_iter().map(|j| j.actor_id.to_string()).collect();
            let union: BTreeSet<&String> = dead.iter().chain(work.iter()).collect();
            if union.len() == actors.len() {
                break (dead.len(), work.len());
            }
            ensure!(
                Instant::now() < deadline,
                "actors in neither queue: dead={} work={} union={}",
                dead.len(),
                work.len(),
                union.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (dead_left, moved) = last;
        eprintln!("requeue killed with {moved} actors moved and {dead_left} dead letters left");
        ensure!(dead_left > 0 && moved > 0 && moved < n as usize, "not interrupted half-way: {last:?}");

        // Running it again finishes the move: every actor has a job, no dead letter is left.
        let done = run_json(&mut dlq(&ts.url, &broker.source(), &requeue_args))?;
        assert_eq!(done["dead_letters_removed"].as_u64(), Some(dead_left as u64), "{done}");
        broker.wait_count(&dead_q, 0, Duration::from_secs(15)).await?;
        let jobs = broker.peek_jobs().await?;
        let job_actors: BTreeSet<String> = jobs.iter().map(|j| j.actor_id.to_string()).collect();
        assert_eq!(job_actors, actors, "every actor has a job");
        assert!(jobs.iter().all(|j| j.recovery == Some(Recovery::RollbackJournal)));
        // At worst a message is in both queues: the kill can duplicate the job in flight.
        assert!(jobs.len() <= actors.len() + 2, "{} jobs for {} actors", jobs.len(), actors.len());
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_a_clean_campaign_clean_and_finds_planted_v1_drift_and_v2_corruption() -> Result<()> {
    bounded(Duration::from_secs(120), async {
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        let actors: Vec<ActorId> = (0..8).map(|i| id(&format!("v-{i}"))).collect();
        for (i, a) in actors.iter().enumerate() {
            let spec = DbSpec { rows: 30 + i as u32 * 10, payload: 500, page_size: 4096, seed: 50 + i as u64 };
            write(&store, a, &plain(&spec)?).await?;
        }
        let summary = run_json(&mut local_run(&ts.url))?;
        assert_eq!(summary["outcomes"]["migrated"], actors.len(), "{summary}");

        let clean = output(&mut verify_cmd(&ts.url, &[]))?;
        assert!(clean.status.success(), "verify of a clean campaign: {}", String::from_utf8_lossy(&clean.stderr));
        let report: Value = serde_json::from_slice(&clean.stdout)?;
        assert_eq!(report["checked"], actors.len(), "{report}");
        assert_eq!(report["counts"]["ok"], actors.len(), "{report}");
        assert_eq!(report["problems"], serde_json::json!([]), "{report}");
        let by_campaign = run_json(&mut verify_cmd(&ts.url, &["--campaign", "local"]))?;
        assert_eq!(by_campaign["checked"], actors.len(), "{by_campaign}");

        // v1 drift: a v1 chunk rewritten after the migration.
        let drifted = &actors[0];
        let key = chunk_key(drifted, FileTag::Main, 1);
        let mut chunk = store.get(&key).await?.context("chunk 1")?;
        chunk[200] ^= 0xff;
        let mut txn = Txn::new();
        txn.set(key, chunk);
        store.commit(txn).await?;

        // v2 corruption: one byte of a page inside the LTX blob.
        let flipped = &actors[1];
        let delta = store.scan(&KeyRange::prefix(&ferry::v2::keys::delta_prefix(flipped)), 1).await?;
        let (key, mut value) = delta.into_iter().next().context("a DELTA row")?;
        // Header (100 bytes), frame header (10), then page 1 compressed: flip inside it.
        value[100 + 10 + 40] ^= 0x55;
        let mut txn = Txn::new();
        txn.set(key, value);
        store.commit(txn).await?;

        // v2 corruption: a PIDX row pointing at a txid that does not exist.
        let repointed = &actors[2];
        let h = head(&store, repointed).await?.context("head")?;
        let mut txn = Txn::new();
        txn.set(ferry::v2::keys::pidx(repointed, 2), (h.head_txid + 7).to_be_bytes().to_vec());
        store.commit(txn).await?;

        let out = output(&mut verify_cmd(&ts.url, &[]))?;
        assert_eq!(out.status.code(), Some(3), "verify exits 3 when it finds problems");
        let report: Value = serde_json::from_slice(&out.stdout)?;
        let problems: BTreeMap<String, String> = report["problems"]
            .as_array()
            .context("problems")?
            .iter()
            .map(|p| (p["actor"].as_str().unwrap_or("").to_string(), p["verdict"].as_str().unwrap_or("").to_string()))
            .collect();
        let expected: BTreeMap<String, String> = [
            (drifted.to_string(), "v1_drift".to_string()),
            (flipped.to_string(), "v2_corrupt".to_string()),
            (repointed.to_string(), "v2_corrupt".to_string()),
        ]
        .into();
        assert_eq!(problems, expected, "{report}");
        assert_eq!(report["counts"]["ok"], actors.len() - 3, "{report}");
        assert_eq!(report["checked"], actors.len(), "{report}");

        // Selecting only sound actors is clean again.
        let some = run_json(&mut verify_cmd(&ts.url, &["--actor", actors[3].as_str(), "--actor", actors[4].as_str()]))?;
        assert_eq!((some["checked"].as_u64(), some["problems"].clone()), (Some(2), serde_json::json!([])), "{some}");
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// export and purge
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_export_csv_has_one_row_per_dead_letter_and_purge_needs_yes_and_is_audited() -> Result<()> {
    bounded(Duration::from_secs(120), async {
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        let journal =
            fixtures::hot_journal(&DbSpec { rows: 10, payload: 80, page_size: 4096, seed: 61 }, 100).map_err(msg)?;
        let wal = fixtures::wal(&DbSpec { rows: 10, payload: 80, page_size: 4096, seed: 62 }, 3).map_err(msg)?;
        let mut planted: BTreeMap<String, &str> = BTreeMap::new();
        for i in 0..3 {
            write(&store, &id(&format!("ej-{i}")), &journal).await?;
            planted.insert(format!("ej-{i}"), "journal_sidecar");
        }
        for i in 0..2 {
            write(&store, &id(&format!("ew-{i}")), &wal).await?;
            planted.insert(format!("ew-{i}"), "wal_sidecar");
        }
        write(&store, &id("en-0"), &plain(&DbSpec::small(63))?).await?;
        run_json(&mut local_run(&ts.url))?;
        assert_eq!(snapshot(&store, keys::DEAD_PREFIX).await?.len(), planted.len());

        let csv = run_ok(&mut dlq(&ts.url, &Dlq::Embedded, &["export", "--format", "csv"]))?;
        let rows = parse_csv(&csv);
        assert_eq!(rows[0].join(","), CSV_HEADER, "{csv}");
        let exported: BTreeMap<String, String> = rows[1..].iter().map(|r| (r[0].clone(), r[2].clone())).collect();
        assert_eq!(rows.len() - 1, planted.len(), "one row per dead letter: {csv}");
        let expected: BTreeMap<String, String> = planted.iter().map(|(a, r)| (a.clone(), r.to_string())).collect();
        assert_eq!(exported, expected, "{csv}");
        assert!(rows[1..].iter().all(|r| r.len() == 13), "every row has every column: {csv}");

        let refused = output(&mut dlq(&ts.url, &Dlq::Embedded, &["purge", "--reason", "wal_sidecar"]))?;
        assert!(!refused.status.success(), "purge without --yes must refuse");
        assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"), "the refusal says how to confirm");
        assert_eq!(snapshot(&store, keys::DEAD_PREFIX).await?.len(), planted.len(), "a refused purge drops nothing");

        run_ok(&mut dlq(&ts.url, &Dlq::Embedded, &["purge", "--reason", "wal_sidecar", "--yes"]))?;
        for (a, reason) in &planted {
            let a = id(a);
            let dead = store.get(&keys::dead(&a)).await?;
            let audit = audit(&store, &a).await?;
            if *reason == "wal_sidecar" {
                assert!(dead.is_none(), "{a}: purged");
                assert!(audit.purged_at_ms.is_some(), "{a}: the audit records the purge");
                assert_eq!(audit.reason, Some(DeadLetterReason::WalSidecar), "{a}: what was purged");
            } else {
                assert!(dead.is_some(), "{a}: not selected");
                assert_eq!(audit.purged_at_ms, None, "{a}");
            }
        }
        let after = run_ok(&mut dlq(&ts.url, &Dlq::Embedded, &["export", "--format", "csv"]))?;
        assert_eq!(parse_csv(&after).len(), 1 + 3, "{after}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_export_csv_leaves_the_queue_and_purge_needs_yes_drops_only_the_selection_and_is_audited() -> Result<()>
{
    bounded(Duration::from_secs(120), async {
        let broker = Broker::new("ferry_t_purge", 10).await?;
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        let mut letters = Vec::new();
        for i in 0..3 {
            letters.push(dead_letter(&format!("pj-{i}"), "purge", DeadLetterReason::JournalSidecar, i));
        }
        for i in 0..2 {
            letters.push(dead_letter(&format!("pw-{i}"), "purge", DeadLetterReason::WalSidecar, 10 + i));
        }
        broker.publish_dead(&letters).await?;
        let dead_q = broker.topology.dead_queue();
        broker.wait_count(&dead_q, 5, Duration::from_secs(10)).await?;

        let csv = run_ok(&mut dlq(&ts.url, &broker.source(), &["export", "--format", "csv"]))?;
        let rows = parse_csv(&csv);
        assert_eq!(rows[0].join(","), CSV_HEADER, "{csv}");
        assert_eq!(rows.len() - 1, letters.len(), "one row per dead letter: {csv}");
        let exported: BTreeSet<(String, String)> = rows[1..].iter().map(|r| (r[0].clone(), r[2].clone())).collect();
        let expected: BTreeSet<(String, String)> =
            letters.iter().map(|d| (d.actor_id.clone(), d.reason.as_str().to_string())).collect();
        assert_eq!(exported, expected);
        assert!(rows[1..].iter().all(|r| r.len() == 13 && r[12].contains("with a comma")), "quoted errors: {csv}");
        broker.wait_count(&dead_q, 5, Duration::from_secs(10)).await?;

        let refused = output(&mut dlq(&ts.url, &broker.source(), &["purge", "--reason", "wal_sidecar"]))?;
        assert!(!refused.status.success(), "purge without --yes must refuse");
        broker.wait_count(&dead_q, 5, Duration::from_secs(10)).await?;

        run_ok(&mut dlq(&ts.url, &broker.source(), &["purge", "--reason", "wal_sidecar", "--yes"]))?;
        broker.wait_count(&dead_q, 3, Duration::from_secs(10)).await?;
        let left: BTreeSet<String> = broker.peek_dead().await?.into_iter().map(|d| d.actor_id).collect();
        assert_eq!(left, ["pj-0", "pj-1", "pj-2"].map(String::from).into(), "only the selection is dropped");
        for d in &letters {
            let a = id(&d.actor_id);
            let record = store.get(&keys::audit(&a)).await?;
            if d.reason == DeadLetterReason::WalSidecar {
                let audit = audit(&store, &a).await?;
                assert!(audit.purged_at_ms.is_some(), "{a}: the audit records the purge");
                assert_eq!(audit.reason, Some(DeadLetterReason::WalSidecar));
                assert_eq!(audit.outcome, OutcomeKind::DeadLettered);
            } else {
                assert!(record.is_none(), "{a}: not purged, not touched");
            }
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_the_broker_dead_letters_at_its_delivery_limit_is_triaged_the_same_however_often_it_is_listed() -> Result<()>
{
    bounded(Duration::from_secs(60), async {
        let broker = Broker::new("ferry_t_dlimit", 2).await?;
        let ts = TestStore::new(Backend::Sqlite).await;
        // A job that already used 3 attempts through ferry's retries, then keeps being handed
        // back (a job that kills its workers) until the broker dead-letters it.
        let job = Job::new("dlimit", id("dl-0"), 1_763_900_000_000, None);
        let headers = ferry::queue::amqp::headers(&[(
            ferry::queue::amqp::ATTEMPTS_HEADER,
            lapin::types::AMQPValue::LongLongInt(3),
        )]);
        let props = ferry::queue::amqp::json_properties(&job.message_id(), headers);
        let jobs_x = broker.topology.jobs_exchange();
        let confirm = broker
            .ch
            .basic_publish(jobs_x.as_str().into(), "work".into(), BasicPublishOptions::default(), &job.encode(), props)
            .await?;
        ensure!(confirm.await?.is_ack(), "job not confirmed");
        let ch = broker.conn.create_channel().await?;
        let work_q = broker.topology.work_queue();
        let deadline = Instant::now() + Duration::from_secs(20);
        while broker.dead().await? == 0 {
            ensure!(Instant::now() < deadline, "the broker never dead-lettered the job");
            if let Some(m) = ch.basic_get(work_q.as_str().into(), BasicGetOptions::default()).await? {
                m.delivery.acker.reject(lapin::options::BasicRejectOptions { requeue: true }).await?;
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        ch.close(200, "done".into()).await?;

        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(run_json(&mut dlq(&ts.url, &broker.source(), &["list", "--json"]))?);
            broker.wait_count(&broker.topology.dead_queue(), 1, Duration::from_secs(10)).await?;
        }
        let first = &seen[0][0];
        assert_eq!(first["reason"], "delivery_limit", "{first}");
        assert_eq!((first["actor_id"].as_str(), first["campaign"].as_str()), (Some("dl-0"), Some("dlimit")));
        assert_eq!(first["attempts"], 3, "ferry's attempts, not the triage reads: {first}");
        assert!(seen.iter().all(|s| s == &seen[0]), "listing changed the dead letter: {seen:?}");

        let moved =
            run_json(&mut dlq(&ts.url, &broker.source(), &["requeue", "--reason", "delivery_limit", "--json"]))?;
        assert_eq!(moved["actors"], serde_json::json!(["dl-0"]), "{moved}");
        broker.wait_count(&broker.topology.dead_queue(), 0, Duration::from_secs(10)).await?;
        broker.wait_count(&work_q, 1, Duration::from_secs(10)).await?;
        let jobs = broker.peek_jobs().await?;
        assert_eq!((jobs[0].actor_id.as_str(), jobs[0].recovery), ("dl-0", None));
        Ok(())
    })
    .await
}
