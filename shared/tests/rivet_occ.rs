//! ferry and a running rivet engine on the same universaldb (DESIGN.md section 7): each sees
//! the other's writes as conflicts through universaldb's optimistic concurrency protocol on
//! PostgreSQL. rivet's side is a transaction run as rivet's driver runs it
//! (`common::rivet::RivetTxn`), its interleaving with ferry's commits controlled step by step
//! (a hook before ferry's finalize, or a proxy holding ferry's connection between its read
//! snapshot and its commit), never by timing. Also: rivet's own migration in flight is left
//! alone, and a migration writes nothing under any v1 prefix and nothing of ferry's in `X.kv`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::rivet::{Pause, RivetTxn, connect, is_conflict, key_range, physical_rows};
use common::{Kind, kind_of};
use ferry::clock::ManualClock;
use ferry::layout::rivet::{V2_INLINE_MARKER, v1_root, v2_clear_ranges, v2_key, v2_subspace};
use ferry::layout::{Layout, RivetId};
use ferry::migrate::{Cause, Fate, MigrateConfig, Migrator, OutcomeKind, Request};
use ferry::store::{self, DynStore, KeyRange, KeyValue, OpenMode, OpenOptions, Store, StoreError, Txn, prefix_end};
use ferry::synth::sqlite::{database, hot_journal};
use ferry::synth::{DbFiles, DbSpec, write_v1};
use ferry::testing::{Backend, TestStore};
use ferry::v2::keys as v2keys;
use ferry::v2::{DBHead, Origin};
use ferry::{ActorId, Recovery};
use futures::future::BoxFuture;

const START_MS: i64 = 1_763_900_000_000;

fn main_only(seed: u64) -> DbFiles {
    DbFiles { main: database(&DbSpec::small(seed)).unwrap(), ..DbFiles::default() }
}

fn migrator(store: DynStore, clock: Arc<ManualClock>, staged: bool) -> Migrator {
    let one_shot_max_pages = if staged { 0 } else { MigrateConfig::default().one_shot_max_pages };
    Migrator::new(
        store,
        clock,
        MigrateConfig { worker_id: "ferry-occ".into(), one_shot_max_pages, ..Default::default() },
    )
}

fn req(actor: &ActorId) -> Request {
    Request { actor: actor.clone(), campaign: "occ".into(), recovery: None, attempts: 1, ticket: None }
}

/// The physical row of a logical v2 key.
fn physical(logical: &[u8]) -> Vec<u8> {
    v2_key(logical).unwrap()
}

/// What sqlite-storage stores for a small value: the inline marker, then the value.
fn inline(value: &[u8]) -> Vec<u8> {
    [&[V2_INLINE_MARKER][..], value].concat()
}

/// Every physical row of an actor's v2 state (its keys and chunk rows).
async fn v2_rows(pg: &tokio_postgres::Client, schema: &str, actor: &ActorId) -> Vec<KeyValue> {
    let mut rows = Vec::new();
    for range in v2_clear_ranges(&RivetId::from_actor(actor).unwrap()) {
        rows.extend(physical_rows(pg, schema, Some(&range)).await);
    }
    rows
}

/// Runs a future before the first commit of a chosen kind.
struct BeforeCommit {
    inner: DynStore,
    kind: Kind,
    hook: Mutex<Option<BoxFuture<'static, ()>>>,
}

