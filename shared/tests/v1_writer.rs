//! v1 mutated during a migration: a writer rewrites an actor's v1 chunks while ferry migrates
//! it, and ferry never commits a stale copy (DESIGN.md section 3, steps 4 and 7). Every test is
//! run against every store backend and layout by `suite!` (actor ids from the fixture).
//!
//! The writer is a real concurrent task that rewrites the actor's main file chunk by chunk, one
//! transaction per chunk, in a random order, cycling between several real SQLite databases
//! (made by `ferry::synth::sqlite`): so v1 is often torn in the middle of a rewrite. Migrations
//! run in a loop meanwhile, retried by `err.fate()` as the worker does. To know exactly what v1
//! was when a migration marked the actor migrated, the migrator's store is wrapped ([`Gated`]):
//! every commit of the migrator and of the writer takes one shared async mutex, and right
//! after a commit that marks the actor migrated the wrapper reads v1 back (ferry's own v1
//! reader) while still holding it. v2 is compared with that, never with "v1 now".

#[macro_use]
mod common;

use common::{Kind, kind_of};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use async_trait::async_trait;
use ferry::checksum::DatabaseChecksum;
use ferry::clock::{Clock, ManualClock};
use ferry::keys::{V1_PREFIX, V2_PREFIX};
use ferry::migrate::lease::Lease;
use ferry::migrate::stage::STAGE_TXN_BYTES;
use ferry::migrate::{
    AuditRecord, Cause, Fate, MigrateConfig, MigrateError, Migrator, Outcome, OutcomeKind, Phase, Request,
};
use ferry::store::{Check, DynStore, KeyRange, KeyValue, Mutation, Store, StoreError, Txn, for_each_row, prefix_end};
use ferry::synth::sqlite::{DbSpec, database, hot_journal, integrity_check, scribbled};
use ferry::synth::{DbFiles, write_v1};
use ferry::testing::{Backend, TestStore};
use ferry::v1::keys::{CHUNK_SIZE, FileTag, actor_prefix, chunk_range, file_entries, sqlite_range};
use ferry::v1::read::SCAN_BATCH;
use ferry::v1::{ReadOptions, read_v1};
use ferry::v2::head::PAGE_SIZE;
use ferry::v2::keys as v2keys;
use ferry::v2::{DBHead, Origin, read_v2};
use ferry::{ActorId, DeadLetterReason};
use futures::future::BoxFuture;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::watch;

per_backend!(
    backends: [sqlite: Sqlite, postgres: Postgres, rivet: Rivet],
    around: bounded,
    tests: [
        small_actor_rewritten_during_one_transaction_migrations_never_commits_a_stale_copy,
        staged_actor_rewritten_during_staged_migrations_never_commits_a_stale_copy,
        chunks_rewritten_between_stage_transactions_fail_finalize_v1_changed_and_nothing_is_marked_migrated,
        v1_replaced_between_the_scans_of_one_read_is_v1_changed_not_a_dead_letter,
        a_rejection_stands_only_if_v1_is_unchanged_when_it_is_confirmed,
        a_journal_that_appears_while_the_probe_reads_is_v1_changed_and_a_journal_that_stays_is_dead_lettered,
    ],
);

/// Every test finishes within this or fails.
const LIMIT: Duration = Duration::from_secs(50);
const START_MS: i64 = 1_763_900_000_000;
const CAMPAIGN: &str = "v1-writer";
/// The worker's default retry budget (`RetryPolicy::default().max_attempts`).
const MAX_ATTEMPTS: u32 = 8;

async fn bounded(test: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(LIMIT, test).await.map_err(|_| anyhow!("test did not finish within {LIMIT:?}"))?
}

fn req(actor: &ActorId, attempts: u32) -> Request {
    Request { actor: actor.clone(), campaign: CAMPAIGN.into(), recovery: None, attempts, ticket: None }
}

fn v2_prefix(actor: &ActorId) -> Vec<u8> {
    [V2_PREFIX, actor.as_bytes(), b"/"].concat()
}

/// The actor's state entry, outside its SQLite keys (v1 actors have such entries too).
fn state_key(actor: &ActorId) -> Vec<u8> {
    [actor_prefix(actor).as_slice(), b"\x01state"].concat()
}

async fn rows(store: &dyn Store, range: &KeyRange) -> Result<Vec<KeyValue>> {
    let mut out = Vec::new();
    for_each_row(store, range, 1024, |k, v| {
        out.push((k.to_vec(), v));
        Ok(())
    })
    .await?;
    Ok(out)
}

/// Compares row sets without printing megabytes: the first differing keys.
fn ensure_same_rows(actual: &[KeyValue], expected: &BTreeMap<Vec<u8>, Vec<u8>>, what: &str) -> Result<()> {
    let actual: BTreeMap<_, _> = actual.iter().cloned().collect();
    if actual == *expected {
        return Ok(());
    }
    let differ: Vec<String> = actual
        .keys()
        .chain(expected.keys())
        .filter(|k| actual.get(*k) != expected.get(*k))
        .take(8)
        .map(|k| ferry::keys::printable(k))
        .collect();
    bail!("{what}: rows differ, first keys: {differ:?}")
}

fn ensure_bytes_eq(actual: &[u8], expected: &[u8], what: &str) -> Result<()> {
    if actual != expected {
        let first = actual.iter().zip(expected).position(|(a, b)| a != b);
        bail!("{what}: {} bytes vs {} expected, first difference at {first:?}", actual.len(), expected.len());
    }
    Ok(())
}

/// Whether a mutation writes or clears anything under `v1/`.
fn touches_v1(m: &Mutation) -> bool {
    match m {
        Mutation::Set { key, .. } | Mutation::Clear { key } => key.starts_with(V1_PREFIX),
        Mutation::ClearRange { range } => {
            range.start.as_slice() < prefix_end(V1_PREFIX).as_slice() && range.end.as_slice() > V1_PREFIX
        }
    }
}

/// Whether `txn` marks `actor` migrated: a MigratedFromV1 head or a `migrated` audit record.
fn marks_migrated(txn: &Txn, actor: &ActorId) -> bool {
    let (meta, audit) = (v2keys::meta(actor), ferry::keys::audit(actor));
    txn.mutations.iter().any(|m| match m {
        Mutation::Set { key, value } if *key == meta => {
            DBHead::decode(value).is_ok_and(|h| h.origin == Origin::MigratedFromV1)
        }
        Mutation::Set { key, value } if *key == audit => {
            AuditRecord::decode(value).is_some_and(|a| a.outcome == OutcomeKind::Migrated)
        }
        _ => false,
    })
}

fn writes_delta(txn: &Txn) -> bool {
    txn.mutations.iter().any(|m| matches!(m, Mutation::Set { key, .. } if key.windows(7).any(|w| w == b"/DELTA/")))
}

// ---------------------------------------------------------------------------------------------
// The gated store: migrator and writer commits serialized, v1 captured at the finalize commit
// ---------------------------------------------------------------------------------------------

