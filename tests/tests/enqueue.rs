//! End to end: `ferry-producer enqueue` as a separate process on the real RabbitMQ and both
//! stores.
//!
//! - a keyspace well past every internal bound (the scanner's 4,096-item channel, the store
//!   pool of 4, the scan's 1,024-key batches, the 2,048-confirm window), at the deploy Job's
//!   rate and unlimited: every actor ends published or skipped exactly once and the campaign
//!   completes, on SQLite and on PostgreSQL;
//! - the producer's broker connection closed and its PostgreSQL sessions terminated mid-run:
//!   the same run reconnects, resumes from its checkpoint and completes;
//! - a permanent error (a campaign re-run with other filters) still fails at once, and a
//!   broker that stays down fails once the retry budget is spent; SIGTERM stops a producer
//!   waiting to reconnect at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use ferry::campaign::{self, CampaignStatus};
use ferry::jobs::Job;
use ferry::migrate::OutcomeKind;
use ferry::queue::enqueue::{PRODUCER_WORKER, producer_connection_name};
use ferry::synth::keyspace::{Case, Mix, SeedConfig, plan, seed};
use ferry::testing::{Backend, TestStore, unique_name};
use ferry_tests::{
    Broker, Proc, audits, bounded, close_connection, connections_named, enqueue_command, terminate_sessions, wait_until,
};
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;

/// Past the scanner's channel (4,096) nearly three times, the scan batch (1,024) eleven times.
const ACTORS: u64 = 11_000;
/// What the deploy Job sets (`deploy/k8s/producer-job.yaml`).
const JOB_RATE: &str = "2000";
/// Skipped actors of each kind ride the same pipeline as published ones.
const MIX: &str = "no_v1=0.08,native=0.02";

/// The planted keyspace: as small as a real one gets (every database a few pages).
fn keyspace(actors: u64, prefix: &str) -> SeedConfig {
    SeedConfig {
        actors,
        seed: 7,
        mix: Mix::parse(MIX).expect("test mix parses"),
        large_share: 0.0,
        medium_share: 0.0,
        prefix: prefix.into(),
        ..SeedConfig::default()
    }
}

/// Seeds the keyspace; returns the actors that get a job, and the skipped ones with their
/// expected outcome.
async fn planted(ts: &TestStore, cfg: &SeedConfig) -> Result<(BTreeSet<String>, BTreeMap<String, OutcomeKind>)> {
    let started = Instant::now();
    seed(&*ts.store, cfg, |_| {}).await.map_err(|e| anyhow!("seeding: {e}"))?;
    eprintln!("seeded {} actors in {:.1} s", cfg.actors, started.elapsed().as_secs_f64());
    let (mut published, mut skipped) = (BTreeSet::new(), BTreeMap::new());
    for a in plan(cfg) {
        match a.case {
            Case::NoV1 => drop(skipped.insert(a.id.to_string(), OutcomeKind::SkippedNoV1)),
            Case::Native => drop(skipped.insert(a.id.to_string(), OutcomeKind::SkippedNativeV2)),
            _ => drop(published.insert(a.id.to_string())),
        }
    }
    Ok((published, skipped))
}

/// Every job on the work queue (taken with an auto-ack consumer: thousands in a second, where
/// `basic_get` takes one round trip each), by actor, with how many times each was sent.
async fn jobs_on(broker: &Broker, campaign: &str) -> Result<BTreeMap<String, usize>> {
    let queue = broker.topology.work_queue();
    let n = broker.depth(&queue).await? as usize;
    let ch = broker.channel();
    let tag = unique_name("take");
    let opts = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
    let mut consumer =
        ch.basic_consume(queue.as_str().into(), tag.as_str().into(), opts, FieldTable::default()).await?;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..n {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .context("the work queue stopped delivering")?
            .context("consumer ended")??;
        let job = Job::parse(&delivery.data).map_err(|e| anyhow!("{e}"))?;
        ensure!(job.campaign == campaign, "a job of campaign {} on this test's queue", job.campaign);
        *seen.entry(job.actor_id.to_string()).or_default() += 1;
    }
    ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await?;
    ensure!(broker.depth(&queue).await? == 0, "jobs arrived after the producer exited");
    Ok(seen)
}

