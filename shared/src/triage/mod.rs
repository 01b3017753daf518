//! Dead-letter triage (`ferry-producer dlq ...`), on the RabbitMQ dead-letter queue or on the
//! embedded dead letters under `ferry/dead/`.
//!
//! Invariants:
//! - reading the broker's queue never loses a message: messages are fetched without ack and
//!   go back to the queue when the channel closes, even if the command is killed;
//! - moving is confirm-then-ack: a requeued job is confirmed by the broker before its dead
//!   letter is acked, so a message is never in neither queue (at worst in both);
//! - dead letters of the same actor and campaign are collapsed: one job is requeued for them
//!   and all of them are acked;
//! - v1 is never modified; a purge writes what it dropped to the actor's audit record.

pub mod index;

use std::collections::BTreeMap;
use std::sync::Arc;

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

use crate::actor::ActorId;
use crate::budget::MemoryBudget;
use crate::clock::{Clock, SystemClock};
use crate::jobs::dead::kept_body;
use crate::jobs::{DeadLetter, DeadLetterSink, Disposition, Job, JobRunner, RetryPolicy};
use crate::keys;
use crate::migrate::{AuditRecord, MigrateConfig, Migrator};
use crate::queue::Topology;
use crate::queue::amqp::{self, AmqpError};
use crate::queue::topology::WORK_KEY;
use crate::reason::DeadLetterReason;
use crate::recovery::Recovery;
use crate::store::{DynStore, KeyRange, StoreError, Txn, for_each_row};

/// Where the dead letters are.
#[derive(Clone)]
pub enum Source {
    /// The broker's dead queue; connecting waits at most `connect_timeout`.
    Broker {
        amqp_url: String,
        topology: Topology,
        connect_timeout: std::time::Duration,
    },
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
}

impl Filter {
    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.reason.is_none_or(|r| r == d.reason)
            && (self.actors.is_empty() || self.actors.iter().any(|a| a == &d.actor_id))
            && self.campaign.as_ref().is_none_or(|c| c == &d.campaign)
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

/// Dead letters fetched from the broker, unacked until acked here or returned on close.
struct Fetched {
    conn: Connection,
    ch: Channel,
    messages: Vec<(DeadLetter, lapin::Acker)>,
}

impl Fetched {
    async fn fetch(
        amqp_url: &str,
        topology: &Topology,
        connect_timeout: std::time::Duration,
        max: usize,
    ) -> Result<Fetched, TriageError> {
        let conn = amqp::connect_within(amqp_url, "ferry-producer dlq", connect_timeout).await?;
        let ch = amqp::confirm_channel(&conn).await?;
        // Passive: triage declares nothing, so a read-only user (no configure) can run it.
        topology.check_exists(&ch).await?;
        let mut messages = Vec::new();
        while messages.len() < max {
            let Some(m) = ch.basic_get(topology.dead_queue().as_str().into(), BasicGetOptions::default()).await? else {
                break;
            };
            let dead = from_message(&m.delivery.properties, &m.delivery.data);
            messages.push((dead, m.delivery.acker));
        }
        Ok(Fetched { conn, ch, messages })
    }

    /// Closes the channel: every message not acked goes back to the queue.
    async fn release(self) {
        let _ = self.ch.close(200, "triage done".into()).await;
        let _ = self.conn.close(200, "triage done".into()).await;
    }
}

/// Reads every dead letter (the broker's are returned to the queue afterwards).
pub async fn list(store: &DynStore, source: &Source, filter: &Filter) -> Result<Vec<DeadLetter>, TriageError> {
    let all = match source {
        Source::Broker { amqp_url, topology, connect_timeout } => {
            let fetched = Fetched::fetch(amqp_url, topology, *connect_timeout, usize::MAX).await?;
            let letters: Vec<DeadLetter> = fetched.messages.iter().map(|(d, _)| d.clone()).collect();
            fetched.release().await;
            letters
        }
        Source::Embedded => embedded_letters(store).await?.into_iter().map(|(_, d)| d).collect(),
    };
    Ok(all.into_iter().filter(|d: &DeadLetter| filter.matches(d)).collect())
}

async fn embedded_letters(store: &DynStore) -> Result<Vec<(Vec<u8>, DeadLetter)>, StoreError> {
    let mut out = Vec::new();
    for_each_row(&**store, &KeyRange::prefix(keys::DEAD_PREFIX), 1024, |_, raw| {
        if let Some(d) = DeadLetter::decode(&raw) {
            out.push((raw, d));
        }
        Ok(())
    })
    .await?;
    Ok(out)
}

/// Dead letters grouped by reason and campaign.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Group {
    pub reason: String,
    pub campaign: String,
    pub count: u64,
    pub actors: u64,
    pub oldest_ms: i64,
    pub newest_ms: i64,
    pub v1_bytes: u64,
}

