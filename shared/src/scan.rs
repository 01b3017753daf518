//! The keyspace scan: a skip-scan over `v1/` from actor to actor (one `first_key` per actor,
//! never a walk over chunk keys), resumable from any actor.
//!
//! Invariant: every actor whose keys exist is visited once, in key order; an actor id that is
//! not valid is reported as such and never turned into a key of its own.

use crate::actor::{ActorId, InvalidActorId};
use crate::keys::V1_PREFIX;
use crate::store::{KeyRange, Store, StoreError, prefix_end};

/// One actor found under `v1/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedActor {
    /// The raw id bytes, as they appear in keys (the resume point).
    pub raw: Vec<u8>,
    pub id: Result<ActorId, InvalidActorId>,
}

/// The first key after every key of actor `raw`.
fn after_actor(raw: &[u8]) -> Vec<u8> {
    let mut p = V1_PREFIX.to_vec();
    p.extend_from_slice(raw);
    p.push(b'/');
    prefix_end(&p)
}

/// Walks the actors under `v1/`.
pub struct ActorScan<'a> {
    store: &'a dyn Store,
    next_start: Vec<u8>,
    end: Vec<u8>,
}

impl<'a> ActorScan<'a> {
    /// Starts after actor `resume_after` (raw bytes) or at the beginning.
    pub fn new(store: &'a dyn Store, resume_after: Option<&[u8]>) -> ActorScan<'a> {
        let next_start = match resume_after {
            Some(raw) => after_actor(raw),
            None => V1_PREFIX.to_vec(),
        };
        ActorScan { store, next_start, end: prefix_end(V1_PREFIX) }
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
        ActorScan { store, next_start, end }
    }

    pub async fn next(&mut self) -> Result<Option<ScannedActor>, StoreError> {
        if self.next_start >= self.end {
            return Ok(None);
        }
        let range = KeyRange::new(self.next_start.clone(), self.end.clone());
        let Some(key) = self.store.first_key(&range).await? else {
            self.next_start = self.end.clone();
            return Ok(None);
        };
        let rest = &key[V1_PREFIX.len()..];
        let raw = match rest.iter().position(|&b| b == b'/') {
            Some(i) => {
                let raw = rest[..i].to_vec();
                self.next_start = after_actor(&raw);
                raw
            }
            None => {
                // A key with no '/' after the id: step past just this key, since ids that
                // extend it (`abc-x/...`) sort after it but before `abc/`.
                self.next_start = key.clone();
                self.next_start.push(0);
                rest.to_vec()
            }
        };
        let id = ActorId::from_bytes(&raw);
        Ok(Some(ScannedActor { raw, id }))
    }
}
