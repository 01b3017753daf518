//! End to end on PostgreSQL: a worker frozen with SIGSTOP in the middle of a stage transaction,
//! its write statement holding the actor's lease row, neither blocks the takeover of that actor
//! nor stalls the fleet. A second, healthy worker takes the actor over and migrates it, and
//! migrates every other actor, while the first is still paused, within a bound set by the lease
//! TTL and the session timeouts (`store::postgres::SessionLimits`). Resumed, the first worker's
//! late writes are fenced: one v2 copy, equal to v1, no lease, no MigratingFromV1 head.
//!
//! The moment is made deterministic, not hoped for: before the worker starts, the test inserts
//! (uncommitted) the first DELTA row the worker will stage, so the worker's first stage
//! statement, which has already written the lease row (keys go out sorted, `ferry/lease/`
//! first), waits on the test's row lock. The test freezes the worker there and then lets the
//! statement finish. The worker's `COMMIT` went out with its writes (`store::serializable`), so
//! its transaction ends there and then, frozen worker or not: the session is idle outside any
//! transaction and holds no row, and the takeover waits only for the lease the stage renewed.
//! (Before commits were pipelined, the session stayed idle in transaction holding the lease
//! row until `idle_in_transaction_session_timeout` ended it.)
//!
//! Needs PostgreSQL and RabbitMQ; fails when either is down.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ferry::ActorId;
use ferry::keys;
use ferry::migrate::OutcomeKind;
use ferry::synth::sqlite::{DbFiles, DbSpec, database};
use ferry::synth::write_v1;
use ferry::testing::{Backend, TestStore, postgres_url};
use ferry::v2::{Origin, read_v2};
use ferry_tests::{Broker, WorkerSpec, audits, bounded, delta_txids, enqueue, leases, v2_head, wait_until};

const LEASE_TTL_SECS: u64 = 5;
/// How long after the pause the takeover and the other migrations must be done: the lease
/// TTL (the paused holder's last lease must expire), the idle-in-transaction timeout (L/2) and
/// the lock timeout (L/4) that end its transaction, and slack for retries on a busy machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(LEASE_TTL_SECS + 3 + 2 + 20);
const OTHER_ACTORS: u32 = 12;

async fn connect() -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .with_context(|| format!("PostgreSQL must be running for this test ({})", postgres_url()))?;
    tokio::spawn(conn);
    Ok(client)
}

