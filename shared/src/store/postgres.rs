//! The server backend: `postgres://...`, table `kv(key BYTEA PRIMARY KEY, value BYTEA NOT NULL)`
//! (the shape of rivet's universaldb Postgres driver), in an optional schema.
//!
//! Invariants: every commit runs at SERIALIZABLE isolation, so its checks and writes are
//! atomic against every other commit; a serialization failure or deadlock re-runs the whole
//! transaction (checks included, so a retried commit never acts on a stale read) a bounded
//! number of times before it is reported as transient. Writes are batched: runs of sets and
//! clears go out as one `UNNEST` statement each, never one round trip per key.
//!
//! A commit is two round trips ([`super::serializable`]): `BEGIN` with every check (every value
//! check in one `key = ANY(...)` read, every range digest in one more), then the writes with
//! `COMMIT`. A batch of reads ([`Store::read_many`]) is one pipelined round trip on one
//! connection: every point read in one `key = ANY(...)` query, each scan its own. A group of
//! transactions ([`Store::commit_many`]) is one SERIALIZABLE transaction (one WAL flush) per run
//! of the group plan, each transaction's checks evaluated after the writes of those before it
//! (all at once when none reads what another writes: transactions of different actors); a
//! failed check leaves its transaction's writes out and the others in.
//!
//! Every session is bounded in time ([`SessionLimits`]), so a process that stops in the middle
//! of a transaction (SIGSTOP, a stalled VM, a partitioned host) cannot hold row or predicate
//! locks for longer than a lease: FoundationDB, which the store is modelled on, aborts a
//! transaction after 5 s. Derived from the lease TTL `L` of the workers (`--lease-ttl-secs`,
//! default 60 s; [`SessionLimits::for_lease_ttl`]) and sent in the startup packet of every
//! connection:
//!
//! | setting | default | why |
//! |---|---|---|
//! | `idle_in_transaction_session_timeout` | `L/2` (30 s) | a paused holder's transaction, and its locks, end before its lease does |
//! | `lock_timeout` | `L/4` (15 s) | a takeover blocked on a paused holder's row lock fails (transient, retried) instead of hanging |
//! | `statement_timeout` | `3L/4` (45 s) | no statement outlives a lease |
//! | `tcp_keepalives_idle` / `_interval` / `_count` (server) | 30 s / 10 s / 3 | the server drops a dead client's session in about a minute, not hours |
//! | keepalives (client) | 30 s / 10 s / 3 | a dead server is noticed as fast |
//! | `connect_timeout` | 10 s | a server that does not answer is an error, not a hang |
//! | `jit` | `off` | a key-value statement is never compiled by LLVM first because the planner overestimates a key range on a large table (see `Statements`) |
//!
//! The operator overrides any of them in the URL with the driver's own parameters:
//! `options=-c%20lock_timeout%3D5s` (ferry's settings come first, so the URL's win),
//! `connect_timeout=`, `keepalives_idle=`, `keepalives_interval=`, `keepalives_retries=`.
//! `application_name` defaults to `ferry`.
//!
//! Errors keep their root cause (the server's SQLSTATE and message, or the chain of I/O
//! errors, never a DETAIL line, which can quote row values) and name the server
//! (`host:port`); the password never appears (the URL is redacted by `store::url`).
//!
//! [`OpenMode::Existing`] runs no DDL: a missing schema or `kv` table is
//! [`StoreError::Missing`], naming it.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use futures::TryStreamExt;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, NoTls};

use super::serializable::Serializable;
use super::url::{PostgresUrl, redact};
use super::{
    Check, KeyRange, KeyValue, Mutation, OpenMode, OpenOptions, RangeDigest, Read, ReadResult, Store, StoreError, Txn,
    fold, limits,
};

const BACKEND: &str = "postgres";

/// How the `value` column of a table ferry creates is compressed. The server's default
/// (pglz) tries every value over about 2 KB: v2 values are LZ4 blobs already, so it fails on
/// each of them, and those attempts were about a sixth of the server's CPU per small job
/// (docs/PERFORMANCE.md). LZ4 gives up on them at once and still compresses v1 pages.
const VALUE_COMPRESSION: &str = "COMPRESSION lz4";
/// How often one commit is re-run after a serialization failure before giving up as transient.
pub(crate) const SERIALIZATION_RETRIES: u32 = 12;

/// The time bounds of every ferry session (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    pub idle_in_transaction: Duration,
    pub statement: Duration,
    pub lock: Duration,
    pub connect: Duration,
    pub keepalives_idle: Duration,
    pub keepalives_interval: Duration,
    pub keepalives_retries: u32,
}

impl SessionLimits {
    /// Bounds for workers whose leases live `ttl`: every one of them below it.
    pub fn for_lease_ttl(ttl: Duration) -> SessionLimits {
        let ttl = ttl.max(Duration::from_secs(2));
        SessionLimits {
            idle_in_transaction: ttl / 2,
            statement: ttl * 3 / 4,
            lock: ttl / 4,
            connect: Duration::from_secs(10),
            keepalives_idle: Duration::from_secs(30),
            keepalives_interval: Duration::from_secs(10),
            keepalives_retries: 3,
        }
    }

