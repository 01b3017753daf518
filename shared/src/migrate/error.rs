//! Why a migration did not complete, and the one exhaustive mapping from each cause to what the
//! worker does with the job: retry it later or dead-letter it with a reason. (Success is an
//! [`Outcome`](super::Outcome) and is acked.)

use std::fmt;

use crate::actor::ActorId;
use crate::reason::DeadLetterReason;
use crate::store::StoreError;
use crate::v1::{V1Files, V1Rejection};

/// The step of a migration that failed, recorded in audits and dead letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Inspect,
    Read,
    Validate,
    Begin,
    Stage,
    Finalize,
}

impl Phase {
    pub const ALL: [Phase; 6] =
        [Phase::Inspect, Phase::Read, Phase::Validate, Phase::Begin, Phase::Stage, Phase::Finalize];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Inspect => "inspect",
            Phase::Read => "read",
            Phase::Validate => "validate",
            Phase::Begin => "begin",
            Phase::Stage => "stage",
            Phase::Finalize => "finalize",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with a job whose migration failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// A passing condition: try again later (until the retry budget runs out).
    Retry,
    /// Permanent: dead-letter with this reason.
    DeadLetter(DeadLetterReason),
    /// The job is sound but this worker cannot judge it (its store does not know the job's
    /// campaign): hand it back for later without using an attempt, so a misdirected worker
    /// can neither ack nor exhaust it.
    Defer,
    /// Another copy of the requeued job recorded its outcome first (it cleared the ticket this
    /// copy claimed): ack without an outcome of this copy's; the other's stands.
    Superseded,
}

/// The cause of a failed migration.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error("{0}")]
    Rejected(V1Rejection),
    #[error("v2 head does not decode ({0}); left as it is")]
    CorruptV2Meta(String),
    #[error("migration in progress elsewhere (holder {holder}, lease expires at {expires_at_ms} ms)")]
    InProgressElsewhere { holder: String, expires_at_ms: i64 },
    #[error("v1 changed while it was being migrated")]
    V1Changed,
    #[error("lost the migration to another holder (generation or lease changed)")]
    Fenced,
    #[error(transparent)]
    Store(StoreError),
    #[error("internal: {0}")]
    Internal(String),
    #[error(
        "campaign {campaign} has no record in this worker's store {store}: is the worker pointed at the \
         campaign's store? (handed back for later, no attempt used)"
    )]
    UnknownCampaign { campaign: String, store: String },
    #[error("another copy of this requeued job recorded its outcome first (its ticket is gone)")]
    Superseded,
}

impl From<StoreError> for Cause {
    /// Rows a layout found corrupt are a verdict on the actor, not a store outage: a v1
    /// SQLite key's become its rejection, the head's `corrupt_v2_meta`.
    fn from(e: StoreError) -> Cause {
        if let Some(r) = crate::v1::read::corrupt_rejection(&e) {
            return Cause::Rejected(r);
        }
        if crate::triage::ticket::is_ticket_conflict(&e) {
            return Cause::Superseded;
        }
        match e {
            StoreError::Corrupt { key, detail }
                if key.starts_with(crate::keys::V2_PREFIX) && key.ends_with(b"/META") =>
            {
                Cause::CorruptV2Meta(detail)
            }
            e => Cause::Store(e),
        }
    }
}

impl Cause {
    /// The single place a failure's fate is decided.
    pub fn fate(&self) -> Fate {
        match self {
            Cause::Rejected(r) => Fate::DeadLetter(r.reason()),
            Cause::CorruptV2Meta(_) => Fate::DeadLetter(DeadLetterReason::CorruptV2Meta),
            Cause::InProgressElsewhere { .. } => Fate::Retry,
            Cause::V1Changed => Fate::Retry,
            Cause::Fenced => Fate::Retry,
            Cause::Store(_) => Fate::Retry,
            Cause::Internal(_) => Fate::Retry,
            Cause::UnknownCampaign { .. } => Fate::Defer,
            Cause::Superseded => Fate::Superseded,
        }
    }

    /// Every value [`Cause::kind`] can take: the transient kinds and every reason a
    /// rejection or a corrupt head dead-letters with (the broker's and the runner's own
    /// reasons, `bad_message`, `retries_exhausted` and `delivery_limit`, are no cause).
    pub fn kinds() -> Vec<&'static str> {
        let mut kinds = vec![
            "in_progress_elsewhere",
            "v1_changed",
            "fenced",
            "store_unavailable",
            "store_failed",
            "internal",
            "unknown_campaign",
            "superseded",
        ];
        kinds.extend(
            DeadLetterReason::ALL
                .into_iter()
                .filter(|r| {
                    !matches!(
                        r,
                        DeadLetterReason::BadMessage
                            | DeadLetterReason::RetriesExhausted
                            | DeadLetterReason::DeliveryLimit
                    )
                })
                .map(DeadLetterReason::as_str),
        );
        kinds
    }

    /// A short stable name for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Cause::Rejected(r) => r.reason().as_str(),
            Cause::CorruptV2Meta(_) => "corrupt_v2_meta",
            Cause::InProgressElsewhere { .. } => "in_progress_elsewhere",
            Cause::V1Changed => "v1_changed",
            Cause::Fenced => "fenced",
            // Both retried (a revoked grant or a missing table is fixed by an operator, and
            // the job's retries wait for it), but told apart on the dashboard: an outage passes,
            // a store that refuses (schema, permissions, a limit) pages someone.
            Cause::Store(e) if e.is_transient() => "store_unavailable",
            Cause::Store(_) => "store_failed",
            Cause::Internal(_) => "internal",
            Cause::UnknownCampaign { .. } => "unknown_campaign",
            Cause::Superseded => "superseded",
        }
    }
}

