//! The job runner's side of a requeue (`triage::ticket`) and of the delivery limit, on every
//! store backend and layout: a ticketed job runs only while its ticket is current, its outcome clears
//! the ticket, a job handed back to its delivery limit is dead-lettered into the index, and a job
//! that fails after its actor's migration settled is acked as the skip a new run records, its
//! migration's audit kept, and a migration takes its actor's dead letter out of the index, also
//! one written while it commits.

#[macro_use]
mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Context, Result};
use async_trait::async_trait;
use ferry::budget::MemoryBudget;
use ferry::clock::SystemClock;
use ferry::jobs::{DeadLetter, Disposition, Job, JobRunner, RetryPolicy};
use ferry::migrate::AuditRecord;
use ferry::migrate::lease::Lease;
use ferry::migrate::{MigrateConfig, Migrator, OutcomeKind};
use ferry::store::{DynStore, KeyRange, KeyValue, Mutation, Read, ReadResult, Store, StoreError, Txn};
use ferry::synth::sqlite::{DbSpec, database, hot_journal};
use ferry::synth::{DbFiles, write_v1};
use ferry::testing::{Backend, TestStore};
use ferry::triage::index::{self, LetterId};
use ferry::triage::ticket::{self, Ticket};
use ferry::v2::{DBHead, Origin};
use ferry::{ActorId, DeadLetterReason, keys};

/// The test's store with one fault or race: `batched_reads_down` fails every batched read of a
/// migration (one with a range scan) as an outage would (run against an actor migrated
/// already, its last attempt fails transiently on a settled actor, as a job does whose commit
/// landed though its connection was lost); `twin`, if set, is committed just before the first commit asked for that writes an
/// audit record (another copy's finalize landing between a dead letter's read of the head and
/// its commit, or another copy's dead letter landing just before a finalize); `after_claim`, if
/// set, runs once right after the first read of a requeue ticket (another copy of the job
/// running to its outcome after this one claimed the ticket).
struct Faulty {
    inner: DynStore,
    batched_reads_down: bool,
    twin: tokio::sync::Mutex<Option<Txn>>,
    after_claim: tokio::sync::Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>,
}

impl Faulty {
    fn reads_down(inner: &DynStore) -> DynStore {
        Arc::new(Faulty { batched_reads_down: true, ..Faulty::transparent(inner) })
    }

    fn twin_first(inner: &DynStore, twin: Txn) -> DynStore {
        Arc::new(Faulty { twin: tokio::sync::Mutex::new(Some(twin)), ..Faulty::transparent(inner) })
    }

    fn other_copy_after_claim(inner: &DynStore, other: impl Future<Output = ()> + Send + 'static) -> DynStore {
        Arc::new(Faulty { after_claim: tokio::sync::Mutex::new(Some(Box::pin(other))), ..Faulty::transparent(inner) })
    }

    fn transparent(inner: &DynStore) -> Faulty {
        Faulty {
            inner: inner.clone(),
            batched_reads_down: false,
            twin: Default::default(),
            after_claim: Default::default(),
        }
    }
}

