//! The v2 page-store keys (layout of rivet's sqlite-storage, DESIGN.md section 2).
//!
//! ```text
//! v2/{actor}/META                                       -> DBHead
//! v2/{actor}/DELTA/ ++ u64 BE txid ++ "/" ++ u32 BE i   -> slice i of the LTX blob of txid
//! v2/{actor}/PIDX/delta/ ++ u32 BE pgno                 -> u64 BE txid owning the page
//! v2/{actor}/SHARD/ ++ u32 BE shard                     -> native v2 only
//! ```

use crate::actor::ActorId;
use crate::keys::V2_PREFIX;
use crate::store::KeyRange;

fn actor_key(actor: &ActorId, tail: &[u8]) -> Vec<u8> {
    let mut k = V2_PREFIX.to_vec();
    k.extend_from_slice(actor.as_bytes());
    k.push(b'/');
    k.extend_from_slice(tail);
    k
}

pub fn meta(actor: &ActorId) -> Vec<u8> {
    actor_key(actor, b"META")
}

pub fn delta_prefix(actor: &ActorId) -> Vec<u8> {
    actor_key(actor, b"DELTA/")
}

/// All DELTA slices of one txid.
pub fn delta_txid_range(actor: &ActorId, txid: u64) -> KeyRange {
    let mut p = delta_prefix(actor);
    p.extend_from_slice(&txid.to_be_bytes());
    p.push(b'/');
    KeyRange::prefix(&p)
}

pub fn delta_chunk(actor: &ActorId, txid: u64, chunk: u32) -> Vec<u8> {
    let mut k = delta_txid_range(actor, txid).start;
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

pub fn pidx_prefix(actor: &ActorId) -> Vec<u8> {
    actor_key(actor, b"PIDX/delta/")
}

pub fn pidx(actor: &ActorId, pgno: u32) -> Vec<u8> {
    let mut k = pidx_prefix(actor);
    k.extend_from_slice(&pgno.to_be_bytes());
    k
}

pub fn shard_prefix(actor: &ActorId) -> Vec<u8> {
    actor_key(actor, b"SHARD/")
}

/// The ranges a reset of a migration clears: DELTA, PIDX and SHARD.
pub fn page_ranges(actor: &ActorId) -> [KeyRange; 3] {
    [
        KeyRange::prefix(&delta_prefix(actor)),
        KeyRange::prefix(&pidx_prefix(actor)),
        KeyRange::prefix(&shard_prefix(actor)),
    ]
}
