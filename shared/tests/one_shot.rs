//! The single-transaction path small databases take by default: begin, stage and finalize
//! collapse into one checked transaction with the same checks and the same end state. Run on
//! every store backend and layout (ids from the fixture, valid for its layout).

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use ferry::ActorId;
use ferry::budget::MemoryBudget;
use ferry::clock::ManualClock;
use ferry::keys;
use ferry::migrate::lease::Lease;
use ferry::migrate::{Cause, Fate, MigrateConfig, Migrator, OutcomeKind, Request};
use ferry::store::{DynStore, KeyRange, KeyValue, Store, StoreError, Txn};
use ferry::synth::sqlite::{DbSpec, database, hot_journal};
use ferry::synth::{DbFiles, write_v1};
use ferry::testing::{Backend, TestStore};
use ferry::v1::FileTag;
use ferry::v1::keys::chunk_key;
use ferry::v2::{DBHead, Origin, read_v2};

const START_MS: i64 = 1_763_900_000_000;

/// Counts commits, and runs a one-time hook before the first one.
struct Hooked {
    inner: DynStore,
    commits: AtomicUsize,
    before_first_commit: tokio::sync::Mutex<Option<Box<dyn FnOnce() -> Txn + Send>>>,
}

#[async_trait]
impl Store for Hooked {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    fn layout(&self) -> ferry::layout::Layout {
        self.inner.layout()
    }
    async fn v1_actors(&self, range: &KeyRange, limit: usize) -> Result<ferry::scan::ActorBatch, StoreError> {
        self.inner.v1_actors(range, limit).await
    }
    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.scan(range, limit).await
    }
    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.first_key(range).await
    }
    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        if let Some(hook) = self.before_first_commit.lock().await.take() {
            self.inner.commit(hook()).await?;
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit(txn).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn hooked(inner: DynStore) -> Arc<Hooked> {
    Arc::new(Hooked { inner, commits: AtomicUsize::new(0), before_first_commit: tokio::sync::Mutex::new(None) })
}

fn migrator(store: DynStore, clock: Arc<ManualClock>, worker: &str) -> Migrator {
    Migrator::new(store, clock, MigrateConfig { worker_id: worker.into(), ..MigrateConfig::default() })
}

fn req(actor: &ActorId) -> Request {
    Request { actor: actor.clone(), campaign: "one-shot".into(), recovery: None, attempts: 1, ticket: None }
}

async fn seeded(backend: Backend, id: &str) -> (TestStore, ActorId, Vec<u8>) {
    let ts = TestStore::new(backend).await;
    let actor = ts.actor(id);
    let main = database(&DbSpec::small(7)).unwrap();
    write_v1(&*ts.store, &actor, &DbFiles { main: main.clone(), ..DbFiles::default() }).await.unwrap();
    (ts, actor, main)
}

async fn head(store: &DynStore, actor: &ActorId) -> Option<DBHead> {
    store.get(&ferry::v2::keys::meta(actor)).await.unwrap().map(|raw| DBHead::decode(&raw).unwrap())
}

async fn small_database_migrates_in_one_transaction(backend: Backend) {
    let (ts, actor, main) = seeded(backend, "small").await;
    let store = hooked(ts.store());
    let outcome = migrator(store.clone(), ManualClock::new(START_MS), "w").migrate(&req(&actor)).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Migrated);
    assert_eq!(store.commits.load(Ordering::SeqCst), 1, "begin, stage and finalize were not one transaction");
    assert_eq!(read_v2(&*ts.store, &actor).await.unwrap().file, main);
    let h = head(&ts.store, &actor).await.unwrap();
    assert_eq!((h.origin, h.generation, h.head_txid, h.next_txid), (Origin::MigratedFromV1, 1, 1, 2));
    assert!(ts.store.get(&keys::lease(&actor)).await.unwrap().is_none());
}

async fn racing_one_shot_migrations_end_with_one_copy(backend: Backend) {
    let (ts, actor, main) = seeded(backend, "race").await;
    let clock = ManualClock::new(START_MS);
    let (a, b) = (migrator(ts.store(), clock.clone(), "a"), migrator(ts.store(), clock, "b"));
    let r = req(&actor);
    let (ra, rb) = tokio::join!(a.migrate(&r), b.migrate(&r));
    let mut kinds = vec![ra.unwrap().kind(), rb.unwrap().kind()];
    kinds.sort();
    assert_eq!(kinds, vec![OutcomeKind::Migrated, OutcomeKind::SkippedAlreadyMigrated]);
    assert_eq!(read_v2(&*ts.store, &actor).await.unwrap().file, main);
}

async fn v1_rewritten_before_the_commit_is_v1_changed_and_nothing_commits(backend: Backend) {
    let (ts, actor, _) = seeded(backend, "changed").await;
    let store = hooked(ts.store());
    let (key, a2) = (chunk_key(&actor, FileTag::Main, 1), actor.clone());
    *store.before_first_commit.lock().await = Some(Box::new(move || {
        let _ = a2;
        let mut t = Txn::new();
        t.set(key, vec![7u8; 4096]);
        t
    }));
    let err = migrator(store.clone(), ManualClock::new(START_MS), "w").migrate(&req(&actor)).await.unwrap_err();
    assert!(matches!(err.cause, Cause::V1Changed), "{err}");
    assert_eq!(err.fate(), Fate::Retry);
    assert!(head(&ts.store, &actor).await.is_none(), "a stale copy committed");
}

