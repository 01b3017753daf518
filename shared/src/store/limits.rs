//! The FoundationDB-shaped limits every backend enforces, so ferry never relies on a value or
//! transaction bigger than a third backend could take.

use super::{Mutation, StoreError, Txn};

/// The largest value ferry writes (FoundationDB: 100,000 bytes).
pub const MAX_VALUE_BYTES: usize = 100_000;
/// The largest key (FoundationDB: 10,000 bytes).
pub const MAX_KEY_BYTES: usize = 10_000;
/// The most bytes one transaction writes, keys and values (FoundationDB: 10 MB).
pub const MAX_TXN_WRITE_BYTES: usize = 10_000_000;

/// Rejects a transaction that breaks a limit, before any backend sees it.
pub fn check_txn(txn: &Txn) -> Result<(), StoreError> {
    for m in &txn.mutations {
        let key = match m {
            Mutation::Set { key, value } => {
                if value.len() > MAX_VALUE_BYTES {
                    return Err(StoreError::ValueTooLarge {
                        key: key.clone(),
                        size: value.len(),
                        max: MAX_VALUE_BYTES,
                    });
                }
                key
            }
            Mutation::Clear { key } => key,
            Mutation::ClearRange { range } => &range.start,
        };
        if key.len() > MAX_KEY_BYTES {
            return Err(StoreError::KeyTooLarge { size: key.len(), max: MAX_KEY_BYTES });
        }
    }
    let size = txn.write_bytes();
    if size > MAX_TXN_WRITE_BYTES {
        return Err(StoreError::TransactionTooLarge { size, max: MAX_TXN_WRITE_BYTES });
    }
    Ok(())
}