#[async_trait]
impl Store for Faulty {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self.inner.get(key).await?;
        if key.starts_with(ticket::REQUEUE_PREFIX) {
            let other = self.after_claim.lock().await.take();
            if let Some(other) = other {
                other.await;
            }
        }
        Ok(value)
    }
    fn layout(&self) -> ferry::layout::Layout {
        self.inner.layout()
    }
    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.scan(range, limit).await
    }
    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.first_key(range).await
    }
    async fn read_many(&self, reads: &[Read]) -> Result<Vec<ReadResult>, StoreError> {
        // A migration's batched read (it scans the actor's SQLite range); a skip's point reads
        // get through.
        if self.batched_reads_down && reads.iter().any(|r| matches!(r, Read::Scan { .. })) {
            return Err(StoreError::Unavailable { backend: "test", message: "connection lost".into() });
        }
        self.inner.read_many(reads).await
    }
    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        let writes_audit =
            txn.mutations.iter().any(|m| matches!(m, Mutation::Set { key, .. } if key.starts_with(keys::AUDIT_PREFIX)));
        if writes_audit && let Some(twin) = self.twin.lock().await.take() {
            self.inner.commit(twin).await?;
        }
        self.inner.commit(txn).await
    }
    async fn commit_many(&self, txns: Vec<Txn>) -> Vec<Result<(), StoreError>> {
        self.inner.commit_many(txns).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn runner(store: &DynStore) -> JobRunner {
    runner_with(store, MigrateConfig::default())
}

fn runner_with(store: &DynStore, cfg: MigrateConfig) -> JobRunner {
    JobRunner {
        migrator: Migrator::new(
            store.clone(),
            Arc::new(SystemClock),
            MigrateConfig { worker_id: "test-worker".into(), ..cfg },
        ),
        retry: RetryPolicy { max_attempts: 3, ..RetryPolicy::default() },
        budget: MemoryBudget::new(1 << 30),
        gate: None,
    }
}

fn letter(actor: &ActorId, reason: DeadLetterReason) -> DeadLetter {
    DeadLetter {
        actor_id: actor.to_string(),
        campaign: "c1".into(),
        reason,
        phase: "validate".into(),
        error: "an earlier run".into(),
        attempts: 1,
        worker: "w".into(),
        at_ms: 1,
        v1_files: None,
        recovery: None,
        message: String::new(),
    }
}

/// Plants `files` for `actor` and a ticket for it, as `dlq requeue` leaves one.
async fn requeued(store: &DynStore, actor: &ActorId, files: &DbFiles, reason: DeadLetterReason) -> Result<Ticket> {
    write_v1(&**store, actor, files).await?;
    let t = Ticket::new(letter(actor, reason), None, 1);
    let mut txn = Txn::new();
    txn.set(ticket::key(actor), t.encode());
    store.commit(txn).await?;
    Ok(t)
}

fn body(actor: &ActorId) -> Vec<u8> {
    Job::new("c1", actor.clone(), 1, None).encode()
}

fn plain() -> Result<DbFiles> {
    Ok(DbFiles { main: database(&DbSpec::small(7)).map_err(anyhow::Error::msg)?, ..DbFiles::default() })
}

async fn stale_copy_of_a_requeue_is_acked_without_running_and_changes_nothing(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("stale-1");
    let t = requeued(&store, &actor, &plain()?, DeadLetterReason::RetriesExhausted).await?;
    let d = runner(&store).run_delivery_in_current_span(&body(&actor), 1, Some("another-token")).await;
    assert!(matches!(d, Disposition::Superseded), "{d:?}");
    assert!(store.get(&keys::audit(&actor)).await?.is_none(), "the stale copy ran");
    assert_eq!(store.get(&ticket::key(&actor)).await?, Some(t.encode()), "the ticket is the current one's");
    Ok(())
}

async fn current_requeue_runs_and_its_outcome_clears_the_ticket(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("current-1");
    let t = requeued(&store, &actor, &plain()?, DeadLetterReason::RetriesExhausted).await?;
    let d = runner(&store).run_delivery_in_current_span(&body(&actor), 1, Some(&t.token)).await;
    let Disposition::Ack(outcome) = d else { anyhow::bail!("not acked: {d:?}") };
    assert_eq!(outcome.kind(), OutcomeKind::Migrated);
    assert!(store.get(&ticket::key(&actor)).await?.is_none(), "the ticket outlived its job");
    // A second copy of the same requeue now finds no ticket: it does not run again.
    let again = runner(&store).run_delivery_in_current_span(&body(&actor), 1, Some(&t.token)).await;
    assert!(matches!(again, Disposition::Superseded), "{again:?}");
    Ok(())
}

/// Two copies of one requeue of `actor` delivered at once: this one claims the ticket, then
/// the other runs to its outcome (clearing the ticket) before this one reads the actor. The
/// other's disposition, then this one's.
async fn twin_copies(store: &DynStore, actor: &ActorId, t: &Ticket) -> Result<(Disposition, Disposition)> {
    let (inner, other_actor, token) = (store.clone(), actor.clone(), t.token.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let other = async move {
        let d = runner(&inner).run_delivery_in_current_span(&body(&other_actor), 1, Some(&token)).await;
        let _ = tx.send(d);
    };
    let hooked = Faulty::other_copy_after_claim(store, other);
    let d = runner(&hooked).run_delivery_in_current_span(&body(actor), 1, Some(&t.token)).await;
    Ok((rx.await.context("the other copy did not run")?, d))
}

async fn a_copy_that_claimed_its_ticket_before_the_other_copy_migrated_is_acked_unrun_and_keeps_the_migration(
    backend: Backend,
) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("twins-1");
    let t = requeued(&store, &actor, &plain()?, DeadLetterReason::RetriesExhausted).await?;
    let (other, d) = twin_copies(&store, &actor, &t).await?;
    let Disposition::Ack(other) = other else { anyhow::bail!("the other copy did not migrate: {other:?}") };
    assert_eq!(other.kind(), OutcomeKind::Migrated);
    assert!(matches!(d, Disposition::Superseded), "a second outcome: {d:?}");
    assert_eq!(audit(&store, &actor).await?, other.audit, "the other copy's migration is the actor's outcome");
    // A redelivery finds the ticket gone: acked without running, the audit as it was.
    let again = runner(&store).run_delivery_in_current_span(&body(&actor), 2, Some(&t.token)).await;
    assert!(matches!(again, Disposition::Superseded), "{again:?}");
    assert_eq!(audit(&store, &actor).await?, other.audit);
    Ok(())
}

async fn a_copy_that_claimed_its_ticket_before_the_other_copy_dead_lettered_is_acked_and_lists_nothing_twice(
    backend: Backend,
) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("twins-2");
    let files = hot_journal(&DbSpec::small(8), 20).map_err(anyhow::Error::msg)?;
    let t = requeued(&store, &actor, &files, DeadLetterReason::JournalSidecar).await?;
    let (other, d) = twin_copies(&store, &actor, &t).await?;
    let Disposition::DeadLetter(listed) = other else { anyhow::bail!("the other copy was not rejected: {other:?}") };
    // This copy is rejected too, and finds the other's letter recorded when it records its own.
    assert!(matches!(d, Disposition::Superseded), "a second dead letter: {d:?}");
    let kept = index::get(&*store, &LetterId::Actor(actor.clone())).await?.context("no index record")?;
    assert_eq!(kept.letter, listed, "the other copy's letter is the one listed");
    assert_eq!(audit(&store, &actor).await?.outcome, OutcomeKind::DeadLettered);
    assert!(store.get(&ticket::key(&actor)).await?.is_none());
    Ok(())
}

