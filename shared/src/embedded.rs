//! Embedded mode (`ferry-worker local`): one process scans the store's v1 keyspace and runs
//! every actor through the same [`JobRunner`] the fleet uses, with bounded concurrency, no
//! broker, and dead letters kept at `ferry/dead/{actor}`.
//!
//! Invariants: an actor already dead-lettered is left for triage (a second run changes
//! nothing); transient failures are retried in-process with backoff until the retry budget,
//! then dead-lettered; a shutdown stops scheduling, lets in-flight actors finish, and reports
//! the run as incomplete.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{Instrument, info, warn};

use crate::actor::ActorId;
use crate::budget::MemoryBudget;
use crate::clock::SystemClock;
use crate::jobs::{Disposition, Job, JobRunner, RetryPolicy};
use crate::keys;
use crate::migrate::{MigrateConfig, Migrator, OutcomeKind};
use crate::progress::Progress;
use crate::scan::ActorScan;
use crate::store::{self, DynStore, KeyRange, StoreError};
use crate::synth::keyspace::{SeedConfig, seed};

/// Campaign name embedded runs record in audits.
pub const LOCAL_CAMPAIGN: &str = "local";

/// Settings of an embedded run.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    pub store_url: String,
    /// The store's layout (`--layout`).
    pub layout: crate::layout::Layout,
    pub concurrency: usize,
    /// Generate a demo keyspace of this many actors first, when the store has no v1 data.
    pub seed_demo: Option<u64>,
    pub migrate: MigrateConfig,
    pub retry: RetryPolicy,
    pub memory_budget: u64,
    /// Run dead-lettered actors again instead of leaving them for triage.
    pub retry_dead: bool,
    pub campaign: String,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            store_url: "sqlite:./ferry.db".into(),
            layout: crate::layout::Layout::Ferry,
            concurrency: 4,
            seed_demo: None,
            migrate: MigrateConfig::default(),
            retry: RetryPolicy {
                max_attempts: 5,
                min_delay: Duration::from_millis(200),
                max_delay: Duration::from_secs(5),
            },
            memory_budget: 1 << 30,
            retry_dead: false,
            campaign: LOCAL_CAMPAIGN.into(),
        }
    }
}

/// Why an embedded run could not complete.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("seeding the demo keyspace: {0}")]
    Seed(String),
}

/// What an embedded run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LocalSummary {
    pub store: String,
    /// Actors found under `v1/`.
    pub actors: u64,
    pub outcomes: BTreeMap<String, u64>,
    pub dead_letters: BTreeMap<String, u64>,
    /// Dead-lettered by an earlier run and left for triage.
    pub left_for_triage: u64,
    /// Keys under `v1/` whose actor id is not valid (never migrated).
    pub invalid_actor_ids: u64,
    pub retries: u64,
    pub pages: u64,
    pub v1_bytes: u64,
    pub delta_bytes: u64,
    pub seeded: Option<u64>,
    pub elapsed_seconds: f64,
    pub actors_per_second: f64,
    pub mib_per_second: f64,
    /// False when the run was interrupted before every actor was handled.
    pub completed: bool,
    /// Peak resident memory of this process (VmHWM), when the OS reports it.
    pub peak_rss_mib: Option<f64>,
}

/// This process's peak resident memory in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

