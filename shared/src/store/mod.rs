//! The storage interface: one ordered byte-key map with atomic, checked transactions.
//!
//! Every backend (`sqlite:PATH`, `postgres://...`) implements [`Store`]. The contract, which
//! the shared suite in `shared/tests/store_contract.rs` checks against every backend:
//!
//! - keys sort bytewise (memcmp; a shorter key sorts before any key it prefixes);
//! - [`Store::scan`] returns keys of a half-open [`KeyRange`] in ascending order, at most
//!   `limit` of them;
//! - [`Store::commit`] is atomic: either every [`Check`] holds and every [`Mutation`] is
//!   applied, or nothing is written and the first failing check is reported as
//!   [`StoreError::Conflict`];
//! - [`Store::read_many`] returns, for each [`Read`] in order, what [`Store::get`] or
//!   [`Store::scan`] would return for it;
//! - [`Store::commit_many`] gives each [`Txn`] of a group the outcome [`Store::commit`] would
//!   give it, committed in order: a transaction whose check fails (or that breaks a limit)
//!   writes nothing and does not affect the others; a later transaction's checks see the
//!   writes of the earlier ones;
//! - the FoundationDB-shaped [`limits`] are enforced before anything is sent, in every backend,
//!   so a write that would not fit a third backend fails in tests and not in production.
//!
//! Transactions are optimistic: a caller reads, decides, then commits with checks on what it
//! read (the value of a key, or the digest of a whole range). This is how generation fencing,
//! lease ownership and v1 change detection are made atomic without holding a transaction open
//! across async work.

pub(crate) mod fold;
pub mod group;
pub mod limits;
pub mod postgres;
pub(crate) mod serializable;
pub mod sqlite;
pub(crate) mod url;

use std::sync::Arc;

use async_trait::async_trait;

use crate::layout::Layout;
use xxhash_rust::xxh3::Xxh3;

pub use self::url::{StoreUrl, redact as redact_url};

/// One key and its value, as returned by a scan.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// A shared handle on any backend.
pub type DynStore = Arc<dyn Store>;

/// What [`Store::read_many_then`] does with its reads' answers: a cheap look at them, which
/// may hand back CPU work to run off the async threads.
pub type AfterRead = Box<dyn FnOnce(Vec<ReadResult>) -> Option<Work> + Send + 'static>;

/// CPU work on what a read answered ([`AfterRead`]).
pub type Work = Box<dyn FnOnce() + Send + 'static>;

/// What the look at a read's answers decided ([`read_then`]).
pub enum Then<T> {
    /// Nothing more to do: the result.
    Done(T),
    /// CPU work that makes the result, run off the async threads.
    Work(Box<dyn FnOnce() -> T + Send + 'static>),
}

/// [`Store::read_many_then`] with a result: `reads`, then `then` on their answers, then the
/// work `then` hands back (if any) off the async threads, in the same blocking call as the
/// reads where the backend has one.
pub async fn read_then<T: Send + 'static>(
    store: &dyn Store,
    reads: &[Read],
    then: impl FnOnce(Vec<ReadResult>) -> Then<T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let after: AfterRead = Box::new(move |answers| match then(answers) {
        // The receiver waits below, so neither send can fail.
        Then::Done(result) => {
            let _ = tx.send(result);
            None
        }
        Then::Work(work) => Some(Box::new(move || {
            let _ = tx.send(work());
        })),
    });
    store.read_many_then(reads, after).await?;
    rx.await.map_err(|_| StoreError::Failed { backend: "store", message: "the work after a read did not run".into() })
}

/// The failure of [`Store::read_many_then`]'s work (it panicked): no answer of the store's.
pub(crate) fn after_read_failed(e: tokio::task::JoinError) -> StoreError {
    StoreError::Failed { backend: "store", message: format!("the work after a read failed: {e}") }
}

/// A half-open key range `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

impl KeyRange {
    pub fn new(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        KeyRange { start: start.into(), end: end.into() }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Self {
        KeyRange { start: prefix.to_vec(), end: prefix_end(prefix) }
    }

    /// The same range, starting just after `key` (to continue a scan that stopped at `key`).
    pub fn after(&self, key: &[u8]) -> Self {
        let mut start = key.to_vec();
        start.push(0);
        KeyRange { start, end: self.end.clone() }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && key < self.end.as_slice()
    }
}

/// The first key after every key that starts with `prefix` (FoundationDB's `strinc`).
///
/// An all-`0xff` prefix has no such key inside the keyspace ferry uses, so it maps to a
/// key no ferry key reaches.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last != 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; 16]
}

/// A condition a transaction checks, atomically with its writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The key holds exactly this value (`None`: the key is absent).
    Value { key: Vec<u8>, expected: Option<Vec<u8>> },
    /// The rows of the range hash to this digest (see [`RangeDigest`]).
    RangeDigest { range: KeyRange, expected: u128 },
}