async fn stale_stage_is_taken_over_in_one_transaction(backend: Backend) {
    let (ts, actor, main) = seeded(backend, "stale").await;
    let clock = ManualClock::new(START_MS);
    let stale = DBHead::staging(4, 9, START_MS - 1000);
    let lease = Lease { holder: "dead#1".into(), generation: 4, expires_at_ms: START_MS - 1 };
    let mut t = Txn::new();
    t.set(ferry::v2::keys::meta(&actor), stale.encode());
    t.set(keys::lease(&actor), lease.encode());
    t.set(ferry::v2::keys::delta_chunk(&actor, 9, 0), b"junk".to_vec());
    t.set(ferry::v2::keys::pidx(&actor, 77), 9u64.to_be_bytes().to_vec());
    ts.store.commit(t).await.unwrap();
    let outcome = migrator(ts.store(), clock, "w").migrate(&req(&actor)).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Migrated);
    let h = head(&ts.store, &actor).await.unwrap();
    // The stale stage staged txid 9; the takeover stages the next one.
    assert_eq!((h.origin, h.generation, h.head_txid), (Origin::MigratedFromV1, 5, 10));
    assert!(ts.store.get(&ferry::v2::keys::pidx(&actor, 77)).await.unwrap().is_none(), "junk PIDX row left");
    assert!(ts.store.get(&keys::lease(&actor)).await.unwrap().is_none(), "lease left");
    assert_eq!(read_v2(&*ts.store, &actor).await.unwrap().file, main);
}

async fn live_lease_of_another_holder_is_in_progress_elsewhere(backend: Backend) {
    let (ts, actor, _) = seeded(backend, "live").await;
    let mut t = Txn::new();
    t.set(ferry::v2::keys::meta(&actor), DBHead::staging(1, 1, START_MS).encode());
    t.set(
        keys::lease(&actor),
        Lease { holder: "other#1".into(), generation: 1, expires_at_ms: START_MS + 60_000 }.encode(),
    );
    ts.store.commit(t).await.unwrap();
    let err = migrator(ts.store(), ManualClock::new(START_MS), "w").migrate(&req(&actor)).await.unwrap_err();
    assert!(matches!(err.cause, Cause::InProgressElsewhere { .. }), "{err}");
    assert_eq!(err.fate(), Fate::Retry);
}

/// A prefetch, then the migration from it, as a worker's job does.
async fn prefetched(m: &Migrator, actor: &ActorId, budget: u64) -> (bool, Result<OutcomeKind, Fate>) {
    let entered = m.enter();
    let p = m.prefetch(actor, budget).await.unwrap();
    let validated = p.validated_with_read();
    (validated, m.migrate_from(&req(actor), Some(p), entered).await.map(|o| o.kind()).map_err(|e| e.fate()))
}

async fn a_small_fresh_actor_is_validated_with_its_read_and_anything_else_as_without_a_prefetch(backend: Backend) {
    let (ts, actor, main) = seeded(backend, "prefetched").await;
    let budget = MemoryBudget::first_read_footprint();
    let m = migrator(ts.store(), ManualClock::new(START_MS), "w");
    assert_eq!(prefetched(&m, &actor, budget).await, (true, Ok(OutcomeKind::Migrated)));
    assert_eq!(read_v2(&*ts.store, &actor).await.unwrap().file, main);
    let h = head(&ts.store, &actor).await.unwrap();
    assert_eq!((h.origin, h.generation, h.head_txid, h.next_txid), (Origin::MigratedFromV1, 1, 1, 2));
    // With a head, the actor's state is inspect's to judge: here, migrated already.
    assert_eq!(prefetched(&m, &actor, budget).await, (false, Ok(OutcomeKind::SkippedAlreadyMigrated)));
    // A sidecar is rejected as without a prefetch, by the normal read.
    let journal = ts.actor("prefetched-journal");
    write_v1(&*ts.store, &journal, &hot_journal(&DbSpec::small(8), 20).unwrap()).await.unwrap();
    let rejected = (false, Err(Fate::DeadLetter(ferry::DeadLetterReason::JournalSidecar)));
    assert_eq!(prefetched(&m, &journal, budget).await, rejected);
    // A main file whose footprint is over what the job reserved is not validated with the read.
    let (ts, actor, main) = seeded(backend, "prefetched-budget").await;
    let m = migrator(ts.store(), ManualClock::new(START_MS), "w");
    assert_eq!(prefetched(&m, &actor, 0).await, (false, Ok(OutcomeKind::Migrated)));
    assert_eq!(read_v2(&*ts.store, &actor).await.unwrap().file, main);
}

per_backend!(
    backends: [sqlite: Sqlite, postgres: Postgres, rivet: Rivet],
    tests: [
        a_small_fresh_actor_is_validated_with_its_read_and_anything_else_as_without_a_prefetch,
        small_database_migrates_in_one_transaction,
        racing_one_shot_migrations_end_with_one_copy,
        v1_rewritten_before_the_commit_is_v1_changed_and_nothing_commits,
        stale_stage_is_taken_over_in_one_transaction,
        live_lease_of_another_holder_is_in_progress_elsewhere,
    ],
);
