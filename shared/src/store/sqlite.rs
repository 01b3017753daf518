//! The embedded backend: `sqlite:PATH`, table `kv(key BLOB PRIMARY KEY, value BLOB NOT NULL)
//! WITHOUT ROWID` in WAL mode.
//!
//! Invariant: no SQLite call runs on an async worker thread. Every call goes through
//! `spawn_blocking`, on one of a few reader connections or the single writer connection
//! (SQLite has one writer at a time anyway; `BEGIN IMMEDIATE` makes other processes on the
//! same file wait for the busy timeout instead of failing a commit half-way).
//!
//! A batch of reads ([`Store::read_many`]) is one blocking call, in one read transaction on
//! one reader connection; a group of transactions ([`Store::commit_many`]) is one blocking call
//! and one `BEGIN IMMEDIATE ... COMMIT` per run of the group plan, each transaction's writes
//! inside a savepoint so a failure of one leaves the others' standing.
//!
//! Opening in [`OpenMode::Existing`] creates nothing: the file is opened read-write without
//! `SQLITE_OPEN_CREATE`, no directory is made, and a file without the `kv` table is
//! [`StoreError::Missing`] before any pragma writes to it.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::{
    Check, KeyRange, KeyValue, Mutation, OpenMode, RangeDigest, Read, ReadResult, Store, StoreError, Txn, limits,
};

const BACKEND: &str = "sqlite";
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The SQLite store. Cheap to share: clone the `Arc` it is opened into.
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: String,
    readers: Vec<Mutex<Connection>>,
    writer: Mutex<Connection>,
    next_reader: AtomicUsize,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, with `readers` reader connections.
    pub async fn open(path: &str, readers: usize) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, readers, OpenMode::Create).await
    }

    /// Opens the store at `path`; in [`OpenMode::Existing`] it must exist with its `kv` table.
    pub async fn open_with(path: &str, readers: usize, mode: OpenMode) -> Result<SqliteStore, StoreError> {
        let path = path.to_string();
        let readers = readers.clamp(1, 16);
        let inner = tokio::task::spawn_blocking(move || -> Result<Inner, StoreError> {
            let writer = match mode {
                OpenMode::Create => {
                    let writer = open_connection(&path, OpenMode::Create)?;
                    writer
                        .execute_batch(
                            "CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;",
                        )
                        .map_err(map_err)?;
                    writer
                }
                OpenMode::Existing => open_connection(&path, OpenMode::Existing)?,
            };
            let readers = (0..readers)
                .map(|_| open_connection(&path, OpenMode::Existing).map(Mutex::new))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Inner { path, readers, writer: Mutex::new(writer), next_reader: AtomicUsize::new(0) })
        })
        .await
        .map_err(join_err)??;
        Ok(SqliteStore { inner: Arc::new(inner) })
    }

    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.read(f)).await.map_err(join_err)?
    }
}

impl Inner {
    /// Runs `f` on the next reader connection, on the calling (blocking) thread; the connection
    /// is free again when it returns.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        let conn = self.readers[i].lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(map_err)
    }
}

fn open_connection(path: &str, mode: OpenMode) -> Result<Connection, StoreError> {
    let conn = match mode {
        OpenMode::Create => {
            if let Some(dir) = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Failed {
                    backend: BACKEND,
                    message: format!("creating {}: {e}", dir.display()),
                })?;
            }
            Connection::open(path).map_err(map_err)?
        }
        OpenMode::Existing => {
            let missing = |what: String| StoreError::Missing { url: format!("sqlite:{path}"), what };
            if !Path::new(path).is_file() {
                return Err(missing("no such file".into()));
            }
            let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = Connection::open_with_flags(path, flags)
                .map_err(|e| missing(format!("cannot open the file: {}", map_err(e))))?;
            // Checked before the pragmas below, which would write a header into an empty file.
            let has_kv = conn
                .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'kv'", [], |_| Ok(()))
                .optional()
                .map_err(|e| missing(format!("not a ferry store ({})", map_err(e))))?
                .is_some();
            if !has_kv {
                return Err(missing("the file has no kv table".into()));
            }
            conn
        }
    };
    conn.busy_timeout(BUSY_TIMEOUT).map_err(map_err)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(map_err)?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(map_err)?;
    Ok(conn)
}

fn map_err(e: rusqlite::Error) -> StoreError {
    let transient = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::SystemIoFailure | ErrorCode::DiskFull)
    );
    let message = e.to_string();
    if transient {
        StoreError::Unavailable { backend: BACKEND, message }
    } else {
        StoreError::Failed { backend: BACKEND, message }
    }
}

fn join_err(e: tokio::task::JoinError) -> StoreError {
    StoreError::Failed { backend: BACKEND, message: format!("blocking task failed: {e}") }
}

/// Every read of `reads` in one read transaction: the batch sees one snapshot (not promised
/// by the contract).
fn read_batch(c: &Connection, reads: &[Read]) -> rusqlite::Result<Vec<ReadResult>> {
    let tx = c.unchecked_transaction()?;
    let mut out = Vec::with_capacity(reads.len());
    for read in reads {
        out.push(match read {
            Read::Get(key) => ReadResult::Value(get_value(&tx, key)?),
            Read::Scan { range, limit } => ReadResult::Rows(scan_rows(&tx, range, *limit)?),
        });
    }
    tx.commit()?;
    Ok(out)
}

