//! rivet's side of a rivet-layout test: physical rows read and written in `X.kv` directly, and
//! transactions run the way rivet's universaldb driver runs them on PostgreSQL (DESIGN.md
//! section 7), written out here independently of ferry's `layout::udb`:
//!
//! - reads in one `REPEATABLE READ` snapshot whose first statement is
//!   `nextval('X.global_version_seq')` (the start version);
//! - a commit on a second connection, in one transaction: a `conflict_ranges` row for every
//!   range read (`read`) and every key written (`write`, `[k, k ++ 00)`), all with the start
//!   version and `commit_version = nextval(...)`, then the writes. SQLSTATE 23P01 on the
//!   conflict rows means a conflicting transaction won.
//!
//! And a TCP proxy in front of PostgreSQL that holds a connection's traffic at the first
//! statement containing chosen text, so a test puts rivet's commit between two statements of
//! ferry's deterministically.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use ferry::store::KeyRange;

/// A plain connection to the test server.
pub async fn connect() -> Client {
    let (client, conn) = tokio_postgres::connect(&ferry::testing::postgres_url(), NoTls)
        .await
        .expect("PostgreSQL must be running for this test");
    tokio::spawn(conn);
    client
}

/// Every row of `X.kv` in `range` (or all of them), in key order, outside the protocol (a
/// test's look at the physical rows).
pub async fn physical_rows(client: &Client, schema: &str, range: Option<&KeyRange>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let rows = match range {
        Some(r) => {
            client
                .query(
                    &format!("SELECT key, value FROM {schema}.kv WHERE key >= $1 AND key < $2 ORDER BY key"),
                    &[&r.start, &r.end],
                )
                .await
        }
        None => client.query(&format!("SELECT key, value FROM {schema}.kv ORDER BY key"), &[]).await,
    }
    .expect("read X.kv");
    rows.into_iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// `[k, k ++ 00)`: the range of one key.
pub fn key_range(key: &[u8]) -> KeyRange {
    let mut end = key.to_vec();
    end.push(0);
    KeyRange::new(key.to_vec(), end)
}

/// Whether an error is universaldb's "a conflicting transaction won".
pub fn is_conflict(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::EXCLUSION_VIOLATION)
}

/// One rivet-style transaction: a read snapshot, then a commit on a second connection.
pub struct RivetTxn {
    schema: String,
    reader: Client,
    writer: Client,
    pub start_version: i64,
    reads: Vec<KeyRange>,
    writes: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RivetTxn {
    /// Opens the snapshot: `REPEATABLE READ`, first statement `nextval`.
    pub async fn begin(schema: &str) -> RivetTxn {
        let reader = connect().await;
        let writer = connect().await;
        reader.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.unwrap();
        let start_version: i64 =
            reader.query_one(&format!("SELECT nextval('{schema}.global_version_seq')"), &[]).await.unwrap().get(0);
        RivetTxn { schema: schema.into(), reader, writer, start_version, reads: Vec::new(), writes: Vec::new() }
    }

    /// A point read in the snapshot; its key becomes a read conflict range.
    pub async fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        self.reads.push(key_range(key));
        let row = self
            .reader
            .query_opt(&format!("SELECT value FROM {}.kv WHERE key = $1", self.schema), &[&key])
            .await
            .unwrap();
        row.map(|r| r.get(0))
    }

    /// A range read in the snapshot; the range becomes a read conflict range.
    pub async fn scan(&mut self, range: &KeyRange) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.reads.push(range.clone());
        let rows = self
            .reader
            .query(
                &format!("SELECT key, value FROM {}.kv WHERE key >= $1 AND key < $2 ORDER BY key", self.schema),
                &[&range.start, &range.end],
            )
            .await
            .unwrap();
        rows.into_iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// A write, sent at commit.
    pub fn set(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.push((key, value));
    }