impl LocalSummary {
    fn add(&mut self, done: &Finished) {
        match &done.disposition {
            Disposition::Ack(outcome) => {
                *self.outcomes.entry(outcome.kind().as_str().into()).or_default() += 1;
                if outcome.kind() == OutcomeKind::Migrated {
                    self.pages += u64::from(outcome.audit.pages.unwrap_or(0));
                    self.v1_bytes += outcome.audit.v1_bytes.unwrap_or(0);
                    self.delta_bytes += outcome.bytes_written;
                }
            }
            Disposition::DeadLetter(dead) => {
                *self.outcomes.entry(OutcomeKind::DeadLettered.as_str().into()).or_default() += 1;
                *self.dead_letters.entry(dead.reason.as_str().into()).or_default() += 1;
            }
            // Retries are resolved inside the actor's task; embedded jobs carry no ticket.
            Disposition::Retry { .. } | Disposition::Superseded => {}
        }
        self.retries += u64::from(done.attempts.saturating_sub(1));
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("  {k:<28} {v:>14}\n"));
        out.push_str(&format!(
            "ferry local run on {}{}\n",
            self.store,
            if self.completed { "" } else { " (INTERRUPTED)" }
        ));
        if let Some(n) = self.seeded {
            line(&mut out, "demo actors seeded", n.to_string());
        }
        line(&mut out, "actors scanned", self.actors.to_string());
        out.push_str("outcomes\n");
        for kind in OutcomeKind::ALL {
            line(&mut out, kind.as_str(), self.outcomes.get(kind.as_str()).copied().unwrap_or(0).to_string());
        }
        if !self.dead_letters.is_empty() {
            out.push_str("dead letters by reason\n");
            for (reason, n) in &self.dead_letters {
                line(&mut out, reason, n.to_string());
            }
        }
        out.push_str("work\n");
        line(&mut out, "left for triage", self.left_for_triage.to_string());
        line(&mut out, "invalid actor ids", self.invalid_actor_ids.to_string());
        line(&mut out, "retries", self.retries.to_string());
        line(&mut out, "pages migrated", self.pages.to_string());
        line(&mut out, "v1 bytes migrated", format!("{:.1} MiB", self.v1_bytes as f64 / 1048576.0));
        line(&mut out, "delta bytes written", format!("{:.1} MiB", self.delta_bytes as f64 / 1048576.0));
        line(&mut out, "elapsed", format!("{:.2} s", self.elapsed_seconds));
        line(&mut out, "rate", format!("{:.0} actors/s", self.actors_per_second));
        line(&mut out, "throughput", format!("{:.1} MiB/s", self.mib_per_second));
        if let Some(rss) = self.peak_rss_mib {
            line(&mut out, "peak memory (RSS)", format!("{rss:.1} MiB"));
        }
        out
    }
}

struct Finished {
    disposition: Disposition,
    attempts: u32,
}

/// Runs one actor to a final disposition, retrying transient failures in-process.
/// All in the job's span, the retry lines included.
async fn run_actor(runner: Arc<JobRunner>, job: Job) -> Finished {
    let span = runner.job_span(&job);
    let run = async {
        let mut attempts = 1;
        loop {
            match runner.run_job_in_current_span(&job, attempts).await {
                Disposition::Retry { delay, error, .. } => {
                    warn!(attempts, %error, "retrying");
                    tokio::time::sleep(delay).await;
                    attempts += 1;
                }
                disposition => {
                    return Finished { disposition, attempts };
                }
            }
        }
    };
    run.instrument(span).await
}

/// Seeds a demo keyspace when asked and the store has no v1 data.
async fn seed_if_empty(store: &DynStore, actors: u64) -> Result<Option<u64>, LocalError> {
    if store.first_key(&KeyRange::prefix(keys::V1_PREFIX)).await?.is_some() {
        info!("store already has v1 data; not seeding the demo keyspace");
        return Ok(None);
    }
    let cfg = SeedConfig { actors, max_mib: 8, layout: store.layout(), ..SeedConfig::default() };
    let report = seed(&**store, &cfg, |_| {}).await.map_err(LocalError::Seed)?;
    info!(actors, v1_mib = report.v1_bytes >> 20, seconds = report.seconds, "seeded the demo keyspace");
    Ok(Some(actors))
}