/// A commit of the migrator that marked the actor migrated, and v1 as it was right after it.
struct Finalized {
    /// The commit also wrote the DELTA rows (the one-transaction path).
    one_shot: bool,
    /// The main file rebuilt by ferry's v1 reader while the gate was still held.
    v1_main: Result<Vec<u8>, String>,
}

/// The migrator's store. Its commits and the writer's ([`Gated::writer_commit`]) take one
/// mutex, so the v1 read right after a finalize commit sees exactly the v1 that commit checked.
struct Gated {
    inner: DynStore,
    actor: ActorId,
    gate: tokio::sync::Mutex<()>,
    finalized: Mutex<Vec<Finalized>>,
    /// Migrator mutations that touched `v1/` (there must be none).
    v1_writes: Mutex<Vec<String>>,
}

impl Gated {
    fn new(inner: DynStore, actor: &ActorId) -> Arc<Gated> {
        Arc::new(Gated {
            inner,
            actor: actor.clone(),
            gate: tokio::sync::Mutex::new(()),
            finalized: Mutex::new(Vec::new()),
            v1_writes: Mutex::new(Vec::new()),
        })
    }

    async fn writer_commit(&self, txn: Txn) -> Result<(), StoreError> {
        let _gate = self.gate.lock().await;
        self.inner.commit(txn).await
    }

    fn take_finalized(&self) -> Vec<Finalized> {
        std::mem::take(&mut *self.finalized.lock().unwrap())
    }
}

#[async_trait]
impl Store for Gated {
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

    async fn scan_keys(&self, range: &KeyRange, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.scan_keys(range, limit).await
    }

    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        for m in txn.mutations.iter().filter(|m| touches_v1(m)) {
            self.v1_writes.lock().unwrap().push(format!("{m:?}").chars().take(200).collect());
        }
        let marks = marks_migrated(&txn, &self.actor);
        let one_shot = writes_delta(&txn);
        let _gate = self.gate.lock().await;
        self.inner.commit(txn).await?;
        if marks {
            // Still under the gate: no writer commit can land between the finalize and this read.
            let v1_main = read_v1(&*self.inner, &self.actor, ReadOptions::default())
                .await
                .map(|image| image.main)
                .map_err(|e| e.to_string());
            self.finalized.lock().unwrap().push(Finalized { one_shot, v1_main });
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("gated {}", self.inner.describe())
    }
}

// ---------------------------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------------------------

/// How a writer's commits reach the store.
#[derive(Clone)]
enum Sink {
    /// Through the gate of the migrator's store.
    Gated(Arc<Gated>),
    /// Straight to the store (the deterministic tests run it inside a commit hook).
    Direct(DynStore),
}

/// The actor's runtime: the only writer of its v1 keys. Keeps every v1 row of the actor as it
/// last wrote it.
struct Writer {
    sink: Sink,
    actor: ActorId,
    main: Vec<u8>,
    rows: BTreeMap<Vec<u8>, Vec<u8>>,
    commits: usize,
}

/// A single write of the writer (one transaction each).
enum Op {
    Set(Vec<u8>, Vec<u8>),
    Clear(Vec<u8>),
}

impl Writer {
    /// Lays `main` out in v1 (in bulk, before anything runs) and starts keeping its rows.
    async fn plant(sink: Sink, actor: &ActorId, main: &[u8]) -> Result<Writer> {
        let store = match &sink {
            Sink::Gated(g) => g.inner.clone(),
            Sink::Direct(s) => s.clone(),
        };
        write_v1(&*store, actor, &DbFiles { main: main.to_vec(), ..DbFiles::default() }).await?;
        let mut txn = Txn::new();
        txn.set(state_key(actor), b"state 0".to_vec());
        store.commit(txn).await?;
        let mut rows: BTreeMap<_, _> = file_entries(actor, FileTag::Main, main).into_iter().collect();
        rows.insert(state_key(actor), b"state 0".to_vec());
        Ok(Writer { sink, actor: actor.clone(), main: main.to_vec(), rows, commits: 0 })
    }

    /// Commits one transaction of writes and keeps their rows.
    async fn commit(&mut self, ops: Vec<Op>) -> Result<()> {
        let mut txn = Txn::new();
        for op in &ops {
            match op {
                Op::Set(k, v) => txn.set(k.clone(), v.clone()),
                Op::Clear(k) => txn.clear(k.clone()),
            };
        }
        match &self.sink {
            Sink::Gated(g) => g.writer_commit(txn).await,
            Sink::Direct(s) => s.commit(txn).await,
        }
        .context("writer commit")?;
        self.commits += 1;
        for op in ops {
            match op {
                Op::Set(k, v) => self.rows.insert(k, v),
                Op::Clear(k) => self.rows.remove(&k),
            };
        }
        Ok(())
    }

    async fn apply(&mut self, op: Op) -> Result<()> {
        self.commit(vec![op]).await
    }

    /// Replaces the main file with `to` in ONE transaction (every write of
    /// [`Writer::ops_to`]): v1 is a valid database at every instant. Returns the writes.
    async fn replace_at_once(&mut self, to: &[u8]) -> Result<usize> {
        let ops = self.ops_to(to);
        let n = ops.len();
        self.commit(ops).await?;
        self.main = to.to_vec();
        Ok(n)
    }

    /// The writes that turn the current main file into `to`: each chunk that differs, the meta
    /// when the size changes, each chunk past the new end cleared. Unordered.
    fn ops_to(&self, to: &[u8]) -> Vec<Op> {
        let mut ops = Vec::new();
        for (key, value) in file_entries(&self.actor, FileTag::Main, to) {
            if self.rows.get(&key) != Some(&value) {
                ops.push(Op::Set(key, value));
            }
        }
        let (old, new) = (self.main.len().div_ceil(CHUNK_SIZE), to.len().div_ceil(CHUNK_SIZE));
        for index in new..old {
            ops.push(Op::Clear(ferry::v1::keys::chunk_key(&self.actor, FileTag::Main, index as u32)));
        }
        ops
    }

    /// Rewrites the main file to `to` in chunk order, one transaction per write.
    async fn rewrite_in_order(&mut self, to: &[u8]) -> Result<usize> {
        let ops = self.ops_to(to);
        let n = ops.len();
        for op in ops {
            self.apply(op).await?;
        }
        self.main = to.to_vec();
        Ok(n)
    }

    /// Rewrites the main file to `to` in a random order, one transaction per write; if
    /// `pause_at` is within the writes, the writer goes quiet there (v1 torn) until `quiet`
    /// returns. The actor's state entry is bumped too.
    async fn rewrite_shuffled(
        &mut self,
        to: &[u8],
        rng: &mut ChaCha8Rng,
        pause_at: Option<usize>,
        quiet: &mut Quiet,
    ) -> Result<()> {
        let mut ops = self.ops_to(to);
        ops.shuffle(rng);
        let state = format!("state {}", self.commits).into_bytes();
        ops.push(Op::Set(state_key(&self.actor), state));
        for (i, op) in ops.into_iter().enumerate() {
            if pause_at == Some(i) {
                quiet.wait().await?;
            }
            self.apply(op).await?;
        }
        self.main = to.to_vec();
        Ok(())
    }
}

