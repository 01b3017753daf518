//! The keyspace scan visits every actor under `v1/` exactly once, in key order, whatever the
//! mix of small actors (many per scan call), large ones (more keys than a call reads), ids
//! that prefix each other, and keys with no '/' after the id; and it resumes after any actor.
//! Checked on every backend and layout against a full scan of the same keys (in the rivet
//! layout "key order" is rivet's, by binary id, and every v1 key is an actor's: ids there are
//! fixed-length, so none prefixes another and no key lacks the '/').

use std::collections::BTreeMap;

use ferry::scan::{ActorScan, KEY_BATCH};
use ferry::store::{KeyRange, Txn};
use ferry::testing::{Backend, TestStore};

/// Truth from a full scan: actors in key order, with whether any key is under 0x08.
async fn truth(store: &ferry::store::DynStore) -> Vec<(Vec<u8>, bool)> {
    let mut order: Vec<Vec<u8>> = Vec::new();
    let mut sqlite: BTreeMap<Vec<u8>, bool> = BTreeMap::new();
    let rows = store.scan(&KeyRange::prefix(b"v1/"), usize::MAX >> 1).await.unwrap();
    for (k, _) in rows {
        let rest = &k[3..];
        let (raw, is_sqlite) = match rest.iter().position(|&b| b == b'/') {
            Some(i) => (rest[..i].to_vec(), rest.get(i + 1) == Some(&0x08)),
            None => (rest.to_vec(), false),
        };
        if order.last() != Some(&raw) {
            order.push(raw.clone());
        }
        *sqlite.entry(raw).or_default() |= is_sqlite;
    }
    order.into_iter().map(|r| (r.clone(), sqlite[&r])).collect()
}

async fn walk(store: &ferry::store::DynStore, resume: Option<&[u8]>) -> Vec<(Vec<u8>, Option<bool>)> {
    let mut scan = ActorScan::new(&**store, resume);
    let mut out = Vec::new();
    while let Some(a) = scan.next().await.unwrap() {
        out.push((a.raw, a.has_sqlite));
    }
    out
}

async fn scan_visits_every_actor_once_in_order(backend: Backend) {
    let ts = TestStore::new(backend).await;
    let mut txn = Txn::new();
    let mut put = |k: Vec<u8>| {
        txn.set(k, b"v".to_vec());
    };
    // (id, keys, has sqlite): sizes around the batch boundary, ids prefixing each other.
    let actors: &[(&str, usize, bool)] = &[
        ("a", 3, true),
        ("a-b", KEY_BATCH + 5, true),
        ("a0", 2, false),
        ("ab", 1, false),
        ("b", KEY_BATCH - 1, true),
        ("big-no-sqlite", 2 * KEY_BATCH, false),
        ("c", 1, true),
    ];
    let rivet = backend == Backend::Rivet;
    for (name, n, sqlite) in actors {
        let id = ts.actor(name);
        for i in 0..*n {
            let mut k = format!("v1/{id}/").into_bytes();
            k.push(if *sqlite && i == n - 1 { 0x08 } else { 0x01 });
            k.extend_from_slice(&(i as u32).to_be_bytes());
            put(k);
        }
    }
    for i in 0..300 {
        let id = ts.actor(&format!("s{i:04}"));
        put(format!("v1/{id}/").into_bytes().into_iter().chain([0x08u8, 1]).collect());
    }
    if !rivet {
        put(b"v1/zz".to_vec());
        put(b"v1/zz-a/\x08".to_vec());
    }
    ts.store.commit(txn).await.unwrap();

    let expected = truth(&ts.store).await;
    let got = walk(&ts.store, None).await;
    assert_eq!(got.len(), expected.len(), "actors visited");
    for ((raw, has), (traw, thas)) in got.iter().zip(&expected) {
        assert_eq!(raw, traw);
        if let Some(h) = has {
            assert_eq!(h, thas, "has_sqlite of {}", String::from_utf8_lossy(raw));
        }
    }
    // Resuming after any actor gives exactly the rest.
    for cut in [0usize, 1, 2, 5, 100, expected.len() - 1] {
        let rest: Vec<_> = walk(&ts.store, Some(&expected[cut].0)).await.into_iter().map(|(r, _)| r).collect();
        let want: Vec<_> = expected[cut + 1..].iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(rest, want, "resume after {}", String::from_utf8_lossy(&expected[cut].0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_scan_visits_every_actor_once_in_order() {
    scan_visits_every_actor_once_in_order(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_scan_visits_every_actor_once_in_order() {
    scan_visits_every_actor_once_in_order(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rivet_scan_visits_every_actor_once_in_order() {
    scan_visits_every_actor_once_in_order(Backend::Rivet).await;
}
