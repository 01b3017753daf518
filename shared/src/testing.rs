//! Fixtures for tests and benchmarks: a fresh store of either backend, isolated per test (a
//! temp file for SQLite, a unique schema for PostgreSQL, dropped when the fixture is dropped).
//!
//! Tests that need a service talk to the real one and fail loudly when it is down; nothing
//! here skips.
//!
//! Behind the `test-support` feature (and `cfg(test)` for this crate's unit tests): the
//! binaries' library has no test service URLs or fixtures in it.

use std::sync::Arc;

use crate::layout::Layout;
use crate::store::{self, DynStore, OpenMode, OpenOptions};

/// PostgreSQL for tests: `FERRY_TEST_PG_URL`, default the machine's local server.
pub fn postgres_url() -> String {
    std::env::var("FERRY_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// RabbitMQ for tests: `FERRY_TEST_AMQP_URL`, default the machine's local broker.
pub fn amqp_url() -> String {
    std::env::var("FERRY_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name unique to this process and call, usable in schema and queue names.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}_{:012x}", std::process::id(), rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// Which backend (and layout) a fixture uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// rivet's own layout on PostgreSQL: a unique schema holding rivet's universaldb objects,
    /// created by [`create_rivet_objects`] exactly as DESIGN.md section 7 lists them. The store
    /// may write v1 rows (the fixture loads them).
    Rivet,
}

impl Backend {
    pub fn layout(self) -> Layout {
        match self {
            Backend::Sqlite | Backend::Postgres => Layout::Ferry,
            Backend::Rivet => Layout::Rivet,
        }
    }
}

/// rivet's universaldb objects in `schema`, written out here from DESIGN.md section 7 (and
/// rivet's driver at c1976e3), independently of ferry's own copy in `layout::udb`, so tests
/// check ferry against rivet's shape rather than against itself.
pub const RIVET_SCHEMA_DDL: &str = "
    CREATE SCHEMA {schema};
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
    CREATE INDEX ON {schema}.conflict_ranges (ts);
";

/// Creates rivet's objects in a new schema `schema` of the test server.
pub async fn create_rivet_objects(schema: &str) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    // Two tests creating the extension at once race on the catalog; the loser retries.
    for attempt in 0.. {
        match client.batch_execute(&RIVET_SCHEMA_DDL.replace("{schema}", schema)).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 5 && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns")
}

/// A fresh rivet actor id (random UUID, datacenter label 1) as ferry names it.
pub fn rivet_actor() -> crate::ActorId {
    crate::layout::RivetId::new(foundationdb_tuple::Uuid::from_u128(rand::random()), 1).to_actor()
}

/// An actor id valid in `layout`: `name` itself in the ferry layout, a fresh rivet id in
/// rivet's (rivet's ids carry no name).
pub fn actor_for(layout: Layout, name: &str) -> crate::ActorId {
    match layout {
        Layout::Ferry => crate::ActorId::parse(name).expect("a valid test actor name"),
        Layout::Rivet => rivet_actor(),
    }
}

/// A store for one test; cleans up after itself.
pub struct TestStore {
    pub store: DynStore,
    pub url: String,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    schema: Option<String>,
}

impl TestStore {
    pub async fn new(backend: Backend) -> TestStore {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir for a test store");
                let url = format!("sqlite:{}", dir.path().join("ferry.db").display());
                let store = store::open(&url, 4).await.expect("open sqlite test store");
                TestStore { store, url, backend, _dir: Some(dir), schema: None }
            }
            Backend::Postgres => {
                let schema = unique_name("ferry_t");
                let base = postgres_url();
                let sep = if base.contains('?') { '&' } else { '?' };
                let url = format!("{base}{sep}schema={schema}");
                let store = store::open(&url, 8)
                    .await
                    .unwrap_or_else(|e| panic!("PostgreSQL must be running for this test ({base}): {e}"));
                TestStore { store, url, backend, _dir: None, schema: Some(schema) }
            }
            Backend::Rivet => {
                let schema = unique_name("ferry_r");
                let base = postgres_url();
                create_rivet_objects(&schema)
                    .await
                    .unwrap_or_else(|e| panic!("PostgreSQL must be running for this test ({base}): {e:#}"));
                let sep = if base.contains('?') { '&' } else { '?' };
                let url = format!("{base}{sep}schema={schema}");
                let mut opts = OpenOptions::new(8, OpenMode::Existing).layout(Layout::Rivet);
                opts.v1_writes = true;
                let store =
                    store::open_with(&url, &opts).await.unwrap_or_else(|e| panic!("open rivet test store: {e}"));
                TestStore { store, url, backend, _dir: None, schema: Some(schema) }
            }
        }
    }

    /// The schema of a PostgreSQL fixture.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// An actor id valid in this fixture's layout (see [`actor_for`]).
    pub fn actor(&self, name: &str) -> crate::ActorId {
        actor_for(self.backend.layout(), name)
    }

    pub fn store(&self) -> DynStore {
        Arc::clone(&self.store)
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(schema) = self.schema.take() {
            // Drop runs outside any runtime guarantee: use a private thread and runtime.
            let url = postgres_url();
            let _ = std::thread::spawn(move || drop_schema(&url, &schema)).join();
        }
    }
}

fn drop_schema(url: &str, schema: &str) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    rt.block_on(async {
        if let Ok((client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await;
        }
    });
}
