//! The audit record at `ferry/audit/{actor}`: JSON, the last outcome for the actor (DESIGN.md
//! section 2). Written in the same transaction as the state change it reports.

use serde::{Deserialize, Serialize};

use crate::actor::ActorId;
use crate::keys;
use crate::reason::DeadLetterReason;
use crate::recovery::Recovery;
use crate::store::{Read, ReadResult, Store, StoreError, Txn};
use crate::triage::{index, ticket};
use crate::v1::V1Files;
use crate::v2::head::DBHead;

/// What happened to an actor, as recorded and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Migrated,
    SkippedNoV1,
    SkippedNativeV2,
    SkippedAlreadyMigrated,
    DeadLettered,
}

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 5] = [
        OutcomeKind::Migrated,
        OutcomeKind::SkippedNoV1,
        OutcomeKind::SkippedNativeV2,
        OutcomeKind::SkippedAlreadyMigrated,
        OutcomeKind::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Migrated => "migrated",
            OutcomeKind::SkippedNoV1 => "skipped_no_v1",
            OutcomeKind::SkippedNativeV2 => "skipped_native_v2",
            OutcomeKind::SkippedAlreadyMigrated => "skipped_already_migrated",
            OutcomeKind::DeadLettered => "dead_lettered",
        }
    }
}

impl std::fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub actor_id: ActorId,
    pub campaign: String,
    pub outcome: OutcomeKind,
    pub reason: Option<DeadLetterReason>,
    pub phase: Option<String>,
    pub error: Option<String>,
    pub recovery: Option<Recovery>,
    pub pages: Option<u32>,
    pub v1_bytes: Option<u64>,
    pub checksum: Option<String>,
    pub generation: Option<u64>,
    pub worker: String,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    /// The v1 files seen (sizes), for triage.
    #[serde(default)]
    pub v1_files: Option<V1Files>,
    /// Attempts this job took (1 on the first delivery).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Set when an operator purged the actor's dead letter (`dlq purge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged_at_ms: Option<i64>,
    /// The v2 head's `head_txid` this record saw: the txid a migration committed (or the head a
    /// skip found). `verify` tells a v2 the actor has written since (its head moved past this)
    /// from a corrupt one. Absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_txid: Option<u64>,
}

impl AuditRecord {
    pub fn encode(&self) -> Vec<u8> {
        // Plain data; serde_json does not fail on it.
        serde_json::to_vec(self).expect("audit record serializes")
    }

    pub fn decode(bytes: &[u8]) -> Option<AuditRecord> {
        serde_json::from_slice(bytes).ok()
    }

    /// A skip (`kind` is one of the `skipped_*` outcomes) of `actor` by `worker` for
    /// `campaign`, with the v2 head's pages and generation when there is one.
    pub fn skipped(
        actor: &ActorId,
        campaign: &str,
        kind: OutcomeKind,
        head: Option<&DBHead>,
        worker: &str,
        (started_at_ms, finished_at_ms): (i64, i64),
    ) -> AuditRecord {
        AuditRecord {
            actor_id: actor.clone(),
            campaign: campaign.to_string(),
            outcome: kind,
            reason: None,
            phase: None,
            error: None,
            recovery: None,
            pages: head.map(|h| h.db_size_pages),
            v1_bytes: None,
            checksum: None,
            generation: head.map(|h| h.generation),
            worker: worker.to_string(),
            started_at_ms,
            finished_at_ms,
            v1_files: None,
            attempts: None,
            purged_at_ms: None,
            head_txid: head.map(|h| h.head_txid),
        }
    }

    /// This record turned into a skip of an already-migrated actor: the migration's fields
    /// stay, the outcome and times change (DESIGN.md section 2).
    pub fn as_skip(mut self, campaign: &str, worker: &str, started_at_ms: i64, finished_at_ms: i64) -> AuditRecord {
        self.outcome = OutcomeKind::SkippedAlreadyMigrated;
        self.campaign = campaign.to_string();
        self.worker = worker.to_string();
        self.reason = None;
        self.phase = None;
        self.error = None;
        self.started_at_ms = started_at_ms;
        self.finished_at_ms = finished_at_ms;
        self
    }
}

/// The transaction of a skip that keeps nothing of an earlier record (every skip but
/// `skipped_already_migrated`): the audit, and the settling of the job's requeue ticket
/// `ticket` (checked unchanged, then cleared) when it was requeued.
pub fn skip_txn(skip: &AuditRecord, ticket: Option<&[u8]>) -> Txn {
    let mut txn = Txn::new();
    txn.set(keys::audit(&skip.actor_id), skip.encode());
    settle_ticket(&mut txn, &skip.actor_id, ticket);
    txn
}

