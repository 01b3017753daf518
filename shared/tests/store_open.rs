//! Opening a store (`store::open_with`): an existing-mode open of a missing store is a clear
//! error that creates nothing, on both backends; PostgreSQL connection errors keep their root
//! cause and name the server, never the password; every PostgreSQL session is bounded in time,
//! so a commit blocked on a row lock of a stuck transaction fails (transient) instead of
//! hanging.
//!
//! PostgreSQL must be running (`ferry::testing::postgres_url()`); these tests fail, never skip,
//! when it is not.

use std::time::{Duration, Instant};

use ferry::store::{self, OpenMode, OpenOptions, StoreError, Txn};
use ferry::testing::{postgres_url, unique_name};

fn existing(pool: usize) -> OpenOptions {
    OpenOptions::new(pool, OpenMode::Existing)
}

/// A raw connection to the test server, for looking at the catalog behind the store's back.
async fn admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must be running for this test ({}): {e}", postgres_url()));
    tokio::spawn(conn);
    client
}

fn with_schema(schema: &str) -> String {
    let base = postgres_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}schema={schema}")
}

async fn schema_exists(client: &tokio_postgres::Client, schema: &str) -> bool {
    client
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", &[&schema])
        .await
        .expect("catalog query")
        .get(0)
}

async fn table_exists(client: &tokio_postgres::Client, table: &str) -> bool {
    client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.expect("catalog query").get(0)
}

fn missing(result: Result<store::DynStore, StoreError>) -> (String, String) {
    match result {
        Err(StoreError::Missing { url, what }) => (url, what),
        Err(e) => panic!("expected a missing-store error, got {e}"),
        Ok(s) => panic!("opened {} although it does not exist", s.describe()),
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite

#[tokio::test]
async fn sqlite_existing_open_of_a_missing_path_fails_and_creates_no_file_or_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("missing.db");
    let url = format!("sqlite:{}", path.display());
    let (named, what) = missing(store::open_with(&url, &existing(2)).await);
    assert_eq!(named, url);
    assert!(what.contains("no such file"), "{what}");
    assert!(!dir.path().join("sub").exists(), "the directory was created");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "something was created");
}

#[tokio::test]
async fn sqlite_existing_open_of_a_file_without_the_kv_table_fails_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other).unwrap().execute_batch("CREATE TABLE t (x);").unwrap();
    let before = std::fs::read(&other).unwrap();
    let (_, what) = missing(store::open_with(&format!("sqlite:{}", other.display()), &existing(1)).await);
    assert!(what.contains("no kv table"), "{what}");
    assert_eq!(std::fs::read(&other).unwrap(), before, "the file was changed");

    // An empty file is not a store either, and stays empty (no header written by a pragma).
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    missing(store::open_with(&format!("sqlite:{}", empty.display()), &existing(1)).await);
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
}

#[tokio::test]
async fn sqlite_existing_open_works_on_a_store_made_by_a_create_open() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("new").join("ferry.db").display());
    let created = store::open(&url, 1).await.unwrap();
    let mut txn = Txn::new();
    txn.set(b"k".to_vec(), b"v".to_vec());
    created.commit(txn).await.unwrap();
    drop(created);
    let reopened = store::open_with(&url, &existing(2)).await.unwrap();
    assert_eq!(reopened.get(b"k").await.unwrap(), Some(b"v".to_vec()));
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: open modes

#[tokio::test]
async fn postgres_existing_open_of_a_missing_schema_fails_naming_it_and_creates_nothing() {
    let admin = admin().await;
    let schema = unique_name("ferry_missing");
    let (url, what) = missing(store::open_with(&with_schema(&schema), &existing(1)).await);
    assert!(what.contains(&format!("schema {schema} does not exist")), "{what}");
    assert!(url.contains("127.0.0.1") || url.contains("localhost") || url.contains('@'), "{url}");
    assert!(!schema_exists(&admin, &schema).await, "the schema was created");
}

#[tokio::test]
async fn postgres_existing_open_of_a_schema_without_the_table_fails_naming_it_and_creates_nothing() {
    let admin = admin().await;
    let schema = unique_name("ferry_notable");
    admin.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
    let result = store::open_with(&with_schema(&schema), &existing(1)).await;
    let created = table_exists(&admin, &format!("{schema}.kv")).await;
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
    let (_, what) = missing(result);
    assert!(what.contains(&format!("table {schema}.kv does not exist")), "{what}");
    assert!(!created, "the table was created");
}

