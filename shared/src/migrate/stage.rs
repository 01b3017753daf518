//! Staging: the LTX blob is encoded on a blocking thread and streamed into DELTA rows over as
//! many transactions as the store limits need.
//!
//! Invariants: every stage transaction checks that the head (generation) and the lease are
//! still exactly ours and renews the lease (the heartbeat); the blob is never whole in memory
//! (at most two transaction batches are in flight); the checksum is computed from the v1
//! pages as they are encoded.

use tokio::sync::mpsc;

use crate::actor::ActorId;
use crate::checksum::DatabaseChecksum;
use crate::keys;
use crate::store::{Store, StoreError, Txn};
use crate::v2::head::{DBHead, PAGE_SIZE};
use crate::v2::keys as v2keys;
use crate::v2::ltx::{LtxEncoder, LtxHeader};
use crate::v2::quota;

use super::error::Cause;
use super::lease::Lease;

/// Largest DELTA value: one slice of an LTX blob (under the 100,000-byte value limit).
pub const DELTA_CHUNK_SIZE: usize = 65_536;
/// DELTA bytes per stage transaction (under the 10 MB transaction limit, with room for keys,
/// the head check and the lease).
pub const STAGE_TXN_BYTES: usize = 8 * 1024 * 1024;

/// A migration that has begun: what its transactions check and renew.
#[derive(Clone, Debug)]
pub struct Staging {
    pub actor: ActorId,
    pub txid: u64,
    /// Pages of the database being staged (the head says 0 until finalize).
    pub pages: u32,
    pub head: DBHead,
    pub head_raw: Vec<u8>,
    pub lease: Lease,
    pub lease_raw: Vec<u8>,
    /// Tracked storage of the DELTA rows committed so far (keys and values, quota rule).
    pub delta_usage: u64,
}

impl Staging {
    /// Adds the fence (head and lease exactly ours) to a transaction.
    pub fn fence(&self, txn: &mut Txn) {
        txn.check_value(v2keys::meta(&self.actor), Some(self.head_raw.clone()));
        txn.check_value(keys::lease(&self.actor), Some(self.lease_raw.clone()));
    }

    /// Renews the lease inside `txn` (after [`Staging::fence`]); call
    /// [`Staging::renewed`] once the transaction committed.
    fn renew(&self, txn: &mut Txn, now_ms: i64, ttl_ms: i64) -> (Lease, Vec<u8>) {
        let lease = Lease { expires_at_ms: now_ms + ttl_ms, ..self.lease.clone() };
        let raw = lease.encode();
        txn.set(keys::lease(&self.actor), raw.clone());
        (lease, raw)
    }
}

/// What staging produced.
#[derive(Debug)]
pub struct Staged {
    pub main: Vec<u8>,
    pub checksum: DatabaseChecksum,
    /// Bytes of the LTX blob written to DELTA values.
    pub delta_bytes: u64,
    /// CPU time of the encoder (checksum and LZ4).
    pub encode_time: std::time::Duration,
    /// Time spent committing stage transactions.
    pub write_time: std::time::Duration,
}

/// A batch of DELTA values the encoder hands to the committer.
type Batch = Vec<Vec<u8>>;

/// Encodes `main` (whose header checks passed) as an LTX blob on a blocking thread, sending
/// DELTA-sized slices in transaction-sized batches.
fn spawn_encoder(
    main: Vec<u8>,
    header: LtxHeader,
    tx: mpsc::Sender<Batch>,
) -> tokio::task::JoinHandle<(Vec<u8>, DatabaseChecksum, std::time::Duration)> {
    tokio::task::spawn_blocking(move || {
        let mut busy = std::time::Duration::ZERO;
        let mut since = std::time::Instant::now();
        let mut out = Vec::with_capacity(STAGE_TXN_BYTES + DELTA_CHUNK_SIZE);
        let mut encoder = LtxEncoder::new(&header, &mut out);
        let mut checksum = DatabaseChecksum::new();
        for (i, page) in main.chunks(PAGE_SIZE as usize).enumerate() {
            // Page counts were checked to fit u32 by the header check.
            let pgno = u32::try_from(i + 1).expect("pgno fits u32");
            checksum.add_page(pgno, page);
            encoder.push_page(pgno, page, &mut out);
            if out.len() >= STAGE_TXN_BYTES {
                let batch = take_full_chunks(&mut out);
                busy += since.elapsed();
                if tx.blocking_send(batch).is_err() {
                    // The committer stopped (a failed stage); nothing more to encode.
                    return (main, checksum, busy);
                }
                since = std::time::Instant::now();
            }
        }
        encoder.finish(&mut out);
        let mut last = take_full_chunks(&mut out);
        if !out.is_empty() {
            last.push(out);
        }
        busy += since.elapsed();
        let _ = tx.blocking_send(last);
        (main, checksum, busy)
    })
}

