//! The chaos campaign: the accounting invariant under faults.
//!
//! A campaign of 2,000 generated actors with every hard case of the generator runs on the
//! real RabbitMQ and PostgreSQL with three `ferry-worker run` processes and a rate-limited
//! `ferry-producer enqueue`, while a driver, paced by the campaign's progress:
//! - SIGKILLs random workers and starts replacements (new worker ids, as new pods get);
//! - closes every broker connection of the fleet once (the producer's included: it
//!   reconnects and resumes from its checkpoint in the same run);
//! - terminates every store connection of the workers once;
//! - re-publishes a batch of duplicate jobs (rejected actors among them).
//!
//! Then it checks the accounting invariant an operator is promised:
//! - every actor has exactly one audit record, whose outcome is what the generator planted;
//! - every migrated actor's v2 equals its v1 main file (`ferry-producer verify`), with one
//!   staged txid and nothing else under its v2 keys; rejected and v1-less actors have no v2;
//!   planted native v2 is untouched; v1 is untouched;
//! - no v2 head is left MigratingFromV1 and no lease is left behind;
//! - the work and retry queues are empty, and the dead letters are the rejected actors, one
//!   each with its planted reason, once per actor in the triage index (`dlq summary|list`).
//!
//! It prints the faults injected and the invariant results (to stderr, uncaptured). The fault
//! schedule is drawn from a seeded RNG; set `FERRY_CHAOS_SEED` to replay one.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry::jobs::{DeadLetter, Job};
use ferry::keys;
use ferry::migrate::OutcomeKind;
use ferry::queue::enqueue::{PRODUCER_WORKER, producer_connection_name};
use ferry::store::{DynStore, KeyRange, for_each_row};
use ferry::synth::keyspace::{Case, Expected};
use ferry::testing::{Backend, TestStore, unique_name};
use ferry::v2::{DBHead, Origin};
use ferry::{ActorId, DeadLetterReason};
use ferry_tests::{
    Broker, Proc, Seed, WorkerSpec, audit_count, audits, bin, bounded, close_connection, connections_named,
    connections_of, delta_txids, ended_as_planted, enqueue_command, enqueued, leases, run_json, v2_head,
    wait_until_every,
};
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::process::Command;

const ACTORS: u64 = 2000;
/// Every hard case the generator plants, about 1% each (13% of the actors).
const MIX: &str = "journal=0.01,wal=0.01,shm=0.01,corrupt=0.01,page_size=0.01,missing_chunk=0.01,oversize=0.01,\
                   bad_header=0.01,bad_meta=0.01,missing_main=0.01,not_aligned=0.01,native=0.01,no_v1=0.01";
const WORKERS: usize = 3;
/// Short, so a killed worker's migrations are taken over quickly.
const LEASE_TTL_SECS: u64 = 2;
/// Enqueue rate: the campaign lasts long enough for every fault to land in the middle of it.
const ENQUEUE_RATE: &str = "100";
const DUPLICATES: usize = 150;
const LIMIT: Duration = Duration::from_secs(480);

/// One injected fault.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL this many random workers, then start as many new ones.
    Kill(usize),
    CloseBrokerConnections,
    TerminateStoreConnections,
    PublishDuplicates,
}

/// When (share of the actors with an outcome) each fault is injected.
const SCHEDULE: [(f64, Fault); 8] = [
    (0.04, Fault::Kill(1)),
    (0.12, Fault::CloseBrokerConnections),
    (0.20, Fault::Kill(1)),
    (0.28, Fault::TerminateStoreConnections),
    (0.36, Fault::PublishDuplicates),
    (0.44, Fault::Kill(2)),
    (0.52, Fault::Kill(1)),
    (0.60, Fault::Kill(1)),
];

/// The fleet under test: live workers, every worker id ever started, the producer.
struct Fleet<'a> {
    broker: &'a Broker,
    store_url: String,
    /// The workers' store URL: their PostgreSQL connections carry an application name of
    /// their own, so only they are terminated.
    worker_url: String,
    app: String,
    campaign: String,
    logs: &'a Path,
    workers: Vec<Proc>,
    ids: BTreeSet<String>,
    producer: Option<Proc>,
    producer_runs: u32,
    report: Vec<String>,
}

