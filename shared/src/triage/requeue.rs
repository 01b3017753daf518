//! `dlq requeue`: moving dead letters back to work, on the broker (fleet) or in this process
//! (embedded).
//!
//! Invariant (fleet): ticket first, then publish. Each batch of dead letters becomes tickets in
//! one transaction that checks every record it removes; only then are their jobs published
//! with the tickets' tokens and confirmed. A command killed between the two leaves tickets
//! whose jobs may or may not be on the broker: the next requeue that selects them publishes
//! them again, and the worker runs only the copy whose token is current (`ticket::claim`).
//! So an actor is never in neither place, and a requeue runs at most once.

use std::collections::BTreeMap;
use std::sync::Arc;

use lapin::Channel;
use lapin::types::FieldTable;

use super::index::{self, LetterId, Stored};
use super::ticket::{self, Ticket};
use super::{Filter, MOVE_BATCH, Source, TriageError, check_requeue, page_stored};
use crate::actor::ActorId;
use crate::budget::MemoryBudget;
use crate::clock::{Clock, SystemClock};
use crate::jobs::{Disposition, Job, JobRunner, RetryPolicy};
use crate::migrate::{MigrateConfig, Migrator, OutcomeKind};
use crate::queue::Topology;
use crate::queue::amqp;
use crate::queue::topology::WORK_KEY;
use crate::recovery::Recovery;
use crate::store::{DynStore, KeyRange, StoreError, Txn, for_each_row};

/// What a requeue did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Requeued {
    /// Actors given a new job (broker) or re-run (embedded).
    pub actors: Vec<String>,
    /// Dead letters moved out of the index (one per actor: duplicates were collapsed when
    /// they were written).
    pub dead_letters_removed: u64,
    /// Requeues left by an earlier, interrupted command, published again (their workers run
    /// one copy).
    pub republished: Vec<String>,
    /// Embedded re-runs: the outcome of each.
    pub outcomes: BTreeMap<String, String>,
    pub skipped: Vec<String>,
}

/// Moves the selected dead letters back to work with `recovery`.
pub async fn requeue(
    store: &DynStore,
    source: &Source,
    filter: &Filter,
    recovery: Option<Recovery>,
    force: bool,
) -> Result<Requeued, TriageError> {
    match source {
        Source::Broker { amqp_url, topology, connect_timeout } => {
            let conn = amqp::connect_within(amqp_url, "ferry-producer dlq", *connect_timeout).await?;
            let ch = amqp::confirm_channel(&conn).await?;
            // Passive: requeue declares nothing.
            topology.check_exists(&ch).await?;
            let result = Broker { store, ch: &ch, topology }.requeue(filter, recovery, force).await;
            let _ = conn.close(200, "requeue done".into()).await;
            result
        }
        Source::Embedded => requeue_embedded(store, filter, recovery, force).await,
    }
}

struct Broker<'a> {
    store: &'a DynStore,
    ch: &'a Channel,
    topology: &'a Topology,
}

