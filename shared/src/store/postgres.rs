//! The server backend: `postgres://...`, table `kv(key BYTEA PRIMARY KEY, value BYTEA NOT NULL)`
//! (the shape of rivet's universaldb Postgres driver), in an optional schema.
//!
//! Invariants: every commit runs at SERIALIZABLE isolation, so its checks and writes are
//! atomic against every other commit; a serialization failure or deadlock re-runs the whole
//! transaction (checks included, so a retried commit never acts on a stale read) a bounded
//! number of times before it is reported as transient. Writes are batched: runs of sets and
//! clears go out as one `UNNEST` statement each, never one round trip per key.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use futures::TryStreamExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, NoTls};

use super::url::{PostgresUrl, redact};
use super::{Check, KeyRange, KeyValue, Mutation, RangeDigest, Store, StoreError, Txn, limits};

const BACKEND: &str = "postgres";
/// How often one commit is re-run after a serialization failure before giving up as transient.
const SERIALIZATION_RETRIES: u32 = 12;

/// The PostgreSQL store: a deadpool connection pool and the statements it runs.
pub struct PostgresStore {
    pool: Pool,
    described: String,
    sql: Statements,
}

/// SQL text with the table name resolved once.
struct Statements {
    get: String,
    scan: String,
    first_key: String,
    scan_keys: String,
    range_rows: String,
    upsert: String,
    delete_keys: String,
    delete_range: String,
}

impl Statements {
    fn new(table: &str) -> Statements {
        Statements {
            get: format!("SELECT value FROM {table} WHERE key = $1"),
            scan: format!("SELECT key, value FROM {table} WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3"),
            first_key: format!("SELECT key FROM {table} WHERE key >= $1 AND key < $2 ORDER BY key LIMIT 1"),
            scan_keys: format!("SELECT key FROM {table} WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3"),
            range_rows: format!("SELECT key, value FROM {table} WHERE key >= $1 AND key < $2 ORDER BY key"),
            upsert: format!(
                "INSERT INTO {table} (key, value) SELECT * FROM UNNEST($1::bytea[], $2::bytea[]) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ),
            delete_keys: format!("DELETE FROM {table} WHERE key = ANY($1::bytea[])"),
            delete_range: format!("DELETE FROM {table} WHERE key >= $1 AND key < $2"),
        }
    }
}

impl PostgresStore {
    /// Connects a pool of `pool_size` connections and creates the schema and table if missing.
    pub async fn connect(url: PostgresUrl, pool_size: usize) -> Result<PostgresStore, StoreError> {
        let described = redact(&url.conninfo);
        let config: tokio_postgres::Config =
            url.conninfo.parse().map_err(|e| StoreError::InvalidUrl(format!("{described}: {e}")))?;
        let mgr_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = if url.tls {
            Manager::from_config(config, tls_connector(), mgr_config)
        } else {
            Manager::from_config(config, NoTls, mgr_config)
        };
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::Failed { backend: BACKEND, message: e.to_string() })?;
        let table = match &url.schema {
            Some(schema) => format!("{schema}.kv"),
            None => "kv".to_string(),
        };
        let store = PostgresStore { pool, described, sql: Statements::new(&table) };
        store.create_table(url.schema.as_deref(), &table).await?;
        Ok(store)
    }

