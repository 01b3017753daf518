//! The campaign record at `ferry/campaign/{name}`: its definition (filters), the enqueue scan
//! checkpoint and counters. JSON, so operators can read it.
//!
//! Invariant: the checkpoint only ever names an actor whose job, and every job before it, the
//! broker has confirmed; a producer restarted from it never skips an actor and does not
//! publish the confirmed ones again.

use serde::{Deserialize, Serialize};

use crate::keys;
use crate::store::{Store, StoreError, Txn};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignFilters {
    pub actor_prefix: Option<String>,
    /// Set when the campaign enqueues a given list of actor ids instead of a scan.
    pub ids_file: Option<String>,
    pub limit: Option<u64>,
    pub include_migrated: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    Enqueueing,
    Enqueued,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignRecord {
    pub name: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub filters: CampaignFilters,
    pub status: CampaignStatus,
    /// Hex of the raw id of the last actor confirmed (scan mode).
    pub checkpoint: Option<String>,
    /// Ids of the list handled so far (list mode).
    pub ids_done: u64,
    pub published: u64,
    pub skipped: u64,
}

impl CampaignRecord {
    pub fn checkpoint_raw(&self) -> Option<Vec<u8>> {
        self.checkpoint.as_deref().and_then(|h| hex::decode(h).ok())
    }
}

pub async fn load(store: &dyn Store, name: &str) -> Result<Option<CampaignRecord>, StoreError> {
    Ok(store.get(&keys::campaign(name)).await?.and_then(|raw| serde_json::from_slice(&raw).ok()))
}

pub async fn save(store: &dyn Store, record: &CampaignRecord) -> Result<(), StoreError> {
    let mut txn = Txn::new();
    // Plain data: serialization cannot fail.
    txn.set(keys::campaign(&record.name), serde_json::to_vec(record).expect("campaign record serializes"));
    store.commit(txn).await
}
