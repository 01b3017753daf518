//! The rivet layout's store (`ferry::layout::RivetStore`, DESIGN.md section 7) against rows
//! written the way rivet writes them: physical rows put straight into `X.kv` with
//! tokio-postgres (pegboard's DATA and METADATA rows, sqlite-storage's markers and chunk rows),
//! read back through ferry's logical keys. Real PostgreSQL, a unique schema per test with
//! rivet's objects made by the test's own DDL (`Backend::Rivet`).

mod common;

use common::rivet::{connect, physical_rows};
use ferry::keys::V1_PREFIX;
use ferry::layout::RivetId;
use ferry::layout::rivet::{
    KvMetadata, V1_VALUE_CHUNK_SIZE, V2_CHUNKED_MARKER, V2_INLINE_LIMIT, V2_INLINE_MARKER, V2_VALUE_CHUNK_SIZE,
    v1_data_key, v1_encode_entry, v1_metadata_key, v1_root, v2_chunk_key, v2_encode_value, v2_key, v2_subspace,
};
use ferry::layout::rivet_store::FIXTURE_KV_VERSION;
use ferry::store::{self, DynStore, KeyRange, KeyValue, OpenMode, OpenOptions, RangeDigest, StoreError, Txn};
use ferry::testing::{Backend, TestStore};
use ferry::{ActorId, layout::Layout};
use tokio_postgres::Client;

/// An id quoted in rivet's own docs, for the byte-exact test.
const DOC_ID: &str = "t1s80so6h3irenp8ymzltfoittcl00";
const DOC_ID_HEX: &str = "0130ac6849376e45dd99bb525760acd2cf0001";

fn h(s: &str) -> Vec<u8> {
    hex::decode(s.replace(' ', "")).unwrap()
}

fn pegboard_metadata() -> KvMetadata {
    KvMetadata { version: b"2.0.22".to_vec(), update_ts: 1_763_900_000_000 }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i / 253) as u8).collect()
}

fn id_of(actor: &ActorId) -> RivetId {
    RivetId::from_actor(actor).unwrap()
}

fn v1_key(actor: &ActorId, user_key: &[u8]) -> Vec<u8> {
    [V1_PREFIX, actor.as_bytes(), b"/", user_key].concat()
}

struct Env {
    ts: TestStore,
    store: DynStore,
    pg: Client,
}

impl Env {
    async fn new() -> Env {
        let ts = TestStore::new(Backend::Rivet).await;
        let store = ts.store();
        Env { ts, store, pg: connect().await }
    }

    fn schema(&self) -> &str {
        self.ts.schema().unwrap()
    }

    /// Physical rows straight into `X.kv` (in the order given).
    async fn put_rows(&self, rows: &[(Vec<u8>, Vec<u8>)]) {
        for (k, v) in rows {
            self.pg
                .execute(
                    &format!(
                        "INSERT INTO {}.kv (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        self.schema()
                    ),
                    &[k, v],
                )
                .await
                .unwrap();
        }
    }

    async fn delete_row(&self, key: &[u8]) {
        let n = self.pg.execute(&format!("DELETE FROM {}.kv WHERE key = $1", self.schema()), &[&key]).await.unwrap();
        assert_eq!(n, 1, "deleted a row that is there");
    }

    async fn physical(&self) -> Vec<KeyValue> {
        physical_rows(&self.pg, self.schema(), None).await
    }
}

fn corrupt_at<T: std::fmt::Debug>(result: Result<T, StoreError>, logical: &[u8], what: &str) {
    match result {
        Err(StoreError::Corrupt { key, .. }) => {
            assert_eq!(key, logical, "{what}: Corrupt names {}", ferry::keys::printable(&key))
        }
        other => panic!("{what}: expected Corrupt naming {}, got {other:?}", ferry::keys::printable(logical)),
    }
}

