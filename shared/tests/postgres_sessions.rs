//! The PostgreSQL store's pipelined transactions (`store::serializable`) against the real
//! server: a commit whose writes the server refuses, or whose check fails, writes nothing and
//! leaves its session usable. The store has one session, so the next commit gets the very
//! session the failed one used. The refusal comes from a real trigger. (A commit dropped
//! half-way is `store::serializable`'s own test.)

mod common;

use anyhow::{Context, Result};
use ferry::store::{DynStore, OpenMode, OpenOptions, StoreError, Txn, open_with};
use ferry::testing::{Backend, TestStore, postgres_url};
use tokio_postgres::NoTls;

/// A fixture store with one session, and a trigger on its table that refuses the key `bad`.
async fn one_session_store() -> Result<(TestStore, DynStore, tokio_postgres::Client)> {
    let fixture = TestStore::new(Backend::Postgres).await;
    let schema = fixture.schema().context("a PostgreSQL fixture has a schema")?.to_string();
    let (client, conn) = tokio_postgres::connect(&postgres_url(), NoTls).await.context("PostgreSQL must be running")?;
    tokio::spawn(conn);
    common::refuse_key(&client, &schema, "kv", "bad").await;
    let store = open_with(&fixture.url, &OpenOptions::new(1, OpenMode::Existing)).await?;
    Ok((fixture, store, client))
}

fn sets(keys: &[&str]) -> Txn {
    let mut txn = Txn::new();
    for key in keys {
        txn.set(key.as_bytes().to_vec(), b"v".to_vec());
    }
    txn
}

#[tokio::test]
async fn a_write_the_server_refuses_writes_nothing_and_the_session_commits_the_next_transaction() -> Result<()> {
    let (_fixture, store, _client) = one_session_store().await?;
    let mut refused = sets(&["a", "bad", "c"]);
    refused.check_value(b"a".to_vec(), None);
    match store.commit(refused).await {
        Err(StoreError::Failed { message, .. }) => assert!(message.contains("refused by the test"), "{message}"),
        other => panic!("expected the server's refusal, got {other:?}"),
    }
    for key in ["a", "bad", "c"] {
        assert_eq!(store.get(key.as_bytes()).await?, None, "{key} was written by a refused commit");
    }
    // The same session: not left in the aborted transaction.
    store.commit(sets(&["after"])).await.context("the next commit on the session")?;
    assert_eq!(store.get(b"after").await?, Some(b"v".to_vec()));
    // A group whose writes are refused fails as a whole; the session still commits.
    let results = store.commit_many(vec![sets(&["g1"]), sets(&["bad"]), sets(&["g3"])]).await;
    assert!(results.iter().all(Result::is_err), "{results:?}");
    assert_eq!(store.get(b"g1").await?, None);
    store.commit_many(vec![sets(&["g1"]), sets(&["g3"])]).await.into_iter().collect::<Result<(), _>>()?;
    assert_eq!(store.get(b"g3").await?, Some(b"v".to_vec()));
    Ok(())
}

#[tokio::test]
async fn a_failed_check_rolls_back_and_the_session_commits_the_next_transaction() -> Result<()> {
    let (_fixture, store, _client) = one_session_store().await?;
    let mut stale = sets(&["x"]);
    stale.check_value(b"x".to_vec(), Some(b"not there".to_vec()));
    assert!(matches!(store.commit(stale).await, Err(StoreError::Conflict { index: 0, .. })));
    store.commit(sets(&["y"])).await?;
    assert_eq!((store.get(b"x").await?, store.get(b"y").await?), (None, Some(b"v".to_vec())));
    Ok(())
}

/// More range clears than `futures` polls in one go (`FuturesUnordered` yields after 32): if
/// the writes went out over two polls, `COMMIT` would overtake the rest, commit the first
/// clears and leave the later statements to run on their own, outside the transaction.
#[tokio::test]
async fn a_refused_commit_with_many_range_clears_clears_nothing() -> Result<()> {
    let (_fixture, store, _client) = one_session_store().await?;
    const RANGES: usize = 80;
    let key = |i: usize| format!("r{i:03}/k").into_bytes();
    let seeded: Vec<String> = (0..RANGES).map(|i| String::from_utf8(key(i)).expect("ASCII")).collect();
    store.commit(sets(&seeded.iter().map(String::as_str).collect::<Vec<_>>())).await?;
    let mut refused = Txn::new();
    for i in 0..RANGES {
        refused.clear_range(ferry::store::KeyRange::prefix(format!("r{i:03}/").as_bytes()));
    }
    refused.set(b"bad".to_vec(), b"v".to_vec());
    assert!(store.commit(refused).await.is_err(), "the trigger refuses `bad`");
    for i in 0..RANGES {
        assert_eq!(store.get(&key(i)).await?, Some(b"v".to_vec()), "range {i} was cleared by a refused commit");
    }
    Ok(())
}
