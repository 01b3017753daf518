//! The benchmark harness: seeds its own keyspaces with the generator and measures ferry next to
//! the limit each figure is judged against, in the same run on the same machine.
//!
//!   cargo run --release -p ferry-tests --bin bench -- [--quick] [--json-out bench.json]
//!   cargo run --release -p ferry-tests --bin bench -- --triage-only --triage-letters 100000,1000000
//!   cargo run --release -p ferry-tests --bin bench -- --rivet-only [--quick]
//!   cargo run --release -p ferry-tests --bin bench -- --quick --small-only
//!
//! The small-actor section measures, per backend, end-to-end jobs/s of one worker against the
//! raw broker (consume+ack) and the raw store limit (`bench/raw_store.rs`: a minimal client
//! issuing one small job's exact store work at the same concurrency, each job committed
//! alone), store commits per migrated actor (the worker's `ferry_store_commits_total`), and
//! the worker's user+system CPU seconds per 1,000 jobs (`/proc/PID/stat`); with grouping on
//! (the default) and, on PostgreSQL, off (`--group-max 1`) for comparison.
//!
//! Needs the local PostgreSQL and RabbitMQ (like the tests). Prints a table and JSON.

#[path = "bench/raw_store.rs"]
mod raw_store;
#[path = "bench/rivet.rs"]
mod rivet;
#[path = "bench/triage.rs"]
mod triage;

use std::collections::VecDeque;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use ferry::clock::SystemClock;
use ferry::keys;
use ferry::migrate::{MigrateConfig, Migrator, Request};
use ferry::queue::Topology;
use ferry::queue::amqp;
use ferry::store::{DynStore, KeyRange, Txn};
use ferry::synth::keyspace::{Mix, SeedConfig, seed};
use ferry::synth::sqlite::{DbSpec, database};
use ferry::synth::{DbFiles, write_v1};
use ferry::testing::{Backend, TestStore, amqp_url, unique_name};
use ferry_tests::bin;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};

#[derive(Parser)]
struct Args {
    /// Smaller sizes, for a quick look (not for docs/PERFORMANCE.md).
    #[arg(long)]
    quick: bool,
    /// Tiny actors per fleet run.
    #[arg(long)]
    tiny: Option<u64>,
    /// Write the JSON report here too.
    #[arg(long)]
    json_out: Option<String>,
    /// Only the small-actor section (fleet runs of tiny actors, the raw broker and store limits,
    /// enqueue): for iterating on the small-job path.
    #[arg(long, env = "FERRY_BENCH_SMALL_ONLY")]
    small_only: bool,
    /// Backends of the small-actor section (all of them by default); with one named, only its
    /// grouped run at --concurrency: for iterating on one backend's small-job path.
    #[arg(long, env = "FERRY_BENCH_SMALL_BACKENDS", value_delimiter = ',', value_enum)]
    small_backends: Vec<SmallBackend>,
    /// Worker concurrency in the fleet runs.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
    /// Only the memory section at the manifest's settings (deploy/k8s: concurrency 8,
    /// max size 128 MiB, PostgreSQL), at each of --budgets-mib.
    #[arg(long)]
    manifest_memory_only: bool,
    /// Memory budgets of the manifest-memory rows (deploy/k8s/config.yaml runs 1536).
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    budgets_mib: Vec<u64>,
    /// Only the triage section (issue 15): `ferry-producer dlq` commands timed on a backlog
    /// of dead letters, at each of --triage-letters, on SQLite and PostgreSQL.
    #[arg(long, env = "FERRY_BENCH_TRIAGE_ONLY")]
    triage_only: bool,
    /// Dead letters of each triage fixture [default: 100000,1000000 with --triage-only,
    /// 100000 in the full run, 10000 with --quick]. A million takes some minutes per backend
    /// to write and publish.
    #[arg(long, env = "FERRY_BENCH_TRIAGE_LETTERS", value_delimiter = ',')]
    triage_letters: Option<Vec<u64>>,
    /// Publish the broker side of a triage fixture (the dead-letter queue's messages) for at
    /// most this many letters; the store side always has them all.
    #[arg(long, env = "FERRY_BENCH_TRIAGE_BROKER_MAX", default_value_t = 1_000_000)]
    triage_broker_max: u64,
    /// Only the rivet-layout section (issue 14): tiny actors on the rivet layout against the
    /// ferry layout on the same server, large actors against the raw store copy.
    #[arg(long, env = "FERRY_BENCH_RIVET_ONLY")]
    rivet_only: bool,
}

/// A backend of the small-actor section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SmallBackend {
    Sqlite,
    Postgres,
}

#[derive(serde::Serialize, Clone)]
struct Row {
    section: String,
    measure: String,
    value: f64,
    unit: String,
    against: String,
    limit: f64,
    ratio: f64,
    /// The ratio to reach (at least).
    target: Option<f64>,
    /// The ratio to stay under (at most): times and memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    target_max: Option<f64>,
}

