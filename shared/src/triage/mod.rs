//! Dead-letter triage (`ferry-producer dlq ...`): reads and moves the dead letters of the
//! triage index (`index`), in fleet and embedded mode alike; the broker is used only to publish
//! requeued jobs.
//!
//! Invariants:
//! - reading never touches the broker: `summary`, `list`, `show` and `export` read the store,
//!   cost what they return (pages through the index, `summary` over 16-byte index entries), and
//!   change nothing;
//! - a requeue moves each dead letter to a ticket in one transaction before its job is
//!   published (`ticket`), so an actor is always dead, requeued or done, never in neither
//!   place, and a job published twice by a killed-and-rerun requeue runs once;
//! - one record per actor: dead letters of the same actor are collapsed when written;
//! - v1 is never modified; a purge writes what it dropped to the actor's audit record.

pub mod index;
mod requeue;
mod sweep;
pub mod ticket;

use lapin::BasicProperties;

use crate::actor::ActorId;
use crate::jobs::DeadLetter;
use crate::jobs::Job;
use crate::jobs::dead::kept_body;
use crate::keys;
use crate::migrate::AuditRecord;
use crate::queue::Topology;
use crate::queue::amqp::{self, AmqpError};
use crate::reason::DeadLetterReason;
use crate::recovery::Recovery;
use crate::store::group::{DEFAULT_GROUP_MAX, commit_each};
use crate::store::{DynStore, Read, ReadResult, StoreError, Txn};

pub use self::index::{Group, LetterId, Page, Selection, Stored, StoredPage};
pub use self::requeue::{Requeued, requeue};
pub use self::sweep::{Swept, sweep};
pub use self::ticket::Ticket;

/// Where requeued jobs go.
#[derive(Clone)]
pub enum Source {
    /// The broker's jobs exchange (fleet mode); connecting waits at most `connect_timeout`.
    Broker { amqp_url: String, topology: Topology, connect_timeout: std::time::Duration },
    /// Re-run in this process against the store (embedded mode).
    Embedded,
}

#[derive(Debug, thiserror::Error)]
pub enum TriageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// lapin's errors display their cause and expose it as source: kept as text only.
    #[error("broker: {0}")]
    Broker(lapin::Error),
    #[error("{0}")]
    Refused(String),
}

impl From<lapin::Error> for TriageError {
    fn from(e: lapin::Error) -> Self {
        TriageError::Broker(e)
    }
}

/// Which dead letters a command acts on.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub reason: Option<DeadLetterReason>,
    pub actors: Vec<String>,
    pub campaign: Option<String>,
    /// Only actors whose id starts with this ([`index::check_actor_prefix`]).
    pub actor_prefix: Option<String>,
}

impl Filter {
    /// The index selection this filter reads (actor ids are checked per letter).
    pub fn selection(&self) -> Selection {
        Selection { reason: self.reason, campaign: self.campaign.clone(), actor_prefix: self.actor_prefix.clone() }
    }

    /// The actors named, when the filter names some: each is read by its key.
    fn named_actors(&self) -> Option<Vec<ActorId>> {
        (!self.actors.is_empty()).then(|| self.actors.iter().filter_map(|a| ActorId::parse(a).ok()).collect())
    }

    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.reason.is_none_or(|r| r == d.reason)
            && (self.actors.is_empty() || self.actors.iter().any(|a| a == &d.actor_id))
            && self.campaign.as_ref().is_none_or(|c| c == &d.campaign)
            && self.actor_prefix.as_deref().is_none_or(|p| index::actor_has_prefix(d, p))
    }
}

/// The dead letter a broker message stands for: ferry's own record, or a job the broker
/// dead-lettered by itself (the delivery limit).
pub fn from_message(props: &BasicProperties, body: &[u8]) -> DeadLetter {
    if let Some(d) = DeadLetter::decode(body) {
        return d;
    }
    let death = amqp::death_reason(props);
    let at_ms = props.timestamp().map_or(0, |t| t as i64 * 1000);
    match Job::parse(body) {
        Ok(job) => DeadLetter {
            actor_id: job.actor_id.to_string(),
            campaign: job.campaign.clone(),
            reason: match death.as_deref() {
                Some("delivery_limit") | None => DeadLetterReason::DeliveryLimit,
                Some(_) => DeadLetterReason::RetriesExhausted,
            },
            phase: "broker".into(),
            error: format!("the broker dead-lettered the job ({})", death.unwrap_or_else(|| "unknown".into())),
            // Only ferry's own retry count: the broker's `x-delivery-count` on this message
            // counts reads of the dead-letter queue (every triage listing), not work attempts.
            attempts: amqp::int_header(props, amqp::ATTEMPTS_HEADER).map_or(0, |n| u32::try_from(n).unwrap_or(0)),
            worker: String::new(),
            at_ms,
            v1_files: None,
            recovery: job.recovery,
            message: kept_body(body),
        },
        Err(bad) => DeadLetter {
            actor_id: String::new(),
            campaign: String::new(),
            reason: DeadLetterReason::BadMessage,
            phase: "parse".into(),
            error: bad.to_string(),
            attempts: 0,
            worker: String::new(),
            at_ms,
            v1_files: None,
            recovery: None,
            message: kept_body(body),
        },
    }
}

