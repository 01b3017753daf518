//! One SERIALIZABLE transaction of the PostgreSQL store on one pooled session, pipelined: its
//! `BEGIN` goes out with its first reads and its `COMMIT` with its writes, so a checked commit
//! costs two round trips, not four (`BEGIN`, reads, writes, `COMMIT` each waited for).
//!
//! Invariants:
//! - a session goes back to the pool only outside a transaction: every way out of an attempt
//!   ends it, committed or rolled back (and waited for); when the attempt is dropped half-way
//!   (its task cancelled) or the rollback fails, the session is taken out of the pool and
//!   closed, which rolls the transaction back on the server;
//! - statements run in the order they are sent, and tokio-postgres sends a statement when its
//!   future is first polled: `BEGIN` and `COMMIT` are polled right around what goes with them,
//!   and what goes with a `COMMIT` must be sent on its first poll (statements prepared before,
//!   see [`Serializable::commit_with`]);
//! - an error aborts the transaction on the server, so a `COMMIT` already sent behind a failed
//!   write ends it as a rollback; the caller gets the write's error.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::Object;
use tokio_postgres::Error;

const BEGIN: &str = "BEGIN ISOLATION LEVEL SERIALIZABLE";

/// A transaction on `session`, open from [`Serializable::begin_with`] until it commits or is
/// rolled back.
pub(crate) struct Serializable {
    session: Option<Object>,
    open: AtomicBool,
}

impl Serializable {
    pub(crate) fn new(session: Object) -> Serializable {
        Serializable { session: Some(session), open: AtomicBool::new(false) }
    }

    /// The session, for the statements of the transaction.
    pub(crate) fn session(&self) -> &Object {
        // Only `drop` takes the session out.
        self.session.as_ref().expect("the session is held until drop")
    }

    /// Opens the transaction, `reads` (statements on [`Serializable::session`]) sent right
    /// behind its `BEGIN`: one round trip for both. On an error the transaction is rolled back.
    pub(crate) async fn begin_with<T>(&self, reads: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        self.open.store(true, Ordering::Release);
        // Polled in this order: BEGIN is sent first.
        let begun = futures::try_join!(self.session().batch_execute(BEGIN), reads);
        match begun {
            Ok(((), read)) => Ok(read),
            Err(e) => Err(self.abandon(e).await),
        }
    }

    /// Commits, `COMMIT` sent right behind `writes`: one round trip for both. `writes` must send
    /// every statement on its first poll (prepared statements, no other wait before them), or
    /// the `COMMIT` would overtake them. On an error the transaction is rolled back.
    pub(crate) async fn commit_with(&self, writes: impl Future<Output = Result<(), Error>>) -> Result<(), Error> {
        let committed = futures::try_join!(writes, self.session().batch_execute("COMMIT"));
        match committed {
            Ok(_) => {
                self.open.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => Err(self.abandon(e).await),
        }
    }

    /// Rolls back; the session is outside a transaction once this returns `Ok`.
    async fn rollback(&self) -> Result<(), Error> {
        self.session().batch_execute("ROLLBACK").await?;
        self.open.store(false, Ordering::Release);
        Ok(())
    }

    /// After `e`, ends whatever is left of the transaction and gives `e` back. If the `COMMIT`
    /// or an error already ended it, the server answers the `ROLLBACK` with a warning only; if
    /// the rollback fails, the session stays marked open and is closed on drop.
    async fn abandon(&self, e: Error) -> Error {
        let _ = self.rollback().await;
        e
    }
}

impl Drop for Serializable {
    fn drop(&mut self) {
        if self.open.load(Ordering::Acquire)
            && let Some(session) = self.session.take()
        {
            // Out of the pool and closed: the server rolls the transaction back.
            drop(Object::take(session));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::postgres::Connection;
    use crate::store::{OpenMode, OpenOptions, StoreUrl};

    /// A pool of one session on the test server.
    fn one_session() -> Connection {
        let Ok(StoreUrl::Postgres(url)) = StoreUrl::parse(&crate::testing::postgres_url()) else {
            panic!("the test URL is a PostgreSQL URL");
        };
        Connection::open(&url, &OpenOptions::new(1, OpenMode::Existing)).expect("the pool builds")
    }

    /// Whether the pool's session is outside any transaction: in one begun before, `now()` is
    /// the transaction's start, not this statement's.
    async fn outside_a_transaction(pool: &Connection) -> bool {
        let session = pool.client().await.expect("PostgreSQL must be running");
        // One simple-protocol message, so the statement's start is the message's receipt.
        let answer = session.simple_query("SELECT now() = statement_timestamp()").await.expect("the query runs");
        answer.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("t")))
    }

    /// Opens a transaction on the pool's session with `sql` sent behind its BEGIN.
    async fn begin_with_sql(pool: &Connection, sql: &str) -> Result<(), Error> {
        let txn = Serializable::new(pool.client().await.expect("PostgreSQL must be running"));
        txn.begin_with(async { txn.session().batch_execute(sql).await }).await
    }

    #[tokio::test]
    async fn a_transaction_dropped_half_way_never_goes_back_to_the_pool() {
        let pool = one_session();
        let stalled = begin_with_sql(&pool, "SELECT pg_sleep(1)");
        // Dropped while the server is in the transaction (its task cancelled).
        let dropped = tokio::time::timeout(Duration::from_millis(200), stalled).await;
        assert!(dropped.is_err(), "the stalled read ended early: {dropped:?}");
        assert!(outside_a_transaction(&pool).await, "the next caller got a session in the dropped transaction");
    }

    #[tokio::test]
    async fn a_failed_read_or_write_rolls_the_session_back_before_it_goes_back_to_the_pool() {
        let pool = one_session();
        assert!(begin_with_sql(&pool, "SELECT 1/0").await.is_err());
        assert!(outside_a_transaction(&pool).await);
        let failed_write = async {
            let txn = Serializable::new(pool.client().await.expect("PostgreSQL must be running"));
            txn.begin_with(async { Ok(()) }).await?;
            txn.commit_with(async { txn.session().batch_execute("SELECT 1/0").await }).await
        };
        assert!(failed_write.await.is_err());
        assert!(outside_a_transaction(&pool).await);
    }
}