#[derive(Default, serde::Serialize)]
struct Report {
    machine: String,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        section: &str,
        measure: &str,
        value: f64,
        unit: &str,
        against: &str,
        limit: f64,
        target: Option<f64>,
    ) {
        let ratio = if limit > 0.0 { value / limit } else { 0.0 };
        let row = Row {
            section: section.into(),
            measure: measure.into(),
            value,
            unit: unit.into(),
            against: against.into(),
            limit,
            ratio,
            target,
            target_max: None,
        };
        let verdict = match target {
            Some(t) if ratio >= t => format!("(target {:.0}%: met)", t * 100.0),
            Some(t) => format!("(target {:.0}%: MISSED)", t * 100.0),
            None => String::new(),
        };
        eprintln!("  {measure}: {value:.1} {unit} vs {against} {limit:.1} -> {:.0}% {verdict}", ratio * 100.0);
        self.rows.push(row);
    }

    /// A row whose ratio must stay at or under `target_max` (a time or memory limit).
    #[allow(clippy::too_many_arguments)]
    fn add_at_most(
        &mut self,
        section: &str,
        measure: &str,
        value: f64,
        unit: &str,
        against: &str,
        limit: f64,
        target_max: f64,
    ) {
        let ratio = if limit > 0.0 { value / limit } else { 0.0 };
        let met = if ratio <= target_max { "met" } else { "MISSED" };
        eprintln!(
            "  {measure}: {value:.3} {unit} vs {against} {limit:.1} -> {:.0}% (target <= {:.0}%: {met})",
            ratio * 100.0,
            target_max * 100.0
        );
        self.rows.push(Row {
            section: section.into(),
            measure: measure.into(),
            value,
            unit: unit.into(),
            against: against.into(),
            limit,
            ratio,
            target: None,
            target_max: Some(target_max),
        });
    }

    fn table(&self) -> String {
        let mut out = format!("machine: {}\n", self.machine);
        out.push_str(&format!(
            "{:<12} {:<44} {:>12} {:<8} {:<34} {:>12} {:>7} {:>7}\n",
            "section", "measure", "value", "unit", "against", "limit", "ratio", "target"
        ));
        for r in &self.rows {
            out.push_str(&format!(
                "{:<12} {:<44} {:>12} {:<8} {:<34} {:>12.1} {:>6.0}% {:>7}\n",
                r.section,
                r.measure,
                // Seconds of a quick command need more than one decimal.
                if r.value.abs() < 10.0 { format!("{:.3}", r.value) } else { format!("{:.1}", r.value) },
                r.unit,
                r.against,
                r.limit,
                r.ratio * 100.0,
                match (r.target, r.target_max) {
                    (Some(t), _) => format!("{:.0}%", t * 100.0),
                    (None, Some(t)) => format!("<={:.0}%", t * 100.0),
                    (None, None) => "-".into(),
                }
            ));
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0) / 1024 / 1024)
        })
        .unwrap_or(0);
    format!("{} cores ({cpu}), {mem} GiB RAM", std::thread::available_parallelism().map_or(0, |n| n.get()))
}