/// Lets the writer go quiet until two more migration attempts have returned: the second one
/// ran entirely while v1 stood still.
struct Quiet {
    attempts: watch::Receiver<u64>,
    pauses: usize,
}

impl Quiet {
    async fn wait(&mut self) -> Result<()> {
        let start = *self.attempts.borrow_and_update();
        self.attempts.wait_for(|n| *n >= start + 2).await.map_err(|_| anyhow!("the migration loop stopped"))?;
        self.pauses += 1;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Checks after each attempt
// ---------------------------------------------------------------------------------------------

/// After a failed attempt: nothing marks the actor migrated, no PIDX row exists, and a
/// MigratingFromV1 head is only left with a live lease of its generation.
async fn ensure_nothing_left_by_a_failure(store: &dyn Store, actor: &ActorId, now_ms: i64, err: &str) -> Result<()> {
    if let Some(raw) = store.get(&v2keys::meta(actor)).await? {
        let head = DBHead::decode(&raw).map_err(|e| anyhow!("head after {err}: {e}"))?;
        ensure!(head.origin == Origin::MigratingFromV1, "a failed attempt ({err}) left a {:?} head", head.origin);
        let lease = store.get(&ferry::keys::lease(actor)).await?.as_deref().and_then(Lease::decode);
        let lease = lease.with_context(|| format!("a MigratingFromV1 head without a lease after {err}"))?;
        ensure!(lease.is_live(now_ms), "a MigratingFromV1 head with an expired lease after {err}: {lease:?}");
        ensure!(
            lease.generation == head.generation,
            "lease {lease:?} is not the head's generation {}",
            head.generation
        );
    }
    let pidx = rows(store, &KeyRange::prefix(&v2keys::pidx_prefix(actor))).await?;
    ensure!(pidx.is_empty(), "{} PIDX rows after a failed attempt ({err})", pidx.len());
    if let Some(audit) = store.get(&ferry::keys::audit(actor)).await?.as_deref().and_then(AuditRecord::decode) {
        ensure!(audit.outcome != OutcomeKind::Migrated, "a failed attempt ({err}) left a migrated audit");
    }
    Ok(())
}

/// After a successful attempt: v2 reads back as exactly the v1 main file of the finalize
/// commit, and the audit's checksum and pages are those of that file.
async fn ensure_migrated_as_at_finalize(
    store: &dyn Store,
    actor: &ActorId,
    outcome: &Outcome,
    finalized: &Finalized,
) -> Result<Vec<u8>> {
    ensure!(outcome.kind() == OutcomeKind::Migrated, "outcome {}", outcome.kind());
    let at_finalize = finalized
        .v1_main
        .as_ref()
        .map_err(|e| anyhow!("v1 at the finalize commit does not read back (a torn copy was committed): {e}"))?;
    let v2 = read_v2(store, actor).await.context("v2 reads back")?;
    ensure_bytes_eq(&v2.file, at_finalize, "v2 vs v1 at the finalize commit")?;
    ensure!(v2.head.origin == Origin::MigratedFromV1);
    ensure!(!v2.head.stage_in_progress());
    ensure!(v2.head.db_size_pages as usize == at_finalize.len() / PAGE_SIZE as usize);
    let checksum = DatabaseChecksum::of_file(at_finalize, PAGE_SIZE as usize).hex();
    ensure!(outcome.audit.checksum.as_deref() == Some(checksum.as_str()), "audit checksum vs v1 at finalize");
    ensure!(outcome.audit.pages == Some(v2.head.db_size_pages));
    ensure!(store.get(&ferry::keys::lease(actor)).await?.is_none(), "the lease outlived the migration");
    let pidx = rows(store, &KeyRange::prefix(&v2keys::pidx_prefix(actor))).await?;
    ensure!(pidx.len() == v2.head.db_size_pages as usize);
    ensure!(pidx.iter().all(|(_, v)| *v == v2.head.head_txid.to_be_bytes()), "PIDX rows not at the head txid");
    Ok(at_finalize.clone())
}

/// Clears the actor's v2 rows, lease and audit (the test's doing, not ferry's), so the next
/// attempt migrates again while the writer keeps writing.
async fn reset_v2(store: &dyn Store, actor: &ActorId) -> Result<()> {
    let mut txn = Txn::new();
    txn.clear_range(KeyRange::prefix(&v2_prefix(actor)));
    txn.clear(ferry::keys::lease(actor));
    txn.clear(ferry::keys::audit(actor));
    store.commit(txn).await?;
    Ok(())
}

/// The failures a rewrite in progress may cause: v1 changed (while read, when a rejection of
/// what was read is put to the store, or before finalize), a torn v1 rejected (the store
/// confirmed it: the writer paused on it), or a stage left behind with a live lease. Anything
/// else fails the test.
fn ensure_expected_failure(err: &MigrateError) -> Result<()> {
    match &err.cause {
        Cause::V1Changed => ensure!(matches!(err.phase, Phase::Read | Phase::Validate | Phase::Finalize), "{err}"),
        Cause::Rejected(r) => {
            ensure!(
                matches!(
                    r.reason(),
                    DeadLetterReason::ChunkMismatch
                        | DeadLetterReason::BadHeader
                        | DeadLetterReason::IntegrityCheckFailed
                ),
                "a torn v1 rejected for an unexpected reason: {err}"
            );
            ensure!(matches!(err.phase, Phase::Read | Phase::Validate), "{err}");
        }
        Cause::InProgressElsewhere { .. } => {}
        _ => bail!("unexpected failure while v1 was rewritten: {err}"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Concurrent writer and migrations
// ---------------------------------------------------------------------------------------------

/// What happened during a run.
#[derive(Debug, Default)]
struct Tally {
    attempts: usize,
    migrated: usize,
    v1_changed_at_read: usize,
    /// A rejection by validate that the store did not confirm (v1 moved on since the read).
    v1_changed_at_validate: usize,
    v1_changed_at_finalize: usize,
    rejected: BTreeMap<DeadLetterReason, usize>,
    in_progress: usize,
    retries_exhausted: usize,
}

struct Scenario {
    actor: &'static str,
    /// The databases the writer cycles through; the first is planted.
    dbs: Vec<Vec<u8>>,
    rewrites: usize,
    cfg: MigrateConfig,
    /// Whether migrations take the one-transaction path.
    one_shot: bool,
    seed: u64,
}

async fn migrate_while_the_writer_rewrites(backend: Backend, sc: Scenario) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let actor = ts.actor(sc.actor);
    let clock = ManualClock::new(START_MS);
    let gated = Gated::new(ts.store(), &actor);
    let migrator = Migrator::new(gated.clone(), clock.clone(), sc.cfg.clone());
    let mut writer = Writer::plant(Sink::Gated(gated.clone()), &actor, &sc.dbs[0]).await?;

    let (attempts_tx, attempts_rx) = watch::channel(0u64);
    let (dbs, rewrites, seed) = (sc.dbs.clone(), sc.rewrites, sc.seed);
    let writing = tokio::spawn(async move {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut quiet = Quiet { attempts: attempts_rx, pauses: 0 };
        for round in 1..=rewrites {
            let to = &dbs[round % dbs.len()];
            let writes = writer.ops_to(to).len() + 1;
            // Half of the rewrites stop part way for a while: v1 stays torn meanwhile.
            let pause_at = (writes > 1 && rng.random_bool(0.5)).then(|| rng.random_range(1..writes));
            writer.rewrite_shuffled(to, &mut rng, pause_at, &mut quiet).await?;
            if round < rewrites {
                quiet.wait().await?;
            }
        }
        anyhow::Ok((writer, quiet.pauses))
    });

    let mut tally = Tally::default();
    let mut attempts = 1;
    let mut v1_copies = Vec::new();
    while !writing.is_finished() {
        let result = migrator.migrate(&req(&actor, attempts)).await;
        tally.attempts += 1;
        let finalized = gated.take_finalized();
        match result {
            Ok(outcome) => {
                ensure!(finalized.len() == 1, "{} commits marked the actor migrated", finalized.len());
                ensure!(finalized[0].one_shot == sc.one_shot, "migrated on the other path than expected");
                let copy = ensure_migrated_as_at_finalize(&*ts.store, &actor, &outcome, &finalized[0])
                    .await
                    .with_context(|| format!("attempt {} (job attempt {attempts})", tally.attempts))?;
                v1_copies.push(copy);
                tally.migrated += 1;
                reset_v2(&*ts.store, &actor).await?;
                attempts = 1;
            }
            Err(err) => {
                ensure!(finalized.is_empty(), "a failed attempt marked the actor migrated: {err}");
                ensure_expected_failure(&err)?;
                ensure_nothing_left_by_a_failure(&*ts.store, &actor, clock.now_ms(), &err.to_string()).await?;
                match &err.cause {
                    Cause::V1Changed if err.phase == Phase::Read => tally.v1_changed_at_read += 1,
                    Cause::V1Changed if err.phase == Phase::Validate => tally.v1_changed_at_validate += 1,
                    Cause::V1Changed => tally.v1_changed_at_finalize += 1,
                    Cause::Rejected(r) => *tally.rejected.entry(r.reason()).or_default() += 1,
                    // The worker's backoff: by the next attempt the holder's lease has run out.
                    _ => {
                        tally.in_progress += 1;
                        clock.advance_ms(sc.cfg.lease_ttl_ms + 1);
                    }
                }
                attempts = match err.fate() {
                    Fate::Retry if attempts < MAX_ATTEMPTS => attempts + 1,
                    Fate::Retry => {
                        tally.retries_exhausted += 1;
                        1
                    }
                    // Dead-lettered; an operator requeues it as a new job.
                    Fate::DeadLetter(_) => 1,
                    // Deferred jobs come only from a fleet worker's campaign gate, not here.
                    Fate::Defer => unreachable!("a migration is never deferred: {err}"),
                    // Superseded jobs come only from requeue tickets, not here.
                    Fate::Superseded => unreachable!("a job without a ticket is never superseded: {err}"),
                };
            }
        }
        attempts_tx.send_modify(|n| *n += 1);
    }
    let (writer, pauses) = writing.await.context("writer task")??;
    eprintln!(
        "{backend:?} {}: {} writer commits, {pauses} quiet pauses, {tally:?}, {} distinct copies migrated",
        sc.actor,
        writer.commits,
        {
            let mut distinct = v1_copies.clone();
            distinct.sort();
            distinct.dedup();
            distinct.len()
        }
    );
    ensure!(tally.migrated >= 1, "no migration succeeded while the writer ran: {tally:?}");
    ensure!(
        tally.v1_changed_at_read
            + tally.v1_changed_at_validate
            + tally.v1_changed_at_finalize
            + tally.rejected.values().sum::<usize>()
            >= 1,
        "the writer never got in a migration's way: {tally:?}"
    );

    // ferry never wrote a v1 key: the actor's v1 rows are the writer's last writes.
    let violations = gated.v1_writes.lock().unwrap().clone();
    ensure!(violations.is_empty(), "the migrator wrote under v1/: {violations:?}");
    let v1_rows = rows(&*ts.store, &KeyRange::prefix(&actor_prefix(&actor))).await?;
    ensure_same_rows(&v1_rows, &writer.rows, "v1 after the run vs the writer's last writes")?;

    // The writer stopped: a migration now succeeds (as a retried job would) and v2 is the
    // final v1.
    let last = &sc.dbs[sc.rewrites % sc.dbs.len()];
    ensure_bytes_eq(&read_v1(&*ts.store, &actor, ReadOptions::default()).await?.main, last, "final v1")?;
    let mut attempts = 1;
    let outcome = loop {
        match migrator.migrate(&req(&actor, attempts)).await {
            Ok(outcome) => break outcome,
            Err(err) if matches!(err.cause, Cause::InProgressElsewhere { .. }) && attempts < MAX_ATTEMPTS => {
                clock.advance_ms(sc.cfg.lease_ttl_ms + 1);
                attempts += 1;
            }
            Err(err) => bail!("the migration after the writer stopped failed: {err}"),
        }
    };
    let finalized = gated.take_finalized();
    ensure!(finalized.len() == 1, "{} commits marked the actor migrated", finalized.len());
    let copy = ensure_migrated_as_at_finalize(&*ts.store, &actor, &outcome, &finalized[0]).await?;
    ensure_bytes_eq(&copy, last, "v2 after the writer stopped vs the final v1")?;
    ensure!(integrity_check(&copy).map_err(|e| anyhow!(e))? == "ok");
    let v1_rows = rows(&*ts.store, &KeyRange::prefix(&actor_prefix(&actor))).await?;
    ensure_same_rows(&v1_rows, &writer.rows, "v1 after the final migration")?;
    Ok(())
}

/// Real databases: `base`, the same database with more rows appended (a few chunks differ),
/// another of the same size with other contents (every chunk differs), and a bigger one.
fn family(base: DbSpec, appended: u32, bigger: DbSpec) -> Result<Vec<Vec<u8>>> {
    let dbs = [base, DbSpec { rows: base.rows + appended, ..base }, DbSpec { seed: base.seed + 1, ..base }, bigger]
        .iter()
        .map(|spec| database(spec).map_err(|e| anyhow!(e)))
        .collect::<Result<Vec<_>>>()?;
    ensure!(dbs[0].len() == dbs[2].len(), "same-size databases: {} vs {}", dbs[0].len(), dbs[2].len());
    ensure!(dbs[1].len() >= dbs[0].len() && dbs[3].len() > dbs[1].len());
    for (i, a) in dbs.iter().enumerate() {
        ensure!(dbs[..i].iter().all(|b| b != a), "database {i} repeats an earlier one");
    }
    Ok(dbs)
}

async fn small_actor_rewritten_during_one_transaction_migrations_never_commits_a_stale_copy(
    backend: Backend,
) -> Result<()> {
    let dbs = family(DbSpec::small(101), 12, DbSpec { rows: 90, payload: 300, ..DbSpec::small(103) })?;
    ensure!(dbs.iter().all(|db| db.len() / (PAGE_SIZE as usize) <= 1024), "one-transaction sizes");
    let sc = Scenario {
        actor: "small-rewritten",
        dbs,
        rewrites: 24,
        cfg: MigrateConfig { worker_id: "worker-small".into(), ..MigrateConfig::default() },
        one_shot: true,
        seed: backend as u64 + 1,
    };
    migrate_while_the_writer_rewrites(backend, sc).await
}

async fn staged_actor_rewritten_during_staged_migrations_never_commits_a_stale_copy(backend: Backend) -> Result<()> {
    // Over SCAN_BATCH chunks, so each read of v1 takes several scans that a write can fall
    // between; about 1.5 to 2 MiB each.
    let dbs = family(DbSpec::sized(1_100_000, 201), 20, DbSpec::sized(1_500_000, 203))?;
    ensure!(dbs.iter().all(|db| db.len() / CHUNK_SIZE > SCAN_BATCH), "multi-scan sizes");
    let sc = Scenario {
        actor: "staged-rewritten",
        dbs,
        rewrites: 5,
        cfg: MigrateConfig { worker_id: "worker-staged".into(), one_shot_max_pages: 0, ..MigrateConfig::default() },
        one_shot: false,
        seed: backend as u64 + 11,
    };
    migrate_while_the_writer_rewrites(backend, sc).await
}

// ---------------------------------------------------------------------------------------------
// Deterministic: chunks rewritten between the transactions of one staged migration
// ---------------------------------------------------------------------------------------------

/// A hook that runs to completion before the `nth` (from 0) commit of a kind.
type Armed = (Kind, usize, BoxFuture<'static, Result<()>>);

/// Runs an armed hook before one chosen commit, and logs every commit and its result.
struct Hooked {
    inner: DynStore,
    armed: Mutex<Option<Armed>>,
    hook_result: Mutex<Option<Result<()>>>,
    log: Mutex<Vec<(Kind, bool)>>,
}

impl Hooked {
    fn new(inner: DynStore) -> Arc<Hooked> {
        Arc::new(Hooked { inner, armed: Mutex::new(None), hook_result: Mutex::new(None), log: Mutex::new(Vec::new()) })
    }

    /// Arms a hook and clears the log.
    fn arm(&self, kind: Kind, nth: usize, hook: BoxFuture<'static, Result<()>>) {
        *self.armed.lock().unwrap() = Some((kind, nth, hook));
        self.log.lock().unwrap().clear();
    }

    fn take_log(&self) -> Vec<(Kind, bool)> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// The result of the hook that ran (an error if it did not run).
    fn hook_ran(&self) -> Result<()> {
        self.hook_result.lock().unwrap().take().unwrap_or_else(|| Err(anyhow!("the hook did not run")))
    }
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
        let kind = kind_of(&txn);
        let nth = self.log.lock().unwrap().iter().filter(|(k, _)| *k == kind).count();
        let hook = {
            let mut armed = self.armed.lock().unwrap();
            match armed.take() {
                Some((k, n, hook)) if (k, n) == (kind, nth) => Some(hook),
                other => {
                    *armed = other;
                    None
                }
            }
        };
        if let Some(hook) = hook {
            let result = hook.await;
            *self.hook_result.lock().unwrap() = Some(result);
        }
        let result = self.inner.commit(txn).await;
        self.log.lock().unwrap().push((kind, result.is_ok()));
        result
    }

    fn describe(&self) -> String {
        format!("hooked {}", self.inner.describe())
    }
}

/// After a v1_changed failure (or a rejection, which writes nothing either): v2, lease and
/// audit are as if nothing happened, and v1 is the writer's.
async fn ensure_untouched_after_v1_changed(store: &dyn Store, actor: &ActorId, writer: &Writer) -> Result<()> {
    let v2 = rows(store, &KeyRange::prefix(&v2_prefix(actor))).await?;
    ensure!(v2.is_empty(), "{} v2 rows left by an abandoned stage", v2.len());
    ensure!(store.get(&ferry::keys::lease(actor)).await?.is_none(), "lease left behind");
    ensure!(store.get(&ferry::keys::audit(actor)).await?.is_none(), "the migrator wrote an audit for a failure");
    ensure_same_rows(&rows(store, &KeyRange::prefix(&actor_prefix(actor))).await?, &writer.rows, "v1")
}

async fn chunks_rewritten_between_stage_transactions_fail_finalize_v1_changed_and_nothing_is_marked_migrated(
    backend: Backend,
) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let actor = ts.actor("rewritten-between-stages");
    let clock = ManualClock::new(START_MS);
    // A blob over one stage transaction, so the migration stages in two; `appended` and
    // `appended_more` are the same database with a few more rows (the runtime's next writes).
    let base = DbSpec::sized(STAGE_TXN_BYTES as u64 * 5 / 4, 301);
    let original = database(&base).map_err(|e| anyhow!(e))?;
    let appended = database(&DbSpec { rows: base.rows + 3, ..base }).map_err(|e| anyhow!(e))?;
    let appended_more = database(&DbSpec { rows: base.rows + 6, ..base }).map_err(|e| anyhow!(e))?;
    let writer = Writer::plant(Sink::Direct(ts.store()), &actor, &original).await?;
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let hooked = Hooked::new(ts.store());
    let cfg = MigrateConfig { worker_id: "worker-hooked".into(), one_shot_max_pages: 0, ..MigrateConfig::default() };
    let migrator = Migrator::new(hooked.clone(), clock.clone(), cfg);
    let staged = vec![(Kind::Begin, true), (Kind::Stage, true), (Kind::Stage, true)];
    let abandoned = [staged.clone(), vec![(Kind::Finalize, false), (Kind::Other, true)]].concat();

    // Round 1: between the two stage transactions, the runtime appends rows: only the chunks
    // that changed are written, one transaction each.
    let (w, to) = (writer.clone(), appended.clone());
    let written = Arc::new(Mutex::new(0));
    let counted = written.clone();
    hooked.arm(
        Kind::Stage,
        1,
        Box::pin(async move {
            *counted.lock().unwrap() = w.lock().await.rewrite_in_order(&to).await?;
            Ok(())
        }),
    );
    let err = migrator.migrate(&req(&actor, 1)).await.err().context("finalized a copy of a v1 that changed")?;
    hooked.hook_ran()?;
    let n = *written.lock().unwrap();
    ensure!(n >= 1 && n < original.len() / CHUNK_SIZE / 10, "{n} chunk writes for a few appended rows");
    ensure!(matches!(err.cause, Cause::V1Changed) && err.phase == Phase::Finalize, "{err}");
    ensure!(err.fate() == Fate::Retry);
    let log = hooked.take_log();
    ensure!(log == abandoned, "commits: {log:?}");
    ensure_untouched_after_v1_changed(&*ts.store, &actor, &*writer.lock().await).await?;

    // Round 2 (the retry): v1 is rewritten right after begin, before any stage transaction.
    let (w, to) = (writer.clone(), appended_more.clone());
    hooked.arm(
        Kind::Stage,
        0,
        Box::pin(async move {
            w.lock().await.rewrite_in_order(&to).await?;
            Ok(())
        }),
    );
    let err = migrator.migrate(&req(&actor, 2)).await.err().context("finalized a copy of a v1 that changed")?;
    hooked.hook_ran()?;
    ensure!(matches!(err.cause, Cause::V1Changed) && err.phase == Phase::Finalize, "{err}");
    let log = hooked.take_log();
    ensure!(log == abandoned, "commits: {log:?}");
    ensure_untouched_after_v1_changed(&*ts.store, &actor, &*writer.lock().await).await?;

    // Round 3: v1 stands still; the retry migrates the v1 of now, byte for byte.
    let outcome = migrator.migrate(&req(&actor, 3)).await.context("the retry on a quiet v1")?;
    let log = hooked.take_log();
    ensure!(log == [staged, vec![(Kind::Finalize, true)]].concat(), "commits: {log:?}");
    ensure!(outcome.kind() == OutcomeKind::Migrated);
    let v2 = read_v2(&*ts.store, &actor).await?;
    ensure_bytes_eq(&v2.file, &appended_more, "v2 vs the v1 the retry read")?;
    let checksum = DatabaseChecksum::of_file(&appended_more, PAGE_SIZE as usize).hex();
    ensure!(outcome.audit.checksum.as_deref() == Some(checksum.as_str()));
    ensure!(outcome.audit.attempts == Some(3));
    let writer = writer.lock().await;
    ensure_same_rows(&rows(&*ts.store, &KeyRange::prefix(&actor_prefix(&actor))).await?, &writer.rows, "v1")?;
    let v1_range = rows(&*ts.store, &sqlite_range(&actor)).await?;
    ensure!(v1_range.len() == 1 + appended_more.len().div_ceil(CHUNK_SIZE), "v1 has the final file's chunks only");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Deterministic: v1 replaced while a read, or the confirmation of its rejection, is in flight
// ---------------------------------------------------------------------------------------------

/// Where a [`Watched`] store runs its armed hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// Before the second scan of the streaming pass over the actor's SQLite range: the first
    /// scan that resumes after a key (the pass's first scan starts at the range's start, as
    /// the migration's first batch did).
    ResumedScan,
    /// Before a check-only commit (a rejection being confirmed) is forwarded.
    Confirmation,
    /// Before the probe looks for the actor's journal chunks.
    JournalProbe,
}

/// What a [`Watched`] store saw, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// A scan of the actor's SQLite range, from its start or resuming after a key, and the
    /// rows it returned.
    Scan { resumed: bool, rows: usize },
    /// The armed hook ran, before the scan or commit seen next.
    Hook(At),
    /// A check-only commit: whether its one check is a RangeDigest of the actor's SQLite
    /// range, and whether it committed.
    Confirmation { of_sqlite_range: bool, ok: bool },
    /// A commit that writes, and whether it committed.
    Write { ok: bool },
}

/// The migrator's store: logs the scans of the actor's SQLite range and every commit, and
/// runs an armed hook to completion at one point ([`At`]).
struct Watched {
    inner: DynStore,
    sqlite: KeyRange,
    journal_chunks: KeyRange,
    armed: Mutex<Option<(At, BoxFuture<'static, Result<()>>)>>,
    hook_result: Mutex<Option<Result<()>>>,
    seen: Mutex<Vec<Seen>>,
}

impl Watched {
    fn new(inner: DynStore, actor: &ActorId) -> Arc<Watched> {
        Arc::new(Watched {
            inner,
            sqlite: sqlite_range(actor),
            journal_chunks: chunk_range(actor, FileTag::Journal),
            armed: Mutex::new(None),
            hook_result: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
        })
    }

    fn arm(&self, at: At, hook: BoxFuture<'static, Result<()>>) {
        *self.armed.lock().unwrap() = Some((at, hook));
    }

    fn take_seen(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    /// The result of the hook that ran (an error if it did not run).
    fn hook_ran(&self) -> Result<()> {
        self.hook_result.lock().unwrap().take().unwrap_or_else(|| Err(anyhow!("the hook did not run")))
    }

    /// Runs the hook if it is armed for `at`.
    async fn fire(&self, at: At) {
        let hook = {
            let mut armed = self.armed.lock().unwrap();
            match armed.take() {
                Some((a, hook)) if a == at => Some(hook),
                other => {
                    *armed = other;
                    None
                }
            }
        };
        if let Some(hook) = hook {
            let result = hook.await;
            *self.hook_result.lock().unwrap() = Some(result);
            self.seen.lock().unwrap().push(Seen::Hook(at));
        }
    }
}

#[async_trait]
impl Store for Watched {
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
        if *range == self.journal_chunks {
            self.fire(At::JournalProbe).await;
        }
        let of_sqlite = range.end == self.sqlite.end && range.start >= self.sqlite.start;
        let resumed = of_sqlite && range.start > self.sqlite.start;
        if resumed {
            self.fire(At::ResumedScan).await;
        }
        let rows = self.inner.scan(range, limit).await?;
        if of_sqlite {
            self.seen.lock().unwrap().push(Seen::Scan { resumed, rows: rows.len() });
        }
        Ok(rows)
    }

    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.first_key(range).await
    }

    async fn scan_keys(&self, range: &KeyRange, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.scan_keys(range, limit).await
    }

    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        if !txn.mutations.is_empty() || txn.checks.is_empty() {
            let result = self.inner.commit(txn).await;
            self.seen.lock().unwrap().push(Seen::Write { ok: result.is_ok() });
            return result;
        }
        self.fire(At::Confirmation).await;
        let of_sqlite_range = matches!(&txn.checks[..], [Check::RangeDigest { range, .. }] if *range == self.sqlite);
        let result = self.inner.commit(txn).await;
        self.seen.lock().unwrap().push(Seen::Confirmation { of_sqlite_range, ok: result.is_ok() });
        result
    }

    fn describe(&self) -> String {
        format!("watched {}", self.inner.describe())
    }
}

/// Runs `hook` with the writer (an armed hook of a [`Watched`] store): it replaces the main
/// file with `to` in one transaction and records how many writes that transaction made.
fn replace_hook(
    writer: &Arc<tokio::sync::Mutex<Writer>>,
    to: &[u8],
    writes: &Arc<Mutex<usize>>,
) -> BoxFuture<'static, Result<()>> {
    let (writer, to, writes) = (writer.clone(), to.to_vec(), writes.clone());
    Box::pin(async move {
        let n = writer.lock().await.replace_at_once(&to).await.context("replacing v1 in one transaction")?;
        *writes.lock().unwrap() = n;
        Ok(())
    })
}