/// A write inside a transaction, applied in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutation {
    Set { key: Vec<u8>, value: Vec<u8> },
    Clear { key: Vec<u8> },
    ClearRange { range: KeyRange },
}

/// One read of a [`Store::read_many`] batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Read {
    /// What [`Store::get`] returns for the key.
    Get(Vec<u8>),
    /// What [`Store::scan`] returns for the range and limit.
    Scan { range: KeyRange, limit: usize },
}

/// What one [`Read`] of a batch returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadResult {
    /// The answer to a [`Read::Get`].
    Value(Option<Vec<u8>>),
    /// The answer to a [`Read::Scan`].
    Rows(Vec<KeyValue>),
}

impl ReadResult {
    /// The value a [`Read::Get`] found (a scan's answer has no one value: `None`).
    pub fn into_value(self) -> Option<Vec<u8>> {
        match self {
            ReadResult::Value(v) => v,
            ReadResult::Rows(_) => None,
        }
    }

    /// The rows a [`Read::Scan`] found (a get's answer has no rows: empty).
    pub fn into_rows(self) -> Vec<KeyValue> {
        match self {
            ReadResult::Rows(rows) => rows,
            ReadResult::Value(_) => Vec::new(),
        }
    }
}

/// Checks and writes committed atomically by [`Store::commit`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub checks: Vec<Check>,
    pub mutations: Vec<Mutation>,
}

impl Txn {
    pub fn new() -> Self {
        Txn::default()
    }

    pub fn check_value(&mut self, key: impl Into<Vec<u8>>, expected: Option<Vec<u8>>) -> &mut Self {
        self.checks.push(Check::Value { key: key.into(), expected });
        self
    }

    pub fn check_range_digest(&mut self, range: KeyRange, expected: u128) -> &mut Self {
        self.checks.push(Check::RangeDigest { range, expected });
        self
    }

    pub fn set(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.mutations.push(Mutation::Set { key: key.into(), value: value.into() });
        self
    }

    pub fn clear(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.mutations.push(Mutation::Clear { key: key.into() });
        self
    }

    pub fn clear_range(&mut self, range: KeyRange) -> &mut Self {
        self.mutations.push(Mutation::ClearRange { range });
        self
    }

    /// Bytes this transaction writes, counted as FoundationDB counts them (keys and values).
    pub fn write_bytes(&self) -> usize {
        self.mutations
            .iter()
            .map(|m| match m {
                Mutation::Set { key, value } => key.len() + value.len(),
                Mutation::Clear { key } => key.len(),
                Mutation::ClearRange { range } => range.start.len() + range.end.len(),
            })
            .sum()
    }
}

/// A digest of the rows of a range: xxh3-128 over `u32 BE key length ++ key ++ u32 BE value
/// length ++ value` for each row in key order. Used to detect that v1 changed between the
/// read and the finalize of a migration; not a security boundary.
#[derive(Default)]
pub struct RangeDigest(Xxh3);

impl RangeDigest {
    pub fn new() -> Self {
        RangeDigest(Xxh3::new())
    }

    pub fn update(&mut self, key: &[u8], value: &[u8]) {
        // Lengths fit u32: keys and values are bounded by `limits` far below 4 GiB.
        self.0.update(&(key.len() as u32).to_be_bytes());
        self.0.update(key);
        self.0.update(&(value.len() as u32).to_be_bytes());
        self.0.update(value);
    }

    pub fn finish(&self) -> u128 {
        self.0.digest128()
    }
}

