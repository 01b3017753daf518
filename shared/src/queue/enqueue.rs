//! `ferry-producer enqueue`: scans the store (or reads a list of ids) and publishes one job per
//! actor with publisher confirms, pipelined, rate-limited, and resumable from the campaign's
//! checkpoint.
//!
//! The scan runs ahead of the publisher in its own task, so store lookups and broker round
//! trips overlap; confirms are awaited in order through a bounded window.
//!
//! Invariants:
//! - The checkpoint never passes an unconfirmed job: skipped actors settle in order with the
//!   confirms around them.
//! - No store call is ever left unpolled while it holds a pooled connection. The scanner
//!   awaits its own scan call to the end before it hands anything over, and each actor's
//!   checks run in a spawned task that the runtime drives whatever the scanner waits for; so
//!   when the publisher falls behind and the scanner blocks on the full channel, every
//!   connection comes back to the pool, and the publisher's checkpoint save gets one. (Holding
//!   the checks in a `buffered` stream that stopped being polled starved the save on
//!   PostgreSQL's pool for its 30 s wait past about 4,096 actors.)
//! - A transient failure (see [`EnqueueError::is_transient`]) ends an attempt, not the run: a
//!   new attempt reopens the store and the broker after a backoff and resumes from the
//!   checkpoint as stored; only a permanent error, or failing for the whole retry budget with no
//!   checkpoint saved, ends the run. Jobs confirmed after the last saved checkpoint are
//!   published again (the workers collapse duplicates); the summary counts each actor once.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, TryStreamExt};
use lapin::PublisherConfirm;
use lapin::types::FieldTable;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::actor::ActorId;
use crate::campaign::{self, CampaignFilters, CampaignRecord, CampaignStatus};
use crate::clock::{Clock, SystemClock};
use crate::jobs::Job;
use crate::migrate::audit::{self, AuditRecord, OutcomeKind};
use crate::progress::Progress;
use crate::recovery::Recovery;
use crate::scan::ActorScan;
use crate::store::{self, DynStore, Read, ReadResult, StoreError};
use crate::v2::{DBHead, Origin};

use super::amqp::{self, AmqpError};
use super::topology::{Topology, WORK_KEY};

/// Confirms awaited at once.
const CONFIRM_WINDOW: usize = 2048;
/// How often the checkpoint is written: every so many confirmed jobs, or this often.
const CHECKPOINT_EVERY: u64 = 1000;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of an enqueue run.
#[derive(Clone, Debug)]
pub struct EnqueueConfig {
    pub store_url: String,
    /// The store's layout (`--layout`).
    pub layout: crate::layout::Layout,
    pub amqp_url: String,
    /// How long connecting to the broker (TCP and handshake) may take.
    pub amqp_connect_timeout: Duration,
    pub topology: Topology,
    pub campaign: String,
    pub filters: CampaignFilters,
    /// Ids to enqueue instead of a scan (from `--ids-file`).
    pub ids: Option<Vec<ActorId>>,
    /// Jobs per second at most.
    pub rate: Option<f64>,
    pub recovery: Option<Recovery>,
    pub progress: bool,
    /// How long the store and the broker may keep failing transiently, with no checkpoint
    /// saved, before the run gives up.
    pub retry_budget: Duration,
}

/// The default of [`EnqueueConfig::retry_budget`]: long enough for a broker or PostgreSQL
/// restart or failover.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("campaign name {0:?} is invalid: 1 to 128 bytes of [A-Za-z0-9_.-]")]
    BadCampaign(String),
    #[error("campaign {0} exists with other filters; use another name")]
    FiltersChanged(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// lapin's errors display their cause and expose it as source: kept as text only.
    #[error("broker: {0}")]
    Broker(lapin::Error),
    #[error("invalid AMQP URL: {0}")]
    InvalidAmqpUrl(String),
    #[error("still failing after the retry budget of {} s", budget.as_secs())]
    RetryBudgetSpent {
        budget: Duration,
        #[source]
        last: Box<EnqueueError>,
    },
}

impl From<lapin::Error> for EnqueueError {
    fn from(e: lapin::Error) -> Self {
        EnqueueError::Broker(e)
    }
}