async fn count_prefix(store: &DynStore, prefix: &[u8]) -> Result<u64> {
    let mut n = 0u64;
    ferry::store::for_each_row(&**store, &KeyRange::prefix(prefix), 4096, |_, _| {
        n += 1;
        Ok(())
    })
    .await?;
    Ok(n)
}

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_worker(store: &str, prefix: &str, concurrency: u16, id: &str, http: &str, extra: &[&str]) -> Result<Worker> {
    let child = Command::new(bin("ferry-worker"))
        .args(["run", "--store", store, "--queue-prefix", prefix, "--http", http, "--worker-id", id])
        // Required since the worker has no default broker (the harness did not pass it).
        .args(["--amqp", &amqp_url()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning ferry-worker")?;
    Ok(Worker(child))
}

async fn delete_topology(prefix: &str) -> Result<()> {
    let conn = amqp::connect(&amqp_url(), "bench cleanup").await?;
    let ch = conn.create_channel().await?;
    Topology::new(prefix).delete(&ch).await?;
    let _ = conn.close(200, "ok".into()).await;
    Ok(())
}

/// Seeds `n` tiny actors (1 to 8 pages) into a store.
async fn seed_tiny(store: &DynStore, n: u64) -> Result<()> {
    let cfg = SeedConfig {
        actors: n,
        seed: 11,
        mix: Mix::none(),
        large_share: 0.0,
        medium_share: 0.0,
        ..SeedConfig::default()
    };
    seed(&**store, &cfg, |_| {}).await.map_err(anyhow::Error::msg)?;
    Ok(())
}

/// What a fleet run measured.
struct FleetRun {
    /// Enqueue jobs/s.
    enqueue: f64,
    /// End-to-end jobs/s (first job to last audit).
    e2e: f64,
    /// Store commits per migrated actor, summed over the workers.
    commits_per_migrated: f64,
    /// Worker user+system CPU seconds per 1,000 jobs, summed over the workers.
    cpu_per_1000: f64,
    /// PostgreSQL's and RabbitMQ's server processes' CPU seconds per 1,000 jobs over the run.
    servers: ServerCpu,
    /// Mean milliseconds between a job's audit times: from the migrator's start (after the
    /// batched read) to its outcome being decided (before its commit). Validation and encoding,
    /// mostly; the rest of a job's cycle is the read, the commit, the ack and the broker.
    migrate_ms: f64,
    /// Mean milliseconds of each step of a migrated job ([`ferry::metrics::JOB_STEPS`]), from
    /// the workers' `ferry_job_step_seconds`.
    steps: Vec<(&'static str, f64)>,
}

/// CPU seconds per 1,000 jobs of the local PostgreSQL and RabbitMQ server processes.
#[derive(Clone, Copy, Default)]
struct ServerCpu {
    postgres: f64,
    rabbitmq: f64,
}

/// The server processes this machine runs the services as (`/proc/PID/comm`).
const POSTGRES_COMM: &str = "postgres";
const RABBITMQ_COMM: &str = "beam.smp";

/// CPU ticks so far of every process named `comm`, by pid.
fn ticks_of(comm: &str) -> std::collections::HashMap<u32, f64> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let named = std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm);
        if let (true, Ok(secs)) = (named, cpu_seconds(pid)) {
            out.insert(pid, secs);
        }
    }
    out
}

/// Measures the server processes' CPU from [`ServerClock::start`] to [`ServerClock::per_1000`].
/// Backends that exit in between are not counted (the workers' own live to the end).
struct ServerClock(std::collections::HashMap<u32, f64>, std::collections::HashMap<u32, f64>);

impl ServerClock {
    fn start() -> ServerClock {
        ServerClock(ticks_of(POSTGRES_COMM), ticks_of(RABBITMQ_COMM))
    }

    fn per_1000(&self, jobs: u64) -> ServerCpu {
        let since = |before: &std::collections::HashMap<u32, f64>, comm: &str| -> f64 {
            ticks_of(comm).iter().map(|(pid, now)| now - before.get(pid).copied().unwrap_or(0.0)).sum()
        };
        let per = |secs: f64| secs / jobs.max(1) as f64 * 1000.0;
        ServerCpu { postgres: per(since(&self.0, POSTGRES_COMM)), rabbitmq: per(since(&self.1, RABBITMQ_COMM)) }
    }
}

