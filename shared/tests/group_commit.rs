//! Group commit of small actors (`store::group`, `migrate` one-shot path), on both backends
//! and the rivet layout (one universaldb transaction per group):
//! actors ready together commit in one store transaction, each with its own checks; a conflict
//! injected into one actor of the group (its head, its v1 rows, its dead letter) fails only
//! that actor, which is inspected again and commits alone (or retries, for v1); each job's disposition follows its own actor's durable outcome.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferry::ActorId;
use ferry::budget::MemoryBudget;
use ferry::clock::ManualClock;
use ferry::jobs::{Disposition, Job, JobRunner, RetryPolicy};
use ferry::keys;
use ferry::migrate::lease::Lease;
use ferry::migrate::{AuditRecord, MigrateConfig, Migrator, OutcomeKind};
use ferry::store::group::GroupConfig;
use ferry::store::{DynStore, KeyRange, KeyValue, Read, ReadResult, Store, StoreError, Txn};
use ferry::synth::sqlite::{DbSpec, database};
use ferry::synth::{DbFiles, write_v1};
use ferry::testing::{Backend, TestStore};
use ferry::v1::FileTag;
use ferry::v1::keys::chunk_key;
use ferry::v2::{DBHead, Origin, read_v2};

const START_MS: i64 = 1_763_900_000_000;

/// The real store, recording the groups committed and the transactions committed alone, with
/// a one-time hook that writes (as another writer would) just before the first group commits.
struct Injecting {
    inner: DynStore,
    groups: Mutex<Vec<usize>>,
    /// The actor of each transaction committed alone (by the audit key it writes).
    alone: Mutex<Vec<Vec<u8>>>,
    /// Batched reads served.
    batched_reads: Mutex<usize>,
    before_first_group: tokio::sync::Mutex<Option<Txn>>,
}

