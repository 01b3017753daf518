//! The rivet-layout section (issue 14): what rivet's rows and universaldb's concurrency protocol
//! cost next to the ferry layout on the same PostgreSQL server, judged against the same raw
//! limits.
//!
//! - tiny actors: every actor migrated in-process by one `Migrator` at the fleet's concurrency,
//!   once on the ferry layout (`postgres://...`, one `kv` table) and once on the rivet layout
//!   (rivet's objects in a fresh schema), so the ratio is the protocol's cost per small job
//!   (snapshots started with `nextval`, the commit on a second connection, conflict rows);
//! - large actors: one database per size migrated on the rivet layout, against the raw store
//!   copy of the same bytes on the ferry layout (the limit the ferry-layout rows use), with the
//!   finalize's share (the one transaction that reads the whole v1 range again in its snapshot,
//!   which rivet wants well under 5 s).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, ensure};
use ferry::clock::SystemClock;
use ferry::migrate::{MigrateConfig, Migrator, OutcomeKind, Request};
use ferry::synth::sqlite::{DbSpec, database};
use ferry::synth::{DbFiles, write_v1};
use ferry::testing::{Backend, TestStore};
use futures::StreamExt;

use super::{Report, raw_copy};

/// Migrates `n` tiny actors in-process with `concurrency` at a time; jobs/s.
async fn tiny_rate(backend: Backend, n: u64, concurrency: usize) -> Result<f64> {
    let ts = TestStore::new(backend).await;
    let mut actors = Vec::with_capacity(n as usize);
    for i in 0..n {
        let actor = ts.actor(&format!("tiny-{i:06}"));
        let main = database(&DbSpec::small(i % 8 + 1)).map_err(anyhow::Error::msg)?;
        write_v1(&*ts.store, &actor, &DbFiles { main, ..DbFiles::default() }).await?;
        actors.push(actor);
    }
    let migrator = Arc::new(Migrator::new(ts.store(), Arc::new(SystemClock), MigrateConfig::default()));
    let started = Instant::now();
    let outcomes: Vec<_> = futures::stream::iter(actors)
        .map(|actor| {
            let migrator = Arc::clone(&migrator);
            async move {
                let req = Request { actor, campaign: "bench".into(), recovery: None, attempts: 1, ticket: None };
                migrator.migrate(&req).await
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let migrated = outcomes.iter().filter(|o| matches!(o, Ok(o) if o.audit.outcome == OutcomeKind::Migrated)).count();
    ensure!(migrated as u64 == n, "{backend:?}: {migrated} of {n} tiny actors migrated");
    Ok(n as f64 / secs)
}

pub async fn rivet(report: &mut Report, tiny: u64, concurrency: usize, dbs: &[(u64, Vec<u8>)]) -> Result<()> {
    let ferry_rate = tiny_rate(Backend::Postgres, tiny, concurrency).await?;
    let rivet_rate = tiny_rate(Backend::Rivet, tiny, concurrency).await?;
    report.add(
        "rivet",
        &format!("tiny: migrations/s in-process, concurrency {concurrency}"),
        rivet_rate,
        "jobs/s",
        "the same on the ferry layout (pg)",
        ferry_rate,
        None,
    );
    for (mib, main) in dbs {
        let raw = {
            let pg = TestStore::new(Backend::Postgres).await;
            let actor = pg.actor(&format!("large-{mib}"));
            write_v1(&*pg.store, &actor, &DbFiles { main: main.clone(), ..DbFiles::default() }).await?;
            raw_copy(&pg.store, &actor).await?
        };
        let ts = TestStore::new(Backend::Rivet).await;
        let actor = ts.actor("large");
        write_v1(&*ts.store, &actor, &DbFiles { main: main.clone(), ..DbFiles::default() }).await?;
        let migrator = Migrator::new(ts.store(), Arc::new(SystemClock), MigrateConfig::default());
        let req = Request { actor, campaign: "bench".into(), recovery: None, attempts: 1, ticket: None };
        let started = Instant::now();
        let outcome = migrator.migrate(&req).await?;
        let secs = started.elapsed().as_secs_f64();
        ensure!(outcome.audit.outcome == OutcomeKind::Migrated, "the {mib} MiB actor was not migrated");
        report.add(
            "rivet",
            &format!("large {mib} MiB: migrated MiB/s"),
            main.len() as f64 / 1048576.0 / secs,
            "MiB/s",
            "raw store copy (pg, ferry layout)",
            raw,
            Some(0.6),
        );
        report.notes.push(format!(
            "rivet {mib} MiB: {secs:.2} s, of which finalize {:.2} s (its snapshot re-reads the v1 range for the digest check)",
            outcome.timings.finalize.as_secs_f64()
        ));
    }
    Ok(())
}
