//! The migration lease at `ferry/lease/{actor}`: who holds the migration of an actor, at which
//! generation, until when. JSON, so operators can read it.
//!
//! Invariant: a lease is only ever replaced by a transaction that checked the exact bytes it
//! replaces, so two holders can never both believe they hold it.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// `{worker id}#{attempt nonce}`: unique per migration attempt.
    pub holder: String,
    pub generation: u64,
    pub expires_at_ms: i64,
}

impl Lease {
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        serde_json::to_vec(self).expect("lease serializes")
    }

    /// A lease that does not decode is treated as expired: it protects nothing.
    pub fn decode(bytes: &[u8]) -> Option<Lease> {
        serde_json::from_slice(bytes).ok()
    }

    pub fn is_live(&self, now_ms: i64) -> bool {
        self.expires_at_ms > now_ms
    }
}
