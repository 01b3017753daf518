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

/// How a backend commits a group of transactions ([`super::Store::commit_many`]): each
/// transaction that breaks a limit gets its error and is left out; the others, in order, are
/// packed into runs whose writes together stay within [`MAX_TXN_WRITE_BYTES`], one store
/// transaction per run.
pub struct GroupPlan {
    /// The limit error of each transaction that breaks one, by index.
    pub refused: Vec<(usize, StoreError)>,
    /// Indexes of the transactions of each store transaction, ascending.
    pub runs: Vec<Vec<usize>>,
}

/// Plans the store transactions of a group (see [`GroupPlan`]).
pub fn plan_group(txns: &[Txn]) -> GroupPlan {
    let mut plan = GroupPlan { refused: Vec::new(), runs: Vec::new() };
    let mut run: Vec<usize> = Vec::new();
    let mut run_bytes = 0usize;
    for (i, txn) in txns.iter().enumerate() {
        if let Err(e) = check_txn(txn) {
            plan.refused.push((i, e));
            continue;
        }
        let bytes = txn.write_bytes();
        if !run.is_empty() && run_bytes + bytes > MAX_TXN_WRITE_BYTES {
            plan.runs.push(std::mem::take(&mut run));
            run_bytes = 0;
        }
        run.push(i);
        run_bytes += bytes;
    }
    if !run.is_empty() {
        plan.runs.push(run);
    }
    plan
}

/// A result per transaction of a group, as a backend's `commit_many` fills them in.
pub type ResultSlots = Vec<Option<Result<(), StoreError>>>;

/// A slot for each of `len` transactions, those `refused` filled with their limit errors.
pub fn result_slots(len: usize, refused: Vec<(usize, StoreError)>) -> ResultSlots {
    let mut slots: ResultSlots = (0..len).map(|_| None).collect();
    for (i, e) in refused {
        slots[i] = Some(Err(e));
    }
    slots
}

/// The result in each slot. Every transaction was refused or in a run that answers for each
/// of its own, so none is empty; one that were would be an error of `backend`, not a panic.
pub fn group_results(slots: ResultSlots, backend: &'static str) -> Vec<Result<(), StoreError>> {
    slots
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(StoreError::Failed { backend, message: "a transaction of the group got no result".into() })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(bytes: usize) -> Txn {
        let mut txn = Txn::new();
        let mut left = bytes;
        let mut i = 0u32;
        while left > 0 {
            let value = (left - 4).min(MAX_VALUE_BYTES);
            txn.set(i.to_be_bytes().to_vec(), vec![0u8; value]);
            left -= value + 4;
            i += 1;
        }
        txn
    }

    #[test]
    fn a_group_is_cut_into_runs_within_the_write_limit_and_refused_transactions_are_left_out() {
        let mut too_big_value = Txn::new();
        too_big_value.set(b"k".to_vec(), vec![0u8; MAX_VALUE_BYTES + 1]);
        let txns = vec![sized(4_000_000), sized(4_000_000), too_big_value, sized(4_000_000), sized(1_000)];
        let plan = plan_group(&txns);
        assert_eq!(plan.refused.len(), 1);
        assert_eq!(plan.refused[0].0, 2);
        assert!(matches!(plan.refused[0].1, StoreError::ValueTooLarge { .. }));
        assert_eq!(plan.runs, vec![vec![0, 1], vec![3, 4]]);
        for run in &plan.runs {
            let total: usize = run.iter().map(|&i| txns[i].write_bytes()).sum();
            assert!(total <= MAX_TXN_WRITE_BYTES, "{total}");
        }
    }
}