async fn requeue_dead_lettered_again_is_listed_and_its_ticket_cleared_together(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("journal-1");
    let files = hot_journal(&DbSpec::small(8), 20).map_err(anyhow::Error::msg)?;
    let t = requeued(&store, &actor, &files, DeadLetterReason::JournalSidecar).await?;
    let d = runner(&store).run_delivery_in_current_span(&body(&actor), 1, Some(&t.token)).await;
    let Disposition::DeadLetter(dead) = d else { anyhow::bail!("not dead-lettered: {d:?}") };
    assert_eq!(dead.reason, DeadLetterReason::JournalSidecar);
    let kept = index::get(&*store, &LetterId::Actor(actor.clone())).await?.context("no index record")?;
    assert_eq!(kept.letter, dead);
    assert!(store.get(&ticket::key(&actor)).await?.is_none(), "listed and requeued at once");
    Ok(())
}

async fn delivery_limit_is_dead_lettered_into_the_index_without_running(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("limit-1");
    write_v1(&*store, &actor, &plain()?).await?;
    let d = runner(&store).delivery_limit_reached(&body(&actor), 11, 10, None).await;
    let Disposition::DeadLetter(dead) = d else { anyhow::bail!("not dead-lettered: {d:?}") };
    assert_eq!(dead.reason, DeadLetterReason::DeliveryLimit);
    assert!(index::get(&*store, &LetterId::Actor(actor.clone())).await?.is_some(), "not in the index");
    assert!(store.get(&ferry::v2::keys::meta(&actor)).await?.is_none(), "the job ran");
    Ok(())
}

/// Migrates `actor` through the runner; the migration's audit record.
async fn migrated(store: &DynStore, actor: &ActorId) -> Result<AuditRecord> {
    write_v1(&**store, actor, &plain()?).await?;
    let d = runner(store).run(&body(actor), 1).await;
    let Disposition::Ack(outcome) = d else { anyhow::bail!("not migrated: {d:?}") };
    assert_eq!(outcome.kind(), OutcomeKind::Migrated);
    Ok(outcome.audit)
}

async fn audit(store: &DynStore, actor: &ActorId) -> Result<AuditRecord> {
    let raw = store.get(&keys::audit(actor)).await?.context("no audit record")?;
    AuditRecord::decode(&raw).context("audit does not decode")
}

