//! The dead-letter record: what an operator needs to triage one job (DESIGN.md section 4).
//! Sent as the body of a message on the dead-letter queue, or kept at `ferry/dead/{actor}` in
//! embedded mode.

use serde::{Deserialize, Serialize};

use crate::actor::ActorId;
use crate::migrate::{AuditRecord, OutcomeKind};
use crate::reason::DeadLetterReason;
use crate::recovery::Recovery;
use crate::v1::V1Files;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The actor id as the message named it (raw when the message was bad).
    pub actor_id: String,
    pub campaign: String,
    pub reason: DeadLetterReason,
    pub phase: String,
    pub error: String,
    pub attempts: u32,
    pub worker: String,
    pub at_ms: i64,
    /// Sizes of the v1 files seen, when the store was read.
    pub v1_files: Option<V1Files>,
    pub recovery: Option<Recovery>,
    /// The original message body (lossy UTF-8, truncated), so a requeue can rebuild the job.
    pub message: String,
}

/// How much of a bad message's body a dead letter keeps.
pub const KEPT_MESSAGE_BYTES: usize = 2048;

impl DeadLetter {
    pub fn encode(&self) -> Vec<u8> {
        // Plain data: serialization cannot fail.
        serde_json::to_vec(self).expect("dead letter serializes")
    }

    pub fn decode(bytes: &[u8]) -> Option<DeadLetter> {
        serde_json::from_slice(bytes).ok()
    }

    /// The `dead_lettered` audit record of `actor` this letter stands for, its run started at
    /// `started_at_ms`.
    pub fn audit(&self, actor: &ActorId, started_at_ms: i64) -> AuditRecord {
        AuditRecord {
            actor_id: actor.clone(),
            campaign: self.campaign.clone(),
            outcome: OutcomeKind::DeadLettered,
            reason: Some(self.reason),
            phase: Some(self.phase.clone()),
            error: Some(self.error.clone()),
            recovery: self.recovery,
            pages: None,
            v1_bytes: self.v1_files.as_ref().and_then(|f| f.main),
            checksum: None,
            generation: None,
            worker: self.worker.clone(),
            started_at_ms,
            finished_at_ms: self.at_ms,
            v1_files: self.v1_files.clone(),
            attempts: Some(self.attempts),
            purged_at_ms: None,
            head_txid: None,
        }
    }
}

/// The first bytes of a message body as text, for a dead letter.
pub fn kept_body(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(KEPT_MESSAGE_BYTES)]).into_owned()
}