/// Adds the settling of a requeued job's claimed `ticket` to the transaction of its skip: a
/// second copy of the job that claimed the ticket too, before the first copy's outcome cleared
/// it, fails on it (a conflict) instead of writing a second outcome over the first.
fn settle_ticket(txn: &mut Txn, actor: &ActorId, ticket: Option<&[u8]>) {
    if let Some(raw) = ticket {
        ticket::settle(txn, actor, raw);
    }
}

/// Writes the audit of a skip and returns what was written. A skip of an already-migrated
/// actor keeps the fields of the migration it found (DESIGN.md section 2), checked to be
/// still the record it read, so a concurrent write (another skip, a purge note) is never
/// overwritten with stale fields, and takes the actor's dead letter out of the triage index
/// as a finalize does (one listed by an older ferry, or before rivet's own migration finished
/// the actor); the skip of a native actor takes its letter out too; any other skip is written
/// as given. `ticket` is the requeue ticket the job claimed, settled in the same transaction
/// ([`skip_txn`]): one another copy's outcome cleared meanwhile fails the skip (a conflict).
pub async fn record_skip(
    store: &dyn Store,
    skip: AuditRecord,
    ticket: Option<&[u8]>,
) -> Result<AuditRecord, StoreError> {
    let key = keys::audit(&skip.actor_id);
    match skip.outcome {
        OutcomeKind::SkippedAlreadyMigrated => {}
        OutcomeKind::SkippedNativeV2 => return record_native_skip(store, skip, ticket).await,
        OutcomeKind::Migrated | OutcomeKind::SkippedNoV1 | OutcomeKind::DeadLettered => {
            store.commit(skip_txn(&skip, ticket)).await?;
            return Ok(skip);
        }
    }
    let mut attempts = 0;
    loop {
        // One call for both: the record the skip keeps fields of, and the letter it removes.
        let reads = [Read::Get(key.clone()), Read::Get(keys::dead(&skip.actor_id))];
        let mut read = store.read_many(&reads).await?.into_iter().map(ReadResult::into_value);
        let (previous, dead) = (read.next().flatten(), read.next().flatten());
        let audit = match previous.as_deref().and_then(AuditRecord::decode) {
            Some(prev) if matches!(prev.outcome, OutcomeKind::Migrated | OutcomeKind::SkippedAlreadyMigrated) => {
                prev.as_skip(&skip.campaign, &skip.worker, skip.started_at_ms, skip.finished_at_ms)
            }
            _ => skip.clone(),
        };
        let mut txn = Txn::new();
        txn.check_value(key.clone(), previous).set(key.clone(), audit.encode());
        index::clear_on_migration(&mut txn, &skip.actor_id, dead.as_deref());
        settle_ticket(&mut txn, &skip.actor_id, ticket);
        match store.commit(txn).await {
            Ok(()) => return Ok(audit),
            // Raced another writer of the record: read it again, a few times at most.
            Err(e @ StoreError::Conflict { .. }) if attempts < SKIP_ATTEMPTS && !ticket::is_ticket_conflict(&e) => {
                attempts += 1
            }
            Err(e) => return Err(e),
        }
    }
}

/// The skip of a native actor: written as given, and the actor's dead letter (if an earlier
/// job listed one) taken out in the same transaction, checked to be the letter read, so a
/// settled actor is not left listed as dead.
async fn record_native_skip(
    store: &dyn Store,
    skip: AuditRecord,
    ticket: Option<&[u8]>,
) -> Result<AuditRecord, StoreError> {
    let mut attempts = 0;
    loop {
        let dead = store.get(&keys::dead(&skip.actor_id)).await?;
        let mut txn = skip_txn(&skip, ticket);
        index::clear_on_migration(&mut txn, &skip.actor_id, dead.as_deref());
        match store.commit(txn).await {
            Ok(()) => return Ok(skip),
            // A letter listed or changed since the read: read it again, a few times at most.
            Err(e @ StoreError::Conflict { .. }) if attempts < SKIP_ATTEMPTS && !ticket::is_ticket_conflict(&e) => {
                attempts += 1
            }
            Err(e) => return Err(e),
        }
    }
}

/// Tries of a skip's read-check-write before the conflict is reported (a transient error).
const SKIP_ATTEMPTS: u32 = 3;
