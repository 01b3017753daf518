//! `ferry-producer verify`: for migrated actors, rebuild the file from v2, compare it with v1
//! and with the checksum recorded at migration, and run quick_check on it. Reports v2
//! corruption and v1 drift (v1 changed after it was migrated), and tells a v2 the actor has
//! written since (its head past the migration's txid, recorded in the audit) from a corrupt
//! one: the runtime's own commits and compaction are not ferry's layout. Reads only.

use std::collections::BTreeMap;

use futures::StreamExt;

use crate::actor::ActorId;
use crate::checksum::DatabaseChecksum;
use crate::keys;
use crate::migrate::{AuditRecord, OutcomeKind};
use crate::store::{KeyRange, Store, StoreError, for_each_row};
use crate::v1::{ReadOptions, read_v1};
use crate::v2::head::{DBHead, Origin, PAGE_SIZE};
use crate::v2::read_v2;

/// What verification found for one actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// v2 decodes, matches the migration's checksum, passes quick_check, and equals v1.
    Ok,
    /// v2 is intact but v1 differs from it now: v1 changed after the migration.
    V1Drift,
    /// v2 does not decode, fails quick_check, or differs from what was migrated.
    V2Corrupt,
    /// The actor's v2 head is not MigratedFromV1.
    NotMigrated,
    /// The v2 head moved past the txid the migration committed: the actor has written v2 since
    /// (its runtime resumed), so v2 is no longer the migrated copy and is not compared with v1
    /// or the migration's checksum. Where ferry's reader can still rebuild the file it must
    /// pass quick_check (else `V2Corrupt`); the runtime's own layout (deltas of dirty pages,
    /// compacted shards) it cannot rebuild. Not a mismatch. A head behind that txid is
    /// corruption.
    V2MovedOn,
}