/// The header line of [`csv_row`]s.
pub const CSV_HEADER: &str = "actor_id,campaign,reason,phase,attempts,worker,at_ms,main_bytes,journal_bytes,wal_bytes,shm_bytes,recovery,error\n";

/// CSV of dead letters, one row each, header first.
pub fn to_csv(letters: &[DeadLetter]) -> String {
    let mut out = String::from(CSV_HEADER);
    for d in letters {
        out.push_str(&csv_row(d));
    }
    out
}

/// One dead letter as a CSV line.
pub fn csv_row(d: &DeadLetter) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
    }
    let size = |f: fn(&crate::v1::V1Files) -> Option<u64>| {
        d.v1_files.as_ref().and_then(f).map_or(String::new(), |n| n.to_string())
    };
    let row = [
        field(&d.actor_id),
        field(&d.campaign),
        d.reason.as_str().to_string(),
        field(&d.phase),
        d.attempts.to_string(),
        field(&d.worker),
        d.at_ms.to_string(),
        size(|f| f.main),
        size(|f| f.journal),
        size(|f| f.wal),
        size(|f| f.shm),
        d.recovery.map_or(String::new(), |r| r.as_str().to_string()),
        field(&d.error),
    ];
    format!("{}\n", row.join(","))
}

/// The recovery that fits a reason (what `requeue` accepts without `--force`).
pub fn recovery_fits(reason: DeadLetterReason, recovery: Option<Recovery>) -> bool {
    use DeadLetterReason as R;
    match recovery {
        None => true,
        Some(Recovery::RollbackJournal) => reason == R::JournalSidecar,
        Some(Recovery::CheckpointWal) => matches!(reason, R::WalSidecar | R::ShmSidecar),
        Some(Recovery::DiscardShm) => reason == R::ShmSidecar,
        Some(Recovery::Force) => reason == R::IntegrityCheckFailed,
    }
}

/// Up to `limit` dead letters of `filter`, after the cursor `after` (a page's `next`): a page
/// of the index, or of the named actors by their keys, in id order (the cursor is then the
/// last actor id read), so a requeue or purge of more actors than one page moves them all.
pub async fn page(store: &DynStore, filter: &Filter, limit: usize, after: Option<&str>) -> Result<Page, StoreError> {
    Ok(page_stored(store, filter, limit, after).await?.into_page())
}

/// [`page`], with the raw records (what a move checks).
pub(crate) async fn page_stored(
    store: &DynStore,
    filter: &Filter,
    limit: usize,
    after: Option<&str>,
) -> Result<StoredPage, StoreError> {
    let Some(mut actors) = filter.named_actors() else {
        return index::page_stored(&**store, &filter.selection(), limit, after).await;
    };
    actors.sort();
    actors.dedup();
    let start = after.map_or(0, |a| actors.partition_point(|x| x.as_bytes() <= a.as_bytes()));
    let rest = &actors[start..];
    let mut stored = Vec::new();
    let mut read = 0;
    while read < rest.len() && stored.len() < limit {
        if let Some(s) = index::get(&**store, &LetterId::Actor(rest[read].clone())).await?
            && filter.matches(&s.letter)
        {
            stored.push(s);
        }
        read += 1;
    }
    let next = (read > 0 && read < rest.len()).then(|| rest[read - 1].to_string());
    Ok(StoredPage { stored, next })
}

