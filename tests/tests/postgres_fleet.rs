//! End to end: a fleet of `ferry-worker run` processes on one PostgreSQL store, fed by
//! `ferry-producer enqueue` through the real RabbitMQ broker.
//!
//! - overlapping campaigns: every actor is migrated exactly once (one staged txid, one
//!   generation), v2 equals v1, every rejected actor is dead-lettered once per job, the
//!   queues drain;
//! - the store's connections terminated again and again during a campaign: the workers
//!   retry, the campaign completes as planted, and nothing is left half-written (no
//!   MigratingFromV1 head, no lease, no orphaned pages).
//!
//! Needs PostgreSQL at `ferry::testing::postgres_url()` and RabbitMQ at
//! `ferry::testing::amqp_url()`; fails when either is down. Each test has its own schema and
//! queue prefix, both removed at the end (also on failure).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry::checksum::DatabaseChecksum;
use ferry::jobs::DeadLetter;
use ferry::keys;
use ferry::migrate::{AuditRecord, OutcomeKind};
use ferry::queue::Topology;
use ferry::store::{DynStore, KeyRange};
use ferry::synth::keyspace::{Expected, Mix, PlannedActor, SeedConfig, plan, seed};
use ferry::testing::{Backend, TestStore, amqp_url, postgres_url, unique_name};
use ferry::v1::{ReadOptions, read_v1};
use ferry::v2::{DBHead, Origin, read_v2};
use ferry::{ActorId, DeadLetterReason};
use ferry_tests::bin;
use ferry_tests::{Proc, ended_as_planted};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers (kept in this file: tests/src/lib.rs belongs to another suite's work in progress).
// ---------------------------------------------------------------------------------------------

fn msg<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

async fn bounded<T>(limit: Duration, fut: impl Future<Output = Result<T>>) -> Result<T> {
    // Building the binaries (once per test process) is not part of the bound.
    bin("ferry-producer");
    bin("ferry-worker");
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => bail!("test did not finish within {limit:?}"),
    }
}

