//! Group commit: transactions of different actors that are ready at about the same time are
//! committed together, several per store transaction ([`Store::commit_many`]), so a campaign of
//! small actors pays one commit (one WAL flush on PostgreSQL) per group, not per actor.
//!
//! Invariants:
//! - each transaction keeps its own checks and gets its own outcome: a transaction whose check
//!   fails writes nothing and fails alone, the others of its group commit ([`Store::commit_many`]
//!   evaluates each transaction's checks on its own, in order);
//! - a failure of a group's store transaction as a whole (unavailable, serialization failure
//!   past its retries, an error in one transaction's writes) never becomes the verdict on all
//!   of its transactions: each is committed again alone ([`Store::commit`]), so one bad
//!   transaction fails only itself. When that failure hid a commit that landed (the connection
//!   lost at `COMMIT`), the retry alone fails its first check on its own write: a conflict, so
//!   the migration inspects again, finds the actor migrated and records the skip (the
//!   migration's audit fields kept; counted as `skipped_already_migrated`, not `migrated`);
//! - a group never writes more than the store's transaction limit ([`MAX_TXN_WRITE_BYTES`]) and
//!   never holds more than [`GroupConfig::max_txns`] transactions;
//! - a transaction waits at most [`GroupConfig::max_wait`] for others to join it, and not at all
//!   once every migration that could still join ([`GroupCommitter::enter`]) is waiting in the
//!   group: nobody else can come, so waiting would only add latency;
//! - the caller is answered only after its transaction's outcome is durable (or failed), so an
//!   ack that follows the answer follows that actor's own durable outcome.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};

use super::limits::MAX_TXN_WRITE_BYTES;
use super::{DynStore, Store, StoreError, Txn};
use crate::metrics as m;

/// Default longest wait for a group to fill (`--group-wait-ms`).
pub const DEFAULT_GROUP_WAIT: Duration = Duration::from_millis(3);
/// Default most transactions in one group (`--group-max`).
pub const DEFAULT_GROUP_MAX: usize = 64;

/// How transactions are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    /// The longest a transaction waits for others to join its group.
    pub max_wait: Duration,
    /// Most transactions in one group; 1 turns grouping off (every commit alone).
    pub max_txns: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig { max_wait: DEFAULT_GROUP_WAIT, max_txns: DEFAULT_GROUP_MAX }
    }
}

impl GroupConfig {
    /// Grouping off: every transaction commits alone, at once.
    pub fn off() -> GroupConfig {
        GroupConfig { max_wait: Duration::ZERO, max_txns: 1 }
    }

    pub fn is_off(&self) -> bool {
        self.max_txns <= 1
    }
}

/// A transaction waiting for its group, and where its outcome goes.
struct Pending {
    txn: Txn,
    bytes: usize,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// What the committer task and its callers share.
struct Shared {
    /// Migrations that may still submit a transaction (see [`GroupCommitter::enter`]).
    active: AtomicUsize,
    /// Woken when `active` drops, so a full group does not wait out its window.
    left: Notify,
}

/// Commits transactions in groups. Cheap to clone; the committer task starts on first use and
/// ends when the last clone is dropped.
#[derive(Clone)]
pub struct GroupCommitter {
    store: DynStore,
    cfg: GroupConfig,
    shared: Arc<Shared>,
    tx: Arc<OnceLock<mpsc::UnboundedSender<Pending>>>,
}

/// A migration that may still submit a transaction to the group, until dropped.
pub struct Entered {
    shared: Arc<Shared>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
        self.shared.left.notify_one();
    }
}

impl GroupCommitter {
    pub fn new(store: DynStore, cfg: GroupConfig) -> GroupCommitter {
        GroupCommitter {
            store,
            cfg,
            shared: Arc::new(Shared { active: AtomicUsize::new(0), left: Notify::new() }),
            tx: Arc::new(OnceLock::new()),
        }
    }

    pub fn config(&self) -> GroupConfig {
        self.cfg
    }

    /// Counts a migration that may submit a transaction until the guard is dropped: a group
    /// holding a transaction of every entered migration is committed without waiting.
    pub fn enter(&self) -> Entered {
        self.shared.active.fetch_add(1, Ordering::AcqRel);
        Entered { shared: Arc::clone(&self.shared) }
    }

    /// Commits `txn` in the next group; answers with its own outcome once it is durable.
    pub async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        if self.cfg.is_off() {
            return self.store.commit(txn).await;
        }
        let (reply, answer) = oneshot::channel();
        let bytes = txn.write_bytes();
        let sender = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(self.store.clone(), self.cfg, Arc::clone(&self.shared), rx));
            tx
        });
        if let Err(mpsc::error::SendError(pending)) = sender.send(Pending { txn, bytes, reply }) {
            // The committer task is gone (it can only end by a panic): commit alone.
            return self.store.commit(pending.txn).await;
        }
        // No answer: the task died with the transaction in a group whose fate is unknown, as
        // after a commit that lost its connection (transient; the checks make a retry safe).
        answer.await.unwrap_or_else(|_| Err(gone()))
    }
}