/// Runs an embedded campaign until every actor is handled or `shutdown` resolves.
pub async fn run_local(cfg: LocalConfig, shutdown: impl Future<Output = ()>) -> Result<LocalSummary, LocalError> {
    let started = Instant::now();
    // Only a run that seeds its demo keyspace may create the store.
    let mode = if cfg.seed_demo.is_some() { store::OpenMode::Create } else { store::OpenMode::Existing };
    let mut opts =
        store::OpenOptions::new(cfg.concurrency + 1, mode).layout(cfg.layout).lease_ttl(cfg.migrate.lease_ttl());
    // Seeding the demo writes v1 rows, which the rivet layout allows only to fixture loaders.
    opts.v1_writes = cfg.seed_demo.is_some();
    let store = store::open_with(&cfg.store_url, &opts).await?;
    let mut summary = LocalSummary { store: store.describe(), ..LocalSummary::default() };
    if let Some(n) = cfg.seed_demo {
        summary.seeded = seed_if_empty(&store, n).await?;
    }
    let runner = Arc::new(JobRunner {
        migrator: Migrator::new(store.clone(), Arc::new(SystemClock), cfg.migrate.clone()),
        retry: cfg.retry.clone(),
        budget: MemoryBudget::new(cfg.memory_budget),
        // Its jobs come from scanning this very store: there is no other store to be pointed at.
        gate: None,
    });
    let progress = Progress::new("migrating", None);
    let slots = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let mut tasks: JoinSet<Finished> = JoinSet::new();
    let mut scan = ActorScan::new(&*store, None);
    tokio::pin!(shutdown);
    let mut interrupted = false;
    loop {
        let next = tokio::select! {
            biased;
            () = &mut shutdown => { interrupted = true; break; }
            next = scan.next() => next?,
        };
        let Some(found) = next else { break };
        summary.actors += 1;
        let Ok(actor) = found.id else {
            summary.invalid_actor_ids += 1;
            warn!(actor = %String::from_utf8_lossy(&found.raw), "invalid actor id under v1/; not migrated");
            continue;
        };
        if !cfg.retry_dead && store.get(&keys::dead(&actor)).await?.is_some() {
            summary.left_for_triage += 1;
            continue;
        }
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => { interrupted = true; break; }
            p = slots.clone().acquire_owned() => p.expect("slots semaphore is never closed"),
        };
        while let Some(done) = tasks.try_join_next() {
            record(&mut summary, &progress, done);
        }
        let job = Job::new(&cfg.campaign, actor, runner.migrator.now_ms(), None);
        let runner = runner.clone();
        tasks.spawn(async move {
            let finished = run_actor(runner, job).await;
            drop(permit);
            finished
        });
    }
    if interrupted {
        warn!(in_flight = tasks.len(), "shutdown: letting in-flight actors finish");
    }
    while let Some(done) = tasks.join_next().await {
        record(&mut summary, &progress, done);
    }
    progress.finish();
    summary.completed = !interrupted;
    let secs = started.elapsed().as_secs_f64();
    summary.elapsed_seconds = secs;
    summary.actors_per_second = summary.actors as f64 / secs.max(1e-9);
    summary.mib_per_second = summary.v1_bytes as f64 / 1048576.0 / secs.max(1e-9);
    summary.peak_rss_mib = peak_rss_mib();
    Ok(summary)
}

fn record(summary: &mut LocalSummary, progress: &Progress, done: Result<Finished, tokio::task::JoinError>) {
    match done {
        Ok(finished) => summary.add(&finished),
        // A panic inside a migration is a bug; count it so the summary does not hide it.
        Err(e) => {
            warn!(error = %e, "an actor's task failed");
            *summary.outcomes.entry("task_failed".into()).or_default() += 1;
        }
    }
    progress.inc(1);
}

/// The actor ids of a store's dead letters (embedded mode).
pub async fn dead_actor_ids(store: &DynStore) -> Result<Vec<ActorId>, StoreError> {
    let mut ids = Vec::new();
    store::for_each_row(&**store, &KeyRange::prefix(keys::DEAD_PREFIX), 1024, |k, _| {
        if let Ok(id) = ActorId::from_bytes(&k[keys::DEAD_PREFIX.len()..]) {
            ids.push(id);
        }
        Ok(())
    })
    .await?;
    Ok(ids)
}