/// Encodes a whole (small) database as one LTX blob, with its checksum (blocking).
pub fn encode_whole(main: Vec<u8>, pages: u32, txid: u64, timestamp_ms: i64) -> (Vec<u8>, Vec<u8>, DatabaseChecksum) {
    let header = LtxHeader { page_size: PAGE_SIZE, commit: pages, min_txid: txid, max_txid: txid, timestamp_ms };
    let mut blob = Vec::with_capacity(main.len() / 2 + 256);
    let mut encoder = LtxEncoder::new(&header, &mut blob);
    let mut checksum = DatabaseChecksum::new();
    for (i, page) in main.chunks(PAGE_SIZE as usize).enumerate() {
        // Page counts were checked to fit u32 by the header check.
        let pgno = u32::try_from(i + 1).expect("pgno fits u32");
        checksum.add_page(pgno, page);
        encoder.push_page(pgno, page, &mut blob);
    }
    encoder.finish(&mut blob);
    (main, blob, checksum)
}

/// Splits off every whole DELTA chunk at the front of `out`, leaving the remainder.
fn take_full_chunks(out: &mut Vec<u8>) -> Batch {
    let whole = out.len() / DELTA_CHUNK_SIZE * DELTA_CHUNK_SIZE;
    let batch = out[..whole].chunks(DELTA_CHUNK_SIZE).map(<[u8]>::to_vec).collect();
    out.drain(..whole);
    batch
}

/// Streams the blob into DELTA rows. Each transaction is fenced, renews the lease, and rewrites
/// the head with the storage used so far (the quota stays true at every step).
pub async fn stage(
    store: &dyn Store,
    staging: &mut Staging,
    main: Vec<u8>,
    timestamp_ms: i64,
    now: impl Fn() -> i64,
    lease_ttl_ms: i64,
) -> Result<Staged, Cause> {
    let header = LtxHeader {
        page_size: PAGE_SIZE,
        commit: staging.pages,
        min_txid: staging.txid,
        max_txid: staging.txid,
        timestamp_ms,
    };
    let (tx, mut rx) = mpsc::channel::<Batch>(1);
    let encoder = spawn_encoder(main, header, tx);
    let mut next_chunk: u32 = 0;
    let mut delta_bytes: u64 = 0;
    let mut failure = None;
    let mut write_time = std::time::Duration::ZERO;
    while let Some(batch) = rx.recv().await {
        let mut txn = Txn::new();
        staging.fence(&mut txn);
        let mut usage = staging.delta_usage;
        for value in batch {
            let key = v2keys::delta_chunk(&staging.actor, staging.txid, next_chunk);
            usage += quota::entry_size(store.layout(), &key, &value);
            delta_bytes += value.len() as u64;
            txn.set(key, value);
            next_chunk += 1;
        }
        let (head, head_raw) = quota::with_usage(store.layout(), &staging.actor, &staging.head, usage);
        txn.set(v2keys::meta(&staging.actor), head_raw.clone());
        let (lease, raw) = staging.renew(&mut txn, now(), lease_ttl_ms);
        let commit_started = std::time::Instant::now();
        let committed = store.commit(txn).await;
        write_time += commit_started.elapsed();
        match committed {
            Ok(()) => {
                staging.lease = lease;
                staging.lease_raw = raw;
                (staging.head, staging.head_raw, staging.delta_usage) = (head, head_raw, usage);
            }
            Err(StoreError::Conflict { .. }) => {
                failure = Some(Cause::Fenced);
                break;
            }
            Err(e) => {
                failure = Some(Cause::Store(e));
                break;
            }
        }
    }
    drop(rx);
    let (main, checksum, encode_time) = encoder.await.map_err(|e| Cause::Internal(format!("encoder task: {e}")))?;
    match failure {
        Some(cause) => Err(cause),
        None => Ok(Staged { main, checksum, delta_bytes, encode_time, write_time }),
    }
}