/// The retry of a job whose attempt failed v1_changed: it migrates v1 as it is now, byte for
/// byte, without any rejection to confirm, and leaves v1 as the writer last wrote it.
async fn ensure_retry_migrates(
    migrator: &Migrator,
    watched: &Watched,
    store: &dyn Store,
    writer: &Writer,
    attempts: u32,
) -> Result<()> {
    let outcome = migrator
        .migrate(&req(&writer.actor, attempts))
        .await
        .with_context(|| format!("the retry (attempt {attempts}) on a quiet v1"))?;
    ensure!(outcome.kind() == OutcomeKind::Migrated, "outcome {}", outcome.kind());
    let seen = watched.take_seen();
    ensure!(
        !seen.iter().any(|s| matches!(s, Seen::Hook(_) | Seen::Confirmation { .. })),
        "the retry confirmed a rejection or ran a hook: {seen:?}"
    );
    ensure!(
        seen.iter().any(|s| matches!(s, Seen::Write { .. }))
            && seen.iter().all(|s| !matches!(s, Seen::Write { ok: false })),
        "the retry's commits: {seen:?}"
    );
    let v2 = read_v2(store, &writer.actor).await.context("v2 reads back after the retry")?;
    ensure_bytes_eq(&v2.file, &writer.main, "v2 vs v1 the retry read")?;
    ensure!(v2.head.origin == Origin::MigratedFromV1 && !v2.head.stage_in_progress());
    let checksum = DatabaseChecksum::of_file(&writer.main, PAGE_SIZE as usize).hex();
    ensure!(outcome.audit.checksum.as_deref() == Some(checksum.as_str()), "audit checksum vs v1");
    ensure!(outcome.audit.attempts == Some(attempts), "audit attempts {:?}", outcome.audit.attempts);
    ensure!(store.get(&ferry::keys::lease(&writer.actor)).await?.is_none(), "the lease outlived the migration");
    ensure_same_rows(&rows(store, &KeyRange::prefix(&actor_prefix(&writer.actor))).await?, &writer.rows, "v1")
}