    /// The server settings, as `-c name=value` switches of the startup `options`.
    fn server_options(&self) -> String {
        let ms = |d: Duration| d.as_millis();
        format!(
            "-c idle_in_transaction_session_timeout={} -c statement_timeout={} -c lock_timeout={} \
             -c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={} -c jit=off",
            ms(self.idle_in_transaction),
            ms(self.statement),
            ms(self.lock),
            self.keepalives_idle.as_secs(),
            self.keepalives_interval.as_secs(),
            self.keepalives_retries,
        )
    }

    /// Applies the limits to a driver config, leaving every setting the URL gave alone.
    fn apply(&self, config: &mut tokio_postgres::Config, url: &PostgresUrl) {
        let options = match config.get_options().filter(|o| !o.trim().is_empty()) {
            Some(theirs) => format!("{} {theirs}", self.server_options()),
            None => self.server_options(),
        };
        config.options(options);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.connect);
        }
        config.keepalives(true);
        if !url.has_param("keepalives_idle") {
            config.keepalives_idle(self.keepalives_idle);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(self.keepalives_interval);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(self.keepalives_retries);
        }
        if config.get_application_name().is_none() {
            config.application_name("ferry");
        }
    }
}

impl Default for SessionLimits {
    /// The bounds for workers at the default lease TTL.
    fn default() -> SessionLimits {
        let ttl = u64::try_from(crate::migrate::DEFAULT_LEASE_TTL_MS).unwrap_or(60_000);
        SessionLimits::for_lease_ttl(Duration::from_millis(ttl))
    }
}

/// The PostgreSQL store: a deadpool connection pool and the statements it runs.
pub struct PostgresStore {
    pool: Pool,
    described: String,
    /// `host:port` of every server the URL names, for errors.
    endpoint: String,
    sql: Statements,
}

/// A pool of bounded sessions to one server, with the names its errors carry.
#[derive(Clone)]
pub(crate) struct Connection {
    pub(crate) pool: Pool,
    /// The URL, password removed.
    pub(crate) described: String,
    /// `host:port` of every server the URL names.
    pub(crate) endpoint: String,
}

impl Connection {
    /// Builds the pool (no connection is made until the first use).
    pub(crate) fn open(url: &PostgresUrl, opts: &OpenOptions) -> Result<Connection, StoreError> {
        let described = redact(&url.conninfo);
        let mut config: tokio_postgres::Config =
            url.conninfo.parse().map_err(|e| StoreError::InvalidUrl(format!("{described}: {e}")))?;
        opts.session.apply(&mut config, url);
        let endpoint = endpoint(&config);
        let mgr_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let create_timeout = config.get_connect_timeout().copied().unwrap_or(opts.session.connect);
        let manager = if url.tls {
            Manager::from_config(config, tls_connector(), mgr_config)
        } else {
            Manager::from_config(config, NoTls, mgr_config)
        };
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            // The driver's own connect timeout fires first and says which server timed out;
            // this one also covers the TLS handshake and authentication.
            .create_timeout(Some(create_timeout + Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Failed { backend: BACKEND, message: format!("{described}: {e}") })?;
        Ok(Connection { pool, described, endpoint })
    }

    pub(crate) async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| self.pool_err(e))
    }

    /// A driver error as a store error: transient or not, with its root cause and the server.
    pub(crate) fn err(&self, e: tokio_postgres::Error) -> StoreError {
        let message = format!("{} (server {}, {})", root_cause(&e), self.endpoint, self.described);
        if is_transient(&e) {
            StoreError::Unavailable { backend: BACKEND, message }
        } else {
            StoreError::Failed { backend: BACKEND, message }
        }
    }

    /// A pool error: a failed connect keeps the driver's cause; every pool error is named.
    pub(crate) fn pool_err(&self, e: PoolError) -> StoreError {
        match e {
            PoolError::Backend(e) => match self.err(e) {
                StoreError::Unavailable { backend, message } => {
                    StoreError::Unavailable { backend, message: format!("connecting: {message}") }
                }
                StoreError::Failed { backend, message } => {
                    StoreError::Failed { backend, message: format!("connecting: {message}") }
                }
                other => other,
            },
            other => StoreError::Unavailable {
                backend: BACKEND,
                message: format!("{other} (server {}, {})", self.endpoint, self.described),
            },
        }
    }
}

/// SQL text with the table name resolved once.
///
/// The statements that read or clear several key ranges at once keep each range its own index
/// scan, and sessions run with `jit = off` (`SessionLimits`), because the planner cannot know
/// that a range (one actor's prefix) holds a handful of rows. It estimates a share of the
/// whole table per range, so the estimates grow with the table: joined to the ranges as a
/// plain join, the table was scanned whole (a parallel sequential scan) for every group
/// commit's digest checks, and the estimated cost passed the JIT threshold, so each statement
/// was compiled by LLVM first. At 20,000 small actors a group commit took 64 ms instead of
/// about 1.5 (docs/PERFORMANCE.md). `OFFSET 0` in the lateral subquery keeps the planner from
/// folding it into a join: it plans one range at a time, where reading the whole table per
/// range costs far more than the index under the server's default costs (a server tuned to
/// price random reads many times higher could still choose it); JIT pays only for long
/// analytic queries.
struct Statements {
    get: String,
    get_many: String,
    scan: String,
    first_key: String,
    scan_keys: String,
    ranges_rows: String,
    upsert: String,
    delete_keys: String,
    delete_ranges: String,
}

