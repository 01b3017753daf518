//! Requeue tickets: `ferry/requeue/{actor}` marks an actor whose dead letter an operator moved
//! back to work, until a worker has run the requeued job.
//!
//! Invariants: a dead letter becomes a ticket in one transaction (the record and its index
//! entries cleared, the ticket written), so an actor is always in exactly one place in the
//! store, dead or requeued; the job carries the ticket's token in the [`TOKEN_HEADER`], and a
//! worker runs a ticketed job only while the actor's ticket has that token, so a job published
//! twice for one requeue (a `dlq requeue` killed after the publish and run again) runs once;
//! the ticket is cleared in the transaction of the job's outcome (finalize, a skip's audit, or
//! the dead letter that lists the actor again), so no second copy can run after it.

use serde::{Deserialize, Serialize};

use crate::actor::ActorId;
use crate::jobs::DeadLetter;
use crate::recovery::Recovery;
use crate::store::{Store, StoreError, Txn};

/// Where tickets live.
pub const REQUEUE_PREFIX: &[u8] = b"ferry/requeue/";
/// The AMQP header a requeued job carries its ticket's token in.
pub const TOKEN_HEADER: &str = "x-ferry-requeue";

/// One requeue in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// Names this requeue; a job with another token is a leftover of an earlier one.
    pub token: String,
    pub campaign: String,
    pub recovery: Option<Recovery>,
    pub requeued_at_ms: i64,
    /// The dead letter the requeue took the actor from.
    pub dead_letter: DeadLetter,
}

impl Ticket {
    pub fn new(dead: DeadLetter, recovery: Option<Recovery>, now_ms: i64) -> Ticket {
        Ticket {
            token: format!("{:032x}", rand::random::<u128>()),
            campaign: dead.campaign.clone(),
            recovery,
            requeued_at_ms: now_ms,
            dead_letter: dead,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Plain data: serialization cannot fail.
        serde_json::to_vec(self).expect("ticket serializes")
    }

    pub fn decode(raw: &[u8]) -> Option<Ticket> {
        serde_json::from_slice(raw).ok()
    }
}

pub fn key(actor: &ActorId) -> Vec<u8> {
    [REQUEUE_PREFIX, actor.as_bytes()].concat()
}

/// The ticket of a job that carries a token, as its worker found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The actor's ticket has the job's token: run the job; its outcome clears the ticket
    /// (a dead letter or a skip with [`settle`] on this raw ticket, a finalize unchecked).
    Current(Vec<u8>),
    /// No ticket, or one with another token: this job is a second copy of a requeue already
    /// run (or replaced by a newer one) and must not run.
    Stale,
}

/// What the store says of a job requeued under `token`.
pub async fn claim(store: &dyn Store, actor: &ActorId, token: &str) -> Result<Claim, StoreError> {
    Ok(match store.get(&key(actor)).await? {
        Some(raw) if Ticket::decode(&raw).is_some_and(|t| t.token == token) => Claim::Current(raw),
        _ => Claim::Stale,
    })
}

/// Whether `e` is the failed check of a requeue ticket: the ticket a job claimed is gone or
/// replaced (another copy's outcome cleared it), for good, so the job's own outcome is not
/// written and the job is not tried again.
pub fn is_ticket_conflict(e: &StoreError) -> bool {
    matches!(e, StoreError::Conflict { key, .. } if key.starts_with(REQUEUE_PREFIX))
}

/// Adds to `txn` the clearing of the ticket `raw`, checked unchanged.
pub fn settle(txn: &mut Txn, actor: &ActorId, raw: &[u8]) {
    txn.check_value(key(actor), Some(raw.to_vec()));
    txn.clear(key(actor));
}