async fn v1_replaced_between_the_scans_of_one_read_is_v1_changed_not_a_dead_letter(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let actor = ts.actor("replaced-between-scans");
    let clock = ManualClock::new(START_MS);
    // Over SCAN_BATCH chunks, so one read of v1 takes several scans. The replacement is the
    // same database with rows appended (the runtime's next write): more chunks, a few differ.
    let base = DbSpec::sized(1_100_000, 401);
    let original = database(&base).map_err(|e| anyhow!(e)).context("the original database")?;
    let replacement =
        database(&DbSpec { rows: base.rows + 12, ..base }).map_err(|e| anyhow!(e)).context("the replacement")?;
    ensure!(integrity_check(&replacement).map_err(|e| anyhow!(e))? == "ok", "the replacement is valid");
    let (before, after) = (original.len().div_ceil(CHUNK_SIZE), replacement.len().div_ceil(CHUNK_SIZE));
    // With the meta, the rows of the SQLite range are one more than the chunks.
    ensure!(before + 1 > SCAN_BATCH && after > before, "{before} chunks, then {after} (SCAN_BATCH {SCAN_BATCH})");
    ensure!(after + 1 < 2 * SCAN_BATCH, "{after} chunks: the streaming pass takes exactly two scans");
    let writer = Writer::plant(Sink::Direct(ts.store()), &actor, &original).await?;
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let watched = Watched::new(ts.store(), &actor);
    let cfg = MigrateConfig { worker_id: "worker-replaced".into(), ..MigrateConfig::default() };
    let migrator = Migrator::new(watched.clone(), clock.clone(), cfg);

    // Between the two scans of the read, v1 is replaced in one transaction: every instant of
    // v1 is a valid database, but the rows read are the original's first SCAN_BATCH (its meta
    // among them) and the replacement's after them, more chunks than that meta declares.
    let writes = Arc::new(Mutex::new(0));
    watched.arm(At::ResumedScan, replace_hook(&writer, &replacement, &writes));
    let err =
        migrator.migrate(&req(&actor, 1)).await.err().context("migrated a v1 replaced in the middle of its read")?;
    watched.hook_ran().context("the replacement between the scans")?;
    let seen = watched.take_seen();
    let expected = vec![
        // The migration's first batch, then the streaming pass's first scan: the original.
        Seen::Scan { resumed: false, rows: SCAN_BATCH },
        Seen::Scan { resumed: false, rows: SCAN_BATCH },
        Seen::Hook(At::ResumedScan),
        // The replacement's rows after the first SCAN_BATCH.
        Seen::Scan { resumed: true, rows: after + 1 - SCAN_BATCH },
        // The rejection of the torn rows is put to the store, which says v1 changed.
        Seen::Confirmation { of_sqlite_range: true, ok: false },
    ];
    ensure!(seen == expected, "the store saw {seen:?}, expected {expected:?} ({err})");
    let n = *writes.lock().unwrap();
    ensure!(n > after - before && n < after / 4, "{n} writes in the replacement ({before} -> {after} chunks)");
    ensure!(matches!(err.cause, Cause::V1Changed) && err.phase == Phase::Read, "{err}");
    ensure!(err.fate() == Fate::Retry, "fate {:?} of {err}", err.fate());
    let writer = writer.lock().await;
    ensure_untouched_after_v1_changed(&*ts.store, &actor, &writer).await?;
    let v1 = read_v1(&*ts.store, &actor, ReadOptions::default()).await.context("v1 after the replacement")?;
    ensure_bytes_eq(&v1.main, &replacement, "v1 vs the replacement")?;

    // The retry reads the replacement whole and migrates it.
    ensure_retry_migrates(&migrator, &watched, &*ts.store, &writer, 2).await?;
    ensure_bytes_eq(&writer.main, &replacement, "the writer's main file")
}