impl Statements {
    fn new(table: &str) -> Statements {
        Statements {
            get: format!("SELECT value FROM {table} WHERE key = $1"),
            get_many: format!("SELECT key, value FROM {table} WHERE key = ANY($1::bytea[])"),
            scan: format!("SELECT key, value FROM {table} WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3"),
            first_key: format!("SELECT key FROM {table} WHERE key >= $1 AND key < $2 ORDER BY key LIMIT 1"),
            scan_keys: format!("SELECT key FROM {table} WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3"),
            // Each range's rows with the range's position (WITH ORDINALITY), range by range,
            // each in key order: one statement for every digest check of a group. `OFFSET 0`
            // keeps each range its own index scan (see above).
            ranges_rows: format!(
                "SELECT r.i, t.key, t.value FROM UNNEST($1::bytea[], $2::bytea[]) WITH ORDINALITY AS r(s, e, i) \
                 CROSS JOIN LATERAL (SELECT key, value FROM {table} WHERE key >= r.s AND key < r.e OFFSET 0) t \
                 ORDER BY r.i, t.key"
            ),
            upsert: format!(
                "INSERT INTO {table} (key, value) SELECT * FROM UNNEST($1::bytea[], $2::bytea[]) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ),
            delete_keys: format!("DELETE FROM {table} WHERE key = ANY($1::bytea[])"),
            // Every cleared range in one statement; a row in two ranges is deleted once. The
            // keys are found range by range, as `ranges_rows` reads them, then deleted by key.
            delete_ranges: format!(
                "DELETE FROM {table} WHERE key = ANY(ARRAY(SELECT k.key FROM UNNEST($1::bytea[], $2::bytea[]) \
                 AS r(s, e) CROSS JOIN LATERAL (SELECT key FROM {table} WHERE key >= r.s AND key < r.e OFFSET 0) k))"
            ),
        }
    }
}

impl PostgresStore {
    /// Connects a pool of `pool_size` connections and creates the schema and table if missing.
    pub async fn connect(url: PostgresUrl, pool_size: usize) -> Result<PostgresStore, StoreError> {
        PostgresStore::connect_with(url, &OpenOptions::new(pool_size, OpenMode::Create)).await
    }

    /// Connects a pool; in [`OpenMode::Create`] creates the schema and table if missing, in
    /// [`OpenMode::Existing`] checks they exist and runs no DDL.
    pub async fn connect_with(url: PostgresUrl, opts: &OpenOptions) -> Result<PostgresStore, StoreError> {
        let table = match &url.schema {
            Some(schema) => format!("{schema}.kv"),
            None => "kv".to_string(),
        };
        let store = PostgresStore::on_table(Connection::open(&url, opts)?, &table);
        store.refuse_rivet_schema(url.schema.as_deref().unwrap_or("public")).await?;
        match opts.mode {
            OpenMode::Create => store.create_table(url.schema.as_deref(), &table).await?,
            OpenMode::Existing => store.check_table(url.schema.as_deref(), &table).await?,
        }
        Ok(store)
    }

    /// A store on `table` (schema-qualified) of a connection already made, running no DDL.
    pub(crate) fn on_table(conn: Connection, table: &str) -> PostgresStore {
        PostgresStore {
            pool: conn.pool,
            described: conn.described,
            endpoint: conn.endpoint,
            sql: Statements::new(table),
        }
    }

    /// The pool and names of this store, shared with a layout that writes other tables in the
    /// same transactions (the rivet layout's `kv` beside its `ferry_kv`).
    pub(crate) fn connection(&self) -> Connection {
        Connection { pool: self.pool.clone(), described: self.described.clone(), endpoint: self.endpoint.clone() }
    }

