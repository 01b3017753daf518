//! The `Store` contract (DESIGN.md section 1, `store/mod.rs`), one suite run against every
//! backend and layout: each test below is instantiated by `contract!` for SQLite, PostgreSQL,
//! and the rivet layout in two of its key families (ferry's records under `ferry/contract/`,
//! and one rivet actor's v2 keys under `v2/{id}/`, each through [`common::PrefixStore`]), plus
//! once on the trait's own default methods (`defaults`: a SQLite store seen through
//! [`BaseOnly`], which implements only the required methods, as a new backend would before it
//! overrides the batched ones). PostgreSQL must be running (`ferry::testing::postgres_url()`);
//! a test against it fails, never skips, when it is not.
//!
//! What the rivet layout does not hold by design is proved at the end, by tests of its own
//! behaviour: a range across key families is refused (`StoreError::Unsupported`), and `v1/`
//! across actors is in rivet's order.

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ferry::store::limits::{MAX_KEY_BYTES, MAX_TXN_WRITE_BYTES, MAX_VALUE_BYTES};
use ferry::store::{
    DynStore, KeyRange, KeyValue, RangeDigest, Read, ReadResult, Store, StoreError, Then, Txn, for_each_row,
    prefix_end, read_then,
};
use ferry::testing::{Backend, TestStore};

/// The store a contract test runs on.
#[derive(Clone, Copy, Debug)]
enum Subject {
    Sqlite,
    Postgres,
    /// The rivet layout, keys under `ferry/contract/` (ferry's records, `X.ferry_kv`).
    RivetRecords,
    /// The rivet layout, keys under `v2/{a rivet id}/` (sqlite-storage rows in `X.kv`, through
    /// universaldb's protocol, values with their markers and chunk rows).
    RivetV2,
}

/// A fresh isolated store, and the bytes its keys carry before the test's own (the limits
/// count whole keys).
struct Fixture {
    _ts: TestStore,
    store: DynStore,
    key_overhead: usize,
}

impl Fixture {
    async fn open(subject: Subject) -> Fixture {
        let backend = match subject {
            Subject::Sqlite => Backend::Sqlite,
            Subject::Postgres => Backend::Postgres,
            Subject::RivetRecords | Subject::RivetV2 => Backend::Rivet,
        };
        let ts = TestStore::new(backend).await;
        let prefix = match subject {
            Subject::Sqlite | Subject::Postgres => None,
            Subject::RivetRecords => Some(b"ferry/contract/".to_vec()),
            Subject::RivetV2 => Some(format!("v2/{}/", ts.actor("contract")).into_bytes()),
        };
        let (store, key_overhead) = match prefix {
            Some(p) => (common::PrefixStore::wrap(ts.store(), p.clone()), p.len()),
            None => (ts.store(), 0),
        };
        Fixture { _ts: ts, store, key_overhead }
    }
}

/// Instantiates every listed test once per [`Subject`], in modules `sqlite`, `postgres`,
/// `rivet_records` and `rivet_v2`, each on a fresh isolated store: `plain` tests take the
/// store, `sized` tests (the limits) also the key overhead of the subject.
macro_rules! contract {
    (plain: [$($name:ident),* $(,)?], sized: [$($sized:ident),* $(,)?] $(,)?) => {
        contract!(@module sqlite, Sqlite, [$($name),*], [$($sized),*]);
        contract!(@module postgres, Postgres, [$($name),*], [$($sized),*]);
        contract!(@module rivet_records, RivetRecords, [$($name),*], [$($sized),*]);
        contract!(@module rivet_v2, RivetV2, [$($name),*], [$($sized),*]);
        mod defaults {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let ts = ferry::testing::TestStore::new(ferry::testing::Backend::Sqlite).await;
                    super::$name(std::sync::Arc::new(super::BaseOnly(ts.store()))).await;
                }
            )*
        }
    };
    (@module $module:ident, $subject:ident, [$($name:ident),*], [$($sized:ident),*]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let f = super::Fixture::open(super::Subject::$subject).await;
                    super::$name(f.store.clone()).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $sized() {
                    let f = super::Fixture::open(super::Subject::$subject).await;
                    super::$sized(f.store.clone(), f.key_overhead).await;
                }
            )*
        }
    };
}

/// A store that implements only the required methods of [`Store`], so `read_many`,
/// `commit_many` and `scan_keys` run as the trait's defaults.
struct BaseOnly(DynStore);

#[async_trait]
impl Store for BaseOnly {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key).await
    }
    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        self.0.scan(range, limit).await
    }
    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.first_key(range).await
    }
    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        self.0.commit(txn).await
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

contract!(
    plain: [
        get_set_clear_round_trip_binary_values,
        keys_sort_bytewise_shorter_prefix_first_with_zero_and_ff_bytes,
        scan_is_half_open_ascending_and_honours_limit,
        prefix_range_holds_exactly_the_keys_with_that_prefix,
        after_continues_a_scan_just_past_a_key,
        first_key_is_the_smallest_key_inside_the_range,
        for_each_row_visits_every_row_in_order_one_batch_per_scan,
        for_each_row_stops_at_the_first_visitor_error,
        failing_second_value_check_writes_nothing_and_reports_index_1,
        failing_second_range_digest_check_writes_nothing_and_reports_index_1,
        value_check_on_an_absent_key,
        range_digest_check_passes_unchanged_and_fails_after_any_change,
        clear_range_removes_exactly_the_half_open_range,
        mutations_apply_in_order_within_a_transaction,
        value_over_the_limit_is_refused_and_nothing_is_written,
        racing_inserts_on_the_same_absent_key_exactly_one_wins,
        optimistic_increments_from_concurrent_tasks_are_never_lost,
        read_many_answers_each_read_as_get_and_scan_would_in_order,
        read_then_gives_what_read_many_answers_with_or_without_work_and_a_work_that_fails_is_an_error,
        commit_many_a_failing_check_fails_only_its_own_transaction,
        commit_many_checks_see_the_writes_of_earlier_transactions_of_the_group,
        commit_many_judges_each_digest_check_on_its_own_range_alone,
        commit_many_applies_each_transactions_writes_in_their_order,
        commit_many_refuses_a_transaction_over_a_limit_alone,
        commit_many_commits_a_group_bigger_than_one_transaction_may_write,
        optimistic_increments_in_concurrent_groups_are_never_lost,
    ],
    sized: [
        key_over_the_limit_is_refused_and_nothing_is_written,
        transaction_over_the_write_limit_is_refused_and_nothing_is_written,
        transaction_at_the_limits_commits,
    ],
);

/// Every row of the store (the tests only use keys below `[0xff; 8]`).
fn everything() -> KeyRange {
    KeyRange::new(Vec::new(), vec![0xff; 8])
}

async fn all_rows(store: &dyn Store) -> Vec<KeyValue> {
    store.scan(&everything(), usize::MAX).await.expect("scan everything")
}