fn scan_rows(conn: &Connection, range: &KeyRange, limit: usize) -> rusqlite::Result<Vec<KeyValue>> {
    let mut stmt =
        conn.prepare_cached("SELECT key, value FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT ?3")?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![range.start, range.end, limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

fn range_digest(conn: &Connection, range: &KeyRange) -> rusqlite::Result<u128> {
    let mut stmt = conn.prepare_cached("SELECT key, value FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key")?;
    let mut rows = stmt.query(params![range.start, range.end])?;
    let mut digest = RangeDigest::new();
    while let Some(row) = rows.next()? {
        let key = row.get_ref(0)?.as_blob()?;
        let value = row.get_ref(1)?.as_blob()?;
        digest.update(key, value);
    }
    Ok(digest.finish())
}

/// Runs the checks; `Some(index)` names the first that failed.
fn failed_check(tx: &Connection, checks: &[Check]) -> rusqlite::Result<Option<(usize, Vec<u8>)>> {
    for (index, check) in checks.iter().enumerate() {
        let (holds, key) = match check {
            Check::Value { key, expected } => {
                let actual: Option<Vec<u8>> = tx
                    .prepare_cached("SELECT value FROM kv WHERE key = ?1")?
                    .query_row([key], |r| r.get(0))
                    .optional()?;
                (actual == *expected, key)
            }
            Check::RangeDigest { range, expected } => (range_digest(tx, range)? == *expected, &range.start),
        };
        if !holds {
            return Ok(Some((index, key.clone())));
        }
    }
    Ok(None)
}

fn get_value(conn: &Connection, key: &[u8]) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT value FROM kv WHERE key = ?1")?.query_row([key], |r| r.get(0)).optional()
}

/// One store transaction of a group: each transaction's checks, then its writes in a
/// savepoint; `results[i]` is set for every index of `run`.
fn commit_run(
    conn: &mut Connection,
    txns: &[Txn],
    run: &[usize],
    results: &mut [Option<Result<(), StoreError>>],
) -> Result<(), StoreError> {
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(map_err)?;
    let mut applied = Vec::with_capacity(run.len());
    for &i in run {
        let txn = &txns[i];
        if let Some((index, key)) = failed_check(&tx, &txn.checks).map_err(map_err)? {
            results[i] = Some(Err(StoreError::Conflict { index, key }));
            continue;
        }
        let sp = tx.savepoint().map_err(map_err)?;
        match apply(&sp, &txn.mutations) {
            Ok(()) => {
                sp.commit().map_err(map_err)?;
                applied.push(i);
            }
            // Dropping the savepoint rolls this transaction's writes back; the others stand.
            Err(e) => results[i] = Some(Err(map_err(e))),
        }
    }
    tx.commit().map_err(map_err)?;
    if !applied.is_empty() {
        metrics::counter!(crate::metrics::STORE_COMMITS).increment(1);
    }
    for i in applied {
        results[i] = Some(Ok(()));
    }
    Ok(())
}

fn apply(tx: &Connection, mutations: &[Mutation]) -> rusqlite::Result<()> {
    for m in mutations {
        match m {
            Mutation::Set { key, value } => {
                tx.prepare_cached(
                    "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![key, value])?;
            }
            Mutation::Clear { key } => {
                tx.prepare_cached("DELETE FROM kv WHERE key = ?1")?.execute([key])?;
            }
            Mutation::ClearRange { range } => {
                tx.prepare_cached("DELETE FROM kv WHERE key >= ?1 AND key < ?2")?
                    .execute(params![range.start, range.end])?;
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        self.with_reader(move |c| get_value(c, &key)).await
    }

    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        let range = range.clone();
        self.with_reader(move |c| scan_rows(c, &range, limit)).await
    }

    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        let range = range.clone();
        self.with_reader(move |c| {
            c.prepare_cached("SELECT key FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT 1")?
                .query_row(params![range.start, range.end], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn scan_keys(&self, range: &KeyRange, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let range = range.clone();
        self.with_reader(move |c| {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            c.prepare_cached("SELECT key FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT ?3")?
                .query_map(params![range.start, range.end, limit], |r| r.get(0))?
                .collect()
        })
        .await
    }

    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        limits::check_txn(&txn)?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(map_err)?;
            if let Some((index, key)) = failed_check(&tx, &txn.checks).map_err(map_err)? {
                return Err(StoreError::Conflict { index, key });
            }
            apply(&tx, &txn.mutations).map_err(map_err)?;
            tx.commit().map_err(map_err)?;
            metrics::counter!(crate::metrics::STORE_COMMITS).increment(1);
            Ok(())
        })
        .await
        .map_err(join_err)?
    }

    async fn read_many(&self, reads: &[Read]) -> Result<Vec<ReadResult>, StoreError> {
        let reads = reads.to_vec();
        self.with_reader(move |c| read_batch(c, &reads)).await
    }

    async fn read_many_then(&self, reads: &[Read], then: super::AfterRead) -> Result<(), StoreError> {
        let (reads, inner) = (reads.to_vec(), self.inner.clone());
        tokio::task::spawn_blocking(move || {
            let answers = inner.read(|c| read_batch(c, &reads))?;
            // The reader connection is free again: the work holds none.
            if let Some(work) = then(answers) {
                work();
            }
            Ok(())
        })
        .await
        .map_err(join_err)?
    }

    async fn commit_many(&self, txns: Vec<Txn>) -> Vec<Result<(), StoreError>> {
        let n = txns.len();
        let plan = limits::plan_group(&txns);
        let mut results = limits::result_slots(n, plan.refused);
        let inner = self.inner.clone();
        let runs = plan.runs;
        let done = tokio::task::spawn_blocking(move || {
            let mut conn = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            for run in &runs {
                if let Err(e) = commit_run(&mut conn, &txns, run, &mut results) {
                    // Nothing of this run was committed: each of its transactions gets the error.
                    for &i in run {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
            results
        })
        .await;
        match done {
            Ok(results) => limits::group_results(results, BACKEND),
            Err(e) => {
                let e = join_err(e);
                (0..n).map(|_| Err(e.clone())).collect()
            }
        }
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.inner.path)
    }
}
