//! End to end on the AMQP fleet: the built `ferry-producer` and `ferry-worker run` binaries as
//! separate processes, on the machine's RabbitMQ and a shared store (a temp-dir SQLite file, or
//! a PostgreSQL schema). Every test has its own queue prefix, deleted at the end, and its own
//! store, so the tests run in parallel without seeing each other.
//!
//! What is proven: a campaign with every hard case ends each actor as the generator planted it
//! (audit records, dead-letter messages, v2 = v1); duplicates migrate once; SIGKILL, SIGTERM
//! and a broker that drops connections lose nothing; the broker dead-letters a job past its
//! delivery limit; a killed producer resumes from its checkpoint; bad messages are
//! dead-lettered without stopping a worker.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use ferry::ActorId;
use ferry::DeadLetterReason;
use ferry::campaign::{self, CampaignStatus};
use ferry::clock::{Clock, SystemClock};
use ferry::jobs::{DeadLetter, Job};
use ferry::keys;
use ferry::migrate::lease::Lease;
use ferry::migrate::{AuditRecord, OutcomeKind};
use ferry::queue::amqp;
use ferry::queue::enqueue::PRODUCER_WORKER;
use ferry::store::{DynStore, Txn};
use ferry::synth::keyspace::{Case, Expected};
use ferry::testing::{Backend, TestStore};
use ferry::v1::{ReadOptions, read_v1};
use ferry::v2::{DBHead, Origin, read_v2};
use ferry_tests::{
    Broker, Message, Proc, Seed, WorkerSpec, audit_count, audits, bin, bounded, close_connection, connections_named,
    delta_txids, enqueue, enqueue_command, enqueued, leases, register_campaign, run_json, sample, scrape, v2_head,
    wait_until, wait_until_every,
};
use lapin::options::{BasicGetOptions, BasicRejectOptions};

/// Every test finishes well within this, or fails (its processes killed, its queues deleted).
const LIMIT: Duration = Duration::from_secs(55);
/// A worker asked to stop (SIGTERM) exits within this.
const STOP: Duration = Duration::from_secs(15);

/// Every hard case, a few of each in 150 actors.
const HARD_MIX: &str = "journal=0.04,wal=0.04,shm=0.03,corrupt=0.03,page_size=0.03,missing_chunk=0.03,oversize=0.02,\
                        bad_header=0.03,bad_meta=0.02,missing_main=0.02,not_aligned=0.02,native=0.03,no_v1=0.03";

fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// Builds the binaries before a test's clock starts.
fn binaries() {
    bin("ferry-worker");
    bin("ferry-producer");
}

/// One test's store (shared by its processes) and a directory for process logs.
struct Ctx {
    logs: tempfile::TempDir,
    test_store: TestStore,
}

impl Ctx {
    async fn new(backend: Backend) -> Result<Ctx> {
        Ok(Ctx { logs: tempfile::tempdir()?, test_store: TestStore::new(backend).await })
    }

    fn url(&self) -> &str {
        &self.test_store.url
    }

    fn store(&self) -> DynStore {
        self.test_store.store()
    }

    fn logs(&self) -> &std::path::Path {
        self.logs.path()
    }
}

/// Whether a fault (a kill, a lost connection) may have made a job run again: a migrated actor
/// may then end `skipped_already_migrated` (its migration's fields kept), and a dead letter may
/// be published twice.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Faults {
    None,
    Some,
}

/// Checks every planted actor's end state in the store: audit record (outcome, reason,
/// campaign, worker), v2 head, v2 = v1 with the audited checksum. Returns the dead-lettered
/// actors with their planted reasons.
async fn check_as_planted(
    store: &DynStore,
    plan: &[(ActorId, Case)],
    campaign: &str,
    workers: &[&str],
    faults: Faults,
) -> Result<BTreeMap<String, DeadLetterReason>> {
    let audits = audits(store).await?;
    let mut dead = BTreeMap::new();
    for (actor, case) in plan {
        let audit = audits.get(actor.as_str());
        let head = v2_head(store, actor).await?;
        let audit = audit.with_context(|| format!("{actor} ({case:?}): no audit record"))?;
        ensure!(audit.campaign == campaign, "{actor}: audit campaign {:?}", audit.campaign);
        if !enqueued(*case) {
            // The producer records the skip of an actor it sends no job for.
            ensure!(audit.worker == PRODUCER_WORKER, "{actor} ({case:?}) skipped by {:?}", audit.worker);
            ensure!(case.expected() == Expected::Outcome(audit.outcome), "{actor} ({case:?}) ended {}", audit.outcome);
            let want = (*case == Case::Native).then_some(Origin::Native);
            ensure!(head.as_ref().map(|h| h.origin) == want, "{actor} ({case:?}): v2 head {head:?}");
            continue;
        }
        ensure!(workers.contains(&audit.worker.as_str()), "{actor}: audit worker {:?}", audit.worker);
        match case.expected() {
            Expected::Outcome(OutcomeKind::Migrated) => {
                let ok = audit.outcome == OutcomeKind::Migrated
                    || (faults == Faults::Some && audit.outcome == OutcomeKind::SkippedAlreadyMigrated);
                ensure!(ok, "{actor} ({case:?}) ended {} ({:?}: {:?})", audit.outcome, audit.reason, audit.error);
                let head = head.with_context(|| format!("{actor}: migrated without a v2 head"))?;
                ensure!(head.origin == Origin::MigratedFromV1, "{actor}: head origin {:?}", head.origin);
                ensure!(head.head_txid >= 1 && head.next_txid == head.head_txid + 1, "{actor}: head {head:?}");
                ensure!(audit.generation == Some(head.generation), "{actor}: audit generation vs head {head:?}");
                ensure!(audit.pages == Some(head.db_size_pages), "{actor}: audit pages vs head {head:?}");
                assert_v2_equals_v1(store, actor, audit).await?;
            }
            Expected::Outcome(other) => anyhow::bail!("{actor}: planted {case:?} expects {other}, never enqueued"),
            Expected::DeadLetter(reason) => {
                ensure!(
                    audit.outcome == OutcomeKind::DeadLettered && audit.reason == Some(reason),
                    "{actor} ({case:?}) ended {} {:?}, planted {reason}",
                    audit.outcome,
                    audit.reason
                );
                ensure!(audit.error.as_deref().is_some_and(|e| !e.is_empty()), "{actor}: no error text");
                ensure!(head.is_none(), "{actor}: rejected, but v2 was written: {head:?}");
                dead.insert(actor.to_string(), reason);
            }
        }
    }
    let left = leases(store).await?;
    ensure!(left.is_empty(), "lease rows left: {left:?}");
    Ok(dead)
}