/// The skip a settled actor's failed job ends in: acked, the migration's fields kept, nothing
/// in the triage index.
async fn assert_acked_as_already_migrated(
    store: &DynStore,
    actor: &ActorId,
    d: Disposition,
    first: &AuditRecord,
) -> Result<()> {
    let Disposition::Ack(outcome) = d else { anyhow::bail!("not acked: {d:?}") };
    assert_eq!(outcome.kind(), OutcomeKind::SkippedAlreadyMigrated);
    let now = audit(store, actor).await?;
    assert_eq!(now.outcome, OutcomeKind::SkippedAlreadyMigrated);
    assert!(first.checksum.is_some() && first.head_txid.is_some());
    assert_eq!(
        (now.checksum.as_ref(), now.generation, now.pages, now.head_txid),
        (first.checksum.as_ref(), first.generation, first.pages, first.head_txid)
    );
    assert!(index::get(&**store, &LetterId::Actor(actor.clone())).await?.is_none(), "dead-lettered");
    Ok(())
}

async fn delivery_limit_of_an_actor_migrated_meanwhile_is_acked_as_already_migrated_and_keeps_its_audit(
    backend: Backend,
) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("limit-settled");
    let first = migrated(&store, &actor).await?;
    let d = runner(&store).delivery_limit_reached(&body(&actor), 11, 10, None).await;
    assert_acked_as_already_migrated(&store, &actor, d, &first).await
}

async fn retries_exhausted_after_the_commit_landed_is_acked_as_already_migrated_and_keeps_its_audit(
    backend: Backend,
) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("exhausted-settled");
    let first = migrated(&store, &actor).await?;
    let flaky = Faulty::reads_down(&store);
    let r = runner(&flaky);
    // The last attempt's read fails as an outage: its fate would be retries_exhausted.
    let d = r.run(&body(&actor), r.retry.max_attempts).await;
    assert_acked_as_already_migrated(&store, &actor, d, &first).await
}

async fn delivery_limit_of_a_requeued_actor_migrated_meanwhile_whose_v1_is_gone_is_acked_as_already_migrated_and_clears_its_ticket(
    backend: Backend,
) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("limit-ticket");
    let first = migrated(&store, &actor).await?;
    let mut txn = Txn::new();
    txn.clear_range(ferry::v1::keys::sqlite_range(&actor));
    let t = Ticket::new(letter(&actor, DeadLetterReason::RetriesExhausted), None, 1);
    txn.set(ticket::key(&actor), t.encode());
    store.commit(txn).await?;
    // The skip comes from the head: no v1 read, so not skipped_no_v1 over the migration's audit.
    let d = runner(&store).delivery_limit_reached(&body(&actor), 11, 10, Some(&t.token)).await;
    assert_acked_as_already_migrated(&store, &actor, d, &first).await?;
    assert!(store.get(&ticket::key(&actor)).await?.is_none(), "the ticket outlived its job");
    Ok(())
}

async fn delivery_limit_of_a_native_actor_is_acked_as_skipped_native(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("limit-native");
    write_v1(&*store, &actor, &plain()?).await?;
    let native = DBHead { origin: Origin::Native, ..DBHead::staging(3, 9, 1) };
    let mut txn = Txn::new();
    txn.set(ferry::v2::keys::meta(&actor), native.encode());
    store.commit(txn).await?;
    let d = runner(&store).delivery_limit_reached(&body(&actor), 11, 10, None).await;
    let Disposition::Ack(outcome) = d else { anyhow::bail!("not acked: {d:?}") };
    assert_eq!(outcome.kind(), OutcomeKind::SkippedNativeV2);
    assert_eq!(audit(&store, &actor).await?.outcome, OutcomeKind::SkippedNativeV2);
    assert!(index::get(&*store, &LetterId::Actor(actor.clone())).await?.is_none(), "dead-lettered");
    Ok(())
}

async fn a_twin_finalize_between_the_letters_head_read_and_its_commit_fails_the_letter_not_the_migration(
    backend: Backend,
) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("twin");
    write_v1(&*store, &actor, &plain()?).await?;
    // A twin copy is staging: its head and its live lease.
    let staging = DBHead::staging(1, 1, 1);
    let far = ferry::clock::Clock::now_ms(&SystemClock) + 3_600_000;
    let lease = Lease { holder: "twin#1".into(), generation: 1, expires_at_ms: far };
    let mut txn = Txn::new();
    txn.set(ferry::v2::keys::meta(&actor), staging.encode());
    txn.set(keys::lease(&actor), lease.encode());
    store.commit(txn).await?;
    // Its finalize lands after this copy's letter read the staging head.
    let migrated = DBHead { origin: Origin::MigratedFromV1, head_txid: 1, next_txid: 2, ..staging };
    let mut twin = Txn::new();
    twin.set(ferry::v2::keys::meta(&actor), migrated.encode());
    twin.clear(keys::lease(&actor));
    let hooked = Faulty::twin_first(&store, twin);
    let r = runner(&hooked);
    // The last attempt finds the twin in progress: its fate would be retries_exhausted.
    let d = r.run(&body(&actor), r.retry.max_attempts).await;
    assert!(matches!(d, Disposition::Retry { .. }), "the letter raced the finalize: {d:?}");
    assert!(store.get(&keys::audit(&actor)).await?.is_none(), "a letter's audit was written");
    assert!(index::get(&*store, &LetterId::Actor(actor.clone())).await?.is_none(), "dead-lettered");
    // The next delivery finds the actor migrated and skips it.
    let again = runner(&store).run(&body(&actor), r.retry.max_attempts + 1).await;
    let Disposition::Ack(outcome) = again else { anyhow::bail!("not acked: {again:?}") };
    assert_eq!(outcome.kind(), OutcomeKind::SkippedAlreadyMigrated);
    Ok(())
}

