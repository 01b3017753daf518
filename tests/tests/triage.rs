//! End to end: dead-letter triage, recovery and verification, with the built `ferry-worker`
//! and `ferry-producer` binaries against a real SQLite store and the real RabbitMQ broker.
//! Triage reads the store's triage index (every dead letter, fleet and embedded, is written
//! there by the worker), never the broker's dead-letter queue.
//!
//! - embedded mode: hot-journal, WAL and SHM actors are dead-lettered with their reasons, a
//!   requeue without (or with an unfitting) recovery leaves them rejected, and the fitting
//!   recovery migrates exactly the committed rows, recorded in the audit, v1 untouched;
//! - fleet: a campaign's rejections are listed and summarized from the store with no broker,
//!   once per actor (an actor dead-lettered twice is one record, the latest), reading changes
//!   nothing, a requeue moves exactly the selected dead letters to tickets with one job each
//!   (its recovery and its ticket's token set), and the requeued jobs migrate the committed
//!   rows and consume their tickets; a listing or requeue killed half-way loses nothing (every
//!   actor dead or requeued, never both or neither, and a rerun finishes the move); a job
//!   handed back until its delivery limit (its worker killed) is dead-lettered by the next
//!   worker as ONE `delivery_limit` record, the same however often it is listed;
//! - `verify` finds a clean campaign clean, planted v1 drift as `v1_drift`, planted v2
//!   damage as `v2_corrupt`, and an actor whose runtime committed to v2 since as `v2_moved_on`;
//! - `dlq export --format csv` and `dlq purge` (refused without `--yes`, audited with it), in
//!   either mode, with no broker; `dlq sweep` takes out only the letter of an actor migrated
//!   since (a dry run first counts it) and records its skip.
//!
//! Broker tests need RabbitMQ at `ferry::testing::amqp_url()` and fail when it is down. Each
//! uses its own queue prefix, deleted at the end (also on failure). The issue-15 scenarios
//! (broker restart, reads during a campaign, random kills, read-only roles, broker statistics)
//! are in `triage_index.rs`, on both store backends.

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
use ferry::queue::topology::WORK_KEY;
use ferry::store::{DynStore, KeyRange, KeyValue, Txn};
use ferry::synth::sqlite::{self as fixtures, DbFiles, DbSpec};
use ferry::synth::write_v1;
use ferry::testing::{Backend, TestStore, amqp_url, unique_name};
use ferry::triage::ticket::{self, Ticket};
use ferry::v1::FileTag;
use ferry::v1::keys::chunk_key;
use ferry::v2::ltx::{self, LtxHeader};
use ferry::v2::{DBHead, Origin, read_v2};
use ferry::{ActorId, DeadLetterReason, Recovery};
use ferry_tests::Proc;
use ferry_tests::{bin, index_as_worker};
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

/// Runs a requeue that did nothing: it exits 4 ("nothing matched") and still prints its JSON
/// report.
fn run_json_nothing(cmd: &mut Command) -> Result<Value> {
    run_json_did_nothing(cmd, "nothing requeued")
}