async fn assert_v2_equals_v1(store: &DynStore, actor: &ActorId, audit: &AuditRecord) -> Result<()> {
    let v1 = read_v1(&**store, actor, ReadOptions::default()).await.with_context(|| format!("{actor}: v1"))?;
    let v2 = read_v2(&**store, actor).await.with_context(|| format!("{actor}: v2"))?;
    ensure!(v1.main == v2.file, "{actor}: v2 ({} bytes) differs from v1 ({} bytes)", v2.file.len(), v1.main.len());
    let checksum = ferry::checksum::DatabaseChecksum::of_file(&v1.main, 4096).hex();
    ensure!(audit.checksum.as_deref() == Some(checksum.as_str()), "{actor}: checksum {:?}", audit.checksum);
    ensure!(audit.v1_bytes == Some(v1.main.len() as u64), "{actor}: v1_bytes {:?}", audit.v1_bytes);
    Ok(())
}

/// Checks the dead-letter log's messages against the planted dead letters: each is a JSON
/// `DeadLetter` with every triage field, the `x-ferry-*` headers (marked indexed), and the
/// planted reason; every planted dead letter is there (exactly once without faults).
fn check_dead_letters(
    messages: &[Message],
    planted: &BTreeMap<String, DeadLetterReason>,
    campaign: &str,
    workers: &[&str],
    since_ms: i64,
    faults: Faults,
) -> Result<()> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in messages {
        let raw = m.json()?;
        for field in ["actor_id", "campaign", "reason", "phase", "error", "attempts", "worker", "at_ms", "v1_files"] {
            ensure!(raw.get(field).is_some(), "dead letter without {field}: {raw}");
        }
        let dl = DeadLetter::decode(&m.body).with_context(|| format!("not a DeadLetter: {raw}"))?;
        let actor = dl.actor_id.clone();
        let want = planted.get(&actor).with_context(|| format!("unexpected dead letter: {raw}"))?;
        ensure!(dl.reason == *want, "{actor}: dead letter reason {}, planted {want}", dl.reason);
        ensure!(m.str_header(amqp::REASON_HEADER).as_deref() == Some(want.as_str()), "{actor}: x-ferry-reason");
        ensure!(m.str_header(amqp::ACTOR_HEADER).as_deref() == Some(actor.as_str()), "{actor}: x-ferry-actor");
        ensure!(m.str_header(amqp::CAMPAIGN_HEADER).as_deref() == Some(campaign), "{actor}: x-ferry-campaign");
        ensure!(amqp::has_header(&m.properties, amqp::INDEXED_HEADER), "{actor}: not marked x-ferry-indexed");
        ensure!(
            m.properties.message_id().as_ref().map(|s| s.as_str()) == Some(format!("{campaign}/{actor}").as_str()),
            "{actor}: message id {:?}",
            m.properties.message_id()
        );
        ensure!(m.properties.delivery_mode() == &Some(2), "{actor}: dead letter is not persistent");
        ensure!(dl.campaign == campaign, "{actor}: campaign {:?}", dl.campaign);
        ensure!(matches!(dl.phase.as_str(), "read" | "validate"), "{actor}: phase {:?}", dl.phase);
        ensure!(!dl.error.is_empty(), "{actor}: empty error");
        ensure!(dl.attempts >= 1, "{actor}: attempts {}", dl.attempts);
        ensure!(workers.contains(&dl.worker.as_str()), "{actor}: worker {:?}", dl.worker);
        ensure!(dl.at_ms >= since_ms && dl.at_ms <= now_ms(), "{actor}: at_ms {}", dl.at_ms);
        let files = dl.v1_files.as_ref().with_context(|| format!("{actor}: no v1_files"))?;
        let sidecar = match want {
            DeadLetterReason::JournalSidecar => files.journal,
            DeadLetterReason::WalSidecar => files.wal,
            DeadLetterReason::ShmSidecar => files.shm,
            _ => Some(0),
        };
        ensure!(sidecar.is_some(), "{actor}: v1_files {files:?} does not show the {want} sidecar");
        if *want == DeadLetterReason::Oversize {
            ensure!(files.main > Some(128 << 20), "{actor}: oversize main is {:?}", files.main);
        }
        let job =
            Job::parse(dl.message.as_bytes()).with_context(|| format!("{actor}: kept message {:?}", dl.message))?;
        ensure!(job.actor_id.as_str() == actor && job.campaign == campaign, "{actor}: kept job {job:?}");
        *seen.entry(actor).or_default() += 1;
    }
    for actor in planted.keys() {
        let n = seen.get(actor).copied().unwrap_or(0);
        match faults {
            Faults::None => ensure!(n == 1, "{actor}: {n} dead letters, expected exactly 1"),
            Faults::Some => ensure!(n >= 1, "{actor}: no dead letter"),
        }
    }
    Ok(())
}

/// Waits until every one of `n` enqueued actors has an audit record.
async fn wait_for_audits(store: &DynStore, n: usize, timeout: Duration) -> Result<()> {
    wait_until(
        timeout,
        &format!("{n} actors have an audit record"),
        || async move { Ok(audit_count(store).await? >= n) },
    )
    .await
}

/// Waits until the work and retry queues are empty, the dead-letter log holds `dead` messages
/// (at least, with faults) and the workers drained the dead-letter inbox, and stay so for a
/// moment: a retry moving from its retry queue back to the work queue is briefly in neither.
async fn wait_for_queues(broker: &Broker, dead: usize, faults: Faults) -> Result<()> {
    let settled_since = std::cell::Cell::new(None::<Instant>);
    let settled_since = &settled_since;
    wait_until(Duration::from_secs(15), "the work and retry queues drain", || async move {
        let d = broker.dead_log_depth().await? as usize;
        let dead_ok = if faults == Faults::None { d == dead } else { d >= dead };
        if !(broker.pending().await? == 0 && dead_ok && broker.dead_depth().await? == 0) {
            settled_since.set(None);
            return Ok(false);
        }
        let since = settled_since.get().unwrap_or_else(Instant::now);
        settled_since.set(Some(since));
        Ok(since.elapsed() >= Duration::from_millis(300))
    })
    .await
}