#[async_trait]
impl Store for Injecting {
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
    async fn read_many(&self, reads: &[Read]) -> Result<Vec<ReadResult>, StoreError> {
        *self.batched_reads.lock().unwrap() += 1;
        self.inner.read_many(reads).await
    }
    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        if let Some(key) = audit_key(&txn) {
            self.alone.lock().unwrap().push(key);
        }
        self.inner.commit(txn).await
    }
    async fn commit_many(&self, txns: Vec<Txn>) -> Vec<Result<(), StoreError>> {
        if let Some(conflict) = self.before_first_group.lock().await.take() {
            self.inner.commit(conflict).await.expect("the injected write commits");
        }
        self.groups.lock().unwrap().push(txns.len());
        self.inner.commit_many(txns).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// The audit key a transaction writes, if any.
fn audit_key(txn: &Txn) -> Option<Vec<u8>> {
    txn.mutations.iter().find_map(|m| match m {
        ferry::store::Mutation::Set { key, .. } if key.starts_with(keys::AUDIT_PREFIX) => Some(key.clone()),
        _ => None,
    })
}

fn runner(store: DynStore) -> JobRunner {
    let cfg = MigrateConfig {
        worker_id: "grouped".into(),
        // Wide enough that every job of the test joins the first group (a group holding every
        // entered job commits at once anyway).
        group: GroupConfig { max_wait: Duration::from_secs(5), max_txns: 64 },
        ..MigrateConfig::default()
    };
    JobRunner {
        migrator: Migrator::new(store, ManualClock::new(START_MS), cfg),
        retry: RetryPolicy::default(),
        budget: MemoryBudget::new(1 << 30),
        gate: None,
    }
}

fn job(actor: &ActorId) -> Job {
    Job {
        version: 1,
        campaign: "grouped".into(),
        actor_id: actor.clone(),
        enqueued_at_ms: START_MS,
        recovery: None,
        ticket: None,
    }
}

/// The dead letter a twin's last attempt writes for `actor` (in progress elsewhere).
fn dead_letter(actor: &ActorId) -> ferry::jobs::DeadLetter {
    ferry::jobs::DeadLetter {
        actor_id: actor.to_string(),
        campaign: "grouped".into(),
        reason: ferry::DeadLetterReason::RetriesExhausted,
        phase: "begin".into(),
        error: "in progress elsewhere".into(),
        attempts: 8,
        worker: "twin".into(),
        at_ms: START_MS,
        v1_files: None,
        recovery: None,
        message: String::new(),
    }
}

async fn audit(store: &DynStore, actor: &ActorId) -> Option<AuditRecord> {
    store.get(&keys::audit(actor)).await.unwrap().as_deref().and_then(AuditRecord::decode)
}

async fn head(store: &DynStore, actor: &ActorId) -> Option<DBHead> {
    store.get(&ferry::v2::keys::meta(actor)).await.unwrap().map(|raw| DBHead::decode(&raw).unwrap())
}

async fn a_conflict_injected_into_one_actor_of_a_group_fails_only_that_actor(backend: Backend) {
    let ts = TestStore::new(backend).await;
    let mut actors = Vec::new();
    let mut mains = Vec::new();
    for i in 0..6 {
        let actor = ts.actor(&format!("group-{i}"));
        let main = database(&DbSpec::small(3 + i)).unwrap();
        write_v1(&*ts.store, &actor, &DbFiles { main: main.clone(), ..DbFiles::default() }).await.unwrap();
        actors.push(actor);
        mains.push(main);
    }
    let (raced, changed, listed) = (actors[2].clone(), actors[4].clone(), actors[0].clone());
    // Between the reads and the group's commit: another ferry migration's stale stage (its
    // lease expired) appears on `raced` (its head check fails), v1 of `changed` is rewritten
    // (its digest check fails), and a twin's last attempt lists `listed` as dead (its dead
    // letter check fails).
    let mut conflict = Txn::new();
    ferry::triage::index::put(&mut conflict, None, &dead_letter(&listed));
    conflict.set(ferry::v2::keys::meta(&raced), DBHead::staging(7, 3, START_MS).encode());
    let expired = Lease { holder: "crashed#1".into(), generation: 7, expires_at_ms: START_MS - 1 };
    conflict.set(keys::lease(&raced), expired.encode());
    conflict.set(chunk_key(&changed, FileTag::Main, 0), vec![9u8; 4096]);
    let store = Arc::new(Injecting {
        inner: ts.store(),
        groups: Mutex::default(),
        alone: Mutex::default(),
        batched_reads: Mutex::default(),
        before_first_group: tokio::sync::Mutex::new(Some(conflict)),
    });
    let runner = runner(store.clone());
    let outcomes = futures::future::join_all(actors.iter().map(|actor| {
        let (runner, store) = (runner.clone(), ts.store());
        async move {
            let disposition = runner.run_job(&job(actor), 1).await;
            // The moment the job's disposition is known (its ack would follow), its outcome is
            // durable: the audit it carries is the one in the store.
            if let Disposition::Ack(outcome) = &disposition {
                assert_eq!(audit(&store, actor).await.as_ref(), Some(&outcome.audit), "{actor}");
            }
            disposition
        }
    }))
    .await;

    assert_eq!(store.groups.lock().unwrap()[0], 6, "the six actors commit as one group first");
    assert_eq!(store.groups.lock().unwrap().len(), 1, "{:?}", store.groups.lock().unwrap());
    // One per job, and one more for each actor inspected again after its race (head and
    // dead letter in one call): the raced and the listed one.
    assert_eq!(*store.batched_reads.lock().unwrap(), 6 + 2, "one batched read per job and per inspection again");
    let mut alone = store.alone.lock().unwrap().clone();
    alone.sort();
    let mut want = vec![keys::audit(&raced), keys::audit(&listed)];
    want.sort();
    assert_eq!(alone, want, "only the raced and the listed actor commit again, alone");
    assert!(ts.store.get(&keys::dead(&listed)).await.unwrap().is_none(), "a migrated actor is still listed");
    let summary = ferry::triage::index::summary(&*ts.store).await.unwrap();
    assert!(summary.is_empty(), "{summary:?}");
    for ((actor, main), disposition) in actors.iter().zip(&mains).zip(&outcomes) {
        if *actor == changed {
            match disposition {
                Disposition::Retry { error, uses_attempt: true, .. } => assert!(error.contains("v1"), "{error}"),
                other => panic!("{actor}: expected a retry for v1_changed, got {other:?}"),
            }
            assert!(head(&ts.store, actor).await.is_none(), "a stale copy of {actor} committed");
            assert!(audit(&ts.store, actor).await.is_none());
            continue;
        }
        let Disposition::Ack(outcome) = disposition else { panic!("{actor}: {disposition:?}") };
        assert_eq!(outcome.kind(), OutcomeKind::Migrated, "{actor}");
        assert_eq!(read_v2(&*ts.store, actor).await.unwrap().file, *main, "{actor}");
        let h = head(&ts.store, actor).await.unwrap();
        assert_eq!(h.origin, Origin::MigratedFromV1);
        // The raced actor took the stale stage over: a generation past the other writer's.
        let generation = if *actor == raced { 8 } else { 1 };
        assert_eq!(h.generation, generation, "{actor}");
        assert_eq!(outcome.audit.generation, Some(generation));
        assert!(ts.store.get(&keys::lease(actor)).await.unwrap().is_none());
    }
}

async fn grouped_migrations_of_the_same_actor_end_with_one_copy(backend: Backend) {
    // Two workers' jobs for the same actor and a job for another, all in one group of each
    // worker: the duplicate's head check fails (the first wrote the head), it inspects again
    // and records a skip.
    let ts = TestStore::new(backend).await;
    let (a, b) = (ts.actor("dup"), ts.actor("other"));
    let main = database(&DbSpec::small(5)).unwrap();
    for actor in [&a, &b] {
        write_v1(&*ts.store, actor, &DbFiles { main: main.clone(), ..DbFiles::default() }).await.unwrap();
    }
    let runner = runner(ts.store());
    let (ja, jdup, jb) = (job(&a), job(&a), job(&b));
    let (ra, rdup, rb) = tokio::join!(runner.run_job(&ja, 1), runner.run_job(&jdup, 1), runner.run_job(&jb, 1));
    let mut kinds: Vec<OutcomeKind> = [ra, rdup]
        .into_iter()
        .map(|d| match d {
            Disposition::Ack(o) => o.kind(),
            other => panic!("{other:?}"),
        })
        .collect();
    kinds.sort();
    assert_eq!(kinds, vec![OutcomeKind::Migrated, OutcomeKind::SkippedAlreadyMigrated]);
    assert!(matches!(rb, Disposition::Ack(ref o) if o.kind() == OutcomeKind::Migrated), "{rb:?}");
    for actor in [&a, &b] {
        assert_eq!(read_v2(&*ts.store, actor).await.unwrap().file, main);
    }
}

per_backend!(
    backends: [sqlite: Sqlite, postgres: Postgres, rivet: Rivet],
    tests: [
        a_conflict_injected_into_one_actor_of_a_group_fails_only_that_actor,
        grouped_migrations_of_the_same_actor_end_with_one_copy,
    ],
);