impl EnqueueError {
    /// Whether a new attempt (the store reopened, the broker reconnected) can succeed: the
    /// one place a failure of the run is judged transient or permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            EnqueueError::Store(e) => e.is_transient(),
            EnqueueError::Amqp(e) => e.is_transient(),
            EnqueueError::Broker(e) => amqp::is_transient(e),
            EnqueueError::BadCampaign(_)
            | EnqueueError::FiltersChanged(_)
            | EnqueueError::InvalidAmqpUrl(_)
            | EnqueueError::RetryBudgetSpent { .. } => false,
        }
    }

    /// The URL of the service that failed, if one did (logged redacted).
    fn failing_url<'c>(&self, cfg: &'c EnqueueConfig) -> Option<&'c str> {
        match self {
            EnqueueError::Store(_) => Some(&cfg.store_url),
            EnqueueError::Amqp(_) | EnqueueError::Broker(_) | EnqueueError::InvalidAmqpUrl(_) => Some(&cfg.amqp_url),
            EnqueueError::RetryBudgetSpent { last, .. } => last.failing_url(cfg),
            EnqueueError::BadCampaign(_) | EnqueueError::FiltersChanged(_) => None,
        }
    }
}

/// What an enqueue run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EnqueueSummary {
    pub campaign: String,
    pub resumed: bool,
    pub scanned: u64,
    pub published: u64,
    pub skipped_no_v1: u64,
    pub skipped_migrated: u64,
    pub skipped_native_v2: u64,
    pub skipped_invalid_id: u64,
    /// The whole run, connecting and declaring the topology included.
    pub seconds: f64,
    pub jobs_per_second: f64,
    /// Of `seconds`, the time spent scanning, publishing and settling confirms (each attempt's
    /// own, connecting, declaring and closing left out): the campaign's steady pace is
    /// `published / publishing_seconds`.
    pub publishing_seconds: f64,
    pub completed: bool,
}

/// What the scanner hands the publisher.
enum Item {
    Publish { actor: ActorId, resume: Resume },
    Skipped { kind: SkipKind, resume: Resume },
}

/// Where to resume after an item.
#[derive(Clone)]
enum Resume {
    After(Vec<u8>),
    Index(u64),
}

#[derive(Clone, Copy)]
enum SkipKind {
    NoV1,
    Native,
    Migrated,
    InvalidId,
}

/// The `worker` of the audit records the producer writes for the actors it skips.
pub const PRODUCER_WORKER: &str = "ferry-producer";

/// The AMQP `connection_name` of an enqueue run.
pub fn producer_connection_name(campaign: &str) -> String {
    format!("ferry-producer {campaign}")
}

/// Whether an actor gets a job: it has v1 SQLite data and, unless asked, no finished v2 (its
/// head as read). A skip comes with the v2 head that caused it.
fn wanted(has_sqlite: bool, head_raw: Option<&[u8]>, include_migrated: bool) -> Option<(SkipKind, Option<DBHead>)> {
    if !has_sqlite {
        return Some((SkipKind::NoV1, None));
    }
    if include_migrated {
        return None;
    }
    let head = head_raw.and_then(|raw| DBHead::decode(raw).ok());
    match head.as_ref().map(|h| h.origin) {
        // As a worker records it: a native head is not ferry's, its fields are not copied.
        Some(Origin::Native) => Some((SkipKind::Native, None)),
        Some(Origin::MigratedFromV1) => Some((SkipKind::Migrated, head)),
        Some(Origin::MigratingFromV1) | None => None,
    }
}

/// The audit of an actor skipped at enqueue, as a worker would have written it had it been sent
/// a job, so every scanned actor ends with an outcome (`None`: an invalid id has no audit key).
fn skip_audit(campaign: &str, actor: &ActorId, kind: SkipKind, head: Option<&DBHead>) -> Option<AuditRecord> {
    let outcome = match kind {
        SkipKind::NoV1 => OutcomeKind::SkippedNoV1,
        SkipKind::Native => OutcomeKind::SkippedNativeV2,
        SkipKind::Migrated => OutcomeKind::SkippedAlreadyMigrated,
        SkipKind::InvalidId => return None,
    };
    let now = SystemClock.now_ms();
    Some(AuditRecord::skipped(actor, campaign, outcome, head, PRODUCER_WORKER, (now, now)))
}

/// An actor the scan found: its id (or not a valid one), whether it has v1 SQLite data when
/// the scan knows, and where to resume after it.
type Found = (Result<ActorId, ()>, Option<bool>, Resume);