pub fn summarize(letters: &[DeadLetter]) -> Vec<Group> {
    let mut groups: BTreeMap<(String, String), (Group, std::collections::BTreeSet<String>)> = BTreeMap::new();
    for d in letters {
        let key = (d.reason.as_str().to_string(), d.campaign.clone());
        let (g, actors) = groups.entry(key.clone()).or_insert_with(|| {
            (
                Group { reason: key.0.clone(), campaign: key.1.clone(), oldest_ms: i64::MAX, ..Group::default() },
                Default::default(),
            )
        });
        g.count += 1;
        g.oldest_ms = g.oldest_ms.min(d.at_ms);
        g.newest_ms = g.newest_ms.max(d.at_ms);
        if actors.insert(d.actor_id.clone()) {
            g.v1_bytes += d.v1_files.as_ref().map_or(0, |f| f.total());
        }
        g.actors = actors.len() as u64;
    }
    groups.into_values().map(|(g, _)| g).collect()
}

/// CSV of dead letters, one row each.
pub fn to_csv(letters: &[DeadLetter]) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
    }
    let mut out = String::from(
        "actor_id,campaign,reason,phase,attempts,worker,at_ms,main_bytes,journal_bytes,wal_bytes,shm_bytes,recovery,error\n",
    );
    for d in letters {
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
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
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

/// What a requeue did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Requeued {
    /// Actors given a new job (broker) or re-run (embedded).
    pub actors: Vec<String>,
    /// Dead letters acked (duplicates of an actor included).
    pub dead_letters_removed: u64,
    /// Embedded re-runs: the outcome of each.
    pub outcomes: BTreeMap<String, String>,
    pub skipped: Vec<String>,
}

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

/// Moves the selected dead letters back to work with `recovery`.
pub async fn requeue(
    store: &DynStore,
    source: &Source,
    filter: &Filter,
    recovery: Option<Recovery>,
    force: bool,
) -> Result<Requeued, TriageError> {
    match source {
        Source::Broker { amqp_url, topology, connect_timeout } => {
            requeue_broker(amqp_url, topology, *connect_timeout, filter, recovery, force).await
        }
        Source::Embedded => requeue_embedded(store, filter, recovery, force).await,
    }
}

async fn requeue_broker(
    amqp_url: &str,
    topology: &Topology,
    connect_timeout: std::time::Duration,
    filter: &Filter,
    recovery: Option<Recovery>,
    force: bool,
) -> Result<Requeued, TriageError> {
    let fetched = Fetched::fetch(amqp_url, topology, connect_timeout, usize::MAX).await?;
    let mut by_actor: BTreeMap<(String, String), Vec<&lapin::Acker>> = BTreeMap::new();
    let mut out = Requeued::default();
    for (d, acker) in &fetched.messages {
        if !filter.matches(d) {
            continue;
        }
        match check_requeue(d, recovery, force) {
            Ok(_) => by_actor.entry((d.campaign.clone(), d.actor_id.clone())).or_default().push(acker),
            Err(why) => out.skipped.push(why),
        }
    }
    let result = async {
        for ((campaign, actor), ackers) in &by_actor {
            // Checked by check_requeue above.
            let id = ActorId::parse(actor).expect("validated actor id");
            let job = Job::new(campaign, id, SystemClock.now_ms(), recovery);
            let props = amqp::json_properties(&job.message_id(), FieldTable::default());
            amqp::publish_confirmed(&fetched.ch, &topology.jobs_exchange(), WORK_KEY, &job.encode(), props).await?;
            for acker in ackers {
                acker.ack(BasicAckOptions::default()).await?;
                out.dead_letters_removed += 1;
            }
            out.actors.push(actor.clone());
        }
        Ok::<(), TriageError>(())
    }
    .await;
    fetched.release().await;
    result.map(|()| out)
}

async fn requeue_embedded(
    store: &DynStore,
    filter: &Filter,
    recovery: Option<Recovery>,
    force: bool,
) -> Result<Requeued, TriageError> {
    let runner = JobRunner {
        migrator: Migrator::new(
            store.clone(),
            Arc::new(SystemClock),
            MigrateConfig { worker_id: crate::telemetry::default_worker_id(), ..MigrateConfig::default() },
        ),
        retry: RetryPolicy { max_attempts: 3, ..RetryPolicy::default() },
        sink: DeadLetterSink::Store,
        budget: MemoryBudget::new(1 << 30),
        gate: None,
    };
    let mut out = Requeued::default();
    for (raw, d) in embedded_letters(store).await? {
        if !filter.matches(&d) {
            continue;
        }
        let actor = match check_requeue(&d, recovery, force) {
            Ok(a) => a,
            Err(why) => {
                out.skipped.push(why);
                continue;
            }
        };
        let job = Job::new(&d.campaign, actor.clone(), SystemClock.now_ms(), recovery);
        let mut attempts = 1;
        let outcome = loop {
            match runner.run_job(&job, attempts).await {
                Disposition::Retry { delay, .. } if attempts < runner.retry.max_attempts => {
                    tokio::time::sleep(delay.min(std::time::Duration::from_secs(2))).await;
                    attempts += 1;
                }
                Disposition::Retry { error, .. } => break format!("still failing: {error}"),
                Disposition::Ack(o) => {
                    // The job succeeded: its old dead letter goes, if nobody replaced it.
                    let mut txn = Txn::new();
                    txn.check_value(keys::dead(&actor), Some(raw.clone()));
                    txn.clear(keys::dead(&actor));
                    if store.commit(txn).await.is_ok() {
                        out.dead_letters_removed += 1;
                    }
                    break o.kind().as_str().to_string();
                }
                Disposition::DeadLetter(again) => break format!("dead_lettered: {}", again.reason),
            }
        };
        out.outcomes.insert(actor.to_string(), outcome);
        out.actors.push(actor.to_string());
    }
    Ok(out)
}

