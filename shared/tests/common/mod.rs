//! What the test suites share: the kind of a migration's commit, recognised from its shape, so
//! store wrappers can hook and log chosen commits; a listing of every logical row that works
//! on every layout; a store that puts every key under one prefix (the store contract on one
//! key family of the rivet layout); rivet-style universaldb transactions (`rivet`); and
//! [`per_backend!`], which runs a suite once per backend.
//!
//! Each test binary uses part of this module.
#![allow(dead_code)]

pub mod rivet;

use async_trait::async_trait;
use ferry::keys::{V1_PREFIX, V2_PREFIX};
use ferry::layout::Layout;
use ferry::scan::ActorBatch;
use ferry::store::{
    Check, DynStore, KeyRange, KeyValue, Mutation, RangeDigest, Read, ReadResult, Store, StoreError, Txn, for_each_row,
    prefix_end,
};

/// What a migration's commit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Writes the head (MigratingFromV1) and the lease.
    Begin,
    /// Writes DELTA slices.
    Stage,
    /// Checks the v1 digest, writes PIDX, head, audit.
    Finalize,
    /// Checks only, writes nothing: a rejection being confirmed against v1.
    Confirmation,
    /// Anything else (skip audits, clearing an abandoned stage).
    Other,
}

pub fn kind_of(txn: &Txn) -> Kind {
    let sets = || {
        txn.mutations.iter().filter_map(|m| match m {
            Mutation::Set { key, .. } => Some(key.as_slice()),
            _ => None,
        })
    };
    if txn.mutations.is_empty() {
        Kind::Confirmation
    } else if txn.checks.iter().any(|c| matches!(c, Check::RangeDigest { .. })) {
        Kind::Finalize
    } else if sets().any(|k| k.windows(7).any(|w| w == b"/DELTA/")) {
        Kind::Stage
    } else if sets().any(|k| k.starts_with(V2_PREFIX) && k.ends_with(b"/META")) {
        Kind::Begin
    } else {
        Kind::Other
    }
}

/// The ranges that together hold every logical key below `[0xff; 8]`, each inside one key
/// family (the rivet layout refuses a range across families, by design): ferry's records
/// around `v1/` and `v2/`, then `v1/` and `v2/` themselves.
pub fn family_ranges() -> [KeyRange; 5] {
    [
        KeyRange::new(Vec::new(), V1_PREFIX.to_vec()),
        KeyRange::prefix(V1_PREFIX),
        KeyRange::new(prefix_end(V1_PREFIX), V2_PREFIX.to_vec()),
        KeyRange::prefix(V2_PREFIX),
        KeyRange::new(prefix_end(V2_PREFIX), vec![0xff; 8]),
    ]
}

/// Every logical row of the store, sorted by key, on every layout (one scan per key family;
/// rivet's `v1/` order is by binary id, so the rows are sorted here).
pub async fn whole(store: &dyn Store) -> Vec<KeyValue> {
    let mut rows = Vec::new();
    for range in family_ranges() {
        for_each_row(store, &range, 1024, |k, v| {
            rows.push((k.to_vec(), v));
            Ok(())
        })
        .await
        .unwrap();
    }
    rows.sort();
    rows
}

/// A store that keeps every key of its caller under `prefix` of `inner`: keys and ranges
/// get the prefix on the way in, results (rows, keys, the keys errors name) lose it on the
/// way out. It runs the store contract inside one key family of a layout (ferry's records,
/// or one rivet actor's v2 keys).
pub struct PrefixStore {
    inner: DynStore,
    prefix: Vec<u8>,
}

impl PrefixStore {
    pub fn wrap(inner: DynStore, prefix: Vec<u8>) -> DynStore {
        std::sync::Arc::new(PrefixStore { inner, prefix })
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        [self.prefix.as_slice(), key].concat()
    }

    fn range(&self, range: &KeyRange) -> KeyRange {
        KeyRange::new(self.key(&range.start), self.key(&range.end))
    }

    fn strip(&self, key: Vec<u8>) -> Vec<u8> {
        match key.strip_prefix(self.prefix.as_slice()) {
            Some(rest) => rest.to_vec(),
            None => panic!("the inner store returned {} outside the prefix", ferry::keys::printable(&key)),
        }
    }

    fn error(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Conflict { index, key } => StoreError::Conflict { index, key: self.strip(key) },
            StoreError::ValueTooLarge { key, size, max } => {
                StoreError::ValueTooLarge { key: self.strip(key), size, max }
            }
            StoreError::Corrupt { key, detail } => StoreError::Corrupt { key: self.strip(key), detail },
            other => other,
        }
    }
}

