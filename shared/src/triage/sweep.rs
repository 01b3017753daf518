//! `dlq sweep`: takes out of the triage index the dead letters of actors whose v2 head is now
//! settled (migrated from v1, by ferry or by rivet's own migration, or native). Such letters
//! were listed by an older ferry beside a migration that landed, or before the actor's runtime
//! migrated it; a job reaching the actor records its skip and takes the letter out, and the
//! sweep does so without the round trip through the queue (keeping an audit that already
//! records what the head says, where a job would write its skip again).
//!
//! Invariants:
//! - a letter is removed only by a transaction that checks the letter, the head and the audit
//!   record are still what the sweep read, so a letter requeued, replaced or purged meanwhile,
//!   or an actor whose head or audit moved, is left as it is now (counted `changed`; a rerun
//!   looks again);
//! - an actor whose audit already holds what its head says (the migration, or a native skip)
//!   keeps that audit; any other's audit becomes the skip its head makes, as a job would record
//!   it (`skipped_already_migrated` or `skipped_native_v2`), so the audit never says dead for an
//!   actor the index no longer lists;
//! - a letter whose actor is not settled (no head, a migration in progress, a head that does
//!   not decode) and a bad message are never touched; v1 is never read or written;
//! - a dry run reads the same and writes nothing.

use crate::actor::ActorId;
use crate::jobs::run::settled_head;
use crate::keys;
use crate::migrate::{AuditRecord, OutcomeKind};
use crate::store::group::{DEFAULT_GROUP_MAX, commit_each};
use crate::store::{DynStore, Read, ReadResult, StoreError, Txn};
use crate::v2::keys as v2keys;

use super::index::{self, LetterId, Stored};
use super::{Filter, MOVE_BATCH, page_stored};

/// What a sweep did (or, dry, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Swept {
    /// Dead letters the filter selected.
    pub checked: u64,
    /// Removed (dry run: would be): the actor is migrated from v1.
    pub migrated: u64,
    /// Removed (dry run: would be): the actor is native on v2.
    pub native: u64,
    /// Left: the letter, its head or its audit changed between the read and the commit.
    pub changed: u64,
    /// Nothing was written.
    pub dry_run: bool,
}

impl Swept {
    /// Letters removed (dry run: that would be).
    pub fn removed(&self) -> u64 {
        self.migrated + self.native
    }
}

/// One settled actor's letter and the transaction that removes it.
struct Removal {
    kind: OutcomeKind,
    txn: Txn,
}

/// Removes the letters of `filter` whose actor is settled, one page of letters at a time: one
/// batched read of their heads and audits and one [`crate::store::Store::commit_many`] per
/// page. `worker` names who recorded a skip in the audits it writes.
pub async fn sweep(store: &DynStore, filter: &Filter, dry_run: bool, worker: &str) -> Result<Swept, StoreError> {
    let mut swept = Swept { dry_run, ..Swept::default() };
    let mut after: Option<String> = None;
    loop {
        let page = page_stored(store, filter, MOVE_BATCH, after.as_deref()).await?;
        swept.checked += page.stored.len() as u64;
        let removals = removals(store, &page.stored, worker).await?;
        if dry_run {
            removals.iter().for_each(|r| count(&mut swept, r.kind));
        } else {
            commit(store, removals, &mut swept).await?;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(swept),
        }
    }
}

/// The removals a page of letters makes: the actors' heads and audits in one call.
async fn removals(store: &DynStore, stored: &[Stored], worker: &str) -> Result<Vec<Removal>, StoreError> {
    let actors: Vec<(&Stored, ActorId)> = stored
        .iter()
        .filter_map(|s| match LetterId::of(&s.letter) {
            LetterId::Actor(actor) => Some((s, actor)),
            LetterId::Bad(_) => None,
        })
        .collect();
    let reads: Vec<Read> =
        actors.iter().flat_map(|(_, a)| [Read::Get(v2keys::meta(a)), Read::Get(keys::audit(a))]).collect();
    let mut read = store.read_many(&reads).await?.into_iter().map(ReadResult::into_value);
    let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    let mut out = Vec::new();
    for (s, actor) in actors {
        let (head, audit) = (read.next().flatten(), read.next().flatten());
        let Some((decoded, kind)) = head.as_deref().and_then(settled_head) else { continue };
        let mut txn = Txn::new();
        // Check 0: the letter; check 1: the head; check 2: the audit.
        index::remove(&mut txn, &s.raw, &s.letter);
        txn.check_value(v2keys::meta(&actor), head.clone());
        txn.check_value(keys::audit(&actor), audit.clone());
        if !already_records(audit.as_deref(), kind) {
            let skip = AuditRecord::skipped(&actor, &s.letter.campaign, kind, Some(&decoded), worker, (now, now));
            txn.set(keys::audit(&actor), skip.encode());
        }
        out.push(Removal { kind, txn });
    }
    Ok(out)
}

/// Whether an audit record already holds the outcome a head that makes the skip `kind` stands
/// for: the migration (its fields are the outcome to keep), or a native actor's skip.
fn already_records(raw: Option<&[u8]>, kind: OutcomeKind) -> bool {
    raw.and_then(AuditRecord::decode).is_some_and(|a| match kind {
        OutcomeKind::SkippedAlreadyMigrated => {
            matches!(a.outcome, OutcomeKind::Migrated | OutcomeKind::SkippedAlreadyMigrated)
        }
        other => a.outcome == other,
    })
}

/// Commits a page's removals together; one that fails as its group's, not its own, is
/// committed again alone, so one bad transaction fails only itself.
async fn commit(store: &DynStore, removals: Vec<Removal>, swept: &mut Swept) -> Result<(), StoreError> {
    if removals.is_empty() {
        return Ok(());
    }
    let (kinds, txns): (Vec<OutcomeKind>, Vec<Txn>) = removals.into_iter().map(|r| (r.kind, r.txn)).unzip();
    // In groups the size the group committer allows, so one conflicting actor re-runs (on
    // rivet's layout) or sends alone (after a failure of the whole) a few dozen, not a page.
    for (txns, kinds) in txns.chunks(DEFAULT_GROUP_MAX).zip(kinds.chunks(DEFAULT_GROUP_MAX)) {
        for (result, kind) in commit_each(&**store, txns.to_vec()).await.into_iter().zip(kinds) {
            match result {
                Ok(()) => count(swept, *kind),
                Err(StoreError::Conflict { .. }) => swept.changed += 1,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn count(swept: &mut Swept, kind: OutcomeKind) {
    if kind == OutcomeKind::SkippedNativeV2 {
        swept.native += 1;
    } else {
        swept.migrated += 1;
    }
}
