//! Fixtures for tests and benchmarks: a fresh store of either backend, isolated per test (a
//! temp file for SQLite, a unique schema for PostgreSQL, dropped when the fixture is dropped).
//!
//! Tests that need a service talk to the real one and fail loudly when it is down; nothing
//! here skips.

use std::sync::Arc;

use crate::store::{self, DynStore};

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

/// Which backend a fixture uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
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
        }
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