impl Fleet<'_> {
    fn start_worker(&mut self) -> Result<()> {
        let spec = WorkerSpec::new(&self.worker_url, &self.broker.topology, "chaos")
            .concurrency(4)
            .lease_ttl_secs(LEASE_TTL_SECS)
            .shutdown_grace_secs(20);
        self.ids.insert(spec.worker_id.clone());
        self.workers.push(spec.start(self.logs)?);
        Ok(())
    }

    fn start_producer(&mut self) -> Result<()> {
        self.producer_runs += 1;
        let cmd = enqueue_command(&self.store_url, &self.broker.topology, &self.campaign, &["--rate", ENQUEUE_RATE]);
        self.producer = Some(Proc::spawn(&format!("producer-{}", self.producer_runs), cmd, self.logs)?);
        Ok(())
    }

    fn log(&mut self, line: String) {
        self.report.push(line);
    }

    fn kill(&mut self, n: usize, rng: &mut ChaCha8Rng) -> Result<()> {
        for _ in 0..n {
            let victim = rng.random_range(0..self.workers.len());
            let mut w = self.workers.swap_remove(victim);
            let status = w.sigkill()?;
            ensure!(!status.success(), "{} survived SIGKILL: {status}", w.name);
            self.log(format!("SIGKILL {} ({status})", w.name));
        }
        for _ in 0..n {
            self.start_worker()?;
        }
        Ok(())
    }

    /// Closes the broker connections of the producer (while it runs) and of every live worker.
    async fn close_broker_connections(&mut self) -> Result<()> {
        let producer_name = producer_connection_name(&self.campaign);
        let mut names: Vec<String> = self.workers.iter().map(|w| format!("ferry-worker {}", w.name)).collect();
        names.push(producer_name.clone());
        let producer = self.producer.as_mut().context("no producer")?;
        let found = connected(&names, || producer.running()).await?;
        // The producer first: it is the one that may finish any moment.
        let producer_pids = &found[producer_name.as_str()];
        let mut closed = close_all(producer_pids)?;
        for (name, pids) in found.iter().filter(|(n, _)| **n != producer_name) {
            ensure!(!pids.is_empty(), "{name} has no broker connection");
            closed += close_all(pids)?;
        }
        self.log(format!(
            "closed {closed} broker connections: {} workers', {} of the producer",
            names.len() - 1,
            producer_pids.len()
        ));
        if producer_pids.is_empty() {
            let producer = self.producer.as_mut().context("no producer")?;
            let status = producer.wait_exit(Duration::from_secs(1)).await?;
            self.log(format!("the producer had finished ({status}) before its connection could be closed"));
        } else {
            self.producer_reconnects_after_its_connection_closed(&producer_pids.clone()).await?;
        }
        Ok(())
    }

    /// The producer reconnects by itself and resumes from its checkpoint in the same run.
    async fn producer_reconnects_after_its_connection_closed(&mut self, closed: &[String]) -> Result<()> {
        let name = producer_connection_name(&self.campaign);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let producer = self.producer.as_mut().context("no producer")?;
            if !producer.running() {
                let status = producer.wait_exit(Duration::from_secs(1)).await?;
                ensure!(
                    status.success(),
                    "the producer exited ({status}) instead of reconnecting:\n{}",
                    producer.log_tail()
                );
                self.log("the producer finished after its connection was closed".into());
                return Ok(());
            }
            if connections_named(&name)?.iter().any(|pid| !closed.contains(pid)) {
                self.log("the producer reconnected in the same run".into());
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "the producer did not reconnect within 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn terminate_store_connections(&mut self) -> Result<()> {
        let killed = ferry_tests::terminate_sessions(&self.app).await?;
        ensure!(killed > 0, "no worker store connection to terminate");
        self.log(format!("terminated {killed} store connections of the workers"));
        Ok(())
    }

    async fn publish_duplicates(&mut self, plan: &[(ActorId, Case)], rng: &mut ChaCha8Rng) -> Result<()> {
        let picked: Vec<&(ActorId, Case)> = plan.sample(rng, DUPLICATES).collect();
        for (actor, _) in &picked {
            self.broker.publish_job(&Job::new(&self.campaign, actor.clone(), now_ms(), None)).await?;
        }
        let rejected = picked.iter().filter(|(_, c)| matches!(c.expected(), Expected::DeadLetter(_))).count();
        self.log(format!("re-published {} duplicate jobs ({rejected} of rejected actors)", picked.len()));
        Ok(())
    }

    fn logs(&self) -> String {
        self.workers.iter().chain(&self.producer).map(Proc::log_tail).collect::<Vec<_>>().join("\n")
    }
}