/// The state of the server session `pid` (`None`: gone).
async fn session_state(monitor: &tokio_postgres::Client, pid: i32) -> Result<Option<String>> {
    let row = monitor.query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid]).await?;
    Ok(row.and_then(|r| r.get::<_, Option<String>>(0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_paused_inside_its_stage_transaction_is_taken_over_while_still_paused() -> Result<()> {
    bounded(Duration::from_secs(300), async {
        let ts = TestStore::new(Backend::Postgres).await;
        let store = ts.store();
        let schema = ts.schema().context("a PostgreSQL fixture has a schema")?.to_string();
        let dir = tempfile::tempdir()?;

        // Over ONE_SHOT_MAX_PAGES (4 MiB), so it is staged in its own transactions.
        let big = ActorId::parse("a_big")?;
        let big_main = database(&DbSpec::sized(8 << 20, 7)).map_err(anyhow::Error::msg)?;
        write_v1(&*store, &big, &DbFiles { main: big_main.clone(), ..DbFiles::default() }).await?;
        let broker = Broker::new("paused").await?;
        enqueue(&ts.url, &broker.topology, "c1", &[])?;

        // The trap: the first DELTA row of the first migration (generation 1, txid 1).
        let mut trap = connect().await?;
        let trap_tx = trap.transaction().await?;
        let insert = format!("INSERT INTO {schema}.kv (key, value) VALUES ($1, $2)");
        trap_tx.execute(&insert, &[&ferry::v2::keys::delta_chunk(&big, 1, 0), &b"trap".to_vec()]).await?;

        let spec = |hint| WorkerSpec::new(&ts.url, &broker.topology, hint).lease_ttl_secs(LEASE_TTL_SECS);
        let mut paused = spec("paused").concurrency(1).start(dir.path())?;
        let monitor = connect().await?;
        let staging = format!("INSERT INTO {schema}.kv%");
        let deadline = Instant::now() + Duration::from_secs(60);
        let backend: i32 = loop {
            let rows = monitor
                .query("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1", &[&staging])
                .await?;
            if let Some(row) = rows.first() {
                break row.get(0);
            }
            ensure!(paused.running(), "the worker exited:\n{}", paused.log_tail());
            ensure!(Instant::now() < deadline, "the worker's stage never waited on the trap");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        paused.pause()?;
        let paused_at = Instant::now();
        wait_until(Duration::from_secs(5), "the worker is stopped", || {
            let stopped = paused.is_paused();
            async move { Ok(stopped) }
        })
        .await?;
        trap_tx.rollback().await?;

        // The frozen worker's statement finished and the COMMIT sent behind it ended its
        // transaction: no open transaction, and the lease row free, with the worker frozen.
        wait_until(Duration::from_secs(2), "the frozen worker's transaction ended", || {
            let monitor = &monitor;
            async move { Ok(session_state(monitor, backend).await?.as_deref() == Some("idle")) }
        })
        .await?;
        let mut probe = connect().await?;
        let probe_tx = probe.transaction().await?;
        probe_tx.batch_execute("SET LOCAL lock_timeout = '100ms'").await?;
        probe_tx
            .query(&format!("SELECT 1 FROM {schema}.kv WHERE key = $1 FOR UPDATE"), &[&keys::lease(&big)])
            .await
            .context("the paused worker still holds the lease row")?;
        drop(probe_tx);
        eprintln!("paused {} inside its stage transaction (backend {backend})", paused.name);

        // More work arrives while it is paused; the second campaign also carries the actor
        // whose migration the paused worker holds (its head is MigratingFromV1).
        let mut others = Vec::new();
        for i in 0..OTHER_ACTORS {
            let actor = ActorId::parse(&format!("b{i:02}"))?;
            let main = database(&DbSpec::small(u64::from(i))).map_err(anyhow::Error::msg)?;
            write_v1(&*store, &actor, &DbFiles { main: main.clone(), ..DbFiles::default() }).await?;
            others.push((actor, main));
        }
        let summary = enqueue(&ts.url, &broker.topology, "c2", &[])?;
        eprintln!("second enqueue: {summary}");
        let mut healthy = spec("healthy").concurrency(4).start(dir.path())?;

        wait_until(TAKEOVER_BOUND, "the healthy worker migrates every actor while the other is paused", || {
            let (store, big, others) = (&store, &big, &others);
            async move {
                for actor in std::iter::once(big).chain(others.iter().map(|(a, _)| a)) {
                    if !v2_head(store, actor).await?.is_some_and(|h| h.origin == Origin::MigratedFromV1) {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        })
        .await?;
        let took = paused_at.elapsed();
        ensure!(paused.is_paused(), "the paused worker ran again before the takeover was checked");
        eprintln!(
            "taken over and {OTHER_ACTORS} other actors migrated {:.1} s after the pause (lease TTL {LEASE_TTL_SECS} s)",
            took.as_secs_f64()
        );
        let state = session_state(&monitor, backend).await?;
        ensure!(state.as_deref().is_none_or(|s| s == "idle"), "the paused worker's session is {state:?}");

        // Revived, its transaction is gone and its next writes are fenced; its job ends in a
        // retry that finds the actor migrated.
        paused.resume()?;
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut quiet = 0;
        while quiet < 4 {
            ensure!(Instant::now() < deadline, "the queues did not drain");
            tokio::time::sleep(Duration::from_millis(500)).await;
            let idle = broker.pending().await? == 0 && leases(&store).await?.is_empty();
            quiet = if idle { quiet + 1 } else { 0 };
        }
        ensure!(paused.running(), "the revived worker exited:\n{}", paused.log_tail());

        let head = v2_head(&store, &big).await?.context("a_big has no head")?;
        ensure!(head.origin == Origin::MigratedFromV1, "{head:?}");
        ensure!(head.head_txid != 1, "the paused worker's txid 1 was finalized: {head:?}");
        let txids = delta_txids(&store, &big).await?;
        ensure!(txids == vec![head.head_txid], "one staged copy expected, DELTA txids {txids:?}");
        ensure!(read_v2(&*store, &big).await?.file == big_main, "a_big: v2 differs from v1");
        for (actor, main) in &others {
            ensure!(read_v2(&*store, actor).await?.file == *main, "{actor}: v2 differs from v1");
        }
        ensure!(leases(&store).await?.is_empty(), "leases left");
        let audits = audits(&store).await?;
        for (actor, audit) in &audits {
            ensure!(
                matches!(audit.outcome, OutcomeKind::Migrated | OutcomeKind::SkippedAlreadyMigrated),
                "{actor}: {audit:?}"
            );
            let head = v2_head(&store, &ActorId::parse(actor)?).await?;
            ensure!(head.is_some_and(|h| h.origin == Origin::MigratedFromV1), "{actor}: not migrated");
        }
        ensure!(audits.len() == others.len() + 1, "audits: {:?}", audits.keys());

        paused.stop(Duration::from_secs(30)).await?;
        healthy.stop(Duration::from_secs(30)).await?;
        broker.delete().await?;
        Ok(())
    })
    .await
}