#[async_trait]
impl Store for PrefixStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(&self.key(key)).await.map_err(|e| self.error(e))
    }

    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        let rows = self.inner.scan(&self.range(range), limit).await.map_err(|e| self.error(e))?;
        Ok(rows.into_iter().map(|(k, v)| (self.strip(k), v)).collect())
    }

    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.inner.first_key(&self.range(range)).await.map_err(|e| self.error(e))?;
        Ok(key.map(|k| self.strip(k)))
    }

    async fn scan_keys(&self, range: &KeyRange, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let keys = self.inner.scan_keys(&self.range(range), limit).await.map_err(|e| self.error(e))?;
        Ok(keys.into_iter().map(|k| self.strip(k)).collect())
    }

    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        let mut checks = Vec::with_capacity(txn.checks.len());
        for (index, c) in txn.checks.into_iter().enumerate() {
            checks.push(match c {
                Check::Value { key, expected } => Check::Value { key: self.key(&key), expected },
                // A digest covers keys as the store sees them, so a prefix changes it: read
                // the range, and if its unprefixed digest is the expected one, check that the
                // prefixed rows are still those (atomically, in the inner commit).
                Check::RangeDigest { range, expected } => {
                    let inner = self.range(&range);
                    let rows = self.inner.scan(&inner, usize::MAX).await.map_err(|e| self.error(e))?;
                    let (mut outer, mut seen) = (RangeDigest::new(), RangeDigest::new());
                    for (k, v) in &rows {
                        outer.update(&k[self.prefix.len()..], v);
                        seen.update(k, v);
                    }
                    if outer.finish() != expected {
                        return Err(StoreError::Conflict { index, key: range.start });
                    }
                    Check::RangeDigest { range: inner, expected: seen.finish() }
                }
            });
        }
        let mutations = txn
            .mutations
            .into_iter()
            .map(|m| match m {
                Mutation::Set { key, value } => Mutation::Set { key: self.key(&key), value },
                Mutation::Clear { key } => Mutation::Clear { key: self.key(&key) },
                Mutation::ClearRange { range } => Mutation::ClearRange { range: self.range(&range) },
            })
            .collect();
        self.inner.commit(Txn { checks, mutations }).await.map_err(|e| self.error(e))
    }

    async fn read_many(&self, reads: &[Read]) -> Result<Vec<ReadResult>, StoreError> {
        let inner: Vec<Read> = reads
            .iter()
            .map(|r| match r {
                Read::Get(key) => Read::Get(self.key(key)),
                Read::Scan { range, limit } => Read::Scan { range: self.range(range), limit: *limit },
            })
            .collect();
        let answers = self.inner.read_many(&inner).await.map_err(|e| self.error(e))?;
        Ok(answers
            .into_iter()
            .map(|a| match a {
                ReadResult::Rows(rows) => ReadResult::Rows(rows.into_iter().map(|(k, v)| (self.strip(k), v)).collect()),
                value => value,
            })
            .collect())
    }

    fn layout(&self) -> Layout {
        self.inner.layout()
    }

    async fn v1_actors(&self, _range: &KeyRange, _limit: usize) -> Result<ActorBatch, StoreError> {
        Err(StoreError::Unsupported { layout: "prefixed test store", detail: "no v1 actors under a prefix".into() })
    }

    fn describe(&self) -> String {
        format!("{} under {}", self.inner.describe(), ferry::keys::printable(&self.prefix))
    }
}

/// What a test function of [`per_backend!`] returns: nothing (it panics to fail) or a result.
pub trait TestOutcome {
    fn into_result(self) -> anyhow::Result<()>;
}

impl TestOutcome for () {
    fn into_result(self) -> anyhow::Result<()> {
        Ok(())
    }
}

impl TestOutcome for anyhow::Result<()> {
    fn into_result(self) -> anyhow::Result<()> {
        self
    }
}

/// Instantiates every listed `async fn name(backend: Backend) -> T` (`T`: [`TestOutcome`])
/// once per listed backend, in a module named after it; with `around`, each test's future is
/// handed to that function of the test file (e.g. a timeout):
///
/// ```ignore
/// per_backend!(backends: [sqlite: Sqlite, postgres: Postgres], around: bounded, tests: [a, b]);
/// ```
#[macro_export]
macro_rules! per_backend {
    (backends: $backends:tt, $(around: $around:ident,)? tests: $tests:tt $(,)?) => {
        $crate::per_backend!(@each $backends, [$($around)?], $tests);
    };
    (@each [$($module:ident: $backend:ident),+ $(,)?], $around:tt, $tests:tt) => {
        $( $crate::per_backend!(@module $module, $backend, $around, $tests); )+
    };
    (@module $module:ident, $backend:ident, $around:tt, [$($name:ident),* $(,)?]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let outcome = $crate::per_backend!(@run $around, super::$name(ferry::testing::Backend::$backend));
                    $crate::common::TestOutcome::into_result(outcome)
                }
            )*
        }
    };
    (@run [], $test:expr) => { $test.await };
    (@run [$around:ident], $test:expr) => { super::$around($test).await };
}

/// A real trigger on `schema.table` that refuses (SQLSTATE 22000, "refused by the test") any
/// row written with the key `key`: a write the server refuses, for tests of what a refused
/// commit leaves behind.
pub async fn refuse_key(pg: &tokio_postgres::Client, schema: &str, table: &str, key: &str) {
    pg.batch_execute(&format!(
        "CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           IF NEW.key = '{key}'::bytea THEN RAISE EXCEPTION 'refused by the test' USING ERRCODE = '22000'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {schema}.{table}
           FOR EACH ROW EXECUTE FUNCTION {schema}.refuse();"
    ))
    .await
    .expect("creating the refusing trigger");
}