/// Why a store operation failed. `Clone`: every transaction of a group committed as one
/// store transaction gets that transaction's error ([`Store::commit_many`]).
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// A check of the transaction did not hold; nothing was written.
    #[error("transaction check {index} failed on key {}", crate::keys::printable(key))]
    Conflict { index: usize, key: Vec<u8> },
    /// The backend could not be reached or refused for a passing reason (busy, restarting,
    /// serialization failure, dropped connection).
    #[error("{backend} store unavailable: {message}")]
    Unavailable { backend: &'static str, message: String },
    /// The backend failed in a way that retrying will not fix (schema, permissions, corrupt
    /// file).
    #[error("{backend} store failed: {message}")]
    Failed { backend: &'static str, message: String },
    #[error("value of {} bytes for key {} is over the {max}-byte limit", size, crate::keys::printable(key))]
    ValueTooLarge { key: Vec<u8>, size: usize, max: usize },
    #[error("key of {size} bytes is over the {max}-byte limit")]
    KeyTooLarge { size: usize, max: usize },
    #[error("transaction writes {size} bytes, over the {max}-byte limit")]
    TransactionTooLarge { size: usize, max: usize },
    #[error("invalid store URL: {0}")]
    InvalidUrl(String),
    /// The rows behind logical key `key` do not make a value its layout can read (rivet: DATA
    /// rows without their METADATA row, a chunked v2 value missing a chunk). Named by the
    /// logical key; never a partial value. `detail` never quotes row contents.
    #[error("rows of key {} are corrupt: {detail}", crate::keys::printable(key))]
    Corrupt { key: Vec<u8>, detail: String },
    /// The operation cannot be expressed in the store's layout (a range across key families,
    /// a v1 write outside a fixture load, a key no family holds).
    #[error("not possible in the {layout} layout: {detail}")]
    Unsupported { layout: &'static str, detail: String },
    /// An [`OpenMode::Existing`] open found no store (no file, schema or `kv` table) at the
    /// URL; nothing was created.
    #[error("no ferry store at {url}: {what}")]
    Missing { url: String, what: String },
}

impl StoreError {
    /// Whether retrying the same operation later can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Conflict { .. } | StoreError::Unavailable { .. } => true,
            StoreError::Failed { .. }
            | StoreError::ValueTooLarge { .. }
            | StoreError::KeyTooLarge { .. }
            | StoreError::TransactionTooLarge { .. }
            | StoreError::InvalidUrl(_)
            | StoreError::Corrupt { .. }
            | StoreError::Unsupported { .. }
            | StoreError::Missing { .. } => false,
        }
    }
}

/// The ordered key-value store every part of ferry runs on. See the module docs for the
/// contract each implementation keeps.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The value of `key`, if present.
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` rows of `range`, in ascending key order.
    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError>;

    /// The first key inside `range` (at or after its start), for skip-scans.
    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` keys of `range` in ascending order, without their values (the keyspace
    /// scan reads many small actors per call this way). Backends override this default to
    /// avoid reading the values.
    async fn scan_keys(&self, range: &KeyRange, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self.scan(range, limit).await?.into_iter().map(|(k, _)| k).collect())
    }

    /// Applies `txn` atomically, or reports the first check that failed.
    async fn commit(&self, txn: Txn) -> Result<(), StoreError>;

    /// Every read of `reads`, answers in the same order: each what [`Store::get`] or
    /// [`Store::scan`] would return for it. A failure of any read fails the batch. Backends
    /// override this default (one read after the other) to answer the batch in one call (one
    /// blocking call on SQLite, one pipelined round trip on PostgreSQL); callers never rely on
    /// the reads sharing a snapshot: what they decide from them is checked at commit.
    async fn read_many(&self, reads: &[Read]) -> Result<Vec<ReadResult>, StoreError> {
        let mut out = Vec::with_capacity(reads.len());
        for read in reads {
            out.push(match read {
                Read::Get(key) => ReadResult::Value(self.get(key).await?),
                Read::Scan { range, limit } => ReadResult::Rows(self.scan(range, *limit).await?),
            });
        }
        Ok(out)
    }

    /// Reads `reads` as [`Store::read_many`] does, hands the answers to `then` (a cheap look),
    /// and runs the CPU work `then` hands back, if any (a small actor's validation), off the
    /// async threads. The default reads, runs `then` where it is, and the work in a blocking
    /// call of its own; a backend whose reads are a blocking call already (SQLite) runs both at
    /// the end of that call, after it let its connection go, saving a thread hop per job.
    /// Nothing runs unless every read succeeded; [`read_then`] gives the result back.
    async fn read_many_then(&self, reads: &[Read], then: AfterRead) -> Result<(), StoreError> {
        let answers = self.read_many(reads).await?;
        match then(answers) {
            Some(work) => tokio::task::spawn_blocking(work).await.map_err(after_read_failed),
            None => Ok(()),
        }
    }

    /// Commits each transaction of `txns` as [`Store::commit`] would, in order, as if one after
    /// the other: result `i` is transaction `i`'s own. A transaction whose check fails
    /// ([`StoreError::Conflict`], its own index) or that breaks a limit writes nothing and
    /// does not affect the others; a transaction's checks see the writes of those before it.
    ///
    /// Backends override this default (one [`Store::commit`] after the other) to commit several
    /// transactions in one store transaction (one WAL flush), never over the [`limits`] of one
    /// transaction in total. A failure of that store transaction itself (unavailable, a
    /// serialization failure past its retries) is the result of every transaction in it, none
    /// of which was applied (or, as for [`Store::commit`], it is unknown whether it was).
    async fn commit_many(&self, txns: Vec<Txn>) -> Vec<Result<(), StoreError>> {
        let mut out = Vec::with_capacity(txns.len());
        for txn in txns {
            out.push(self.commit(txn).await);
        }
        out
    }

    /// The physical layout behind the logical keys (DESIGN.md section 7).
    fn layout(&self) -> Layout {
        Layout::Ferry
    }

    /// Up to about `limit` v1 actors whose keys lie in `range` (a range of `v1/` logical keys,
    /// from its start), each with whether it has v1 SQLite data, and the logical key where the
    /// next batch starts (`None`: the range is done). The default skip-scans logical keys,
    /// which sort as the physical ones; a layout whose actors sort otherwise overrides it and
    /// returns cursors only it needs to understand.
    async fn v1_actors(&self, range: &KeyRange, limit: usize) -> Result<crate::scan::ActorBatch, StoreError> {
        crate::scan::logical_actor_batch(self, range, limit).await
    }

    /// The URL this store was opened with, password removed, for logs.
    fn describe(&self) -> String;
}

