//! End to end, issue 15: triage at a million dead letters reads the store's triage index, never
//! the broker's dead-letter queue. With the built `ferry-worker` and `ferry-producer` binaries
//! against the real RabbitMQ broker and each store backend (every test runs once on SQLite and
//! once on PostgreSQL: `sqlite::name` and `postgres::name`):
//!
//! - a broker restart between a listing and a requeue changes no listing (every letter once,
//!   before and after) and the requeue gives every actor exactly one job, none lost;
//! - listings, pages, summaries and `show` taken while workers dead-letter a campaign are each
//!   consistent: no letter twice, nothing listed earlier missing later, a shown dead letter
//!   with its audit;
//! - a `dlq requeue` SIGKILLed at random points and run again leaves every actor dead or
//!   requeued (never both, never neither), and with a worker every requeued job runs once:
//!   each actor migrated or dead-lettered again exactly once, every ticket consumed;
//! - `dlq summary|list|show|export` and `sweep --dry-run` need no broker (none given, or an
//!   unreachable one in the environment) and, on PostgreSQL, only SELECT on the store's table;
//! - 25 rounds of every read leave the broker's queues as they were: message counts and the
//!   management API's delivery and get counters do not move.
//!
//! Each test uses its own queue prefix and store (a temp file, or a unique PostgreSQL schema),
//! removed at the end, also on failure. The broker restart test takes the broker for itself
//! (`BROKER`): the other tests of this file wait for it, and it for them.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry::jobs::{DeadLetter, Job};
use ferry::keys;
use ferry::migrate::OutcomeKind;
use ferry::queue::Topology;
use ferry::queue::amqp;
use ferry::store::{DynStore, KeyRange, KeyValue};
use ferry::synth::sqlite::{self as fixtures, DbFiles, DbSpec};
use ferry::testing::{Backend, TestStore, amqp_url, unique_name};
use ferry::triage::ticket::{self, Ticket};
use ferry::{ActorId, DeadLetterReason, Recovery};
use ferry_tests::{Proc, WorkerSpec, bin, bounded, index_as_worker, wait_until};
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// Instantiates every listed `async fn name(backend: Backend) -> Result<()>` once per store
/// backend, in modules `sqlite` and `postgres`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(ferry::testing::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(ferry::testing::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_backends!(
    broker_restart_between_listing_and_requeue_lists_nothing_twice_and_loses_nothing,
    listing_and_showing_during_an_active_campaign_sees_every_letter_once,
    killed_requeue_at_random_points_loses_and_duplicates_nothing,
    read_only_triage_needs_no_broker,
    reading_dead_letters_leaves_the_broker_untouched,
);

/// The broker restart takes it exclusively; every other test here shares it.
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

// ---------------------------------------------------------------------------------------------
// Helpers

fn id(s: &str) -> ActorId {
    ActorId::parse(s).expect("valid test actor id")
}