/// Runs a command that did nothing: exit 4, `why` on stderr, its JSON report on stdout.
fn run_json_did_nothing(cmd: &mut Command, why: &str) -> Result<Value> {
    let out = output(cmd)?;
    ensure!(
        out.status.code() == Some(4),
        "{cmd:?}: exit {}, not 4: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stderr).contains(why), "{cmd:?} does not say why");
    serde_json::from_slice(&out.stdout).with_context(|| format!("stdout of {cmd:?} is not JSON"))
}

/// How `ferry-producer dlq` is run: every read is of the store's triage index whatever the
/// mode; the mode says where a requeue goes.
#[derive(Clone)]
enum Dlq {
    /// The store alone: no broker settings at all (what every read needs).
    Store,
    /// `--embedded`: a requeue re-runs the jobs in the command.
    Embedded,
    /// A broker: a requeue publishes the jobs there.
    Broker { prefix: String, delivery_limit: i64 },
}

fn dlq(store_url: &str, source: &Dlq, args: &[&str]) -> Command {
    let mut cmd = command("ferry-producer");
    cmd.args(["dlq", "--store", store_url]);
    match source {
        Dlq::Store => {}
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

/// The dead letters of the triage index, by actor (records, not the broker's queue).
async fn indexed(store: &DynStore) -> Result<BTreeMap<String, DeadLetter>> {
    let mut out = BTreeMap::new();
    for (key, raw) in snapshot(store, keys::DEAD_PREFIX).await? {
        let d =
            DeadLetter::decode(&raw).with_context(|| format!("{}: record does not decode", keys::printable(&key)))?;
        ensure!(out.insert(d.actor_id.clone(), d).is_none(), "two records of one actor");
    }
    Ok(out)
}

/// The pending requeue tickets, by actor.
async fn tickets(store: &DynStore) -> Result<BTreeMap<String, Ticket>> {
    let mut out = BTreeMap::new();
    for (key, raw) in snapshot(store, ticket::REQUEUE_PREFIX).await? {
        let actor = String::from_utf8_lossy(&key[ticket::REQUEUE_PREFIX.len()..]).into_owned();
        out.insert(actor, Ticket::decode(&raw).context("a ticket does not decode")?);
    }
    Ok(out)
}

/// Every row of the triage index (records and both index families).
async fn index_rows(store: &DynStore) -> Result<Vec<KeyValue>> {
    snapshot(store, b"ferry/dead").await
}

/// `dlq summary --json` groups as reason -> (letters, actors).
fn summary_groups(summary: &Value) -> Result<BTreeMap<String, (u64, u64)>> {
    let groups = summary["groups"].as_array().with_context(|| format!("summary has no groups: {summary}"))?;
    Ok(groups
        .iter()
        .map(|g| {
            let n = |f: &str| g[f].as_u64().unwrap_or(0);
            (g["reason"].as_str().unwrap_or("").to_string(), (n("count"), n("actors")))
        })
        .collect())
}

fn actor_ids(listed: &Value) -> Result<Vec<String>> {
    let letters = listed.as_array().with_context(|| format!("not a list: {listed}"))?;
    Ok(letters.iter().map(|d| d["actor_id"].as_str().unwrap_or("").to_string()).collect())
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

fn worker_run(store_url: &str, topology: &Topology) -> Command {
    let mut cmd = command("ferry-worker");
    cmd.args(["run", "--store", store_url, "--amqp", &amqp_url(), "--queue-prefix", &topology.prefix]);
    cmd.args(["--delivery-limit", &topology.delivery_limit.to_string()]);
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

    /// Publishes a job to the jobs exchange with `headers`, confirmed.
    async fn publish_job(&self, job: &Job, headers: FieldTable) -> Result<()> {
        let props = ferry::queue::amqp::json_properties(&job.message_id(), headers);
        let jobs_x = self.topology.jobs_exchange();
        let confirm = self
            .ch
            .basic_publish(
                jobs_x.as_str().into(),
                WORK_KEY.into(),
                BasicPublishOptions::default(),
                &job.encode(),
                props,
            )
            .await?;
        ensure!(confirm.await?.is_ack(), "the broker nacked a job");
        Ok(())
    }

    /// Every ready message of a queue, fetched without ack on a channel that is then closed,
    /// so they all go back (each read counts as a delivery on a quorum queue: keep the
    /// delivery limit above the number of peeks).
    async fn peek(&self, queue: &str) -> Result<Vec<(BasicProperties, Vec<u8>)>> {
        let ch = self.conn.create_channel().await?;
        let mut out = Vec::new();
        while let Some(m) = ch.basic_get(queue.into(), BasicGetOptions::default()).await? {
            out.push((m.delivery.properties.clone(), m.delivery.data.clone()));
        }
        ch.close(200, "peeked".into()).await?;
        Ok(out)
    }

    /// The jobs waiting in the work queue, each with the requeue token it carries.
    async fn peek_jobs(&self) -> Result<Vec<(Job, Option<String>)>> {
        let messages = self.peek(&self.topology.work_queue()).await?;
        messages
            .iter()
            .map(|(props, body)| {
                let token = ferry::queue::amqp::str_header(props, ticket::TOKEN_HEADER);
                Ok((Job::parse(body).map_err(msg)?, token))
            })
            .collect()
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
// Fleet: list, summary, show from the store's triage index; requeue through the broker;
// interruption.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_dead_letters_are_listed_once_per_actor_from_the_store_and_requeue_moves_exactly_the_selected_ones_with_their_recovery()
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
        let rejected_actors: BTreeSet<String> =
            planted.iter().filter(|(_, r)| r.is_some()).map(|(a, _)| a.to_string()).collect();
        let rejected = rejected_actors.len() as u64;

        let mut enqueue = command("ferry-producer");
        enqueue.args(["enqueue", "--store", &ts.url, "--amqp", &amqp_url(), "--queue-prefix", broker.prefix()]);
        enqueue.args(["--delivery-limit", &broker.topology.delivery_limit.to_string()]);
        enqueue.args(["--campaign", campaign, "--json"]);
        let enqueued = run_json(&mut enqueue)?;
        assert_eq!(enqueued["published"], planted.len(), "{enqueued}");

        // The campaign's end, as the store says it: every actor audited, every rejection in
        // the triage index (the broker's dead-letter queue is not where triage looks).
        let mut worker = Proc::spawn("worker-1", worker_run(&ts.url, &broker.topology), logs.path())?;
        wait_until("the campaign to end", Duration::from_secs(60), || async {
            let dead = ferry::triage::summary(&store).await?.dead_letters;
            let work = broker.work().await?;
            let mut audited = 0;
            for a in planted.keys() {
                if store.get(&keys::audit(a)).await?.is_some() {
                    audited += 1;
                }
            }
            Ok((
                dead == rejected && work == 0 && audited == planted.len(),
                format!("indexed={dead} work={work} audited={audited}"),
            ))
        })
        .await
        .with_context(|| worker.log_tail())?;
        for (a, reason) in &planted {
            let audit = audit(&store, a).await?;
            match reason {
                Some(r) => assert_eq!((audit.outcome, audit.reason), (OutcomeKind::DeadLettered, Some(*r)), "{a}"),
                None => assert_eq!(audit.outcome, OutcomeKind::Migrated, "{a}"),
            }
        }
        let first = indexed(&store).await?;
        assert_eq!(first.keys().cloned().collect::<BTreeSet<_>>(), rejected_actors);

        // One actor's job dead-lettered twice (a duplicate job): still one record, the latest.
        let dup = id("j-0");
        let before = audit(&store, &dup).await?.finished_at_ms;
        broker.publish_job(&Job::new(campaign, dup.clone(), 1_763_900_000_000, None), FieldTable::default()).await?;
        wait_until("the duplicate job to be dead-lettered again", Duration::from_secs(30), || async {
            let now = audit(&store, &dup).await?.finished_at_ms;
            Ok((now > before, format!("finished_at_ms {before} -> {now}")))
        })
        .await
        .with_context(|| worker.log_tail())?;
        worker.sigterm()?;
        ensure!(worker.wait_exit(Duration::from_secs(30)).await?.success(), "worker exit: {}", worker.log_tail());
        let second = indexed(&store).await?;
        assert_eq!(second.len() as u64, rejected, "one record per actor");
        assert!(second[dup.as_str()].at_ms > first[dup.as_str()].at_ms, "the latest dead letter is kept");
        assert_eq!(ferry::triage::summary(&store).await?.dead_letters, rejected);

        // Reading needs no broker and changes nothing.
        let rows_before = index_rows(&store).await?;
        let listed = run_json(&mut dlq(&ts.url, &Dlq::Store, &["list", "--json"]))?;
        let mut listed_actors = actor_ids(&listed)?;
        listed_actors.sort();
        assert_eq!(listed_actors, rejected_actors.iter().cloned().collect::<Vec<_>>(), "each once: {listed}");
        let summary = run_json(&mut dlq(&ts.url, &Dlq::Store, &["summary", "--json"]))?;
        let expected: BTreeMap<String, (u64, u64)> = [
            ("integrity_check_failed".to_string(), (1, 1)),
            ("journal_sidecar".to_string(), (3, 3)),
            ("wal_sidecar".to_string(), (2, 2)),
        ]
        .into();
        assert_eq!(summary_groups(&summary)?, expected, "{summary}");
        assert_eq!((summary["dead_letters"].as_u64(), summary["requeues_pending"].as_u64()), (Some(rejected), Some(0)));
        let shown = run_json(&mut dlq(&ts.url, &Dlq::Store, &["show", dup.as_str()]))?;
        assert_eq!(shown["dead_letters"].as_array().map(Vec::len), Some(1), "one record per actor: {shown}");
        assert_eq!(shown["dead_letters"][0]["at_ms"], second[dup.as_str()].at_ms, "{shown}");
        assert_eq!(shown["audit"]["reason"], "journal_sidecar", "{shown}");
        assert!(index_rows(&store).await? == rows_before, "reading changed the index");

        // A recovery that fits none of the selection moves nothing.
        let none = run_json_nothing(&mut dlq(
            &ts.url,
            &broker.source(),
            &["requeue", "--reason", "wal_sidecar", "--recovery", "rollback_journal", "--json"],
        ))?;
        assert_eq!(none["actors"], serde_json::json!([]), "{none}");
        assert_eq!(none["skipped"].as_array().map(Vec::len), Some(2), "{none}");
        assert!(index_rows(&store).await? == rows_before, "a refused requeue changed the index");
        assert_eq!(broker.work().await?, 0);

        let moved = run_json(&mut dlq(
            &ts.url,
            &broker.source(),
            &["requeue", "--reason", "journal_sidecar", "--recovery", "rollback_journal", "--json"],
        ))?;
        let moved_actors: BTreeSet<String> =
            moved["actors"].as_array().context("actors")?.iter().filter_map(|a| a.as_str().map(String::from)).collect();
        assert_eq!(moved_actors, journal_actors, "{moved}");
        assert_eq!(moved["dead_letters_removed"], 3, "one record per actor moved: {moved}");
        assert_eq!(moved["republished"], serde_json::json!([]), "{moved}");
        broker.wait_count(&broker.topology.work_queue(), 3, Duration::from_secs(10)).await?;
        // Each moved actor is now a ticket, not a dead letter; its job carries the ticket's token.
        let pending = tickets(&store).await?;
        assert_eq!(pending.keys().cloned().collect::<BTreeSet<_>>(), journal_actors);
        let left = indexed(&store).await?;
        assert!(left.keys().all(|a| !journal_actors.contains(a)), "{left:?}");
        assert_eq!(left.len() as u64, rejected - 3);
        let jobs = broker.peek_jobs().await?;
        assert_eq!(jobs.len(), 3, "one job per actor, duplicates collapsed: {jobs:?}");
        let job_actors: BTreeSet<String> = jobs.iter().map(|(j, _)| j.actor_id.to_string()).collect();
        assert_eq!(job_actors, journal_actors);
        for (j, token) in &jobs {
            assert_eq!(j.recovery, Some(Recovery::RollbackJournal), "{j:?}");
            assert_eq!(j.campaign, campaign);
            assert_eq!(token.as_deref(), Some(pending[j.actor_id.as_str()].token.as_str()), "{j:?}");
        }
        let summary = run_json(&mut dlq(&ts.url, &Dlq::Store, &["summary", "--json"]))?;
        assert_eq!(
            (summary["dead_letters"].as_u64(), summary["requeues_pending"].as_u64()),
            (Some(rejected - 3), Some(3))
        );
        let requeued = output(&mut dlq(&ts.url, &Dlq::Store, &["show", dup.as_str()]))?;
        assert_eq!(requeued.status.code(), Some(4), "a requeued actor has no dead letter");
        let shown: Value = serde_json::from_slice(&requeued.stdout)?;
        assert_eq!(shown["requeue"]["token"].as_str(), Some(pending[dup.as_str()].token.as_str()), "{shown}");
        assert!(String::from_utf8_lossy(&requeued.stderr).contains("requeued"), "show says where it is");

        // The requeued jobs migrate the committed rows and consume their tickets.
        let mut worker = Proc::spawn("worker-2", worker_run(&ts.url, &broker.topology), logs.path())?;
        wait_until("the requeued actors to migrate", Duration::from_secs(60), || async {
            let mut migrated = 0;
            for a in &journal_actors {
                if audit(&store, &id(a)).await?.outcome == OutcomeKind::Migrated {
                    migrated += 1;
                }
            }
            let work = broker.work().await?;
            let pending = tickets(&store).await?.len();
            Ok((
                migrated == journal_actors.len() && work == 0 && pending == 0,
                format!("migrated={migrated} work={work} tickets={pending}"),
            ))
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
        assert_eq!(indexed(&store).await?, left, "the other dead letters stay as they were");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listing_changes_nothing_and_killed_requeue_leaves_every_actor_dead_or_requeued_never_both_or_neither()
-> Result<()> {
    use std::os::unix::process::ExitStatusExt;
    bounded(Duration::from_secs(240), async {
        // A generous delivery limit: this test reads the work queue more than once.
        let broker = Broker::new("ferry_t_interrupt", 1000).await?;
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        let logs = tempfile::tempdir()?;
        let n = 600u32;
        let actors: BTreeSet<String> = (0..n).map(|i| format!("i-{i:05}")).collect();
        let letters: Vec<DeadLetter> = actors
            .iter()
            .enumerate()
            .map(|(i, a)| dead_letter(a, "interrupt", DeadLetterReason::JournalSidecar, i as i64))
            .collect();
        // Written straight into the store as workers write them (a campaign of 600 rejected
        // actors would only take longer).
        index_as_worker(&store, &letters).await?;
        let rows_before = index_rows(&store).await?;

        // `dlq list` killed (SIGKILL) while it reads: the index is as it was.
        let mut interrupted = 0;
        for attempt in 0..20u64 {
            let mut list =
                Proc::spawn(&format!("list-{attempt}"), dlq(&ts.url, &Dlq::Store, &["list", "--json"]), logs.path())?;
            tokio::time::sleep(Duration::from_millis(2 * attempt)).await;
            let status = list.sigkill()?;
            if status.signal() == Some(9) {
                interrupted += 1;
            }
            ensure!(index_rows(&store).await? == rows_before, "a killed listing changed the index");
        }
        ensure!(interrupted > 0, "could not catch `dlq list` while it ran");

        // `dlq requeue` killed after it started publishing.
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
        // Every actor is in exactly one place in the store: dead, or requeued (a ticket).
        let dead = indexed(&store).await?;
        let pending = tickets(&store).await?;
        let both: Vec<&String> = dead.keys().filter(|a| pending.contains_key(*a)).collect();
        assert!(both.is_empty(), "dead and requeued at once: {both:?}");
        let union: BTreeSet<String> = dead.keys().chain(pending.keys()).cloned().collect();
        assert_eq!(union, actors, "actors in neither place");
        ensure!(
            !dead.is_empty() && !pending.is_empty(),
            "not interrupted half-way: {} dead, {} requeued",
            dead.len(),
            pending.len()
        );
        eprintln!("requeue killed with {} actors requeued and {} dead letters left", pending.len(), dead.len());
        // A published job is always one of a ticket's.
        for (job, token) in broker.peek_jobs().await? {
            let t = pending
                .get(job.actor_id.as_str())
                .with_context(|| format!("{}: a job with no ticket", job.actor_id))?;
            assert_eq!(token.as_deref(), Some(t.token.as_str()), "{}", job.actor_id);
        }

        // Running it again finishes the move: the earlier requeue's tickets are published again,
        // every other dead letter is moved, and no dead letter is left.
        let done = run_json(&mut dlq(&ts.url, &broker.source(), &requeue_args))?;
        assert_eq!(done["dead_letters_removed"].as_u64(), Some(dead.len() as u64), "{done}");
        let republished: BTreeSet<String> = done["republished"]
            .as_array()
            .context("republished")?
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            .collect();
        assert_eq!(republished, pending.keys().cloned().collect::<BTreeSet<_>>(), "the interrupted requeue's tickets");
        assert!(indexed(&store).await?.is_empty(), "dead letters left after the rerun");
        let after = tickets(&store).await?;
        assert_eq!(after.keys().cloned().collect::<BTreeSet<_>>(), actors, "every actor requeued");
        for (a, t) in &pending {
            assert_eq!(after[a].token, t.token, "{a}: the rerun kept the interrupted requeue's ticket");
        }
        // Every actor has a job carrying its ticket's token (copies of one are run once: the
        // worker side is proven in triage_index.rs).
        let jobs = broker.peek_jobs().await?;
        let mut with_job = BTreeSet::new();
        for (job, token) in &jobs {
            let a = job.actor_id.to_string();
            assert_eq!(token.as_deref(), Some(after[&a].token.as_str()), "{a}: a job with a stale token");
            assert_eq!(job.recovery, Some(Recovery::RollbackJournal), "{a}");
            with_job.insert(a);
        }
        assert_eq!(with_job, actors, "every actor has a job");
        assert!(jobs.len() <= actors.len() + pending.len(), "{} jobs for {} actors", jobs.len(), actors.len());
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_a_clean_campaign_clean_and_finds_planted_v1_drift_and_v2_corruption_and_tells_a_resumed_actor_from_them()
-> Result<()> {
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

        // The runtime resumed and committed to v2 as rivet's engine does: a delta holding only
        // the page it dirtied, that page's PIDX row, the head moved to the new txid. Not
        // ferry's layout (a blob of every page), and not corruption.
        let resumed = &actors[5];
        let h = head(&store, resumed).await?.context("head")?;
        let mut page = read_v2(&*store, resumed).await?.file[..4096].to_vec();
        page[4000] ^= 0x01;
        let txid = h.head_txid + 1;
        let header = LtxHeader {
            page_size: 4096,
            commit: h.db_size_pages,
            min_txid: txid,
            max_txid: txid,
            timestamp_ms: h.creation_ts_ms + 1,
        };
        let mut txn = Txn::new();
        txn.set(ferry::v2::keys::delta_chunk(resumed, txid, 0), ltx::encode(&header, &[(1, &page)]));
        txn.set(ferry::v2::keys::pidx(resumed, 1), txid.to_be_bytes().to_vec());
        txn.set(ferry::v2::keys::meta(resumed), DBHead { head_txid: txid, next_txid: txid + 1, ..h }.encode());
        store.commit(txn).await?;

        // A head behind the txid the migration committed: txids only grow, so this is damage.
        let rewound = &actors[6];
        let h = head(&store, rewound).await?.context("head")?;
        let mut txn = Txn::new();
        let back = DBHead { head_txid: h.head_txid - 1, ..h };
        txn.set(ferry::v2::keys::meta(rewound), back.encode());
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
            (resumed.to_string(), "v2_moved_on".to_string()),
            (rewound.to_string(), "v2_corrupt".to_string()),
        ]
        .into();
        assert_eq!(problems, expected, "{report}");
        assert_eq!(report["counts"]["ok"], actors.len() - 5, "{report}");

        // An actor that moved on is reported, not a mismatch: verify of it alone exits 0.
        let alone = output(&mut verify_cmd(&ts.url, &["--actor", resumed.as_str()]))?;
        assert!(alone.status.success(), "a moved-on actor alone: {}", String::from_utf8_lossy(&alone.stderr));
        let alone: Value = serde_json::from_slice(&alone.stdout)?;
        assert_eq!(alone["counts"]["v2_moved_on"], 1, "{alone}");
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
async fn sweep_removes_the_letter_of_an_actor_migrated_since_and_records_its_skip_with_v1_untouched() -> Result<()> {
    bounded(Duration::from_secs(120), async {
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        let journal =
            fixtures::hot_journal(&DbSpec { rows: 10, payload: 80, page_size: 4096, seed: 71 }, 100).map_err(msg)?;
        let actors: Vec<ActorId> = (0..3).map(|i| id(&format!("sj-{i}"))).collect();
        for a in &actors {
            write(&store, a, &journal).await?;
        }
        run_json(&mut local_run(&ts.url))?;
        assert_eq!(snapshot(&store, keys::DEAD_PREFIX).await?.len(), 3, "three journal_sidecar letters");
        // The actor's runtime opened sj-0 since, rolled its journal back and migrated it
        // itself (rivet's own migration): its head is settled, its letter stale.
        let mut txn = Txn::new();
        let settled = DBHead { origin: Origin::MigratedFromV1, ..DBHead::staging(2, 3, 1) };
        txn.set(ferry::v2::keys::meta(&actors[0]), settled.encode());
        store.commit(txn).await?;
        let v1_before = snapshot(&store, b"v1/").await?;

        let dry = run_json(&mut dlq(&ts.url, &Dlq::Store, &["sweep", "--dry-run", "--json"]))?;
        assert_eq!(
            (dry["checked"].as_u64(), dry["migrated"].as_u64(), dry["native"].as_u64(), dry["dry_run"].as_bool()),
            (Some(3), Some(1), Some(0), Some(true)),
            "{dry}"
        );
        assert_eq!(snapshot(&store, keys::DEAD_PREFIX).await?.len(), 3, "a dry run removes nothing");

        let text = run_ok(&mut dlq(&ts.url, &Dlq::Store, &["sweep"]))?;
        assert!(text.contains("removed 1 of settled actors (1 migrated, 0 native)"), "{text}");
        assert!(store.get(&keys::dead(&actors[0])).await?.is_none(), "sj-0's letter is gone");
        let skip = audit(&store, &actors[0]).await?;
        assert_eq!((skip.outcome, skip.generation), (OutcomeKind::SkippedAlreadyMigrated, Some(settled.generation)));
        for a in &actors[1..] {
            assert!(store.get(&keys::dead(a)).await?.is_some(), "{a}: still dead, still listed");
            assert_eq!(audit(&store, a).await?.outcome, OutcomeKind::DeadLettered, "{a}");
        }
        assert_eq!(snapshot(&store, b"v1/").await?, v1_before, "v1 untouched");
        let summary = run_json(&mut dlq(&ts.url, &Dlq::Store, &["summary", "--json"]))?;
        assert_eq!(summary["dead_letters"].as_u64(), Some(2), "{summary}");

        let again = run_json_did_nothing(&mut dlq(&ts.url, &Dlq::Store, &["sweep", "--json"]), "nothing removed")?;
        assert_eq!((again["checked"].as_u64(), again["migrated"].as_u64()), (Some(2), Some(0)), "{again}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_export_csv_and_purge_need_no_broker_and_purge_needs_yes_drops_only_the_selection_and_is_audited()
-> Result<()> {
    bounded(Duration::from_secs(120), async {
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        let mut letters = Vec::new();
        for i in 0..3 {
            letters.push(dead_letter(&format!("pj-{i}"), "purge", DeadLetterReason::JournalSidecar, i));
        }
        for i in 0..2 {
            letters.push(dead_letter(&format!("pw-{i}"), "purge", DeadLetterReason::WalSidecar, 10 + i));
        }
        index_as_worker(&store, &letters).await?;
        let audits_before = snapshot(&store, keys::AUDIT_PREFIX).await?;
        let rows_before = index_rows(&store).await?;

        let csv = run_ok(&mut dlq(&ts.url, &Dlq::Store, &["export", "--format", "csv"]))?;
        let rows = parse_csv(&csv);
        assert_eq!(rows[0].join(","), CSV_HEADER, "{csv}");
        assert_eq!(rows.len() - 1, letters.len(), "one row per dead letter: {csv}");
        let exported: BTreeSet<(String, String)> = rows[1..].iter().map(|r| (r[0].clone(), r[2].clone())).collect();
        let expected: BTreeSet<(String, String)> =
            letters.iter().map(|d| (d.actor_id.clone(), d.reason.as_str().to_string())).collect();
        assert_eq!(exported, expected);
        assert!(rows[1..].iter().all(|r| r.len() == 13 && r[12].contains("with a comma")), "quoted errors: {csv}");
        assert!(index_rows(&store).await? == rows_before, "export changed the index");

        let refused = output(&mut dlq(&ts.url, &Dlq::Store, &["purge", "--reason", "wal_sidecar"]))?;
        assert!(!refused.status.success(), "purge without --yes must refuse");
        assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"), "the refusal says how to confirm");
        assert!(index_rows(&store).await? == rows_before, "a refused purge changed the index");
        assert!(snapshot(&store, keys::AUDIT_PREFIX).await? == audits_before, "a refused purge changed an audit");

        let purged = run_ok(&mut dlq(&ts.url, &Dlq::Store, &["purge", "--reason", "wal_sidecar", "--yes"]))?;
        assert!(purged.contains("purged 2 dead letters"), "{purged}");
        let left: BTreeSet<String> = indexed(&store).await?.into_keys().collect();
        assert_eq!(left, ["pj-0", "pj-1", "pj-2"].map(String::from).into(), "only the selection is dropped");
        let summary = ferry::triage::summary(&store).await?;
        assert_eq!(summary.dead_letters, 3, "the index entries went with the records: {summary:?}");
        let audits_before: BTreeMap<Vec<u8>, Vec<u8>> = audits_before.into_iter().collect();
        for d in &letters {
            let a = id(&d.actor_id);
            if d.reason == DeadLetterReason::WalSidecar {
                let audit = audit(&store, &a).await?;
                assert!(audit.purged_at_ms.is_some(), "{a}: the audit records the purge");
                assert_eq!(audit.reason, Some(DeadLetterReason::WalSidecar));
                assert_eq!(audit.outcome, OutcomeKind::DeadLettered);
            } else {
                let now = store.get(&keys::audit(&a)).await?;
                assert_eq!(now.as_ref(), audits_before.get(&keys::audit(&a)), "{a}: not purged, not touched");
            }
        }
        let after = run_ok(&mut dlq(&ts.url, &Dlq::Store, &["export", "--format", "csv"]))?;
        assert_eq!(parse_csv(&after).len(), 1 + 3, "{after}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_the_broker_dead_letters_at_its_delivery_limit_is_triaged_the_same_however_often_it_is_listed() -> Result<()>
{
    bounded(Duration::from_secs(90), async {
        // A delivery limit of 1: one delivery handed back reaches it.
        let broker = Broker::new("ferry_t_dlimit", 1).await?;
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        let logs = tempfile::tempdir()?;
        let actor = id("dl-0");
        write(&store, &actor, &plain(&DbSpec::small(71))?).await?;
        let work_q = broker.topology.work_queue();

        // A job that kills its worker: the worker takes it and dies (SIGKILL) before it settles,
        // so the broker hands it back. The worker is frozen (SIGSTOP) once it consumes, before
        // the job is published, so it holds the delivery without running it.
        let mut doomed = Proc::spawn("doomed", worker_run(&ts.url, &broker.topology), logs.path())?;
        wait_until("the doomed worker to consume", Duration::from_secs(15), || async {
            Ok((doomed.log().contains("consuming"), doomed.log_tail()))
        })
        .await?;
        doomed.pause()?;
        let mut enqueue = command("ferry-producer");
        enqueue.args(["enqueue", "--store", &ts.url, "--amqp", &amqp_url(), "--queue-prefix", broker.prefix()]);
        enqueue.args(["--delivery-limit", "1", "--campaign", "dlimit", "--json"]);
        assert_eq!(run_json(&mut enqueue)?["published"], 1);
        // Delivered to the frozen worker (the only consumer), then handed back by its death.
        broker.wait_count(&work_q, 0, Duration::from_secs(10)).await.with_context(|| doomed.log_tail())?;
        doomed.sigkill()?;
        broker.wait_count(&work_q, 1, Duration::from_secs(15)).await?;
        // It was never run, and it is not lost.
        assert!(store.get(&keys::audit(&actor)).await?.is_none(), "a doomed worker ran the job");

        // The next worker sees the delivery count at the limit and dead-letters it itself, into
        // the triage index (the broker would drop it past the index next time).
        let mut worker = Proc::spawn("worker", worker_run(&ts.url, &broker.topology), logs.path())?;
        wait_until("the job to be dead-lettered at its delivery limit", Duration::from_secs(30), || async {
            let n = ferry::triage::summary(&store).await?.dead_letters;
            Ok((n == 1, format!("{n} dead letters")))
        })
        .await
        .with_context(|| worker.log_tail())?;
        broker.wait_count(&work_q, 0, Duration::from_secs(10)).await?;
        worker.sigterm()?;
        ensure!(worker.wait_exit(Duration::from_secs(30)).await?.success(), "worker exit: {}", worker.log_tail());
        let audit = audit(&store, &actor).await?;
        assert_eq!((audit.outcome, audit.reason), (OutcomeKind::DeadLettered, Some(DeadLetterReason::DeliveryLimit)));
        assert_eq!(head(&store, &actor).await?, None, "the job never ran");

        let rows = index_rows(&store).await?;
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(run_json(&mut dlq(&ts.url, &Dlq::Store, &["list", "--json"]))?);
            seen.push(run_json(&mut dlq(&ts.url, &broker.source(), &["list", "--json"]))?);
        }
        let listed = seen[0].as_array().context("a list")?;
        assert_eq!(listed.len(), 1, "one record: {listed:?}");
        let first = &listed[0];
        assert_eq!(first["reason"], "delivery_limit", "{first}");
        assert_eq!((first["actor_id"].as_str(), first["campaign"].as_str()), (Some("dl-0"), Some("dlimit")));
        // One delivery handed back, then this one: the attempts the job took, never the reads.
        assert_eq!(first["attempts"], 2, "{first}");
        assert!(first["error"].as_str().is_some_and(|e| e.contains("delivery limit")), "{first}");
        assert!(seen.iter().all(|s| s == &seen[0]), "listing changed the dead letter: {seen:?}");
        let shown = run_json(&mut dlq(&ts.url, &Dlq::Store, &["show", "dl-0"]))?;
        assert_eq!(shown["dead_letters"], serde_json::json!([first]), "{shown}");
        let summary = run_json(&mut dlq(&ts.url, &Dlq::Store, &["summary", "--json"]))?;
        assert_eq!(summary_groups(&summary)?, [("delivery_limit".to_string(), (1, 1))].into(), "{summary}");
        assert!(index_rows(&store).await? == rows, "listing changed the index");

        let moved =
            run_json(&mut dlq(&ts.url, &broker.source(), &["requeue", "--reason", "delivery_limit", "--json"]))?;
        assert_eq!(moved["actors"], serde_json::json!(["dl-0"]), "{moved}");
        assert_eq!(moved["dead_letters_removed"], 1, "{moved}");
        assert!(indexed(&store).await?.is_empty());
        broker.wait_count(&work_q, 1, Duration::from_secs(10)).await?;
        let jobs = broker.peek_jobs().await?;
        assert_eq!((jobs[0].0.actor_id.as_str(), jobs[0].0.recovery), ("dl-0", None));
        assert_eq!(jobs[0].1.as_deref(), Some(tickets(&store).await?["dl-0"].token.as_str()));
        Ok(())
    })
    .await
}