/// Runs the producer to its exit, at most `limit`; its summary and its process.
async fn run_producer(
    name: &str,
    ts: &TestStore,
    broker: &Broker,
    campaign: &str,
    extra: &[&str],
    logs: &std::path::Path,
    limit: Duration,
) -> Result<(serde_json::Value, Proc)> {
    let mut p = Proc::spawn(name, enqueue_command(&ts.url, &broker.topology, campaign, extra), logs)?;
    let started = Instant::now();
    let status = p.wait_exit(limit).await?;
    eprintln!("{name}: {status} after {:.1} s", started.elapsed().as_secs_f64());
    ensure!(status.success(), "{name} exited with {status}:\n{}", p.log_tail());
    let summary: serde_json::Value = serde_json::from_str(&p.stdout()).context("the producer's JSON summary")?;
    Ok((summary, p))
}

/// One campaign of the keyspace test: its name, `--rate`, `--limit`.
struct Campaign(&'static str, Option<&'static str>, Option<usize>);

/// One campaign over the planted keyspace: every actor it reaches published once or skipped
/// once with its audit record, the campaign record complete.
async fn campaign_publishes_each_actor_once(
    ts: &TestStore,
    Campaign(campaign, rate, limit): Campaign,
    want: &(BTreeSet<String>, BTreeMap<String, OutcomeKind>),
    logs: &std::path::Path,
) -> Result<()> {
    // With a limit, the campaign ends at its limit-th job: it reaches the actors up to that one.
    let published: BTreeSet<String> = want.0.iter().take(limit.unwrap_or(usize::MAX)).cloned().collect();
    let last = match limit {
        Some(_) => published.last().context("no actor to publish")?.clone(),
        None => "\u{10ffff}".into(),
    };
    let skipped: BTreeMap<&String, &OutcomeKind> = want.1.iter().filter(|(a, _)| **a < last).collect();
    let broker = Broker::new("enq_bounds").await?;
    let mut extra: Vec<String> = Vec::new();
    if let Some(r) = rate {
        extra.extend(["--rate".into(), r.into()]);
    }
    if let Some(l) = limit {
        extra.extend(["--limit".into(), l.to_string()]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (summary, mut p) = run_producer(campaign, ts, &broker, campaign, &extra, logs, Duration::from_secs(60)).await?;
    ensure!(summary["completed"] == true, "{summary}");
    ensure!(summary["published"] == published.len() as u64, "{summary}");
    ensure!(summary["scanned"] == (published.len() + skipped.len()) as u64, "{summary}");
    // The publishing phase is part of the run, connecting and declaring left out of it.
    let (publishing, whole) = (summary["publishing_seconds"].as_f64(), summary["seconds"].as_f64());
    ensure!(matches!((publishing, whole), (Some(p), Some(w)) if p > 0.0 && p < w), "{summary}");
    let record = campaign::load(&*ts.store, campaign).await?.context("campaign record")?;
    ensure!(record.status == CampaignStatus::Enqueued, "{record:?}");
    ensure!((record.published, record.skipped) == (published.len() as u64, skipped.len() as u64), "{record:?}");

    let jobs = jobs_on(&broker, campaign).await?;
    let twice: Vec<_> = jobs.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(twice.is_empty(), "{} actors got more than one job, e.g. {:?}", twice.len(), twice.first());
    let sent: BTreeSet<String> = jobs.into_keys().collect();
    ensure!(sent == published, "jobs for {} actors, {} planted to get one", sent.len(), published.len());

    let audits = audits(&ts.store).await?;
    for (actor, outcome) in skipped {
        let a = audits.get(actor).with_context(|| format!("{actor}: no audit record"))?;
        ensure!(a.outcome == *outcome && a.campaign == campaign && a.worker == PRODUCER_WORKER, "{actor}: {a:?}");
    }
    let audited_jobs = published.iter().filter(|a| audits.contains_key(*a)).count();
    ensure!(audited_jobs == 0, "{audited_jobs} published actors have an audit record (no worker ran)");
    p.settle();
    broker.delete().await
}

/// The keyspace past every bound, enqueued by campaigns one after another (nothing migrates
/// in between, so each publishes the same actors again):
/// - far behind the scan (200/s, the first 1,500 jobs): the scanner fills its channel within
///   seconds and stays blocked on it while checkpoints are saved. Before the fix this failed
///   on PostgreSQL every time, after 30 s, with the pool's slot timeout;
/// - at the deploy Job's rate; unlimited.
async fn past_every_bound(backend: Backend) -> Result<()> {
    let logs = tempfile::tempdir()?;
    let ts = TestStore::new(backend).await;
    let want = planted(&ts, &keyspace(ACTORS, "bound")).await?;
    for c in [
        Campaign("far-behind-the-scan", Some("200"), Some(1500)),
        Campaign("at-job-rate", Some(JOB_RATE), None),
        Campaign("unlimited", None, None),
    ] {
        campaign_publishes_each_actor_once(&ts, c, &want, logs.path()).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_on_postgres_publishes_a_keyspace_past_every_internal_bound_once_at_any_rate() -> Result<()> {
    bounded(Duration::from_secs(150), past_every_bound(Backend::Postgres)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_on_sqlite_publishes_a_keyspace_past_every_internal_bound_once_at_any_rate() -> Result<()> {
    bounded(Duration::from_secs(150), past_every_bound(Backend::Sqlite)).await
}

// ---------------------------------------------------------------------------------------------
// Transient and permanent failures

/// The broker pids of the producer's connection, once it has one.
async fn producer_connection(campaign: &str) -> Result<Vec<String>> {
    let name = producer_connection_name(campaign);
    let mut pids = Vec::new();
    wait_until(Duration::from_secs(20), "the producer is connected", || {
        let found = connections_named(&name);
        let ok = matches!(&found, Ok(p) if !p.is_empty());
        if let Ok(p) = found {
            pids = p;
        }
        async move { Ok(ok) }
    })
    .await?;
    Ok(pids)
}

/// Lines of the producer's log that report a retry.
fn retries(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("WARN") && l.contains("transient failure")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_survives_its_broker_connection_closed_and_its_store_sessions_terminated_in_one_run() -> Result<()> {
    bounded(Duration::from_secs(120), async {
        let logs = tempfile::tempdir()?;
        let ts = TestStore::new(Backend::Postgres).await;
        let (published, skipped) = planted(&ts, &keyspace(3000, "faults")).await?;
        let broker = Broker::new("enq_faults").await?;
        // Its own application name, so only the producer's sessions are terminated.
        let app = unique_name("enqfaults");
        let url = format!("{}&application_name={app}", ts.url);
        let campaign = "through-faults";
        let cmd = enqueue_command(&url, &broker.topology, campaign, &["--rate", "200"]);
        let mut p = Proc::spawn("producer", cmd, logs.path())?;
        let store = ts.store();
        let (store_ref, broker_ref) = (&store, &broker);
        let checkpointed = |at_least: u64| async move {
            let rec = campaign::load(&**store_ref, campaign).await?;
            Ok(rec.is_some_and(|r| r.published >= at_least))
        };

        // rabbitmqctl takes seconds: find the connection first, close it once jobs are flowing.
        let pids = producer_connection(campaign).await?;
        wait_until(Duration::from_secs(20), "a first checkpoint", || checkpointed(200)).await?;
        for pid in &pids {
            close_connection(pid, "ferry test: the producer loses its broker connection")?;
        }
        let at_close = campaign::load(&*store, campaign).await?.context("campaign record")?.published;
        eprintln!("closed the producer's broker connection at {at_close} confirmed jobs");
        wait_until(Duration::from_secs(30), "the producer reconnects and checkpoints again", || {
            checkpointed(at_close + 200)
        })
        .await?;
        ensure!(p.running(), "the producer exited after losing its broker connection:\n{}", p.log_tail());
        // A terminated idle session is replaced by the pool unseen; one with a query in flight
        // fails. So hold the campaign record's row lock until the producer's next checkpoint
        // save waits on it (it saves every second), then terminate its sessions.
        let schema = ts.schema().context("a PostgreSQL fixture has a schema")?.to_string();
        let (admin, conn) = tokio_postgres::connect(&ferry::testing::postgres_url(), tokio_postgres::NoTls).await?;
        let admin_task = tokio::spawn(conn);
        admin.batch_execute("BEGIN").await?;
        let lock = format!("SELECT 1 FROM {schema}.kv WHERE key = $1 FOR UPDATE");
        admin.query(&lock, &[&ferry::keys::campaign(campaign)]).await?;
        let waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'";
        let admin_ref = &admin;
        let app_ref = app.as_str();
        wait_until(Duration::from_secs(10), "a checkpoint save waits on the row lock", || async move {
            Ok(admin_ref.query_one(waiting, &[&app_ref]).await?.get::<_, i64>(0) > 0)
        })
        .await?;
        let killed = terminate_sessions(&app).await?;
        admin.batch_execute("ROLLBACK").await?;
        admin_task.abort();
        ensure!(killed > 0, "the producer had no store session to terminate");
        let at_kill = campaign::load(&*store, campaign).await?.context("campaign record")?.published;
        eprintln!("terminated {killed} store sessions at {at_kill} confirmed jobs");
        ensure!((at_kill as usize) < published.len(), "the run ended before its store sessions were terminated");

        let status = p.wait_exit(Duration::from_secs(60)).await?;
        let log = p.log();
        ensure!(status.success(), "the producer exited with {status}:\n{}", p.log_tail());
        let summary: serde_json::Value = serde_json::from_str(&p.stdout()).context("summary")?;
        ensure!(summary["completed"] == true, "{summary}");
        // Each actor counted once, however often it was published.
        ensure!(summary["published"] == published.len() as u64, "{summary}");
        ensure!(summary["scanned"] == (published.len() + skipped.len()) as u64, "{summary}");
        let record = campaign::load(&*store, campaign).await?.context("campaign record")?;
        ensure!(record.status == CampaignStatus::Enqueued, "{record:?}");
        ensure!((record.published, record.skipped) == (published.len() as u64, skipped.len() as u64), "{record:?}");

        let jobs = jobs_on(broker_ref, campaign).await?;
        let sent: BTreeSet<String> = jobs.keys().cloned().collect();
        ensure!(sent == published, "jobs for {} actors, {} planted to get one", sent.len(), published.len());
        let again: usize = jobs.values().map(|n| n - 1).sum();
        eprintln!(
            "{} jobs for {} actors ({again} published again after a failure)",
            published.len() + again,
            sent.len()
        );

        let warned = retries(&log);
        eprintln!("{}", warned.join("\n"));
        ensure!(warned.len() >= 2, "expected a retry for each fault, logged:\n{log}");
        ensure!(warned.iter().any(|l| l.contains("amqp://guest:***@")), "no retry names the broker:\n{log}");
        ensure!(warned.iter().any(|l| l.contains("postgres://")), "no retry names the store:\n{log}");
        ensure!(!log.contains("guest:guest"), "the broker password reached the log");
        p.settle();
        broker.delete().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_fails_at_once_on_a_permanent_error_and_after_the_budget_on_a_broker_that_stays_down() -> Result<()> {
    bounded(Duration::from_secs(60), async {
        let logs = tempfile::tempdir()?;
        let ts = TestStore::new(Backend::Sqlite).await;
        planted(&ts, &keyspace(20, "perm")).await?;
        let broker = Broker::new("enq_perm").await?;
        let campaign = "permanent";
        let budget = ["--retry-budget-secs", "30"];
        run_producer(
            "first",
            &ts,
            &broker,
            campaign,
            &[&["--limit", "5"][..], &budget].concat(),
            logs.path(),
            Duration::from_secs(20),
        )
        .await?
        .1
        .settle();

        // Each of these fails the same way however often it is tried: at once, never retried.
        let bad_password = ferry::testing::amqp_url().replacen("guest:guest", "guest:not-the-password", 1);
        let cases: [(&str, Vec<&str>, &str); 3] = [
            ("filters-changed", vec!["--campaign", campaign, "--limit", "6"], "other filters"),
            ("bad-campaign", vec!["--campaign", "not a name!"], "is invalid"),
            ("access-refused", vec!["--campaign", "refused", "--amqp", &bad_password], "ACCESS"),
        ];
        for (name, args, says) in cases {
            let mut cmd = std::process::Command::new(ferry_tests::bin("ferry-producer"));
            cmd.args(["enqueue", "--store", &ts.url, "--json", "--queue-prefix", &broker.topology.prefix])
                .args(budget)
                .args(&args);
            if !args.contains(&"--amqp") {
                cmd.args(["--amqp", &ferry::testing::amqp_url()]);
            }
            let mut p = Proc::spawn(name, cmd, logs.path())?;
            let started = Instant::now();
            let status = p.wait_exit(Duration::from_secs(20)).await?;
            let took = started.elapsed();
            let log = p.log();
            ensure!(!status.success(), "{name}: exited with {status}");
            ensure!(took < Duration::from_secs(5), "{name}: took {took:?} to fail:\n{log}");
            ensure!(retries(&log).is_empty(), "{name}: a permanent error was retried:\n{log}");
            ensure!(log.contains(says), "{name}: the error does not say {says:?}:\n{log}");
            ensure!(!log.contains("not-the-password"), "{name}: the password reached the log");
            p.settle();
        }

        // Nothing listens on port 1: connection refused, transient, retried for the budget.
        let down = "amqp://guest:guest@127.0.0.1:1/%2f";
        let mut cmd = std::process::Command::new(ferry_tests::bin("ferry-producer"));
        cmd.args(["enqueue", "--store", &ts.url, "--json", "--queue-prefix", &broker.topology.prefix]).args([
            "--campaign",
            "down",
            "--amqp",
            down,
            "--retry-budget-secs",
            "2",
        ]);
        let mut p = Proc::spawn("broker-down", cmd, logs.path())?;
        let started = Instant::now();
        let status = p.wait_exit(Duration::from_secs(20)).await?;
        let took = started.elapsed();
        let log = p.log();
        ensure!(!status.success(), "exited with {status}");
        ensure!(took >= Duration::from_secs(2) && took < Duration::from_secs(8), "took {took:?}:\n{log}");
        let warned = retries(&log);
        ensure!(warned.len() >= 2, "expected retries:\n{log}");
        ensure!(warned.iter().all(|l| l.contains("amqp://guest:***@127.0.0.1:1")), "{log}");
        ensure!(log.contains("retry budget of 2 s"), "the error does not name the budget:\n{log}");
        ensure!(!log.contains("guest:guest"), "the broker password reached the log");
        p.settle();
        broker.delete().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_producer_waiting_to_reconnect_at_once() -> Result<()> {
    bounded(Duration::from_secs(40), async {
        let logs = tempfile::tempdir()?;
        let ts = TestStore::new(Backend::Sqlite).await;
        planted(&ts, &keyspace(5, "term")).await?;
        // Nothing listens on port 1: the producer retries with backoff for its whole budget.
        let mut cmd = std::process::Command::new(ferry_tests::bin("ferry-producer"));
        cmd.args(["enqueue", "--store", &ts.url, "--json", "--queue-prefix", &unique_name("enq_term")]).args([
            "--campaign",
            "term",
            "--amqp",
            "amqp://guest:guest@127.0.0.1:1/%2f",
            "--retry-budget-secs",
            "60",
        ]);
        let mut p = Proc::spawn("producer", cmd, logs.path())?;
        let p_ref = &p;
        wait_until(
            Duration::from_secs(20),
            "the producer retries",
            || async move { Ok(retries(&p_ref.log()).len() >= 3) },
        )
        .await?;
        let asked = Instant::now();
        p.sigterm()?;
        let status = p.wait_exit(Duration::from_secs(10)).await?;
        let took = asked.elapsed();
        ensure!(status.code() == Some(130), "an interrupted enqueue exits 130: {status}");
        ensure!(took < Duration::from_millis(1500), "took {took:?} to stop while waiting to reconnect");
        let summary: serde_json::Value = serde_json::from_str(&p.stdout()).context("summary")?;
        ensure!(summary["completed"] == false && summary["published"] == 0, "{summary}");
        p.settle();
        Ok(())
    })
    .await
}
