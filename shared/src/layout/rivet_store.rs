//! The rivet layout's store: the logical keyspace of DESIGN.md section 2 on rivet's own rows in
//! its PostgreSQL universaldb (section 7), so the migration, the job runner, the queues and
//! triage run unchanged on a real rivet deployment.
//!
//! | logical key | physical rows |
//! |---|---|
//! | `v1/{id}/{user_key}` | pegboard actor KV in `X.kv`: DATA rows and a METADATA row under `P(id) 05 01 esc(user_key) 00 00` |
//! | `v2/{id}/...` | sqlite-storage in `X.kv`: `S 02 {id}/...`, values with their marker, chunk rows `S 03 ...` |
//! | anything else (`ferry/...`) | the same key in `X.ferry_kv`, ferry's own table |
//!
//! Invariants:
//! - every read of `X.kv` runs in a universaldb snapshot and every write in a universaldb
//!   commit (`layout::udb`), so a running engine and ferry see each other as conflicts; a
//!   transaction's `X.ferry_kv` checks and writes commit in the same PostgreSQL transaction as
//!   its `X.kv` writes (the audit and the state change it reports land together);
//! - nothing is written under a v1 actor prefix `P` unless the store was opened for loading
//!   fixtures (`seed`, `import`), and ferry's own keys never reach `X.kv`;
//! - a logical value is never partial: rows rivet could not read are [`StoreError::Corrupt`],
//!   named by the logical key;
//! - logical order is physical order inside one actor and one key family; across v1 actors the
//!   order is rivet's (by binary id), so v1 enumeration goes through [`Store::v1_actors`],
//!   whose cursors only this store reads.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_postgres::IsolationLevel;

use super::rivet::{self as codec, KvMetadata, LayoutError, V2Stored};
use super::rivet_id::{ID_LEN, ID_STRING_LEN, RivetId};
use super::udb::{self, ConflictKind, ConflictRange, Snapshot, UdbSql};
use super::{Layout, tuple::ID_CODE};
use crate::actor::ActorId;
use crate::keys::{V1_PREFIX, V2_PREFIX};
use crate::scan::{ActorBatch, ScannedActor};
use crate::store::postgres::{Connection, PostgresStore};
use crate::store::url::PostgresUrl;
use crate::store::{
    Check, KeyRange, KeyValue, Mutation, OpenMode, OpenOptions, RangeDigest, Read, ReadResult, Store, StoreError, Txn,
    fold, limits, prefix_end,
};

const LAYOUT: &str = "rivet";
/// The table of ferry's own records beside rivet's objects.
pub const RECORDS_TABLE: &str = "ferry_kv";
/// `version` of the METADATA rows ferry writes when it loads v1 fixtures (rivet writes its
/// package version; it never reads the field back).
pub const FIXTURE_KV_VERSION: &[u8] = b"ferry-fixture";
/// How often one commit is re-run after losing to a concurrent transaction.
const COMMIT_ATTEMPTS: u32 = 40;
/// How often a group's universaldb transaction is re-run before the group gives up and each
/// of its transactions commits alone (`store::group`): a running engine writing one actor of
/// the group often must not make the others wait out forty re-runs.
const GROUP_COMMIT_ATTEMPTS: u32 = 3;
/// Actors one v1 enumeration call visits (two point reads each, in one snapshot well under
/// rivet's 5 s).
const ENUMERATION_BATCH: usize = 256;
/// Physical rows per read while assembling v1 entries (a 4 KiB SQLite chunk is two rows).
const V1_ROW_BATCH: usize = 1024;

/// Which family a logical key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V1,
    V2,
    Records,
}

fn family(key: &[u8]) -> Family {
    if key.starts_with(V1_PREFIX) {
        Family::V1
    } else if key.starts_with(V2_PREFIX) {
        Family::V2
    } else {
        Family::Records
    }
}

fn unsupported(detail: impl Into<String>) -> StoreError {
    StoreError::Unsupported { layout: LAYOUT, detail: detail.into() }
}

fn corrupt(key: &[u8], detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { key: key.to_vec(), detail: detail.to_string() }
}

