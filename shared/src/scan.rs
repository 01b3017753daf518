//! The keyspace scan: a skip-scan over `v1/` from actor to actor (one `first_key` per actor,
//! never a walk over chunk keys), resumable from any actor.
//!
//! Invariant: every actor whose keys exist is visited once, in key order; an actor id that is
//! not valid is reported as such and never turned into a key of its own.

use crate::actor::{ActorId, InvalidActorId};
use crate::keys::V1_PREFIX;
use crate::store::{KeyRange, Store, StoreError, prefix_end};

/// Keys read per scan call: many small actors come back at once; a larger actor costs one
/// call and a skip past it.
pub const KEY_BATCH: usize = 1024;

/// One actor found under `v1/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedActor {
    /// The raw id bytes, as they appear in keys (the resume point).
    pub raw: Vec<u8>,
    pub id: Result<ActorId, InvalidActorId>,
    /// Whether it has v1 SQLite data, when the scan saw all of its keys.
    pub has_sqlite: Option<bool>,
}

/// The first key after every key of actor `raw`.
fn after_actor(raw: &[u8]) -> Vec<u8> {
    let mut p = V1_PREFIX.to_vec();
    p.extend_from_slice(raw);
    p.push(b'/');
    prefix_end(&p)
}

/// The actor a `v1/` key belongs to, and where the keys after that actor start.
fn actor_of(key: &[u8]) -> (Vec<u8>, Vec<u8>, bool) {
    let rest = &key[V1_PREFIX.len()..];
    match rest.iter().position(|&b| b == b'/') {
        Some(i) => {
            let raw = rest[..i].to_vec();
            let sqlite = rest.get(i + 1) == Some(&crate::v1::keys::SQLITE_PREFIX);
            let after = after_actor(&raw);
            (raw, after, sqlite)
        }
        None => {
            // A key with no '/' after the id: step past just this key, since ids that
            // extend it (`abc-x/...`) sort after it but before `abc/`.
            let mut after = key.to_vec();
            after.push(0);
            (rest.to_vec(), after, false)
        }
    }
}

/// Consecutive keys of one actor in a batch: (raw id, where the keys after it start, whether
/// one is under 0x08, its first key).
type Group = (Vec<u8>, Vec<u8>, bool, Vec<u8>);

/// One batch of a skip-scan over v1 actors ([`crate::store::Store::v1_actors`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActorBatch {
    pub actors: Vec<ScannedActor>,
    /// Where the next batch starts, a logical key the same store understands (`None`: done).
    pub next: Option<Vec<u8>>,
}

/// Walks the actors under `v1/`.
pub struct ActorScan<'a> {
    store: &'a dyn Store,
    /// `None` once the range is done.
    next_start: Option<Vec<u8>>,
    end: Vec<u8>,
    pending: std::collections::VecDeque<ScannedActor>,
}

impl<'a> ActorScan<'a> {
    /// Starts after actor `resume_after` (raw bytes) or at the beginning.
    pub fn new(store: &'a dyn Store, resume_after: Option<&[u8]>) -> ActorScan<'a> {
        let next_start = match resume_after {
            Some(raw) => after_actor(raw),
            None => V1_PREFIX.to_vec(),
        };
        ActorScan { store, next_start: Some(next_start), end: prefix_end(V1_PREFIX), pending: Default::default() }
    }

    /// Only actors whose id starts with `prefix`.
    pub fn with_prefix(store: &'a dyn Store, prefix: &str, resume_after: Option<&[u8]>) -> ActorScan<'a> {
        let mut start = V1_PREFIX.to_vec();
        start.extend_from_slice(prefix.as_bytes());
        let end = prefix_end(&start);
        let next_start = match resume_after {
            Some(raw) => after_actor(raw).max(start),
            None => start,
        };
        ActorScan { store, next_start: Some(next_start), end, pending: Default::default() }
    }

    pub async fn next(&mut self) -> Result<Option<ScannedActor>, StoreError> {
        while self.pending.is_empty() {
            let Some(start) = self.next_start.take() else {
                return Ok(None);
            };
            let batch = self.store.v1_actors(&KeyRange::new(start, self.end.clone()), KEY_BATCH).await?;
            self.pending.extend(batch.actors);
            self.next_start = batch.next;
        }
        Ok(self.pending.pop_front())
    }
}

/// [`crate::store::Store::v1_actors`] over logical keys: one `scan_keys` of up to `limit` keys
/// covers many small actors; a larger actor costs one call and a skip past it.
pub async fn logical_actor_batch<S: Store + ?Sized>(
    store: &S,
    range: &KeyRange,
    limit: usize,
) -> Result<ActorBatch, StoreError> {
    if range.start >= range.end {
        return Ok(ActorBatch::default());
    }
    let keys = store.scan_keys(range, limit).await?;
    let full = keys.len() == limit;
    let mut groups: Vec<Group> = Vec::new();
    for key in keys {
        let (raw, after, sqlite) = actor_of(&key);
        match groups.last_mut() {
            Some(g) if g.0 == raw && g.1 == after => g.2 |= sqlite,
            _ => groups.push((raw, after, sqlite, key)),
        }
    }
    let Some(last) = groups.last() else {
        return Ok(ActorBatch::default());
    };
    let last_complete = !full;
    let next = match (full, groups.len()) {
        (false, _) => last.1.clone(),
        // One actor filled the batch: take it (its SQLite keys may lie beyond) and skip it.
        (true, 1) => last.1.clone(),
        // The last actor may be cut off: read it again, whole, next time.
        (true, _) => last.3.clone(),
    };
    let take = if full && groups.len() > 1 { groups.len() - 1 } else { groups.len() };
    let n = groups.len();
    let mut actors = Vec::with_capacity(take);
    for (i, (raw, _, sqlite, _)) in groups.into_iter().take(take).enumerate() {
        let complete = i + 1 < n || last_complete;
        let id = ActorId::from_bytes(&raw);
        // Without all its keys, a missing 0x08 key in the batch proves nothing.
        let has_sqlite = if complete || sqlite { Some(sqlite) } else { None };
        actors.push(ScannedActor { raw, id, has_sqlite });
    }
    let next = (next < range.end).then_some(next);
    Ok(ActorBatch { actors, next })
}