async fn set_all(store: &dyn Store, rows: &[(Vec<u8>, Vec<u8>)]) {
    let mut txn = Txn::new();
    for (k, v) in rows {
        txn.set(k.clone(), v.clone());
    }
    store.commit(txn).await.expect("seed rows");
}

fn keys_of(rows: &[KeyValue]) -> Vec<Vec<u8>> {
    rows.iter().map(|(k, _)| k.clone()).collect()
}

fn digest_of(rows: &[KeyValue]) -> u128 {
    let mut d = RangeDigest::new();
    for (k, v) in rows {
        d.update(k, v);
    }
    d.finish()
}

fn numbered(prefix: &str, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..n).map(|i| (format!("{prefix}{i:03}").into_bytes(), format!("value {i}").into_bytes())).collect()
}

async fn get_set_clear_round_trip_binary_values(store: DynStore) {
    let key = b"k\x00\xff".to_vec();
    assert_eq!(store.get(&key).await.unwrap(), None);

    let binary: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let mut txn = Txn::new();
    txn.set(key.clone(), binary.clone());
    store.commit(txn).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), Some(binary));

    // Overwrite; an empty value is a value, not an absence.
    let mut txn = Txn::new();
    txn.set(key.clone(), Vec::new());
    store.commit(txn).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), Some(Vec::new()));

    // A key differing only after a 0x00 byte is another key.
    assert_eq!(store.get(b"k\x00").await.unwrap(), None);
    assert_eq!(store.get(b"k\x00\xff\x00").await.unwrap(), None);

    let mut txn = Txn::new();
    txn.clear(key.clone());
    store.commit(txn).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);

    // Clearing an absent key is not an error, and an empty transaction commits.
    let mut txn = Txn::new();
    txn.clear(key.clone());
    store.commit(txn).await.unwrap();
    store.commit(Txn::new()).await.unwrap();
    assert!(all_rows(&*store).await.is_empty());
}

async fn keys_sort_bytewise_shorter_prefix_first_with_zero_and_ff_bytes(store: DynStore) {
    let sorted: Vec<Vec<u8>> = vec![
        vec![0x00],
        vec![0x00, 0x00],
        vec![0x00, 0x01],
        vec![0x01],
        b"a".to_vec(),
        b"a\x00".to_vec(),
        b"a\x00\x00".to_vec(),
        b"a\x00\xff".to_vec(),
        b"a\x01".to_vec(),
        b"ab".to_vec(),
        b"abc".to_vec(),
        b"a\x7f".to_vec(),
        b"a\x80".to_vec(), // unsigned: 0x80 sorts after 0x7f
        b"a\xff".to_vec(),
        b"a\xff\xff".to_vec(),
        b"b".to_vec(),
        vec![0x7f],
        vec![0x80],
        vec![0xfe, 0xff],
        vec![0xff],
        vec![0xff, 0x00],
        vec![0xff, 0xff],
        vec![0xff, 0xff, 0xff],
    ];
    assert!(sorted.windows(2).all(|w| w[0] < w[1]), "the expected order itself is not memcmp order");
    // Insert in a scrambled order, in two transactions.
    let mut scrambled: Vec<Vec<u8>> = sorted.clone();
    scrambled.reverse();
    scrambled.rotate_left(7);
    let (first, second) = scrambled.split_at(10);
    for part in [first, second] {
        let mut txn = Txn::new();
        for k in part {
            txn.set(k.clone(), k.iter().rev().copied().collect::<Vec<u8>>());
        }
        store.commit(txn).await.unwrap();
    }

    let rows = all_rows(&*store).await;
    assert_eq!(keys_of(&rows), sorted, "scan order is not memcmp order");
    for (k, v) in &rows {
        assert_eq!(v, &k.iter().rev().copied().collect::<Vec<u8>>(), "value of {k:?}");
        assert_eq!(store.get(k).await.unwrap().as_ref(), Some(v), "point get of {k:?}");
    }

    // Range bounds compare the same way: [a, a\x01) holds a and the keys a\x00...
    let rows = store.scan(&KeyRange::new(b"a".to_vec(), b"a\x01".to_vec()), 100).await.unwrap();
    assert_eq!(keys_of(&rows), vec![b"a".to_vec(), b"a\x00".to_vec(), b"a\x00\x00".to_vec(), b"a\x00\xff".to_vec()]);
    // ... and [ff, ff ff) holds ff and ff 00 only.
    let rows = store.scan(&KeyRange::new(vec![0xff], vec![0xff, 0xff]), 100).await.unwrap();
    assert_eq!(keys_of(&rows), vec![vec![0xff], vec![0xff, 0x00]]);
}

async fn scan_is_half_open_ascending_and_honours_limit(store: DynStore) {
    let rows = numbered("k", 10);
    set_all(&*store, &rows).await;
    let key = |i: usize| format!("k{i:03}").into_bytes();

    let got = store.scan(&KeyRange::new(key(2), key(5)), 100).await.unwrap();
    assert_eq!(got, rows[2..5].to_vec(), "start inclusive, end exclusive, values with keys");

    let got = store.scan(&KeyRange::new(key(2), key(5)), 2).await.unwrap();
    assert_eq!(got, rows[2..4].to_vec(), "limit keeps the first rows");

    let got = store.scan(&KeyRange::new(key(0), key(9)), 9).await.unwrap();
    assert_eq!(got, rows[..9].to_vec());

    // Bounds between keys.
    let got = store.scan(&KeyRange::new(b"k002x".to_vec(), b"k004\x00".to_vec()), 100).await.unwrap();
    assert_eq!(got, rows[3..5].to_vec());

    assert!(store.scan(&KeyRange::new(key(3), key(3)), 100).await.unwrap().is_empty(), "empty range");
    assert!(store.scan(&KeyRange::new(key(5), key(2)), 100).await.unwrap().is_empty(), "inverted range");
    assert!(store.scan(&KeyRange::new(key(0), key(9)), 0).await.unwrap().is_empty(), "limit 0");
    assert_eq!(store.scan(&everything(), 1).await.unwrap(), rows[..1].to_vec());
    assert_eq!(store.scan(&everything(), usize::MAX).await.unwrap(), rows);
}