/// Actors classified together: their heads (and, where the scan did not see it, whether they
/// have v1 SQLite data) are read in one call to the store ([`store::Store::read_many`]), and
/// their skip audits committed in one group ([`store::Store::commit_many`]).
const CLASSIFY_BATCH: usize = 256;
/// Batches whose classification runs at once while scanning (order is kept).
const BATCHES_AHEAD: usize = 4;
/// Skips of already-migrated actors recorded at once (each reads the audit it keeps fields of).
const MIGRATED_SKIPS_AT_ONCE: usize = 16;
/// Classified actors waiting for the publisher.
const SCAN_AHEAD: usize = 4096;

/// Where the actors come from: the id list or the keyspace scan.
enum Source<'a> {
    Ids(std::iter::Skip<std::iter::Enumerate<std::vec::IntoIter<ActorId>>>),
    Scan(ActorScan<'a>),
}

impl Source<'_> {
    /// The next actor; at most one store call, awaited to its end.
    async fn next(&mut self) -> Result<Option<Found>, StoreError> {
        match self {
            Source::Ids(ids) => Ok(ids.next().map(|(i, a)| (Ok(a), None, Resume::Index(i as u64 + 1)))),
            Source::Scan(scan) => {
                Ok(scan.next().await?.map(|f| (f.id.map_err(|_| ()), f.has_sqlite, Resume::After(f.raw))))
            }
        }
    }
}