/// Whether opening a store may create it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the file and its directories (SQLite) or the schema and table (PostgreSQL) if
    /// missing: for the commands that load data (`seed`, `import`, `local --seed-demo`).
    Create,
    /// The store must exist already: a missing one is [`StoreError::Missing`] and nothing is
    /// created. Every other command opens this way, so a mistyped URL fails instead of
    /// running a campaign against a new empty store.
    #[default]
    Existing,
}

/// How to open a store.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Connections (PostgreSQL) or reader connections (SQLite).
    pub pool_size: usize,
    pub mode: OpenMode,
    /// Time bounds of every PostgreSQL session (ignored by SQLite).
    pub session: postgres::SessionLimits,
    /// Which rows the store holds; `rivet` needs `postgres://...`.
    pub layout: Layout,
    /// rivet layout only: v1 rows may be written (`seed` and `import` loading fixtures; no
    /// migration ever writes v1).
    pub v1_writes: bool,
    /// rivet layout only, with [`OpenMode::Create`]: create rivet's own objects in an empty
    /// schema (`seed --create-rivet-schema`, a rehearsal); refused where `kv` exists.
    pub create_rivet_schema: bool,
}

impl OpenOptions {
    pub fn new(pool_size: usize, mode: OpenMode) -> OpenOptions {
        OpenOptions {
            pool_size,
            mode,
            session: postgres::SessionLimits::default(),
            layout: Layout::Ferry,
            v1_writes: false,
            create_rivet_schema: false,
        }
    }

    pub fn layout(mut self, layout: Layout) -> OpenOptions {
        self.layout = layout;
        self
    }

    /// Session bounds derived from the lease TTL of the workers using the store.
    pub fn lease_ttl(mut self, ttl: std::time::Duration) -> OpenOptions {
        self.session = postgres::SessionLimits::for_lease_ttl(ttl);
        self
    }
}

/// Opens the backend a URL names (`sqlite:PATH` or `postgres://...`), creating it if missing.
pub async fn open(url: &str, pool_size: usize) -> Result<DynStore, StoreError> {
    open_with(url, &OpenOptions::new(pool_size, OpenMode::Create)).await
}

/// Opens the store a URL names, which must exist: creates nothing.
pub async fn open_existing(url: &str, pool_size: usize) -> Result<DynStore, StoreError> {
    open_with(url, &OpenOptions::new(pool_size, OpenMode::Existing)).await
}

/// Opens the backend a URL names with explicit options.
pub async fn open_with(url: &str, opts: &OpenOptions) -> Result<DynStore, StoreError> {
    match (opts.layout, StoreUrl::parse(url)?) {
        (Layout::Ferry, StoreUrl::Sqlite { path }) => {
            Ok(Arc::new(sqlite::SqliteStore::open_with(&path, opts.pool_size, opts.mode).await?))
        }
        (Layout::Ferry, StoreUrl::Postgres(cfg)) => {
            Ok(Arc::new(postgres::PostgresStore::connect_with(cfg, opts).await?))
        }
        (Layout::Rivet, StoreUrl::Postgres(cfg)) => Ok(Arc::new(crate::layout::RivetStore::connect(cfg, opts).await?)),
        (Layout::Rivet, StoreUrl::Sqlite { .. }) => Err(StoreError::InvalidUrl(
            "--layout rivet reads rivet's PostgreSQL universaldb: give postgres://...?schema=X, not sqlite:".into(),
        )),
    }
}

/// Reads every row of `range` in batches of `batch` rows, calling `visit` on each, without
/// holding more than one batch in memory.
pub async fn for_each_row(
    store: &dyn Store,
    range: &KeyRange,
    batch: usize,
    mut visit: impl FnMut(&[u8], Vec<u8>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut cursor = range.clone();
    loop {
        let rows = store.scan(&cursor, batch).await?;
        let full = rows.len() == batch;
        let mut last = None;
        for (key, value) in rows {
            visit(&key, value)?;
            last = Some(key);
        }
        match last {
            Some(key) if full => cursor = cursor.after(&key),
            _ => return Ok(()),
        }
    }
}