async fn prefix_range_holds_exactly_the_keys_with_that_prefix(store: DynStore) {
    let keys: Vec<Vec<u8>> = vec![
        b"a".to_vec(),
        b"aa\xff".to_vec(),
        b"ab".to_vec(),
        b"ab\x00".to_vec(),
        b"ab\xff\xff".to_vec(),
        b"abc".to_vec(),
        b"ac".to_vec(),
        b"b".to_vec(),
        b"q\xff".to_vec(),
        b"q\xff\x00".to_vec(),
        b"q\xff\xff".to_vec(),
        b"r".to_vec(),
        b"r\x00".to_vec(),
    ];
    set_all(&*store, &keys.iter().map(|k| (k.clone(), b"v".to_vec())).collect::<Vec<_>>()).await;

    let range = KeyRange::prefix(b"ab");
    assert_eq!(range.end, b"ac".to_vec());
    let got = keys_of(&store.scan(&range, 100).await.unwrap());
    assert_eq!(got, vec![b"ab".to_vec(), b"ab\x00".to_vec(), b"abc".to_vec(), b"ab\xff\xff".to_vec()]);
    for k in &keys {
        assert_eq!(range.contains(k), k.starts_with(b"ab"), "contains({k:?})");
    }

    // A prefix ending in 0xff carries into the byte before it.
    let range = KeyRange::prefix(b"q\xff");
    assert_eq!(range.end, b"r".to_vec());
    assert_eq!(prefix_end(b"q\xff\xff"), b"r".to_vec());
    let got = keys_of(&store.scan(&range, 100).await.unwrap());
    assert_eq!(got, vec![b"q\xff".to_vec(), b"q\xff\x00".to_vec(), b"q\xff\xff".to_vec()]);

    assert!(store.scan(&KeyRange::prefix(b"abd"), 100).await.unwrap().is_empty());
}

async fn after_continues_a_scan_just_past_a_key(store: DynStore) {
    let keys: Vec<Vec<u8>> = vec![
        b"p".to_vec(),
        b"p\x00".to_vec(),
        b"p\x00\x00".to_vec(),
        b"p\x01".to_vec(),
        b"pz".to_vec(),
        b"p\xff".to_vec(),
        b"q".to_vec(),
    ];
    set_all(&*store, &keys.iter().map(|k| (k.clone(), k.clone())).collect::<Vec<_>>()).await;
    let range = KeyRange::prefix(b"p");

    // after(k) excludes k itself but not k ++ 0x00, and keeps the end.
    let after = range.after(b"p");
    assert_eq!(after.end, range.end);
    assert!(!after.contains(b"p"));
    assert!(after.contains(b"p\x00"));
    assert_eq!(store.first_key(&after).await.unwrap(), Some(b"p\x00".to_vec()));

    // Paging with after() visits every key of the range once, in order, for any page size.
    for page in 1..=4 {
        let mut cursor = range.clone();
        let mut seen = Vec::new();
        loop {
            let rows = store.scan(&cursor, page).await.unwrap();
            assert!(rows.len() <= page);
            let Some((last, _)) = rows.last().cloned() else {
                break;
            };
            seen.extend(keys_of(&rows));
            cursor = cursor.after(&last);
        }
        assert_eq!(seen, keys[..6].to_vec(), "page size {page}");
    }
}

async fn first_key_is_the_smallest_key_inside_the_range(store: DynStore) {
    assert_eq!(store.first_key(&everything()).await.unwrap(), None, "empty store");
    set_all(
        &*store,
        &[(b"m\x00".to_vec(), b"1".to_vec()), (b"m\x05".to_vec(), b"2".to_vec()), (b"n".to_vec(), b"3".to_vec())],
    )
    .await;
    assert_eq!(store.first_key(&everything()).await.unwrap(), Some(b"m\x00".to_vec()));
    assert_eq!(store.first_key(&KeyRange::prefix(b"m")).await.unwrap(), Some(b"m\x00".to_vec()));
    // Start between keys: the next key at or after it.
    assert_eq!(
        store.first_key(&KeyRange::new(b"m\x01".to_vec(), b"z".to_vec())).await.unwrap(),
        Some(b"m\x05".to_vec())
    );
    // Start exactly on a key: that key.
    assert_eq!(
        store.first_key(&KeyRange::new(b"m\x05".to_vec(), b"z".to_vec())).await.unwrap(),
        Some(b"m\x05".to_vec())
    );
    // The end is exclusive.
    assert_eq!(store.first_key(&KeyRange::new(b"m\x06".to_vec(), b"n".to_vec())).await.unwrap(), None);
    assert_eq!(
        store.first_key(&KeyRange::new(b"m\x06".to_vec(), b"n\x00".to_vec())).await.unwrap(),
        Some(b"n".to_vec())
    );
    assert_eq!(store.first_key(&KeyRange::prefix(b"mm")).await.unwrap(), None);
}

/// Wraps a store and records every scan (limit asked, rows returned).
struct ScanCounter {
    inner: DynStore,
    scans: Mutex<Vec<(usize, usize)>>,
}

#[async_trait]
impl Store for ScanCounter {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        let rows = self.inner.scan(range, limit).await?;
        self.scans.lock().unwrap().push((limit, rows.len()));
        Ok(rows)
    }
    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.first_key(range).await
    }
    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        self.inner.commit(txn).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