/// Classifies a batch of actors, in order: one read for all of their store checks, then the
/// skips' audit records, durable before any item is handed over.
async fn classify(
    store: DynStore,
    campaign: Arc<str>,
    include_migrated: bool,
    batch: Vec<Found>,
) -> Result<Vec<Item>, StoreError> {
    // For each actor: where its "has SQLite data" probe and its head are in `reads`.
    let mut reads = Vec::new();
    let mut slots = Vec::with_capacity(batch.len());
    for (id, has_sqlite, _) in &batch {
        let Ok(actor) = id else {
            slots.push((None, None));
            continue;
        };
        let probe = has_sqlite.is_none().then(|| {
            reads.push(Read::Scan { range: crate::v1::keys::sqlite_range(actor), limit: 1 });
            reads.len() - 1
        });
        let head = (!include_migrated && *has_sqlite != Some(false)).then(|| {
            reads.push(Read::Get(crate::v2::keys::meta(actor)));
            reads.len() - 1
        });
        slots.push((probe, head));
    }
    let answers = if reads.is_empty() { Vec::new() } else { store.read_many(&reads).await? };
    let mut answers: Vec<Option<ReadResult>> = answers.into_iter().map(Some).collect();
    let mut take = |slot: Option<usize>| slot.and_then(|i| answers.get_mut(i).and_then(Option::take));
    let mut items = Vec::with_capacity(batch.len());
    let mut plain_skips = Vec::new();
    let mut migrated_skips = Vec::new();
    for ((id, has_sqlite, resume), (probe, head)) in batch.into_iter().zip(slots) {
        let Ok(actor) = id else {
            items.push(Item::Skipped { kind: SkipKind::InvalidId, resume });
            continue;
        };
        let has_sqlite = has_sqlite.unwrap_or_else(|| take(probe).is_some_and(|r| !r.into_rows().is_empty()));
        let head_raw = take(head).and_then(ReadResult::into_value);
        match wanted(has_sqlite, head_raw.as_deref(), include_migrated) {
            None => items.push(Item::Publish { actor, resume }),
            Some((kind, head)) => {
                if let Some(skip) = skip_audit(&campaign, &actor, kind, head.as_ref()) {
                    if matches!(kind, SkipKind::Migrated) {
                        migrated_skips.push(skip);
                    } else {
                        plain_skips.push(audit::skip_txn(&skip, None));
                    }
                }
                items.push(Item::Skipped { kind, resume });
            }
        }
    }
    if !plain_skips.is_empty() {
        for result in store.commit_many(plain_skips).await {
            result?;
        }
    }
    futures::stream::iter(migrated_skips)
        .map(|skip| {
            let store = Arc::clone(&store);
            async move { audit::record_skip(&*store, skip, None).await.map(drop) }
        })
        .buffer_unordered(MIGRATED_SKIPS_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(items)
}

/// Classifications in flight, oldest first, each in a task of its own. Dropping it (the
/// scanner ends or is aborted) aborts them, so none outlives its attempt.
struct Classifying(VecDeque<JoinHandle<Result<Vec<Item>, StoreError>>>);

impl Drop for Classifying {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Classifying {
    /// The oldest classification's result, once it is done; `None` if there is none (or the
    /// scanner is being torn down). A panic in a classification is the scanner's panic.
    async fn oldest(&mut self) -> Option<Result<Vec<Item>, StoreError>> {
        match self.0.pop_front()?.await {
            Ok(item) => Some(item),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => None,
        }
    }
}

/// Scans (or walks the id list) and classifies the actors [`CLASSIFY_BATCH`] at a time,
/// [`BATCHES_AHEAD`] batches at once, in order, so the checkpoint advances exactly as before.
///
/// The scanner never waits on the channel while a store call of its own is unfinished: the
/// scan call is awaited to its end before anything is sent, and classifications run in
/// spawned tasks that the runtime drives whatever the scanner waits for. So a full channel
/// (a publisher slower than the scan) never holds a pooled connection hostage.
async fn scan_actors(store: DynStore, record: CampaignRecord, ids: Option<Vec<ActorId>>, tx: mpsc::Sender<Scanned>) {
    let include = record.filters.include_migrated;
    let campaign: Arc<str> = record.name.as_str().into();
    let mut source = match ids {
        Some(ids) => Source::Ids(ids.into_iter().enumerate().skip(record.ids_done as usize)),
        None => {
            let checkpoint = record.checkpoint_raw();
            Source::Scan(match &record.filters.actor_prefix {
                Some(p) => ActorScan::with_prefix(&*store, p, checkpoint.as_deref()),
                None => ActorScan::new(&*store, checkpoint.as_deref()),
            })
        }
    };
    let mut ahead = Classifying(VecDeque::with_capacity(BATCHES_AHEAD));
    let mut batch = Vec::with_capacity(CLASSIFY_BATCH);
    let failed = loop {
        let (ended, failed) = match source.next().await {
            Ok(Some(found)) => {
                batch.push(found);
                (false, None)
            }
            Ok(None) => (true, None),
            Err(e) => (true, Some(e)),
        };
        if batch.len() >= CLASSIFY_BATCH || (ended && !batch.is_empty()) {
            let found = std::mem::replace(&mut batch, Vec::with_capacity(CLASSIFY_BATCH));
            ahead.0.push_back(tokio::spawn(classify(Arc::clone(&store), Arc::clone(&campaign), include, found)));
        }
        if ended {
            break failed;
        }
        if ahead.0.len() >= BATCHES_AHEAD {
            let Some(items) = ahead.oldest().await else { return };
            if !send_all(&tx, items).await {
                return;
            }
        }
    };
    while let Some(items) = ahead.oldest().await {
        if !send_all(&tx, items).await {
            return;
        }
    }
    // A scan error comes after every actor found before it, then the scan ends.
    if let Some(e) = failed {
        let _ = tx.send(Err(e)).await;
    }
}

/// Hands a batch's items (or its error) to the publisher in order; false once it is gone.
async fn send_all(tx: &mpsc::Sender<Scanned>, items: Result<Vec<Item>, StoreError>) -> bool {
    match items {
        Ok(items) => {
            for item in items {
                if tx.send(Ok(item)).await.is_err() {
                    return false;
                }
            }
            true
        }
        Err(e) => tx.send(Err(e)).await.is_ok(),
    }
}

/// What the scanner hands the publisher, in order.
type Scanned = Result<Item, StoreError>;

async fn open_campaign(store: &DynStore, cfg: &EnqueueConfig) -> Result<(CampaignRecord, bool), EnqueueError> {
    if !crate::jobs::message::valid_campaign(&cfg.campaign) {
        return Err(EnqueueError::BadCampaign(cfg.campaign.clone()));
    }
    let now = SystemClock.now_ms();
    match campaign::load(&**store, &cfg.campaign).await? {
        Some(existing) if existing.filters != cfg.filters => Err(EnqueueError::FiltersChanged(cfg.campaign.clone())),
        Some(existing) => Ok((existing, true)),
        None => {
            let record = CampaignRecord {
                name: cfg.campaign.clone(),
                created_at_ms: now,
                updated_at_ms: now,
                filters: cfg.filters.clone(),
                status: CampaignStatus::Enqueueing,
                checkpoint: None,
                ids_done: 0,
                published: 0,
                skipped: 0,
            };
            campaign::save(&**store, &record).await?;
            Ok((record, false))
        }
    }
}

/// What this run has settled: confirmed jobs and skipped actors, by kind.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    published: u64,
    skipped_no_v1: u64,
    skipped_migrated: u64,
    skipped_native_v2: u64,
    skipped_invalid_id: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.published += other.published;
        self.skipped_no_v1 += other.skipped_no_v1;
        self.skipped_migrated += other.skipped_migrated;
        self.skipped_native_v2 += other.skipped_native_v2;
        self.skipped_invalid_id += other.skipped_invalid_id;
    }

    fn skip(&mut self, kind: SkipKind) {
        match kind {
            SkipKind::NoV1 => self.skipped_no_v1 += 1,
            SkipKind::Native => self.skipped_native_v2 += 1,
            SkipKind::Migrated => self.skipped_migrated += 1,
            SkipKind::InvalidId => self.skipped_invalid_id += 1,
        }
    }

    fn scanned(&self) -> u64 {
        self.published + self.skipped_no_v1 + self.skipped_migrated + self.skipped_native_v2 + self.skipped_invalid_id
    }
}

