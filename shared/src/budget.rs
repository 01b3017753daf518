//! The memory budget: bytes of v1 data in flight across all jobs of a process, besides the
//! job count. A job reserves its estimated footprint before it reads anything and releases it
//! when it finishes, so a few 128 MiB databases cannot exhaust a pod.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservation granularity.
const UNIT: u64 = 64 * 1024;

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

    /// The footprint of migrating a main file of `file_bytes`: the file, plus the staging
    /// buffers (bounded by the stage transaction size).
    pub fn footprint(file_bytes: u64) -> u64 {
        let staging = file_bytes.min(2 * crate::migrate::stage::STAGE_TXN_BYTES as u64);
        file_bytes + staging + UNIT
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
}