/// Drops the selected dead letters, noting the purge in each actor's audit record.
pub async fn purge(store: &DynStore, source: &Source, filter: &Filter) -> Result<u64, TriageError> {
    let mut purged = 0;
    match source {
        Source::Broker { amqp_url, topology, connect_timeout } => {
            let fetched = Fetched::fetch(amqp_url, topology, *connect_timeout, usize::MAX).await?;
            let result = async {
                for (d, acker) in &fetched.messages {
                    if filter.matches(d) {
                        note_purge(store, d).await?;
                        acker.ack(BasicAckOptions::default()).await?;
                        purged += 1;
                    }
                }
                Ok::<(), TriageError>(())
            }
            .await;
            fetched.release().await;
            result?;
        }
        Source::Embedded => {
            for (_, d) in embedded_letters(store).await? {
                if filter.matches(&d) {
                    note_purge(store, &d).await?;
                    if let Ok(actor) = ActorId::parse(&d.actor_id) {
                        let mut txn = Txn::new();
                        txn.clear(keys::dead(&actor));
                        store.commit(txn).await?;
                    }
                    purged += 1;
                }
            }
        }
    }
    Ok(purged)
}

/// Records a purge in the actor's audit record (a bad message has no actor to record it on).
async fn note_purge(store: &DynStore, d: &DeadLetter) -> Result<(), StoreError> {
    let Ok(actor) = ActorId::parse(&d.actor_id) else {
        tracing::warn!(error = %d.error, "purged a bad message");
        return Ok(());
    };
    let now = SystemClock.now_ms();
    let previous = store.get(&keys::audit(&actor)).await?.as_deref().and_then(AuditRecord::decode);
    let mut audit = previous.unwrap_or(AuditRecord {
        actor_id: actor.clone(),
        campaign: d.campaign.clone(),
        outcome: crate::migrate::OutcomeKind::DeadLettered,
        reason: Some(d.reason),
        phase: Some(d.phase.clone()),
        error: Some(d.error.clone()),
        recovery: d.recovery,
        pages: None,
        v1_bytes: d.v1_files.as_ref().and_then(|f| f.main),
        checksum: None,
        generation: None,
        worker: d.worker.clone(),
        started_at_ms: d.at_ms,
        finished_at_ms: d.at_ms,
        v1_files: d.v1_files.clone(),
        attempts: Some(d.attempts),
        purged_at_ms: None,
    });
    audit.purged_at_ms = Some(now);
    let mut txn = Txn::new();
    txn.set(keys::audit(&actor), audit.encode());
    store.commit(txn).await
}

/// Everything known about one actor, for `dlq show`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ActorState {
    pub actor: String,
    pub dead_letters: Vec<DeadLetter>,
    pub v1_files: crate::v1::V1Files,
    pub v2_head: Option<String>,
    pub lease: Option<String>,
    pub audit: Option<AuditRecord>,
}

pub async fn show(store: &DynStore, source: &Source, actor: &ActorId) -> Result<ActorState, TriageError> {
    let filter = Filter { actors: vec![actor.to_string()], ..Filter::default() };
    let dead_letters = list(store, source, &filter).await?;
    let probe = crate::v1::read::Probe::run(&**store, actor).await?;
    let v2_head = store.get(&crate::v2::keys::meta(actor)).await?.map(|raw| match crate::v2::DBHead::decode(&raw) {
        Ok(h) => format!("{h:?}"),
        Err(e) => format!("corrupt: {e}"),
    });
    let lease = store.get(&keys::lease(actor)).await?.map(|raw| String::from_utf8_lossy(&raw).into_owned());
    let audit = store.get(&keys::audit(actor)).await?.as_deref().and_then(AuditRecord::decode);
    Ok(ActorState { actor: actor.to_string(), dead_letters, v1_files: probe.files(), v2_head, lease, audit })
}