async fn retries_exhausted_of_an_unsettled_actor_is_dead_lettered(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("exhausted-open");
    write_v1(&*store, &actor, &plain()?).await?;
    let flaky = Faulty::reads_down(&store);
    let r = runner(&flaky);
    let d = r.run(&body(&actor), r.retry.max_attempts).await;
    let Disposition::DeadLetter(dead) = d else { anyhow::bail!("not dead-lettered: {d:?}") };
    assert_eq!(dead.reason, DeadLetterReason::RetriesExhausted);
    assert_eq!(audit(&store, &actor).await?.outcome, OutcomeKind::DeadLettered);
    assert!(index::get(&*store, &LetterId::Actor(actor.clone())).await?.is_some(), "not in the index");
    Ok(())
}

async fn bad_message_is_indexed_once_however_often_it_is_delivered(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let r = runner(&store);
    for attempt in 1..=3 {
        let d = r.run_delivery_in_current_span(b"{\"not\": \"a job\"}", attempt, None).await;
        assert!(matches!(&d, Disposition::DeadLetter(x) if x.reason == DeadLetterReason::BadMessage), "{d:?}");
    }
    let summary = index::summary(&*store).await?;
    assert_eq!(summary.len(), 1, "{summary:?}");
    assert_eq!((summary[0].reason.as_str(), summary[0].count), ("bad_message", 1));
    Ok(())
}

/// How a migration commits: in one shot (a small actor), or begun, staged and finalized.
#[derive(Clone, Copy, Debug)]
enum Path {
    OneShot,
    Staged,
}

impl Path {
    fn config(self) -> MigrateConfig {
        match self {
            Path::OneShot => MigrateConfig::default(),
            Path::Staged => MigrateConfig { one_shot_max_pages: 0, ..MigrateConfig::default() },
        }
    }
}

/// `letter` as the transaction that lists it in the index (nothing listed before).
fn listing(letter: &DeadLetter) -> Txn {
    let mut txn = Txn::new();
    index::put(&mut txn, None, letter);
    txn
}

/// Runs `actor`'s job through `store` on `path`: it must end migrated, with no dead letter
/// of the actor left in the index, nor in its summary.
async fn assert_migrated_and_unlisted(store: &DynStore, check: &DynStore, actor: &ActorId, path: Path) -> Result<()> {
    let d = runner_with(store, path.config()).run(&body(actor), 1).await;
    let Disposition::Ack(outcome) = d else { anyhow::bail!("not migrated ({path:?}): {d:?}") };
    assert_eq!(outcome.kind(), OutcomeKind::Migrated, "{path:?}");
    assert_eq!(audit(check, actor).await?.outcome, OutcomeKind::Migrated, "{path:?}");
    assert!(index::get(&**check, &LetterId::Actor(actor.clone())).await?.is_none(), "still listed ({path:?})");
    let summary = index::summary(&**check).await?;
    assert!(summary.is_empty(), "the index still counts it ({path:?}): {summary:?}");
    Ok(())
}

async fn a_migration_takes_its_actors_dead_letter_out_of_the_index(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    for path in [Path::OneShot, Path::Staged] {
        let actor = ts.actor(&format!("listed-{path:?}"));
        write_v1(&*store, &actor, &plain()?).await?;
        // An earlier campaign's letter, the v1 file fixed since.
        store.commit(listing(&letter(&actor, DeadLetterReason::IntegrityCheckFailed))).await?;
        assert_migrated_and_unlisted(&store, &store, &actor, path).await?;
    }
    Ok(())
}

