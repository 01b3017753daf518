//! The memory budget: bytes of v1 data in flight across all jobs of a process, besides the
//! job count. A job reserves its estimated footprint before it reads anything and releases it
//! when it finishes, so a few 128 MiB databases cannot exhaust a pod.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservation granularity.
const UNIT: u64 = 64 * 1024;
/// Stage batches a job can hold at once (see [`MemoryBudget::footprint`]).
pub const STAGE_COPIES: u64 = 4;
/// PIDX rows of finalize as a share of the file: 40 bytes per 4 KiB page, rounded up.
pub const PIDX_SHARE: u64 = 64;
/// quick_check's page cache (SQLite's default 2,000 KiB) and a job's fixed structures.
pub const FIXED_BYTES: u64 = 2 * 1024 * 1024 + 64 * 1024;

/// A shared byte budget.
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    sem: Arc<Semaphore>,
    units: u32,
}

/// Bytes held until dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
    pub bytes: u64,
}

impl MemoryBudget {
    pub fn new(bytes: u64) -> MemoryBudget {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX >> 4);
        MemoryBudget { sem: Arc::new(Semaphore::new(units as usize)), units }
    }

    pub fn total_bytes(&self) -> u64 {
        u64::from(self.units) * UNIT
    }

    /// The footprint of migrating a main file of `main_bytes` with `sidecar_bytes` of
    /// journal, WAL and SHM (under a recovery only): what the job holds at its peak.
    ///
    /// - the rebuilt main file, and under a recovery the sidecars and the recovered copy of
    ///   the main file read back from the private temp dir;
    /// - staging ([`STAGE_COPIES`] stage batches of at most 8 MiB in flight: the encoder's
    ///   buffer, the batch queued to the committer, the transaction being committed and the
    ///   driver's encoding of its parameters); a blob smaller than a batch is held that often;
    /// - the PIDX rows of finalize (about 40 bytes a page: [`PIDX_SHARE`] of the file);
    /// - quick_check's page cache and the job's fixed structures ([`FIXED_BYTES`]).
    pub fn footprint(main_bytes: u64, sidecar_bytes: u64, recovery: bool) -> u64 {
        let batch = main_bytes.min(crate::migrate::stage::STAGE_TXN_BYTES as u64);
        let files = if recovery { 2 * main_bytes + sidecar_bytes } else { main_bytes };
        files + STAGE_COPIES * batch + main_bytes / PIDX_SHARE + FIXED_BYTES
    }

    /// What a job reserves before its first batched read (`Migrator::prefetch`), when it does
    /// not know its size yet: the footprint of the largest main file that read can return
    /// whole (one scan batch of full chunks). A job whose read shows more re-reserves its real
    /// footprint and reads again.
    pub fn first_read_footprint() -> u64 {
        let batch = (crate::v1::read::SCAN_BATCH * crate::v1::keys::CHUNK_SIZE) as u64;
        MemoryBudget::footprint(batch, 0, false)
    }

    /// Waits until `bytes` fit. A job bigger than the whole budget waits for all of it and
    /// then runs alone.
    pub async fn reserve(&self, bytes: u64) -> Reservation {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX).min(self.units);
        // The semaphore is never closed, so acquiring cannot fail.
        let permit = self.sem.clone().acquire_many_owned(units).await.expect("budget semaphore is never closed");
        metrics::gauge!(crate::metrics::BYTES_IN_FLIGHT).increment((u64::from(units) * UNIT) as f64);
        Reservation { _permit: permit, bytes: u64::from(units) * UNIT }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::BYTES_IN_FLIGHT).decrement(self.bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_room_and_oversized_jobs_run_alone() {
        let budget = MemoryBudget::new(10 * UNIT);
        let a = budget.reserve(6 * UNIT).await;
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), budget.reserve(6 * UNIT)).await.is_err());
        drop(a);
        let big = budget.reserve(1000 * UNIT).await;
        assert_eq!(big.bytes, 10 * UNIT);
    }

    #[test]
    fn footprint_counts_staging_pidx_and_recovery_copies() {
        const MIB: u64 = 1 << 20;
        // A 124 MiB file: the file, four 8 MiB batches, ~2 MiB of PIDX, the fixed part.
        let big = MemoryBudget::footprint(124 * MIB, 0, false);
        assert_eq!(big, 124 * MIB + 32 * MIB + 124 * MIB / 64 + FIXED_BYTES);
        // Under a recovery: the sidecar and the recovered copy too.
        assert_eq!(MemoryBudget::footprint(124 * MIB, 4 * MIB, true), big + 124 * MIB + 4 * MIB);
        // A small file's blob is held as often as a batch would be.
        assert_eq!(MemoryBudget::footprint(MIB, 0, false), MIB + 4 * MIB + MIB / 64 + FIXED_BYTES);
    }
}