/// Every dead letter of `filter`, one batch in memory at a time, for `export`: one sequential
/// scan of the records (linear in the backlog), or the named actors' keys.
pub async fn each_letter(
    store: &DynStore,
    filter: &Filter,
    mut visit: impl FnMut(&DeadLetter) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    if filter.named_actors().is_some() {
        for d in page(store, filter, usize::MAX, None).await?.letters {
            visit(&d)?;
        }
        return Ok(());
    }
    index::each_record(&**store, |stored| if filter.matches(&stored.letter) { visit(&stored.letter) } else { Ok(()) })
        .await
}

/// Dead letters by reason and campaign, and the requeues still waiting for a worker.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub groups: Vec<Group>,
    pub dead_letters: u64,
    /// Tickets of requeued actors whose job has not run yet.
    pub requeues_pending: u64,
}

pub async fn summary(store: &DynStore) -> Result<Summary, StoreError> {
    let groups = index::summary(&**store).await?;
    let dead_letters = groups.iter().map(|g| g.count).sum();
    let mut requeues_pending = 0;
    let range = crate::store::KeyRange::prefix(ticket::REQUEUE_PREFIX);
    let mut cursor = range.clone();
    loop {
        let keys = store.scan_keys(&cursor, 10_000).await?;
        requeues_pending += keys.len() as u64;
        match keys.last() {
            Some(last) if keys.len() == 10_000 => cursor = cursor.after(last),
            _ => break,
        }
    }
    Ok(Summary { groups, dead_letters, requeues_pending })
}

/// Why a dead letter cannot be requeued as asked, or the actor to requeue.
fn check_requeue(d: &DeadLetter, recovery: Option<Recovery>, force: bool) -> Result<ActorId, String> {
    let actor = ActorId::parse(&d.actor_id).map_err(|e| format!("{}: {e}", d.actor_id))?;
    if d.reason == DeadLetterReason::BadMessage {
        return Err(format!("{}: a bad message cannot be requeued", d.actor_id));
    }
    if !force && !recovery_fits(d.reason, recovery) {
        return Err(format!(
            "{}: recovery {} does not fit reason {} (use --force to requeue anyway)",
            d.actor_id,
            recovery.map_or("none", |r| r.as_str()),
            d.reason
        ));
    }
    Ok(actor)
}

/// Letters a move reads per step.
const MOVE_BATCH: usize = 500;