/// A free loopback port for a worker's `/metrics`.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// User+system CPU seconds of a process so far (`/proc/PID/stat` fields 14 and 15).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields.get(11).context("utime")?.parse::<f64>()? + fields.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / clock_ticks())
}

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`, asked once; Linux's USER_HZ is 100).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Enqueues every actor and runs `workers` worker processes (with `extra` flags) until every
/// job is audited.
async fn fleet_run(store: &TestStore, n: u64, workers: usize, concurrency: u16, extra: &[&str]) -> Result<FleetRun> {
    let prefix = unique_name("bench");
    let cfg = ferry::queue::enqueue::EnqueueConfig {
        layout: ferry::layout::Layout::Ferry,
        store_url: store.url.clone(),
        amqp_url: amqp_url(),
        amqp_connect_timeout: ferry::queue::amqp::DEFAULT_CONNECT_TIMEOUT,
        topology: Topology::new(&prefix),
        campaign: prefix.clone(),
        filters: Default::default(),
        ids: None,
        rate: None,
        recovery: None,
        progress: false,
        retry_budget: ferry::queue::enqueue::DEFAULT_RETRY_BUDGET,
    };
    let summary = ferry::queue::enqueue::enqueue(cfg, std::future::pending()).await?;
    ensure!(summary.published == n, "enqueued {} of {n}", summary.published);
    let started = Instant::now();
    let servers = ServerClock::start();
    let mut procs = Vec::new();
    for i in 0..workers {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let w = spawn_worker(&store.url, &prefix, concurrency, &format!("{prefix}-{i}"), &addr, extra)?;
        procs.push((w, addr.parse::<std::net::SocketAddr>()?));
    }
    let deadline = started + Duration::from_secs(600);
    // Poll slowly (the poll reads the store the workers write), and take the end time from
    // the audit records themselves.
    loop {
        let done = count_prefix(&store.store, keys::AUDIT_PREFIX).await?;
        if done >= n {
            break;
        }
        ensure!(Instant::now() < deadline, "fleet run timed out at {done}/{n}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // First job started to last job finished, from the audit records: the workers' start
    // (process, broker and store connections) is not the job path's, as the raw consume+ack
    // measure starts once connected.
    let (mut started_ms, mut finished_ms) = (i64::MAX, i64::MIN);
    let (mut migrated, mut migrate_ms) = (0u64, 0i64);
    ferry::store::for_each_row(&*store.store, &KeyRange::prefix(keys::AUDIT_PREFIX), 4096, |_, raw| {
        if let Some(a) = ferry::migrate::AuditRecord::decode(&raw) {
            started_ms = started_ms.min(a.started_at_ms);
            finished_ms = finished_ms.max(a.finished_at_ms);
            migrated += u64::from(a.outcome == ferry::migrate::OutcomeKind::Migrated);
            migrate_ms += (a.finished_at_ms - a.started_at_ms).max(0);
        }
        Ok(())
    })
    .await?;
    let servers = servers.per_1000(n);
    let (mut commits, mut cpu) = (0.0, 0.0);
    let mut step_totals = [(0.0, 0.0); ferry::metrics::JOB_STEPS.len()];
    for (w, addr) in &procs {
        cpu += cpu_seconds(w.0.id())?;
        let text = ferry_tests::scrape(*addr).await?;
        commits += ferry_tests::sample(&text, ferry::metrics::STORE_COMMITS, "");
        for (step, (sum, count)) in ferry::metrics::JOB_STEPS.iter().zip(&mut step_totals) {
            let labels = format!("step=\"{step}\"");
            *sum += ferry_tests::sample(&text, &format!("{}_sum", ferry::metrics::JOB_STEP_SECONDS), &labels);
            *count += ferry_tests::sample(&text, &format!("{}_count", ferry::metrics::JOB_STEP_SECONDS), &labels);
        }
    }
    let steps = ferry::metrics::JOB_STEPS
        .iter()
        .zip(step_totals)
        .map(|(step, (sum, count))| (*step, sum * 1000.0 / f64::max(count, 1.0)))
        .collect();
    let secs = ((finished_ms - started_ms) as f64 / 1000.0).max(1e-3);
    drop(procs);
    delete_topology(&prefix).await?;
    Ok(FleetRun {
        // The steady pace, as the raw publish loop's (which starts after connecting and
        // declaring its queue): a campaign of millions spends its time here.
        enqueue: summary.published as f64 / summary.publishing_seconds.max(1e-9),
        e2e: n as f64 / secs,
        commits_per_migrated: commits / (migrated.max(1) as f64),
        cpu_per_1000: cpu / n as f64 * 1000.0,
        servers,
        migrate_ms: migrate_ms as f64 / n.max(1) as f64,
        steps,
    })
}

/// Every actor of a store's `v1/` keyspace.
async fn actors_of(store: &DynStore) -> Result<Vec<ferry::ActorId>> {
    let mut scan = ferry::scan::ActorScan::new(&**store, None);
    let mut out = Vec::new();
    while let Some(found) = scan.next().await? {
        if let Ok(id) = found.id {
            out.push(id);
        }
    }
    Ok(out)
}

/// Most slots any PostgreSQL run of the small section gets: the raw store client holds one
/// connection per slot.
const MAX_RAW_STORE_CONNECTIONS: u16 = 64;

/// The small-actor section: raw broker, then per backend the raw store limit and the fleet.
async fn small(report: &mut Report, tiny: u64, concurrency: u16, only: &[SmallBackend]) -> Result<()> {
    eprintln!("1. tiny actors through the fleet ({tiny} actors, concurrency {concurrency})");
    let (raw_publish, raw_consume) = raw_broker(tiny, concurrency).await?;
    // Grouping pays more the more jobs are in flight: PostgreSQL also runs at 4 and 8 times the
    // concurrency (at 8 times, 64, one worker's groups run at 85-114% of a client committing
    // each job alone, on this machine), each against the raw limits at its own concurrency. The raw
    // store client holds a connection per slot: past 64 it would run into PostgreSQL's default
    // 100 connections.
    let all = only.is_empty();
    if (all || only.contains(&SmallBackend::Postgres)) && concurrency > MAX_RAW_STORE_CONNECTIONS {
        bail!(
            "--concurrency {concurrency}: the PostgreSQL raw store client would open more than {MAX_RAW_STORE_CONNECTIONS} connections"
        );
    }
    let wider = |factor: u16| {
        let c = concurrency.saturating_mul(factor);
        (all && c <= MAX_RAW_STORE_CONNECTIONS).then_some(c)
    };
    let (wide, widest) = (wider(4), wider(8));
    let mut raw_consume_at = std::collections::HashMap::from([(concurrency, raw_consume)]);
    for c in [wide, widest].into_iter().flatten() {
        raw_consume_at.insert(c, raw_broker(tiny, c).await?.1);
    }
    let mut enqueue_rate = None;
    let picked = [(Backend::Sqlite, SmallBackend::Sqlite), (Backend::Postgres, SmallBackend::Postgres)]
        .into_iter()
        .filter(|(_, b)| all || only.contains(b))
        .map(|(backend, _)| backend);
    for backend in picked {
        let name = format!("{backend:?}").to_lowercase();
        // (label, worker flags, concurrency).
        let runs: Vec<(String, &[&str], u16)> = match backend {
            Backend::Sqlite => vec![("grouped".into(), &[], concurrency)],
            Backend::Postgres => {
                let mut runs = vec![("grouped".into(), &[][..], concurrency)];
                runs.extend(
                    [wide, widest].into_iter().flatten().map(|c| (format!("grouped, concurrency {c}"), &[][..], c)),
                );
                if all {
                    runs.push(("grouping off".into(), &["--group-max", "1"][..], concurrency));
                }
                runs
            }
            Backend::Rivet => Vec::new(),
        };
        for (label, extra, concurrency) in runs {
            let store = TestStore::new(backend).await;
            seed_tiny(&store.store, tiny).await?;
            if backend == Backend::Sqlite {
                let started = Instant::now();
                let census = ferry::census::census(&*store.store, None, || {}).await?;
                let rate = census.actors as f64 / started.elapsed().as_secs_f64();
                report.add("producer", "census scan actors/s (sqlite)", rate, "actors/s", "-", 0.0, None);
            }
            let actors = actors_of(&store.store).await?;
            let raw_store::RawStore { rate: raw, postgres_cpu: raw_pg } =
                raw_store::raw_store(&store, &actors, usize::from(concurrency)).await?;
            let run = fleet_run(&store, tiny, 1, concurrency, extra).await?;
            if backend == Backend::Sqlite {
                enqueue_rate = Some(run.enqueue);
            }
            let grouped = label == "grouped";
            let target = |t: f64| grouped.then_some(t);
            let m = |what: &str| format!("{name} ({label}): {what}");
            let consume_ack = *raw_consume_at
                .get(&concurrency)
                .with_context(|| format!("no raw consume+ack run at concurrency {concurrency}"))?;
            let jobs = m("jobs/s, 1 worker");
            report.add("tiny", &jobs, run.e2e, "jobs/s", "raw consume+ack", consume_ack, target(0.5));
            let store_target = if backend == Backend::Postgres { target(1.0) } else { None };
            report.add("tiny", &jobs, run.e2e, "jobs/s", "raw store limit (same work)", raw, store_target);
            if grouped {
                report.add_at_most(
                    "tiny",
                    &m("store commits per migrated actor"),
                    run.commits_per_migrated,
                    "commits",
                    "one commit per actor",
                    1.0,
                    0.2,
                );
            } else {
                report.add(
                    "tiny",
                    &m("store commits per migrated actor"),
                    run.commits_per_migrated,
                    "commits",
                    "-",
                    0.0,
                    None,
                );
            }
            let cycle_ms = f64::from(concurrency) * 1000.0 / run.e2e.max(1e-9);
            report.add(
                "tiny",
                &m("ms per job from migrator start to audit (before commit)"),
                run.migrate_ms,
                "ms",
                "job cycle (concurrency / jobs/s)",
                cycle_ms,
                None,
            );
            // Where a job's cycle goes: its steps in the worker, and what is left (the
            // broker's hand-off of the next delivery after an ack, and scheduling).
            for (step, ms) in run.steps.iter().filter(|(_, ms)| *ms > 0.0) {
                report.add("tiny", &m(&format!("ms per job: {step}")), *ms, "ms", "job cycle", cycle_ms, None);
            }
            let outside = cycle_ms - run.steps.iter().map(|(_, ms)| ms).sum::<f64>();
            report.add("tiny", &m("ms per job outside its steps"), outside, "ms", "job cycle", cycle_ms, None);
            report.add("tiny", &m("worker CPU s per 1,000 jobs"), run.cpu_per_1000, "cpu s", "-", 0.0, None);
            report.add("tiny", &m("RabbitMQ CPU s per 1,000 jobs"), run.servers.rabbitmq, "cpu s", "-", 0.0, None);
            if backend == Backend::Postgres {
                report.add(
                    "tiny",
                    &m("PostgreSQL CPU s per 1,000 jobs"),
                    run.servers.postgres,
                    "cpu s",
                    "raw store client's",
                    raw_pg,
                    None,
                );
            }
        }
    }
    // Measured on the SQLite runs only.
    let Some(enqueue_rate) = enqueue_rate else { return Ok(()) };
    report.add(
        "producer",
        "enqueue jobs/s (sqlite)",
        enqueue_rate,
        "jobs/s",
        "raw publish w/ confirms",
        raw_publish,
        Some(0.8),
    );
    Ok(())
}

/// The raw broker: `n` persistent messages published with confirms (pipelined), then
/// consumed and acked with `prefetch`, on a quorum queue like the work queue.
async fn raw_broker(n: u64, prefetch: u16) -> Result<(f64, f64)> {
    let conn = amqp::connect(&amqp_url(), "bench raw").await?;
    let ch = amqp::confirm_channel(&conn).await?;
    let queue = unique_name("bench_raw");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args).await?;
    let body = br#"{"version":1,"campaign":"bench","actor_id":"actor-0000001","enqueued_at_ms":1763900000000,"recovery":null}"#;
    let started = Instant::now();
    let mut pending = VecDeque::new();
    for i in 0..n {
        let props = amqp::json_properties(&format!("bench/{i}"), FieldTable::default());
        pending.push_back(ch.basic_publish("".into(), queue.as_str().into(), Default::default(), body, props).await?);
        while pending.len() >= 2048 {
            ensure!(pending.pop_front().context("confirm")?.await?.is_ack());
        }
    }
    while let Some(c) = pending.pop_front() {
        ensure!(c.await?.is_ack());
    }
    let publish_rate = n as f64 / started.elapsed().as_secs_f64();
    let consume = conn.create_channel().await?;
    consume.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = consume
        .basic_consume(queue.as_str().into(), "bench".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let started = Instant::now();
    for _ in 0..n {
        let d = consumer.next().await.context("consumer ended")??;
        d.ack(BasicAckOptions::default()).await?;
    }
    let consume_rate = n as f64 / started.elapsed().as_secs_f64();
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    let _ = conn.close(200, "ok".into()).await;
    Ok((publish_rate, consume_rate))
}

/// Reads every v1 chunk of the actor and writes the same bytes under another prefix, in
/// transactions as large as the limits allow: the raw cost of moving the bytes.
async fn raw_copy(store: &DynStore, actor: &ferry::ActorId) -> Result<f64> {
    let started = Instant::now();
    let range = ferry::v1::keys::sqlite_range(actor);
    let mut txn = Txn::new();
    let mut cursor = range.clone();
    let mut bytes = 0u64;
    loop {
        let rows = store.scan(&cursor, 2000).await?;
        let full = rows.len() == 2000;
        let last = rows.last().map(|(k, _)| k.clone());
        for (k, v) in rows {
            bytes += v.len() as u64;
            let mut key = b"bench-copy/".to_vec();
            key.extend_from_slice(&k);
            txn.set(key, v);
            if txn.write_bytes() > 8 << 20 {
                store.commit(std::mem::take(&mut txn)).await?;
            }
        }
        match last {
            Some(k) if full => cursor = cursor.after(&k),
            _ => break,
        }
    }
    if !txn.mutations.is_empty() {
        store.commit(txn).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let mut clear = Txn::new();
    clear.clear_range(KeyRange::prefix(b"bench-copy/"));
    store.commit(clear).await?;
    Ok(bytes as f64 / 1048576.0 / secs)
}

async fn large(report: &mut Report, backend: Backend, sizes: &[u64], dbs: &[(u64, Vec<u8>)]) -> Result<()> {
    let name = format!("{backend:?}").to_lowercase();
    for (mib, main) in dbs.iter().filter(|(m, _)| sizes.contains(m)) {
        let store = TestStore::new(backend).await;
        let actor = ferry::ActorId::parse(&format!("large-{mib}"))?;
        write_v1(&*store.store, &actor, &DbFiles { main: main.clone(), ..DbFiles::default() }).await?;
        let raw = raw_copy(&store.store, &actor).await?;
        let migrator = Migrator::new(store.store(), Arc::new(SystemClock), MigrateConfig::default());
        let req = Request { actor: actor.clone(), campaign: "bench".into(), recovery: None, attempts: 1, ticket: None };
        let started = Instant::now();
        let outcome = migrator.migrate(&req).await?;
        let secs = started.elapsed().as_secs_f64();
        let rate = main.len() as f64 / 1048576.0 / secs;
        report.add(
            "large",
            &format!("{name} {mib} MiB: migrated MiB/s"),
            rate,
            "MiB/s",
            "raw store copy of the same bytes",
            raw,
            Some(0.6),
        );
        let t = outcome.timings;
        let total = secs.max(1e-9);
        report.notes.push(format!(
            "{name} {mib} MiB: {secs:.2} s = read {:.0}% / validate (quick_check) {:.0}% / compress {:.0}% / write {:.0}% / finalize {:.0}% (compress and write overlap)",
            t.read.as_secs_f64() / total * 100.0,
            t.validate.as_secs_f64() / total * 100.0,
            t.encode.as_secs_f64() / total * 100.0,
            t.write.as_secs_f64() / total * 100.0,
            t.finalize.as_secs_f64() / total * 100.0,
        ));
    }
    Ok(())
}

/// Runs `ferry-worker local` and returns the peak resident memory it reports.
fn local_run(dir: &Path, store: &str, concurrency: u16, budget_mib: u64) -> Result<f64> {
    let out = Command::new(bin("ferry-worker"))
        .args(["local", "--store", store, "--json", "--concurrency", &concurrency.to_string()])
        .args(["--memory-budget-mib", &budget_mib.to_string()])
        .env("RUST_LOG", "warn")
        .current_dir(dir)
        .stderr(Stdio::null())
        .output()?;
    ensure!(out.status.success(), "ferry-worker local failed");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    summary["peak_rss_mib"].as_f64().context("peak_rss_mib in the summary")
}

/// Peak RSS of `ferry-worker local` at the manifest's settings (concurrency 8, max size 128
/// MiB, PostgreSQL store, `MALLOC_ARENA_MAX=2`) on large databases, at each budget, against
/// the manifest's promise: memory = budget + 128 MiB.
async fn manifest_memory(report: &mut Report, dbs: &[&[u8]], budgets: &[u64]) -> Result<()> {
    let sizes: Vec<String> = dbs.iter().map(|d| format!("{:.0}", d.len() as f64 / 1048576.0)).collect();
    let actors = format!("{} dbs of {} MiB", dbs.len(), sizes.join("/"));
    for budget in budgets {
        let store = TestStore::new(Backend::Postgres).await;
        for (i, db) in dbs.iter().enumerate() {
            let actor = ferry::ActorId::parse(&format!("manifest-{i}"))?;
            write_v1(&*store.store, &actor, &DbFiles { main: db.to_vec(), ..DbFiles::default() }).await?;
        }
        let dir = tempfile::tempdir()?;
        let out = Command::new(bin("ferry-worker"))
            .args(["local", "--store", &store.url, "--json", "--concurrency", "8", "--max-size-mib", "128"])
            .args(["--memory-budget-mib", &budget.to_string()])
            .env("RUST_LOG", "warn")
            // As deploy/k8s/worker.yaml sets it.
            .env("MALLOC_ARENA_MAX", "2")
            .current_dir(dir.path())
            .stderr(Stdio::null())
            .output()?;
        ensure!(out.status.success(), "ferry-worker local failed");
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let peak = summary["peak_rss_mib"].as_f64().context("peak_rss_mib in the summary")?;
        report.add(
            "memory",
            &format!("peak RSS, {actors} on PostgreSQL, concurrency 8, budget {budget} MiB"),
            peak,
            "MiB",
            "budget + 128 MiB (deploy/k8s/worker.yaml)",
            *budget as f64 + 128.0,
            None,
        );
    }
    Ok(())
}

async fn memory(report: &mut Report, db128: &[u8], actors_at_8: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let empty = format!("sqlite:{}", dir.path().join("empty.db").display());
    ferry::store::open(&empty, 1).await?;
    let baseline = local_run(dir.path(), &empty, 1, 1024)?;
    let one = format!("sqlite:{}", dir.path().join("one.db").display());
    let store = ferry::store::open(&one, 1).await?;
    let size_mib = db128.len() as f64 / 1048576.0;
    write_v1(&*store, &ferry::ActorId::parse("mem-0")?, &DbFiles { main: db128.to_vec(), ..DbFiles::default() })
        .await?;
    let peak1 = local_run(dir.path(), &one, 1, 1024)?;
    report.add(
        "memory",
        &format!("peak RSS, one {size_mib:.0} MiB db, concurrency 1"),
        peak1,
        "MiB",
        "1.5 x db + 64 MiB overhead",
        1.5 * size_mib + 64.0,
        None,
    );
    report.notes.push(format!(
        "memory: idle worker peak {baseline:.1} MiB; one {size_mib:.0} MiB db costs {:.2}x its size above that",
        (peak1 - baseline) / size_mib
    ));
    let many = format!("sqlite:{}", dir.path().join("many.db").display());
    let store = ferry::store::open(&many, 1).await?;
    for i in 0..actors_at_8 {
        write_v1(
            &*store,
            &ferry::ActorId::parse(&format!("mem-{i}"))?,
            &DbFiles { main: db128.to_vec(), ..DbFiles::default() },
        )
        .await?;
    }
    let budget = (2.5 * size_mib) as u64;
    let peak8 = local_run(dir.path(), &many, 8, budget)?;
    report.add(
        "memory",
        &format!("peak RSS, {actors_at_8} x {size_mib:.0} MiB, concurrency 8, budget {budget} MiB"),
        peak8,
        "MiB",
        "1.5 x budget-admitted dbs + 64 MiB",
        1.5 * 2.0 * size_mib + 64.0,
        None,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut report = Report { machine: machine(), ..Report::default() };
    if args.manifest_memory_only {
        let big = database(&DbSpec::sized((128u64 << 20) * 3 / 4, 128)).map_err(anyhow::Error::msg)?;
        let mid = database(&DbSpec::sized((32u64 << 20) * 3 / 4, 32)).map_err(anyhow::Error::msg)?;
        for budget in &args.budgets_mib {
            // Enough large databases to fill the budget with some waiting, and smaller ones to
            // be admitted into the gaps large ones leave.
            let bigs = (*budget as usize / 128 + 2).max(3);
            let dbs: Vec<&[u8]> = std::iter::repeat_n(&big, bigs).chain([&mid; 6]).map(Vec::as_slice).collect();
            manifest_memory(&mut report, &dbs, &[*budget]).await?;
        }
        println!("{}", report.table());
        return Ok(());
    }
    if args.triage_only {
        let sizes = args.triage_letters.clone().unwrap_or_else(|| vec![100_000, 1_000_000]);
        eprintln!("ferry bench on {}: triage at {sizes:?} dead letters", report.machine);
        triage::triage(&mut report, &sizes, args.triage_broker_max).await?;
        return finish(&report, args.json_out.as_deref());
    }
    let tiny = args.tiny.unwrap_or(if args.quick { 600 } else { 3000 });
    let sizes: Vec<u64> = if args.quick { vec![16] } else { vec![16, 64, 128] };
    if args.rivet_only {
        eprintln!("ferry bench on {}: the rivet layout", report.machine);
        let dbs = large_databases(&sizes)?;
        rivet::rivet(&mut report, tiny, args.concurrency.into(), &dbs).await?;
        return finish(&report, args.json_out.as_deref());
    }
    eprintln!("ferry bench on {}", report.machine);
    bin("ferry-worker");

    small(&mut report, tiny, args.concurrency, &args.small_backends).await?;
    if args.small_only {
        return finish(&report, args.json_out.as_deref());
    }

    eprintln!("2. large actors");
    let dbs = large_databases(&sizes)?;
    large(&mut report, Backend::Sqlite, &sizes, &dbs).await?;
    large(&mut report, Backend::Postgres, &sizes, &dbs).await?;

    eprintln!("4. memory");
    let biggest = &dbs.last().context("a large database")?.1;
    memory(&mut report, biggest, if args.quick { 3 } else { 6 }).await?;

    let mid = &dbs.first().context("a 16 MiB database")?.1;
    let mixed: Vec<&[u8]> = [biggest; 3].into_iter().chain([mid; 6]).map(Vec::as_slice).collect();
    manifest_memory(&mut report, &mixed, &args.budgets_mib).await?;

    eprintln!("5. scaling (postgres, tiny actors)");
    let mut one = 0.0;
    for workers in [1usize, 2, 4] {
        let store = TestStore::new(Backend::Postgres).await;
        seed_tiny(&store.store, tiny).await?;
        let rate = fleet_run(&store, tiny, workers, 4, &[]).await?.e2e;
        if workers == 1 {
            one = rate;
        }
        report.add(
            "scaling",
            &format!("{workers} worker process(es), concurrency 4"),
            rate,
            "jobs/s",
            "1 worker",
            one,
            None,
        );
    }

    eprintln!("6. the rivet layout");
    rivet::rivet(&mut report, tiny, args.concurrency.into(), &dbs).await?;

    let sizes = args.triage_letters.clone().unwrap_or_else(|| vec![if args.quick { 10_000 } else { 100_000 }]);
    eprintln!("7. triage ({sizes:?} dead letters)");
    triage::triage(&mut report, &sizes, args.triage_broker_max).await?;

    finish(&report, args.json_out.as_deref())
}

/// One real SQLite database per size in MiB.
fn large_databases(sizes: &[u64]) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut dbs = Vec::new();
    for mib in sizes {
        let started = Instant::now();
        // DbSpec::sized overshoots by about a third (overflow pages): aim under the size.
        let main = database(&DbSpec::sized((mib << 20) * 3 / 4, *mib)).map_err(anyhow::Error::msg)?;
        eprintln!(
            "  built a {:.0} MiB database in {:.1} s",
            main.len() as f64 / 1048576.0,
            started.elapsed().as_secs_f64()
        );
        dbs.push((*mib, main));
    }
    Ok(dbs)
}

/// Prints the table and the JSON, and writes the JSON to `json_out`.
fn finish(report: &Report, json_out: Option<&str>) -> Result<()> {
    println!("{}", report.table());
    let json = serde_json::to_string_pretty(report)?;
    println!("{json}");
    if let Some(path) = json_out {
        std::fs::write(path, &json).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