    /// Creates the schema and table if missing. `value` is compressed with LZ4 where the
    /// server can ([`VALUE_COMPRESSION`]), else with the server's default.
    pub(crate) async fn create_table(&self, schema: Option<&str>, table: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let ddl = |compression: &str| {
            let mut ddl = String::new();
            if let Some(schema) = schema {
                ddl.push_str(&format!("CREATE SCHEMA IF NOT EXISTS {schema};"));
            }
            ddl.push_str(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (key BYTEA PRIMARY KEY, value BYTEA {compression} NOT NULL);"
            ));
            ddl
        };
        let created = match client.batch_execute(&ddl(VALUE_COMPRESSION)).await {
            // A server before 14 (no column compression) or built without lz4.
            Err(e) if [SqlState::SYNTAX_ERROR, SqlState::FEATURE_NOT_SUPPORTED].iter().any(|c| e.code() == Some(c)) => {
                client.batch_execute(&ddl("")).await
            }
            other => other,
        };
        match created {
            Ok(()) => Ok(()),
            // Two processes creating the same table at once: the loser sees a unique violation
            // on the catalog, and the table exists.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// [`OpenMode::Existing`]: the schema and table must be there; nothing is created.
    /// The ferry layout on a schema of rivet's universaldb would write ferry's records into
    /// rivet's own `kv` (and read rivet's rows as ferry's): refused, naming the flag to use.
    async fn refuse_rivet_schema(&self, schema: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let (ranges, seq) = (format!("{schema}.conflict_ranges"), format!("{schema}.global_version_seq"));
        let rivet: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL", &[&ranges, &seq])
            .await
            .map_err(|e| self.err(e))?
            .get(0);
        if rivet {
            return Err(StoreError::Failed {
                backend: BACKEND,
                message: format!(
                    "schema {schema} holds rivet's universaldb (conflict_ranges, global_version_seq): open it \
                     with --layout rivet (FERRY_LAYOUT=rivet), not the ferry layout, which would write into \
                     rivet's kv ({})",
                    self.described
                ),
            });
        }
        Ok(())
    }

    async fn check_table(&self, schema: Option<&str>, table: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let missing = |what: String| StoreError::Missing { url: self.described.clone(), what };
        if let Some(schema) = schema {
            let row = client
                .query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", &[&schema])
                .await
                .map_err(|e| self.err(e))?;
            if !row.get::<_, bool>(0) {
                return Err(missing(format!("schema {schema} does not exist")));
            }
        }
        let row = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.map_err(|e| self.err(e))?;
        if !row.get::<_, bool>(0) {
            return Err(missing(format!("table {table} does not exist")));
        }
        Ok(())
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| self.pool_err(e))
    }

    fn err(&self, e: tokio_postgres::Error) -> StoreError {
        self.connection().err(e)
    }

    fn pool_err(&self, e: PoolError) -> StoreError {
        self.connection().pool_err(e)
    }

    /// One attempt at a commit; `Ok(Err(..))` is a failed check.
    async fn try_commit(&self, txn: &Txn) -> Result<Result<(), StoreError>, tokio_postgres::Error> {
        Ok(self.try_commit_independent(&[txn]).await?.and_then(|mut own| own.pop().unwrap_or(Ok(()))))
    }

    /// One attempt at transactions none of whose checks reads what another of them writes, as
    /// one pipelined SERIALIZABLE transaction ([`Serializable`]) of two round trips: `BEGIN`
    /// with every check of every transaction, then the writes of those that passed, folded
    /// ([`fold`]), with `COMMIT`. The result of each transaction, in order (`Err` of the
    /// attempt: none was applied, or it is unknown).
    async fn try_commit_independent(
        &self,
        picked: &[&Txn],
    ) -> Result<Result<Vec<Result<(), StoreError>>, StoreError>, tokio_postgres::Error> {
        let session = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => return Ok(Err(self.pool_err(e))),
        };
        // Prepared before BEGIN: the writes must go out on their first poll, ahead of COMMIT.
        let statements = self.write_statements(&session).await?;
        let txn = Serializable::new(session);
        let verdicts = txn.begin_with(self.failed_checks(txn.session(), picked.iter().map(|t| t.checks.as_slice())));
        let verdicts = verdicts.await?;
        let passed = picked.iter().zip(&verdicts).filter(|(_, v)| v.is_none());
        let folded = fold::fold(passed.flat_map(|(t, _)| &t.mutations));
        txn.commit_with(Self::send_writes(txn.session(), &statements, &folded)).await?;
        if verdicts.iter().any(Option::is_none) {
            metrics::counter!(crate::metrics::STORE_COMMITS).increment(1);
        }
        Ok(Ok(verdicts
            .into_iter()
            .map(|v| v.map_or(Ok(()), |(index, key)| Err(StoreError::Conflict { index, key })))
            .collect()))
    }