/// A command with no ferry settings inherited from the environment.
fn command(name: &str, log: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    for (k, _) in std::env::vars() {
        if k.starts_with("FERRY_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", log);
    cmd
}

fn run_json(cmd: &mut Command) -> Result<Value> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("spawning {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).with_context(|| format!("stdout: {}", String::from_utf8_lossy(&out.stdout)))
}

fn logs_of(procs: &[Proc]) -> String {
    procs.iter().map(Proc::log_tail).collect::<Vec<_>>().join("\n")
}

/// Stops workers the way an orchestrator does (SIGTERM) and expects a clean exit.
async fn stop(workers: &mut [Proc]) -> Result<()> {
    for w in workers.iter() {
        w.sigterm()?;
    }
    for w in workers.iter_mut() {
        let status = w.wait_exit(Duration::from_secs(60)).await?;
        ensure!(status.success(), "{} exited with {status}:\n{}", w.name, w.log_tail());
    }
    Ok(())
}

/// A unique queue prefix on the test broker with its topology declared; every queue and
/// exchange is deleted when this is dropped (also when the test fails).
struct Broker {
    topology: Topology,
    conn: Connection,
    ch: Channel,
}

impl Broker {
    async fn new(tag: &str) -> Result<Broker> {
        let topology = Topology::new(&unique_name(tag));
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.with_context(|| {
            format!("RabbitMQ must be running for this test ({})", ferry::queue::amqp::redacted(&amqp_url()))
        })?;
        let ch = conn.create_channel().await?;
        topology.declare(&ch).await?;
        Ok(Broker { topology, conn, ch })
    }

    async fn count(&self, queue: &str) -> Result<u32> {
        let opts = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        Ok(self.ch.queue_declare(queue.into(), opts, FieldTable::default()).await?.message_count())
    }

    /// Ready messages: (work, every retry tier, dead letters in the dead-letter log; the
    /// workers drain the inbox `{p}.dead`, the log keeps them).
    async fn depths(&self) -> Result<(u32, u32, u32)> {
        let mut retry = 0;
        for q in self.topology.retry_queues() {
            retry += self.count(&q).await?;
        }
        Ok((self.count(&self.topology.work_queue()).await?, retry, self.count(&self.topology.dead_log()).await?))
    }

    /// The dead letters, read from the dead-letter log (a stream: reading takes nothing).
    async fn peek_dead(&self) -> Result<Vec<DeadLetter>> {
        let n = self.count(&self.topology.dead_log()).await? as usize;
        let mut out = Vec::new();
        let mut bad = 0;
        ferry_tests::read_stream(&self.conn, &self.topology.dead_log(), Duration::from_secs(20), |m| {
            match DeadLetter::decode(&m.body) {
                Some(d) => out.push(d),
                None => bad += 1,
            }
            out.len() + bad < n
        })
        .await?;
        ensure!(bad == 0, "{bad} dead letters do not decode");
        Ok(out)
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

fn enqueue_cmd(store_url: &str, broker: &Broker, campaign: &str) -> Command {
    let mut cmd = command("ferry-producer", "warn");
    cmd.args(["enqueue", "--store", store_url, "--amqp", &amqp_url(), "--queue-prefix", &broker.topology.prefix]);
    cmd.args(["--campaign", campaign, "--json"]);
    cmd
}

fn worker(store_url: &str, broker: &Broker, name: &str, dir: &Path) -> Result<Proc> {
    let mut cmd = command("ferry-worker", "info");
    cmd.args(["run", "--store", store_url, "--amqp", &amqp_url(), "--queue-prefix", &broker.topology.prefix]);
    cmd.args(["--concurrency", "2", "--http", "off", "--retry-min-ms", "100", "--retry-max-ms", "1000"]);
    cmd.args(["--lease-ttl-secs", "5", "--shutdown-grace", "30", "--worker-id", name]);
    Proc::spawn(name, cmd, dir)
}

/// The audit records of the planted actors that exist so far.
async fn audits(store: &DynStore, actors: &[PlannedActor]) -> Result<BTreeMap<ActorId, AuditRecord>> {
    let mut out = BTreeMap::new();
    for a in actors {
        if let Some(raw) = store.get(&keys::audit(&a.id)).await? {
            out.insert(a.id.clone(), AuditRecord::decode(&raw).with_context(|| format!("{}: audit", a.id))?);
        }
    }
    Ok(out)
}

/// Waits until every actor ended as planted and the broker holds nothing but the expected
/// dead letters, seen twice in a row (a retry in flight between queues is not ready anywhere).
async fn wait_for_campaign(
    store: &DynStore,
    broker: &Broker,
    actors: &[PlannedActor],
    dead_letters: u32,
    timeout: Duration,
    workers: &[Proc],
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut settled = 0;
    loop {
        let audits = audits(store, actors).await?;
        let ended = actors.iter().filter(|a| audits.get(&a.id).is_some_and(|au| ended_as_planted(a.case, au))).count();
        let (work, retry, dead) = broker.depths().await?;
        if ended == actors.len() && work == 0 && retry == 0 && dead == dead_letters {
            settled += 1;
            if settled == 2 {
                return Ok(());
            }
        } else {
            settled = 0;
        }
        if Instant::now() > deadline {
            let stray: Vec<String> = actors
                .iter()
                .filter(|a| !audits.get(&a.id).is_some_and(|au| ended_as_planted(a.case, au)))
                .take(5)
                .map(|a| format!("{} {:?}: {:?}", a.id, a.case, audits.get(&a.id).map(|au| (au.outcome, au.reason))))
                .collect();
            bail!(
                "campaign did not end in {timeout:?}: {ended}/{} ended as planted, work={work} retry={retry} \
                 dead={dead} (want {dead_letters}); not as planted: {stray:?}\n{}",
                actors.len(),
                logs_of(workers)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Checks the store after a campaign: every migrated actor has exactly one staged txid whose
/// pages equal v1, the audit agrees with the head, and nothing is half-written anywhere.
async fn check_store(store: &DynStore, actors: &[PlannedActor], first_generation: bool) -> Result<u64> {
    let leases = store.scan(&KeyRange::prefix(keys::LEASE_PREFIX), 100).await?;
    ensure!(leases.is_empty(), "leases left: {:?}", leases.iter().map(|(k, _)| keys::printable(k)).collect::<Vec<_>>());
    let mut migrated = 0;
    for a in actors {
        let audit = AuditRecord::decode(&store.get(&keys::audit(&a.id)).await?.context("audit")?).context("audit")?;
        let v2_keys = store.scan(&KeyRange::prefix(&v2_prefix(&a.id)), usize::MAX >> 1).await?;
        let head = match store.get(&ferry::v2::keys::meta(&a.id)).await? {
            Some(raw) => Some(DBHead::decode(&raw).map_err(msg)?),
            None => None,
        };
        if a.case.expected() != Expected::Outcome(OutcomeKind::Migrated) {
            if a.case.expected() != Expected::Outcome(OutcomeKind::SkippedNativeV2) {
                ensure!(v2_keys.is_empty(), "{}: {:?} actor has v2 rows: {}", a.id, a.case, v2_keys.len());
            }
            continue;
        }
        migrated += 1;
        let head = head.with_context(|| format!("{}: no v2 head", a.id))?;
        ensure!(head.origin == Origin::MigratedFromV1, "{}: head {:?}", a.id, head.origin);
        ensure!(audit.generation == Some(head.generation), "{}: audit generation vs head {}", a.id, head.generation);
        ensure!(
            head.generation >= 1 && head.head_txid >= 1 && head.next_txid == head.head_txid + 1,
            "{}: {head:?}",
            a.id
        );
        // Without faults no migration is ever taken over: one begin, generation 1.
        ensure!(!first_generation || head.generation == 1, "{}: generation {}", a.id, head.generation);
        let delta_prefix = ferry::v2::keys::delta_prefix(&a.id);
        let txids: BTreeSet<u64> = store
            .scan(&KeyRange::prefix(&delta_prefix), usize::MAX >> 1)
            .await?
            .iter()
            .map(|(k, _)| {
                u64::from_be_bytes(k[delta_prefix.len()..delta_prefix.len() + 8].try_into().expect("8 bytes"))
            })
            .collect();
        ensure!(txids == BTreeSet::from([head.head_txid]), "{}: DELTA txids {txids:?}, head {}", a.id, head.head_txid);
        let pidx = store.scan(&KeyRange::prefix(&ferry::v2::keys::pidx_prefix(&a.id)), usize::MAX >> 1).await?;
        ensure!(
            pidx.len() == head.db_size_pages as usize,
            "{}: {} PIDX rows for {} pages",
            a.id,
            pidx.len(),
            head.db_size_pages
        );
        ensure!(
            pidx.iter().all(|(_, v)| v.as_slice() == head.head_txid.to_be_bytes()),
            "{}: PIDX not all at the head txid",
            a.id
        );
        let v1 = read_v1(&**store, &a.id, ReadOptions::default()).await.with_context(|| format!("{}: v1", a.id))?;
        let v2 = read_v2(&**store, &a.id).await.with_context(|| format!("{}: v2", a.id))?;
        ensure!(v1.main == v2.file, "{}: v2 differs from v1", a.id);
        let checksum = DatabaseChecksum::of_file(&v1.main, 4096).hex();
        ensure!(audit.checksum.as_deref() == Some(checksum.as_str()), "{}: checksum", a.id);
    }
    Ok(migrated)
}

/// `v2/{actor}/`: every v2 row of the actor.
fn v2_prefix(actor: &ActorId) -> Vec<u8> {
    let mut p = keys::V2_PREFIX.to_vec();
    p.extend_from_slice(actor.as_bytes());
    p.push(b'/');
    p
}

fn rejected(actors: &[PlannedActor]) -> BTreeMap<ActorId, DeadLetterReason> {
    actors
        .iter()
        .filter_map(|a| match a.case.expected() {
            Expected::DeadLetter(r) => Some((a.id.clone(), r)),
            Expected::Outcome(_) => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_one_postgres_store_migrate_every_actor_of_overlapping_campaigns_exactly_once() -> Result<()> {
    bounded(Duration::from_secs(240), async {
        let broker = Broker::new("ferry_t_pgfleet").await?;
        let ts = TestStore::new(Backend::Postgres).await;
        let store = ts.store();
        let logs = tempfile::tempdir()?;
        let cfg = SeedConfig {
            actors: 60,
            seed: 17,
            mix: Mix::parse("journal=0.05,wal=0.05,corrupt=0.05").map_err(msg)?,
            max_mib: 2,
            large_share: 0.05,
            prefix: "pgf".into(),
            ..SeedConfig::default()
        };
        seed(&*store, &cfg, |_| {}).await.map_err(msg)?;
        let actors = plan(&cfg);
        let rejected = rejected(&actors);
        let v1_before = store.scan(&KeyRange::prefix(keys::V1_PREFIX), usize::MAX >> 1).await?;

        // Two campaigns over the same actors, enqueued at the same time (so each actor's two
        // jobs sit close together in the work queue) before any worker starts.
        let producers: Vec<Child> = ["pgf-c1", "pgf-c2"]
            .iter()
            .map(|c| {
                let mut cmd = enqueue_cmd(&ts.url, &broker, c);
                cmd.args(["--rate", "100"]).stdin(Stdio::null()).stdout(Stdio::piped()).spawn()
            })
            .collect::<Result<_, _>>()?;
        for p in producers {
            let out = p.wait_with_output()?;
            ensure!(out.status.success(), "enqueue failed: {}", String::from_utf8_lossy(&out.stderr));
            let summary: Value = serde_json::from_slice(&out.stdout)?;
            assert_eq!(summary["published"], actors.len(), "{summary}");
        }
        let started = Instant::now();
        let mut workers = Vec::new();
        for i in 0..3 {
            workers.push(worker(&ts.url, &broker, &format!("pgf-w{i}"), logs.path())?);
        }
        let dead = 2 * rejected.len() as u32;
        wait_for_campaign(&store, &broker, &actors, dead, Duration::from_secs(150), &workers).await?;
        let elapsed = started.elapsed();
        stop(&mut workers).await?;

        let (work, retry, dead_after) = broker.depths().await?;
        assert_eq!((work, retry, dead_after), (0, 0, dead), "queues after the workers stopped");
        let migrated = check_store(&store, &actors, true).await?;
        assert_eq!(migrated as usize, actors.len() - rejected.len());
        // Every rejected actor: one dead letter per campaign, with its planted reason.
        let mut letters: BTreeMap<(String, String), Vec<DeadLetterReason>> = BTreeMap::new();
        for d in broker.peek_dead().await? {
            letters.entry((d.actor_id, d.campaign)).or_default().push(d.reason);
        }
        let expected: BTreeMap<(String, String), Vec<DeadLetterReason>> = rejected
            .iter()
            .flat_map(|(a, r)| ["pgf-c1", "pgf-c2"].map(|c| ((a.to_string(), c.to_string()), vec![*r])))
            .collect();
        assert_eq!(letters, expected);
        let raced: usize = workers.iter().map(|w| w.log().matches("in progress elsewhere").count()).sum();
        let v1_after = store.scan(&KeyRange::prefix(keys::V1_PREFIX), usize::MAX >> 1).await?;
        assert!(v1_after == v1_before, "v1 must be untouched");
        eprintln!(
            "{} actors, 2 campaigns, 3 workers: {elapsed:?}; {raced} jobs found their actor in progress elsewhere",
            actors.len()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_ride_out_terminated_postgres_connections_and_leave_nothing_half_written() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let broker = Broker::new("ferry_t_pgkill").await?;
        let ts = TestStore::new(Backend::Postgres).await;
        let store = ts.store();
        let logs = tempfile::tempdir()?;
        // The workers' connections carry a name of their own, so only they are terminated.
        let app = unique_name("ferry_t_pgkill");
        let worker_url = format!("{}&application_name={app}", ts.url);
        let cfg = SeedConfig {
            actors: 200,
            seed: 23,
            mix: Mix::parse("journal=0.02,wal=0.02,corrupt=0.02,missing_chunk=0.02").map_err(msg)?,
            max_mib: 2,
            large_share: 0.05,
            prefix: "pgk".into(),
            ..SeedConfig::default()
        };
        seed(&*store, &cfg, |_| {}).await.map_err(msg)?;
        let actors = plan(&cfg);
        let rejected = rejected(&actors);
        let summary = run_json(&mut enqueue_cmd(&ts.url, &broker, "pgk-c1"))?;
        assert_eq!(summary["published"], actors.len(), "{summary}");

        let (admin, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
            .await
            .context("PostgreSQL must be running for this test")?;
        let admin_task = tokio::spawn(conn);
        let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE application_name = $1 AND pid <> pg_backend_pid()";

        let mut workers = Vec::new();
        for i in 0..3 {
            workers.push(worker(&worker_url, &broker, &format!("pgk-w{i}"), logs.path())?);
        }
        // Terminate every worker connection each time another slice of the actors is done,
        // always before the campaign is.
        let total = actors.len();
        let thresholds = [total / 10, total / 4, 2 * total / 5, 11 * total / 20, 7 * total / 10];
        let mut rounds = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        for threshold in thresholds {
            let done = loop {
                let done = store.scan(&KeyRange::prefix(keys::AUDIT_PREFIX), usize::MAX >> 1).await?.len();
                if done >= threshold {
                    break done;
                }
                ensure!(Instant::now() < deadline, "campaign stalled at {done}/{total}:\n{}", logs_of(&workers));
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let killed: i64 = admin.query_one(terminate, &[&app]).await?.get(0);
            rounds.push((done, killed));
        }
        let done_after_kills = store.scan(&KeyRange::prefix(keys::AUDIT_PREFIX), usize::MAX >> 1).await?.len();
        ensure!(done_after_kills < total, "the campaign ended before the last termination: {rounds:?}");
        ensure!(rounds.iter().all(|(_, killed)| *killed > 0), "a round terminated nothing: {rounds:?}");

        wait_for_campaign(&store, &broker, &actors, rejected.len() as u32, Duration::from_secs(150), &workers).await?;
        stop(&mut workers).await?;
        let (work, retry, dead) = broker.depths().await?;
        assert_eq!((work, retry, dead), (0, 0, rejected.len() as u32), "queues after the workers stopped");
        let migrated = check_store(&store, &actors, false).await?;
        assert_eq!(migrated as usize, actors.len() - rejected.len());
        let letters: BTreeMap<ActorId, DeadLetterReason> = broker
            .peek_dead()
            .await?
            .into_iter()
            .map(|d| (ActorId::parse(&d.actor_id).expect("valid actor id"), d.reason))
            .collect();
        assert_eq!(letters, rejected, "one dead letter per rejected actor, with its planted reason");
        let heads = store.scan(&KeyRange::prefix(keys::V2_PREFIX), usize::MAX >> 1).await?;
        for (k, v) in heads.iter().filter(|(k, _)| k.ends_with(b"/META")) {
            let head = DBHead::decode(v).map_err(msg)?;
            ensure!(head.origin != Origin::MigratingFromV1, "half-written: {}", keys::printable(k));
        }
        let retried: usize = workers.iter().map(|w| w.log().matches("retrying later").count()).sum();
        let reattempted = audits(&store, &actors).await?.values().filter(|a| a.attempts.unwrap_or(1) > 1).count();
        eprintln!(
            "terminations at (actors done, connections killed) {rounds:?}; {retried} retries logged, \
             {reattempted} actors ended on a later attempt"
        );
        admin_task.abort();
        Ok(())
    })
    .await
}