impl Broker<'_> {
    async fn requeue(&self, filter: &Filter, recovery: Option<Recovery>, force: bool) -> Result<Requeued, TriageError> {
        let mut out = Requeued::default();
        let pending = self.pending(filter).await?;
        for chunk in pending.chunks(MOVE_BATCH) {
            self.publish(chunk).await?;
            out.republished.extend(chunk.iter().map(|(a, _)| a.to_string()));
        }
        let mut after: Option<String> = None;
        loop {
            let page = page_stored(self.store, filter, MOVE_BATCH, after.as_deref()).await?;
            let mut batch = Vec::new();
            for s in page.stored {
                match check_requeue(&s.letter, recovery, force) {
                    Ok(actor) => batch.push((actor, s)),
                    Err(why) => out.skipped.push(why),
                }
            }
            let tickets = self.to_tickets(batch, recovery, &mut out).await?;
            self.publish(&tickets).await?;
            for (actor, _) in &tickets {
                out.actors.push(actor.to_string());
            }
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// Tickets of an earlier requeue matching `filter`: their jobs may never have been
    /// published.
    async fn pending(&self, filter: &Filter) -> Result<Vec<(ActorId, Ticket)>, StoreError> {
        let mut out = Vec::new();
        for_each_row(&**self.store, &KeyRange::prefix(ticket::REQUEUE_PREFIX), 1000, |key, raw| {
            let actor = ActorId::from_bytes(&key[ticket::REQUEUE_PREFIX.len()..]);
            if let (Ok(actor), Some(t)) = (actor, Ticket::decode(&raw))
                && filter.matches(&t.dead_letter)
            {
                out.push((actor, t));
            }
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Moves each dead letter of `batch`, as it was read, to a ticket: the whole batch in one
    /// transaction, or, when one of them changed since (the transaction checks every record),
    /// each alone (the changed ones are skipped).
    async fn to_tickets(
        &self,
        batch: Vec<(ActorId, Stored)>,
        recovery: Option<Recovery>,
        out: &mut Requeued,
    ) -> Result<Vec<(ActorId, Ticket)>, StoreError> {
        let now = SystemClock.now_ms();
        let tickets: Vec<(ActorId, Stored, Ticket)> = batch
            .into_iter()
            .map(|(actor, s)| {
                let t = Ticket::new(s.letter.clone(), recovery, now);
                (actor, s, t)
            })
            .collect();
        let txn = |items: &[(ActorId, Stored, Ticket)]| {
            let mut txn = Txn::new();
            for (actor, s, t) in items {
                index::remove(&mut txn, &s.raw, &s.letter);
                txn.set(ticket::key(actor), t.encode());
            }
            txn
        };
        let moved = match self.store.commit(txn(&tickets)).await {
            Ok(()) => tickets,
            Err(StoreError::Conflict { .. }) => {
                let mut moved = Vec::new();
                for item in tickets {
                    match self.store.commit(txn(std::slice::from_ref(&item))).await {
                        Ok(()) => moved.push(item),
                        Err(StoreError::Conflict { .. }) => {
                            out.skipped.push(format!("{}: its dead letter changed while requeuing; run again", item.0))
                        }
                        Err(e) => return Err(e),
                    }
                }
                moved
            }
            Err(e) => return Err(e),
        };
        out.dead_letters_removed += moved.len() as u64;
        Ok(moved.into_iter().map(|(a, _, t)| (a, t)).collect())
    }

    /// Publishes the jobs of `tickets`, confirms pipelined, each carrying its token.
    async fn publish(&self, tickets: &[(ActorId, Ticket)]) -> Result<(), TriageError> {
        let exchange = self.topology.jobs_exchange();
        let publishes = tickets.iter().map(|(actor, t)| {
            let job = Job::new(&t.campaign, actor.clone(), SystemClock.now_ms(), t.recovery);
            let mut headers = FieldTable::default();
            headers.insert(ticket::TOKEN_HEADER.into(), amqp::long_string(&t.token));
            let props = amqp::json_properties(&job.message_id(), headers);
            let exchange = exchange.clone();
            async move { amqp::publish_confirmed(self.ch, &exchange, WORK_KEY, &job.encode(), props).await }
        });
        futures::future::try_join_all(publishes).await?;
        Ok(())
    }
}

/// Re-runs the selected dead letters in this process; a letter whose job succeeds leaves the
/// index (unless it was replaced meanwhile), one that fails again is rewritten by the run.
async fn requeue_embedded(
    store: &DynStore,
    filter: &Filter,
    recovery: Option<Recovery>,
    force: bool,
) -> Result<Requeued, TriageError> {
    let runner = JobRunner {
        migrator: Migrator::new(
            store.clone(),
            Arc::new(SystemClock),
            MigrateConfig { worker_id: crate::telemetry::default_worker_id(), ..MigrateConfig::default() },
        ),
        retry: RetryPolicy { max_attempts: 3, ..RetryPolicy::default() },
        budget: MemoryBudget::new(1 << 30),
        gate: None,
    };
    let mut out = Requeued::default();
    let mut after: Option<String> = None;
    loop {
        let page = page_stored(store, filter, MOVE_BATCH, after.as_deref()).await?;
        for s in page.stored {
            match check_requeue(&s.letter, recovery, force) {
                Ok(actor) => {
                    let outcome = rerun(store, &runner, &s, actor.clone(), recovery, &mut out).await?;
                    out.outcomes.insert(actor.to_string(), outcome);
                    out.actors.push(actor.to_string());
                }
                Err(why) => out.skipped.push(why),
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(out),
        }
    }
}

async fn rerun(
    store: &DynStore,
    runner: &JobRunner,
    before: &Stored,
    actor: ActorId,
    recovery: Option<Recovery>,
    out: &mut Requeued,
) -> Result<String, StoreError> {
    let job = Job::new(&before.letter.campaign, actor, SystemClock.now_ms(), recovery);
    let mut attempts = 1;
    loop {
        match runner.run_job(&job, attempts).await {
            Disposition::Retry { delay, .. } if attempts < runner.retry.max_attempts => {
                tokio::time::sleep(delay.min(std::time::Duration::from_secs(2))).await;
                attempts += 1;
            }
            Disposition::Retry { error, .. } => return Ok(format!("still failing: {error}")),
            Disposition::Ack(o) => {
                // The job succeeded: its old dead letter goes, if nobody replaced it. A
                // migration (or the skip of a migrated actor) took it out already
                // (`index::clear_on_migration`).
                let removed = if matches!(o.kind(), OutcomeKind::Migrated | OutcomeKind::SkippedAlreadyMigrated) {
                    let key = LetterId::of(&before.letter).record_key();
                    // Unknown (the store failing now) is not counted.
                    matches!(store.get(&key).await, Ok(None))
                } else {
                    let mut txn = Txn::new();
                    index::remove(&mut txn, &before.raw, &before.letter);
                    store.commit(txn).await.is_ok()
                };
                if removed {
                    out.dead_letters_removed += 1;
                }
                return Ok(o.kind().as_str().to_string());
            }
            Disposition::DeadLetter(again) => return Ok(format!("dead_lettered: {}", again.reason)),
            Disposition::Superseded => return Ok("superseded".into()),
        }
    }
}
