//! The campaign gate of a fleet worker: a job runs only against a store that holds its
//! campaign's record (`ferry/campaign/{name}`, written by `ferry-producer enqueue` before the
//! first job is published).
//!
//! Invariant: a worker pointed at the wrong store (an empty SQLite file, another schema) never
//! acks a job as a skip there. Such a job is handed back for later without using an attempt
//! (its fate is [`Fate::Defer`](crate::migrate::Fate::Defer)), the worker logs the store it is
//! pointed at, and it reports not ready until a job's campaign is found again.
//!
//! Campaign records are never deleted, so a campaign once found is remembered for the life of
//! the process and costs no further read.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::campaign;
use crate::http::Readiness;
use crate::store::{Store, StoreError};

/// Whether a job's campaign is known to the worker's store.
#[derive(Debug)]
pub enum Admission {
    Known,
    /// The store has no record of this campaign.
    Unknown,
}

/// Remembers the campaigns found in the store and reports a misdirected worker as not ready.
#[derive(Debug, Default)]
pub struct CampaignGate {
    known: Mutex<HashSet<String>>,
    ready: Readiness,
}

impl CampaignGate {
    /// A gate that reports through `ready` (the worker's `/readyz`).
    pub fn new(ready: Readiness) -> CampaignGate {
        CampaignGate { known: Mutex::default(), ready }
    }

    /// Looks the campaign up (once per campaign and process when it exists).
    pub async fn admit(&self, store: &dyn Store, name: &str) -> Result<Admission, StoreError> {
        if self.is_known(name) {
            self.ready.set_misdirected(false);
            return Ok(Admission::Known);
        }
        if campaign::load(store, name).await?.is_none() {
            self.ready.set_misdirected(true);
            return Ok(Admission::Unknown);
        }
        self.known.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
        self.ready.set_misdirected(false);
        Ok(Admission::Known)
    }

    fn is_known(&self, name: &str) -> bool {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::{CampaignFilters, CampaignRecord, CampaignStatus};

    fn record(name: &str) -> CampaignRecord {
        CampaignRecord {
            name: name.into(),
            created_at_ms: 1,
            updated_at_ms: 1,
            filters: CampaignFilters::default(),
            status: CampaignStatus::Enqueued,
            checkpoint: None,
            ids_done: 0,
            published: 0,
            skipped: 0,
        }
    }

    #[tokio::test]
    async fn unknown_campaign_makes_the_worker_unready_until_a_known_one_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("s.db").display());
        let store = crate::store::open(&url, 1).await.unwrap();
        let ready = Readiness::default();
        ready.set(true);
        let gate = CampaignGate::new(ready.clone());

        assert!(matches!(gate.admit(&*store, "nov").await.unwrap(), Admission::Unknown));
        assert!(!ready.get(), "a job of an unknown campaign makes the worker unready");

        campaign::save(&*store, &record("nov")).await.unwrap();
        assert!(matches!(gate.admit(&*store, "nov").await.unwrap(), Admission::Known));
        assert!(ready.get(), "a known campaign makes it ready again");

        // A stray job of an unknown campaign, then the known one again (now from the cache).
        assert!(matches!(gate.admit(&*store, "stray").await.unwrap(), Admission::Unknown));
        assert!(!ready.get());
        assert!(matches!(gate.admit(&*store, "nov").await.unwrap(), Admission::Known));
        assert!(ready.get(), "a remembered campaign makes it ready again too");
    }
}