impl Verdict {
    /// Whether the verdict is a finding: v2 or v1 is not what the migration left, where it
    /// should be. An actor that moved on is reported, not counted as one.
    pub fn is_mismatch(self) -> bool {
        match self {
            Verdict::Ok | Verdict::V2MovedOn => false,
            Verdict::V1Drift | Verdict::V2Corrupt | Verdict::NotMigrated => true,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ActorVerdict {
    pub actor: String,
    pub verdict: Verdict,
    pub detail: Option<String>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub counts: BTreeMap<String, u64>,
    /// Every actor whose verdict is not `ok` (`v2_moved_on` included: listed, not a mismatch).
    pub problems: Vec<ActorVerdict>,
}

impl VerifyReport {
    /// No mismatch ([`Verdict::is_mismatch`]): every actor checked is `ok` or moved on.
    pub fn clean(&self) -> bool {
        self.mismatches() == 0
    }

    /// Actors whose verdict is a mismatch.
    pub fn mismatches(&self) -> usize {
        self.problems.iter().filter(|p| p.verdict.is_mismatch()).count()
    }

    /// Actors that have written v2 since their migration ([`Verdict::V2MovedOn`]).
    pub fn moved_on(&self) -> usize {
        self.problems.iter().filter(|p| p.verdict == Verdict::V2MovedOn).count()
    }
}

/// Which actors to verify.
#[derive(Clone, Debug)]
pub enum Selection {
    /// Every actor whose audit says migrated (or skipped as already migrated).
    All,
    Campaign(String),
    Actors(Vec<ActorId>),
}

async fn selected(store: &dyn Store, sel: &Selection) -> Result<Vec<(ActorId, Option<AuditRecord>)>, StoreError> {
    if let Selection::Actors(ids) = sel {
        let mut out = Vec::new();
        for id in ids {
            let audit = store.get(&keys::audit(id)).await?.as_deref().and_then(AuditRecord::decode);
            out.push((id.clone(), audit));
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    for_each_row(store, &KeyRange::prefix(keys::AUDIT_PREFIX), 2048, |_, raw| {
        if let Some(a) = AuditRecord::decode(&raw) {
            let migrated = matches!(a.outcome, OutcomeKind::Migrated | OutcomeKind::SkippedAlreadyMigrated);
            let in_campaign = match sel {
                Selection::Campaign(c) => &a.campaign == c,
                _ => true,
            };
            if migrated && in_campaign {
                out.push((a.actor_id.clone(), Some(a)));
            }
        }
        Ok(())
    })
    .await?;
    Ok(out)
}

/// Verifies one actor.
pub async fn verify_actor(store: &dyn Store, actor: &ActorId, audit: Option<&AuditRecord>) -> ActorVerdict {
    let verdict = |verdict, detail: Option<String>| ActorVerdict { actor: actor.to_string(), verdict, detail };
    match store.get(&crate::v2::keys::meta(actor)).await {
        Ok(Some(raw)) => match DBHead::decode(&raw) {
            Ok(h) if h.origin == Origin::MigratedFromV1 => {
                // txids only grow: past the migration's, the runtime committed; behind it,
                // something rewrote the head.
                match audit.and_then(|a| a.head_txid) {
                    Some(migrated) if h.head_txid > migrated => {
                        let (v, detail) = moved_on(store, actor, h.head_txid, migrated).await;
                        return verdict(v, Some(detail));
                    }
                    Some(migrated) if h.head_txid < migrated => {
                        let detail = format!("v2 head txid {} is behind the migration's {migrated}", h.head_txid);
                        return verdict(Verdict::V2Corrupt, Some(detail));
                    }
                    _ => {}
                }
            }
            Ok(h) => return verdict(Verdict::NotMigrated, Some(format!("v2 head origin is {}", h.origin.as_str()))),
            Err(e) => return verdict(Verdict::V2Corrupt, Some(e.to_string())),
        },
        Ok(None) => return verdict(Verdict::NotMigrated, Some("no v2 head".into())),
        Err(e) => return verdict(Verdict::V2Corrupt, Some(format!("store: {e}"))),
    }
    let v2 = match read_v2(store, actor).await {
        Ok(v2) => v2,
        Err(e) => return verdict(Verdict::V2Corrupt, Some(e.to_string())),
    };
    let checksum = DatabaseChecksum::of_file(&v2.file, PAGE_SIZE as usize).hex();
    if let Some(expected) = audit.and_then(|a| a.checksum.as_deref())
        && expected != checksum
    {
        return verdict(
            Verdict::V2Corrupt,
            Some(format!("checksum {checksum} differs from the migration's {expected}")),
        );
    }
    if let Err(problem) = quick_checked(v2.file.clone()).await {
        return verdict(Verdict::V2Corrupt, Some(problem));
    }
    // A migration that replayed a journal or WAL is compared with v1 replayed the same way.
    let recovery = audit.and_then(|a| a.recovery);
    let opts = ReadOptions { max_size: u64::MAX >> 8, recovery, ignore_sidecars: true };
    let v1_main = match read_v1(store, actor, opts).await {
        Ok(v1) => match v1.sidecar {
            Some((tag, bytes)) => {
                let main = v1.main;
                match tokio::task::spawn_blocking(move || crate::v1::recover::recover(&main, tag, &bytes)).await {
                    Ok(Ok(recovered)) => recovered,
                    Ok(Err(e)) => return verdict(Verdict::V1Drift, Some(format!("v1 no longer recovers: {e}"))),
                    Err(e) => return verdict(Verdict::V1Drift, Some(format!("recovery task: {e}"))),
                }
            }
            None => v1.main,
        },
        Err(e) => return verdict(Verdict::V1Drift, Some(format!("v1 no longer reads as it did: {e}"))),
    };
    if v1_main == v2.file {
        verdict(Verdict::Ok, None)
    } else {
        let detail = format!("v1 main file ({} bytes) differs from v2 ({} bytes)", v1_main.len(), v2.file.len());
        verdict(Verdict::V1Drift, Some(detail))
    }
}

/// The verdict on an actor whose head moved past the migration's txid: rebuilt and
/// quick_checked where ferry's reader can rebuild it, else only reported.
async fn moved_on(store: &dyn Store, actor: &ActorId, head_txid: u64, migrated: u64) -> (Verdict, String) {
    let since = format!("v2 head txid {head_txid} is past the migration's {migrated}: the actor has written v2 since");
    let v2 = match read_v2(store, actor).await {
        Ok(v2) => v2,
        Err(e) => return (Verdict::V2MovedOn, format!("{since}; not rebuilt, its layout is the runtime's ({e})")),
    };
    match quick_checked(v2.file).await {
        Ok(()) => (Verdict::V2MovedOn, format!("{since}; it passes quick_check")),
        Err(problem) => (Verdict::V2Corrupt, format!("{since}, and it fails quick_check: {problem}")),
    }
}

/// quick_check of a rebuilt file, off the async threads; what it found, or why it could not run.
async fn quick_checked(mut file: Vec<u8>) -> Result<(), String> {
    match tokio::task::spawn_blocking(move || crate::v1::check::quick_check(&mut file)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(problem)) => Err(problem.to_string()),
        Err(e) => Err(format!("quick_check task: {e}")),
    }
}

/// Verifies the selection, a few actors at a time.
pub async fn verify(
    store: &dyn Store,
    sel: &Selection,
    mut progress: impl FnMut(),
) -> Result<VerifyReport, StoreError> {
    let actors = selected(store, sel).await?;
    let mut report = VerifyReport::default();
    // Owned items: a closure over borrowed ones makes the future not provably Send (the
    // console awaits it in a server task).
    let mut results = futures::stream::iter(actors)
        .map(|(id, audit)| async move { verify_actor(store, &id, audit.as_ref()).await })
        .buffered(4);
    while let Some(v) = results.next().await {
        progress();
        report.checked += 1;
        let name =
            serde_json::to_value(v.verdict).ok().and_then(|j| j.as_str().map(str::to_string)).unwrap_or_default();
        *report.counts.entry(name).or_default() += 1;
        if v.verdict != Verdict::Ok {
            report.problems.push(v);
        }
    }
    Ok(report)
}
