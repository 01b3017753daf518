//! The synthetic v1 keyspace: real SQLite databases laid out as v1 actors, for the demo, the
//! benchmarks and the tests. Writes only under `v1/` of actors it creates.

pub mod keyspace;
pub mod sqlite;

use crate::actor::ActorId;
use crate::store::{Store, StoreError, Txn, limits};
use crate::v1::FileTag;
use crate::v1::keys::file_entries;

pub use self::sqlite::{DbFiles, DbSpec};

/// Bytes per transaction when loading v1 data (well under the transaction limit).
const LOAD_TXN_BYTES: usize = limits::MAX_TXN_WRITE_BYTES / 2;

/// Accumulates key-value writes and commits them in transactions that fit the limits.
pub struct BatchWriter<'a> {
    store: &'a dyn Store,
    txn: Txn,
}

impl<'a> BatchWriter<'a> {
    pub fn new(store: &'a dyn Store) -> BatchWriter<'a> {
        BatchWriter { store, txn: Txn::new() }
    }

    pub async fn set(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        if self.txn.write_bytes() + key.len() + value.len() > LOAD_TXN_BYTES {
            self.flush().await?;
        }
        self.txn.set(key, value);
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), StoreError> {
        if !self.txn.mutations.is_empty() {
            self.store.commit(std::mem::take(&mut self.txn)).await?;
        }
        Ok(())
    }
}

/// Queues the v1 layout of `files` for `actor` (meta and chunks of each present file).
pub async fn put_files(w: &mut BatchWriter<'_>, actor: &ActorId, files: &DbFiles) -> Result<(), StoreError> {
    let parts = [
        (FileTag::Main, Some(&files.main)),
        (FileTag::Journal, files.journal.as_ref()),
        (FileTag::Wal, files.wal.as_ref()),
        (FileTag::Shm, files.shm.as_ref()),
    ];
    for (tag, bytes) in parts {
        if let Some(bytes) = bytes {
            for (k, v) in file_entries(actor, tag, bytes) {
                w.set(k, v).await?;
            }
        }
    }
    Ok(())
}

/// Writes the v1 layout of `files` for `actor` and commits.
pub async fn write_v1(store: &dyn Store, actor: &ActorId, files: &DbFiles) -> Result<(), StoreError> {
    let mut w = BatchWriter::new(store);
    put_files(&mut w, actor, files).await?;
    w.flush().await
}