/// After the workers stopped: nothing was handed back, nothing is left.
async fn assert_queues_empty(broker: &Broker) -> Result<()> {
    let pending = broker.pending().await?;
    ensure!(pending == 0, "{pending} jobs left in the work and retry queues");
    Ok(())
}

fn count(plan: &[(ActorId, Case)], pred: impl Fn(Case) -> bool) -> usize {
    plan.iter().filter(|(_, c)| pred(*c)).count()
}

fn is_dead_letter(case: Case) -> bool {
    matches!(case.expected(), Expected::DeadLetter(_))
}

/// The actors `worker` holds a lease on.
async fn leased_by(store: &DynStore, worker: &str) -> Result<BTreeSet<String>> {
    let prefix = format!("{worker}#");
    Ok(leases(store).await?.into_iter().filter(|(_, l)| l.holder.starts_with(&prefix)).map(|(a, _)| a).collect())
}

/// No v2 head is left MigratingFromV1 and no lease row is left.
async fn nothing_in_progress(store: &DynStore, plan: &[(ActorId, Case)]) -> Result<bool> {
    if !leases(store).await?.is_empty() {
        return Ok(false);
    }
    for (actor, _) in plan {
        if v2_head(store, actor).await?.is_some_and(|h| h.origin == Origin::MigratingFromV1) {
            return Ok(false);
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------

async fn campaign_with_two_workers(backend: Backend) -> Result<()> {
    let ctx = Ctx::new(backend).await?;
    let store = ctx.store();
    let broker = Broker::new("fleet_campaign").await?;
    let seed =
        Seed { actors: 150, seed: 11, mix: HARD_MIX.into(), max_mib: 3, large_share: 0.04, prefix: "camp".into() };
    seed.run(ctx.url())?;
    let plan = seed.plan();
    let n = count(&plan, enqueued);
    let campaign = "campaign-1";
    let since = now_ms();

    let summary = enqueue(ctx.url(), &broker.topology, campaign, &[])?;
    assert_eq!(summary["published"], n, "{summary}");
    assert_eq!(summary["skipped_no_v1"], count(&plan, |c| c == Case::NoV1), "{summary}");
    assert_eq!(summary["skipped_native_v2"], count(&plan, |c| c == Case::Native), "{summary}");
    assert_eq!(summary["skipped_migrated"], 0, "{summary}");
    assert_eq!(broker.depth(&broker.topology.work_queue()).await? as usize, n, "jobs in the work queue");

    let mut w1 = WorkerSpec::new(ctx.url(), &broker.topology, "w1").start(ctx.logs())?;
    let mut w2 = WorkerSpec::new(ctx.url(), &broker.topology, "w2").start(ctx.logs())?;
    wait_for_audits(&store, plan.len(), Duration::from_secs(40)).await?;
    let dead_planted = count(&plan, is_dead_letter);
    wait_for_queues(&broker, dead_planted, Faults::None).await?;
    w1.stop(STOP).await?;
    w2.stop(STOP).await?;
    assert_queues_empty(&broker).await?;

    let workers = [w1.name.as_str(), w2.name.as_str()];
    let dead = check_as_planted(&store, &plan, campaign, &workers, Faults::None).await?;
    assert_eq!(dead.len(), dead_planted);
    assert_eq!(audits(&store).await?.len(), plan.len(), "one audit record per actor");
    // `ferry-producer status` agrees: queues, outcome counts, dead letters by reason.
    let status = run_json(
        Command::new(bin("ferry-producer"))
            .args(["status", "--store", ctx.url(), "--amqp", &ferry::testing::amqp_url(), "--json"])
            .args(["--queue-prefix", &broker.topology.prefix, "--campaign", campaign]),
    )?;
    assert_eq!(status["work"]["messages"], 0, "{status}");
    // The inbox: the workers acked their own dead letters there (they are in the log).
    assert_eq!(status["dead"]["messages"], 0, "{status}");
    assert_eq!(status["enqueued"], n, "{status}");
    assert_eq!(status["outcomes"]["migrated"], count(&plan, |c| c == Case::Normal), "{status}");
    assert_eq!(status["outcomes"]["dead_lettered"], dead_planted, "{status}");
    for (reason, k) in dead.values().fold(BTreeMap::<&str, usize>::new(), |mut m, r| {
        *m.entry(r.as_str()).or_default() += 1;
        m
    }) {
        assert_eq!(status["dead_letters"][reason], k, "{reason}: {status}");
    }
    let messages = broker.dead_log().await?;
    check_dead_letters(&messages, &dead, campaign, &workers, since, Faults::None)?;
    // Both workers took part.
    let by_worker: BTreeSet<String> =
        audits(&store).await?.into_values().map(|a| a.worker).filter(|w| w != PRODUCER_WORKER).collect();
    assert_eq!(by_worker.len(), 2, "only {by_worker:?} worked");
    broker.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_with_hard_cases_and_two_workers_ends_every_actor_as_planted() -> Result<()> {
    binaries();
    bounded(LIMIT, campaign_with_two_workers(Backend::Sqlite)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_on_postgres_with_two_workers_ends_every_actor_as_planted() -> Result<()> {
    binaries();
    bounded(LIMIT, campaign_with_two_workers(Backend::Postgres)).await
}

// ---------------------------------------------------------------------------------------------

/// Sum of `ferry_outcomes_total` by outcome, over workers.
async fn outcomes(addrs: &[std::net::SocketAddr]) -> Result<BTreeMap<&'static str, f64>> {
    let mut out = BTreeMap::new();
    for addr in addrs {
        let text = scrape(*addr).await?;
        for kind in OutcomeKind::ALL {
            *out.entry(kind.as_str()).or_default() +=
                sample(&text, ferry::metrics::OUTCOMES, &format!("outcome=\"{}\"", kind.as_str()));
        }
    }
    Ok(out)
}

async fn duplicates(backend: Backend) -> Result<()> {
    let ctx = Ctx::new(backend).await?;
    let store = ctx.store();
    let broker = Broker::new("fleet_dup").await?;
    let seed = Seed { actors: 1, seed: 3, max_mib: 6, large_share: 1.0, ..Seed::new(1, "dup") };
    seed.run(ctx.url())?;
    let actor = seed.plan()[0].0.clone();
    let v1 = read_v1(&*store, &actor, ReadOptions::default()).await?;
    assert!(v1.main.len() >= 2 << 20, "the duplicated actor is large: {} bytes", v1.main.len());

    let campaign = "dup-campaign";
    register_campaign(&store, campaign).await?;
    let copies = 6;
    let job = Job::new(campaign, actor.clone(), now_ms(), None);
    for _ in 0..copies {
        broker.publish_job(&job).await?;
    }
    let spec = |hint| WorkerSpec::new(ctx.url(), &broker.topology, hint).concurrency(3).http();
    let mut w1 = spec("dup1").start(ctx.logs())?;
    let mut w2 = spec("dup2").start(ctx.logs())?;
    let addrs = [w1.http_addr().await?, w2.http_addr().await?];
    let addrs = &addrs;
    wait_until(Duration::from_secs(30), "every copy of the job has an outcome", || async move {
        Ok(outcomes(addrs).await?.values().sum::<f64>() >= copies as f64)
    })
    .await?;
    let counted = outcomes(addrs).await?;
    assert_eq!(counted["migrated"], 1.0, "{counted:?}");
    assert_eq!(counted["skipped_already_migrated"], copies as f64 - 1.0, "{counted:?}");
    assert_eq!(counted["dead_lettered"], 0.0, "{counted:?}");
    wait_for_queues(&broker, 0, Faults::None).await?;
    w1.stop(STOP).await?;
    w2.stop(STOP).await?;
    assert_queues_empty(&broker).await?;
    assert!(broker.dead_log().await?.is_empty(), "dead letters");

    let head = v2_head(&store, &actor).await?.context("no v2 head")?;
    assert_eq!(head.origin, Origin::MigratedFromV1);
    assert_eq!((head.generation, head.head_txid, head.next_txid), (1, 1, 2), "one migration began: {head:?}");
    assert_eq!(delta_txids(&store, &actor).await?, vec![1], "one DELTA blob");
    let audit = audits(&store).await?.remove(actor.as_str()).context("no audit")?;
    assert!(matches!(audit.outcome, OutcomeKind::Migrated | OutcomeKind::SkippedAlreadyMigrated), "audit {audit:?}");
    assert_v2_equals_v1(&store, &actor, &audit).await?;
    assert!(leases(&store).await?.is_empty(), "lease left");
    broker.delete().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_jobs_in_flight_migrate_once_and_skip_the_rest() -> Result<()> {
    binaries();
    bounded(LIMIT, duplicates(Backend::Sqlite)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_jobs_in_flight_on_postgres_migrate_once_and_skip_the_rest() -> Result<()> {
    binaries();
    bounded(LIMIT, duplicates(Backend::Postgres)).await
}

// ---------------------------------------------------------------------------------------------

/// A campaign with multi-MiB actors, so a worker has jobs in flight when it is interrupted.
fn heavy_seed(prefix: &str) -> Seed {
    Seed {
        actors: 40,
        seed: 5,
        mix: "journal=0.05,corrupt=0.05,missing_chunk=0.05,no_v1=0.05".into(),
        max_mib: 12,
        large_share: 0.35,
        prefix: prefix.into(),
    }
}

/// Waits until `worker` is staging a migration (holds a lease).
async fn wait_until_staging(store: &DynStore, worker: &str) -> Result<()> {
    wait_until_every(
        Duration::from_secs(20),
        Duration::from_millis(5),
        &format!("{worker} is migrating"),
        || async move { Ok(!leased_by(store, worker).await?.is_empty()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_jobs_are_redelivered_and_completed_by_the_other() -> Result<()> {
    binaries();
    bounded(LIMIT, async {
        let ctx = Ctx::new(Backend::Sqlite).await?;
        let store = ctx.store();
        let broker = Broker::new("fleet_kill").await?;
        let seed = heavy_seed("kill");
        seed.run(ctx.url())?;
        let plan = seed.plan();
        // Every actor ends with an audit record, the ones skipped at enqueue included.
        let n = plan.len();
        let campaign = "kill-campaign";
        let since = now_ms();
        enqueue(ctx.url(), &broker.topology, campaign, &[])?;

        let spec = |hint| WorkerSpec::new(ctx.url(), &broker.topology, hint).concurrency(4).lease_ttl_secs(3);
        let mut w1 = spec("victim").start(ctx.logs())?;
        let mut w2 = spec("survivor").start(ctx.logs())?;
        wait_until_staging(&store, &w1.name).await?;
        let status = w1.sigkill()?;
        assert!(!status.success(), "SIGKILL: {status}");
        // What the victim left half done: a MigratingFromV1 head under its lease.
        let mut stale = BTreeSet::new();
        for actor in leased_by(&store, &w1.name).await? {
            let id = ActorId::parse(&actor)?;
            if v2_head(&store, &id).await?.is_some_and(|h| h.origin == Origin::MigratingFromV1) {
                stale.insert(actor);
            }
        }
        assert!(audit_count(&store).await? < n, "the campaign was over before the kill");

        wait_for_audits(&store, n, Duration::from_secs(40)).await?;
        let plan_ref = &plan;
        let store_ref = &store;
        wait_until(Duration::from_secs(20), "no migration is left in progress", || async move {
            nothing_in_progress(store_ref, plan_ref).await
        })
        .await?;
        wait_for_queues(&broker, count(&plan, is_dead_letter), Faults::Some).await?;
        w2.stop(STOP).await?;
        assert_queues_empty(&broker).await?;

        let workers = [w1.name.as_str(), w2.name.as_str()];
        let dead = check_as_planted(&store, &plan, campaign, &workers, Faults::Some).await?;
        let all = audits(&store).await?;
        for actor in &stale {
            let a = &all[actor];
            assert_eq!(a.outcome, OutcomeKind::Migrated, "{actor}: taken over: {a:?}");
            assert_eq!(a.worker, w2.name, "{actor}: taken over by the survivor");
            assert!(a.generation >= Some(2), "{actor}: a takeover bumps the generation: {a:?}");
        }
        let messages = broker.dead_log().await?;
        check_dead_letters(&messages, &dead, campaign, &workers, since, Faults::Some)?;
        eprintln!("stale stages taken over: {stale:?}");
        broker.delete().await
    })
    .await
}

/// SIGTERMs a busy worker with `grace` seconds, checks it exits 0 in time with nothing lost,
/// and has another worker finish. Returns the stale stages it left (aborted jobs).
async fn sigterm_then_finish(grace: u64, hint: &str) -> Result<BTreeSet<String>> {
    let ctx = Ctx::new(Backend::Sqlite).await?;
    let store = ctx.store();
    let broker = Broker::new(hint).await?;
    let seed = heavy_seed(hint);
    seed.run(ctx.url())?;
    let plan = seed.plan();
    let n = plan.len();
    let campaign = "term-campaign";
    let since = now_ms();
    enqueue(ctx.url(), &broker.topology, campaign, &[])?;

    let spec = |hint| {
        WorkerSpec::new(ctx.url(), &broker.topology, hint).concurrency(4).lease_ttl_secs(3).shutdown_grace_secs(grace)
    };
    let mut w1 = spec("terminated").start(ctx.logs())?;
    wait_until_staging(&store, &w1.name).await?;
    let asked = Instant::now();
    w1.sigterm()?;
    let status = w1.wait_exit(Duration::from_secs(grace + 5)).await?;
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status}");
    assert!(took < Duration::from_secs(grace) + Duration::from_secs(3), "took {took:?} to stop (grace {grace} s)");
    let log = w1.log();
    assert!(log.contains("shutdown signal received") && log.contains("worker stopped"), "log:\n{log}");

    // Nothing lost: every job is either finished (audited) or back in the work queue (a job
    // aborted between its audit and its ack is both).
    let done = audit_count(&store).await?;
    assert!(done < n, "the campaign was over before SIGTERM");
    let broker_ref = &broker;
    let store_ref = &store;
    let waited = wait_until(Duration::from_secs(10), "every unfinished job is back in the queue", || async move {
        Ok(broker_ref.pending().await? as usize + audit_count(store_ref).await? >= n)
    })
    .await;
    if let Err(e) = waited {
        let (pending, done) = (broker.pending().await?, audit_count(&store).await?);
        return Err(e.context(format!("{pending} jobs in the queue, {done} audited, {n} actors")));
    }
    let mut stale = BTreeSet::new();
    for (actor, _) in leases(&store).await? {
        if v2_head(&store, &ActorId::parse(&actor)?).await?.is_some_and(|h| h.origin == Origin::MigratingFromV1) {
            stale.insert(actor);
        }
    }

    // Without a grace, a job can be cut off between its outcome and its ack, and runs again.
    let faults = if grace == 0 { Faults::Some } else { Faults::None };
    // The finisher stops with a grace, so it finishes whatever it has in flight when stopped.
    let mut w2 = spec("finisher").shutdown_grace_secs(10).start(ctx.logs())?;
    wait_for_audits(&store, n, Duration::from_secs(40)).await?;
    let plan_ref = &plan;
    wait_until(Duration::from_secs(20), "no migration is left in progress", || async move {
        nothing_in_progress(store_ref, plan_ref).await
    })
    .await?;
    wait_for_queues(&broker, count(&plan, is_dead_letter), faults).await?;
    w2.stop(STOP).await?;
    assert_queues_empty(&broker).await?;
    let workers = [w1.name.as_str(), w2.name.as_str()];
    let dead = check_as_planted(&store, &plan, campaign, &workers, faults).await?;
    let messages = broker.dead_log().await?;
    check_dead_letters(&messages, &dead, campaign, &workers, since, faults)?;
    let all = audits(&store).await?;
    for actor in &stale {
        assert_eq!(all[actor].worker, w2.name, "{actor}: the finisher took the stale stage over");
        assert!(all[actor].generation >= Some(2), "{actor}: {:?}", all[actor]);
    }
    broker.delete().await?;
    Ok(stale)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_within_grace_and_hands_back_unfinished_jobs() -> Result<()> {
    binaries();
    let stale = bounded(LIMIT, sigterm_then_finish(5, "fleet_term")).await?;
    assert!(stale.is_empty(), "in-flight jobs finished within the grace: no stale stage, got {stale:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_grace_hands_in_flight_jobs_back_and_another_worker_takes_them_over() -> Result<()> {
    binaries();
    let stale = bounded(LIMIT, sigterm_then_finish(0, "fleet_term0")).await?;
    eprintln!("stale stages taken over: {stale:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reconnects_after_the_broker_closes_its_connections() -> Result<()> {
    binaries();
    bounded(LIMIT, async {
        let ctx = Ctx::new(Backend::Sqlite).await?;
        let store = ctx.store();
        let broker = Broker::new("fleet_reconnect").await?;
        let first = Seed { actors: 60, seed: 8, max_mib: 8, large_share: 0.3, ..Seed::new(60, "ra") };
        let second = Seed { actors: 20, seed: 9, ..Seed::new(20, "rb") };
        first.run(ctx.url())?;
        second.run(ctx.url())?;

        let mut w =
            WorkerSpec::new(ctx.url(), &broker.topology, "reconnect").concurrency(2).http().start(ctx.logs())?;
        let addr = w.http_addr().await?;
        w.consuming().await?;
        let name = format!("ferry-worker {}", w.name);
        let mut before = Vec::new();
        wait_until_every(
            Duration::from_secs(15),
            Duration::from_millis(250),
            "the worker's connection is listed",
            || {
                let found = connections_named(&name);
                let ok = matches!(&found, Ok(pids) if !pids.is_empty());
                if let Ok(pids) = found {
                    before = pids;
                }
                async move { Ok(ok) }
            },
        )
        .await?;

        enqueue(ctx.url(), &broker.topology, "reconnect-a", &["--prefix", "ra"])?;
        wait_for_audits(&store, 3, Duration::from_secs(20)).await?;
        for pid in &before {
            close_connection(pid, "ferry e2e: closing this worker's connection")?;
        }
        let mut after = Vec::new();
        wait_until_every(Duration::from_secs(20), Duration::from_millis(250), "the worker reconnects", || {
            let found = connections_named(&name);
            let ok = matches!(&found, Ok(pids) if pids.iter().any(|p| !before.contains(p)));
            if let Ok(pids) = found {
                after = pids;
            }
            async move { Ok(ok) }
        })
        .await?;
        assert!(after.iter().all(|p| !before.contains(p)), "old connection still open: {before:?} {after:?}");
        assert!(w.log().contains("broker connection lost; reconnecting"), "no reconnect logged");
        // Jobs published after the reconnect are consumed too.
        enqueue(ctx.url(), &broker.topology, "reconnect-b", &["--prefix", "rb"])?;

        let (plan_a, plan_b) = (first.plan(), second.plan());
        let n = plan_a.len() + plan_b.len();
        wait_for_audits(&store, n, Duration::from_secs(40)).await?;
        wait_for_queues(&broker, 0, Faults::Some).await?;
        let metrics = scrape(addr).await?;
        assert!(sample(&metrics, ferry::metrics::RECONNECTS, "") >= 1.0, "reconnects metric:\n{metrics}");
        w.stop(STOP).await?;
        assert_queues_empty(&broker).await?;
        assert!(broker.dead_log().await?.is_empty(), "dead letters");
        let workers = [w.name.as_str()];
        check_as_planted(&store, &plan_a, "reconnect-a", &workers, Faults::Some).await?;
        check_as_planted(&store, &plan_b, "reconnect-b", &workers, Faults::Some).await?;
        assert_eq!(audits(&store).await?.len(), n);
        broker.delete().await
    })
    .await
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_worker_whose_connection_is_closed_reconnects_at_once_and_its_running_jobs_still_finish() -> Result<()> {
    binaries();
    bounded(LIMIT, async {
        let ctx = Ctx::new(Backend::Sqlite).await?;
        let store = ctx.store();
        let broker = Broker::new("fleet_lost_conn").await?;
        // Only large actors: every job stages for a while and holds a lease row meanwhile.
        let seed =
            Seed { actors: 10, seed: 6, mix: "none".into(), max_mib: 24, large_share: 1.0, prefix: "lost".into() };
        seed.run(ctx.url())?;
        let plan = seed.plan();
        let campaign = "lost-campaign";
        enqueue(ctx.url(), &broker.topology, campaign, &[])?;
        let mut w = WorkerSpec::new(ctx.url(), &broker.topology, "lost").concurrency(2).start(ctx.logs())?;
        wait_until_staging(&store, &w.name).await?;
        let name = format!("ferry-worker {}", w.name);
        let pids = connections_named(&name)?;
        ensure!(!pids.is_empty(), "the worker has no broker connection");
        for pid in &pids {
            close_connection(pid, "ferry e2e: closing a busy worker's connection")?;
        }
        // The staging jobs go on while the worker reconnects and takes new deliveries; the
        // lease rows (one per running staged migration) never exceed the concurrency. (This
        // run does not reach the bound even without it: the redelivered jobs come first and
        // retry at once, so it is a sanity check, not a proof of the shared slots.)
        let mut most = 0;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(8) && audit_count(&store).await? < plan.len() {
            most = most.max(leased_by(&store, &w.name).await?.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(most <= 2, "{most} migrations ran at once with concurrency 2");
        wait_for_audits(&store, plan.len(), Duration::from_secs(60)).await?;
        wait_for_queues(&broker, count(&plan, is_dead_letter), Faults::Some).await?;
        let log = w.log();
        assert!(log.contains("broker connection lost; reconnecting"), "no reconnect logged");
        assert!(w.running(), "the worker stopped");
        w.stop(STOP).await?;
        check_as_planted(&store, &plan, campaign, &[w.name.as_str()], Faults::Some).await?;
        broker.delete().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_handed_back_past_the_delivery_limit_is_dead_lettered_delivery_limit() -> Result<()> {
    bounded(LIMIT, async {
        let limit = 2;
        let broker = Broker::with_delivery_limit("fleet_dlimit", limit).await?;
        let job = Job::new("limit-campaign", ActorId::parse("poison-actor")?, now_ms(), None);
        broker.publish_job(&job).await?;

        // A consumer that keeps handing the job back, as a worker that crashes on it would.
        let handbacks = AtomicU32::new(0);
        let (broker_ref, handbacks_ref) = (&broker, &handbacks);
        let work = broker.topology.work_queue();
        let work_ref = work.as_str();
        wait_until(Duration::from_secs(20), "the job is dead-lettered", || async move {
            let got = broker_ref.channel().basic_get(work_ref.into(), BasicGetOptions::default()).await?;
            if let Some(got) = got {
                got.delivery.acker.reject(BasicRejectOptions { requeue: true }).await?;
                handbacks_ref.fetch_add(1, Ordering::SeqCst);
            }
            Ok(broker_ref.dead_depth().await? == 1)
        })
        .await?;
        let handbacks = handbacks.load(Ordering::SeqCst);
        assert_eq!(handbacks, limit as u32 + 1, "deliveries before the broker dead-lettered it");
        let dead = broker.get(&broker.topology.dead_queue()).await?.context("dead letter")?;
        assert_eq!(amqp::death_reason(&dead.properties).as_deref(), Some("delivery_limit"), "{:?}", dead.properties);
        assert_eq!(DeadLetterReason::parse("delivery_limit"), Some(DeadLetterReason::DeliveryLimit));
        assert_eq!(Job::parse(&dead.body)?, job, "the dead letter is the job itself");
        assert_eq!(dead.properties.message_id().as_ref().map(|s| s.as_str().to_string()), Some(job.message_id()));
        assert_eq!(broker.pending().await?, 0, "the job left the work queue");
        assert!(broker.get(&work).await?.is_none());
        broker.delete().await
    })
    .await
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_producer_resumes_from_its_checkpoint() -> Result<()> {
    binaries();
    bounded(LIMIT, async {
        let ctx = Ctx::new(Backend::Sqlite).await?;
        let store = ctx.store();
        let broker = Broker::new("fleet_producer").await?;
        let seed = Seed { actors: 400, seed: 21, mix: "default".into(), ..Seed::new(400, "prod") };
        seed.run(ctx.url())?;
        let plan = seed.plan();
        let expected: BTreeSet<String> =
            plan.iter().filter(|(_, c)| enqueued(*c)).map(|(a, _)| a.to_string()).collect();
        let n = expected.len();
        let campaign = "resume-campaign";

        let mut producer = Proc::spawn(
            "producer",
            enqueue_command(ctx.url(), &broker.topology, campaign, &["--rate", "150"]),
            ctx.logs(),
        )?;
        // Kill it once a checkpoint is saved and more jobs than it covers were published (an
        // unsaved tail exists).
        let (store_ref, broker_ref, work) = (&store, &broker, broker.topology.work_queue());
        let work_ref = work.as_str();
        wait_until_every(
            Duration::from_secs(20),
            Duration::from_millis(20),
            "a checkpoint with a tail after it",
            || async move {
                let Some(rec) = campaign::load(&**store_ref, campaign).await? else { return Ok(false) };
                Ok(rec.checkpoint.is_some() && broker_ref.depth(work_ref).await? as u64 > rec.published + 30)
            },
        )
        .await?;
        let status = producer.sigkill()?;
        assert!(!status.success(), "the producer finished before it was killed: {}", producer.stdout());
        let at_kill = campaign::load(&*store, campaign).await?.context("campaign record")?;
        let checkpoint = at_kill.checkpoint_raw().context("no checkpoint after the kill")?;
        assert_eq!(at_kill.status, CampaignStatus::Enqueueing);
        assert!(at_kill.published > 0 && (at_kill.published as usize) < n, "{at_kill:?}");

        let resumed = enqueue(ctx.url(), &broker.topology, campaign, &[])?;
        assert_eq!(resumed["resumed"], true, "{resumed}");
        let published_again = resumed["published"].as_u64().context("published")?;
        assert_eq!(at_kill.published + published_again, n as u64, "checkpointed + resumed = every job: {resumed}");
        let done = campaign::load(&*store, campaign).await?.context("campaign record")?;
        assert_eq!(done.status, CampaignStatus::Enqueued);
        assert_eq!(done.published, n as u64);

        let messages = broker.drain(&work).await?;
        assert!(messages.len() >= n && messages.len() <= n + 200, "{} jobs for {n} actors", messages.len());
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for m in &messages {
            let job = Job::parse(&m.body).map_err(|e| anyhow!("{e}: {:?}", String::from_utf8_lossy(&m.body)))?;
            assert_eq!(job.campaign, campaign);
            assert_eq!(m.properties.message_id().as_ref().map(|s| s.as_str().to_string()), Some(job.message_id()));
            *seen.entry(job.actor_id.to_string()).or_default() += 1;
        }
        let missing: Vec<_> = expected.iter().filter(|a| !seen.contains_key(*a)).collect();
        assert!(missing.is_empty(), "actors never enqueued: {missing:?}");
        let unexpected: Vec<_> = seen.keys().filter(|a| !expected.contains(*a)).collect();
        assert!(unexpected.is_empty(), "jobs for actors that must not be enqueued: {unexpected:?}");
        for (actor, times) in &seen {
            assert!(*times <= 2, "{actor} enqueued {times} times");
            if *times == 2 {
                assert!(actor.as_bytes() > checkpoint.as_slice(), "{actor} duplicated but before the checkpoint");
            }
        }
        eprintln!("{} jobs for {n} actors ({} duplicated from the unsaved tail)", messages.len(), messages.len() - n);
        producer.settle();
        broker.delete().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_rate_limited_producer_at_once_and_a_rerun_publishes_the_rest() -> Result<()> {
    binaries();
    bounded(LIMIT, async {
        let ctx = Ctx::new(Backend::Sqlite).await?;
        let store = ctx.store();
        let broker = Broker::new("fleet_producer_term").await?;
        let seed = Seed::new(60, "pterm");
        seed.run(ctx.url())?;
        let n = seed.plan().len();
        let campaign = "term-producer";
        // One job every 2 s: a SIGTERM almost always arrives while the producer waits.
        let mut producer = Proc::spawn(
            "producer",
            enqueue_command(ctx.url(), &broker.topology, campaign, &["--rate", "0.5"]),
            ctx.logs(),
        )?;
        let work = broker.topology.work_queue();
        let broker_ref = &broker;
        let work_ref = work.as_str();
        wait_until(Duration::from_secs(20), "the first job is published", || async move {
            Ok(broker_ref.depth(work_ref).await? >= 1)
        })
        .await?;
        let asked = Instant::now();
        producer.sigterm()?;
        let status = producer.wait_exit(Duration::from_secs(5)).await?;
        let took = asked.elapsed();
        assert_eq!(status.code(), Some(130), "an interrupted enqueue exits 130: {status}");
        assert!(took < Duration::from_millis(1500), "took {took:?} to stop: the rate sleep ignored SIGTERM");
        let summary: serde_json::Value = serde_json::from_str(&producer.stdout()).context("summary")?;
        assert_eq!(summary["completed"], false, "{summary}");
        let first = summary["published"].as_u64().context("published")?;
        assert!(first >= 1 && (first as usize) < n, "{summary}");

        let rest = enqueue(ctx.url(), &broker.topology, campaign, &[])?;
        assert_eq!(first + rest["published"].as_u64().context("published")?, n as u64, "{rest}");
        let record = campaign::load(&*store, campaign).await?.context("campaign record")?;
        assert_eq!((record.status, record.published), (CampaignStatus::Enqueued, n as u64));
        assert_eq!(broker.drain(&work).await?.len(), n, "one job per actor, none lost or repeated");
        broker.delete().await
    })
    .await
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_dead_lettered_bad_message_and_the_worker_keeps_working() -> Result<()> {
    binaries();
    bounded(LIMIT, async {
        let ctx = Ctx::new(Backend::Sqlite).await?;
        let store = ctx.store();
        let broker = Broker::new("fleet_bad").await?;
        let seed = Seed::new(3, "good");
        seed.run(ctx.url())?;
        let since = now_ms();

        let bad: [(&str, &[u8]); 3] = [
            ("garbage", b"this is not {json"),
            ("traversal", br#"{"version":1,"campaign":"bad-c","actor_id":"../x","enqueued_at_ms":0,"recovery":null}"#),
            (
                "unknown-recovery",
                br#"{"version":1,"campaign":"bad-c","actor_id":"good-0000000","enqueued_at_ms":0,"recovery":"rm_rf"}"#,
            ),
        ];
        for (id, body) in bad {
            broker.publish_raw(body, id).await?;
        }
        let mut w = WorkerSpec::new(ctx.url(), &broker.topology, "bad").concurrency(2).start(ctx.logs())?;
        let broker_ref = &broker;
        wait_until(Duration::from_secs(20), "the bad messages are dead-lettered", || async move {
            Ok(broker_ref.dead_log_depth().await? as usize == bad.len())
        })
        .await?;
        assert!(w.running(), "the worker stopped on a bad message");
        // A good job after them completes.
        enqueue(ctx.url(), &broker.topology, "good-campaign", &[])?;
        wait_for_audits(&store, 3, Duration::from_secs(20)).await?;
        wait_for_queues(&broker, bad.len(), Faults::None).await?;
        assert!(w.running(), "the worker stopped");
        w.stop(STOP).await?;

        let all = audits(&store).await?;
        assert_eq!(all.len(), 3, "audit records: {:?}", all.keys());
        for (actor, case) in seed.plan() {
            assert_eq!(case, Case::Normal);
            assert_eq!(all[actor.as_str()].outcome, OutcomeKind::Migrated, "{actor}");
        }
        let messages = broker.dead_log().await?;
        let mut by_id = BTreeMap::new();
        for m in &messages {
            let dl = DeadLetter::decode(&m.body).with_context(|| format!("{:?}", String::from_utf8_lossy(&m.body)))?;
            assert_eq!(dl.reason, DeadLetterReason::BadMessage, "{dl:?}");
            assert_eq!(m.str_header(amqp::REASON_HEADER).as_deref(), Some("bad_message"));
            assert_eq!(dl.phase, "parse");
            assert_eq!(dl.worker, w.name);
            assert!(!dl.error.is_empty() && dl.at_ms >= since, "{dl:?}");
            assert_eq!(dl.v1_files, None, "a bad message never reads the store");
            let id = m.properties.message_id().as_ref().map(|s| s.as_str().to_string()).context("message id")?;
            by_id.insert(id, dl);
        }
        assert_eq!(by_id.len(), bad.len(), "{by_id:?}");
        for (id, body) in bad {
            assert_eq!(by_id[id].message.as_bytes(), body, "{id}: the original body is kept");
        }
        assert_eq!(by_id["traversal"].actor_id, "../x");
        assert_eq!(by_id["traversal"].campaign, "bad-c");
        assert_eq!(by_id["garbage"].actor_id, "");
        broker.delete().await
    })
    .await
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_past_its_retry_budget_is_dead_lettered_retries_exhausted_without_holding_a_slot()
-> Result<()> {
    binaries();
    bounded(LIMIT, async {
        let ctx = Ctx::new(Backend::Sqlite).await?;
        let store = ctx.store();
        let broker = Broker::new("fleet_retry").await?;
        let seed = Seed::new(4, "retry");
        seed.run(ctx.url())?;
        let plan = seed.plan();
        // The first actor in scan order is being migrated by another holder whose lease never
        // runs out: every attempt is `in_progress_elsewhere`.
        let blocked = plan[0].0.clone();
        let head = DBHead::staging(1, 1, now_ms()).encode();
        let lease =
            Lease { holder: "elsewhere#0000000000000001".into(), generation: 1, expires_at_ms: now_ms() + 3_600_000 }
                .encode();
        let mut txn = Txn::new();
        txn.set(ferry::v2::keys::meta(&blocked), head.clone());
        txn.set(keys::lease(&blocked), lease.clone());
        store.commit(txn).await?;
        let campaign = "retry-campaign";
        let since = now_ms();
        enqueue(ctx.url(), &broker.topology, campaign, &[])?;

        // One slot: the jobs behind the blocked one only finish promptly if its retries wait in
        // a retry queue, not in the slot.
        let mut w = WorkerSpec::new(ctx.url(), &broker.topology, "retry")
            .concurrency(1)
            .args(&["--max-attempts", "3"])
            .start(ctx.logs())?;
        wait_for_audits(&store, plan.len() - 1, Duration::from_secs(20)).await?;
        let early = audits(&store).await?;
        assert!(!early.contains_key(blocked.as_str()), "the others waited for the blocked job: {early:?}");
        wait_for_audits(&store, plan.len(), Duration::from_secs(30)).await?;
        wait_for_queues(&broker, 1, Faults::None).await?;
        w.stop(STOP).await?;
        assert_queues_empty(&broker).await?;

        let all = audits(&store).await?;
        for (actor, _) in &plan[1..] {
            assert_eq!(all[actor.as_str()].outcome, OutcomeKind::Migrated, "{actor}");
        }
        let audit = &all[blocked.as_str()];
        assert_eq!(
            (audit.outcome, audit.reason),
            (OutcomeKind::DeadLettered, Some(DeadLetterReason::RetriesExhausted))
        );
        assert_eq!(audit.attempts, Some(3), "{audit:?}");
        let log = broker.dead_log().await?;
        ensure!(log.len() == 1, "dead letters: {log:?}");
        let dead = &log[0];
        let dl = DeadLetter::decode(&dead.body).context("dead letter body")?;
        assert_eq!(dl.reason, DeadLetterReason::RetriesExhausted);
        assert_eq!(dead.str_header(amqp::REASON_HEADER).as_deref(), Some("retries_exhausted"));
        assert_eq!((dl.actor_id.as_str(), dl.campaign.as_str()), (blocked.as_str(), campaign));
        assert_eq!((dl.attempts, dl.phase.as_str()), (3, "inspect"), "{dl:?}");
        assert!(dl.error.contains("in progress elsewhere") && dl.error.contains("elsewhere#"), "{}", dl.error);
        assert!(dl.at_ms >= since && dl.worker == w.name, "{dl:?}");
        // The other holder's migration was never touched.
        assert_eq!(store.get(&ferry::v2::keys::meta(&blocked)).await?, Some(head));
        assert_eq!(store.get(&keys::lease(&blocked)).await?, Some(lease));
        broker.delete().await
    })
    .await
}