// ---------------------------------------------------------------------------------------------
// v1: pegboard's actor KV
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_logical_reads_assemble_data_rows_and_metadata_written_as_pegboard_writes_them() {
    let env = Env::new().await;
    let a = env.ts.actor("pegboard");
    let id = id_of(&a);
    // User keys with 00 and FF bytes, values from one byte to three DATA rows.
    let entries: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"\x00".to_vec(), pattern(1, 1)),
        (b"\x00\x00".to_vec(), pattern(V1_VALUE_CHUNK_SIZE, 2)),
        (b"\x01state".to_vec(), pattern(V1_VALUE_CHUNK_SIZE + 1, 3)),
        (b"\x08\x01\x00\x00".to_vec(), ferry::v1::keys::encode_meta(3 * 4096).to_vec()),
        (b"\x08\x01\x01\x00\x00\x00\x00\x00".to_vec(), pattern(4096, 4)),
        (b"\x08\x01\x01\x00\x00\x00\x00\x01".to_vec(), pattern(4096, 5)),
        (b"\x08\x01\x01\x00\x00\x00\x00\x02".to_vec(), pattern(25_000, 6)),
        (b"\xff\x00\xff".to_vec(), pattern(20_000, 7)),
    ];
    for (k, v) in &entries {
        let mut rows = v1_encode_entry(&id, k, v, &pegboard_metadata());
        // rivet's transactions commit rows in any order; the store must not care.
        rows.reverse();
        env.put_rows(&rows).await;
    }
    let expected: Vec<KeyValue> = entries.iter().map(|(k, v)| (v1_key(&a, k), v.clone())).collect();

    for (k, v) in &expected {
        assert_eq!(env.store.get(k).await.unwrap().as_ref(), Some(v), "get {}", ferry::keys::printable(k));
    }
    let actor_range = KeyRange::prefix(&v1_key(&a, b""));
    assert_eq!(env.store.scan(&actor_range, usize::MAX).await.unwrap(), expected);
    // Every limit, so entries cut by a batch of physical rows come back whole.
    for limit in 1..=expected.len() {
        assert_eq!(env.store.scan(&actor_range, limit).await.unwrap(), expected[..limit].to_vec(), "limit {limit}");
    }
    let keys: Vec<Vec<u8>> = expected.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(env.store.scan_keys(&actor_range, usize::MAX).await.unwrap(), keys);
    assert_eq!(env.store.first_key(&actor_range).await.unwrap(), Some(keys[0].clone()));
    let sqlite = ferry::v1::keys::sqlite_range(&a);
    assert_eq!(env.store.first_key(&sqlite).await.unwrap(), Some(keys[3].clone()));
    assert_eq!(env.store.scan(&sqlite, 100).await.unwrap(), expected[3..7].to_vec());
    assert_eq!(env.store.get(&v1_key(&a, b"\x00\x01")).await.unwrap(), None);

    // A digest check over the logical rows holds exactly when the rows are what was read.
    let mut digest = RangeDigest::new();
    for (k, v) in &expected[3..7] {
        digest.update(k, v);
    }
    let mut txn = Txn::new();
    txn.check_range_digest(sqlite.clone(), digest.finish());
    txn.set(b"ferry/marker".to_vec(), b"1".to_vec());
    env.store.commit(txn).await.expect("the digest of the logical rows holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_v1_entries_are_corrupt_naming_the_logical_key() {
    let env = Env::new().await;
    let value = pattern(25_000, 9);
    let cases: [(&str, &[u8]); 3] = [
        ("data-without-metadata", b"\x08\x01\x01\x00\x00\x00\x00\x00"),
        ("metadata-without-data", b"\x08\x01\x00\x00"),
        ("missing-middle-data-row", b"\x08\x01\x01\x00\x00\x00\x00\x07"),
    ];
    for (what, user_key) in cases {
        let a = env.ts.actor(what);
        let id = id_of(&a);
        env.put_rows(&v1_encode_entry(&id, user_key, &value, &pegboard_metadata())).await;
        // A complete neighbour before it.
        env.put_rows(&v1_encode_entry(&id, b"\x01", b"ok", &pegboard_metadata())).await;
        match what {
            "data-without-metadata" => env.delete_row(&v1_metadata_key(&id, user_key)).await,
            "metadata-without-data" => {
                for i in 0..3 {
                    env.delete_row(&v1_data_key(&id, user_key, i)).await;
                }
            }
            _ => env.delete_row(&v1_data_key(&id, user_key, 1)).await,
        }
        let logical = v1_key(&a, user_key);
        corrupt_at(env.store.get(&logical).await, &logical, what);
        let range = KeyRange::prefix(&v1_key(&a, b""));
        corrupt_at(env.store.scan(&range, usize::MAX).await, &logical, what);
        // The complete entry before it still reads.
        assert_eq!(env.store.scan(&range, 1).await.unwrap(), vec![(v1_key(&a, b"\x01"), b"ok".to_vec())], "{what}");
        // A check on rows rivet could not read does not hold.
        let mut txn = Txn::new();
        txn.check_value(logical.clone(), Some(value.clone()));
        txn.set(b"ferry/marker".to_vec(), what.as_bytes().to_vec());
        assert!(matches!(env.store.commit(txn).await, Err(StoreError::Conflict { index: 0, .. })), "{what}");
        assert_eq!(env.store.get(b"ferry/marker").await.unwrap(), None, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_write_through_a_store_not_opened_for_v1_writes_is_refused_and_writes_nothing() {
    let env = Env::new().await;
    let a = env.ts.actor("read-only-v1");
    env.put_rows(&v1_encode_entry(&id_of(&a), b"\x08\x01\x00\x00", b"meta", &pegboard_metadata())).await;
    // Opened as every command but `seed` and `import` opens it.
    let opts = OpenOptions::new(2, OpenMode::Existing).layout(Layout::Rivet);
    let store = store::open_with(&env.ts.url, &opts).await.unwrap();
    let before = env.physical().await;

    let key = v1_key(&a, b"\x08\x01\x00\x00");
    let writes: Vec<(&str, Txn)> = vec![
        ("set", {
            let mut t = Txn::new();
            t.set(key.clone(), b"new".to_vec());
            t
        }),
        ("clear", {
            let mut t = Txn::new();
            t.clear(key.clone());
            t
        }),
        ("clear range", {
            let mut t = Txn::new();
            t.clear_range(KeyRange::prefix(&v1_key(&a, b"")));
            t
        }),
        ("clear all of v1", {
            let mut t = Txn::new();
            t.clear_range(KeyRange::prefix(V1_PREFIX));
            t
        }),
    ];
    for (what, mut txn) in writes {
        // Alongside writes that would be allowed: the whole transaction is refused.
        txn.set(b"ferry/marker".to_vec(), b"1".to_vec());
        txn.set(format!("v2/{a}/META").into_bytes(), b"head".to_vec());
        let result = store.commit(txn).await;
        assert!(matches!(result, Err(StoreError::Unsupported { layout: "rivet", .. })), "{what}: {result:?}");
    }
    assert_eq!(env.physical().await, before, "a refused v1 write changed X.kv");
    assert_eq!(store.get(b"ferry/marker").await.unwrap(), None);
    assert_eq!(store.get(&key).await.unwrap(), Some(b"meta".to_vec()), "reads are allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_actors_enumerates_every_actor_with_and_without_sqlite_data_over_several_batches_and_resumes() {
    let env = Env::new().await;
    // More actors than one enumeration call visits, a third of them without SQLite keys
    // (only keys around 0x08), a third with SQLite keys only, a third with both.
    let n = 600;
    let actors: Vec<ActorId> = (0..n).map(|_| env.ts.actor("any")).collect();
    let mut rows = Vec::new();
    for (i, a) in actors.iter().enumerate() {
        let id = id_of(a);
        let user_keys: &[&[u8]] = match i % 3 {
            0 => &[b"\x01state", b"\x07\xff", b"\x09"],
            1 => &[b"\x08\x01\x00\x00"],
            _ => &[b"\x00", b"\x08\x01\x01\x00\x00\x00\x00\x00", b"\xff"],
        };
        for k in user_keys {
            rows.extend(v1_encode_entry(&id, k, b"v", &pegboard_metadata()));
        }
    }
    env.put_rows(&rows).await;
    let mut expected: Vec<(Vec<u8>, bool)> =
        actors.iter().enumerate().map(|(i, a)| (a.as_bytes().to_vec(), i % 3 != 0)).collect();
    expected.sort_by_key(|(raw, _)| *RivetId::parse(std::str::from_utf8(raw).unwrap()).unwrap().as_bytes());

    let all = KeyRange::prefix(V1_PREFIX);
    for limit in [usize::MAX, 1000, 7] {
        let mut seen = Vec::new();
        let mut cursor = all.clone();
        let mut calls = 0;
        loop {
            let batch = env.store.v1_actors(&cursor, limit).await.unwrap();
            calls += 1;
            assert!(batch.actors.len() <= limit);
            for actor in &batch.actors {
                assert!(actor.id.is_ok(), "{:?}", actor.raw);
                seen.push((actor.raw.clone(), actor.has_sqlite.expect("rivet's probe always answers")));
            }
            match batch.next {
                Some(next) => cursor = KeyRange::new(next, all.end.clone()),
                None => break,
            }
            assert!(calls < 1000, "no end");
        }
        assert!(calls > 1, "limit {limit}: one call");
        assert_eq!(seen, expected, "limit {limit}: every actor once, in rivet's order, has_sqlite right");
    }

    // A cursor resumes in a fresh call, as a campaign checkpoint does after a restart.
    let first = env.store.v1_actors(&all, 250).await.unwrap();
    let next = first.next.clone().expect("more to come");
    let resumed = env.store.v1_actors(&KeyRange::new(next, all.end.clone()), 5).await.unwrap();
    let raws: Vec<Vec<u8>> = resumed.actors.iter().map(|a| a.raw.clone()).collect();
    let at = first.actors.len();
    assert_eq!(raws, expected[at..at + 5].iter().map(|(r, _)| r.clone()).collect::<Vec<_>>());

    // The scan the producer runs sees the same actors.
    for resume in [None, Some(100), Some(n - 1)] {
        let after = resume.map(|i| expected[i].0.clone());
        let mut scan = ferry::scan::ActorScan::new(&*env.store, after.as_deref());
        let mut scanned = Vec::new();
        while let Some(actor) = scan.next().await.unwrap() {
            scanned.push((actor.raw.clone(), actor.has_sqlite.unwrap()));
        }
        assert_eq!(scanned, expected[resume.map_or(0, |i| i + 1)..].to_vec(), "resumed after {resume:?}");
    }

    // An empty keyspace: no actors, no cursor.
    let empty = TestStore::new(Backend::Rivet).await;
    let batch = empty.store().v1_actors(&all, 10).await.unwrap();
    assert!(batch.actors.is_empty() && batch.next.is_none(), "{batch:?}");
}

// ---------------------------------------------------------------------------------------------
// v2: sqlite-storage
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_v2_values_written_as_sqlite_storage_writes_them_are_read_back_whole() {
    let env = Env::new().await;
    let a = env.ts.actor("chunked");
    let delta = |txid: u64, chunk: u32| ferry::v2::keys::delta_chunk(&a, txid, chunk);
    // Inline up to the limit, chunked past it (a value ferry never writes but rivet may).
    let values: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (delta(1, 0), pattern(V2_INLINE_LIMIT, 1)),
        (delta(1, 1), pattern(V2_INLINE_LIMIT + 1, 2)),
        (delta(2, 0), pattern(3 * V2_VALUE_CHUNK_SIZE, 3)),
        (delta(3, 0), pattern(250_001, 4)),
        (ferry::v2::keys::meta(&a), b"head".to_vec()),
    ];
    for (k, v) in &values {
        let rows = v2_encode_value(k, v).unwrap();
        let marker = if v.len() > V2_INLINE_LIMIT { V2_CHUNKED_MARKER } else { V2_INLINE_MARKER };
        assert_eq!(rows[0].1[0], marker);
        env.put_rows(&rows).await;
    }
    let mut expected = values.clone();
    expected.sort();
    for (k, v) in &expected {
        let got = env.store.get(k).await.unwrap().unwrap_or_else(|| panic!("{}", ferry::keys::printable(k)));
        assert!(got == *v, "{}: {} bytes back, {} written", ferry::keys::printable(k), got.len(), v.len());
    }
    let range = KeyRange::prefix(format!("v2/{a}/").as_bytes());
    assert!(env.store.scan(&range, usize::MAX).await.unwrap() == expected, "scan of chunked values");
    let keys: Vec<Vec<u8>> = expected.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(env.store.scan_keys(&range, usize::MAX).await.unwrap(), keys, "chunk rows are no logical keys");

    // A chunked value missing a chunk row is corrupt, never partial.
    env.delete_row(&v2_chunk_key(&delta(3, 0), 10).unwrap()).await;
    corrupt_at(env.store.get(&delta(3, 0)).await, &delta(3, 0), "missing chunk row");
    corrupt_at(env.store.scan(&range, usize::MAX).await, &delta(3, 0), "missing chunk row");

    // Clearing a chunked value clears its chunk rows too.
    let mut txn = Txn::new();
    txn.clear(delta(2, 0));
    env.store.commit(txn).await.unwrap();
    let first_chunk = v2_chunk_key(&delta(2, 0), 0).unwrap();
    let chunks = KeyRange::prefix(&first_chunk[..first_chunk.len() - 4]);
    assert!(physical_rows(&env.pg, env.schema(), Some(&chunks)).await.is_empty(), "chunk rows left behind");
    assert_eq!(env.store.get(&delta(2, 0)).await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// Byte-exact rows of logical writes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_writes_land_as_rivets_rows_byte_for_byte() {
    let env = Env::new().await;
    let a = ActorId::parse(DOC_ID).unwrap();
    let p = format!("14 15 03 15 48 40 {DOC_ID_HEX}");
    let s = "14 15 03 02 73 71 6c 69 74 65 2d 73 74 6f 72 61 67 65 00";
    let actor_hex = hex::encode(DOC_ID);

    let mut txn = Txn::new();
    // A SQLite chunk key (00 bytes in it) of 3 bytes, and one of two DATA rows.
    txn.set(v1_key(&a, b"\x08\x01\x01\x00\x00\x00\x00\x05"), b"abc".to_vec());
    txn.set(v1_key(&a, b"\x00"), vec![0xee; V1_VALUE_CHUNK_SIZE + 1]);
    txn.set(format!("v2/{a}/META").into_bytes(), b"head".to_vec());
    let mut pidx = format!("v2/{a}/PIDX/delta/").into_bytes();
    pidx.extend_from_slice(&1u32.to_be_bytes());
    txn.set(pidx, 7u64.to_be_bytes().to_vec());
    txn.set(b"ferry/audit/x".to_vec(), b"{}".to_vec());
    env.store.commit(txn).await.unwrap();

    let rows = env.physical().await;
    let keys: Vec<Vec<u8>> = rows.iter().map(|(k, _)| k.clone()).collect();
    let zero = format!("{p} 05 01 00 ff 00 00");
    let chunk = format!("{p} 05 01 08 01 01 00 ff 00 ff 00 ff 00 ff 05 00 00");
    // sqlite-storage's subspace (`14 15 03 02`) sorts before pegboard's actor KV (`14 15 03 15`).
    assert_eq!(
        keys,
        vec![
            h(&format!("{s} 02 {actor_hex} 2f {}", hex::encode("META"))),
            h(&format!("{s} 02 {actor_hex} 2f {} 00 00 00 01", hex::encode("PIDX/delta/"))),
            h(&format!("{zero} 15 04 14")),
            h(&format!("{zero} 15 04 15 01")),
            h(&format!("{zero} 15 2c")),
            h(&format!("{chunk} 15 04 14")),
            h(&format!("{chunk} 15 2c")),
        ],
        "X.kv holds rivet's rows and nothing of ferry's records"
    );
    // The same keys from the codec (which the layout tests check against the tuple crate).
    let id = RivetId::parse(DOC_ID).unwrap();
    assert_eq!(keys[0], v2_key(format!("v2/{a}/META").as_bytes()).unwrap());
    assert_eq!(keys[5], v1_data_key(&id, b"\x08\x01\x01\x00\x00\x00\x00\x05", 0));
    assert_eq!(keys[6], v1_metadata_key(&id, b"\x08\x01\x01\x00\x00\x00\x00\x05"));
    assert!(keys[..2].iter().all(|k| k.starts_with(&v2_subspace())));
    assert!(keys[2..].iter().all(|k| k.starts_with(&v1_root())));

    assert_eq!(rows[0].1, h(&format!("00 {}", hex::encode("head"))));
    assert_eq!(rows[1].1, h("00 00 00 00 00 00 00 00 07"));
    assert_eq!(rows[2].1, vec![0xee; V1_VALUE_CHUNK_SIZE]);
    assert_eq!(rows[3].1, vec![0xee]);
    assert_eq!(rows[5].1, b"abc");
    // METADATA: BARE uvarint-length version ++ i64 LE update_ts.
    for meta in [&rows[4].1, &rows[6].1] {
        assert_eq!(KvMetadata::decode(meta).unwrap().version, FIXTURE_KV_VERSION);
        assert_eq!(meta[0] as usize, FIXTURE_KV_VERSION.len());
        assert_eq!(meta.len(), 1 + FIXTURE_KV_VERSION.len() + 8);
    }

    // ferry's record is in X.ferry_kv.
    let records = env
        .pg
        .query(&format!("SELECT key FROM {}.ferry_kv ORDER BY key", env.schema()), &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get::<_, Vec<u8>>(0))
        .collect::<Vec<_>>();
    assert_eq!(records, vec![b"ferry/audit/x".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ferry_layout_refuses_a_rivet_schema_and_writes_nothing_there() {
    let env = Env::new().await;
    let before = env.physical().await;
    for mode in [OpenMode::Existing, OpenMode::Create] {
        let opts = OpenOptions::new(2, mode).layout(Layout::Ferry);
        let refused = store::open_with(&env.ts.url, &opts).await.err().expect("the ferry layout opened rivet's schema");
        assert!(refused.to_string().contains("--layout rivet"), "{refused}");
    }
    assert_eq!(env.physical().await, before, "nothing written to rivet's kv");
}

/// A commit's checks are read at once and its writes to `X.kv`, `conflict_ranges` and
/// `X.ferry_kv` sent at once: when the server refuses one of them, the others fail only
/// because the transaction is aborted, and the error reported is the refusal; nothing lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_write_reports_its_own_cause_and_writes_nothing_in_either_table() {
    let env = Env::new().await;
    let schema = env.schema().to_string();
    common::refuse_key(&env.pg, &schema, "ferry_kv", "ferry/bad").await;
    let a = ActorId::parse(DOC_ID).unwrap();
    let head = format!("v2/{a}/META").into_bytes();
    let mut txn = Txn::new();
    txn.check_value(head.clone(), None);
    txn.check_value(b"ferry/lease".to_vec(), None);
    txn.set(head.clone(), b"head".to_vec());
    txn.set(b"ferry/bad".to_vec(), b"{}".to_vec());
    match env.store.commit(txn).await {
        Err(StoreError::Failed { message, .. }) => assert!(message.contains("refused by the test"), "{message}"),
        other => panic!("expected the server's refusal, got {other:?}"),
    }
    assert_eq!(env.physical().await, Vec::<KeyValue>::new(), "X.kv written by a refused commit");
    assert_eq!(env.store.get(b"ferry/bad").await.unwrap(), None);
    // The same store commits the next transaction, checks and writes in both tables.
    let mut next = Txn::new();
    next.check_value(head.clone(), None);
    next.set(head.clone(), b"head".to_vec());
    next.set(b"ferry/good".to_vec(), b"{}".to_vec());
    env.store.commit(next).await.unwrap();
    assert_eq!(env.store.get(&head).await.unwrap(), Some(b"head".to_vec()));
}