#[async_trait]
impl Store for BeforeCommit {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
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
        if kind_of(&txn) == self.kind {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook.await;
            }
        }
        self.inner.commit(txn).await
    }
    fn layout(&self) -> Layout {
        self.inner.layout()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

// ---------------------------------------------------------------------------------------------
// ferry's writes are rivet's conflicts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rivet_transaction_that_read_meta_before_ferrys_finalize_and_commits_after_it_fails_23p01() {
    let ts = TestStore::new(Backend::Rivet).await;
    let schema = ts.schema().unwrap().to_string();
    let a = ts.actor("engine-reads-meta");
    write_v1(&*ts.store(), &a, &main_only(1)).await.unwrap();
    let meta = physical(&v2keys::meta(&a));

    // Just before ferry's finalize, the engine starts a transaction and reads the actor's head
    // (the staging head ferry's begin wrote).
    let rivet: Arc<tokio::sync::Mutex<Option<RivetTxn>>> = Arc::default();
    let (in_hook, hook_schema, hook_meta) = (rivet.clone(), schema.clone(), meta.clone());
    let hooked = Arc::new(BeforeCommit {
        inner: ts.store(),
        kind: Kind::Finalize,
        hook: Mutex::new(Some(Box::pin(async move {
            let mut txn = RivetTxn::begin(&hook_schema).await;
            let head = txn.get(&hook_meta).await.expect("begin wrote the head");
            assert_eq!(head[0], V2_INLINE_MARKER);
            assert_eq!(DBHead::decode(&head[1..]).unwrap().origin, Origin::MigratingFromV1);
            *in_hook.lock().await = Some(txn);
        }))),
    });
    let outcome = migrator(hooked, ManualClock::new(START_MS), true).migrate(&req(&a)).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Migrated);
    let migrated_head = ts.store().get(&v2keys::meta(&a)).await.unwrap().unwrap();
    assert_eq!(DBHead::decode(&migrated_head).unwrap().origin, Origin::MigratedFromV1);

    // The engine now commits a write of the head it read: ferry's finalize, which wrote it in
    // between, wins.
    let mut txn = rivet.lock().await.take().expect("the hook ran before finalize");
    let native = DBHead { origin: Origin::Native, ..DBHead::staging(9, 1, START_MS) };
    txn.set(meta.clone(), inline(&native.encode()));
    let err = txn.commit().await.expect_err("the engine overwrote ferry's finalize");
    assert!(is_conflict(&err), "expected 23P01, got {err:?}");
    assert_eq!(ts.store().get(&v2keys::meta(&a)).await.unwrap(), Some(migrated_head.clone()), "nothing written");

    // The engine's retry reads the migrated head; with nothing in between it commits.
    let mut retry = RivetTxn::begin(&schema).await;
    assert_eq!(retry.get(&meta).await, Some(inline(&migrated_head)));
    retry.set(meta.clone(), inline(&migrated_head));
    retry.commit().await.expect("a transaction that read after finalize commits");
}

// ---------------------------------------------------------------------------------------------
// rivet's writes are ferry's conflicts
// ---------------------------------------------------------------------------------------------