async fn for_each_row_visits_every_row_in_order_one_batch_per_scan(store: DynStore) {
    let rows = numbered("r", 25);
    set_all(&*store, &rows).await;
    // Rows outside the range are not visited.
    set_all(&*store, &[(b"q".to_vec(), b"x".to_vec()), (b"s".to_vec(), b"x".to_vec())]).await;
    let counter = ScanCounter { inner: store.clone(), scans: Mutex::new(Vec::new()) };

    for batch in [1usize, 5, 7, 25, 26, 1000] {
        counter.scans.lock().unwrap().clear();
        let mut seen = Vec::new();
        for_each_row(&counter, &KeyRange::prefix(b"r"), batch, |k, v| {
            seen.push((k.to_vec(), v));
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(seen, rows, "batch {batch}");
        let scans = counter.scans.lock().unwrap().clone();
        assert!(scans.iter().all(|&(limit, got)| limit == batch && got <= batch), "batch {batch}: {scans:?}");
        // Full batches continue; the first short batch ends the walk (an exact multiple needs
        // one more, empty, scan to see the end).
        let expected_scans = 25 / batch + 1;
        assert_eq!(scans.len(), expected_scans, "batch {batch}: {scans:?}");
    }

    let mut visited = 0;
    for_each_row(&counter, &KeyRange::prefix(b"nothing"), 4, |_, _| {
        visited += 1;
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(visited, 0);
}

async fn for_each_row_stops_at_the_first_visitor_error(store: DynStore) {
    set_all(&*store, &numbered("r", 12)).await;
    let mut visited = 0;
    let result = for_each_row(&*store, &KeyRange::prefix(b"r"), 5, |k, _| {
        visited += 1;
        if k == b"r006" {
            return Err(StoreError::Failed { backend: "test", message: "visitor says stop".into() });
        }
        Ok(())
    })
    .await;
    assert!(
        matches!(result, Err(StoreError::Failed { ref message, .. }) if message == "visitor says stop"),
        "{result:?}"
    );
    assert_eq!(visited, 7, "rows after the failing one were visited");
}

async fn failing_second_value_check_writes_nothing_and_reports_index_1(store: DynStore) {
    set_all(&*store, &[(b"guard".to_vec(), b"ok".to_vec()), (b"other".to_vec(), b"old".to_vec())]).await;
    let before = all_rows(&*store).await;

    let mut txn = Txn::new();
    txn.check_value(b"guard".to_vec(), Some(b"ok".to_vec())); // holds
    txn.check_value(b"other".to_vec(), Some(b"not what is there".to_vec())); // fails
    txn.set(b"new".to_vec(), b"1".to_vec());
    txn.set(b"other".to_vec(), b"new".to_vec());
    txn.clear(b"guard".to_vec());
    txn.clear_range(KeyRange::prefix(b"o"));
    let err = store.commit(txn).await.unwrap_err();
    match &err {
        StoreError::Conflict { index, key } => {
            assert_eq!(*index, 1);
            assert_eq!(key, b"other");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(err.is_transient());
    assert_eq!(all_rows(&*store).await, before, "a failed check wrote something");

    // The first failing check is the one reported, even when a later one fails too.
    let mut txn = Txn::new();
    txn.check_value(b"guard".to_vec(), None);
    txn.check_value(b"other".to_vec(), None);
    txn.set(b"new".to_vec(), b"1".to_vec());
    assert!(matches!(store.commit(txn).await, Err(StoreError::Conflict { index: 0, .. })));
    assert_eq!(all_rows(&*store).await, before);
}

async fn failing_second_range_digest_check_writes_nothing_and_reports_index_1(store: DynStore) {
    let rows = numbered("d", 5);
    set_all(&*store, &rows).await;
    set_all(&*store, &[(b"guard".to_vec(), b"ok".to_vec())]).await;
    let before = all_rows(&*store).await;
    let range = KeyRange::prefix(b"d");
    let stale = digest_of(&rows[..4]); // a digest of what the range no longer is

    let mut txn = Txn::new();
    txn.check_value(b"guard".to_vec(), Some(b"ok".to_vec()));
    txn.check_range_digest(range.clone(), stale);
    txn.set(b"new".to_vec(), b"1".to_vec());
    txn.clear_range(range.clone());
    let err = store.commit(txn).await.unwrap_err();
    match &err {
        StoreError::Conflict { index, key } => {
            assert_eq!(*index, 1);
            assert_eq!(key, &range.start, "a digest check reports its range start");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(all_rows(&*store).await, before, "a failed digest check wrote something");
}

async fn value_check_on_an_absent_key(store: DynStore) {
    // Expecting a value on an absent key fails; expecting absence holds.
    let mut txn = Txn::new();
    txn.check_value(b"absent".to_vec(), Some(Vec::new()));
    txn.set(b"x".to_vec(), b"1".to_vec());
    assert!(matches!(store.commit(txn).await, Err(StoreError::Conflict { index: 0, .. })));
    assert_eq!(store.get(b"x").await.unwrap(), None);

    let mut txn = Txn::new();
    txn.check_value(b"absent".to_vec(), None);
    txn.set(b"x".to_vec(), b"1".to_vec());
    store.commit(txn).await.unwrap();
    assert_eq!(store.get(b"x").await.unwrap(), Some(b"1".to_vec()));

    // An empty value is present: expecting absence fails on it.
    set_all(&*store, &[(b"empty".to_vec(), Vec::new())]).await;
    let mut txn = Txn::new();
    txn.check_value(b"empty".to_vec(), None);
    assert!(matches!(store.commit(txn).await, Err(StoreError::Conflict { index: 0, .. })));
    let mut txn = Txn::new();
    txn.check_value(b"empty".to_vec(), Some(Vec::new()));
    store.commit(txn).await.unwrap();
}

async fn range_digest_check_passes_unchanged_and_fails_after_any_change(store: DynStore) {
    let range = KeyRange::prefix(b"v1/a/\x08");
    let rows: Vec<KeyValue> = (0..6u8).map(|i| ([b"v1/a/\x08".as_slice(), &[i]].concat(), vec![i; 100])).collect();
    set_all(&*store, &rows).await;
    // Neighbours outside the range.
    set_all(&*store, &[(b"v1/a/\x07".to_vec(), b"n".to_vec()), (b"v1/a/\x09".to_vec(), b"n".to_vec())]).await;

    let digest = |rows: &[KeyValue]| digest_of(rows);
    let current = digest(&store.scan(&range, usize::MAX).await.unwrap());
    assert_eq!(current, digest(&rows));

    let check = |expected: u128| {
        let mut txn = Txn::new();
        txn.check_range_digest(range.clone(), expected);
        txn.set(b"marker".to_vec(), expected.to_be_bytes().to_vec());
        txn
    };
    store.commit(check(current)).await.expect("unchanged range passes");
    assert!(store.get(b"marker").await.unwrap().is_some());

    // Writes outside the range do not change its digest.
    set_all(&*store, &[(b"v1/a/\x07".to_vec(), b"changed".to_vec()), (b"v1/a/\x09\x00".to_vec(), b"new".to_vec())])
        .await;
    store.commit(check(current)).await.expect("changes outside the range do not count");

    // Any change inside fails it: a value, a new key, a removed key.
    let changes: Vec<Txn> = {
        let mut value = Txn::new();
        value.set(rows[3].0.clone(), vec![3; 101]);
        let mut added = Txn::new();
        added.set([rows[5].0.as_slice(), b"\x00"].concat(), Vec::new());
        let mut removed = Txn::new();
        removed.clear(rows[0].0.clone());
        vec![value, added, removed]
    };
    for change in changes {
        let before_change = store.scan(&range, usize::MAX).await.unwrap();
        let expected = digest(&before_change);
        store.commit(check(expected)).await.expect("digest of the current rows passes");
        store.commit(change.clone()).await.unwrap();
        let err = store.commit(check(expected)).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict { index: 0, .. }), "{change:?}: {err:?}");
    }

    // An empty range digests to the empty digest.
    let mut txn = Txn::new();
    txn.check_range_digest(KeyRange::prefix(b"nothing here"), RangeDigest::new().finish());
    store.commit(txn).await.unwrap();
}

async fn clear_range_removes_exactly_the_half_open_range(store: DynStore) {
    let rows = numbered("c", 10);
    set_all(&*store, &rows).await;
    set_all(&*store, &[(b"c004\x00".to_vec(), b"x".to_vec()), (b"c007".to_vec(), b"value 7".to_vec())]).await;

    let mut txn = Txn::new();
    txn.clear_range(KeyRange::new(b"c003".to_vec(), b"c007".to_vec()));
    store.commit(txn).await.unwrap();
    let left = keys_of(&all_rows(&*store).await);
    let expected: Vec<Vec<u8>> = [0, 1, 2, 7, 8, 9].iter().map(|i| format!("c{i:03}").into_bytes()).collect();
    assert_eq!(left, expected, "start cleared, end kept");

    // An empty or inverted range clears nothing.
    let mut txn = Txn::new();
    txn.clear_range(KeyRange::new(b"c008".to_vec(), b"c008".to_vec()));
    txn.clear_range(KeyRange::new(b"c009".to_vec(), b"c000".to_vec()));
    store.commit(txn).await.unwrap();
    assert_eq!(keys_of(&all_rows(&*store).await), expected);
}

async fn mutations_apply_in_order_within_a_transaction(store: DynStore) {
    set_all(&*store, &[(b"pre".to_vec(), b"existing".to_vec()), (b"r/1".to_vec(), b"x".to_vec())]).await;

    let mut txn = Txn::new();
    // set then clear: absent
    txn.set(b"a".to_vec(), b"1".to_vec());
    txn.clear(b"a".to_vec());
    // clear then set: present
    txn.clear(b"pre".to_vec());
    txn.set(b"pre".to_vec(), b"replaced".to_vec());
    // set twice: the last wins
    txn.set(b"b".to_vec(), b"first".to_vec());
    txn.set(b"b".to_vec(), b"second".to_vec());
    // set, clear-range over it, set again: the last set wins, others in the range go
    txn.set(b"r/2".to_vec(), b"y".to_vec());
    txn.set(b"r/3".to_vec(), b"z".to_vec());
    txn.clear_range(KeyRange::prefix(b"r/"));
    txn.set(b"r/3".to_vec(), b"after".to_vec());
    // set, clear, set: present with the last value
    txn.set(b"c".to_vec(), b"1".to_vec());
    txn.clear(b"c".to_vec());
    txn.set(b"c".to_vec(), b"3".to_vec());
    // clear, set, clear: absent
    txn.clear(b"d".to_vec());
    txn.set(b"d".to_vec(), b"1".to_vec());
    txn.clear(b"d".to_vec());
    store.commit(txn).await.unwrap();

    let rows = all_rows(&*store).await;
    assert_eq!(
        rows,
        vec![
            (b"b".to_vec(), b"second".to_vec()),
            (b"c".to_vec(), b"3".to_vec()),
            (b"pre".to_vec(), b"replaced".to_vec()),
            (b"r/3".to_vec(), b"after".to_vec()),
        ]
    );
}

async fn value_over_the_limit_is_refused_and_nothing_is_written(store: DynStore) {
    // Exactly the limit is fine.
    let mut txn = Txn::new();
    txn.set(b"max".to_vec(), vec![7u8; MAX_VALUE_BYTES]);
    store.commit(txn).await.unwrap();
    assert_eq!(store.get(b"max").await.unwrap().map(|v| v.len()), Some(MAX_VALUE_BYTES));
    let before = all_rows(&*store).await;

    let mut txn = Txn::new();
    txn.set(b"small".to_vec(), b"fits".to_vec());
    txn.set(b"big".to_vec(), vec![1u8; MAX_VALUE_BYTES + 1]);
    txn.clear(b"max".to_vec());
    match store.commit(txn).await {
        Err(StoreError::ValueTooLarge { key, size, max }) => {
            assert_eq!(key, b"big");
            assert_eq!(size, MAX_VALUE_BYTES + 1);
            assert_eq!(max, MAX_VALUE_BYTES);
        }
        other => panic!("expected ValueTooLarge, got {other:?}"),
    }
    assert_eq!(all_rows(&*store).await, before, "a refused transaction wrote something");
}

async fn key_over_the_limit_is_refused_and_nothing_is_written(store: DynStore, key_overhead: usize) {
    // The limit counts the whole key, the subject's own prefix included.
    let max = MAX_KEY_BYTES - key_overhead;
    let mut txn = Txn::new();
    txn.set(vec![b'k'; max], b"max key".to_vec());
    store.commit(txn).await.unwrap();
    let before = all_rows(&*store).await;

    let mut txn = Txn::new();
    txn.set(b"small".to_vec(), b"fits".to_vec());
    txn.set(vec![b'k'; max + 1], b"v".to_vec());
    assert!(
        matches!(store.commit(txn).await, Err(StoreError::KeyTooLarge { size, .. }) if size == MAX_KEY_BYTES + 1),
        "key over the limit accepted"
    );
    assert_eq!(all_rows(&*store).await, before);
}

/// Sets of `n` values of `value_len` bytes under 8-byte keys `t{i:07}`.
fn big_txn(n: usize, value_len: usize) -> Txn {
    let mut txn = Txn::new();
    for i in 0..n {
        txn.set(format!("t{i:07}").into_bytes(), vec![(i % 251) as u8; value_len]);
    }
    txn
}

/// Bytes `txn` writes once the subject's prefix is on each of its keys.
fn written(txn: &Txn, key_overhead: usize) -> usize {
    let keys: usize = txn
        .mutations
        .iter()
        .map(|m| match m {
            ferry::store::Mutation::ClearRange { .. } => 2,
            _ => 1,
        })
        .sum();
    txn.write_bytes() + keys * key_overhead
}

async fn transaction_over_the_write_limit_is_refused_and_nothing_is_written(store: DynStore, key_overhead: usize) {
    set_all(&*store, &[(b"keep".to_vec(), b"me".to_vec())]).await;
    let before = all_rows(&*store).await;

    // Every value is within its limit; together they are over the transaction limit.
    let n = MAX_TXN_WRITE_BYTES / MAX_VALUE_BYTES + 1;
    let mut txn = big_txn(n, MAX_VALUE_BYTES);
    txn.clear(b"keep".to_vec());
    let size = written(&txn, key_overhead);
    assert!(size > MAX_TXN_WRITE_BYTES);
    match store.commit(txn).await {
        Err(StoreError::TransactionTooLarge { size: reported, max }) => {
            assert_eq!(reported, size);
            assert_eq!(max, MAX_TXN_WRITE_BYTES);
        }
        other => panic!("expected TransactionTooLarge, got {other:?}"),
    }
    assert_eq!(all_rows(&*store).await, before, "a refused transaction wrote something");
}

async fn transaction_at_the_limits_commits(store: DynStore, key_overhead: usize) {
    // Values of exactly MAX_VALUE_BYTES, filled up to exactly MAX_TXN_WRITE_BYTES.
    let key_len = 8 + key_overhead;
    let n = MAX_TXN_WRITE_BYTES / (key_len + MAX_VALUE_BYTES);
    let mut txn = big_txn(n, MAX_VALUE_BYTES);
    let rest = MAX_TXN_WRITE_BYTES - written(&txn, key_overhead) - key_len;
    assert!(rest <= MAX_VALUE_BYTES);
    txn.set(b"t_rest__".to_vec(), vec![9u8; rest]);
    assert_eq!(written(&txn, key_overhead), MAX_TXN_WRITE_BYTES);
    store.commit(txn).await.expect("a transaction exactly at the limits commits");

    let rows = store.scan(&KeyRange::prefix(b"t"), usize::MAX).await.unwrap();
    assert_eq!(rows.len(), n + 1);
    let total: usize = rows.iter().map(|(k, v)| key_overhead + k.len() + v.len()).sum();
    assert_eq!(total, MAX_TXN_WRITE_BYTES);
    assert_eq!(rows[3].1, vec![3u8; MAX_VALUE_BYTES]);
}

async fn racing_inserts_on_the_same_absent_key_exactly_one_wins(store: DynStore) {
    const TASKS: usize = 8;
    for round in 0..4 {
        let key = format!("race/{round}").into_bytes();
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let handles: Vec<_> = (0..TASKS)
            .map(|task| {
                let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let mut txn = Txn::new();
                    txn.check_value(key.clone(), None);
                    txn.set(key.clone(), vec![task as u8]);
                    // A second key written by the same transaction: winners write both or none.
                    txn.set([key.as_slice(), b"/by"].concat(), vec![task as u8]);
                    (task, store.commit(txn).await)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for h in handles {
            let (task, result) = h.await.unwrap();
            match result {
                Ok(()) => winners.push(task),
                Err(StoreError::Conflict { index: 0, key: k }) => assert_eq!(k, key),
                Err(e) => {
                    panic!("round {round}, task {task}: expected Ok or a conflict, got {e:?}")
                }
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let w = winners[0] as u8;
        assert_eq!(store.get(&key).await.unwrap(), Some(vec![w]));
        assert_eq!(store.get(&[key.as_slice(), b"/by"].concat()).await.unwrap(), Some(vec![w]));
    }
}

async fn optimistic_increments_from_concurrent_tasks_are_never_lost(store: DynStore) {
    const TASKS: u64 = 4;
    const EACH: u64 = 5;
    set_all(&*store, &[(b"counter".to_vec(), 0u64.to_be_bytes().to_vec())]).await;
    let handles: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut conflicts = 0u32;
                for _ in 0..EACH {
                    loop {
                        let raw = store.get(b"counter").await.unwrap().unwrap();
                        let n = u64::from_be_bytes(raw.as_slice().try_into().unwrap());
                        let mut txn = Txn::new();
                        txn.check_value(b"counter".to_vec(), Some(raw));
                        txn.set(b"counter".to_vec(), (n + 1).to_be_bytes().to_vec());
                        match store.commit(txn).await {
                            Ok(()) => break,
                            Err(StoreError::Conflict { .. }) => conflicts += 1,
                            Err(e) => panic!("increment failed: {e:?}"),
                        }
                        assert!(conflicts < 10_000, "livelock");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let raw = store.get(b"counter").await.unwrap().unwrap();
    assert_eq!(u64::from_be_bytes(raw.as_slice().try_into().unwrap()), TASKS * EACH);
}

async fn read_many_answers_each_read_as_get_and_scan_would_in_order(store: DynStore) {
    let rows = numbered("m", 10);
    set_all(&*store, &rows).await;
    let reads = vec![
        Read::Get(b"m003".to_vec()),
        Read::Scan { range: KeyRange::prefix(b"m"), limit: 4 },
        Read::Get(b"absent".to_vec()),
        Read::Scan { range: KeyRange::new(b"m005".to_vec(), b"m007".to_vec()), limit: 100 },
        // The same key twice, and an empty range: each answered on its own.
        Read::Get(b"m003".to_vec()),
        Read::Scan { range: KeyRange::prefix(b"nothing"), limit: 10 },
    ];
    let answers = store.read_many(&reads).await.expect("read_many");
    assert_eq!(answers.len(), reads.len());
    for (read, answer) in reads.iter().zip(&answers) {
        let expected = match read {
            Read::Get(key) => ReadResult::Value(store.get(key).await.unwrap()),
            Read::Scan { range, limit } => ReadResult::Rows(store.scan(range, *limit).await.unwrap()),
        };
        assert_eq!(*answer, expected, "{read:?}");
    }
    assert_eq!(answers[0], ReadResult::Value(Some(rows[3].1.clone())));
    assert_eq!(answers[1].clone().into_rows(), rows[..4].to_vec());
    assert_eq!(answers[2], ReadResult::Value(None));
    assert_eq!(answers[3].clone().into_rows(), rows[5..7].to_vec());
    assert!(store.read_many(&[]).await.unwrap().is_empty());
}

async fn read_then_gives_what_read_many_answers_with_or_without_work_and_a_work_that_fails_is_an_error(
    store: DynStore,
) {
    let rows = numbered("w", 6);
    set_all(&*store, &rows).await;
    let reads = vec![
        Read::Scan { range: KeyRange::prefix(b"w"), limit: 3 },
        Read::Get(b"w004".to_vec()),
        Read::Get(b"absent".to_vec()),
    ];
    let expected = store.read_many(&reads).await.expect("read_many");
    let done = read_then(&*store, &reads, Then::Done).await.expect("read_then, done");
    assert_eq!(done, expected);
    let worked = read_then(&*store, &reads, |answers| Then::Work(Box::new(move || (answers.len(), answers))))
        .await
        .expect("read_then, with work");
    assert_eq!(worked, (3, expected));
    // A work that panics is the caller's error, not its panic; the store answers on.
    let failed = read_then(&*store, &reads, |_| Then::<()>::Work(Box::new(|| panic!("the work after the read")))).await;
    assert!(matches!(failed, Err(StoreError::Failed { .. })), "{failed:?}");
    assert_eq!(store.get(b"w004").await.unwrap(), Some(rows[4].1.clone()));
}

async fn commit_many_a_failing_check_fails_only_its_own_transaction(store: DynStore) {
    set_all(&*store, &[(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"1".to_vec())]).await;
    let mut first = Txn::new();
    first.check_value(b"a".to_vec(), Some(b"1".to_vec())).set(b"a".to_vec(), b"2".to_vec());
    // The conflict injected into one transaction of the group: its second check fails.
    let mut second = Txn::new();
    second
        .check_value(b"b".to_vec(), Some(b"1".to_vec()))
        .check_value(b"b".to_vec(), Some(b"stale".to_vec()))
        .set(b"b".to_vec(), b"2".to_vec())
        .set(b"b2".to_vec(), b"written".to_vec());
    let mut third = Txn::new();
    third.check_value(b"c".to_vec(), None).set(b"c".to_vec(), b"new".to_vec());
    let results = store.commit_many(vec![first, second, third]).await;
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    match &results[1] {
        Err(StoreError::Conflict { index: 1, key }) => assert_eq!(key, b"b"),
        other => panic!("expected the second transaction's check 1 to fail, got {other:?}"),
    }
    assert!(results[2].is_ok(), "{:?}", results[2]);
    assert_eq!(store.get(b"a").await.unwrap(), Some(b"2".to_vec()));
    assert_eq!(store.get(b"b").await.unwrap(), Some(b"1".to_vec()), "the failed transaction wrote");
    assert_eq!(store.get(b"b2").await.unwrap(), None, "the failed transaction wrote");
    assert_eq!(store.get(b"c").await.unwrap(), Some(b"new".to_vec()));
    assert!(store.commit_many(Vec::new()).await.is_empty());
}

async fn commit_many_judges_each_digest_check_on_its_own_range_alone(store: DynStore) {
    // Actor-like neighbours: `r1` holds 3 rows, `r2` is empty, `r3` and `r4` 1 and 5 rows; the
    // key `r2` itself sits just past `r1`'s rows and is not in `r1/`'s half-open range.
    let rows: Vec<(Vec<u8>, Vec<u8>)> = [("r1/", 3), ("r3/", 1), ("r4/", 5)]
        .iter()
        .flat_map(|(prefix, n)| numbered(prefix, *n))
        .chain([(b"r2".to_vec(), b"edge".to_vec())])
        .collect();
    set_all(&*store, &rows).await;
    let all = all_rows(&*store).await;
    let digest = |prefix: &str| {
        let own: Vec<KeyValue> = all.iter().filter(|(k, _)| k.starts_with(prefix.as_bytes())).cloned().collect();
        digest_of(&own)
    };
    let txn = |prefix: &str, expected: u128| {
        let mut txn = Txn::new();
        txn.check_value(format!("{prefix}head").into_bytes(), None)
            .check_range_digest(KeyRange::prefix(prefix.as_bytes()), expected)
            .set(format!("{prefix}done").into_bytes(), b"1".to_vec());
        txn
    };
    // `r3/`'s expected digest is of a state it is not in: its check alone fails.
    let stale = digest_of(&numbered("r3/", 2));
    let group =
        vec![txn("r1/", digest("r1/")), txn("r2/", digest("r2/")), txn("r3/", stale), txn("r4/", digest("r4/"))];
    let results = store.commit_many(group).await;
    assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok(), "{results:?}");
    match &results[2] {
        Err(StoreError::Conflict { index: 1, key }) => assert_eq!(key, b"r3/"),
        other => panic!("expected r3/'s digest check (index 1) to fail, got {other:?}"),
    }
    for (prefix, done) in [("r1/", true), ("r2/", true), ("r3/", false), ("r4/", true)] {
        let written = store.get(format!("{prefix}done").as_bytes()).await.unwrap();
        assert_eq!(written.is_some(), done, "{prefix}");
    }
}

async fn commit_many_checks_see_the_writes_of_earlier_transactions_of_the_group(store: DynStore) {
    // Three increments of one counter in one group, each checking what the one before wrote;
    // a fourth checking the value from before the group fails.
    set_all(&*store, &[(b"n".to_vec(), vec![0])]).await;
    let step = |from: u8| {
        let mut txn = Txn::new();
        txn.check_value(b"n".to_vec(), Some(vec![from])).set(b"n".to_vec(), vec![from + 1]);
        txn
    };
    let mut range = Txn::new();
    range.check_range_digest(KeyRange::prefix(b"n"), digest_of(&[(b"n".to_vec(), vec![3])]));
    range.set(b"seen".to_vec(), b"3".to_vec());
    let results = store.commit_many(vec![step(0), step(1), step(2), step(0), range]).await;
    assert!(results[..3].iter().all(Result::is_ok), "{results:?}");
    assert!(matches!(results[3], Err(StoreError::Conflict { index: 0, .. })), "{results:?}");
    assert!(results[4].is_ok(), "a range digest sees the group's earlier writes: {results:?}");
    assert_eq!(store.get(b"n").await.unwrap(), Some(vec![3]));
    assert_eq!(store.get(b"seen").await.unwrap(), Some(b"3".to_vec()));
}

async fn commit_many_applies_each_transactions_writes_in_their_order(store: DynStore) {
    // Two actors' transactions as a one-shot migration over a stale head writes them: a range
    // cleared, then rows set inside it; a row set, then cleared; a row cleared, then set again.
    let old = |k: &[u8]| (k.to_vec(), b"old".to_vec());
    set_all(&*store, &[old(b"x/p1"), old(b"x/p2"), old(b"x/q"), old(b"y/lease"), old(b"y/z")]).await;
    let mut x = Txn::new();
    x.check_value(b"x/q".to_vec(), Some(b"old".to_vec()))
        .set(b"x/p3".to_vec(), b"dropped".to_vec())
        .clear_range(KeyRange::prefix(b"x/p"))
        .set(b"x/p1".to_vec(), b"new".to_vec())
        .set(b"x/tmp".to_vec(), b"gone".to_vec())
        .clear(b"x/tmp".to_vec());
    let mut y = Txn::new();
    y.check_value(b"y/lease".to_vec(), Some(b"old".to_vec()))
        .clear(b"y/z".to_vec())
        .set(b"y/z".to_vec(), b"again".to_vec())
        .clear(b"y/lease".to_vec());
    let results = store.commit_many(vec![x, y]).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let rows = store.scan(&KeyRange::prefix(b""), 100).await.unwrap();
    let expected: Vec<KeyValue> = [(&b"x/p1"[..], &b"new"[..]), (b"x/q", b"old"), (b"y/z", b"again")]
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(rows, expected);
}

async fn commit_many_refuses_a_transaction_over_a_limit_alone(store: DynStore) {
    let mut ok = Txn::new();
    ok.set(b"ok1".to_vec(), b"v".to_vec());
    let mut too_big = Txn::new();
    too_big.set(b"big".to_vec(), vec![0u8; MAX_VALUE_BYTES + 1]);
    let mut long_key = Txn::new();
    long_key.set(vec![b'k'; MAX_KEY_BYTES + 1], b"v".to_vec());
    let mut ok2 = Txn::new();
    ok2.set(b"ok2".to_vec(), b"v".to_vec());
    let results = store.commit_many(vec![ok, too_big, long_key, ok2]).await;
    assert!(results[0].is_ok() && results[3].is_ok(), "{results:?}");
    assert!(matches!(results[1], Err(StoreError::ValueTooLarge { .. })), "{results:?}");
    assert!(matches!(results[2], Err(StoreError::KeyTooLarge { .. })), "{results:?}");
    assert_eq!(keys_of(&all_rows(&*store).await), vec![b"ok1".to_vec(), b"ok2".to_vec()]);
}

async fn commit_many_commits_a_group_bigger_than_one_transaction_may_write(store: DynStore) {
    // Three transactions of ~4 MB: together over the 10 MB limit of one transaction, each under
    // it; the backend splits the group, and every one commits.
    let n = 4_000_000 / (8 + MAX_VALUE_BYTES);
    let txns: Vec<Txn> = (0..3u8)
        .map(|g| {
            let mut txn = Txn::new();
            for i in 0..n {
                txn.set(format!("g{g}/{i:04}").into_bytes(), vec![g; MAX_VALUE_BYTES]);
            }
            txn
        })
        .collect();
    assert!(txns.iter().map(Txn::write_bytes).sum::<usize>() > MAX_TXN_WRITE_BYTES);
    let results = store.commit_many(txns).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for g in 0..3u8 {
        let rows = store.scan(&KeyRange::prefix(format!("g{g}/").as_bytes()), usize::MAX).await.unwrap();
        assert_eq!(rows.len(), n, "group member {g}");
        assert!(rows.iter().all(|(_, v)| v.len() == MAX_VALUE_BYTES && v[0] == g));
    }
}

async fn optimistic_increments_in_concurrent_groups_are_never_lost(store: DynStore) {
    // Tasks commit groups that each increment two counters (one shared, one their own);
    // conflicts are retried. Every increment of every group lands once.
    const TASKS: u64 = 4;
    const ROUNDS: u64 = 5;
    set_all(&*store, &[(b"shared".to_vec(), 0u64.to_be_bytes().to_vec())]).await;
    let handles: Vec<_> = (0..TASKS)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let own = format!("own/{task}").into_bytes();
                let read = |key: Vec<u8>| {
                    let store = store.clone();
                    async move {
                        let raw = store.get(&key).await.unwrap();
                        let n = raw.as_deref().map_or(0, |r| u64::from_be_bytes(r.try_into().unwrap()));
                        let mut txn = Txn::new();
                        txn.check_value(key.clone(), raw).set(key, (n + 1).to_be_bytes().to_vec());
                        txn
                    }
                };
                for _ in 0..ROUNDS {
                    let (mut shared_done, mut own_done) = (false, false);
                    for tries in 0.. {
                        assert!(tries < 10_000, "livelock");
                        let mut txns = Vec::new();
                        if !shared_done {
                            txns.push((true, read(b"shared".to_vec()).await));
                        }
                        if !own_done {
                            txns.push((false, read(own.clone()).await));
                        }
                        if txns.is_empty() {
                            break;
                        }
                        let (which, txns): (Vec<bool>, Vec<Txn>) = txns.into_iter().unzip();
                        for (shared, result) in which.into_iter().zip(store.commit_many(txns).await) {
                            match result {
                                Ok(()) if shared => shared_done = true,
                                Ok(()) => own_done = true,
                                Err(StoreError::Conflict { .. }) => {}
                                Err(e) => panic!("group increment failed: {e:?}"),
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let value = |raw: Option<Vec<u8>>| u64::from_be_bytes(raw.unwrap().as_slice().try_into().unwrap());
    assert_eq!(value(store.get(b"shared").await.unwrap()), TASKS * ROUNDS);
    for task in 0..TASKS {
        assert_eq!(value(store.get(format!("own/{task}").as_bytes()).await.unwrap()), ROUNDS);
    }
}

// ---------------------------------------------------------------------------------------------
// What the rivet layout does instead, by design
// ---------------------------------------------------------------------------------------------

/// The contract items that cannot hold across the rivet layout's key families (`v1/` in
/// pegboard's actor KV, `v2/` in sqlite-storage, ferry's records in `X.ferry_kv`), and what the
/// layout does instead.
mod rivet_by_design {
    use ferry::keys::{V1_PREFIX, V2_PREFIX};
    use ferry::layout::RivetId;
    use ferry::store::{KeyRange, RangeDigest, StoreError, Txn, prefix_end};
    use ferry::testing::{Backend, TestStore};

    fn unsupported<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
        assert!(
            matches!(result, Err(StoreError::Unsupported { layout: "rivet", .. })),
            "{what}: expected Unsupported in the rivet layout, got {result:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_range_across_key_families_is_unsupported_and_writes_nothing() {
        let ts = TestStore::new(Backend::Rivet).await;
        let store = ts.store();
        let a = ts.actor("a");
        let mut txn = Txn::new();
        txn.set(format!("v2/{a}/META").into_bytes(), b"head".to_vec());
        txn.set(b"ferry/audit/x".to_vec(), b"{}".to_vec());
        txn.set(format!("v1/{a}/\x08\x01\x00\x00").into_bytes(), b"meta".to_vec());
        store.commit(txn).await.unwrap();
        let before = super::common::whole(&*store).await;
        assert_eq!(before.len(), 3);

        let across = [
            KeyRange::new(Vec::new(), vec![0xff; 8]),
            KeyRange::new(V1_PREFIX.to_vec(), prefix_end(V2_PREFIX)),
            KeyRange::new(b"ferry/".to_vec(), V2_PREFIX.to_vec()),
            KeyRange::new(format!("v2/{a}/").into_bytes(), b"w".to_vec()),
        ];
        for range in &across {
            let what = ferry::keys::printable(&range.start);
            unsupported(store.scan(range, 10).await, &what);
            unsupported(store.scan_keys(range, 10).await, &what);
            unsupported(store.first_key(range).await, &what);
            let mut txn = Txn::new();
            txn.set(b"ferry/marker".to_vec(), b"1".to_vec());
            txn.clear_range(range.clone());
            unsupported(store.commit(txn).await, &what);
            let mut txn = Txn::new();
            txn.check_range_digest(range.clone(), RangeDigest::new().finish());
            txn.set(b"ferry/marker".to_vec(), b"1".to_vec());
            unsupported(store.commit(txn).await, &what);
        }
        // Each family on its own is a range like any other, and nothing above wrote.
        assert_eq!(super::common::whole(&*store).await, before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v1_across_actors_is_in_rivets_binary_id_order_and_each_actor_in_key_order() {
        let ts = TestStore::new(Backend::Rivet).await;
        let store = ts.store();
        let actors: Vec<ferry::ActorId> = (0..6).map(|_| ts.actor("any")).collect();
        let user_keys: [&[u8]; 4] = [b"\x00", b"\x00\x00", b"\x08\x01\x00\x00", b"\x08\x01\x01\x00\x00\x00\x00\x00"];
        let mut txn = Txn::new();
        for a in &actors {
            for k in user_keys {
                txn.set([V1_PREFIX, a.as_bytes(), b"/", k].concat(), k.to_vec());
            }
        }
        store.commit(txn).await.unwrap();

        let keys = store.scan_keys(&KeyRange::prefix(V1_PREFIX), usize::MAX).await.unwrap();
        let mut by_id = actors.clone();
        by_id.sort_by_key(|a| *RivetId::from_actor(a).unwrap().as_bytes());
        let expected: Vec<Vec<u8>> = by_id
            .iter()
            .flat_map(|a| user_keys.iter().map(move |k| [V1_PREFIX, a.as_bytes(), b"/", k].concat()))
            .collect();
        assert_eq!(keys, expected, "actors by binary id, each actor's keys in logical order");
        // One actor's range is a logical range like any other.
        let a = &actors[0];
        let one = store.scan_keys(&KeyRange::prefix(&[V1_PREFIX, a.as_bytes(), b"/"].concat()), 10).await.unwrap();
        assert_eq!(one, user_keys.iter().map(|k| [V1_PREFIX, a.as_bytes(), b"/", k].concat()).collect::<Vec<_>>());
    }
}