fn gone() -> StoreError {
    StoreError::Unavailable { backend: "group", message: "the group committer stopped".into() }
}

/// The committer task: gathers a group, commits it, answers each transaction, repeats.
async fn run(store: DynStore, cfg: GroupConfig, shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let deadline = tokio::time::Instant::now() + cfg.max_wait;
        let mut bytes = first.bytes;
        let mut group = vec![first];
        while group.len() < cfg.max_txns && group.len() < shared.active.load(Ordering::Acquire) {
            let next = tokio::select! {
                next = rx.recv() => next,
                () = shared.left.notified() => continue,
                () = tokio::time::sleep_until(deadline) => break,
            };
            let Some(next) = next else { break };
            if bytes + next.bytes > MAX_TXN_WRITE_BYTES {
                // The next group starts with it: this one stays within the write limit.
                carried = Some(next);
                break;
            }
            bytes += next.bytes;
            group.push(next);
        }
        commit_group(&*store, group).await;
    }
}

/// Commits one group and answers each of its transactions.
async fn commit_group(store: &dyn Store, group: Vec<Pending>) {
    metrics::histogram!(m::GROUP_SIZE).record(group.len() as f64);
    let (txns, replies): (Vec<Txn>, Vec<_>) = group.into_iter().map(|p| (p.txn, p.reply)).unzip();
    if txns.len() == 1 {
        // A group of one is a plain commit.
        if let (Some(txn), Some(reply)) = (txns.into_iter().next(), replies.into_iter().next()) {
            let _ = reply.send(store.commit(txn).await);
        }
        return;
    }
    for (result, reply) in commit_each(store, txns).await.into_iter().zip(replies) {
        // A caller that went away (its job aborted) needs no answer.
        let _ = reply.send(result);
    }
}

/// Commits `txns` together ([`Store::commit_many`]) and commits again alone each one whose
/// error may be its group's, not its own ([`fails_the_group`]), so one bad transaction fails
/// only itself. Result `i` is transaction `i`'s.
pub async fn commit_each(store: &dyn Store, txns: Vec<Txn>) -> Vec<Result<(), StoreError>> {
    // Kept for a retry alone, should the group's store transaction fail as a whole.
    let copies = txns.clone();
    let results = store.commit_many(txns).await;
    let mut out = Vec::with_capacity(results.len());
    for (result, txn) in results.into_iter().zip(copies) {
        out.push(match result {
            Err(e) if fails_the_group(&e) => store.commit(txn).await,
            own => own,
        });
    }
    out
}