/// Confirmed progress not yet written to the campaign record.
struct Checkpointer {
    record: CampaignRecord,
    unsaved: u64,
    saved_at: Instant,
    /// Settled in this attempt, and as of its last saved checkpoint: what a later attempt
    /// resumes after, so the summary counts each actor once across attempts.
    settled: Counts,
    saved: Counts,
}

impl Checkpointer {
    fn new(record: CampaignRecord) -> Checkpointer {
        Checkpointer {
            record,
            unsaved: 0,
            saved_at: Instant::now(),
            settled: Counts::default(),
            saved: Counts::default(),
        }
    }

    fn advance(&mut self, resume: &Resume) {
        match resume {
            Resume::After(raw) => self.record.checkpoint = Some(hex::encode(raw)),
            Resume::Index(i) => self.record.ids_done = *i,
        }
        self.unsaved += 1;
    }

    async fn save(&mut self, store: &DynStore) -> Result<(), StoreError> {
        self.record.updated_at_ms = SystemClock.now_ms();
        campaign::save(&**store, &self.record).await?;
        self.unsaved = 0;
        self.saved_at = Instant::now();
        self.saved = self.settled;
        Ok(())
    }

    async fn maybe_save(&mut self, store: &DynStore) -> Result<(), StoreError> {
        let due =
            self.unsaved >= CHECKPOINT_EVERY || (self.unsaved > 0 && self.saved_at.elapsed() >= CHECKPOINT_INTERVAL);
        if due { self.save(store).await } else { Ok(()) }
    }
}

/// Pending confirms, oldest first, each with the resume point it makes safe. Skipped actors
/// ride along with no confirm (and their kind), so the checkpoint never passes an
/// unconfirmed job.
type Pending = VecDeque<(Awaited, Resume)>;

/// What an entry of [`Pending`] waits for.
enum Awaited {
    Confirm(PublisherConfirm),
    Skip(SkipKind),
}

/// How an entry of [`Pending`] settled.
enum Settled {
    /// The broker's answer: acked (or nacked).
    Confirmed {
        ack: bool,
    },
    Skipped(SkipKind),
}

async fn settle_oldest(pending: &mut Pending, cp: &mut Checkpointer, queue: &str) -> Result<(), EnqueueError> {
    let Some((confirm, resume)) = pending.pop_front() else { return Ok(()) };
    let settled = match confirm {
        Awaited::Confirm(confirm) => Settled::Confirmed {
            ack: tokio::time::timeout(amqp::CONFIRM_TIMEOUT, confirm)
                .await
                .map_err(|_| AmqpError::ConfirmTimeout(queue.to_string()))??
                .is_ack(),
        },
        Awaited::Skip(kind) => Settled::Skipped(kind),
    };
    record_settled(cp, settled, &resume, queue)
}

