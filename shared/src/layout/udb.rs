//! universaldb's optimistic concurrency protocol on PostgreSQL (DESIGN.md section 7), as
//! rivet's driver at c1976e3 runs it: reads in one `REPEATABLE READ` snapshot that begins with
//! `nextval('global_version_seq')` (the start version); a commit on a second connection that
//! inserts one `conflict_ranges` row per range read and per key or range written, with that
//! start version and a fresh commit version, then the writes. The exclusion constraint on
//! `conflict_ranges` refuses a row that overlaps a concurrent transaction's row of the other
//! kind (SQLSTATE 23P01): that transaction won, and this one retries from its reads.
//!
//! Invariants: every statement on `X.kv` runs inside a snapshot or a commit of this protocol;
//! a commit that wrote anything to `X.kv` carries a `write` row for each of its keys and ranges,
//! so a running engine sees ferry's writes as conflicts and ferry sees the engine's; rivet's
//! objects are only ever read, written as rows, or (for a rehearsal) created in an empty schema.

use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Transaction};
use tokio_postgres::IsolationLevel;
use tokio_postgres::error::SqlState;

use crate::store::postgres::Connection;
use crate::store::{KeyRange, KeyValue};

/// How long rivet lets a transaction live (its driver's `TXN_TIMEOUT`), and the deadline of
/// ferry's: a transaction whose checks took longer is rolled back before it sends its conflict
/// rows ([`CONFLICT_RETENTION`] says why).
pub const TRANSACTION_LIMIT: Duration = Duration::from_secs(5);
/// rivet's engine deletes `conflict_ranges` rows older than this. A write that committed after
/// a transaction's snapshot began left rows younger than that transaction; once it is older
/// than this, they may be gone, and its conflict rows would not see the write it missed (a
/// digest check passing on a snapshot where v1 had not changed yet). Hence the deadline.
pub const CONFLICT_RETENTION: Duration = Duration::from_secs(10);
/// How often ferry deletes expired `conflict_ranges` rows itself (as the engine does), so a
/// rehearsal schema with no engine does not grow without end.
const GC_INTERVAL: Duration = Duration::from_secs(5);

/// The objects rivet's driver keeps in its schema, by kind and name, as `to_regclass` /
/// `to_regtype` find them.
pub const RIVET_OBJECTS: [(&str, &str); 5] = [
    ("table", "kv"),
    ("table", "conflict_ranges"),
    ("sequence", "global_version_seq"),
    ("type", "bytearange"),
    ("type", "range_type"),
];

/// What a conflict row says about its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictKind {
    Read,
    Write,
}

impl ConflictKind {
    fn as_str(self) -> &'static str {
        match self {
            ConflictKind::Read => "read",
            ConflictKind::Write => "write",
        }
    }
}

/// One range a transaction read or wrote, `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictRange {
    pub range: KeyRange,
    pub kind: ConflictKind,
}

/// SQL on rivet's objects in one schema, resolved once.
pub struct UdbSql {
    pub get: String,
    pub scan: String,
    pub scan_keys: String,
    pub first_key: String,
    pub nextval: String,
    pub conflicts: String,
    pub gc: String,
}

impl UdbSql {
    pub fn new(schema: &str) -> UdbSql {
        let kv = format!("{schema}.kv");
        UdbSql {
            get: format!("SELECT value FROM {kv} WHERE key = $1"),
            scan: format!("SELECT key, value FROM {kv} WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3"),
            scan_keys: format!("SELECT key FROM {kv} WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3"),
            first_key: format!("SELECT key FROM {kv} WHERE key >= $1 AND key < $2 ORDER BY key LIMIT 1"),
            nextval: format!("SELECT nextval('{schema}.global_version_seq')"),
            conflicts: format!(
                "WITH data AS (SELECT nextval('{schema}.global_version_seq') AS commit_version) \
                 INSERT INTO {schema}.conflict_ranges (range_data, conflict_type, start_version, commit_version) \
                 SELECT {schema}.bytearange(begin_key, end_key, '[)'), conflict_type::{schema}.range_type, $4, \
                 data.commit_version \
                 FROM UNNEST($1::bytea[], $2::bytea[], $3::text[]) AS t(begin_key, end_key, conflict_type), data"
            ),
            gc: format!(
                "DELETE FROM {schema}.conflict_ranges WHERE ts < now() - interval '{} seconds'",
                CONFLICT_RETENTION.as_secs()
            ),
        }
    }
}