/// A failed migration: which actor, in which phase, why, and the v1 files it saw.
///
/// The display names the cause (dead letters and audit records keep `to_string()`), so the
/// cause is not also its `source`: a `{:#}` chain would print it twice.
#[derive(Debug, thiserror::Error)]
#[error("actor {actor}: {phase}: {cause}")]
pub struct MigrateError {
    pub actor: ActorId,
    pub phase: Phase,
    pub cause: Cause,
    pub files: Option<V1Files>,
}

impl MigrateError {
    pub fn fate(&self) -> Fate {
        self.cause.fate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_and_corrupt_heads_are_dead_lettered_everything_else_retried() {
        let rejected = Cause::Rejected(V1Rejection::JournalSidecar { size: 512 });
        assert_eq!(rejected.fate(), Fate::DeadLetter(DeadLetterReason::JournalSidecar));
        assert_eq!(Cause::CorruptV2Meta("x".into()).fate(), Fate::DeadLetter(DeadLetterReason::CorruptV2Meta));
        for transient in [
            Cause::InProgressElsewhere { holder: "w".into(), expires_at_ms: 0 },
            Cause::V1Changed,
            Cause::Fenced,
            Cause::Store(StoreError::Unavailable { backend: "sqlite", message: "busy".into() }),
            Cause::Store(StoreError::Failed { backend: "postgres", message: "permission denied".into() }),
            Cause::Internal("x".into()),
        ] {
            assert_eq!(transient.fate(), Fate::Retry, "{transient}");
        }
        let misdirected = Cause::UnknownCampaign { campaign: "nov".into(), store: "sqlite:x.db".into() };
        assert_eq!(misdirected.fate(), Fate::Defer);
        let ticket = crate::triage::ticket::key(&crate::ActorId::parse("a-1").unwrap());
        let twin = Cause::from(StoreError::Conflict { index: 2, key: ticket });
        assert_eq!(twin.fate(), Fate::Superseded, "{twin}");
        let other = Cause::from(StoreError::Conflict { index: 0, key: b"ferry/audit/a-1".to_vec() });
        assert_eq!(other.fate(), Fate::Retry, "{other}");
    }

    #[test]
    fn every_cause_kind_is_listed_for_the_metrics_registered_at_start() {
        let kinds = Cause::kinds();
        for cause in [
            Cause::Rejected(V1Rejection::JournalSidecar { size: 1 }),
            Cause::Rejected(V1Rejection::WalSidecar { size: 1 }),
            Cause::Rejected(V1Rejection::ShmSidecar { size: 1 }),
            Cause::Rejected(V1Rejection::MissingMain { detail: String::new() }),
            Cause::Rejected(V1Rejection::BadMeta { file: "main", detail: String::new() }),
            Cause::Rejected(V1Rejection::Oversize { file: "main", size: 2, max: 1 }),
            Cause::Rejected(V1Rejection::ChunkMismatch { file: "main", detail: String::new() }),
            Cause::Rejected(V1Rejection::BadHeader { detail: String::new() }),
            Cause::Rejected(V1Rejection::UnsupportedPageSize { page_size: 512 }),
            Cause::Rejected(V1Rejection::NotPageAligned { size: 1 }),
            Cause::Rejected(V1Rejection::IntegrityCheckFailed { detail: String::new() }),
            Cause::CorruptV2Meta("x".into()),
            Cause::InProgressElsewhere { holder: "w".into(), expires_at_ms: 0 },
            Cause::V1Changed,
            Cause::Fenced,
            Cause::Store(StoreError::Unavailable { backend: "sqlite", message: "busy".into() }),
            Cause::Store(StoreError::Failed { backend: "postgres", message: "permission denied".into() }),
            Cause::Internal("x".into()),
            Cause::UnknownCampaign { campaign: "c".into(), store: "sqlite:x.db".into() },
            Cause::Superseded,
        ] {
            // A new variant does not compile here until it gets a sample above.
            match &cause {
                Cause::Rejected(_)
                | Cause::CorruptV2Meta(_)
                | Cause::InProgressElsewhere { .. }
                | Cause::V1Changed
                | Cause::Fenced
                | Cause::Store(_)
                | Cause::Internal(_)
                | Cause::UnknownCampaign { .. }
                | Cause::Superseded => {}
            }
            assert!(kinds.contains(&cause.kind()), "{} is not in Cause::kinds()", cause.kind());
        }
        assert_eq!(kinds.len(), 20, "one entry per kind: {kinds:?}");
    }
}
