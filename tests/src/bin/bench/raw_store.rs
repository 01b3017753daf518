//! The raw store limit of small jobs: a minimal client per backend that issues one small job's
//! exact store work per actor, at the worker's concurrency, and commits each job alone.
//!
//! Per job, as ferry does it for a small actor: one batch of reads (the actor's SQLite range,
//! its v2 head, its lease and its dead letter; one call on SQLite, one pipelined round trip on
//! PostgreSQL), then one transaction that checks the head, lease and dead letter (absent) and
//! the digest of the range it read,
//! and writes a DELTA blob, a PIDX row per page, the head and the audit record, and clears the
//! lease. The rows go under `bench-raw/` (cleared after), so the store the fleet runs on next
//! is unchanged. No LZ4, quick_check, broker or serialization: only the store's work.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use ferry::ActorId;
use ferry::store::RangeDigest;
use ferry::testing::{Backend, TestStore, postgres_url};

/// Bytes of the DELTA blob each job writes: a small actor's compressed pages.
const DELTA_BYTES: usize = 6 * 1024;
/// Bytes of the head and of the audit record, about what ferry writes.
const HEAD_BYTES: usize = 90;
const AUDIT_BYTES: usize = 700;

/// The rows one job writes for `actor` (under `bench-raw/`), given the pages its scan found.
fn writes(actor: &ActorId, pages: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let base = format!("bench-raw/{actor}/");
    let key = |s: &str| [base.as_bytes(), s.as_bytes()].concat();
    let mut rows = vec![(key("DELTA/0"), vec![0x5a; DELTA_BYTES])];
    for pgno in 1..=pages.max(1) as u32 {
        rows.push(([key("PIDX/").as_slice(), &pgno.to_be_bytes()].concat(), 1u64.to_be_bytes().to_vec()));
    }
    rows.push((key("META"), vec![1; HEAD_BYTES]));
    rows.push((key("AUDIT"), vec![b'{'; AUDIT_BYTES]));
    rows
}

/// What the raw clients measured.
pub struct RawStore {
    /// Jobs per second.
    pub rate: f64,
    /// The PostgreSQL server's CPU seconds per 1,000 jobs (0 on SQLite).
    pub postgres_cpu: f64,
}

/// Jobs per second of `concurrency` raw clients over `actors` (each actor once).
pub async fn raw_store(store: &TestStore, actors: &[ActorId], concurrency: usize) -> Result<RawStore> {
    let actors = Arc::new(Mutex::new(actors.to_vec()));
    let n = actors.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.len();
    let servers = super::ServerClock::start();
    let started = Instant::now();
    let (elapsed, postgres_cpu) = match store.backend {
        Backend::Postgres => {
            let clients = postgres(store, actors, concurrency).await?;
            let elapsed = started.elapsed();
            // Read while the clients' backends live: an exited backend's CPU is gone from /proc.
            let cpu = servers.per_1000(n as u64).postgres;
            drop(clients);
            (elapsed, cpu)
        }
        Backend::Sqlite => {
            sqlite(store, actors, concurrency).await?;
            (started.elapsed(), 0.0)
        }
        // The raw limit is measured on the plain table; the rivet section compares against it.
        Backend::Rivet => anyhow::bail!("the raw store limit is measured on the ferry layout"),
    };
    let rate = n as f64 / elapsed.as_secs_f64();
    let mut clear = ferry::store::Txn::new();
    clear.clear_range(ferry::store::KeyRange::prefix(b"bench-raw/"));
    store.store.commit(clear).await?;
    Ok(RawStore { rate, postgres_cpu })
}