    /// One attempt at one store transaction of a group: the result of each transaction of
    /// `run`, in order (`Err` of the attempt: none was applied, or it is unknown).
    ///
    /// When no check of the run reads what an earlier transaction of it writes (transactions
    /// of different actors), the run is [`PostgresStore::try_commit_independent`]; otherwise
    /// each transaction is checked after the writes of the ones before it, one by one.
    async fn try_commit_run(
        &self,
        txns: &[Txn],
        run: &[usize],
    ) -> Result<Result<Vec<Result<(), StoreError>>, StoreError>, tokio_postgres::Error> {
        let picked: Vec<&Txn> = run.iter().map(|&i| &txns[i]).collect();
        if fold::checks_independent(picked.iter().copied()) {
            return self.try_commit_independent(&picked).await;
        }
        let mut client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => return Ok(Err(self.pool_err(e))),
        };
        let tx = client.build_transaction().isolation_level(IsolationLevel::Serializable).start().await?;
        let mut results = Vec::with_capacity(picked.len());
        for txn in picked {
            // Checked after the writes of the transactions before it, as if committed after them.
            match self.failed_check(&tx, &txn.checks).await? {
                Some((index, key)) => results.push(Err(StoreError::Conflict { index, key })),
                None => {
                    self.apply(&tx, &txn.mutations).await?;
                    results.push(Ok(()));
                }
            }
        }
        tx.commit().await?;
        if results.iter().any(Result::is_ok) {
            metrics::counter!(crate::metrics::STORE_COMMITS).increment(1);
        }
        Ok(Ok(results))
    }

    /// The first check that fails, all of them sent at once (one round trip, pipelined).
    pub(crate) async fn failed_check(
        &self,
        tx: &impl GenericClient,
        checks: &[Check],
    ) -> Result<Option<(usize, Vec<u8>)>, tokio_postgres::Error> {
        Ok(self.failed_checks(tx, std::iter::once(checks)).await?.pop().flatten())
    }

    /// For each list of checks, its first check that fails; every check of every list read in
    /// the same snapshot, in at most two statements sent at once (one round trip): every value
    /// check's key in one `key = ANY(...)` read, every digest check's range in one more.
    pub(crate) async fn failed_checks<'c>(
        &self,
        tx: &impl GenericClient,
        lists: impl Iterator<Item = &'c [Check]>,
    ) -> Result<Vec<Option<(usize, Vec<u8>)>>, tokio_postgres::Error> {
        let lists: Vec<&[Check]> = lists.collect();
        let checks = || lists.iter().flat_map(|l| l.iter());
        let keys: Vec<&[u8]> = checks()
            .filter_map(|c| match c {
                Check::Value { key, .. } => Some(key.as_slice()),
                Check::RangeDigest { .. } => None,
            })
            .collect();
        let ranges: Vec<&KeyRange> = checks()
            .filter_map(|c| match c {
                Check::RangeDigest { range, .. } => Some(range),
                Check::Value { .. } => None,
            })
            .collect();
        let values = async {
            if keys.is_empty() {
                return Ok(std::collections::HashMap::new());
            }
            let get_many = tx.prepare_cached(&self.sql.get_many).await?;
            let rows = tx.query(&get_many, &[&keys]).await?;
            Ok(rows.into_iter().map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1))).collect())
        };
        let (values, digests) = futures::try_join!(values, self.range_digests(tx, &ranges))?;
        let mut digests = digests.into_iter();
        let holds: Vec<bool> = checks()
            .map(|check| match check {
                Check::Value { key, expected } => values.get(key.as_slice()) == expected.as_ref(),
                // One digest per digest check, in order.
                Check::RangeDigest { expected, .. } => digests.next() == Some(*expected),
            })
            .collect();
        let mut holds = holds.into_iter();
        Ok(lists
            .iter()
            .map(|checks| {
                let own: Vec<bool> = holds.by_ref().take(checks.len()).collect();
                own.iter().position(|h| !h).map(|index| {
                    let key = match &checks[index] {
                        Check::Value { key, .. } => key.clone(),
                        Check::RangeDigest { range, .. } => range.start.clone(),
                    };
                    (index, key)
                })
            })
            .collect())
    }

    /// The digest of each range's rows, in the order of `ranges`, read in one statement.
    async fn range_digests(
        &self,
        tx: &impl GenericClient,
        ranges: &[&KeyRange],
    ) -> Result<Vec<u128>, tokio_postgres::Error> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let stmt = tx.prepare_cached(&self.sql.ranges_rows).await?;
        let starts: Vec<&[u8]> = ranges.iter().map(|r| r.start.as_slice()).collect();
        let ends: Vec<&[u8]> = ranges.iter().map(|r| r.end.as_slice()).collect();
        let rows = tx.query_raw(&stmt, [&starts, &ends]).await?;
        futures::pin_mut!(rows);
        let mut digests: Vec<RangeDigest> = ranges.iter().map(|_| RangeDigest::new()).collect();
        while let Some(row) = rows.try_next().await? {
            // The range's 1-based position in the arrays; rows come in key order within it.
            let at = usize::try_from(row.get::<_, i64>(0)).ok().and_then(|i| i.checked_sub(1));
            if let Some(digest) = at.and_then(|i| digests.get_mut(i)) {
                digest.update(row.get::<_, &[u8]>(1), row.get::<_, &[u8]>(2));
            }
        }
        Ok(digests.iter().map(RangeDigest::finish).collect())
    }

    /// A store transaction's error, retried as [`Store::commit`] retries.
    async fn commit_run(&self, txns: &[Txn], run: &[usize]) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.rerun_serializable(move || self.try_commit_run(txns, run)).await.and_then(|own| own)
    }

    /// Runs `attempt` until it ends other than in a serialization failure or deadlock, re-running
    /// it whole (its checks with it) at most [`SERIALIZATION_RETRIES`] times after a random
    /// pause that grows with each try.
    async fn rerun_serializable<T, Fut>(&self, mut attempt: impl FnMut() -> Fut) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut tries = 0;
        loop {
            match attempt().await {
                Ok(done) => return Ok(done),
                Err(e) if is_retryable(&e) && tries < SERIALIZATION_RETRIES => {
                    tries += 1;
                    let jitter = rand::random_range(0..=(5u64 << tries.min(6)));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(e) => return Err(self.err(e)),
            }
        }
    }

    /// Applies `mutations` in order, folded ([`fold`]) into one statement per batch (the
    /// cleared ranges, the point clears, the sets), all sent at once: one round trip.
    pub(crate) async fn apply<'m>(
        &self,
        tx: &impl GenericClient,
        mutations: impl IntoIterator<Item = &'m Mutation>,
    ) -> Result<(), tokio_postgres::Error> {
        let statements = self.write_statements(tx).await?;
        Self::send_writes(tx, &statements, &fold::fold(mutations)).await
    }

    /// Prepares the statements of [`PostgresStore::apply`] on the session (cached: once per
    /// session), so that a later `apply` sends its writes on its first poll.
    pub(crate) async fn prepare_writes(&self, tx: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
        self.write_statements(tx).await.map(drop)
    }

    /// The statements of [`PostgresStore::send_writes`], prepared (once per session).
    async fn write_statements(&self, tx: &impl GenericClient) -> Result<WriteStatements, tokio_postgres::Error> {
        Ok(WriteStatements {
            delete_ranges: tx.prepare_cached(&self.sql.delete_ranges).await?,
            delete_keys: tx.prepare_cached(&self.sql.delete_keys).await?,
            upsert: tx.prepare_cached(&self.sql.upsert).await?,
        })
    }

    /// Sends `folded`'s statements, at most three (the range clears, the point clears, the
    /// sets), every one on the first poll: a fixed join polls each in turn and none awaits
    /// anything before its statement, which [`Serializable::commit_with`] relies on (a join of
    /// a variable number of futures may stop polling half-way, letting `COMMIT` overtake).
    /// Executed in the order sent, which is the order [`fold::Folded`] must be applied in.
    async fn send_writes(
        tx: &impl GenericClient,
        statements: &WriteStatements,
        folded: &fold::Folded<'_>,
    ) -> Result<(), tokio_postgres::Error> {
        let WriteStatements { delete_ranges, delete_keys, upsert } = statements;
        let (starts, ends): (Vec<&[u8]>, Vec<&[u8]>) =
            folded.ranges.iter().map(|r| (r.start.as_slice(), r.end.as_slice())).unzip();
        let (keys, values): (Vec<&[u8]>, Vec<&[u8]>) = folded.sets.iter().copied().unzip();
        let clears = &folded.clears;
        let ranges = async {
            if starts.is_empty() {
                return Ok(0);
            }
            tx.execute(delete_ranges, &[&starts, &ends]).await
        };
        let clears = async {
            if clears.is_empty() {
                return Ok(0);
            }
            tx.execute(delete_keys, &[clears]).await
        };
        let sets = async {
            if keys.is_empty() {
                return Ok(0);
            }
            tx.execute(upsert, &[&keys, &values]).await
        };
        // Polled first in this order, so sent (and executed) in it.
        futures::try_join!(ranges, clears, sets)?;
        Ok(())
    }
}