/// Settles the confirms that have already arrived, without waiting, so the checkpoint keeps
/// up with a slow (rate-limited) run.
fn settle_ready(pending: &mut Pending, cp: &mut Checkpointer, queue: &str) -> Result<(), EnqueueError> {
    while let Some((confirm, _)) = pending.front_mut() {
        let settled = match confirm {
            Awaited::Confirm(c) => match c.now_or_never() {
                Some(result) => Settled::Confirmed { ack: result?.is_ack() },
                None => return Ok(()),
            },
            Awaited::Skip(kind) => Settled::Skipped(*kind),
        };
        // The front entry exists: it was just inspected.
        let (_, resume) = pending.pop_front().expect("front entry");
        record_settled(cp, settled, &resume, queue)?;
    }
    Ok(())
}

fn record_settled(cp: &mut Checkpointer, settled: Settled, resume: &Resume, queue: &str) -> Result<(), EnqueueError> {
    match settled {
        Settled::Confirmed { ack: true } => {
            cp.record.published += 1;
            cp.settled.published += 1;
        }
        Settled::Confirmed { ack: false } => return Err(AmqpError::Nacked(queue.to_string()).into()),
        Settled::Skipped(kind) => {
            cp.record.skipped += 1;
            cp.settled.skip(kind);
        }
    }
    cp.advance(resume);
    Ok(())
}

/// How an attempt ended, short of an error.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Completed,
    Interrupted,
}

/// A failed attempt: its error, and what it had settled as of its last saved checkpoint.
struct Failed {
    error: EnqueueError,
    saved: Counts,
}

/// What every attempt of a run shares.
struct Run<'c> {
    cfg: &'c EnqueueConfig,
    progress: Option<Progress>,
    /// Whether the run found the campaign already started (set by the first campaign opened).
    resumed: Option<bool>,
    /// Time spent in [`Run::publish`], over every attempt.
    publishing: Duration,
}

/// The store and the broker of one attempt.
struct Session {
    store: DynStore,
    conn: lapin::Connection,
    ch: lapin::Channel,
    record: CampaignRecord,
}

/// Opens the store, the campaign and the broker; the first campaign opened in a run says
/// whether the run resumed it (a later attempt finds the record the first one created).
async fn open_session(cfg: &EnqueueConfig, resumed: &mut Option<bool>) -> Result<Session, EnqueueError> {
    let opts = store::OpenOptions::new(STORE_POOL, store::OpenMode::Existing).layout(cfg.layout);
    let store = store::open_with(&cfg.store_url, &opts).await?;
    let (record, existed) = open_campaign(&store, cfg).await?;
    if resumed.is_none() {
        *resumed = Some(existed);
        if existed {
            info!(campaign = %cfg.campaign, published = record.published, "resuming from the checkpoint");
        }
    }
    // Named after the campaign, so an operator (or a test) can tell its connection apart.
    let conn =
        amqp::connect_within(&cfg.amqp_url, &producer_connection_name(&cfg.campaign), cfg.amqp_connect_timeout).await?;
    let ch = async {
        let ch = amqp::confirm_channel(&conn).await?;
        cfg.topology.declare(&ch).await?;
        Ok::<_, EnqueueError>(ch)
    };
    match ch.await {
        Ok(ch) => Ok(Session { store, conn, ch, record }),
        Err(e) => {
            // Not left open behind a retry.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "failed".into())).await;
            Err(e)
        }
    }
}

/// Connections of the store pool: the scan, the classifications and the checkpoint share it.
const STORE_POOL: usize = 4;