/// The family of a range: both ends inside one family (an end may be the family's own
/// `prefix_end`, as a prefix scan of `v1/` or `v2/` gives).
fn range_family(range: &KeyRange) -> Result<Family, StoreError> {
    let fam = family(&range.start);
    let ok = match fam {
        Family::V1 => range.end.starts_with(V1_PREFIX) || range.end == prefix_end(V1_PREFIX),
        Family::V2 => range.end.starts_with(V2_PREFIX) || range.end == prefix_end(V2_PREFIX),
        Family::Records => {
            let (v1, v2) = (V1_PREFIX.to_vec(), V2_PREFIX.to_vec());
            let overlaps = |p: &[u8], e: &[u8]| range.start.as_slice() < e && range.end.as_slice() > p;
            !overlaps(&v1, &prefix_end(&v1)) && !overlaps(&v2, &prefix_end(&v2))
        }
    };
    if ok || range.start >= range.end {
        Ok(fam)
    } else {
        Err(unsupported(format!(
            "range [{}, {}) spans more than one key family (v1/, v2/, ferry's records)",
            crate::keys::printable(&range.start),
            crate::keys::printable(&range.end)
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// v1 bounds: logical `v1/...` keys to physical positions under the actor-KV root
// ---------------------------------------------------------------------------------------------

/// The physical position of a logical v1 bound (the start or end of a range):
/// `v1/` is the root, `prefix_end(v1/)` the end of the root, `v1/{id}/{u}` the first row of
/// any user key at or after `u`, `v1/{id}0` (the end of the actor's keys) `P ++ FF`.
fn v1_bound(logical: &[u8]) -> Result<Vec<u8>, StoreError> {
    if logical == prefix_end(V1_PREFIX).as_slice() {
        return Ok(prefix_end(&codec::v1_root()));
    }
    let rest = logical.strip_prefix(V1_PREFIX).ok_or_else(|| unsupported("not a v1 key"))?;
    if rest.is_empty() {
        return Ok(codec::v1_root());
    }
    let (id, tail) = split_actor(rest).ok_or_else(|| {
        unsupported(format!("{} does not start with a rivet actor id", crate::keys::printable(logical)))
    })?;
    match tail {
        [] => Ok(actor_prefix_raw(&id)),
        [b'/', user_key @ ..] => Ok(user_key_bound(&id, user_key)),
        // `prefix_end(v1/{id}/)`: just past every row of the actor.
        [b'0'] => {
            let mut k = actor_prefix_raw(&id);
            k.push(0xff);
            Ok(k)
        }
        _ => Err(unsupported(format!("{} is not a v1 key of the rivet layout", crate::keys::printable(logical)))),
    }
}

/// An actor named in a logical key: its 30-character id, or (for an actor whose id bytes are
/// not a valid rivet id, met while enumerating) its 19 raw bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ActorKey {
    Id(RivetId),
    Raw([u8; ID_LEN]),
}

fn split_actor(rest: &[u8]) -> Option<(ActorKey, &[u8])> {
    let id = rest.get(..ID_STRING_LEN).and_then(|s| std::str::from_utf8(s).ok()).and_then(|s| RivetId::parse(s).ok());
    if let Some(id) = id {
        return Some((ActorKey::Id(id), &rest[ID_STRING_LEN..]));
    }
    let raw: [u8; ID_LEN] = rest.get(..ID_LEN)?.try_into().ok()?;
    Some((ActorKey::Raw(raw), &rest[ID_LEN..]))
}

/// `P` of an actor key: `root ++ 40 ++ 19 id bytes`.
fn actor_prefix_raw(actor: &ActorKey) -> Vec<u8> {
    match actor {
        ActorKey::Id(id) => codec::v1_actor_prefix(id),
        ActorKey::Raw(raw) => {
            let mut k = codec::v1_root();
            k.push(ID_CODE);
            k.extend_from_slice(raw);
            k
        }
    }
}

/// `P 05 01 esc(u)`: at or before the first row of every user key at or after `u`.
fn user_key_bound(actor: &ActorKey, user_key: &[u8]) -> Vec<u8> {
    let mut k = actor_prefix_raw(actor);
    k.extend_from_slice(&[0x05, 0x01]);
    for &b in user_key {
        k.push(b);
        if b == 0 {
            k.push(0xff);
        }
    }
    k
}

fn v1_range(range: &KeyRange) -> Result<KeyRange, StoreError> {
    Ok(KeyRange::new(v1_bound(&range.start)?, v1_bound(&range.end)?))
}

/// The actor and user key of a physical row under the v1 root, as a logical key.
fn v1_row_logical(key: &[u8]) -> Result<(RivetId, Vec<u8>, codec::V1RowKind), LayoutError> {
    let id = codec::v1_actor_of_key(key)?;
    let (user_key, kind) = codec::v1_parse_row(&id, key)?;
    Ok((id, user_key, kind))
}

/// Groups physical v1 rows into entries (consecutive rows of one user key).
/// One logical v1 key and its physical rows.
type Entry = (Vec<u8>, Vec<KeyValue>);

fn group_v1_rows(rows: Vec<KeyValue>) -> Result<Vec<Entry>, StoreError> {
    let mut groups: Vec<Entry> = Vec::new();
    for (key, value) in rows {
        let logical = match v1_row_logical(&key) {
            Ok((id, user_key, _)) => codec::v1_logical_key(&id, &user_key),
            Err(e) => return Err(corrupt(&key_under_root(&key), e)),
        };
        match groups.last_mut() {
            Some((k, rows)) if *k == logical => rows.push((key, value)),
            _ => groups.push((logical, vec![(key, value)])),
        }
    }
    Ok(groups)
}

/// A name for a physical row that is not an entry row: `v1/{id}/` of its actor when the id
/// reads, else the printable physical key.
fn key_under_root(key: &[u8]) -> Vec<u8> {
    match codec::v1_actor_of_key(key) {
        Ok(id) => codec::v1_logical_key(&id, b""),
        Err(_) => key.to_vec(),
    }
}

fn decode_v1(logical: &[u8], rows: &[KeyValue]) -> Result<Vec<u8>, StoreError> {
    let (id, _) = codec::v1_split_logical(logical).map_err(|e| corrupt(logical, e))?;
    codec::v1_decode_entry(&id, rows).map(|entry| entry.value).map_err(|e| corrupt(logical, e))
}

// ---------------------------------------------------------------------------------------------
// v2 bounds
// ---------------------------------------------------------------------------------------------

fn v2_bound(logical: &[u8]) -> Result<Vec<u8>, StoreError> {
    if logical == prefix_end(V2_PREFIX).as_slice() {
        let mut s = codec::v2_subspace();
        s.push(codec::V2_KEY_PREFIX);
        return Ok(prefix_end(&s));
    }
    codec::v2_key(logical).map_err(|e| unsupported(e.to_string()))
}

fn v2_range(range: &KeyRange) -> Result<KeyRange, StoreError> {
    Ok(KeyRange::new(v2_bound(&range.start)?, v2_bound(&range.end)?))
}

/// The chunk rows `S 03 ...` of every logical v2 key in `range` (prefix ranges, as ferry
/// clears them).
fn v2_chunk_range(range: &KeyRange) -> Result<KeyRange, StoreError> {
    let map = |logical: &[u8]| -> Result<Vec<u8>, StoreError> {
        let physical = v2_bound(logical)?;
        let subspace = codec::v2_subspace().len();
        let mut k = physical[..subspace].to_vec();
        k.push(codec::V2_CHUNK_PREFIX);
        k.extend_from_slice(&physical[subspace..]);
        Ok(k)
    };
    Ok(KeyRange::new(map(&range.start)?, map(&range.end)?))
}

fn key_range(key: &[u8]) -> KeyRange {
    let mut end = key.to_vec();
    end.push(0);
    KeyRange::new(key.to_vec(), end)
}

// ---------------------------------------------------------------------------------------------
// logical reads inside one snapshot
// ---------------------------------------------------------------------------------------------

/// Logical reads of `X.kv` inside one snapshot.
struct Reader<'a, 'c> {
    snap: &'a Snapshot<'c>,
    sql: &'a UdbSql,
    conn: &'a Connection,
    /// A read lost a race (a serialization failure inside a commit's snapshot): the commit is
    /// re-run from its reads, not reported.
    lost_race: std::sync::atomic::AtomicBool,
    /// The first error that is not only the aborted transaction's: reads sent at once each
    /// fail once one does, and the one to report is the cause.
    cause: Mutex<Option<StoreError>>,
}

impl Reader<'_, '_> {
    fn pg(&self, e: tokio_postgres::Error) -> StoreError {
        if udb::lost_race(&e) {
            self.lost_race.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let aborted = udb::aborted_earlier(&e);
        let err = self.conn.err(e);
        if !aborted {
            // A poisoned lock only means a panic elsewhere while holding an error; keep going.
            self.cause.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| err.clone());
        }
        err
    }

    /// The first error of the reads that was not only the aborted transaction's.
    fn cause(&self) -> Option<StoreError> {
        self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn answer(&self, read: &Read) -> Result<ReadResult, StoreError> {
        match read {
            Read::Get(key) => self.get(key).await.map(ReadResult::Value),
            Read::Scan { range, limit } => self.scan(range, *limit, true).await.map(ReadResult::Rows),
        }
    }

    /// The answers to `reads`, all sent at once (one round trip where each is one statement);
    /// on an error, its cause ([`Reader::cause`]).
    async fn answer_all<'r>(&self, reads: impl Iterator<Item = &'r Read>) -> Result<Vec<ReadResult>, StoreError> {
        let answers = futures::future::join_all(reads.map(|read| self.answer(read))).await;
        answers.into_iter().collect::<Result<Vec<_>, _>>().map_err(|e| match e {
            // A verdict on the data, not the server's: it stands.
            StoreError::Corrupt { .. } => e,
            e => self.cause().unwrap_or(e),
        })
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match family(key) {
            Family::V1 => {
                let (id, user_key) = codec::v1_split_logical(key).map_err(|e| unsupported(e.to_string()))?;
                let range = codec::v1_entry_range(&id, &user_key);
                let rows = self.snap.scan(self.sql, &range, usize::MAX).await.map_err(|e| self.pg(e))?;
                if rows.is_empty() {
                    return Ok(None);
                }
                decode_v1(key, &rows).map(Some)
            }
            Family::V2 => {
                let physical = codec::v2_key(key).map_err(|e| unsupported(e.to_string()))?;
                match self.snap.get(self.sql, &physical).await.map_err(|e| self.pg(e))? {
                    None => Ok(None),
                    Some(stored) => self.v2_value(key, &stored).await.map(Some),
                }
            }
            Family::Records => Err(unsupported("ferry's records are not in X.kv")),
        }
    }

    /// The logical value of a stored v2 value (chunk rows read when it is chunked).
    async fn v2_value(&self, logical: &[u8], stored: &[u8]) -> Result<Vec<u8>, StoreError> {
        let stored = V2Stored::decode(stored).map_err(|e| corrupt(logical, e))?;
        let chunks = match &stored {
            V2Stored::Inline(_) => Vec::new(),
            V2Stored::Chunked { chunk_count, .. } => {
                let first = codec::v2_chunk_key(logical, 0).map_err(|e| corrupt(logical, e))?;
                let prefix = &first[..first.len() - 4];
                let rows = self
                    .snap
                    .scan(self.sql, &KeyRange::prefix(prefix), *chunk_count as usize + 1)
                    .await
                    .map_err(|e| self.pg(e))?;
                // Chunk keys are `prefix ++ u32 BE index`: in index order, and any other row
                // under the prefix is not a chunk of this value.
                let expected: Vec<Vec<u8>> = stored.chunk_keys(logical).map_err(|e| corrupt(logical, e))?;
                let mut values = Vec::with_capacity(rows.len());
                for ((key, value), want) in rows.into_iter().zip(&expected) {
                    if key != *want {
                        return Err(corrupt(logical, "a chunk row of the value is missing"));
                    }
                    values.push(value);
                }
                values
            }
        };
        stored.assemble(&chunks).map_err(|e| corrupt(logical, e))
    }

    /// Up to `limit` logical rows of `range` (values read when `values`).
    async fn scan(&self, range: &KeyRange, limit: usize, values: bool) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        match range_family(range)? {
            Family::V1 => self.v1_scan(range, limit, values).await,
            Family::V2 => {
                let physical = v2_range(range)?;
                let mut out = Vec::new();
                if values {
                    for (key, stored) in self.snap.scan(self.sql, &physical, limit).await.map_err(|e| self.pg(e))? {
                        let logical = codec::v2_logical_key(&key).map_err(|e| corrupt(&key, e))?;
                        let value = self.v2_value(&logical, &stored).await?;
                        out.push((logical, value));
                    }
                } else {
                    for key in self.snap.scan_keys(self.sql, &physical, limit).await.map_err(|e| self.pg(e))? {
                        out.push((codec::v2_logical_key(&key).map_err(|e| corrupt(&key, e))?, Vec::new()));
                    }
                }
                Ok(out)
            }
            Family::Records => Err(unsupported("ferry's records are not in X.kv")),
        }
    }

    /// Logical v1 rows: physical rows read in batches and assembled into entries; an entry cut
    /// by a batch is read again, whole, by the next one.
    async fn v1_scan(
        &self,
        range: &KeyRange,
        limit: usize,
        values: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let physical = v1_range(range)?;
        let mut out = Vec::new();
        let mut cursor = physical.start.clone();
        let mut batch = V1_ROW_BATCH.min(limit.saturating_mul(2).saturating_add(2));
        while out.len() < limit && cursor < physical.end {
            let window = KeyRange::new(cursor.clone(), physical.end.clone());
            let rows = if values {
                self.snap.scan(self.sql, &window, batch).await.map_err(|e| self.pg(e))?
            } else {
                let keys = self.snap.scan_keys(self.sql, &window, batch).await.map_err(|e| self.pg(e))?;
                keys.into_iter().map(|k| (k, Vec::new())).collect()
            };
            let full = rows.len() == batch;
            let mut groups = group_v1_rows(rows)?;
            if full {
                if groups.len() == 1 {
                    // One entry holds more rows than a batch: read it with a bigger one.
                    batch = batch.saturating_mul(2);
                    continue;
                }
                // The last entry may be cut off: start there next time.
                let (_, last_rows) = groups.pop().expect("more than one group");
                cursor = last_rows[0].0.clone();
            } else {
                cursor = physical.end.clone();
            }
            for (logical, rows) in groups {
                if out.len() == limit {
                    break;
                }
                let value = if values { decode_v1(&logical, &rows)? } else { Vec::new() };
                out.push((logical, value));
            }
        }
        Ok(out)
    }

    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        match range_family(range)? {
            Family::V1 => {
                let key = self.snap.first_key(self.sql, &v1_range(range)?).await.map_err(|e| self.pg(e))?;
                key.map(|k| match v1_row_logical(&k) {
                    Ok((id, user_key, _)) => Ok(codec::v1_logical_key(&id, &user_key)),
                    Err(e) => Err(corrupt(&key_under_root(&k), e)),
                })
                .transpose()
            }
            Family::V2 => {
                let key = self.snap.first_key(self.sql, &v2_range(range)?).await.map_err(|e| self.pg(e))?;
                key.map(|k| codec::v2_logical_key(&k).map_err(|e| corrupt(&k, e))).transpose()
            }
            Family::Records => Err(unsupported("ferry's records are not in X.kv")),
        }
    }

    /// The digest of the logical rows of `range` (section 1's [`RangeDigest`]).
    async fn digest(&self, range: &KeyRange) -> Result<u128, StoreError> {
        let mut digest = RangeDigest::new();
        let mut cursor = range.clone();
        loop {
            let rows = self.scan(&cursor, 512, true).await?;
            let done = rows.len() < 512;
            for (key, value) in &rows {
                digest.update(key, value);
            }
            match rows.last() {
                Some((key, _)) if !done => cursor = cursor.after(key),
                _ => return Ok(digest.finish()),
            }
        }
    }

    /// Whether a check on `X.kv` holds in this snapshot (a corrupt row fails it).
    async fn holds(&self, check: &Check) -> Result<bool, StoreError> {
        let result = match check {
            Check::Value { key, expected } => self.get(key).await.map(|actual| actual == *expected),
            Check::RangeDigest { range, expected } => self.digest(range).await.map(|d| d == *expected),
        };
        match result {
            Err(StoreError::Corrupt { .. }) => Ok(false),
            other => other,
        }
    }

    /// rivet's enumeration (DESIGN.md section 7): skip-scan the root, read the id, probe the
    /// SQLite range, jump to `P ++ FF`.
    async fn v1_actors(&self, range: &KeyRange, limit: usize) -> Result<ActorBatch, StoreError> {
        let filter = id_filter(range)?;
        let mut cursor = match v1_bound(&range.start) {
            Ok(k) => k,
            // `v1/{part of an id}`: a prefix filter; rivet's order is not the ids' text order.
            Err(_) if filter.is_some() => codec::v1_root(),
            Err(e) => return Err(e),
        };
        let root = codec::v1_root();
        let end = prefix_end(&root);
        let mut batch = ActorBatch::default();
        for _ in 0..limit.min(ENUMERATION_BATCH) {
            let window = KeyRange::new(cursor.clone(), end.clone());
            let Some(key) = self.snap.first_key(self.sql, &window).await.map_err(|e| self.pg(e))? else {
                batch.next = None;
                return Ok(batch);
            };
            let rest = &key[root.len()..];
            let raw: Option<[u8; ID_LEN]> = match rest.split_first() {
                Some((&ID_CODE, id)) => id.get(..ID_LEN).and_then(|b| b.try_into().ok()),
                _ => None,
            };
            let Some(raw) = raw else {
                // A row under the root that is no actor's: step past it.
                cursor = key_range(&key).end;
                continue;
            };
            let actor = match RivetId::from_bytes(&raw) {
                Ok(id) => ActorKey::Id(id),
                Err(_) => ActorKey::Raw(raw),
            };
            let prefix = actor_prefix_raw(&actor);
            cursor = prefix.clone();
            cursor.push(0xff);
            let (name, id) = match &actor {
                ActorKey::Id(id) => (id.to_string().into_bytes(), Ok(id.to_actor())),
                ActorKey::Raw(raw) => (raw.to_vec(), ActorId::from_bytes(raw)),
            };
            let mut after = V1_PREFIX.to_vec();
            after.extend_from_slice(&name);
            after.push(b'0');
            batch.next = Some(after);
            if filter.as_ref().is_some_and(|f| !name.starts_with(f)) {
                continue;
            }
            let sqlite = user_key_bound(&actor, &[codec::V1_SQLITE_PREFIX]);
            let sqlite = KeyRange::prefix(&sqlite);
            let has = self.snap.first_key(self.sql, &sqlite).await.map_err(|e| self.pg(e))?.is_some();
            batch.actors.push(ScannedActor { raw: name, id, has_sqlite: Some(has) });
        }
        Ok(batch)
    }
}

/// The id prefix a v1 range filters on: `None` for the whole of `v1/`; for
/// `[v1/{p}, prefix_end(v1/{p}))`, `p` (ids are ASCII, so `prefix_end` only bumped the last
/// byte).
fn id_filter(range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
    if range.end == prefix_end(V1_PREFIX) {
        return Ok(None);
    }
    let mut p = range.end.strip_prefix(V1_PREFIX).ok_or_else(|| unsupported("not a v1 range"))?.to_vec();
    match p.last_mut() {
        Some(last) if *last > 0 => *last -= 1,
        _ => return Err(unsupported("not a v1 id-prefix range")),
    }
    Ok(Some(p))
}

// ---------------------------------------------------------------------------------------------
// writes: logical mutations to physical ones, with their conflict ranges
// ---------------------------------------------------------------------------------------------

/// One logical transaction split by where it goes.
#[derive(Default)]
struct Plan {
    /// Checks on `X.kv`, with their index in the logical transaction.
    kv_checks: Vec<(usize, Check)>,
    /// Checks on `X.ferry_kv`, with their index.
    record_checks: Vec<(usize, Check)>,
    kv_writes: Vec<Mutation>,
    record_writes: Vec<Mutation>,
    conflicts: Vec<ConflictRange>,
}

impl Plan {
    fn touches_kv(&self) -> bool {
        !self.kv_checks.is_empty() || !self.kv_writes.is_empty()
    }
}

/// The ranges a check on `X.kv` reads.
fn read_ranges(check: &Check) -> Result<Vec<KeyRange>, StoreError> {
    let (range, fam) = match check {
        Check::Value { key, .. } => match family(key) {
            Family::V1 => {
                let (id, user_key) = codec::v1_split_logical(key).map_err(|e| unsupported(e.to_string()))?;
                return Ok(vec![codec::v1_entry_range(&id, &user_key)]);
            }
            _ => (key_range(key), Family::V2),
        },
        Check::RangeDigest { range, .. } => (range.clone(), range_family(range)?),
    };
    match fam {
        Family::V1 => Ok(vec![v1_range(&range)?]),
        _ => {
            let physical = v2_range(&range)?;
            let chunks = match check {
                Check::Value { key, .. } => {
                    let first = codec::v2_chunk_key(key, 0).map_err(|e| unsupported(e.to_string()))?;
                    KeyRange::prefix(&first[..first.len() - 4])
                }
                Check::RangeDigest { .. } => v2_chunk_range(&range)?,
            };
            Ok(vec![physical, chunks])
        }
    }
}

/// The v2 space of one actor a physical key lies in: `S 02 {id}/` or `S 03 02 {id}/`.
fn actor_space(key: &[u8]) -> Option<&[u8]> {
    let subspace = codec::v2_subspace();
    let rest = key.strip_prefix(subspace.as_slice())?;
    let skip = match rest {
        [codec::V2_KEY_PREFIX, ..] => 1,
        [codec::V2_CHUNK_PREFIX, codec::V2_KEY_PREFIX, ..] => 2,
        _ => return None,
    };
    let len = subspace.len() + skip + ID_STRING_LEN + 1;
    (key.len() >= len && key[len - 1] == b'/').then(|| &key[..len])
}

/// Write ranges merged per actor's v2 space: a finalize writes one PIDX row per page, and one
/// conflict row per page would cost the exclusion index as much as the writes. A merged range
/// also covers keys between the written ones; inside an actor's v2 space under migration any
/// concurrent writer is a conflict anyway, so the extra cover costs nothing real.
fn coalesce(mut ranges: Vec<KeyRange>) -> Vec<KeyRange> {
    ranges.sort_by(|a, b| a.start.cmp(&b.start));
    let mut out: Vec<KeyRange> = Vec::with_capacity(ranges.len().min(16));
    for r in ranges {
        if let Some(last) = out.last_mut() {
            let same_space = actor_space(&last.start).is_some() && actor_space(&last.start) == actor_space(&r.start);
            if same_space || r.start <= last.end {
                if r.end > last.end {
                    last.end = r.end;
                }
                continue;
            }
        }
        out.push(r);
    }
    out
}

struct Planner {
    v1_writes: bool,
    now_ms: i64,
}

impl Planner {
    fn plan(&self, txn: Txn) -> Result<Plan, StoreError> {
        let mut plan = Plan::default();
        for (index, check) in txn.checks.into_iter().enumerate() {
            let key = match &check {
                Check::Value { key, .. } => key.clone(),
                Check::RangeDigest { range, .. } => {
                    range_family(range)?;
                    range.start.clone()
                }
            };
            if family(&key) == Family::Records {
                plan.record_checks.push((index, check));
            } else {
                for range in read_ranges(&check)? {
                    plan.conflicts.push(ConflictRange { range, kind: ConflictKind::Read });
                }
                plan.kv_checks.push((index, check));
            }
        }
        for m in txn.mutations {
            let fam = match &m {
                Mutation::Set { key, .. } | Mutation::Clear { key } => family(key),
                Mutation::ClearRange { range } => range_family(range)?,
            };
            match fam {
                Family::Records => plan.record_writes.push(m),
                Family::V2 => self.v2_write(m, &mut plan.kv_writes)?,
                Family::V1 => self.v1_write(m, &mut plan.kv_writes)?,
            }
        }
        let writes = plan.kv_writes.iter().map(|m| match m {
            Mutation::Set { key, .. } | Mutation::Clear { key } => key_range(key),
            Mutation::ClearRange { range } => range.clone(),
        });
        for range in coalesce(writes.collect()) {
            plan.conflicts.push(ConflictRange { range, kind: ConflictKind::Write });
        }
        Ok(plan)
    }

    fn v2_write(&self, m: Mutation, out: &mut Vec<Mutation>) -> Result<(), StoreError> {
        let bad = |e: LayoutError| unsupported(e.to_string());
        match m {
            Mutation::Set { key, value } => {
                for (k, v) in codec::v2_encode_value(&key, &value).map_err(bad)? {
                    out.push(Mutation::Set { key: k, value: v });
                }
            }
            Mutation::Clear { key } => {
                out.push(Mutation::Clear { key: codec::v2_key(&key).map_err(bad)? });
                let first = codec::v2_chunk_key(&key, 0).map_err(bad)?;
                out.push(Mutation::ClearRange { range: KeyRange::prefix(&first[..first.len() - 4]) });
            }
            Mutation::ClearRange { range } => {
                out.push(Mutation::ClearRange { range: v2_range(&range)? });
                out.push(Mutation::ClearRange { range: v2_chunk_range(&range)? });
            }
        }
        Ok(())
    }

    /// v1 rows are written only when loading fixtures, as pegboard's `put` writes them: the
    /// entry cleared, then its METADATA and DATA rows.
    fn v1_write(&self, m: Mutation, out: &mut Vec<Mutation>) -> Result<(), StoreError> {
        if !self.v1_writes {
            return Err(unsupported("ferry never writes v1 rows outside `seed` and `import`"));
        }
        let split = |key: &[u8]| codec::v1_split_logical(key).map_err(|e| unsupported(e.to_string()));
        match m {
            Mutation::Set { key, value } => {
                let (id, user_key) = split(&key)?;
                out.push(Mutation::ClearRange { range: codec::v1_entry_range(&id, &user_key) });
                let metadata = KvMetadata { version: FIXTURE_KV_VERSION.to_vec(), update_ts: self.now_ms };
                for (k, v) in codec::v1_encode_entry(&id, &user_key, &value, &metadata) {
                    out.push(Mutation::Set { key: k, value: v });
                }
            }
            Mutation::Clear { key } => {
                let (id, user_key) = split(&key)?;
                out.push(Mutation::ClearRange { range: codec::v1_entry_range(&id, &user_key) });
            }
            Mutation::ClearRange { range } => out.push(Mutation::ClearRange { range: v1_range(&range)? }),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// the store
// ---------------------------------------------------------------------------------------------

/// The logical store over rivet's universaldb rows in one PostgreSQL schema.
pub struct RivetStore {
    conn: Connection,
    schema: String,
    sql: UdbSql,
    /// Writes of physical rows to `X.kv` (its batched statements; never its reads, which go
    /// through snapshots).
    kv: PostgresStore,
    /// ferry's records, `X.ferry_kv`.
    records: PostgresStore,
    v1_writes: bool,
    last_gc: Mutex<Instant>,
    /// The most a commit's snapshot may live before it sends its conflict rows
    /// ([`udb::TRANSACTION_LIMIT`]).
    deadline: Duration,
}

impl RivetStore {
    /// The same store with another commit deadline (tests: a deadline already passed shows
    /// what a transaction that outlived rivet's limit does, without waiting for it).
    #[cfg(feature = "test-support")]
    pub fn with_deadline(mut self, deadline: Duration) -> RivetStore {
        self.deadline = deadline;
        self
    }

    /// Connects to `url` (`postgres://...?schema=X`, default schema `public`) and checks that
    /// rivet's objects are there (or, for a rehearsal, creates them in an empty schema); creates
    /// `X.ferry_kv` when missing.
    pub async fn connect(url: PostgresUrl, opts: &OpenOptions) -> Result<RivetStore, StoreError> {
        let schema = url.schema.clone().unwrap_or_else(|| "public".into());
        let conn = Connection::open(&url, opts)?;
        let store = RivetStore {
            kv: PostgresStore::on_table(conn.clone(), &format!("{schema}.kv")),
            records: PostgresStore::on_table(conn.clone(), &format!("{schema}.{RECORDS_TABLE}")),
            sql: UdbSql::new(&schema),
            conn,
            schema,
            v1_writes: opts.v1_writes,
            last_gc: Mutex::new(Instant::now()),
            deadline: udb::TRANSACTION_LIMIT,
        };
        if opts.create_rivet_schema {
            if opts.mode != OpenMode::Create {
                return Err(StoreError::Failed {
                    backend: "postgres",
                    message: "creating rivet's objects needs a command that loads data (seed)".into(),
                });
            }
            store.create_rivet_objects().await?;
        }
        store.check_rivet_objects().await?;
        store.ensure_records_table().await?;
        Ok(store)
    }

    async fn create_rivet_objects(&self) -> Result<(), StoreError> {
        let client = self.conn.client().await?;
        let kv = format!("{}.kv", self.schema);
        let exists: bool =
            client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&kv]).await.map_err(|e| self.conn.err(e))?.get(0);
        if exists {
            return Err(StoreError::Failed {
                backend: "postgres",
                message: format!(
                    "{kv} already exists: --create-rivet-schema only creates rivet's objects in an empty schema \
                     (ferry never alters a rivet deployment's own objects)"
                ),
            });
        }
        client.batch_execute(&udb::rivet_schema_ddl(&self.schema)).await.map_err(|e| self.conn.err(e))
    }

    async fn check_rivet_objects(&self) -> Result<(), StoreError> {
        let client = self.conn.client().await?;
        let missing = udb::missing_objects(&client, &self.schema).await.map_err(|e| self.conn.err(e))?;
        if missing.is_empty() {
            return Ok(());
        }
        Err(StoreError::Missing {
            url: self.conn.described.clone(),
            what: format!(
                "schema {} lacks rivet's universaldb objects ({}); --layout rivet runs on a rivet engine's \
                 database and never creates them (a rehearsal: seed --layout rivet --create-rivet-schema)",
                self.schema,
                missing.join(", ")
            ),
        })
    }

    /// `X.ferry_kv` is ferry's: created when missing (checked first, so a role that may only
    /// read runs every read command).
    async fn ensure_records_table(&self) -> Result<(), StoreError> {
        let client = self.conn.client().await?;
        let table = format!("{}.{RECORDS_TABLE}", self.schema);
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .map_err(|e| self.conn.err(e))?
            .get(0);
        if exists {
            return Ok(());
        }
        drop(client);
        self.records.create_table(Some(&self.schema), &table).await
    }

    fn reader<'a, 'c>(&'a self, snap: &'a Snapshot<'c>) -> Reader<'a, 'c> {
        Reader { snap, sql: &self.sql, conn: &self.conn, lost_race: Default::default(), cause: Mutex::default() }
    }

    /// Ends a read-only snapshot, keeping what was read (or the read's own error).
    async fn end<T>(&self, snap: Snapshot<'_>, out: Result<T, StoreError>) -> Result<T, StoreError> {
        let ended = snap.end().await.map_err(|e| self.conn.err(e));
        let out = out?;
        ended.map(|()| out)
    }

    /// One attempt at the plans of transactions none of whose checks reads another's writes,
    /// as one universaldb transaction: every check of every plan, on `X.kv` and on the records,
    /// read in its snapshot at once (one round trip), then the conflict rows and the writes of
    /// the plans whose checks held, sent at once (one more), then `COMMIT`. Each plan's result,
    /// in order: its first failed check (`X.kv`'s before the records', as checking them one by
    /// one would report), or `Ok`.
    async fn try_commit(&self, plans: &[&Plan]) -> Result<Vec<Result<(), StoreError>>, Attempt> {
        // The snapshot that reads the checks is the transaction that commits: ferry's commits
        // then also serialize against each other (SERIALIZABLE; two that read and write one
        // key cannot both commit), which rivet's two-connection form does not guarantee when
        // a reader's snapshot starts between a writer's commit version and its COMMIT.
        let mut client = self.conn.client().await.map_err(Attempt::Store)?;
        let snap = udb::snapshot_at(&mut client, &self.sql, IsolationLevel::Serializable).await.map_err(Attempt::Pg)?;
        let (start_version, began) = (snap.start_version, snap.began);
        let verdicts = self.failed_checks(&snap, plans).await?;
        let passed: Vec<&Plan> = plans.iter().zip(&verdicts).filter(|(_, v)| v.is_ok()).map(|(p, _)| *p).collect();
        if passed.iter().all(|p| p.kv_writes.is_empty() && p.record_writes.is_empty()) {
            // Checks only (or none held), all in one snapshot: nothing to commit.
            snap.end().await.map_err(Attempt::Pg)?;
            return Ok(verdicts);
        }
        if began.elapsed() >= self.deadline {
            // Too old to send conflict rows: a write that raced it may have had its own rows
            // collected already (`udb::CONFLICT_RETENTION`). Rolled back (the snapshot is
            // dropped), nothing written; a later attempt reads afresh.
            return Err(Attempt::Store(past_deadline(self.deadline)));
        }
        let tx = snap.tx;
        let conflicts: Vec<ConflictRange> = passed.iter().flat_map(|p| p.conflicts.iter().cloned()).collect();
        // Prepared first (a round trip only on a session's first commit), so the statements
        // below go out on their first poll in the order written: conflict rows before the
        // writes, as DESIGN.md section 7 orders a commit (a write's row locks taken before its
        // conflict rows could wait on an engine transaction that waits on them).
        udb::prepare_commit(&tx, &self.sql).await.map_err(Attempt::Pg)?;
        self.kv.prepare_writes(&tx).await.map_err(Attempt::Pg)?;
        self.records.prepare_writes(&tx).await.map_err(Attempt::Pg)?;
        // Three tables, so no write's effect depends on another's order. Every one is awaited:
        // once one fails the transaction is aborted and the others fail for that alone, and
        // the first one's cause is the error to see (a lost race is re-run).
        let (conflicts, kv, records) = futures::join!(
            udb::insert_conflicts(&tx, &self.sql, start_version, &conflicts),
            self.kv.apply(&tx, passed.iter().flat_map(|p| &p.kv_writes)),
            self.records.apply(&tx, passed.iter().flat_map(|p| &p.record_writes)),
        );
        udb::first_cause([conflicts, kv, records]).map_err(Attempt::Pg)?;
        tx.commit().await.map_err(Attempt::Pg)?;
        metrics::counter!(crate::metrics::STORE_COMMITS).increment(1);
        Ok(verdicts)
    }

    /// Each plan's first check that does not hold in `snap`, as a conflict; every check of
    /// every plan read at once.
    async fn failed_checks(
        &self,
        snap: &Snapshot<'_>,
        plans: &[&Plan],
    ) -> Result<Vec<Result<(), StoreError>>, Attempt> {
        let reader = self.reader(snap);
        let record_checks: Vec<Vec<Check>> =
            plans.iter().map(|p| p.record_checks.iter().map(|(_, c)| c.clone()).collect()).collect();
        // Reads only, all in one snapshot: the order they run in changes no answer.
        let (kv, records) = futures::join!(
            futures::future::join_all(plans.iter().map(|p| Self::failed_kv_check(&reader, p))),
            self.records.failed_checks(&snap.tx, record_checks.iter().map(Vec::as_slice)),
        );
        // Once any read failed at the server the transaction is aborted: no verdict of the
        // others may be trusted (a plan whose checks "held" could not commit), and the error
        // to see is the cause. A lost race first (re-run), then the records' reads' own (sent
        // behind the first reads on `X.kv`, they fail alone for a cause of their own), then
        // the reads on `X.kv`.
        if reader.lost_race.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Attempt::LostRace);
        }
        let records = match records {
            Err(e) if !udb::aborted_earlier(&e) => return Err(Attempt::Pg(e)),
            other => other,
        };
        if let Some(cause) = reader.cause() {
            return Err(Attempt::Store(cause));
        }
        let kv = kv.into_iter().collect::<Result<Vec<_>, _>>().map_err(Attempt::Store)?;
        let records = records.map_err(Attempt::Pg)?;
        Ok(plans
            .iter()
            .zip(kv.into_iter().zip(records))
            .map(|(plan, verdict)| match verdict {
                (Some(failed), _) => Err(failed),
                (None, Some((index, _))) => {
                    let (orig, check) = &plan.record_checks[index];
                    Err(conflict(*orig, check))
                }
                (None, None) => Ok(()),
            })
            .collect())
    }

    /// The plan's first check on `X.kv` that does not hold in the reader's snapshot, as a
    /// conflict; every check read at once. (A read the server failed is judged by the caller,
    /// [`RivetStore::failed_checks`], from the reader: here only the verdicts count.)
    async fn failed_kv_check(reader: &Reader<'_, '_>, plan: &Plan) -> Result<Option<StoreError>, StoreError> {
        let verdicts = futures::future::join_all(plan.kv_checks.iter().map(|(_, check)| reader.holds(check))).await;
        for ((index, check), verdict) in plan.kv_checks.iter().zip(verdicts) {
            if !verdict? {
                return Ok(Some(conflict(*index, check)));
            }
        }
        Ok(None)
    }

    /// Runs `attempt` until it ends other than by losing a race, re-running it whole (its
    /// reads with it) at most `attempts` times after a random pause that grows.
    async fn rerun<T, Fut>(&self, attempts: u32, mut attempt: impl FnMut() -> Fut) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        udb::collect_garbage(&self.conn, &self.sql, &self.last_gc).await;
        let mut tries = 0u32;
        loop {
            match attempt().await {
                Ok(done) => return Ok(done),
                // Lost a race: re-run from the reads.
                Err(Attempt::LostRace) => {}
                Err(Attempt::Pg(e)) if udb::lost_race(&e) => {}
                Err(Attempt::Pg(e)) => return Err(self.conn.err(e)),
                Err(Attempt::Store(e)) => return Err(e),
            }
            if tries >= attempts {
                return Err(StoreError::Unavailable {
                    backend: "postgres",
                    message: format!("a commit lost to concurrent transactions {} times in a row", attempts + 1),
                });
            }
            tries += 1;
            metrics::counter!("ferry_udb_commit_retries_total").increment(1);
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..=(2u64 << tries.min(6))))).await;
        }
    }

    /// The plans of a run of independent transactions, each one's result in order: ferry's
    /// records alone go to `X.ferry_kv`'s own group commit; anything on `X.kv` commits in one
    /// universaldb transaction, re-run at most [`GROUP_COMMIT_ATTEMPTS`] times (then every
    /// transaction of the run gets the error, and `store::group` commits each alone).
    async fn commit_plans(&self, plans: Vec<Plan>) -> Vec<Result<(), StoreError>> {
        if !plans.iter().any(Plan::touches_kv) {
            let txns = plans
                .into_iter()
                .map(|p| Txn {
                    checks: p.record_checks.into_iter().map(|(_, c)| c).collect(),
                    mutations: p.record_writes,
                })
                .collect();
            return self.records.commit_many(txns).await;
        }
        let refs: Vec<&Plan> = plans.iter().collect();
        match self.rerun(GROUP_COMMIT_ATTEMPTS, || self.try_commit(&refs)).await {
            Ok(each) => each,
            Err(e) => vec![Err(e); plans.len()],
        }
    }

    fn planner(&self) -> Planner {
        Planner { v1_writes: self.v1_writes, now_ms: crate::clock::Clock::now_ms(&crate::clock::SystemClock) }
    }
}