#[tokio::test]
async fn postgres_existing_open_works_on_a_store_made_by_a_create_open() {
    let ts = ferry::testing::TestStore::new(ferry::testing::Backend::Postgres).await;
    let mut txn = Txn::new();
    txn.set(b"k".to_vec(), b"v".to_vec());
    ts.store.commit(txn).await.unwrap();
    let reopened = store::open_with(&ts.url, &existing(1)).await.unwrap();
    assert_eq!(reopened.get(b"k").await.unwrap(), Some(b"v".to_vec()));
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: errors keep their cause

const PASSWORD: &str = "pw-must-not-leak-7731";

/// `postgres://{user}:PASSWORD@127.0.0.1:{port}/{db}` on the test server's host.
fn url_for(user: &str, port: u16, db: &str) -> String {
    format!("postgres://{user}:{PASSWORD}@127.0.0.1:{port}/{db}")
}

async fn open_error(url: &str) -> StoreError {
    match tokio::time::timeout(Duration::from_secs(30), store::open_with(url, &existing(1))).await {
        Ok(Err(e)) => e,
        Ok(Ok(_)) => panic!("opened {}", store::redact_url(url)),
        Err(_) => panic!("opening {} hung", store::redact_url(url)),
    }
}

#[tokio::test]
async fn a_missing_database_is_named_with_its_sqlstate_and_server_and_no_password() {
    let e = open_error(&url_for("postgres", 5432, "ferry_no_such_db")).await;
    let text = e.to_string();
    assert!(text.contains("3D000") && text.contains("\"ferry_no_such_db\" does not exist"), "{text}");
    assert!(text.contains("127.0.0.1:5432"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(!e.is_transient(), "a missing database is permanent: {text}");
}

#[tokio::test]
async fn a_missing_role_is_named_with_its_sqlstate_and_server_and_no_password() {
    let e = open_error(&url_for("ferry_no_such_role", 5432, "test")).await;
    let text = e.to_string();
    assert!(text.contains("28000") && text.contains("\"ferry_no_such_role\" does not exist"), "{text}");
    assert!(text.contains("127.0.0.1:5432"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
}

#[tokio::test]
async fn a_closed_port_is_named_with_the_io_cause_and_no_password() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = open_error(&url_for("postgres", port, "test")).await;
    let text = e.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(text.to_lowercase().contains("refused"), "the I/O cause is lost: {text}");
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(e.is_transient(), "a server that is not up yet is transient: {text}");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: bounded sessions

/// A commit that needs a row lock held by a transaction that never ends (a paused process)
/// fails with `lock_timeout`, as a transient error, within the bound the lease TTL sets.
#[tokio::test]
async fn a_commit_blocked_on_a_stuck_row_lock_fails_transiently_within_the_lock_timeout() {
    let ts = ferry::testing::TestStore::new(ferry::testing::Backend::Postgres).await;
    let mut txn = Txn::new();
    txn.set(b"lease".to_vec(), b"old".to_vec());
    ts.store.commit(txn).await.unwrap();

    // The stuck holder: a raw session, with no ferry limits, that locks the row and waits.
    let mut holder = admin().await;
    let schema = ts.schema().expect("a PostgreSQL fixture has a schema").to_string();
    let tx = holder.transaction().await.unwrap();
    tx.execute(&format!("UPDATE {schema}.kv SET value = 'held' WHERE key = 'lease'"), &[]).await.unwrap();

    let lease_ttl = Duration::from_secs(4);
    let bounded = store::open_with(&ts.url, &existing(1).lease_ttl(lease_ttl)).await.unwrap();
    let started = Instant::now();
    let mut txn = Txn::new();
    txn.set(b"lease".to_vec(), b"taken over".to_vec());
    let result = tokio::time::timeout(Duration::from_secs(20), bounded.commit(txn))
        .await
        .expect("the commit hung on the row lock");
    let waited = started.elapsed();
    let e = result.expect_err("the commit went through a held row lock");
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains("55P03"), "not the lock timeout: {e}");
    assert!(waited < lease_ttl, "waited {waited:?}, longer than the lease");
    tx.rollback().await.unwrap();

    // Once the holder is gone the same commit goes through.
    let mut txn = Txn::new();
    txn.set(b"lease".to_vec(), b"taken over".to_vec());
    bounded.commit(txn).await.unwrap();
}