impl Run<'_> {
    /// One attempt: opens the store and the broker, resumes from the stored checkpoint and
    /// publishes until the end, `shutdown`, or an error.
    async fn attempt<S: Future<Output = ()>>(
        &mut self,
        shutdown: &mut std::pin::Pin<&mut S>,
    ) -> Result<(End, Counts), Failed> {
        let failed = |error| Failed { error, saved: Counts::default() };
        let session = tokio::select! {
            biased;
            () = shutdown.as_mut() => return Ok((End::Interrupted, Counts::default())),
            session = open_session(self.cfg, &mut self.resumed) => session.map_err(failed)?,
        };
        let mut cp = Checkpointer::new(session.record.clone());
        let publishing = Instant::now();
        let end = self.publish(&session, &mut cp, shutdown).await;
        self.publishing += publishing.elapsed();
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, session.ch.close(200, "done".into())).await;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, session.conn.close(200, "done".into())).await;
        match end {
            Ok(end) => Ok((end, cp.settled)),
            Err(error) => Err(Failed { error, saved: cp.saved }),
        }
    }

    async fn publish<S: Future<Output = ()>>(
        &self,
        session: &Session,
        cp: &mut Checkpointer,
        shutdown: &mut std::pin::Pin<&mut S>,
    ) -> Result<End, EnqueueError> {
        let (cfg, store, ch) = (self.cfg, &session.store, &session.ch);
        let started = Instant::now();
        let (tx, mut rx) = mpsc::channel(SCAN_AHEAD);
        let mut scanner =
            Scanner(tokio::spawn(scan_actors(store.clone(), session.record.clone(), cfg.ids.clone(), tx)));
        let mut pending: Pending = VecDeque::new();
        let exchange = cfg.topology.jobs_exchange();
        let limit = cfg.filters.limit.unwrap_or(u64::MAX);
        let already = session.record.published;
        // Jobs sent in this attempt (the rate's clock and the limit count them).
        let mut sent = 0u64;
        let mut end = End::Completed;
        while already + sent < limit {
            let item = tokio::select! {
                biased;
                () = shutdown.as_mut() => { end = End::Interrupted; break; }
                item = rx.recv() => match item {
                    Some(item) => item?,
                    None => { scanner.ended().await; break }
                },
            };
            match item {
                Item::Skipped { kind, resume } => pending.push_back((Awaited::Skip(kind), resume)),
                Item::Publish { actor, resume } => {
                    if let Some(rate) = cfg.rate.filter(|r| *r > 0.0) {
                        let due = started + Duration::from_secs_f64(sent as f64 / rate);
                        // The actor is not published: the checkpoint stays before it, so a
                        // re-run publishes it.
                        tokio::select! {
                            biased;
                            () = shutdown.as_mut() => { end = End::Interrupted; break; }
                            () = tokio::time::sleep_until(due.into()) => {}
                        }
                    }
                    let job = Job::new(&cfg.campaign, actor, SystemClock.now_ms(), cfg.recovery);
                    let props = amqp::json_properties(&job.message_id(), FieldTable::default());
                    let confirm = ch
                        .basic_publish(
                            exchange.as_str().into(),
                            WORK_KEY.into(),
                            Default::default(),
                            &job.encode(),
                            props,
                        )
                        .await?;
                    pending.push_back((Awaited::Confirm(confirm), resume));
                    sent += 1;
                    if let Some(p) = &self.progress {
                        p.inc(1);
                    }
                }
            }
            settle_ready(&mut pending, cp, &exchange)?;
            while pending.len() >= CONFIRM_WINDOW {
                settle_oldest(&mut pending, cp, &exchange).await?;
            }
            cp.maybe_save(store).await?;
        }
        drop(scanner);
        while !pending.is_empty() {
            settle_oldest(&mut pending, cp, &exchange).await?;
        }
        if end == End::Completed {
            cp.record.status = CampaignStatus::Enqueued;
        }
        cp.save(store).await?;
        Ok(end)
    }
}

/// How long closing a session may take before it is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The scanner task, aborted when its attempt ends however it ends.
struct Scanner(JoinHandle<()>);