fn msg<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// `ferry-producer dlq --store URL ARGS` with no ferry setting from the environment (so no
/// broker unless the test gives one).
fn dlq(store_url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("ferry-producer"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FERRY_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn").env("NO_COLOR", "1").stdin(Stdio::null());
    cmd.args(["dlq", "--store", store_url]).args(args);
    cmd
}

/// [`dlq`] with a broker, for a requeue.
fn dlq_fleet(store_url: &str, topology: &Topology, args: &[&str]) -> Command {
    let mut cmd = dlq(store_url, args);
    cmd.args(["--amqp", &amqp_url(), "--queue-prefix", &topology.prefix]);
    cmd.args(["--delivery-limit", &topology.delivery_limit.to_string()]);
    cmd
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("spawning {cmd:?}"))
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

/// Gives `actor` a migrated v2 head, as rivet's own migration leaves it after ferry gave up.
async fn migrated_since(store: &DynStore, actor: &str) -> Result<()> {
    let head = ferry::v2::DBHead { origin: ferry::v2::Origin::MigratedFromV1, ..ferry::v2::DBHead::staging(1, 1, 1) };
    let mut txn = ferry::store::Txn::new();
    txn.set(ferry::v2::keys::meta(&id(actor)), head.encode());
    Ok(store.commit(txn).await?)
}

/// The actor ids of a `dlq list --json`, in the order listed.
fn listed_ids(listed: &Value) -> Result<Vec<String>> {
    let letters = listed.as_array().with_context(|| format!("not a list: {listed}"))?;
    letters
        .iter()
        .map(|d| d["actor_id"].as_str().map(String::from).with_context(|| format!("no actor_id: {d}")))
        .collect()
}

/// Ids listed more than once.
fn twice(ids: &[String]) -> Vec<&String> {
    let mut seen = BTreeSet::new();
    ids.iter().filter(|a| !seen.insert(*a)).collect()
}

/// Every page of `dlq list --limit N --json`, following the `more: --after X` cursors: the
/// pages, each as listed.
fn list_pages(store_url: &str, limit: usize, extra: &[&str]) -> Result<Vec<Vec<Value>>> {
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let limit_s = limit.to_string();
        let mut args = vec!["list", "--json", "--limit", &limit_s];
        if let Some(a) = &after {
            args.extend(["--after", a.as_str()]);
        }
        args.extend(extra);
        let out = output(&mut dlq(store_url, &args))?;
        ensure!(out.status.success(), "dlq list {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let page: Vec<Value> = serde_json::from_slice(&out.stdout).context("a page is a JSON list")?;
        ensure!(page.len() <= limit, "a page of {} for --limit {limit}", page.len());
        pages.push(page);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match stderr.lines().find_map(|l| l.strip_prefix("more: --after ")) {
            Some(next) => after = Some(next.trim().to_string()),
            None => return Ok(pages),
        }
        ensure!(pages.len() < 10_000, "the pages do not end");
    }
}

/// A page's letters are in index order: reason, campaign, then actor id.
fn in_index_order(page: &[Value]) -> bool {
    let place = |d: &Value| {
        (d["reason"].as_str().unwrap_or("").to_string(), d["campaign"].as_str().unwrap_or("").to_string(), {
            d["actor_id"].as_str().unwrap_or("").to_string()
        })
    };
    page.windows(2).all(|w| place(&w[0]) < place(&w[1]))
}

async fn write(store: &DynStore, actor: &ActorId, files: &DbFiles) -> Result<()> {
    Ok(ferry::synth::write_v1(&**store, actor, files).await?)
}

fn plain(seed: u64) -> Result<DbFiles> {
    Ok(DbFiles { main: fixtures::database(&DbSpec::small(seed)).map_err(msg)?, ..DbFiles::default() })
}

fn hot_journal(seed: u64) -> Result<DbFiles> {
    fixtures::hot_journal(&DbSpec { rows: 12, payload: 80, page_size: 4096, seed }, 40).map_err(msg)
}

fn wal(seed: u64) -> Result<DbFiles> {
    fixtures::wal(&DbSpec { rows: 10, payload: 80, page_size: 4096, seed }, 4).map_err(msg)
}

async fn snapshot(store: &DynStore, prefix: &[u8]) -> Result<Vec<KeyValue>> {
    Ok(store.scan(&KeyRange::prefix(prefix), usize::MAX >> 1).await?)
}

/// Every row of the triage index (records and both index families).
async fn index_rows(store: &DynStore) -> Result<Vec<KeyValue>> {
    snapshot(store, b"ferry/dead").await
}

/// The triage index's dead letters, by actor.
async fn indexed(store: &DynStore) -> Result<BTreeMap<String, DeadLetter>> {
    let mut out = BTreeMap::new();
    for (key, raw) in snapshot(store, keys::DEAD_PREFIX).await? {
        let d = DeadLetter::decode(&raw).with_context(|| format!("{} does not decode", keys::printable(&key)))?;
        out.insert(d.actor_id.clone(), d);
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

/// Every actor is in exactly one place in the store, dead or requeued, never both or neither.
async fn dead_or_requeued(store: &DynStore, actors: &BTreeSet<String>) -> Result<(usize, usize)> {
    let (dead, pending) = (indexed(store).await?, tickets(store).await?);
    let both: Vec<&String> = dead.keys().filter(|a| pending.contains_key(*a)).collect();
    ensure!(both.is_empty(), "dead and requeued at once: {both:?}");
    let union: BTreeSet<String> = dead.keys().chain(pending.keys()).cloned().collect();
    let neither: Vec<&String> = actors.difference(&union).collect();
    ensure!(neither.is_empty(), "in neither place: {neither:?}");
    ensure!(union.len() == actors.len(), "unknown actors: {:?}", union.difference(actors).collect::<Vec<_>>());
    Ok((dead.len(), pending.len()))
}

/// A dead letter as a fleet worker writes it.
fn dead_letter(actor: &str, campaign: &str, reason: DeadLetterReason, n: i64) -> DeadLetter {
    let job = Job::new(campaign, id(actor), 1_763_900_000_000 + n, None);
    DeadLetter {
        actor_id: actor.to_string(),
        campaign: campaign.to_string(),
        reason,
        phase: "read".into(),
        error: format!("actor {actor}: read: planted {reason}"),
        attempts: 1,
        worker: "planted".into(),
        at_ms: 1_763_900_000_000 + n,
        v1_files: Some(ferry::v1::V1Files { main: Some(8192), journal: Some(512), wal: None, shm: None }),
        recovery: None,
        message: String::from_utf8(job.encode()).expect("job JSON is UTF-8"),
    }
}

/// Runs a campaign of `planted` actors through one worker until every actor is audited and
/// the index holds `rejected` dead letters.
async fn run_campaign(
    ts: &TestStore,
    broker: &ferry_tests::Broker,
    campaign: &str,
    planted: usize,
    rejected: u64,
    logs: &Path,
) -> Result<()> {
    let enqueued = ferry_tests::enqueue(&ts.url, &broker.topology, campaign, &[])?;
    ensure!(enqueued["published"] == planted, "{enqueued}");
    let store = ts.store();
    let mut worker = WorkerSpec::new(&ts.url, &broker.topology, campaign).start(logs)?;
    wait_until(Duration::from_secs(90), "the campaign ends", || async {
        let audited = ferry_tests::audit_count(&store).await?;
        let dead = ferry::triage::summary(&store).await?.dead_letters;
        Ok(audited == planted && dead == rejected && broker.pending().await? == 0)
    })
    .await
    .with_context(|| worker.log_tail())?;
    worker.stop(Duration::from_secs(30)).await
}

/// The jobs waiting in a work queue, each with the requeue token it carries: fetched without
/// ack on a fresh connection that is then closed, so they all go back (each such read counts
/// as a delivery on a quorum queue).
async fn peek_jobs(topology: &Topology) -> Result<Vec<(Job, Option<String>)>> {
    let conn = amqp::connect(&amqp_url(), "ferry-tests peek").await?;
    let ch = conn.create_channel().await?;
    let mut out = Vec::new();
    while let Some(m) = ch.basic_get(topology.work_queue().as_str().into(), BasicGetOptions::default()).await? {
        let token = amqp::str_header(&m.delivery.properties, ticket::TOKEN_HEADER);
        out.push((Job::parse(&m.delivery.data).map_err(msg)?, token));
    }
    let _ = conn.close(200, "peeked".into()).await;
    Ok(out)
}

/// Ready messages of a queue, on a fresh connection (a passive declare: reads nothing).
async fn depth(queue: &str) -> Result<u32> {
    let conn = amqp::connect(&amqp_url(), "ferry-tests depth").await?;
    let ch = conn.create_channel().await?;
    let opts = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let n = ch.queue_declare(queue.into(), opts, FieldTable::default()).await?.message_count();
    let _ = conn.close(200, "done".into()).await;
    Ok(n)
}

fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let out = Command::new("rabbitmqctl").args(args).output().context("running rabbitmqctl")?;
    ensure!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// `GET path` from the management API as guest: the JSON body.
async fn management_get(path: &str) -> Result<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", 15672)).await.context("management API on :15672")?;
    // guest:guest
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").with_context(|| format!("not an HTTP response: {text}"))?;
    ensure!(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"), "GET {path}: {head}");
    serde_json::from_str(body).with_context(|| format!("GET {path}: {body}"))
}

// ---------------------------------------------------------------------------------------------
// A broker restart between listing and requeue

async fn broker_restart_between_listing_and_requeue_lists_nothing_twice_and_loses_nothing(
    backend: Backend,
) -> Result<()> {
    let _exclusive = BROKER.write().await;
    bounded(Duration::from_secs(300), async {
        let ts = TestStore::new(backend).await;
        let store = ts.store();
        let broker = ferry_tests::Broker::new("t15_restart").await?;
        let logs = tempfile::tempdir()?;
        let mut rejected: BTreeMap<String, DeadLetterReason> = BTreeMap::new();
        for i in 0..8u64 {
            let a = format!("rj-{i:02}");
            write(&store, &id(&a), &hot_journal(100 + i)?).await?;
            rejected.insert(a, DeadLetterReason::JournalSidecar);
        }
        for i in 0..4u64 {
            let a = format!("rw-{i:02}");
            write(&store, &id(&a), &wal(200 + i)?).await?;
            rejected.insert(a, DeadLetterReason::WalSidecar);
        }
        for i in 0..4u64 {
            write(&store, &id(&format!("rn-{i:02}")), &plain(300 + i)?).await?;
        }
        run_campaign(&ts, &broker, "restart", 16, rejected.len() as u64, logs.path()).await?;
        let actors: BTreeSet<String> = rejected.keys().cloned().collect();

        let listings = || async {
            let full = listed_ids(&run_json(&mut dlq(&ts.url, &["list", "--json"]))?)?;
            let pages = list_pages(&ts.url, 5, &[])?;
            let paged: Vec<String> =
                pages.iter().flatten().map(|d| d["actor_id"].as_str().unwrap_or("").to_string()).collect();
            let summary = run_json(&mut dlq(&ts.url, &["summary", "--json"]))?;
            anyhow::Ok((full, pages, paged, summary))
        };
        let (full, pages, paged, summary) = listings().await?;
        assert!(twice(&full).is_empty() && twice(&paged).is_empty(), "listed twice: {full:?} {paged:?}");
        assert_eq!(full.iter().cloned().collect::<BTreeSet<_>>(), actors);
        assert_eq!(paged.iter().cloned().collect::<BTreeSet<_>>(), actors);
        assert!(pages.iter().all(|p| in_index_order(p)), "a page out of index order");
        assert_eq!(summary["dead_letters"], rejected.len(), "{summary}");
        let rows = index_rows(&store).await?;

        // RabbitMQ restarts (its durable queues and messages are kept).
        let restarted = Instant::now();
        rabbitmqctl(&["stop_app"])?;
        rabbitmqctl(&["start_app"])?;
        rabbitmqctl(&["await_startup"])?;
        wait_until(Duration::from_secs(60), "the broker serves the work queue again", || async {
            Ok(depth(&broker.topology.work_queue()).await.is_ok())
        })
        .await?;
        eprintln!("broker restarted in {:.1} s", restarted.elapsed().as_secs_f64());

        // The same letters, each once, in the same order: the listing is the store's.
        let (full_after, pages_after, paged_after, summary_after) = listings().await?;
        assert_eq!(full_after, full, "the full listing changed across the restart");
        assert_eq!(pages_after, pages, "the pages changed across the restart");
        assert_eq!(paged_after, paged);
        assert_eq!(summary_after["groups"], summary["groups"]);
        assert!(index_rows(&store).await? == rows, "the index changed across the restart");

        // Requeue, with the recovery that fits each reason: one ticket and one job per actor.
        let mut moved = BTreeSet::new();
        for (reason, recovery) in [("journal_sidecar", "rollback_journal"), ("wal_sidecar", "checkpoint_wal")] {
            let done = run_json(&mut dlq_fleet(
                &ts.url,
                &broker.topology,
                &["requeue", "--reason", reason, "--recovery", recovery, "--json"],
            ))?;
            let want = rejected.values().filter(|r| r.as_str() == reason).count();
            assert_eq!(done["dead_letters_removed"], want, "{done}");
            for a in done["actors"].as_array().context("actors")? {
                assert!(moved.insert(a.as_str().unwrap_or("").to_string()), "requeued twice: {a}");
            }
        }
        assert_eq!(moved, actors, "every actor requeued");
        assert!(indexed(&store).await?.is_empty(), "dead letters left");
        let pending = tickets(&store).await?;
        assert_eq!(pending.keys().cloned().collect::<BTreeSet<_>>(), actors);
        let jobs = peek_jobs(&broker.topology).await?;
        let mut per_actor: BTreeMap<String, usize> = BTreeMap::new();
        for (job, token) in &jobs {
            let a = job.actor_id.to_string();
            *per_actor.entry(a.clone()).or_default() += 1;
            assert_eq!(token.as_deref(), Some(pending[&a].token.as_str()), "{a}: its job carries its ticket");
            let want = match rejected[&a] {
                DeadLetterReason::JournalSidecar => Recovery::RollbackJournal,
                _ => Recovery::CheckpointWal,
            };
            assert_eq!((job.recovery, job.campaign.as_str()), (Some(want), "restart"), "{a}");
        }
        assert_eq!(per_actor, actors.iter().map(|a| (a.clone(), 1)).collect(), "exactly one job per actor");

        // A worker runs them: every actor migrated with its recovery, every ticket consumed.
        let mut worker = WorkerSpec::new(&ts.url, &broker.topology, "restart-after").start(logs.path())?;
        wait_until(Duration::from_secs(90), "the requeued actors migrate", || async {
            let audits = ferry_tests::audits(&store).await?;
            let migrated = actors.iter().filter(|a| audits[*a].outcome == OutcomeKind::Migrated).count();
            Ok(migrated == actors.len()
                && tickets(&store).await?.is_empty()
                && broker_pending(&broker.topology).await? == 0)
        })
        .await
        .with_context(|| worker.log_tail())?;
        worker.stop(Duration::from_secs(30)).await?;
        let audits = ferry_tests::audits(&store).await?;
        for a in &actors {
            let want = if rejected[a] == DeadLetterReason::JournalSidecar {
                Recovery::RollbackJournal
            } else {
                Recovery::CheckpointWal
            };
            assert_eq!((audits[a].outcome, audits[a].recovery), (OutcomeKind::Migrated, Some(want)), "{a}");
        }
        assert!(indexed(&store).await?.is_empty());
        Ok(())
    })
    .await
}

/// Ready messages in the work queue and every retry queue, on a fresh connection (the test's
/// own connection does not survive a broker restart).
async fn broker_pending(topology: &Topology) -> Result<u32> {
    let mut n = depth(&topology.work_queue()).await?;
    for q in topology.retry_queues() {
        n += depth(&q).await?;
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Reads during an active campaign

async fn listing_and_showing_during_an_active_campaign_sees_every_letter_once(backend: Backend) -> Result<()> {
    let _shared = BROKER.read().await;
    bounded(Duration::from_secs(300), async {
        let ts = TestStore::new(backend).await;
        let store = ts.store();
        let broker = ferry_tests::Broker::new("t15_active").await?;
        let logs = tempfile::tempdir()?;
        let mut rejected: BTreeMap<String, &str> = BTreeMap::new();
        let (journal, wal_files, normal) = (hot_journal(1)?, wal(2)?, plain(3)?);
        for i in 0..120 {
            let a = format!("aj-{i:04}");
            write(&store, &id(&a), &journal).await?;
            rejected.insert(a, "journal_sidecar");
        }
        for i in 0..40 {
            let a = format!("aw-{i:04}");
            write(&store, &id(&a), &wal_files).await?;
            rejected.insert(a, "wal_sidecar");
        }
        for i in 0..40 {
            write(&store, &id(&format!("an-{i:04}")), &normal).await?;
        }
        let total = rejected.len();
        ferry_tests::enqueue(&ts.url, &broker.topology, "active", &[])?;
        // One worker at concurrency 1: the campaign lasts long enough to be read many times.
        let mut worker = WorkerSpec::new(&ts.url, &broker.topology, "active").concurrency(1).start(logs.path())?;

        let mut previous: BTreeSet<String> = BTreeSet::new();
        let mut previous_count = 0u64;
        let (mut rounds, mut during) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            rounds += 1;
            // A full listing: each letter once, only rejected actors, nothing listed before
            // missing now (nothing removes a dead letter during a campaign).
            let full = listed_ids(&run_json(&mut dlq(&ts.url, &["list", "--json"]))?)?;
            ensure!(twice(&full).is_empty(), "round {rounds}: listed twice: {:?}", twice(&full));
            let full: BTreeSet<String> = full.into_iter().collect();
            let unknown: Vec<&String> = full.iter().filter(|a| !rejected.contains_key(*a)).collect();
            ensure!(unknown.is_empty(), "round {rounds}: not dead-lettered: {unknown:?}");
            let lost: Vec<&String> = previous.difference(&full).collect();
            ensure!(lost.is_empty(), "round {rounds}: listed before, missing now: {lost:?}");

            // Pages: none holds a letter twice or out of order, the walk never repeats a
            // letter, and holds every letter the full listing had.
            let pages = list_pages(&ts.url, 13, &[])?;
            let paged: Vec<String> =
                pages.iter().flatten().map(|d| d["actor_id"].as_str().unwrap_or("").to_string()).collect();
            ensure!(twice(&paged).is_empty(), "round {rounds}: paged twice: {:?}", twice(&paged));
            ensure!(pages.iter().all(|p| in_index_order(p)), "round {rounds}: a page out of order");
            let paged: BTreeSet<String> = paged.into_iter().collect();
            let missed: Vec<&String> = full.difference(&paged).collect();
            ensure!(missed.is_empty(), "round {rounds}: listed, then missing from the pages: {missed:?}");

            // A summary: its groups add up, it never shrinks, it has what was listed.
            let summary = run_json(&mut dlq(&ts.url, &["summary", "--json"]))?;
            let count = summary["dead_letters"].as_u64().context("dead_letters")?;
            let groups = summary["groups"].as_array().context("groups")?;
            let sum: u64 = groups.iter().map(|g| g["count"].as_u64().unwrap_or(0)).sum();
            ensure!(sum == count, "round {rounds}: groups add up to {sum}, not {count}: {summary}");
            ensure!(count >= paged.len() as u64 && count >= previous_count, "round {rounds}: {summary}");

            // `show` of a listed actor shows its dead letter and its audit; of an actor not
            // listed yet, either nothing or a letter with its audit.
            let listed_one = full.iter().nth(rounds % full.len().max(1));
            let unlisted_one = rejected.keys().filter(|a| !full.contains(*a)).nth(rounds % 3);
            for (actor, listed) in [(listed_one, true), (unlisted_one, false)] {
                let Some(actor) = actor else { continue };
                let out = output(&mut dlq(&ts.url, &["show", actor]))?;
                let shown: Value = serde_json::from_slice(&out.stdout).context("show prints JSON")?;
                let letters = shown["dead_letters"].as_array().context("dead_letters")?;
                match (letters.len(), out.status.code()) {
                    (1, Some(0)) => {
                        ensure!(letters[0]["reason"] == rejected[actor], "round {rounds}: {shown}");
                        ensure!(
                            shown["audit"]["outcome"] == "dead_lettered",
                            "round {rounds}: letter without its audit: {shown}"
                        );
                        ensure!(shown["audit"]["reason"] == rejected[actor], "round {rounds}: {shown}");
                    }
                    (0, Some(4)) if !listed => {}
                    _ => bail!("round {rounds}: show {actor} (listed: {listed}): {} {shown}", out.status),
                }
            }
            if count > 0 && count < total as u64 {
                during += 1;
            }
            previous = full;
            previous_count = count;
            if count == total as u64 && ferry_tests::audit_count(&store).await? == 200 {
                break;
            }
            ensure!(Instant::now() < deadline, "the campaign did not end: {count} of {total} dead letters");
        }
        worker.stop(Duration::from_secs(30)).await?;
        eprintln!("{rounds} rounds of reads, {during} during the campaign");
        ensure!(during >= 2, "only {during} rounds of reads ran while the campaign dead-lettered");
        let last = listed_ids(&run_json(&mut dlq(&ts.url, &["list", "--json"]))?)?;
        let mut sorted = last.clone();
        sorted.sort();
        assert_eq!(sorted, rejected.keys().cloned().collect::<Vec<_>>(), "every letter once at the end");
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// A requeue killed at random points

async fn killed_requeue_at_random_points_loses_and_duplicates_nothing(backend: Backend) -> Result<()> {
    let _shared = BROKER.read().await;
    bounded(Duration::from_secs(420), async {
        let ts = TestStore::new(backend).await;
        let store = ts.store();
        let broker = ferry_tests::Broker::new("t15_killed").await?;
        let logs = tempfile::tempdir()?;
        let campaign = "killed";
        // 600 actors (more than one batch of the requeue's move): one in five still has its
        // hot journal (a requeue without recovery dead-letters it again), the others are
        // sound now and migrate. Their dead letters are written into the store as a worker
        // writes them.
        let n = 600;
        let (journal, normal) = (hot_journal(7)?, plain(8)?);
        let actors: BTreeSet<String> = (0..n).map(|i| format!("k-{i:04}")).collect();
        let still_rejected: BTreeSet<String> =
            actors.iter().enumerate().filter(|(i, _)| i % 5 == 0).map(|(_, a)| a.clone()).collect();
        let mut letters = Vec::new();
        for (i, a) in actors.iter().enumerate() {
            let files = if still_rejected.contains(a) { &journal } else { &normal };
            write(&store, &id(a), files).await?;
            letters.push(dead_letter(a, campaign, DeadLetterReason::JournalSidecar, i as i64));
        }
        index_as_worker(&store, &letters).await?;
        ferry_tests::register_campaign(&store, campaign).await?;

        let seed: u64 = match std::env::var("FERRY_KILL_SEED") {
            Ok(s) => s.parse().context("FERRY_KILL_SEED")?,
            Err(_) => rand::random(),
        };
        eprintln!("kill schedule seed {seed} (FERRY_KILL_SEED)");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let requeue_args = ["requeue", "--reason", "journal_sidecar", "--json"];
        // Each run moves every dead letter left (a batch per transaction) and publishes a job
        // per actor (the earlier runs' tickets again, then the moved ones): its progress is
        // the tickets it wrote plus the jobs it published. It is killed once its progress
        // reaches a point drawn at random over the whole run, wherever that falls: before
        // anything, between a batch's move and its publishes, amid the publishes, between
        // batches, amid the republishing.
        let ticket_count = || async {
            Ok::<_, anyhow::Error>(store.scan_keys(&KeyRange::prefix(ticket::REQUEUE_PREFIX), 10_000).await?.len())
        };
        let mut killed = 0;
        for attempt in 0..6 {
            let (tickets_before, queued_before) = (ticket_count().await?, broker.pending().await? as usize);
            let whole_run = (actors.len() - tickets_before) + actors.len();
            let target = rng.random_range(0..whole_run);
            let mut requeue = Proc::spawn(
                &format!("requeue-{attempt}"),
                dlq_fleet(&ts.url, &broker.topology, &requeue_args),
                logs.path(),
            )?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut progress = 0;
            while requeue.running() && progress < target {
                ensure!(Instant::now() < deadline, "requeue {attempt} made no progress: {}", requeue.log_tail());
                let queued = broker.pending().await? as usize;
                progress = (ticket_count().await? - tickets_before) + queued.saturating_sub(queued_before);
            }
            let status = requeue.sigkill()?;
            requeue.settle();
            if status.signal() == Some(9) {
                killed += 1;
            }
            let (dead, pending) = dead_or_requeued(&store, &actors).await?;
            let queued = broker.pending().await?;
            eprintln!(
                "requeue {attempt} killed at progress {progress} (target {target} of {whole_run}): {status}; \
                 {dead} dead, {pending} requeued, {queued} jobs queued"
            );
        }
        ensure!(killed >= 3, "only {killed} of 6 requeues were killed while they ran");

        // Run to completion: nothing left dead, every actor requeued once.
        let done = run_json(&mut dlq_fleet(&ts.url, &broker.topology, &requeue_args))?;
        eprintln!(
            "the last requeue moved {} and published {} again",
            done["dead_letters_removed"],
            done["republished"].as_array().map_or(0, Vec::len)
        );
        let (dead, pending) = dead_or_requeued(&store, &actors).await?;
        assert_eq!((dead, pending), (0, actors.len()), "{done}");
        let queued = broker.pending().await?;
        assert!(queued as usize >= actors.len(), "{queued} jobs for {} actors", actors.len());

        // A worker runs every requeued actor's job once, whatever copies of it are queued.
        let mut worker =
            WorkerSpec::new(&ts.url, &broker.topology, "killed").concurrency(4).http().start(logs.path())?;
        let addr = worker.http_addr().await?;
        let metrics_now = || async {
            let m = ferry_tests::scrape(addr).await?;
            let get = |labels: &str| ferry_tests::sample(&m, "ferry_outcomes_total", labels) as usize;
            anyhow::Ok((get("outcome=\"migrated\""), get("outcome=\"dead_lettered\""), m))
        };
        wait_until(Duration::from_secs(240), "every requeued job runs", || async {
            let (migrated, dead_lettered, _) = metrics_now().await?;
            Ok(migrated + dead_lettered >= actors.len()
                && tickets(&store).await?.is_empty()
                && broker.pending().await? == 0)
        })
        .await
        .with_context(|| worker.log_tail())?;
        let (migrated, dead_lettered, metrics) = metrics_now().await?;
        worker.stop(Duration::from_secs(30)).await?;
        let attempts = ferry_tests::sample(&metrics, "ferry_attempts_total", "") as usize;
        // Two copies of one requeue delivered at once may both start; the one that finds the
        // other's lease retries (then finds the ticket gone and is acked unrun), the one that
        // finds the other's outcome recorded (its skip checks the ticket) writes nothing and is
        // acked: neither is a second run to an outcome.
        let retries = ferry_tests::sample(&metrics, "ferry_retries_total", "") as usize;
        let superseded = ferry_tests::sample(&metrics, "ferry_superseded_total", "at=\"record\"") as usize;
        eprintln!(
            "outcomes: {migrated} migrated, {dead_lettered} dead-lettered, {attempts} runs ({retries} retried, \
             {superseded} superseded), {queued} jobs queued"
        );

        // Every ticket consumed; the still-rejected actors are dead again, once each.
        let again = indexed(&store).await?;
        assert_eq!(again.keys().cloned().collect::<BTreeSet<_>>(), still_rejected, "dead-lettered again");
        for (a, d) in &again {
            assert!(d.at_ms > 1_763_900_000_000 + n as i64, "{a}: the planted letter, not a new one");
        }
        assert!(tickets(&store).await?.is_empty(), "tickets left");
        // Each job ran at most once: one outcome per actor in all, and an actor that migrated
        // has the migration's audit (a second run records skipped_already_migrated).
        assert_eq!((migrated, dead_lettered), (actors.len() - still_rejected.len(), still_rejected.len()));
        assert_eq!(
            attempts,
            actors.len() + retries + superseded,
            "one run to an outcome per actor ({retries} retried, {superseded} superseded)"
        );
        let audits = ferry_tests::audits(&store).await?;
        for a in &actors {
            let want = if still_rejected.contains(a) { OutcomeKind::DeadLettered } else { OutcomeKind::Migrated };
            assert_eq!(audits[a].outcome, want, "{a}");
        }
        // And the worker's own lines say so per actor.
        let log = worker.log();
        let mut runs: BTreeMap<String, usize> = BTreeMap::new();
        let outcome_line =
            |l: &&str| l.contains(": migrated ") || l.ends_with(": migrated") || l.contains(": dead-lettered");
        for line in log.lines().filter(outcome_line) {
            // `job{actor="k-0001" campaign=... worker=...}: ...`
            if let Some(a) = line.split("actor=").nth(1).and_then(|r| r.split([' ', '}']).next()) {
                *runs.entry(a.trim_matches('"').to_string()).or_default() += 1;
            }
        }
        let more_than_once: Vec<(&String, &usize)> = runs.iter().filter(|(_, n)| **n > 1).collect();
        assert!(more_than_once.is_empty(), "ran more than once: {more_than_once:?}");
        let silent: Vec<&String> = actors.iter().filter(|a| !runs.contains_key(*a)).collect();
        assert!(
            silent.is_empty(),
            "no outcome line for {} actors, e.g. {:?}",
            silent.len(),
            &silent[..silent.len().min(5)]
        );
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Reads need no broker and no write permission

/// Runs `sql` as the test server's administrator.
async fn pg_admin(sql: &str) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(&ferry::testing::postgres_url(), tokio_postgres::NoTls).await?;
    let task = tokio::spawn(conn);
    let result = client.batch_execute(sql).await;
    task.abort();
    Ok(result?)
}

/// A PostgreSQL role allowed only to read one schema's table; dropped when this is dropped.
struct ReadOnlyRole {
    name: String,
    schema: String,
}

impl ReadOnlyRole {
    async fn create(schema: &str) -> Result<ReadOnlyRole> {
        let name = unique_name("ferry_ro");
        pg_admin(&format!(
            "CREATE ROLE {name} LOGIN; GRANT USAGE ON SCHEMA {schema} TO {name}; \
             GRANT SELECT ON {schema}.kv TO {name};"
        ))
        .await?;
        Ok(ReadOnlyRole { name, schema: schema.to_string() })
    }

    /// The store URL that logs in as this role (the test server's, another user).
    fn url(&self) -> String {
        let base = ferry::testing::postgres_url();
        let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", &base));
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let sep = if host.contains('?') { '&' } else { '?' };
        format!("{scheme}://{}@{host}{sep}schema={}", self.name, self.schema)
    }
}

impl Drop for ReadOnlyRole {
    fn drop(&mut self) {
        let (name, schema) = (&self.name, &self.schema);
        let sql = format!(
            "REVOKE ALL ON {schema}.kv FROM {name}; REVOKE ALL ON SCHEMA {schema} FROM {name}; DROP ROLE {name};"
        );
        // Drop may run while unwinding, inside a runtime: a private thread and runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            if let Err(e) = rt.block_on(pg_admin(&sql)) {
                eprintln!("could not drop a test role: {e}");
            }
        })
        .join();
    }
}

/// The schema of a PostgreSQL test store's URL.
fn schema_of(url: &str) -> Option<String> {
    url.split("schema=").nth(1).map(|s| s.split('&').next().unwrap_or(s).to_string())
}

async fn read_only_triage_needs_no_broker(backend: Backend) -> Result<()> {
    bounded(Duration::from_secs(180), async {
        let ts = TestStore::new(backend).await;
        let store = ts.store();
        let mut letters = Vec::new();
        for i in 0..12 {
            letters.push(dead_letter(&format!("ro-j{i:02}"), "ro", DeadLetterReason::JournalSidecar, i));
        }
        for i in 0..5 {
            letters.push(dead_letter(&format!("ro-w{i:02}"), "ro-b", DeadLetterReason::WalSidecar, 100 + i));
        }
        index_as_worker(&store, &letters).await?;
        // One of them migrated since (rivet's own migration): a dry sweep counts it, and it is
        // a read like the others.
        migrated_since(&store, "ro-j00").await?;
        let rows = index_rows(&store).await?;
        let reads: Vec<Vec<&str>> = vec![
            vec!["summary"],
            vec!["summary", "--json"],
            vec!["list"],
            vec!["list", "--json"],
            vec!["list", "--json", "--reason", "wal_sidecar"],
            vec!["list", "--json", "--campaign", "ro"],
            vec!["list", "--json", "--limit", "5"],
            vec!["list", "--json", "--limit", "5", "--after", "journal_sidecar/ro/ro-j04"],
            vec!["show", "ro-j03"],
            vec!["export"],
            vec!["export", "--format", "csv"],
            vec!["sweep", "--dry-run", "--json"],
        ];
        // An unreachable broker: a read that tried it would fail or wait for its timeout.
        let bogus = "amqp://ferry:nope@10.255.255.1:5672/%2f";
        let run_reads = |url: &str, how: &str| -> Result<Vec<(String, String)>> {
            let mut out = Vec::new();
            for args in &reads {
                let mut cmd = dlq(url, args);
                match how {
                    "none" => {}
                    "env" => {
                        cmd.env("FERRY_AMQP_URL", bogus).env("FERRY_AMQP_CONNECT_TIMEOUT_SECS", "30");
                    }
                    _ => {
                        cmd.args(["--amqp", bogus, "--amqp-connect-timeout-secs", "30"]);
                    }
                }
                let started = Instant::now();
                let o = output(&mut cmd)?;
                ensure!(
                    o.status.success(),
                    "dlq {args:?} ({how}): {} {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                );
                ensure!(
                    started.elapsed() < Duration::from_secs(20),
                    "dlq {args:?} ({how}) took {:?}",
                    started.elapsed()
                );
                // `summary` prints ages ("3s ago"): compare the JSON forms and the rest as is.
                let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
                let comparable = if args == &["summary"] { stdout.lines().count().to_string() } else { stdout };
                out.push((args.join(" "), comparable));
            }
            Ok(out)
        };
        let no_broker = run_reads(&ts.url, "none")?;
        assert_eq!(run_reads(&ts.url, "env")?, no_broker, "an unreachable broker in the environment changed a read");
        assert_eq!(run_reads(&ts.url, "flag")?, no_broker, "an unreachable --amqp changed a read");
        let all = serde_json::from_str::<Value>(&no_broker[3].1)?;
        assert_eq!(listed_ids(&all)?.len(), letters.len(), "{all}");
        let page = serde_json::from_str::<Value>(&no_broker[7].1)?;
        assert_eq!(listed_ids(&page)?, ["ro-j05", "ro-j06", "ro-j07", "ro-j08", "ro-j09"], "{page}");
        let dry = serde_json::from_str::<Value>(&no_broker[11].1)?;
        assert_eq!((dry["checked"].as_u64(), dry["migrated"].as_u64()), (Some(17), Some(1)), "{dry}");
        assert!(index_rows(&store).await? == rows, "a read changed the index");

        // A requeue is the one command that needs the broker: refused before it moves anything.
        let mut requeue = dlq(&ts.url, &["requeue", "--json"]);
        requeue.env("FERRY_AMQP_URL", "amqp://ferry:nope@127.0.0.1:1/%2f");
        let refused = output(&mut requeue)?;
        assert!(!refused.status.success(), "a requeue with no reachable broker succeeded");
        assert!(index_rows(&store).await? == rows, "a failed requeue changed the index");
        assert!(tickets(&store).await?.is_empty());

        if backend == Backend::Postgres {
            // The same reads as a role that may only SELECT from the store's table.
            let schema = schema_of(&ts.url).context("a schema in the test store's URL")?;
            let role = ReadOnlyRole::create(&schema).await?;
            assert_eq!(run_reads(&role.url(), "env")?, no_broker, "a read-only role read something else");
            let purge = output(&mut dlq(&role.url(), &["purge", "--yes"]))?;
            assert!(!purge.status.success(), "a read-only role could purge");
            let why = String::from_utf8_lossy(&purge.stderr);
            assert!(why.contains("permission denied"), "the refusal names the cause: {why}");
            assert!(index_rows(&store).await? == rows, "a refused purge changed the index");
        }
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Reads leave the broker untouched

/// The management API's view of a queue: what a read of the queue would move.
fn queue_counters(q: &Value) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for field in ["messages", "messages_ready", "messages_unacknowledged", "consumers"] {
        out.insert(field.to_string(), q[field].as_i64().unwrap_or(0));
    }
    for stat in
        ["publish", "deliver", "deliver_no_ack", "deliver_get", "get", "get_no_ack", "get_empty", "redeliver", "ack"]
    {
        out.insert(format!("message_stats.{stat}"), q["message_stats"][stat].as_i64().unwrap_or(0));
    }
    out
}

type Counters = BTreeMap<String, i64>;

/// The management API's counters of two queues, each given as (name, messages published to it,
/// messages in it), once they count exactly that: statistics at least as new as everything
/// done to the queues before.
async fn settled(work: (&str, i64, i64), dead: (&str, i64, i64)) -> Result<(Counters, Counters)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let counted = |c: &Counters, (_, published, messages): (&str, i64, i64)| {
        c["message_stats.publish"] == published && c["messages"] == messages && c["messages_ready"] == messages
    };
    loop {
        let work_now = queue_counters(&management_get(&format!("/api/queues/%2f/{}", work.0)).await?);
        let dead_now = queue_counters(&management_get(&format!("/api/queues/%2f/{}", dead.0)).await?);
        if counted(&work_now, work) && counted(&dead_now, dead) {
            return Ok((work_now, dead_now));
        }
        ensure!(
            Instant::now() < deadline,
            "the management API never counted (published, messages) {work:?} and {dead:?}: {work_now:?} {dead_now:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn reading_dead_letters_leaves_the_broker_untouched(backend: Backend) -> Result<()> {
    let _shared = BROKER.read().await;
    bounded(Duration::from_secs(420), async {
        let ts = TestStore::new(backend).await;
        let store = ts.store();
        let broker = ferry_tests::Broker::new("t15_untouched").await?;
        let logs = tempfile::tempdir()?;
        for i in 0..6u64 {
            write(&store, &id(&format!("uj-{i}")), &hot_journal(400 + i)?).await?;
        }
        for i in 0..3u64 {
            write(&store, &id(&format!("un-{i}")), &plain(500 + i)?).await?;
        }
        // Workers dead-letter 6 actors: in the index, through the broker's inbox (drained and
        // acked by the workers' dead-letter inbox) and in its dead-letter log.
        run_campaign(&ts, &broker, "untouched", 9, 6, logs.path()).await?;
        // Jobs waiting in the work queue too.
        for i in 0..3u64 {
            broker.publish_job(&Job::new("untouched", id(&format!("uw-{i}")), 1, None)).await?;
        }
        let (work_q, dead_q) = (broker.topology.work_queue(), broker.topology.dead_queue());
        let (work_before, dead_before) = settled((&work_q, 9 + 3, 3), (&dead_q, 6, 0)).await?;
        assert_eq!((work_before["messages"], dead_before["messages"]), (3, 0), "{work_before:?} {dead_before:?}");
        let depths_before = (broker.depth(&work_q).await?, broker.dead_depth().await?, broker.dead_log_depth().await?);
        // A dead-lettered actor migrated since, for the dry sweep to count (exit 0).
        migrated_since(&store, "uj-0").await?;

        // Every read, 25 times: half of them told where the broker is.
        let reads: Vec<Vec<&str>> = vec![
            vec!["summary"],
            vec!["summary", "--json"],
            vec!["list"],
            vec!["list", "--json"],
            vec!["list", "--json", "--limit", "2"],
            vec!["show", "uj-3"],
            vec!["export"],
            vec!["export", "--format", "csv"],
            vec!["sweep", "--dry-run", "--json"],
        ];
        let rows = index_rows(&store).await?;
        for round in 0..25 {
            for args in &reads {
                let mut cmd =
                    if round % 2 == 0 { dlq(&ts.url, args) } else { dlq_fleet(&ts.url, &broker.topology, args) };
                run_ok(&mut cmd)?;
            }
        }
        assert!(index_rows(&store).await? == rows, "a read changed the index");
        assert_eq!(
            (broker.depth(&work_q).await?, broker.dead_depth().await?, broker.dead_log_depth().await?),
            depths_before
        );

        // One marker message published to each queue: once the statistics count it, they are
        // newer than every read above, and nothing else may have moved.
        broker.publish_job(&Job::new("untouched", id("marker"), 2, None)).await?;
        let props = amqp::json_properties("marker", FieldTable::default());
        let confirm = broker
            .channel()
            .basic_publish("".into(), dead_q.as_str().into(), BasicPublishOptions::default(), b"{}", props)
            .await?;
        ensure!(confirm.await?.is_ack(), "marker not confirmed");
        let (work_after, dead_after) = settled((&work_q, 9 + 3 + 1, 4), (&dead_q, 6 + 1, 1)).await?;
        let moved = |before: &Counters, after: &Counters| {
            let mut want = before.clone();
            *want.get_mut("messages").expect("messages") += 1;
            *want.get_mut("messages_ready").expect("ready") += 1;
            *want.get_mut("message_stats.publish").expect("publish") += 1;
            want.iter()
                .filter(|(k, v)| after.get(*k) != Some(v))
                .map(|(k, v)| format!("{k}: {v} -> {:?}", after.get(k)))
                .collect::<Vec<_>>()
        };
        assert!(moved(&work_before, &work_after).is_empty(), "work queue: {:?}", moved(&work_before, &work_after));
        assert!(
            moved(&dead_before, &dead_after).is_empty(),
            "dead-letter queue: {:?}",
            moved(&dead_before, &dead_after)
        );

        // The dead letters were never handed back: none in the log carries a delivery count.
        let dead = broker.dead_log().await?;
        assert_eq!(dead.len(), 6);
        for m in &dead {
            let count = amqp::int_header(&m.properties, amqp::DELIVERY_COUNT_HEADER).unwrap_or(0);
            assert_eq!(count, 0, "a dead letter was delivered {count} times before: {:?}", m.properties);
        }
        Ok(())
    })
    .await
}