async fn a_rejection_stands_only_if_v1_is_unchanged_when_it_is_confirmed(backend: Backend) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let actor = ts.actor("rejected-then-rewritten");
    let clock = ManualClock::new(START_MS);
    // A small database that fails quick_check (read in one scan), and a good one: the same
    // database with rows appended, as the runtime's next write leaves it.
    let spec = DbSpec::small(501);
    let corrupt = scribbled(&spec).map_err(|e| anyhow!(e)).context("the scribbled database")?;
    let good = database(&DbSpec { rows: spec.rows + 5, ..spec }).map_err(|e| anyhow!(e)).context("the good one")?;
    // SQLite may refuse the scribbled file outright rather than list what is wrong.
    ensure!(!integrity_check(&corrupt).is_ok_and(|r| r == "ok"), "the scribbled database passes integrity_check");
    ensure!(integrity_check(&good).map_err(|e| anyhow!(e))? == "ok", "the good database fails");
    let (corrupt_chunks, good_chunks) = (corrupt.len().div_ceil(CHUNK_SIZE), good.len().div_ceil(CHUNK_SIZE));
    ensure!(corrupt_chunks.max(good_chunks) + 1 < SCAN_BATCH, "read in one scan");
    let writer = Writer::plant(Sink::Direct(ts.store()), &actor, &corrupt).await?;
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let watched = Watched::new(ts.store(), &actor);
    let cfg = MigrateConfig { worker_id: "worker-confirmed".into(), ..MigrateConfig::default() };
    let migrator = Migrator::new(watched.clone(), clock.clone(), cfg);

    // Control: v1 stands still; the rejection is confirmed by one check-only commit and stands.
    let err = migrator.migrate(&req(&actor, 1)).await.err().context("migrated a database that fails quick_check")?;
    ensure!(
        matches!(&err.cause, Cause::Rejected(r) if r.reason() == DeadLetterReason::IntegrityCheckFailed)
            && err.phase == Phase::Validate,
        "{err}"
    );
    ensure!(err.fate() == Fate::DeadLetter(DeadLetterReason::IntegrityCheckFailed), "fate {:?}", err.fate());
    let seen = watched.take_seen();
    let confirmed = vec![
        Seen::Scan { resumed: false, rows: corrupt_chunks + 1 },
        Seen::Confirmation { of_sqlite_range: true, ok: true },
    ];
    ensure!(seen == confirmed, "the store saw {seen:?}, expected {confirmed:?}");
    ensure_untouched_after_v1_changed(&*ts.store, &actor, &*writer.lock().await).await?;

    // The same job again (requeued): between the rejection and its confirmation, the runtime
    // rewrites v1 to the good database in one transaction. The rejection was of a v1 that
    // is gone: v1_changed, retried.
    let writes = Arc::new(Mutex::new(0));
    watched.arm(At::Confirmation, replace_hook(&writer, &good, &writes));
    let err = migrator
        .migrate(&req(&actor, 1))
        .await
        .err()
        .context("migrated after a rejection, with v1 rewritten under it")?;
    watched.hook_ran().context("the rewrite before the confirmation")?;
    let seen = watched.take_seen();
    let overtaken = vec![
        Seen::Scan { resumed: false, rows: corrupt_chunks + 1 },
        Seen::Hook(At::Confirmation),
        Seen::Confirmation { of_sqlite_range: true, ok: false },
    ];
    ensure!(seen == overtaken, "the store saw {seen:?}, expected {overtaken:?} ({err})");
    ensure!(*writes.lock().unwrap() >= 1, "the rewrite wrote nothing");
    ensure!(matches!(err.cause, Cause::V1Changed) && err.phase == Phase::Validate, "{err}");
    ensure!(err.fate() == Fate::Retry, "fate {:?} of {err}", err.fate());
    let writer = writer.lock().await;
    ensure_untouched_after_v1_changed(&*ts.store, &actor, &writer).await?;
    let v1 = read_v1(&*ts.store, &actor, ReadOptions::default()).await.context("v1 after the rewrite")?;
    ensure_bytes_eq(&v1.main, &good, "v1 vs the good database")?;

    // The retry migrates the good database, byte for byte.
    ensure_retry_migrates(&migrator, &watched, &*ts.store, &writer, 2).await?;
    ensure_bytes_eq(&writer.main, &good, "the writer's main file")
}