/// The parameters of the four reads of a job.
type ParamSets<'a> = (
    [&'a (dyn tokio_postgres::types::ToSql + Sync); 3],
    [&'a (dyn tokio_postgres::types::ToSql + Sync); 1],
    [&'a (dyn tokio_postgres::types::ToSql + Sync); 1],
    [&'a (dyn tokio_postgres::types::ToSql + Sync); 1],
);

fn next(actors: &Mutex<Vec<ActorId>>) -> Option<ActorId> {
    actors.lock().ok()?.pop()
}

/// Runs the raw clients; returns them, still connected, so their backends' CPU can be read.
async fn postgres(
    store: &TestStore,
    actors: Arc<Mutex<Vec<ActorId>>>,
    concurrency: usize,
) -> Result<Vec<tokio_postgres::Client>> {
    let schema = store.schema().context("a PostgreSQL fixture has a schema")?.to_string();
    let table = format!("{schema}.kv");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (actors, table) = (Arc::clone(&actors), table.clone());
        let (mut client, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        tasks.spawn(async move {
            let get = client.prepare(&format!("SELECT value FROM {table} WHERE key = $1")).await?;
            let scan = client
                .prepare(&format!("SELECT key, value FROM {table} WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3"))
                .await?;
            let range_rows = client
                .prepare(&format!("SELECT key, value FROM {table} WHERE key >= $1 AND key < $2 ORDER BY key"))
                .await?;
            let upsert = client
                .prepare(&format!(
                    "INSERT INTO {table} (key, value) SELECT * FROM UNNEST($1::bytea[], $2::bytea[]) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value"
                ))
                .await?;
            let delete = client.prepare(&format!("DELETE FROM {table} WHERE key = ANY($1::bytea[])")).await?;
            while let Some(actor) = next(&actors) {
                let range = ferry::v1::keys::sqlite_range(&actor);
                let (head_key, lease_key) = (ferry::v2::keys::meta(&actor), ferry::keys::lease(&actor));
                let dead_key = ferry::keys::dead(&actor);
                let limit = ferry::v1::read::SCAN_BATCH as i64;
                // The batch of reads, pipelined.
                let (scan_params, head_params, lease_params, dead_params): ParamSets<'_> =
                    ([&range.start, &range.end, &limit], [&head_key], [&lease_key], [&dead_key]);
                let (rows, head, lease, dead) = futures::try_join!(
                    client.query(&scan, &scan_params),
                    client.query_opt(&get, &head_params),
                    client.query_opt(&get, &lease_params),
                    client.query_opt(&get, &dead_params),
                )?;
                ensure!(head.is_none() && lease.is_none() && dead.is_none(), "{actor} is not fresh");
                let mut digest = RangeDigest::new();
                for r in &rows {
                    digest.update(r.get::<_, &[u8]>(0), r.get::<_, &[u8]>(1));
                }
                let expected = digest.finish();
                // Re-run on a serialization failure, as the store's own commit does.
                let statements = Statements { get: &get, range_rows: &range_rows, upsert: &upsert, delete: &delete };
                loop {
                    match commit_once(&mut client, &actor, &statements, expected, rows.len()).await {
                        Ok(()) => break,
                        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            anyhow::Ok(client)
        });
    }
    let mut clients = Vec::new();
    while let Some(done) = tasks.join_next().await {
        clients.push(done??);
    }
    Ok(clients)
}

/// The prepared statements of a job's transaction.
struct Statements<'a> {
    get: &'a tokio_postgres::Statement,
    range_rows: &'a tokio_postgres::Statement,
    upsert: &'a tokio_postgres::Statement,
    delete: &'a tokio_postgres::Statement,
}

/// The job's transaction: the checks (pipelined), the writes, the commit.
async fn commit_once(
    client: &mut tokio_postgres::Client,
    actor: &ActorId,
    sql: &Statements<'_>,
    expected: u128,
    pages: usize,
) -> Result<(), tokio_postgres::Error> {
    let range = ferry::v1::keys::sqlite_range(actor);
    let (head_key, lease_key) = (ferry::v2::keys::meta(actor), ferry::keys::lease(actor));
    let tx = client.build_transaction().isolation_level(tokio_postgres::IsolationLevel::Serializable).start().await?;
    let range_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&range.start, &range.end];
    let head_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&head_key];
    let lease_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&lease_key];
    let dead_key = ferry::keys::dead(actor);
    let dead_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&dead_key];
    let (h, l, d, range_now) = futures::try_join!(
        tx.query_opt(sql.get, &head_params),
        tx.query_opt(sql.get, &lease_params),
        tx.query_opt(sql.get, &dead_params),
        tx.query(sql.range_rows, &range_params),
    )?;
    let mut now = RangeDigest::new();
    for r in &range_now {
        now.update(r.get::<_, &[u8]>(0), r.get::<_, &[u8]>(1));
    }
    // The actor is this client's alone: the checks hold (a failure is a bug of the harness).
    assert!(h.is_none() && l.is_none() && d.is_none() && now.finish() == expected, "{actor} changed");
    let (keys, values): (Vec<Vec<u8>>, Vec<Vec<u8>>) = writes(actor, pages).into_iter().unzip();
    tx.execute(sql.upsert, &[&keys, &values]).await?;
    tx.execute(sql.delete, &[&vec![lease_key]]).await?;
    tx.commit().await
}

async fn sqlite(store: &TestStore, actors: Arc<Mutex<Vec<ActorId>>>, concurrency: usize) -> Result<()> {
    let path = store.url.strip_prefix("sqlite:").context("sqlite URL")?.to_string();
    let open = |path: &str| -> Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(conn)
    };
    // One writer, as ferry's SQLite store has (SQLite has one writer at a time anyway).
    let writer = Arc::new(Mutex::new(open(&path)?));
    let mut threads = Vec::new();
    for _ in 0..concurrency {
        let (actors, writer, reader) = (Arc::clone(&actors), Arc::clone(&writer), open(&path)?);
        threads.push(tokio::task::spawn_blocking(move || -> Result<()> {
            let scan_rows = |c: &rusqlite::Connection, range: &ferry::store::KeyRange, limit: i64| {
                let mut stmt =
                    c.prepare_cached("SELECT key, value FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT ?3")?;
                let rows = stmt.query_map(rusqlite::params![range.start, range.end, limit], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            };
            let get = |c: &rusqlite::Connection, key: &[u8]| -> rusqlite::Result<Option<Vec<u8>>> {
                use rusqlite::OptionalExtension;
                c.prepare_cached("SELECT value FROM kv WHERE key = ?1")?.query_row([key], |r| r.get(0)).optional()
            };
            let digest = |rows: &[(Vec<u8>, Vec<u8>)]| {
                let mut d = RangeDigest::new();
                for (k, v) in rows {
                    d.update(k, v);
                }
                d.finish()
            };
            while let Some(actor) = next(&actors) {
                let range = ferry::v1::keys::sqlite_range(&actor);
                let (head_key, lease_key) = (ferry::v2::keys::meta(&actor), ferry::keys::lease(&actor));
                let dead_key = ferry::keys::dead(&actor);
                // The batch of reads: one read transaction.
                let tx = reader.unchecked_transaction()?;
                let rows = scan_rows(&tx, &range, ferry::v1::read::SCAN_BATCH as i64)?;
                let (head, lease, dead) = (get(&tx, &head_key)?, get(&tx, &lease_key)?, get(&tx, &dead_key)?);
                tx.commit()?;
                ensure!(head.is_none() && lease.is_none() && dead.is_none(), "{actor} is not fresh");
                let expected = digest(&rows);
                let mut w = writer.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                let tx = w.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let now = scan_rows(&tx, &range, i64::MAX)?;
                ensure!(
                    get(&tx, &head_key)?.is_none()
                        && get(&tx, &lease_key)?.is_none()
                        && get(&tx, &dead_key)?.is_none()
                        && digest(&now) == expected,
                    "{actor} changed"
                );
                for (k, v) in writes(&actor, rows.len()) {
                    tx.prepare_cached(
                        "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    )?
                    .execute(rusqlite::params![k, v])?;
                }
                tx.prepare_cached("DELETE FROM kv WHERE key = ?1")?.execute([&lease_key])?;
                tx.commit()?;
            }
            Ok(())
        }));
    }
    for t in threads {
        t.await??;
    }
    Ok(())
}