    async fn create_table(&self, schema: Option<&str>, table: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let mut ddl = String::new();
        if let Some(schema) = schema {
            ddl.push_str(&format!("CREATE SCHEMA IF NOT EXISTS {schema};"));
        }
        ddl.push_str(&format!("CREATE TABLE IF NOT EXISTS {table} (key BYTEA PRIMARY KEY, value BYTEA NOT NULL);"));
        match client.batch_execute(&ddl).await {
            Ok(()) => Ok(()),
            // Two processes creating the same table at once: the loser sees a unique violation
            // on the catalog, and the table exists.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::Unavailable { backend: BACKEND, message: e.to_string() })
    }

    /// One attempt at a commit; `Ok(Err(..))` is a failed check.
    async fn try_commit(&self, txn: &Txn) -> Result<Result<(), StoreError>, tokio_postgres::Error> {
        let mut client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => {
                return Ok(Err(StoreError::Unavailable { backend: BACKEND, message: e.to_string() }));
            }
        };
        let tx = client.build_transaction().isolation_level(IsolationLevel::Serializable).start().await?;
        for (index, check) in txn.checks.iter().enumerate() {
            let (holds, key) = match check {
                Check::Value { key, expected } => {
                    let stmt = tx.prepare_cached(&self.sql.get).await?;
                    let actual: Option<Vec<u8>> = tx.query_opt(&stmt, &[key]).await?.map(|r| r.get(0));
                    (actual == *expected, key)
                }
                Check::RangeDigest { range, expected } => {
                    (self.range_digest(&tx, range).await? == *expected, &range.start)
                }
            };
            if !holds {
                tx.rollback().await?;
                return Ok(Err(StoreError::Conflict { index, key: key.clone() }));
            }
        }
        self.apply(&tx, &txn.mutations).await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn range_digest(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        range: &KeyRange,
    ) -> Result<u128, tokio_postgres::Error> {
        let stmt = tx.prepare_cached(&self.sql.range_rows).await?;
        let rows = tx.query_raw(&stmt, [&range.start, &range.end]).await?;
        futures::pin_mut!(rows);
        let mut digest = RangeDigest::new();
        while let Some(row) = rows.try_next().await? {
            digest.update(row.get::<_, &[u8]>(0), row.get::<_, &[u8]>(1));
        }
        Ok(digest.finish())
    }

    async fn apply(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        mutations: &[Mutation],
    ) -> Result<(), tokio_postgres::Error> {
        let mut i = 0;
        while i < mutations.len() {
            let run = mutations[i..].iter().take_while(|m| same_kind(m, &mutations[i])).count();
            let batch = &mutations[i..i + run];
            match &mutations[i] {
                Mutation::Set { .. } => {
                    let (keys, values) = dedup_sets(batch);
                    let stmt = tx.prepare_cached(&self.sql.upsert).await?;
                    tx.execute(&stmt, &[&keys, &values]).await?;
                }
                Mutation::Clear { .. } => {
                    let keys: Vec<&[u8]> = batch
                        .iter()
                        .filter_map(|m| match m {
                            Mutation::Clear { key } => Some(key.as_slice()),
                            _ => None,
                        })
                        .collect();
                    let stmt = tx.prepare_cached(&self.sql.delete_keys).await?;
                    tx.execute(&stmt, &[&keys]).await?;
                }
                Mutation::ClearRange { range } => {
                    let stmt = tx.prepare_cached(&self.sql.delete_range).await?;
                    tx.execute(&stmt, &[&range.start, &range.end]).await?;
                }
            }
            // A clear-range is its own statement: runs group only sets and point clears.
            i += if matches!(mutations[i], Mutation::ClearRange { .. }) { 1 } else { run };
        }
        Ok(())
    }
}

fn same_kind(a: &Mutation, b: &Mutation) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// Keys and values of a run of sets, the last write of a key winning (one `INSERT ... ON
/// CONFLICT` may not touch a row twice).
fn dedup_sets(batch: &[Mutation]) -> (Vec<&[u8]>, Vec<&[u8]>) {
    let mut latest = std::collections::BTreeMap::new();
    for m in batch {
        if let Mutation::Set { key, value } = m {
            latest.insert(key.as_slice(), value.as_slice());
        }
    }
    latest.into_iter().unzip()
}

fn tls_connector() -> tokio_postgres_rustls::MakeRustlsConnect {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // The ring provider supports the default protocol versions; this cannot fail.
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

fn is_retryable(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

fn map_err(e: tokio_postgres::Error) -> StoreError {
    let message = e.to_string();
    let transient = match e.code() {
        None => true, // I/O, closed connection, timeouts: the server or network went away.
        Some(c) => {
            is_retryable(&e)
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
                || *c == SqlState::CONNECTION_FAILURE
                || *c == SqlState::CONNECTION_EXCEPTION
                || *c == SqlState::QUERY_CANCELED
                || c.code().starts_with("08")
        }
    };
    if transient {
        StoreError::Unavailable { backend: BACKEND, message }
    } else {
        StoreError::Failed { backend: BACKEND, message }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.sql.get).await.map_err(map_err)?;
        let row = client.query_opt(&stmt, &[&key]).await.map_err(map_err)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.sql.scan).await.map_err(map_err)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client.query(&stmt, &[&range.start, &range.end, &limit]).await.map_err(map_err)?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.sql.first_key).await.map_err(map_err)?;
        let row = client.query_opt(&stmt, &[&range.start, &range.end]).await.map_err(map_err)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn scan_keys(&self, range: &KeyRange, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.sql.scan_keys).await.map_err(map_err)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client.query(&stmt, &[&range.start, &range.end, &limit]).await.map_err(map_err)?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        limits::check_txn(&txn)?;
        let mut attempt = 0;
        loop {
            match self.try_commit(&txn).await {
                Ok(result) => return result,
                Err(e) if is_retryable(&e) && attempt < SERIALIZATION_RETRIES => {
                    attempt += 1;
                    let jitter = rand::random_range(0..=(5u64 << attempt.min(6)));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(e) => return Err(map_err(e)),
            }
        }
    }

    fn describe(&self) -> String {
        self.described.clone()
    }
}