async fn the_skip_of_a_migrated_actor_takes_its_dead_letter_out_of_the_index(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("listed-migrated");
    let migration = migrated(&store, &actor).await?;
    // Listed beside its migration, as an older ferry could leave it.
    store.commit(listing(&letter(&actor, DeadLetterReason::RetriesExhausted))).await?;
    let d = runner(&store).run(&body(&actor), 1).await;
    let Disposition::Ack(outcome) = d else { anyhow::bail!("not acked: {d:?}") };
    assert_eq!(outcome.kind(), OutcomeKind::SkippedAlreadyMigrated);
    assert_eq!(audit(&store, &actor).await?.checksum, migration.checksum, "the migration's fields are kept");
    assert!(index::get(&*store, &LetterId::Actor(actor.clone())).await?.is_none(), "still listed");
    assert!(index::summary(&*store).await?.is_empty(), "the index still counts it");
    Ok(())
}

async fn the_skip_of_a_native_actor_takes_its_dead_letter_out_of_the_index(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    let actor = ts.actor("listed-native");
    write_v1(&*store, &actor, &plain()?).await?;
    // Listed by an earlier job; the actor was reset to a native v2 database since.
    store.commit(listing(&letter(&actor, DeadLetterReason::JournalSidecar))).await?;
    let mut txn = Txn::new();
    txn.set(ferry::v2::keys::meta(&actor), DBHead { origin: Origin::Native, ..DBHead::staging(2, 5, 1) }.encode());
    store.commit(txn).await?;
    let d = runner(&store).run(&body(&actor), 1).await;
    let Disposition::Ack(outcome) = d else { anyhow::bail!("not acked: {d:?}") };
    assert_eq!(outcome.kind(), OutcomeKind::SkippedNativeV2);
    assert_eq!(audit(&store, &actor).await?.outcome, OutcomeKind::SkippedNativeV2);
    assert!(index::get(&*store, &LetterId::Actor(actor.clone())).await?.is_none(), "still listed");
    assert!(index::summary(&*store).await?.is_empty(), "the index still counts it");
    Ok(())
}

async fn a_dead_letter_listed_while_the_migration_commits_is_taken_out_by_its_finalize(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let store = ts.store();
    for path in [Path::OneShot, Path::Staged] {
        let actor = ts.actor(&format!("raced-{path:?}"));
        write_v1(&*store, &actor, &plain()?).await?;
        // A twin's last attempt gives up (in progress elsewhere: this migration) and lists
        // the actor after the migration read its dead letter, before its finalize commits.
        let hooked = Faulty::twin_first(&store, listing(&letter(&actor, DeadLetterReason::RetriesExhausted)));
        assert_migrated_and_unlisted(&hooked, &store, &actor, path).await?;
    }
    Ok(())
}

per_backend!(
    backends: [sqlite: Sqlite, postgres: Postgres, rivet: Rivet],
    tests: [
        stale_copy_of_a_requeue_is_acked_without_running_and_changes_nothing,
        current_requeue_runs_and_its_outcome_clears_the_ticket,
        a_copy_that_claimed_its_ticket_before_the_other_copy_migrated_is_acked_unrun_and_keeps_the_migration,
        a_copy_that_claimed_its_ticket_before_the_other_copy_dead_lettered_is_acked_and_lists_nothing_twice,
        requeue_dead_lettered_again_is_listed_and_its_ticket_cleared_together,
        delivery_limit_is_dead_lettered_into_the_index_without_running,
        bad_message_is_indexed_once_however_often_it_is_delivered,
        delivery_limit_of_an_actor_migrated_meanwhile_is_acked_as_already_migrated_and_keeps_its_audit,
        retries_exhausted_after_the_commit_landed_is_acked_as_already_migrated_and_keeps_its_audit,
        retries_exhausted_of_an_unsettled_actor_is_dead_lettered,
        delivery_limit_of_a_requeued_actor_migrated_meanwhile_whose_v1_is_gone_is_acked_as_already_migrated_and_clears_its_ticket,
        delivery_limit_of_a_native_actor_is_acked_as_skipped_native,
        a_twin_finalize_between_the_letters_head_read_and_its_commit_fails_the_letter_not_the_migration,
        a_migration_takes_its_actors_dead_letter_out_of_the_index,
        the_skip_of_a_migrated_actor_takes_its_dead_letter_out_of_the_index,
        the_skip_of_a_native_actor_takes_its_dead_letter_out_of_the_index,
        a_dead_letter_listed_while_the_migration_commits_is_taken_out_by_its_finalize,
    ],
);
