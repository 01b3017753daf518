//! What the migration test suites share: the kind of a migration's commit, recognised from
//! its shape, so store wrappers can hook and log chosen commits.

use ferry::keys::V2_PREFIX;
use ferry::store::{Check, Mutation, Txn};

/// What a migration's commit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Writes the head (MigratingFromV1) and the lease.
    Begin,
    /// Writes DELTA slices.
    Stage,
    /// Checks the v1 digest, writes PIDX, head, audit.
    Finalize,
    /// Checks only, writes nothing: a rejection being confirmed against v1.
    Confirmation,
    /// Anything else (skip audits, clearing an abandoned stage).
    Other,
}

pub fn kind_of(txn: &Txn) -> Kind {
    let sets = || {
        txn.mutations.iter().filter_map(|m| match m {
            Mutation::Set { key, .. } => Some(key.as_slice()),
            _ => None,
        })
    };
    if txn.mutations.is_empty() {
        Kind::Confirmation
    } else if txn.checks.iter().any(|c| matches!(c, Check::RangeDigest { .. })) {
        Kind::Finalize
    } else if sets().any(|k| k.windows(7).any(|w| w == b"/DELTA/")) {
        Kind::Stage
    } else if sets().any(|k| k.starts_with(V2_PREFIX) && k.ends_with(b"/META")) {
        Kind::Begin
    } else {
        Kind::Other
    }
}