    /// Ends the snapshot and commits on the second connection: conflict rows first (reads,
    /// then a `[k, k ++ 00)` write range per key), then the writes. `Err` with
    /// [`is_conflict`]: a conflicting transaction won and nothing was written.
    pub async fn commit(self) -> Result<(), tokio_postgres::Error> {
        self.reader.batch_execute("COMMIT").await.unwrap();
        let s = &self.schema;
        let mut ranges: Vec<(KeyRange, &str)> = self.reads.iter().map(|r| (r.clone(), "read")).collect();
        ranges.extend(self.writes.iter().map(|(k, _)| (key_range(k), "write")));
        let begins: Vec<&[u8]> = ranges.iter().map(|(r, _)| r.start.as_slice()).collect();
        let ends: Vec<&[u8]> = ranges.iter().map(|(r, _)| r.end.as_slice()).collect();
        let kinds: Vec<&str> = ranges.iter().map(|(_, k)| *k).collect();
        self.writer.batch_execute("BEGIN").await?;
        let result = async {
            self.writer
                .execute(
                    &format!(
                        "WITH v AS (SELECT nextval('{s}.global_version_seq') AS commit_version) \
                         INSERT INTO {s}.conflict_ranges (range_data, conflict_type, start_version, commit_version) \
                         SELECT {s}.bytearange(b, e, '[)'), t::{s}.range_type, $4, v.commit_version \
                         FROM UNNEST($1::bytea[], $2::bytea[], $3::text[]) AS u(b, e, t), v"
                    ),
                    &[&begins, &ends, &kinds, &self.start_version],
                )
                .await?;
            for (key, value) in &self.writes {
                self.writer
                    .execute(
                        &format!(
                            "INSERT INTO {s}.kv (key, value) VALUES ($1, $2) \
                             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                        ),
                        &[key, value],
                    )
                    .await?;
            }
            Ok::<(), tokio_postgres::Error>(())
        }
        .await;
        match result {
            Ok(()) => self.writer.batch_execute("COMMIT").await,
            Err(e) => {
                self.writer.batch_execute("ROLLBACK").await.unwrap();
                Err(e)
            }
        }
    }
}

/// A TCP proxy to the test server that holds the first client message containing `pattern`
/// (on any connection) until [`Pause::release`]; every other byte passes straight through.
pub struct Pause {
    pub port: u16,
    paused: Option<oneshot::Receiver<()>>,
    release: Arc<Notify>,
}

impl Pause {
    pub async fn start(pattern: &[u8]) -> Pause {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = oneshot::channel();
        let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
        let release = Arc::new(Notify::new());
        let pattern = pattern.to_vec();
        let upstream = upstream_addr();
        let (accept_release, accept_tx) = (release.clone(), tx.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&upstream).await.expect("connect to PostgreSQL");
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (pattern, release, tx) = (pattern.clone(), accept_release.clone(), accept_tx.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut tail: Vec<u8> = Vec::new();
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut seen = std::mem::take(&mut tail);
                        seen.extend_from_slice(&buf[..n]);
                        if seen.windows(pattern.len()).any(|w| w == pattern.as_slice()) {
                            let first = tx.lock().unwrap().take();
                            if let Some(first) = first {
                                let _ = first.send(());
                                release.notified().await;
                            }
                        }
                        let keep = seen.len().min(pattern.len().saturating_sub(1));
                        tail = seen[seen.len() - keep..].to_vec();
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
            }
        });
        Pause { port, paused: Some(rx), release }
    }

    /// The test server's URL through this proxy, for `schema`.
    pub fn url(&self, schema: &str) -> String {
        let base = ferry::testing::postgres_url();
        let upstream = upstream_addr();
        let through = base.replacen(&upstream, &format!("127.0.0.1:{}", self.port), 1);
        assert_ne!(through, base, "the test URL names its host as {upstream}");
        let sep = if through.contains('?') { '&' } else { '?' };
        format!("{through}{sep}schema={schema}")
    }

    /// Waits until a connection is held at the pattern.
    pub async fn held(&mut self) {
        self.paused.take().expect("held once").await.expect("the proxy saw the pattern");
    }

    /// Lets the held message through.
    pub fn release(&self) {
        self.release.notify_one();
    }
}

/// `host:port` of the test server, from its URL.
fn upstream_addr() -> String {
    let url = ferry::testing::postgres_url();
    let after_scheme = url.split("://").nth(1).expect("a postgres:// URL");
    let authority = after_scheme.split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    if host_port.contains(':') { host_port.to_string() } else { format!("{host_port}:5432") }
}
