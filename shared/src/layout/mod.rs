//! Layouts (DESIGN.md section 7): how the logical keyspace of section 2 maps onto physical
//! rows. The `ferry` layout is the identity and needs no code. rivet's own layout, byte for
//! byte as rivet's engine writes it at commit c1976e3, is a pure codec (`rivet`, `rivet_id`,
//! `tuple`: its actor id, its tuple element, the v1 pegboard actor-KV rows and the v2
//! sqlite-storage rows) and one store (`rivet_store`, with `udb` for universaldb's concurrency
//! protocol) that speaks logical keys to the rest of ferry and rivet's rows to PostgreSQL.
//!
//! Invariant: nothing outside this module knows a physical rivet key. The migration, the job
//! runner, the queues and triage speak logical keys through [`crate::store::Store`]; they ask
//! [`Layout`] only for what the layout changes in the contract (the quota's key length, the
//! actor ids it accepts, rivet's own in-flight migration).

pub mod rivet;
pub mod rivet_id;
pub mod rivet_store;
pub mod tuple;
mod udb;

/// The UUID type of [`RivetId::new`] and [`RivetId::uuid`] (the tuple crate's), for callers
/// that build or parse ids without depending on that crate.
pub use foundationdb_tuple::Uuid;
pub use rivet_id::{RivetId, RivetIdError};
pub use rivet_store::RivetStore;

use crate::actor::ActorId;

/// Which physical rows a store holds (`--layout`, env `FERRY_LAYOUT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// The logical keys are the physical keys, in one `kv` table (SQLite or PostgreSQL).
    #[default]
    Ferry,
    /// rivet's own rows in its PostgreSQL universaldb: pegboard actor KV (v1) and
    /// sqlite-storage (v2), through universaldb's optimistic concurrency protocol.
    Rivet,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Ferry => "ferry",
            Layout::Rivet => "rivet",
        }
    }

    /// The length the quota rule counts for a logical v2 key (DESIGN.md section 2): the key
    /// inside the layout's v2 space. rivet counts `02 {actor}/...` (sqlite-storage's key
    /// without its subspace); the ferry layout counts the key as stored, `v2/{actor}/...`.
    pub fn quota_key_len(self, logical_v2_key: &[u8]) -> u64 {
        let len = logical_v2_key.len() as u64;
        match self {
            Layout::Ferry => len,
            // `v2/` (3 bytes) becomes the one byte `02`.
            Layout::Rivet => len.saturating_sub((crate::keys::V2_PREFIX.len() - 1) as u64),
        }
    }

    /// Whether `actor` can name an actor of this layout (rivet: a 30-character base36 id).
    pub fn check_actor(self, actor: &ActorId) -> Result<(), RivetIdError> {
        match self {
            Layout::Ferry => Ok(()),
            Layout::Rivet => RivetId::from_actor(actor).map(|_| ()),
        }
    }

    /// Whether a MigratingFromV1 head that no ferry lease covers is someone else's migration
    /// in flight: rivet's own takeover (its only lease is the head's age, DESIGN.md section 7).
    pub fn foreign_migration_window(self) -> Option<std::time::Duration> {
        match self {
            Layout::Ferry => None,
            Layout::Rivet => Some(RIVET_MIGRATION_WINDOW),
        }
    }
}

/// How long rivet's own v1 migration holds an actor: a MigratingFromV1 head younger than this,
/// with no ferry lease, is rivet's in flight.
pub const RIVET_MIGRATION_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
