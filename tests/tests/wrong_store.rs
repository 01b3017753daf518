//! A worker pointed at the wrong store (an empty SQLite file, another PostgreSQL schema) must
//! not ack a campaign away. Without the campaign gate it would record every job as
//! `skipped_no_v1` in a store that has no v1 data, ack it, and the producer's checkpoint, past
//! those actors, would never publish them again.
//!
//! What is proven, on both store backends: a misdirected worker writes nothing to either store,
//! reports not ready (naming the cause), hands every job back without using an attempt (it
//! outlives a retry budget it would otherwise exhaust), and once a correctly configured worker
//! runs, every actor ends as planted.

use std::time::Duration;

use anyhow::{Result, ensure};
use ferry::metrics as m;
use ferry::testing::{Backend, TestStore};
use ferry_tests::{Broker, Seed, WorkerSpec, audit_count, audits, bin, bounded, enqueue, http_get, sample, scrape};
use ferry_tests::{ended_as_planted, wait_until};

const LIMIT: Duration = Duration::from_secs(55);
const ACTORS: u64 = 12;
/// Attempts the misdirected worker would allow a job before dead-lettering it, if handing a job
/// back used one.
const MAX_ATTEMPTS: u32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_on_a_store_without_the_campaign_hands_jobs_back_unready_sqlite() -> Result<()> {
    misdirected_worker(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_on_a_store_without_the_campaign_hands_jobs_back_unready_postgres() -> Result<()> {
    misdirected_worker(Backend::Postgres).await
}

async fn misdirected_worker(backend: Backend) -> Result<()> {
    bin("ferry-worker");
    bounded(LIMIT, async {
        let logs = tempfile::tempdir()?;
        let campaign_store = TestStore::new(backend).await;
        let wrong_store = TestStore::new(backend).await;
        let broker = Broker::new("wrong_store").await?;
        let seed = Seed::new(ACTORS, "misdirected");
        seed.run(&campaign_store.url)?;
        let summary = enqueue(&campaign_store.url, &broker.topology, "misdirected", &[])?;
        ensure!(summary["published"] == ACTORS, "{summary}");

        let max = MAX_ATTEMPTS.to_string();
        let mut lost = WorkerSpec::new(&wrong_store.url, &broker.topology, "lost")
            .http()
            .args(&["--max-attempts", &max])
            .start(logs.path())?;
        let addr = lost.http_addr().await?;
        // Each job handed back three times: past a budget of two attempts, had they counted.
        let handbacks = r#"phase="inspect",kind="unknown_campaign""#;
        wait_until(Duration::from_secs(30), "every job was handed back three times", || async move {
            Ok(sample(&scrape(addr).await?, m::FAILURES, handbacks) >= (3 * ACTORS) as f64)
        })
        .await?;
        let (status, why) = http_get(addr, "/readyz").await?;
        ensure!(status == 503 && why.contains("wrong --store"), "/readyz: {status} {why}");
        let metrics = scrape(addr).await?;
        ensure!(sample(&metrics, m::OUTCOMES, r#"outcome="skipped_no_v1""#) == 0.0, "a job was acked as a skip");
        ensure!(audit_count(&wrong_store.store()).await? == 0, "the misdirected worker wrote audits");
        ensure!(
            audit_count(&campaign_store.store()).await? == 0,
            "the misdirected worker reached the campaign's store"
        );
        ensure!(broker.dead_depth().await? == 0, "a deferred job was dead-lettered");
        ensure!(lost.running(), "the misdirected worker exited");
        lost.stop(Duration::from_secs(15)).await?;
        let log = lost.log();
        ensure!(log.contains(&wrong_store.store().describe()), "the log names the store the worker is pointed at");

        let mut right = WorkerSpec::new(&campaign_store.url, &broker.topology, "right").start(logs.path())?;
        let store = campaign_store.store();
        let store_ref = &store;
        wait_until(Duration::from_secs(30), "every actor has its outcome", || async move {
            Ok(audit_count(store_ref).await? == ACTORS as usize)
        })
        .await?;
        right.stop(Duration::from_secs(15)).await?;
        let all = audits(&store).await?;
        for (actor, case) in seed.plan() {
            let audit = &all[actor.as_str()];
            ensure!(ended_as_planted(case, audit), "{actor} planted {case:?} ended {audit:?}");
            ensure!(audit.attempts.unwrap_or(0) <= MAX_ATTEMPTS, "{actor}: {:?} attempts", audit.attempts);
        }
        broker.delete().await
    })
    .await
}