/// Why one commit attempt stopped.
enum Attempt {
    Pg(tokio_postgres::Error),
    Store(StoreError),
    /// A read of the commit's snapshot lost to a concurrent transaction.
    LostRace,
}

/// A commit whose checks outlived rivet's transaction limit: transient (the job is retried, its
/// reads done afresh), as rivet's driver fails such a transaction as too old.
fn past_deadline(deadline: Duration) -> StoreError {
    StoreError::Unavailable {
        backend: "postgres",
        message: format!(
            "a universaldb transaction's checks took over {} ms, rivet's transaction limit: rolled back before its \
             conflict rows, nothing written",
            deadline.as_millis()
        ),
    }
}

fn conflict(index: usize, check: &Check) -> StoreError {
    let key = match check {
        Check::Value { key, .. } => key.clone(),
        Check::RangeDigest { range, .. } => range.start.clone(),
    };
    StoreError::Conflict { index, key }
}

#[async_trait]
impl Store for RivetStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if family(key) == Family::Records {
            return self.records.get(key).await;
        }
        let mut client = self.conn.client().await?;
        let snap = udb::snapshot(&mut client, &self.sql).await.map_err(|e| self.conn.err(e))?;
        let out = self.reader(&snap).get(key).await;
        self.end(snap, out).await
    }

    async fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        if range_family(range)? == Family::Records {
            return self.records.scan(range, limit).await;
        }
        let mut client = self.conn.client().await?;
        let snap = udb::snapshot(&mut client, &self.sql).await.map_err(|e| self.conn.err(e))?;
        let out = self.reader(&snap).scan(range, limit, true).await;
        self.end(snap, out).await
    }

    async fn first_key(&self, range: &KeyRange) -> Result<Option<Vec<u8>>, StoreError> {
        if range_family(range)? == Family::Records {
            return self.records.first_key(range).await;
        }
        let mut client = self.conn.client().await?;
        let snap = udb::snapshot(&mut client, &self.sql).await.map_err(|e| self.conn.err(e))?;
        let out = self.reader(&snap).first_key(range).await;
        self.end(snap, out).await
    }

    async fn scan_keys(&self, range: &KeyRange, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        if range_family(range)? == Family::Records {
            return self.records.scan_keys(range, limit).await;
        }
        let mut client = self.conn.client().await?;
        let snap = udb::snapshot(&mut client, &self.sql).await.map_err(|e| self.conn.err(e))?;
        let out = self.reader(&snap).scan(range, limit, false).await;
        let rows = self.end(snap, out).await?;
        Ok(rows.into_iter().map(|(k, _)| k).collect())
    }

    async fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        limits::check_txn(&txn)?;
        let plan = self.planner().plan(txn)?;
        if !plan.touches_kv() {
            let checks = plan.record_checks.into_iter().map(|(_, c)| c).collect();
            return self.records.commit(Txn { checks, mutations: plan.record_writes }).await;
        }
        let one = [&plan];
        let mut verdicts = self.rerun(COMMIT_ATTEMPTS, || self.try_commit(&one)).await?;
        // One verdict per plan.
        verdicts.pop().unwrap_or(Ok(()))
    }

    /// The transactions of each run of [`limits::plan_group`] whose checks read none of the
    /// others' writes in one universaldb transaction ([`RivetStore::try_commit`]); a run
    /// where one does is committed one transaction at a time.
    async fn commit_many(&self, txns: Vec<Txn>) -> Vec<Result<(), StoreError>> {
        let group = limits::plan_group(&txns);
        let mut results = limits::result_slots(txns.len(), group.refused);
        let independent: Vec<bool> =
            group.runs.iter().map(|run| fold::checks_independent(run.iter().map(|&i| &txns[i]))).collect();
        let mut txns: Vec<Option<Txn>> = txns.into_iter().map(Some).collect();
        for (run, independent) in group.runs.iter().zip(independent) {
            let picked: Vec<(usize, Txn)> = run.iter().filter_map(|&i| txns[i].take().map(|t| (i, t))).collect();
            if !independent || picked.len() < 2 {
                for (i, txn) in picked {
                    results[i] = Some(self.commit(txn).await);
                }
                continue;
            }
            let planner = self.planner();
            let (mut indexes, mut plans) = (Vec::with_capacity(picked.len()), Vec::with_capacity(picked.len()));
            for (i, txn) in picked {
                match planner.plan(txn) {
                    Ok(plan) => {
                        indexes.push(i);
                        plans.push(plan);
                    }
                    Err(e) => results[i] = Some(Err(e)),
                }
            }
            for (i, r) in indexes.into_iter().zip(self.commit_plans(plans).await) {
                results[i] = Some(r);
            }
        }
        limits::group_results(results, "postgres")
    }

    /// The reads of `X.kv` in one snapshot (one `nextval`, not one per read); the reads of
    /// ferry's records in one batched read of `X.ferry_kv`.
    async fn read_many(&self, reads: &[Read]) -> Result<Vec<ReadResult>, StoreError> {
        let is_record = |r: &Read| match r {
            Read::Get(key) => Ok(family(key) == Family::Records),
            Read::Scan { range, .. } => range_family(range).map(|f| f == Family::Records),
        };
        let mut records = Vec::new();
        let mut kv = Vec::new();
        for (i, read) in reads.iter().enumerate() {
            if is_record(read)? { records.push(i) } else { kv.push(i) }
        }
        // The records on a connection of their own, while the snapshot on `X.kv` reads.
        let record_answers = async {
            if records.is_empty() {
                return Ok(Vec::new());
            }
            let batch: Vec<Read> = records.iter().map(|&i| reads[i].clone()).collect();
            self.records.read_many(&batch).await
        };
        let kv_answers = async {
            if kv.is_empty() {
                return Ok(Vec::new());
            }
            let mut client = self.conn.client().await?;
            let snap = udb::snapshot(&mut client, &self.sql).await.map_err(|e| self.conn.err(e))?;
            let answers = self.reader(&snap).answer_all(kv.iter().map(|&i| &reads[i])).await;
            self.end(snap, answers).await
        };
        let (record_answers, kv_answers) = futures::join!(record_answers, kv_answers);
        let mut out: Vec<Option<ReadResult>> = vec![None; reads.len()];
        for (i, answer) in records.iter().zip(record_answers?).chain(kv.iter().zip(kv_answers?)) {
            out[*i] = Some(answer);
        }
        // Every index is in exactly one of the two partitions, each answered in full.
        Ok(out.into_iter().map(|a| a.expect("every read answered")).collect())
    }

    fn layout(&self) -> Layout {
        Layout::Rivet
    }

    async fn v1_actors(&self, range: &KeyRange, limit: usize) -> Result<ActorBatch, StoreError> {
        let mut client = self.conn.client().await?;
        let snap = udb::snapshot(&mut client, &self.sql).await.map_err(|e| self.conn.err(e))?;
        let out = self.reader(&snap).v1_actors(range, limit).await;
        self.end(snap, out).await
    }

    fn describe(&self) -> String {
        format!("{} (rivet layout)", self.conn.described)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> RivetId {
        RivetId::new(foundationdb_tuple::Uuid::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677), 7)
    }

    fn logical(tail: &[u8]) -> Vec<u8> {
        let mut k = V1_PREFIX.to_vec();
        k.extend_from_slice(id().to_string().as_bytes());
        k.extend_from_slice(tail);
        k
    }

    #[test]
    fn v1_bounds_keep_the_order_of_user_keys_including_zero_bytes() {
        let keys: [&[u8]; 5] = [b"/", b"/\x00", b"/\x00\x01", b"/\x08\x01", b"/\x08\x01\x00\xff"];
        let bounds: Vec<Vec<u8>> = keys.iter().map(|k| v1_bound(&logical(k)).unwrap()).collect();
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:x?}");
        let entry = codec::v1_entry_prefix(&id(), b"\x08\x01");
        assert!(v1_bound(&logical(b"/\x08\x01")).unwrap() <= entry);
        assert!(v1_bound(&logical(b"/\x08\x02")).unwrap() > entry);
        assert!(v1_bound(&logical(b"0")).unwrap() > entry, "the end of the actor is past its rows");
    }

    #[test]
    fn the_whole_v1_family_maps_to_the_actor_kv_root() {
        assert_eq!(v1_bound(V1_PREFIX).unwrap(), codec::v1_root());
        assert_eq!(v1_bound(&prefix_end(V1_PREFIX)).unwrap(), prefix_end(&codec::v1_root()));
        assert!(v1_bound(b"v1/abc/").is_err(), "a ferry-layout id is no rivet actor");
    }

    #[test]
    fn a_range_across_families_is_refused_and_records_stay_out_of_kv() {
        assert!(range_family(&KeyRange::new(b"v1/".to_vec(), b"v3".to_vec())).is_err());
        assert_eq!(range_family(&KeyRange::prefix(b"ferry/audit/")).unwrap(), Family::Records);
        assert_eq!(range_family(&KeyRange::prefix(b"v2/")).unwrap(), Family::V2);
        assert_eq!(family(b"ferry/lease/x"), Family::Records);
    }

    #[test]
    fn a_finalize_of_many_pages_costs_one_write_conflict_row_per_actor_space() {
        let actor = id().to_string();
        let mut txn = Txn::new();
        for pgno in 1..=1000u32 {
            let mut k = format!("v2/{actor}/PIDX/delta/").into_bytes();
            k.extend_from_slice(&pgno.to_be_bytes());
            txn.set(k, 7u64.to_be_bytes().to_vec());
        }
        txn.set(format!("v2/{actor}/META").into_bytes(), b"head".to_vec());
        txn.clear_range(KeyRange::prefix(format!("v2/{actor}/DELTA/").as_bytes()));
        let plan = Planner { v1_writes: false, now_ms: 0 }.plan(txn).unwrap();
        let writes: Vec<_> = plan.conflicts.iter().filter(|c| c.kind == ConflictKind::Write).collect();
        assert_eq!(writes.len(), 2, "the key space and the chunk space: {writes:?}");
        for m in &plan.kv_writes {
            let key = match m {
                Mutation::Set { key, .. } | Mutation::Clear { key } => key,
                Mutation::ClearRange { range } => &range.start,
            };
            assert!(writes.iter().any(|w| w.range.contains(key)), "every write is covered");
        }
    }

    #[test]
    fn v1_writes_are_refused_unless_loading_fixtures() {
        let mut txn = Txn::new();
        txn.set(logical(b"/\x08\x01\x00\x00"), b"x".to_vec());
        let refused = Planner { v1_writes: false, now_ms: 0 }.plan(txn.clone());
        assert!(matches!(refused, Err(StoreError::Unsupported { .. })));
        let plan = Planner { v1_writes: true, now_ms: 0 }.plan(txn).unwrap();
        assert!(plan.kv_writes.iter().all(|m| match m {
            Mutation::Set { key, .. } => key.starts_with(&codec::v1_actor_prefix(&id())),
            Mutation::ClearRange { range } => range.start.starts_with(&codec::v1_actor_prefix(&id())),
            Mutation::Clear { .. } => false,
        }));
        assert!(plan.conflicts.iter().all(|c| c.kind == ConflictKind::Write));
    }

    #[test]
    fn a_v2_set_is_one_inline_row_with_a_write_conflict_and_a_check_reads_key_and_chunks() {
        let key = format!("v2/{}/META", id()).into_bytes();
        let mut txn = Txn::new();
        txn.check_value(key.clone(), None);
        txn.set(key.clone(), b"head".to_vec());
        txn.set(b"ferry/audit/x".to_vec(), b"{}".to_vec());
        let plan = Planner { v1_writes: false, now_ms: 0 }.plan(txn).unwrap();
        let physical = codec::v2_key(&key).unwrap();
        assert_eq!(plan.kv_writes, vec![Mutation::Set { key: physical.clone(), value: b"\x00head".to_vec() }]);
        assert_eq!(plan.record_writes.len(), 1);
        let reads: Vec<_> = plan.conflicts.iter().filter(|c| c.kind == ConflictKind::Read).collect();
        assert_eq!(reads.len(), 2, "the key and its chunk rows");
        assert!(reads[0].range.contains(&physical));
        assert!(plan.conflicts.iter().any(|c| c.kind == ConflictKind::Write && c.range == key_range(&physical)));
    }
}