/// A read snapshot: the `REPEATABLE READ` transaction and its start version.
pub struct Snapshot<'c> {
    pub tx: Transaction<'c>,
    pub start_version: i64,
    pub began: Instant,
}

/// Begins a read snapshot on `client`: `REPEATABLE READ`, first statement `nextval`.
pub async fn snapshot<'c>(client: &'c mut Object, sql: &UdbSql) -> Result<Snapshot<'c>, tokio_postgres::Error> {
    snapshot_at(client, sql, IsolationLevel::RepeatableRead).await
}

/// Begins a snapshot at `isolation` whose first statement takes the start version.
pub async fn snapshot_at<'c>(
    client: &'c mut Object,
    sql: &UdbSql,
    isolation: IsolationLevel,
) -> Result<Snapshot<'c>, tokio_postgres::Error> {
    let began = Instant::now();
    let tx = client.build_transaction().isolation_level(isolation).start().await?;
    let stmt = tx.prepare_cached(&sql.nextval).await?;
    let start_version: i64 = tx.query_one(&stmt, &[]).await?.get(0);
    Ok(Snapshot { tx, start_version, began })
}

impl Snapshot<'_> {
    pub async fn get(&self, sql: &UdbSql, key: &[u8]) -> Result<Option<Vec<u8>>, tokio_postgres::Error> {
        let stmt = self.tx.prepare_cached(&sql.get).await?;
        Ok(self.tx.query_opt(&stmt, &[&key]).await?.map(|r| r.get(0)))
    }

    pub async fn scan(
        &self,
        sql: &UdbSql,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<KeyValue>, tokio_postgres::Error> {
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        let stmt = self.tx.prepare_cached(&sql.scan).await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.tx.query(&stmt, &[&range.start, &range.end, &limit]).await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn scan_keys(
        &self,
        sql: &UdbSql,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, tokio_postgres::Error> {
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        let stmt = self.tx.prepare_cached(&sql.scan_keys).await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.tx.query(&stmt, &[&range.start, &range.end, &limit]).await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    pub async fn first_key(&self, sql: &UdbSql, range: &KeyRange) -> Result<Option<Vec<u8>>, tokio_postgres::Error> {
        if range.start >= range.end {
            return Ok(None);
        }
        let stmt = self.tx.prepare_cached(&sql.first_key).await?;
        Ok(self.tx.query_opt(&stmt, &[&range.start, &range.end]).await?.map(|r| r.get(0)))
    }

    /// Ends the snapshot (it only read).
    pub async fn end(self) -> Result<(), tokio_postgres::Error> {
        self.tx.commit().await
    }
}

/// Prepares the statement of [`insert_conflicts`] on the session (cached: once per session),
/// so that a later call sends it on its first poll.
pub async fn prepare_commit(tx: &Transaction<'_>, sql: &UdbSql) -> Result<(), tokio_postgres::Error> {
    tx.prepare_cached(&sql.conflicts).await.map(drop)
}

/// Inserts the conflict rows of a commit inside its write transaction. 23P01 here means a
/// concurrent transaction's rows won.
pub async fn insert_conflicts(
    tx: &Transaction<'_>,
    sql: &UdbSql,
    start_version: i64,
    ranges: &[ConflictRange],
) -> Result<(), tokio_postgres::Error> {
    // An empty or inverted range conflicts with nothing (and PostgreSQL refuses an inverted one).
    let ranges: Vec<&ConflictRange> = ranges.iter().filter(|r| r.range.start < r.range.end).collect();
    if ranges.is_empty() {
        return Ok(());
    }
    let begins: Vec<&[u8]> = ranges.iter().map(|r| r.range.start.as_slice()).collect();
    let ends: Vec<&[u8]> = ranges.iter().map(|r| r.range.end.as_slice()).collect();
    let kinds: Vec<&str> = ranges.iter().map(|r| r.kind.as_str()).collect();
    let stmt = tx.prepare_cached(&sql.conflicts).await?;
    tx.execute(&stmt, &[&begins, &ends, &kinds, &start_version]).await?;
    Ok(())
}

/// Whether a commit attempt lost to a concurrent transaction and is re-run from its reads:
/// an exclusion violation on `conflict_ranges`, a serialization failure or a deadlock.
pub fn lost_race(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::EXCLUSION_VIOLATION) || crate::store::postgres::is_retryable(e)
}

/// Whether a statement failed only because an earlier one of its transaction did (the
/// transaction is aborted): the earlier one's error is the one to report.
pub fn aborted_earlier(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION)
}

/// The outcome of statements of one transaction sent at once: the first error that is not
/// only the aborted transaction's ([`aborted_earlier`]), else the first error, else `Ok`.
pub fn first_cause<const N: usize>(
    results: [Result<(), tokio_postgres::Error>; N],
) -> Result<(), tokio_postgres::Error> {
    let mut errors: Vec<tokio_postgres::Error> = results.into_iter().filter_map(Result::err).collect();
    match errors.iter().position(|e| !aborted_earlier(e)) {
        Some(cause) => Err(errors.swap_remove(cause)),
        None => errors.into_iter().next().map_or(Ok(()), Err),
    }
}

/// Deletes expired conflict rows at most every [`GC_INTERVAL`] (best effort: the engine does
/// the same, and a failure only leaves rows for the next round).
pub async fn collect_garbage(conn: &Connection, sql: &UdbSql, last: &std::sync::Mutex<Instant>) {
    {
        // A poisoned lock only means a panic elsewhere while holding a timestamp; keep going.
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() < GC_INTERVAL {
            return;
        }
        *last = Instant::now();
    }
    if let Ok(client) = conn.client().await
        && let Err(e) = client.execute(&sql.gc, &[]).await
    {
        tracing::debug!(error = %conn.err(e), "conflict_ranges cleanup failed; retried later");
    }
}

/// Which of rivet's objects `schema` lacks (empty: all there).
pub async fn missing_objects(client: &Object, schema: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut missing = Vec::new();
    for (kind, name) in RIVET_OBJECTS {
        let qualified = format!("{schema}.{name}");
        let query =
            if kind == "type" { "SELECT to_regtype($1) IS NOT NULL" } else { "SELECT to_regclass($1) IS NOT NULL" };
        let exists: bool = client.query_one(query, &[&qualified]).await?.get(0);
        if !exists {
            missing.push(format!("{kind} {qualified}"));
        }
    }
    Ok(missing)
}

/// rivet's objects as its driver creates them (`database.rs` at c1976e3), in `schema`: for a
/// rehearsal only (`seed --layout rivet --create-rivet-schema`).
pub fn rivet_schema_ddl(schema: &str) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE EXTENSION IF NOT EXISTS btree_gist;
         CREATE UNLOGGED SEQUENCE {schema}.global_version_seq START WITH 1 INCREMENT BY 1 MINVALUE 1;
         CREATE TABLE {schema}.kv (key BYTEA PRIMARY KEY, value BYTEA NOT NULL);
         CREATE TYPE {schema}.range_type AS ENUM ('read', 'write');
         CREATE TYPE {schema}.bytearange AS RANGE (SUBTYPE = bytea, SUBTYPE_OPCLASS = bytea_ops);
         CREATE UNLOGGED TABLE {schema}.conflict_ranges (
             range_data {schema}.bytearange NOT NULL,
             conflict_type {schema}.range_type NOT NULL,
             start_version BIGINT NOT NULL,
             commit_version BIGINT NOT NULL,
             ts timestamp NOT NULL DEFAULT now(),
             EXCLUDE USING gist (
                 range_data WITH &&,
                 conflict_type WITH <>,
                 int8range(start_version, commit_version, '[]') WITH &&,
                 start_version WITH <>
             )
         );
         CREATE INDEX idx_conflict_ranges_ts ON {schema}.conflict_ranges (ts);"
    )
}