/// ferry's commit of `txn` through a proxy that holds it after its read snapshot, before its
/// conflict rows; `between` runs there. Returns the commit's result.
async fn ferry_commit_with_rivet_in_between(
    ts: &TestStore,
    txn: Txn,
    between: impl std::future::Future<Output = ()>,
) -> Result<(), StoreError> {
    let schema = ts.schema().unwrap();
    let mut pause = Pause::start(format!("INSERT INTO {schema}.conflict_ranges").as_bytes()).await;
    let opts = OpenOptions::new(2, OpenMode::Existing).layout(Layout::Rivet);
    let store = store::open_with(&pause.url(schema), &opts).await.unwrap();
    let commit = tokio::spawn(async move { store.commit(txn).await });
    // ferry has read in its snapshot and is about to insert its conflict rows.
    pause.held().await;
    between.await;
    pause.release();
    commit.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rivet_write_to_a_key_ferry_read_between_its_snapshot_and_commit_makes_ferry_retry_and_fail_its_check() {
    let ts = TestStore::new(Backend::Rivet).await;
    let schema = ts.schema().unwrap().to_string();
    let a = ts.actor("engine-writes");
    let (k, y) = (v2keys::meta(&a), v2keys::pidx(&a, 1));
    let mut seed = Txn::new();
    seed.set(k.clone(), b"old".to_vec());
    ts.store().commit(seed).await.unwrap();

    // rivet's transaction starts before ferry's commit (an earlier start version) ...
    let mut rivet = RivetTxn::begin(&schema).await;
    let rivet_start = rivet.start_version;
    rivet.set(physical(&k), inline(b"rivet's"));
    let mut txn = Txn::new();
    txn.check_value(k.clone(), Some(b"old".to_vec()));
    txn.set(y.clone(), b"ferry's".to_vec());
    txn.set(b"ferry/marker".to_vec(), b"1".to_vec());
    // ... and commits its write of k while ferry holds a snapshot in which k was "old".
    let result = ferry_commit_with_rivet_in_between(&ts, txn, async move {
        rivet.commit().await.expect("rivet commits first: ferry has no conflict rows yet");
    })
    .await;

    // ferry's conflict rows lost (its read of k overlaps rivet's write), so it read again:
    // k is rivet's now and its check fails. Nothing of ferry's was written.
    assert!(matches!(result, Err(StoreError::Conflict { index: 0, .. })), "{result:?}");
    assert_eq!(ts.store().get(&k).await.unwrap(), Some(b"rivet's".to_vec()));
    assert_eq!(ts.store().get(&y).await.unwrap(), None);
    assert_eq!(ts.store().get(b"ferry/marker").await.unwrap(), None, "the records rolled back with X.kv");
    // No conflict row of ferry's after rivet's start: its first attempt rolled back, its second
    // did not get past its check.
    let pg = connect().await;
    let ferrys: i64 = pg
        .query_one(&format!("SELECT count(*) FROM {schema}.conflict_ranges WHERE start_version > $1"), &[&rivet_start])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ferrys, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rivet_rewrite_of_a_key_ferry_read_between_its_snapshot_and_commit_makes_ferry_retry_and_commit() {
    let ts = TestStore::new(Backend::Rivet).await;
    let schema = ts.schema().unwrap().to_string();
    let a = ts.actor("engine-rewrites");
    let (k, y) = (v2keys::meta(&a), v2keys::pidx(&a, 1));
    let mut seed = Txn::new();
    seed.set(k.clone(), b"same".to_vec());
    ts.store().commit(seed).await.unwrap();

    // rivet rewrites k with the value it has: ferry's read of k still conflicts with the write
    // (universaldb compares ranges, not values), so ferry re-reads, its check holds, it commits.
    let mut rivet = RivetTxn::begin(&schema).await;
    let rivet_start = rivet.start_version;
    rivet.set(physical(&k), inline(b"same"));
    let mut txn = Txn::new();
    txn.check_value(k.clone(), Some(b"same".to_vec()));
    txn.set(y.clone(), b"ferry's".to_vec());
    txn.set(b"ferry/marker".to_vec(), b"1".to_vec());
    let result = ferry_commit_with_rivet_in_between(&ts, txn, async move {
        rivet.commit().await.expect("rivet commits first");
    })
    .await;
    result.expect("ferry's retry commits");
    assert_eq!(ts.store().get(&y).await.unwrap(), Some(b"ferry's".to_vec()));
    assert_eq!(ts.store().get(b"ferry/marker").await.unwrap(), Some(b"1".to_vec()));

    // ferry's committed attempt is the retry: its conflict rows have a start version after
    // rivet's commit version, and its read of k is among them.
    let pg = connect().await;
    let rows = pg
        .query(
            &format!(
                "SELECT conflict_type::text, start_version, commit_version, lower(range_data), upper(range_data) \
                 FROM {schema}.conflict_ranges WHERE start_version >= $1"
            ),
            &[&rivet_start],
        )
        .await
        .unwrap();
    let rivet_commit: i64 =
        rows.iter().find(|r| r.get::<_, i64>(1) == rivet_start).expect("rivet's conflict row").get(2);
    let k_range = key_range(&physical(&k));
    let ferry_read = rows.iter().find(|r| {
        r.get::<_, String>(0) == "read"
            && r.get::<_, Vec<u8>>(3) == k_range.start
            && r.get::<_, Vec<u8>>(4) == k_range.end
    });
    let ferry_read = ferry_read.expect("ferry's read of k");
    assert!(ferry_read.get::<_, i64>(1) > rivet_commit, "ferry committed from a snapshot before rivet's write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_checks_outlived_rivets_transaction_limit_writes_nothing_and_is_retried_later() {
    let ts = TestStore::new(Backend::Rivet).await;
    let schema = ts.schema().unwrap().to_string();
    let a = ts.actor("too-old");
    let (k, y) = (v2keys::meta(&a), v2keys::pidx(&a, 1));
    let mut seed = Txn::new();
    seed.set(k.clone(), b"old".to_vec());
    ts.store().commit(seed).await.unwrap();
    let before: i64 =
        connect().await.query_one(&format!("SELECT count(*) FROM {schema}.conflict_ranges"), &[]).await.unwrap().get(0);

    // A deadline already passed: every commit's checks have outlived it, as a finalize's digest
    // read of a large actor could outlive rivet's 5 s (after 10 s the engine collects the
    // conflict rows that would have shown ferry a write it missed).
    let Ok(store::StoreUrl::Postgres(url)) = store::StoreUrl::parse(&ts.url) else { panic!("a postgres URL") };
    let opts = OpenOptions::new(2, OpenMode::Existing).layout(Layout::Rivet);
    let late = ferry::layout::RivetStore::connect(url, &opts).await.unwrap().with_deadline(Duration::ZERO);
    let mut txn = Txn::new();
    txn.check_value(k.clone(), Some(b"old".to_vec()));
    txn.set(y.clone(), b"ferry's".to_vec());
    txn.set(b"ferry/marker".to_vec(), b"1".to_vec());
    let result = late.commit(txn).await;

    let e = result.expect_err("a commit past the deadline");
    assert!(matches!(e, StoreError::Unavailable { .. }) && e.is_transient(), "{e:?}");
    assert_eq!(Cause::from(e).fate(), Fate::Retry);
    assert_eq!(ts.store().get(&y).await.unwrap(), None, "nothing of X.kv written");
    assert_eq!(ts.store().get(b"ferry/marker").await.unwrap(), None, "nothing of the records written");
    let after: i64 =
        connect().await.query_one(&format!("SELECT count(*) FROM {schema}.conflict_ranges"), &[]).await.unwrap().get(0);
    assert_eq!(after, before, "no conflict row sent");
}

// ---------------------------------------------------------------------------------------------
// rivet's own migration
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rivets_own_migration_in_flight_is_left_alone_as_in_progress_elsewhere() {
    let ts = TestStore::new(Backend::Rivet).await;
    let schema = ts.schema().unwrap().to_string();
    let a = ts.actor("rivet-migrates");
    write_v1(&*ts.store(), &a, &main_only(2)).await.unwrap();

    // rivet's takeover has begun: a fresh MigratingFromV1 head and a DELTA row in its own
    // rows, and no ferry lease.
    let mut rivet = RivetTxn::begin(&schema).await;
    rivet.set(physical(&v2keys::meta(&a)), inline(&DBHead::staging(1, 1, START_MS).encode()));
    rivet.set(physical(&v2keys::delta_chunk(&a, 1, 0)), inline(b"rivet's stage"));
    rivet.commit().await.unwrap();
    let pg = connect().await;
    let before = v2_rows(&pg, &schema, &a).await;
    let v1_before = physical_rows(&pg, &schema, Some(&KeyRange::prefix(&v1_root()))).await;

    let window = Layout::Rivet.foreign_migration_window().unwrap().as_millis() as i64;
    for age in [0, 10_000, window - 1] {
        let clock = ManualClock::new(START_MS + age);
        let err = migrator(ts.store(), clock, false).migrate(&req(&a)).await.expect_err("took rivet's migration");
        assert!(matches!(err.cause, Cause::InProgressElsewhere { .. }), "head {age} ms old: {err}");
        assert_eq!(err.fate(), Fate::Retry);
        assert_eq!(v2_rows(&pg, &schema, &a).await, before, "head {age} ms old: v2 touched");
        assert_eq!(ts.store().get(&ferry::keys::lease(&a)).await.unwrap(), None);
    }
    assert_eq!(physical_rows(&pg, &schema, Some(&KeyRange::prefix(&v1_root()))).await, v1_before);

    // Once the head is as old as rivet's window, nobody holds it: ferry takes it over.
    let outcome = migrator(ts.store(), ManualClock::new(START_MS + window), false).migrate(&req(&a)).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Migrated);
    let head = DBHead::decode(&ts.store().get(&v2keys::meta(&a)).await.unwrap().unwrap()).unwrap();
    assert_eq!((head.origin, head.generation), (Origin::MigratedFromV1, 2));
    assert_eq!(ts.store().get(&v2keys::delta_chunk(&a, 1, 0)).await.unwrap(), None, "rivet's stage cleared");
}

// ---------------------------------------------------------------------------------------------
// What a migration never writes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_write_nothing_under_any_v1_prefix_and_no_ferry_key_lands_in_x_kv() {
    let ts = TestStore::new(Backend::Rivet).await;
    let schema = ts.schema().unwrap().to_string();
    let store = ts.store();
    let (small, staged, journal, kv_only, native) =
        (ts.actor("small"), ts.actor("staged"), ts.actor("journal"), ts.actor("kv-only"), ts.actor("native"));
    write_v1(&*store, &small, &main_only(3)).await.unwrap();
    write_v1(&*store, &staged, &main_only(4)).await.unwrap();
    write_v1(&*store, &journal, &hot_journal(&DbSpec::small(5), 50).unwrap()).await.unwrap();
    write_v1(&*store, &native, &main_only(6)).await.unwrap();
    let mut txn = Txn::new();
    txn.set([ferry::v1::keys::actor_prefix(&kv_only), b"\x01state".to_vec()].concat(), b"state".to_vec());
    let native_head = DBHead { origin: Origin::Native, ..DBHead::staging(3, 5, START_MS) };
    txn.set(v2keys::meta(&native), native_head.encode());
    store.commit(txn).await.unwrap();

    let pg = connect().await;
    let v1 = KeyRange::prefix(&v1_root());
    let v1_before = physical_rows(&pg, &schema, Some(&v1)).await;
    let fixture_version: i64 =
        pg.query_one(&format!("SELECT last_value FROM {schema}.global_version_seq"), &[]).await.unwrap().get(0);

    let clock = ManualClock::new(START_MS);
    let m = migrator(store.clone(), clock.clone(), false);
    assert_eq!(m.migrate(&req(&small)).await.unwrap().kind(), OutcomeKind::Migrated);
    assert_eq!(
        migrator(store.clone(), clock.clone(), true).migrate(&req(&staged)).await.unwrap().kind(),
        OutcomeKind::Migrated
    );
    assert!(m.migrate(&req(&journal)).await.is_err(), "a hot journal is rejected");
    let recovered = Request { recovery: Some(Recovery::RollbackJournal), ..req(&journal) };
    assert_eq!(m.migrate(&recovered).await.unwrap().kind(), OutcomeKind::Migrated);
    assert_eq!(m.migrate(&req(&kv_only)).await.unwrap().kind(), OutcomeKind::SkippedNoV1);
    assert_eq!(m.migrate(&req(&native)).await.unwrap().kind(), OutcomeKind::SkippedNativeV2);
    assert_eq!(m.migrate(&req(&small)).await.unwrap().kind(), OutcomeKind::SkippedAlreadyMigrated);

    assert_eq!(physical_rows(&pg, &schema, Some(&v1)).await, v1_before, "a migration wrote under a v1 prefix P");
    // No write conflict row of the migrations touches the v1 root either.
    let v1_writes: i64 = pg
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.conflict_ranges WHERE conflict_type = 'write' AND start_version > $1 \
                 AND range_data && {schema}.bytearange($2, $3, '[)')"
            ),
            &[&fixture_version, &v1.start, &v1.end],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v1_writes, 0);

    // X.kv holds v1 rows and sqlite-storage rows of the migrated and native actors, nothing
    // else; ferry's records are all in X.ferry_kv.
    let s = v2_subspace();
    let owners: Vec<[KeyRange; 2]> = [&small, &staged, &journal, &native]
        .iter()
        .map(|a| v2_clear_ranges(&RivetId::from_actor(a).unwrap()))
        .collect();
    for (key, _) in physical_rows(&pg, &schema, None).await {
        if v1.contains(&key) {
            continue;
        }
        assert!(key.starts_with(&s), "a row outside rivet's subspaces: {}", ferry::keys::printable(&key));
        assert!(
            owners.iter().flatten().any(|r| r.contains(&key)),
            "a v2 row of no migrated actor: {}",
            ferry::keys::printable(&key)
        );
    }
    let ferry_in_kv: i64 = pg
        .query_one(
            &format!("SELECT count(*) FROM {schema}.kv WHERE key >= $1 AND key < $2"),
            &[&b"ferry/".to_vec(), &prefix_end(b"ferry/")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ferry_in_kv, 0);
    let audits: i64 = pg
        .query_one(
            &format!("SELECT count(*) FROM {schema}.ferry_kv WHERE key >= $1 AND key < $2"),
            &[&ferry::keys::AUDIT_PREFIX.to_vec(), &prefix_end(ferry::keys::AUDIT_PREFIX)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audits, 5, "one audit per actor, in X.ferry_kv");
}