/// Whether an error of a grouped transaction may be the group's, not its own: everything but
/// its own failed check and its own limit.
fn fails_the_group(e: &StoreError) -> bool {
    match e {
        StoreError::Conflict { .. }
        | StoreError::ValueTooLarge { .. }
        | StoreError::KeyTooLarge { .. }
        | StoreError::TransactionTooLarge { .. }
        // Rows its own checks read, or an operation its own keys ask for.
        | StoreError::Corrupt { .. }
        | StoreError::Unsupported { .. } => false,
        StoreError::Unavailable { .. }
        | StoreError::Failed { .. }
        | StoreError::InvalidUrl(_)
        | StoreError::Missing { .. } => true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::store::{KeyRange, KeyValue};

    /// A store that records the groups it is asked to commit (sizes) and commits nothing.
    #[derive(Default)]
    struct Recorder {
        groups: Mutex<Vec<usize>>,
        alone: Mutex<usize>,
        /// Fail every group as a whole (the single commits succeed).
        fail_groups: bool,
    }

    #[async_trait]
    impl Store for Recorder {
        async fn get(&self, _: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(None)
        }
        async fn scan(&self, _: &KeyRange, _: usize) -> Result<Vec<KeyValue>, StoreError> {
            Ok(Vec::new())
        }
        async fn first_key(&self, _: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(None)
        }
        async fn commit(&self, _: Txn) -> Result<(), StoreError> {
            *self.alone.lock().unwrap() += 1;
            Ok(())
        }
        async fn commit_many(&self, txns: Vec<Txn>) -> Vec<Result<(), StoreError>> {
            self.groups.lock().unwrap().push(txns.len());
            let failure = StoreError::Unavailable { backend: "test", message: "group failed".into() };
            txns.iter().map(|_| if self.fail_groups { Err(failure.clone()) } else { Ok(()) }).collect()
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    fn txn(bytes: usize) -> Txn {
        let mut txn = Txn::new();
        let mut left = bytes;
        let mut i = 0u32;
        while left > 4 {
            let value = (left - 4).min(crate::store::limits::MAX_VALUE_BYTES);
            txn.set(i.to_be_bytes().to_vec(), vec![0u8; value]);
            left -= value + 4;
            i += 1;
        }
        txn
    }

    fn committer(store: &Arc<Recorder>, max_txns: usize) -> GroupCommitter {
        let dyn_store: DynStore = store.clone();
        GroupCommitter::new(dyn_store, GroupConfig { max_wait: Duration::from_millis(5), max_txns })
    }

    #[tokio::test(start_paused = true)]
    async fn transactions_ready_within_the_wait_commit_in_one_group_and_a_later_one_in_the_next() {
        let store = Arc::new(Recorder::default());
        let group = committer(&store, 64);
        // Ten migrations entered; only three submit now, so the group waits out its window.
        let guards: Vec<_> = (0..10).map(|_| group.enter()).collect();
        let started = tokio::time::Instant::now();
        let (a, b, c) = tokio::join!(group.commit(txn(100)), group.commit(txn(100)), group.commit(txn(100)));
        assert!(a.is_ok() && b.is_ok() && c.is_ok());
        assert_eq!(started.elapsed(), Duration::from_millis(5), "the group waited exactly its window");
        tokio::time::sleep(Duration::from_millis(20)).await;
        group.commit(txn(100)).await.unwrap();
        // Alone in its window: a group of one is a plain commit.
        assert_eq!(*store.groups.lock().unwrap(), vec![3]);
        assert_eq!(*store.alone.lock().unwrap(), 1);
        drop(guards);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_holding_every_entered_migration_commits_without_waiting() {
        let store = Arc::new(Recorder::default());
        let group = committer(&store, 64);
        let guards: Vec<_> = (0..4).map(|_| group.enter()).collect();
        let started = tokio::time::Instant::now();
        let results = futures::future::join_all((0..4).map(|_| group.commit(txn(100)))).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(started.elapsed(), Duration::ZERO, "nobody else could join: no wait");
        assert_eq!(*store.groups.lock().unwrap(), vec![4]);
        drop(guards);
    }

    #[tokio::test(start_paused = true)]
    async fn a_migration_leaving_ends_the_wait_of_a_group_holding_all_the_others() {
        let store = Arc::new(Recorder::default());
        let group = committer(&store, 64);
        let mut guards: Vec<_> = (0..3).map(|_| group.enter()).collect();
        let leaver = guards.pop();
        let started = tokio::time::Instant::now();
        let commits = futures::future::join_all((0..2).map(|_| group.commit(txn(100))));
        let leave = async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            drop(leaver);
        };
        let (results, ()) = tokio::join!(commits, leave);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(started.elapsed(), Duration::from_millis(1), "committed when the third left, not at 5 ms");
        assert_eq!(*store.groups.lock().unwrap(), vec![2]);
        drop(guards);
    }

    #[tokio::test(start_paused = true)]
    async fn groups_stay_within_the_transaction_limit_and_the_size_bound() {
        let store = Arc::new(Recorder::default());
        let group = committer(&store, 3);
        let guards: Vec<_> = (0..8).map(|_| group.enter()).collect();
        // 4 MB each: two fit under 10 MB, a third starts the next group.
        let big = futures::future::join_all((0..4).map(|_| group.commit(txn(4_000_000)))).await;
        assert!(big.iter().all(Result::is_ok));
        assert_eq!(*store.groups.lock().unwrap(), vec![2, 2]);
        store.groups.lock().unwrap().clear();
        // Small ones: at most `max_txns` (3) per group.
        let small = futures::future::join_all((0..7).map(|_| group.commit(txn(100)))).await;
        assert!(small.iter().all(Result::is_ok));
        let sizes = store.groups.lock().unwrap().clone();
        assert!(sizes.iter().all(|&n| n <= 3), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>() + *store.alone.lock().unwrap(), 7, "{sizes:?}");
        drop(guards);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_failing_as_a_whole_commits_each_transaction_again_alone() {
        let store = Arc::new(Recorder { fail_groups: true, ..Recorder::default() });
        let group = committer(&store, 64);
        let guards: Vec<_> = (0..3).map(|_| group.enter()).collect();
        let results = futures::future::join_all((0..3).map(|_| group.commit(txn(100)))).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(*store.groups.lock().unwrap(), vec![3]);
        assert_eq!(*store.alone.lock().unwrap(), 3, "each one retried alone");
        drop(guards);
    }

    #[tokio::test]
    async fn grouping_off_commits_each_transaction_at_once() {
        let store = Arc::new(Recorder::default());
        let dyn_store: DynStore = store.clone();
        let group = GroupCommitter::new(dyn_store, GroupConfig::off());
        group.commit(txn(100)).await.unwrap();
        group.commit(txn(100)).await.unwrap();
        assert!(store.groups.lock().unwrap().is_empty());
        assert_eq!(*store.alone.lock().unwrap(), 2);
    }
}