async fn a_journal_that_appears_while_the_probe_reads_is_v1_changed_and_a_journal_that_stays_is_dead_lettered(
    backend: Backend,
) -> Result<()> {
    let ts = TestStore::new(backend).await;
    let actor = ts.actor("journal-appears");
    let clock = ManualClock::new(START_MS);
    // Over SCAN_BATCH chunks, so the read probes the metas and files with separate reads; the
    // journal is a real hot journal of the same database.
    let files = hot_journal(&DbSpec::sized(1_100_000, 402), 3).map_err(|e| anyhow!(e)).context("a hot journal")?;
    let journal = files.journal.clone().context("the fixture has a journal")?;
    ensure!(files.main.len().div_ceil(CHUNK_SIZE) + 1 > SCAN_BATCH, "read in one scan");
    write_v1(&*ts.store, &actor, &DbFiles { journal: None, ..files.clone() }).await?;
    let watched = Watched::new(ts.store(), &actor);
    let cfg = MigrateConfig { worker_id: "worker-journal".into(), ..MigrateConfig::default() };
    let migrator = Migrator::new(watched.clone(), clock.clone(), cfg);

    // The runtime opens a write transaction (its journal appears, meta and chunks in one
    // commit) after the probe read the metas and before it looks for journal chunks: the probe
    // sees journal chunks without a meta, a state v1 never was in.
    let (store, a) = (ts.store(), actor.clone());
    watched.arm(
        At::JournalProbe,
        Box::pin(async move {
            let mut txn = Txn::new();
            for (key, value) in file_entries(&a, FileTag::Journal, &journal) {
                txn.set(key, value);
            }
            store.commit(txn).await.context("writing the journal")
        }),
    );
    let err = migrator.migrate(&req(&actor, 1)).await.err().context("migrated an actor with a journal")?;
    watched.hook_ran().context("the journal written during the probe")?;
    ensure!(matches!(err.cause, Cause::V1Changed) && err.phase == Phase::Read, "{err}");
    ensure!(err.fate() == Fate::Retry, "fate {:?} of {err}", err.fate());
    let seen = watched.take_seen();
    ensure!(seen.contains(&Seen::Confirmation { of_sqlite_range: false, ok: false }), "{seen:?}");
    ensure!(rows(&*ts.store, &KeyRange::prefix(&v2_prefix(&actor))).await?.is_empty(), "v2 written");

    // The journal stays: the retry's rejection is confirmed, and the actor is dead-lettered.
    let err = migrator.migrate(&req(&actor, 2)).await.err().context("migrated an actor with a journal")?;
    ensure!(err.fate() == Fate::DeadLetter(DeadLetterReason::JournalSidecar), "{err}");
    let seen = watched.take_seen();
    ensure!(seen.contains(&Seen::Confirmation { of_sqlite_range: false, ok: true }), "{seen:?}");
    ensure!(rows(&*ts.store, &KeyRange::prefix(&v2_prefix(&actor))).await?.is_empty(), "v2 written");
    let v1 = read_v1(&*ts.store, &actor, ReadOptions { ignore_sidecars: true, ..ReadOptions::default() }).await?;
    ensure_bytes_eq(&v1.main, &files.main, "v1 main after both attempts")
}