impl Scanner {
    /// Called once the scanner closed its channel: a panic in it is this task's panic, never
    /// a scan taken for complete.
    async fn ended(&mut self) {
        if let Err(e) = (&mut self.0).await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs an enqueue until the scan ends, the limit is reached, or `shutdown` resolves.
///
/// A transient failure (see [`EnqueueError::is_transient`]) ends the attempt, not the run:
/// after a backoff a new attempt reopens the store and the broker and resumes from the
/// checkpoint as stored, until the store and broker have failed for `retry_budget` with no
/// checkpoint saved in between. Jobs published after the last saved checkpoint are published
/// again (workers collapse duplicates).
pub async fn enqueue(cfg: EnqueueConfig, shutdown: impl Future<Output = ()>) -> Result<EnqueueSummary, EnqueueError> {
    let started = Instant::now();
    amqp::check_url(&cfg.amqp_url).map_err(EnqueueError::InvalidAmqpUrl)?;
    let progress =
        if cfg.progress { Some(Progress::new("enqueueing", cfg.ids.as_ref().map(|i| i.len() as u64))) } else { None };
    let mut run = Run { cfg: &cfg, progress, resumed: None, publishing: Duration::ZERO };
    tokio::pin!(shutdown);
    let mut totals = Counts::default();
    let mut backoff = amqp::reconnect_backoff();
    // When the store or broker began failing with no checkpoint saved since.
    let mut failing_since: Option<Instant> = None;
    let mut attempt = 0u32;
    let end = loop {
        attempt += 1;
        let failure = match run.attempt(&mut shutdown).await {
            Ok((end, settled)) => {
                totals.add(settled);
                break end;
            }
            Err(failure) => failure,
        };
        totals.add(failure.saved);
        if failure.saved.scanned() > 0 {
            // It got somewhere: this is a new outage, with a fresh budget and backoff.
            failing_since = None;
            backoff = amqp::reconnect_backoff();
        }
        let error = failure.error;
        if !error.is_transient() {
            return Err(error);
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        let left = cfg.retry_budget.saturating_sub(since.elapsed());
        if left.is_zero() {
            return Err(EnqueueError::RetryBudgetSpent { budget: cfg.retry_budget, last: Box::new(error) });
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(10)).min(left);
        warn!(
            campaign = %cfg.campaign,
            url = %error.failing_url(&cfg).map(store::redact_url).unwrap_or_default(),
            error = %error,
            attempt,
            retry_in_ms = delay.as_millis() as u64,
            "enqueue: transient failure; reconnecting and resuming from the checkpoint"
        );
        tokio::select! {
            biased;
            () = shutdown.as_mut() => break End::Interrupted,
            () = tokio::time::sleep(delay) => {}
        }
    };
    if end == End::Interrupted {
        warn!("interrupted: the checkpoint holds every confirmed job; run again to resume");
    }
    if let Some(p) = &run.progress {
        p.finish();
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(EnqueueSummary {
        campaign: cfg.campaign.clone(),
        resumed: run.resumed.unwrap_or(false),
        scanned: totals.scanned(),
        published: totals.published,
        skipped_no_v1: totals.skipped_no_v1,
        skipped_migrated: totals.skipped_migrated,
        skipped_native_v2: totals.skipped_native_v2,
        skipped_invalid_id: totals.skipped_invalid_id,
        seconds,
        jobs_per_second: totals.published as f64 / seconds.max(1e-9),
        publishing_seconds: run.publishing.as_secs_f64(),
        completed: end == End::Completed,
    })
}

#[cfg(test)]
mod tests {
    use lapin::ErrorKind;
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};

    use super::*;

    fn broker(kind: AMQPErrorKind) -> EnqueueError {
        EnqueueError::Broker(ErrorKind::ProtocolError(AMQPError::new(kind, "test".into())).into())
    }

    #[test]
    fn outages_are_transient_and_refusals_are_not() {
        let unavailable = StoreError::Unavailable { backend: "postgres", message: "connection closed".into() };
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let transient = [
            EnqueueError::Store(unavailable),
            EnqueueError::Broker(refused.into()),
            EnqueueError::Broker(ErrorKind::MissingHeartbeatError.into()),
            broker(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)),
            EnqueueError::Amqp(AmqpError::Nacked("q".into())),
            EnqueueError::Amqp(AmqpError::ConfirmTimeout("q".into())),
        ];
        for e in &transient {
            assert!(e.is_transient(), "{e}");
        }
        let permanent = [
            EnqueueError::BadCampaign("bad name".into()),
            EnqueueError::FiltersChanged("c".into()),
            EnqueueError::Store(StoreError::Failed { backend: "postgres", message: "permission denied".into() }),
            EnqueueError::Store(StoreError::InvalidUrl("mysql://".into())),
            EnqueueError::InvalidAmqpUrl("invalid port number".into()),
            broker(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)),
            broker(AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)),
            broker(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)),
            EnqueueError::RetryBudgetSpent {
                budget: Duration::from_secs(1),
                last: Box::new(EnqueueError::Amqp(AmqpError::Nacked("q".into()))),
            },
        ];
        for e in &permanent {
            assert!(!e.is_transient(), "{e}");
        }
    }

    #[test]
    fn a_malformed_amqp_url_is_refused_before_any_connect() {
        assert!(amqp::check_url("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        let reason = amqp::check_url("amqp://guest:secret@127.0.0.1:notaport/%2f").unwrap_err();
        assert!(!reason.contains("secret"), "{reason}");
    }
}