/// Drops the selected dead letters, noting the purge in each actor's audit record: one
/// transaction per letter (record, index entries and audit together, checking the record and
/// the audit as read), so a killed purge leaves every letter either dropped and noted or
/// untouched, and a letter or audit changed meanwhile is left as it is now. Per page of
/// letters, the actors' audits are read in one call and the transactions committed in groups
/// of the group committer's size ([`commit_each`]: each still fails only itself).
pub async fn purge(store: &DynStore, filter: &Filter) -> Result<u64, StoreError> {
    let mut purged = 0;
    let mut after: Option<String> = None;
    loop {
        let page = page_stored(store, filter, MOVE_BATCH, after.as_deref()).await?;
        let txns = purges(store, &page.stored).await?;
        for (group, letters) in txns.chunks(DEFAULT_GROUP_MAX).zip(page.stored.chunks(DEFAULT_GROUP_MAX)) {
            for (result, stored) in commit_each(&**store, group.to_vec()).await.into_iter().zip(letters) {
                match result {
                    Ok(()) => {
                        purged += 1;
                        if let LetterId::Bad(hash) = LetterId::of(&stored.letter) {
                            // Its id only: a bad message's error text may quote its body.
                            tracing::warn!(letter = %hash, "purged a bad message");
                        }
                    }
                    // Changed since the read: left as it is now.
                    Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(purged),
        }
    }
}

/// The transaction purging each letter of `page` as it was read, the actors' audit records
/// read in one call.
async fn purges(store: &DynStore, page: &[Stored]) -> Result<Vec<Txn>, StoreError> {
    let actors: Vec<Option<ActorId>> = page
        .iter()
        .map(|s| match LetterId::of(&s.letter) {
            LetterId::Actor(actor) => Some(actor),
            LetterId::Bad(_) => None,
        })
        .collect();
    let reads: Vec<Read> = actors.iter().flatten().map(|a| Read::Get(keys::audit(a))).collect();
    let mut audits = store.read_many(&reads).await?.into_iter().map(ReadResult::into_value);
    let mut txns = Vec::with_capacity(page.len());
    for (stored, actor) in page.iter().zip(&actors) {
        let d = &stored.letter;
        let mut txn = Txn::new();
        index::remove(&mut txn, &stored.raw, d);
        // A bad message has no actor, so no audit to note the purge in.
        if let Some(actor) = actor {
            let raw = audits.next().flatten();
            txn.check_value(keys::audit(actor), raw.clone());
            txn.set(keys::audit(actor), purged_audit(actor, d, raw.as_deref()).encode());
        }
        txns.push(txn);
    }
    Ok(txns)
}

/// The actor's audit record noting the purge of `d` (the dead letter's fields when the actor
/// has no audit yet).
fn purged_audit(actor: &ActorId, d: &DeadLetter, raw: Option<&[u8]>) -> AuditRecord {
    let previous = raw.and_then(AuditRecord::decode);
    let mut audit = previous.unwrap_or_else(|| d.audit(actor, d.at_ms));
    audit.purged_at_ms = Some(crate::clock::Clock::now_ms(&crate::clock::SystemClock));
    audit
}

/// Everything known about one actor, for `dlq show`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ActorState {
    pub actor: String,
    /// Its dead letter (none, or one: duplicates are collapsed).
    pub dead_letters: Vec<DeadLetter>,
    /// A requeue of it waiting for a worker.
    pub requeue: Option<Ticket>,
    pub v1_files: crate::v1::V1Files,
    pub v2_head: Option<String>,
    pub lease: Option<String>,
    pub audit: Option<AuditRecord>,
}

/// Point reads of one actor's keys: the same cost whatever the backlog.
pub async fn show(store: &DynStore, actor: &ActorId) -> Result<ActorState, StoreError> {
    let dead_letters =
        index::get(&**store, &LetterId::Actor(actor.clone())).await?.map(|s| s.letter).into_iter().collect();
    let requeue = store.get(&ticket::key(actor)).await?.as_deref().and_then(Ticket::decode);
    // A letter can name an actor the layout has no rows for (a bad message's id on rivet's
    // layout): its records are shown, its v1 and v2 as absent.
    let (v1_files, v2_head) = match store.layout().check_actor(actor) {
        Ok(()) => {
            let probe = crate::v1::read::Probe::run(&**store, actor).await?;
            let head =
                store.get(&crate::v2::keys::meta(actor)).await?.map(|raw| match crate::v2::DBHead::decode(&raw) {
                    Ok(h) => format!("{h:?}"),
                    Err(e) => format!("corrupt: {e}"),
                });
            (probe.files(), head)
        }
        Err(_) => (Default::default(), None),
    };
    let lease = store.get(&keys::lease(actor)).await?.map(|raw| String::from_utf8_lossy(&raw).into_owned());
    let audit = store.get(&keys::audit(actor)).await?.as_deref().and_then(AuditRecord::decode);
    Ok(ActorState { actor: actor.to_string(), dead_letters, requeue, v1_files, v2_head, lease, audit })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Backend, TestStore};

    fn letter(i: usize) -> DeadLetter {
        DeadLetter {
            actor_id: format!("actor-{i:05}"),
            campaign: "c".into(),
            reason: DeadLetterReason::JournalSidecar,
            phase: "read".into(),
            error: "a rollback journal is present".into(),
            attempts: 1,
            worker: "w".into(),
            at_ms: i as i64,
            v1_files: None,
            recovery: None,
            message: String::new(),
        }
    }

    #[tokio::test]
    async fn named_actors_page_past_one_batch_and_a_purge_of_more_than_a_batch_drops_them_all() {
        let store = TestStore::new(Backend::Sqlite).await;
        let mut txn = Txn::new();
        for i in 0..1_300 {
            index::put(&mut txn, None, &letter(i));
        }
        store.store.commit(txn).await.unwrap();
        // Named out of order, one twice, one without a dead letter.
        let mut actors: Vec<String> = (0..1_200).rev().map(|i| format!("actor-{i:05}")).collect();
        actors.push("actor-00007".into());
        actors.push("actor-99999".into());
        let filter = Filter { actors, ..Filter::default() };

        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let p = page(&store.store, &filter, MOVE_BATCH, after.as_deref()).await.unwrap();
            assert!(p.letters.len() <= MOVE_BATCH);
            seen.extend(p.letters.into_iter().map(|d| d.actor_id));
            match p.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let want: Vec<String> = (0..1_200).map(|i| format!("actor-{i:05}")).collect();
        assert_eq!(seen, want);

        assert_eq!(purge(&store.store, &filter).await.unwrap(), 1_200);
        assert_eq!(summary(&store.store).await.unwrap().dead_letters, 100);
    }
}