/// The broker pids of the connections named `names` (the last one is the producer's), waiting
/// until every one is listed, or all but the producer's once `producer_alive` says it ended.
async fn connected(names: &[String], mut producer_alive: impl FnMut() -> bool) -> Result<BTreeMap<&str, Vec<String>>> {
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = connections_of(&refs)?;
        let missing: Vec<&&str> = found.iter().filter(|(_, pids)| pids.is_empty()).map(|(n, _)| n).collect();
        let producer = refs.last().context("no names")?;
        if missing.is_empty() || (missing == [producer] && !producer_alive()) {
            return Ok(found);
        }
        ensure!(Instant::now() < deadline, "not connected to the broker within 30 s: {missing:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn close_all(pids: &[String]) -> Result<usize> {
    for pid in pids {
        close_connection(pid, "ferry chaos: closing every broker connection")?;
    }
    Ok(pids.len())
}

fn now_ms() -> i64 {
    ferry::clock::Clock::now_ms(&ferry::clock::SystemClock)
}

/// A digest of every row under `prefix`.
async fn digest(store: &DynStore, prefix: &[u8]) -> Result<(u64, u64)> {
    let mut h = DefaultHasher::new();
    let mut rows = 0;
    for_each_row(&**store, &KeyRange::prefix(prefix), 1024, |k, v| {
        k.hash(&mut h);
        v.hash(&mut h);
        rows += 1;
        Ok(())
    })
    .await?;
    Ok((rows, h.finish()))
}

/// Waits until every actor ended as planted, no job is ready anywhere and no lease is held,
/// seen twice in a row.
async fn wait_for_the_end(store: &DynStore, fleet: &Fleet<'_>, plan: &[(ActorId, Case)]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut settled = 0;
    loop {
        let all = audits(store).await?;
        let stray: Vec<String> = plan
            .iter()
            .filter(|(a, c)| !all.get(a.as_str()).is_some_and(|au| ended_as_planted(*c, au)))
            .map(|(a, c)| format!("{a} {c:?}: {:?}", all.get(a.as_str()).map(|au| (au.outcome, au.reason))))
            .collect();
        let pending = fleet.broker.pending().await?;
        let held = leases(store).await?.len();
        if stray.is_empty() && pending == 0 && held == 0 {
            settled += 1;
            if settled == 2 {
                return Ok(());
            }
        } else {
            settled = 0;
        }
        if Instant::now() > deadline {
            bail!(
                "the campaign did not end: {} actors not as planted (first: {:?}), {pending} jobs ready, {held} \
                 leases\n{}",
                stray.len(),
                stray.iter().take(5).collect::<Vec<_>>(),
                fleet.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Whether `actor` has any v2 row.
async fn has_any_v2(store: &DynStore, actor: &ActorId) -> Result<bool> {
    let mut prefix = keys::V2_PREFIX.to_vec();
    prefix.extend_from_slice(actor.as_bytes());
    prefix.push(b'/');
    Ok(store.first_key(&KeyRange::prefix(&prefix)).await?.is_some())
}

/// Checks the store once the fleet is stopped; returns lines for the report.
async fn check_store(
    store: &DynStore,
    plan: &[(ActorId, Case)],
    campaign: &str,
    workers: &BTreeSet<String>,
    natives: &BTreeMap<ActorId, Option<DBHead>>,
) -> Result<Vec<String>> {
    let all = audits(store).await?;
    let planted: BTreeSet<&str> = plan.iter().map(|(a, _)| a.as_str()).collect();
    let extra: Vec<&String> = all.keys().filter(|a| !planted.contains(a.as_str())).collect();
    ensure!(extra.is_empty(), "audit records of actors never planted: {extra:?}");
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (actor, case) in plan {
        let audit = all.get(actor.as_str()).with_context(|| format!("{actor} ({case:?}): no audit record"))?;
        ensure!(ended_as_planted(*case, audit), "{actor} ({case:?}) ended {} {:?}", audit.outcome, audit.reason);
        ensure!(audit.campaign == campaign, "{actor}: campaign {:?}", audit.campaign);
        let by = audit.worker.as_str();
        ensure!(workers.contains(by) || by == PRODUCER_WORKER, "{actor}: audited by a stranger {by:?}");
        *outcomes.entry(audit.outcome.to_string()).or_default() += 1;
        let head = v2_head(store, actor).await?;
        match case.expected() {
            Expected::Outcome(OutcomeKind::Migrated) => {
                let head = head.with_context(|| format!("{actor}: migrated without a head"))?;
                ensure!(head.origin == Origin::MigratedFromV1, "{actor}: head {head:?}");
                ensure!(audit.generation == Some(head.generation), "{actor}: audit vs head {head:?}");
                let txids = delta_txids(store, actor).await?;
                ensure!(txids == [head.head_txid], "{actor}: DELTA txids {txids:?}, head {head:?}");
            }
            Expected::Outcome(OutcomeKind::SkippedNativeV2) => {
                ensure!(natives.get(actor) == Some(&head), "{actor}: native v2 head changed: {head:?}");
            }
            _ => ensure!(!has_any_v2(store, actor).await?, "{actor} ({case:?}) has v2 rows"),
        }
    }
    let left = leases(store).await?;
    ensure!(left.is_empty(), "leases left behind: {left:?}");
    let mut migrating = Vec::new();
    for (actor, _) in plan {
        if v2_head(store, actor).await?.is_some_and(|h| h.origin == Origin::MigratingFromV1) {
            migrating.push(actor.to_string());
        }
    }
    ensure!(migrating.is_empty(), "heads left MigratingFromV1 without a lease: {migrating:?}");
    Ok(vec![
        format!("audit outcomes: {outcomes:?} ({} actors, one record each, all as planted)", plan.len()),
        "no lease left, no MigratingFromV1 head, one staged txid per migrated actor, no v2 for the rest".into(),
    ])
}

/// Checks the dead letters with the triage commands; returns lines for the report.
fn check_dead_letters(
    store_url: &str,
    broker: &Broker,
    plan: &[(ActorId, Case)],
    campaign: &str,
) -> Result<Vec<String>> {
    let dlq = |args: &[&str]| {
        let mut cmd = Command::new(bin("ferry-producer"));
        cmd.args(["dlq", "--store", store_url, "--amqp", &ferry::testing::amqp_url()])
            .args(["--queue-prefix", &broker.topology.prefix])
            .args(args);
        run_json(&mut cmd)
    };
    let rejected: BTreeMap<String, DeadLetterReason> = plan
        .iter()
        .filter_map(|(a, c)| match c.expected() {
            Expected::DeadLetter(r) => Some((a.to_string(), r)),
            Expected::Outcome(_) => None,
        })
        .collect();
    let letters: Vec<DeadLetter> = serde_json::from_value(dlq(&["list", "--json"])?)?;
    let mut by_actor: BTreeMap<String, BTreeSet<(DeadLetterReason, String)>> = BTreeMap::new();
    for d in &letters {
        by_actor.entry(d.actor_id.clone()).or_default().insert((d.reason, d.campaign.clone()));
    }
    let want: BTreeMap<String, BTreeSet<(DeadLetterReason, String)>> =
        rejected.iter().map(|(a, r)| (a.clone(), BTreeSet::from([(*r, campaign.to_string())]))).collect();
    ensure!(by_actor == want, "dead letters by actor differ from the rejected actors");
    ensure!(letters.len() == rejected.len(), "{} dead letters for {} rejected actors", letters.len(), rejected.len());
    let summary = dlq(&["summary", "--json"])?;
    let groups = summary["groups"].as_array().context("summary has groups")?;
    let mut per_reason: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rejected.values() {
        *per_reason.entry(r.as_str()).or_default() += 1;
    }
    ensure!(groups.len() == per_reason.len(), "summary groups: {summary}");
    for g in groups {
        let reason = g["reason"].as_str().context("reason")?;
        ensure!(g["campaign"] == campaign, "summary group of another campaign: {g}");
        ensure!(g["actors"] == per_reason[reason], "{reason}: {g} (planted {})", per_reason[reason]);
    }
    Ok(vec![format!(
        "dead letters: one record for each of {} rejected actors in the triage index (duplicates collapsed when written), reasons {per_reason:?}",
        rejected.len()
    )])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_campaign_ends_every_actor_as_planted_whatever_dies() -> Result<()> {
    bounded(LIMIT, async {
        let broker = Broker::new("chaos").await?;
        let ts = TestStore::new(Backend::Postgres).await;
        let store = ts.store();
        let logs = tempfile::tempdir()?;
        let rng_seed: u64 = match std::env::var("FERRY_CHAOS_SEED") {
            Ok(s) => s.parse().context("FERRY_CHAOS_SEED")?,
            Err(_) => now_ms() as u64,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
        let seed =
            Seed { actors: ACTORS, seed: 2026, mix: MIX.into(), max_mib: 2, large_share: 0.01, prefix: "chaos".into() };
        let seeding = Instant::now();
        seed.run(&ts.url)?;
        let plan = seed.plan();
        let seeded_in = seeding.elapsed();
        let _ = writeln!(std::io::stderr(), "chaos: {} actors seeded in {seeded_in:.1?}", plan.len());
        let v1_before = digest(&store, keys::V1_PREFIX).await?;
        let mut natives = BTreeMap::new();
        for (actor, _) in plan.iter().filter(|(_, c)| *c == Case::Native) {
            natives.insert(actor.clone(), v2_head(&store, actor).await?);
        }

        let app = unique_name("ferry_chaos");
        let mut fleet = Fleet {
            broker: &broker,
            store_url: ts.url.clone(),
            worker_url: format!("{}&application_name={app}", ts.url),
            app,
            campaign: unique_name("chaos"),
            logs: logs.path(),
            workers: Vec::new(),
            ids: BTreeSet::new(),
            producer: None,
            producer_runs: 0,
            report: vec![format!("fault schedule seed {rng_seed} (FERRY_CHAOS_SEED)")],
        };
        for _ in 0..WORKERS {
            fleet.start_worker()?;
        }
        let started = Instant::now();
        fleet.start_producer()?;

        let total = plan.len();
        for (share, fault) in SCHEDULE {
            let at = (share * total as f64) as usize;
            let store_ref = &store;
            wait_until_every(
                Duration::from_secs(120),
                Duration::from_millis(20),
                &format!("{at} actors done"),
                || async move { Ok(audit_count(store_ref).await? >= at) },
            )
            .await
            // The cause first: a report cut to its head and tail still shows it.
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", fleet.logs()))?;
            let done = audit_count(&store).await?;
            fleet.log(format!("at {done}/{total} actors done, {:.1} s: {fault:?}", started.elapsed().as_secs_f64()));
            match fault {
                Fault::Kill(n) => fleet.kill(n, &mut rng)?,
                Fault::CloseBrokerConnections => fleet.close_broker_connections().await?,
                Fault::TerminateStoreConnections => fleet.terminate_store_connections().await?,
                Fault::PublishDuplicates => fleet.publish_duplicates(&plan, &mut rng).await?,
            }
        }
        let done_after_faults = audit_count(&store).await?;
        ensure!(done_after_faults < total, "the campaign ended before the last fault:\n{}", fleet.report.join("\n"));

        let producer = fleet.producer.as_mut().context("producer")?;
        let status = producer.wait_exit(Duration::from_secs(120)).await?;
        ensure!(status.success(), "the last enqueue run failed ({status}):\n{}", producer.log_tail());
        let summary: serde_json::Value = serde_json::from_str(&producer.stdout()).context("enqueue summary")?;
        ensure!(summary["completed"] == true, "{summary}");
        wait_for_the_end(&store, &fleet, &plan).await?;
        let elapsed = started.elapsed();
        for w in &fleet.workers {
            w.sigterm()?;
        }
        for w in &mut fleet.workers {
            let status = w.wait_exit(Duration::from_secs(60)).await?;
            ensure!(status.success(), "{} exited with {status} on SIGTERM:\n{}", w.name, w.log_tail());
        }

        let mut results = vec![format!(
            "{total} actors ({} enqueued) seeded in {seeded_in:.1?}, campaign done in {elapsed:.1?} by {} workers \
             over {} producer runs",
            plan.iter().filter(|(_, c)| enqueued(*c)).count(),
            fleet.ids.len(),
            fleet.producer_runs
        )];
        results.extend(check_store(&store, &plan, &fleet.campaign, &fleet.ids, &natives).await?);
        let verify = run_json(Command::new(bin("ferry-producer")).args([
            "verify",
            "--store",
            &ts.url,
            "--campaign",
            &fleet.campaign,
            "--json",
        ]))?;
        let migrated = plan.iter().filter(|(_, c)| *c == Case::Normal).count();
        ensure!(verify["checked"] == migrated && verify["counts"]["ok"] == migrated, "verify: {verify}");
        results.push(format!("verify: {migrated} migrated actors, v2 equals v1 for every one"));
        ensure!(broker.pending().await? == 0, "jobs left in the work or retry queues");
        results.extend(check_dead_letters(&ts.url, &broker, &plan, &fleet.campaign)?);
        ensure!(digest(&store, keys::V1_PREFIX).await? == v1_before, "v1 changed");
        results.push("v1 untouched (every v1 row byte for byte)".into());

        let mut err = std::io::stderr().lock();
        writeln!(err, "\nchaos campaign: faults injected")?;
        for line in &fleet.report {
            writeln!(err, "  {line}")?;
        }
        writeln!(err, "chaos campaign: invariant")?;
        for line in &results {
            writeln!(err, "  ok: {line}")?;
        }
        drop(err);
        broker.delete().await
    })
    .await
}