/// The prepared statements of a transaction's writes.
struct WriteStatements {
    delete_ranges: tokio_postgres::Statement,
    delete_keys: tokio_postgres::Statement,
    upsert: tokio_postgres::Statement,
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

/// Re-run inside [`Store::commit`]: the server gave up on this attempt, not on the commit.
pub(crate) fn is_retryable(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// Whether retrying later can succeed.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true, // I/O, closed connection, timeouts: the server or network went away.
        Some(c) => {
            is_retryable(e)
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::CONNECTION_FAILURE
                || *c == SqlState::CONNECTION_EXCEPTION
                // statement_timeout, or a cancel.
                || *c == SqlState::QUERY_CANCELED
                // lock_timeout: a takeover waited on the row lock of a paused holder, whose
                // session the idle timeout is about to end.
                || *c == SqlState::LOCK_NOT_AVAILABLE
                // Our own session outlived idle_in_transaction_session_timeout.
                || *c == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
                // Class 53, insufficient resources: out of memory (`out of shared memory` when
                // a long transaction exhausts max_pred_locks_per_transaction), disk full, too
                // many connections. They pass when the transaction holding them ends.
                || c.code().starts_with("53")
                || c.code().starts_with("08")
        }
    }
}

/// The root cause of a driver error: the server's severity, SQLSTATE and message (never its
/// DETAIL, which can quote row values), or the error and its chain of sources.
fn root_cause(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut out = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(hint) = db.hint() {
            out.push_str(&format!(" (hint: {hint})"));
        }
        return out;
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `host:port` of every server a config names (a Unix socket by its directory).
fn endpoint(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            // The driver's rule: one port for every host, or one each; 5432 when none.
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}/.s.PGSQL.{port}", path.display()),
            }
        })
        .collect();
    if hosts.is_empty() { "localhost:5432".into() } else { hosts.join(",") }
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.sql.get).await.map_err(|e| self.err(e))?;
        let row = client.query_opt(&stmt, &[&key]).await.map_err(|e| self.err(e))?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.sql.scan).await.map_err(|e| self.err(e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client.query(&stmt, &[&range.start, &range.end, &limit]).await.map_err(|e| self.err(e))?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.sql.first_key).await.map_err(|e| self.err(e))?;
        let row = client.query_opt(&stmt, &[&range.start, &range.end]).await.map_err(|e| self.err(e))?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn scan_keys(&self, range: &KeyRange, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.sql.scan_keys).await.map_err(|e| self.err(e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client.query(&stmt, &[&range.start, &range.end, &limit]).await.map_err(|e| self.err(e))?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        limits::check_txn(&txn)?;
        let txn = &txn;
        self.rerun_serializable(move || self.try_commit(txn)).await.and_then(|own| own)
    }

    async fn read_many(&self, reads: &[Read]) -> Result<Vec<ReadResult>, StoreError> {
        let client = self.client().await?;
        let get_many = client.prepare_cached(&self.sql.get_many).await.map_err(|e| self.err(e))?;
        let scan = client.prepare_cached(&self.sql.scan).await.map_err(|e| self.err(e))?;
        let keys: Vec<&[u8]> = reads
            .iter()
            .filter_map(|r| match r {
                Read::Get(key) => Some(key.as_slice()),
                Read::Scan { .. } => None,
            })
            .collect();
        let points = async {
            if keys.is_empty() {
                return Ok(std::collections::HashMap::new());
            }
            let rows = client.query(&get_many, &[&keys]).await?;
            Ok::<_, tokio_postgres::Error>(
                rows.into_iter().map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1))).collect(),
            )
        };
        // Sent together on one connection: one round trip for the batch.
        let scans = futures::future::try_join_all(reads.iter().filter_map(|r| match r {
            Read::Scan { range, limit } => Some(async {
                let limit = i64::try_from(*limit).unwrap_or(i64::MAX);
                let rows = client.query(&scan, &[&range.start, &range.end, &limit]).await?;
                Ok::<Vec<KeyValue>, tokio_postgres::Error>(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
            }),
            Read::Get(_) => None,
        }));
        let (points, scans) = futures::try_join!(points, scans).map_err(|e| self.err(e))?;
        let mut scans = scans.into_iter();
        Ok(reads
            .iter()
            .map(|r| match r {
                Read::Get(key) => ReadResult::Value(points.get(key.as_slice()).cloned()),
                // One scan result per scan read, in order.
                Read::Scan { .. } => ReadResult::Rows(scans.next().unwrap_or_default()),
            })
            .collect())
    }

    async fn commit_many(&self, txns: Vec<Txn>) -> Vec<Result<(), StoreError>> {
        let plan = limits::plan_group(&txns);
        let mut results = limits::result_slots(txns.len(), plan.refused);
        for run in &plan.runs {
            match self.commit_run(&txns, run).await {
                Ok(each) => {
                    for (&i, r) in run.iter().zip(each) {
                        results[i] = Some(r);
                    }
                }
                Err(e) => {
                    for &i in run {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        limits::group_results(results, BACKEND)
    }

    fn describe(&self) -> String {
        self.described.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(conninfo: &str) -> PostgresUrl {
        match super::super::StoreUrl::parse(conninfo).expect("test URL parses") {
            super::super::StoreUrl::Postgres(p) => p,
            other => panic!("not postgres: {other:?}"),
        }
    }

    #[test]
    fn limits_are_below_the_lease_ttl_and_the_url_overrides_them() {
        let limits = SessionLimits::for_lease_ttl(Duration::from_secs(5));
        for bound in [limits.idle_in_transaction, limits.statement, limits.lock] {
            assert!(bound < Duration::from_secs(5), "{limits:?}");
        }
        assert!(limits.lock < limits.idle_in_transaction, "{limits:?}");

        let plain = url("postgres://u@h/db");
        let mut config: tokio_postgres::Config = plain.conninfo.parse().unwrap();
        limits.apply(&mut config, &plain);
        let options = config.get_options().unwrap();
        assert!(options.contains("-c idle_in_transaction_session_timeout=2500"), "{options}");
        assert!(options.contains("-c lock_timeout=1250"), "{options}");
        assert!(options.contains("-c jit=off"), "{options}");
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(10)));
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(config.get_application_name(), Some("ferry"));

        // The operator's settings come after ferry's (the server keeps the last) or replace them.
        let custom = url(
            "postgres://u@h/db?options=-c%20lock_timeout%3D300&connect_timeout=3&keepalives_idle=7&application_name=x",
        );
        let mut config: tokio_postgres::Config = custom.conninfo.parse().unwrap();
        limits.apply(&mut config, &custom);
        let options = config.get_options().unwrap();
        assert!(options.ends_with(" -c lock_timeout=300"), "{options}");
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(7));
        assert_eq!(config.get_application_name(), Some("x"));
    }

    #[tokio::test]
    async fn a_created_table_compresses_values_with_lz4() {
        let store = crate::testing::TestStore::new(crate::testing::Backend::Postgres).await;
        let (client, conn) = tokio_postgres::connect(&crate::testing::postgres_url(), NoTls).await.expect("connect");
        tokio::spawn(conn);
        let table = format!("{}.kv", store.schema().expect("a PostgreSQL fixture has a schema"));
        let sql =
            "SELECT attcompression::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = 'value'";
        let row = client.query_one(sql, &[&table]).await.expect("the created table has a value column");
        assert_eq!(row.get::<_, String>(0), "l", "{table}: value is compressed with lz4");
    }

    /// The plans of `sql` (parameters: range starts, range ends) over `ranges` actor prefixes,
    /// as PostgreSQL would run it under `mode` (a custom or the generic plan), as text.
    async fn plan_of(client: &tokio_postgres::Client, sql: &str, mode: &str, ranges: usize) -> String {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let array = |end: u8| {
            let items: Vec<String> = (0..ranges)
                .map(|i| format!("\"\\\\x{}\"", hex(format!("ferry/{i}{}", end as char).as_bytes())))
                .collect();
            format!("'{{{}}}'::bytea[]", items.join(","))
        };
        client
            .batch_execute(&format!("SET plan_cache_mode = {mode}; DEALLOCATE ALL"))
            .await
            .expect("set the plan mode");
        client
            .batch_execute(&format!("PREPARE ranges(bytea[], bytea[]) AS {sql}"))
            .await
            .expect("the statement prepares");
        let explain = format!("EXPLAIN EXECUTE ranges({}, {})", array(b'/'), array(b'0'));
        let lines = client.simple_query(&explain).await.expect("the statement is explained");
        let lines = lines.iter().filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        });
        lines.collect::<Vec<_>>().join("\n")
    }

    #[tokio::test]
    async fn statements_over_several_ranges_read_each_range_through_the_key_index_however_large_the_table() {
        let store = crate::testing::TestStore::new(crate::testing::Backend::Postgres).await;
        let (client, conn) = tokio_postgres::connect(&crate::testing::postgres_url(), NoTls).await.expect("connect");
        tokio::spawn(conn);
        // Wide rows kept in the table itself (PLAIN storage: not compressed, not moved out):
        // few rows per page, so a scan of the whole table looks cheap next to a share of it
        // read through the index. The plain join of the ranges to the table was planned as a
        // parallel sequential scan of it here, and with JIT on.
        let table = format!("{}.wide", store.schema().expect("a PostgreSQL fixture has a schema"));
        let setup = format!(
            "CREATE TABLE {table} (key bytea PRIMARY KEY, value bytea NOT NULL); \
             ALTER TABLE {table} ALTER COLUMN value SET STORAGE PLAIN; \
             INSERT INTO {table} SELECT convert_to('ferry/' || i || '/c/' || j, 'UTF8'), \
             convert_to(repeat('x', 3000), 'UTF8') FROM generate_series(1, 5000) i, generate_series(1, 4) j"
        );
        client.batch_execute(&setup).await.expect("the wide table is filled");
        let sql = Statements::new(&table);
        for analyzed in [false, true] {
            if analyzed {
                client.batch_execute(&format!("ANALYZE {table}")).await.expect("analyze");
            }
            for mode in ["force_custom_plan", "force_generic_plan"] {
                for ranges in [8, 64] {
                    for (name, statement) in [("ranges_rows", &sql.ranges_rows), ("delete_ranges", &sql.delete_ranges)]
                    {
                        let plan = plan_of(&client, statement, mode, ranges).await;
                        let at = format!("{name}, {mode}, {ranges} ranges, analyzed: {analyzed}");
                        assert!(!plan.contains("Seq Scan"), "{at}: the table is scanned whole: {plan}");
                        assert!(plan.contains("wide_pkey"), "{at}: no index scan: {plan}");
                    }
                }
            }
        }
    }

    /// A real server error of SQLSTATE `code`.
    async fn server_error(client: &tokio_postgres::Client, code: &str) -> tokio_postgres::Error {
        let sql = format!("DO $$ BEGIN RAISE EXCEPTION 'raised {code}' USING ERRCODE = '{code}'; END $$");
        client.batch_execute(&sql).await.expect_err("RAISE fails")
    }

    #[tokio::test]
    async fn timeouts_and_exhausted_server_resources_are_transient_schema_and_auth_errors_are_not() {
        let base = crate::testing::postgres_url();
        let (client, conn) = tokio_postgres::connect(&base, NoTls)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL must be running for this test ({base}): {e}"));
        tokio::spawn(conn);
        // 53200: `out of shared memory` (max_pred_locks_per_transaction) while a paused worker
        // keeps a SERIALIZABLE transaction open; 55P03 lock_timeout; 57014 statement_timeout;
        // 25P03 idle_in_transaction_session_timeout; 53300 too many connections.
        for code in ["53200", "55P03", "57014", "25P03", "53300", "40001", "40P01"] {
            let e = server_error(&client, code).await;
            assert!(is_transient(&e), "{code} should be transient: {}", root_cause(&e));
        }
        for code in ["3D000", "28000", "42P01", "42501", "22000"] {
            let e = server_error(&client, code).await;
            assert!(!is_transient(&e), "{code} should be permanent: {}", root_cause(&e));
        }
        let e = server_error(&client, "53200").await;
        assert_eq!(root_cause(&e), "ERROR 53200: raised 53200");
    }
}
