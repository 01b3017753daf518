//! Rebuilds a database file from the v2 page store (verification and tests): the head, the
//! PIDX rows, and the LTX blobs they point at.
//!
//! Invariant: every page of `db_size_pages` must be found through its PIDX row in a blob that
//! decodes completely; anything less is an error, never a silently zero-filled page.

use std::collections::BTreeMap;

use crate::actor::ActorId;
use crate::store::{KeyRange, Store, StoreError, for_each_row};

use super::head::{CorruptHead, DBHead};
use super::keys;
use super::ltx::{self, LtxError};

/// A v2 database read back.
#[derive(Debug)]
pub struct V2Database {
    pub head: DBHead,
    pub file: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum V2ReadError {
    #[error("no v2 head")]
    NoHead,
    #[error(transparent)]
    CorruptHead(#[from] CorruptHead),
    #[error("page {pgno} has no PIDX row")]
    MissingPidx { pgno: u32 },
    #[error("PIDX row of page {pgno} is not a u64 txid")]
    BadPidx { pgno: u32 },
    /// The blob's error is named in the message and is not also the source, so a `{:#}`
    /// chain says it once.
    #[error("txid {txid}: {error}")]
    BadBlob { txid: u64, error: LtxError },
    #[error("txid {txid} has no page {pgno}")]
    MissingPage { txid: u64, pgno: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads the head and rebuilds the file it describes.
pub async fn read_v2(store: &dyn Store, actor: &ActorId) -> Result<V2Database, V2ReadError> {
    let raw = store.get(&keys::meta(actor)).await?.ok_or(V2ReadError::NoHead)?;
    let head = DBHead::decode(&raw)?;
    let owners = read_pidx(store, actor).await?;
    let mut blobs: BTreeMap<u64, BTreeMap<u32, Vec<u8>>> = BTreeMap::new();
    for txid in owners.values() {
        if !blobs.contains_key(txid) {
            let blob = read_blob(store, actor, *txid).await?;
            let decoded = ltx::decode(&blob).map_err(|error| V2ReadError::BadBlob { txid: *txid, error })?;
            blobs.insert(*txid, decoded.pages.into_iter().collect());
        }
    }
    let page_size = head.page_size as usize;
    let mut file = vec![0u8; head.db_size_pages as usize * page_size];
    for pgno in 1..=head.db_size_pages {
        let txid = *owners.get(&pgno).ok_or(V2ReadError::MissingPidx { pgno })?;
        let page =
            blobs.get(&txid).and_then(|pages| pages.get(&pgno)).ok_or(V2ReadError::MissingPage { txid, pgno })?;
        let start = (pgno as usize - 1) * page_size;
        file[start..start + page_size].copy_from_slice(page);
    }
    Ok(V2Database { head, file })
}

async fn read_pidx(store: &dyn Store, actor: &ActorId) -> Result<BTreeMap<u32, u64>, V2ReadError> {
    let prefix = keys::pidx_prefix(actor);
    let mut owners = BTreeMap::new();
    let mut bad = None;
    for_each_row(store, &KeyRange::prefix(&prefix), 4096, |key, value| {
        let Ok(pgno) = <[u8; 4]>::try_from(&key[prefix.len()..]).map(u32::from_be_bytes) else {
            return Ok(());
        };
        match <[u8; 8]>::try_from(value.as_slice()) {
            Ok(txid) => {
                owners.insert(pgno, u64::from_be_bytes(txid));
            }
            Err(_) => bad = bad.or(Some(pgno)),
        }
        Ok(())
    })
    .await?;
    match bad {
        Some(pgno) => Err(V2ReadError::BadPidx { pgno }),
        None => Ok(owners),
    }
}

/// The concatenated DELTA slices of one txid.
pub async fn read_blob(store: &dyn Store, actor: &ActorId, txid: u64) -> Result<Vec<u8>, StoreError> {
    let mut blob = Vec::new();
    for_each_row(store, &keys::delta_txid_range(actor, txid), 128, |_, value| {
        blob.extend_from_slice(&value);
        Ok(())
    })
    .await?;
    Ok(blob)
}
