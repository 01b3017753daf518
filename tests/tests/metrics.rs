//! The worker's `/metrics` tells the truth from the first scrape: a fresh worker exports every
//! series (each outcome, dead-letter reason, phase and failure kind) at zero with HELP text,
//! `promtool check metrics` accepts it, and counters count what happened (N retries read N).

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry::DeadLetterReason;
use ferry::clock::{Clock, SystemClock};
use ferry::keys;
use ferry::migrate::lease::Lease;
use ferry::migrate::{Cause, OutcomeKind, Phase};
use ferry::store::Txn;
use ferry::v2::DBHead;
use ferry_tests::{Broker, Seed, WorkerSpec, audit_count, bounded, enqueue, sample, scrape, wait_until};

const LIMIT: Duration = Duration::from_secs(120);

/// Runs `promtool check metrics` on an exposition; its complaints are the error.
pub fn promtool_check(text: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool must be installed (Debian package `prometheus`; .ci/run installs it)")?;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_worker_exports_every_series_at_zero_with_help_and_promtool_accepts_it() -> Result<()> {
    bounded(LIMIT, async {
        let dir = tempfile::tempdir()?;
        let store = format!("sqlite:{}", dir.path().join("ferry.db").display());
        ferry::store::open(&store, 1).await?;
        let broker = Broker::new("metrics_fresh").await?;
        let mut w = WorkerSpec::new(&store, &broker.topology, "fresh").http().start(dir.path())?;
        let addr = w.http_addr().await?;
        w.consuming().await?;
        let text = scrape(addr).await?;
        promtool_check(&text)?;
        for name in ferry::metrics::ALL {
            ensure!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP:\n{text}");
            ensure!(text.contains(&format!("# TYPE {name} ")), "{name} is not exported:\n{text}");
        }
        let has = |series: String| text.lines().any(|l| l.starts_with(&format!("{series} ")));
        for outcome in OutcomeKind::ALL {
            let series = format!("{}{{outcome=\"{}\"}}", ferry::metrics::OUTCOMES, outcome.as_str());
            ensure!(has(series.clone()), "no {series}");
        }
        for reason in DeadLetterReason::ALL {
            let series = format!("{}{{reason=\"{}\"}}", ferry::metrics::DEAD_LETTERS, reason.as_str());
            ensure!(has(series.clone()), "no {series}");
        }
        for phase in Phase::ALL {
            for kind in Cause::kinds() {
                let labels = format!("phase=\"{}\",kind=\"{kind}\"", phase.as_str());
                ensure!(
                    text.contains(&format!("{}{{{labels}}} 0", ferry::metrics::FAILURES)),
                    "no zero series {labels}"
                );
            }
        }
        // Duration buckets start at 1 ms.
        ensure!(
            has(format!("{}_bucket{{le=\"0.001\"}}", ferry::metrics::MIGRATION_SECONDS)),
            "no 1 ms bucket:\n{text}"
        );
        // Nothing happened yet: every counter reads 0, and no reconnect was counted.
        for counter in [ferry::metrics::RETRIES, ferry::metrics::ATTEMPTS, ferry::metrics::RECONNECTS] {
            ensure!(has(counter.to_string()) && sample(&text, counter, "") == 0.0, "{counter}:\n{text}");
        }
        w.stop(Duration::from_secs(20)).await?;
        broker.delete().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_n_retries_the_retries_counter_reads_n() -> Result<()> {
    bounded(LIMIT, async {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite:{}", dir.path().join("ferry.db").display());
        let seed = Seed::new(1, "metric-retry");
        seed.run(&url)?;
        let store = ferry::store::open(&url, 1).await?;
        let blocked = seed.plan()[0].0.clone();
        // Another holder migrates it under a lease that outlives the test: every attempt is
        // `in_progress_elsewhere`, retried until the budget of 4 attempts (3 retries) is spent.
        let now = SystemClock.now_ms();
        let lease =
            Lease { holder: "elsewhere#0000000000000001".into(), generation: 1, expires_at_ms: now + 3_600_000 };
        let mut txn = Txn::new();
        txn.set(ferry::v2::keys::meta(&blocked), DBHead::staging(1, 1, now).encode());
        txn.set(keys::lease(&blocked), lease.encode());
        store.commit(txn).await?;

        let broker = Broker::new("metrics_retry").await?;
        enqueue(&url, &broker.topology, "metric-retry", &[])?;
        let attempts = 4;
        let mut w = WorkerSpec::new(&url, &broker.topology, "retry")
            .concurrency(1)
            .args(&["--max-attempts", &attempts.to_string()])
            .http()
            .start(dir.path())?;
        let addr = w.http_addr().await?;
        wait_until(Duration::from_secs(60), "the blocked job is dead-lettered", || {
            let store = store.clone();
            async move { Ok(audit_count(&store).await? == 1) }
        })
        .await?;
        let text = scrape(addr).await?;
        let m = ferry::metrics::RETRIES;
        assert_eq!(sample(&text, m, ""), f64::from(attempts - 1), "{m}:\n{text}");
        assert_eq!(sample(&text, ferry::metrics::ATTEMPTS, ""), f64::from(attempts));
        assert_eq!(
            sample(&text, ferry::metrics::FAILURES, "phase=\"inspect\",kind=\"in_progress_elsewhere\""),
            f64::from(attempts)
        );
        assert_eq!(sample(&text, ferry::metrics::DEAD_LETTERS, "reason=\"retries_exhausted\""), 1.0);
        assert_eq!(sample(&text, ferry::metrics::OUTCOMES, "outcome=\"dead_lettered\""), 1.0);
        w.stop(Duration::from_secs(20)).await?;
        broker.delete().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_migrated_job_records_its_steps_once_and_their_times_add_up_within_the_run() -> Result<()> {
    bounded(LIMIT, async {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite:{}", dir.path().join("ferry.db").display());
        let seed = Seed::new(5, "metric-steps");
        seed.run(&url)?;
        let store = ferry::store::open(&url, 1).await?;
        let broker = Broker::new("metrics_steps").await?;
        enqueue(&url, &broker.topology, "metric-steps", &[])?;
        let started = std::time::Instant::now();
        let mut w = WorkerSpec::new(&url, &broker.topology, "steps").http().start(dir.path())?;
        let addr = w.http_addr().await?;
        wait_until(Duration::from_secs(60), "every job is finished", || {
            let store = store.clone();
            async move { Ok(audit_count(&store).await? == 5) }
        })
        .await?;
        // The audit is written by the commit; the outcome and the settle step come after it,
        // once the job is acked: wait for every job's ack before reading the counts.
        let name = ferry::metrics::JOB_STEP_SECONDS;
        let settled = |text: &str| {
            let outcomes: f64 = OutcomeKind::ALL
                .iter()
                .map(|o| sample(text, ferry::metrics::OUTCOMES, &format!("outcome=\"{}\"", o.as_str())))
                .sum();
            let migrated = sample(text, ferry::metrics::OUTCOMES, "outcome=\"migrated\"");
            let acks = sample(text, &format!("{name}_count"), &format!("step=\"{}\"", ferry::metrics::SETTLE_STEP));
            outcomes == 5.0 && acks == migrated
        };
        wait_until(Duration::from_secs(30), "every job is acked", || async move { Ok(settled(&scrape(addr).await?)) })
            .await?;
        let text = scrape(addr).await?;
        let migrated = sample(&text, ferry::metrics::OUTCOMES, "outcome=\"migrated\"");
        ensure!(migrated >= 1.0, "nothing migrated:\n{text}");
        let mut total = 0.0;
        for step in ferry::metrics::JOB_STEPS {
            let labels = format!("step=\"{step}\"");
            let count = sample(&text, &format!("{name}_count"), &labels);
            ensure!(count == migrated, "{step}: {count} samples for {migrated} migrated jobs:\n{text}");
            total += sample(&text, &format!("{name}_sum"), &labels);
        }
        let reads = sample(&text, &format!("{name}_sum"), "step=\"read\"");
        ensure!(reads > 0.0, "the reads took no time:\n{text}");
        // Five jobs, at most five at a time: their steps fit five times the run, or a step was
        // counted twice or in the wrong unit.
        ensure!(total < started.elapsed().as_secs_f64() * 5.0, "steps of {total} s in a shorter run");
        w.stop(Duration::from_secs(20)).await?;
        broker.delete().await
    })
    .await
}
