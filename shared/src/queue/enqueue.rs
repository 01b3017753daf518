//! `ferry-producer enqueue`: scans the store (or reads a list of ids) and publishes one job per
//! actor with publisher confirms, pipelined, rate-limited, and resumable from the campaign's
//! checkpoint.
//!
//! The scan runs ahead of the publisher in its own task, so store lookups and broker round
//! trips overlap; confirms are awaited in order through a bounded window.

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lapin::PublisherConfirm;
use lapin::types::FieldTable;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::actor::ActorId;
use crate::campaign::{self, CampaignFilters, CampaignRecord, CampaignStatus};
use crate::clock::{Clock, SystemClock};
use crate::jobs::Job;
use crate::migrate::audit::{self, AuditRecord, OutcomeKind};
use crate::progress::Progress;
use crate::recovery::Recovery;
use crate::scan::ActorScan;
use crate::store::{self, DynStore, StoreError};
use crate::v1::read::has_sqlite_data;
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
}

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
}

impl From<lapin::Error> for EnqueueError {
    fn from(e: lapin::Error) -> Self {
        EnqueueError::Broker(e)
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
    pub seconds: f64,
    pub jobs_per_second: f64,
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

/// Whether an actor gets a job: it has v1 SQLite data and, unless asked, no finished v2.
/// A skip comes with the v2 head that caused it.
async fn wanted(
    store: &DynStore,
    actor: &ActorId,
    has_sqlite: Option<bool>,
    include_migrated: bool,
) -> Result<Option<(SkipKind, Option<DBHead>)>, StoreError> {
    let has_sqlite = match has_sqlite {
        Some(known) => known,
        None => has_sqlite_data(&**store, actor).await?,
    };
    if !has_sqlite {
        return Ok(Some((SkipKind::NoV1, None)));
    }
    if include_migrated {
        return Ok(None);
    }
    let head = match store.get(&crate::v2::keys::meta(actor)).await? {
        Some(raw) => DBHead::decode(&raw).ok(),
        None => None,
    };
    Ok(match head.as_ref().map(|h| h.origin) {
        // As a worker records it: a native head is not ferry's, its fields are not copied.
        Some(Origin::Native) => Some((SkipKind::Native, None)),
        Some(Origin::MigratedFromV1) => Some((SkipKind::Migrated, head)),
        Some(Origin::MigratingFromV1) | None => None,
    })
}

/// Records the audit of an actor skipped at enqueue, as a worker would have had it been sent
/// a job, so every scanned actor ends with an outcome. It is durable before the checkpoint can
/// pass the actor.
async fn record_skip(
    store: &DynStore,
    campaign: &str,
    actor: &ActorId,
    kind: SkipKind,
    head: Option<&DBHead>,
) -> Result<(), StoreError> {
    let outcome = match kind {
        SkipKind::NoV1 => OutcomeKind::SkippedNoV1,
        SkipKind::Native => OutcomeKind::SkippedNativeV2,
        SkipKind::Migrated => OutcomeKind::SkippedAlreadyMigrated,
        // An invalid id has no audit key.
        SkipKind::InvalidId => return Ok(()),
    };
    let now = SystemClock.now_ms();
    let skip = AuditRecord::skipped(actor, campaign, outcome, head, PRODUCER_WORKER, (now, now));
    audit::record_skip(&**store, skip).await.map(drop)
}

/// An actor the scan found: its id (or not a valid one), whether it has v1 SQLite data when
/// the scan knows, and where to resume after it.
type Found = (Result<ActorId, ()>, Option<bool>, Resume);

/// Actors whose store checks run at once while scanning (order is kept).
const CLASSIFY_AHEAD: usize = 32;

/// Scans (or walks the id list) and classifies each actor, a window of actors at a time, in
/// order, so the checkpoint advances exactly as before.
async fn scan_actors(
    store: DynStore,
    record: CampaignRecord,
    ids: Option<Vec<ActorId>>,
    tx: mpsc::Sender<Result<Item, StoreError>>,
) {
    let include = record.filters.include_migrated;
    let classify = |found: Result<Found, StoreError>| {
        let (store, record) = (store.clone(), &record);
        async move {
            let (id, has_sqlite, resume) = found?;
            let Ok(actor) = id else { return Ok(Item::Skipped { kind: SkipKind::InvalidId, resume }) };
            Ok(match wanted(&store, &actor, has_sqlite, include).await? {
                None => Item::Publish { actor, resume },
                Some((kind, head)) => {
                    record_skip(&store, &record.name, &actor, kind, head.as_ref()).await?;
                    Item::Skipped { kind, resume }
                }
            })
        }
    };
    let found: futures::stream::BoxStream<'_, Result<Found, StoreError>> = match ids {
        Some(ids) => futures::stream::iter(
            ids.into_iter()
                .enumerate()
                .skip(record.ids_done as usize)
                .map(|(i, a)| Ok((Ok(a), None, Resume::Index(i as u64 + 1)))),
        )
        .boxed(),
        None => {
            let checkpoint = record.checkpoint_raw();
            let scan = match &record.filters.actor_prefix {
                Some(p) => ActorScan::with_prefix(&*store, p, checkpoint.as_deref()),
                None => ActorScan::new(&*store, checkpoint.as_deref()),
            };
            futures::stream::unfold(Some(scan), |scan| async move {
                let mut scan = scan?;
                match scan.next().await {
                    Ok(None) => None,
                    // Report the error once, then end.
                    Err(e) => Some((Err(e), None)),
                    Ok(Some(f)) => Some((Ok((f.id.map_err(|_| ()), f.has_sqlite, Resume::After(f.raw))), Some(scan))),
                }
            })
            .boxed()
        }
    };
    let mut items = found.map(classify).buffered(CLASSIFY_AHEAD);
    while let Some(item) = items.next().await {
        if tx.send(item).await.is_err() {
            return;
        }
    }
}

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

/// Confirmed progress not yet written to the campaign record.
struct Checkpointer {
    record: CampaignRecord,
    unsaved: u64,
    saved_at: Instant,
}

impl Checkpointer {
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
        Ok(())
    }

    async fn maybe_save(&mut self, store: &DynStore) -> Result<(), StoreError> {
        let due =
            self.unsaved >= CHECKPOINT_EVERY || (self.unsaved > 0 && self.saved_at.elapsed() >= CHECKPOINT_INTERVAL);
        if due { self.save(store).await } else { Ok(()) }
    }
}

/// Pending confirms, oldest first, each with the resume point it makes safe. Skipped actors
/// ride along with no confirm, so the checkpoint never passes an unconfirmed job.
type Pending = VecDeque<(Option<PublisherConfirm>, Resume)>;

async fn settle_oldest(pending: &mut Pending, cp: &mut Checkpointer, queue: &str) -> Result<(), EnqueueError> {
    let Some((confirm, resume)) = pending.pop_front() else { return Ok(()) };
    let confirmation = match confirm {
        Some(confirm) => Some(
            tokio::time::timeout(amqp::CONFIRM_TIMEOUT, confirm)
                .await
                .map_err(|_| AmqpError::ConfirmTimeout(queue.to_string()))??,
        ),
        None => None,
    };
    record_settled(cp, confirmation, &resume, queue)
}

/// Settles the confirms that have already arrived, without waiting, so the checkpoint keeps
/// up with a slow (rate-limited) run.
fn settle_ready(pending: &mut Pending, cp: &mut Checkpointer, queue: &str) -> Result<(), EnqueueError> {
    while let Some((confirm, _)) = pending.front_mut() {
        let confirmation = match confirm {
            Some(c) => match c.now_or_never() {
                Some(result) => Some(result?),
                None => return Ok(()),
            },
            None => None,
        };
        // The front entry exists: it was just inspected.
        let (_, resume) = pending.pop_front().expect("front entry");
        record_settled(cp, confirmation, &resume, queue)?;
    }
    Ok(())
}

fn record_settled(
    cp: &mut Checkpointer,
    confirmation: Option<lapin::Confirmation>,
    resume: &Resume,
    queue: &str,
) -> Result<(), EnqueueError> {
    match confirmation {
        Some(c) if c.is_ack() => cp.record.published += 1,
        Some(_) => return Err(AmqpError::Nacked(queue.to_string()).into()),
        None => cp.record.skipped += 1,
    }
    cp.advance(resume);
    Ok(())
}

/// Runs an enqueue until the scan ends, the limit is reached, or `shutdown` resolves.
pub async fn enqueue(cfg: EnqueueConfig, shutdown: impl Future<Output = ()>) -> Result<EnqueueSummary, EnqueueError> {
    let started = Instant::now();
    let store = store::open(&cfg.store_url, 4).await?;
    let (record, resumed) = open_campaign(&store, &cfg).await?;
    let already = record.published;
    if resumed {
        info!(campaign = %cfg.campaign, published = record.published, "resuming from the checkpoint");
    }
    // Named after the campaign, so an operator (or a test) can tell its connection apart.
    let conn =
        amqp::connect_within(&cfg.amqp_url, &producer_connection_name(&cfg.campaign), cfg.amqp_connect_timeout).await?;
    let ch = amqp::confirm_channel(&conn).await?;
    cfg.topology.declare(&ch).await?;

    let (tx, mut rx) = mpsc::channel(4096);
    let scanner = tokio::spawn(scan_actors(store.clone(), record.clone(), cfg.ids.clone(), tx));
    let progress =
        if cfg.progress { Some(Progress::new("enqueueing", cfg.ids.as_ref().map(|i| i.len() as u64))) } else { None };
    let mut summary = EnqueueSummary { campaign: cfg.campaign.clone(), resumed, ..EnqueueSummary::default() };
    let mut cp = Checkpointer { record, unsaved: 0, saved_at: Instant::now() };
    let mut pending: Pending = VecDeque::new();
    let exchange = cfg.topology.jobs_exchange();
    let limit = cfg.filters.limit.unwrap_or(u64::MAX);
    tokio::pin!(shutdown);
    let mut interrupted = false;
    while already + summary.published < limit {
        let item = tokio::select! {
            biased;
            () = &mut shutdown => { interrupted = true; break; }
            item = rx.recv() => match item { Some(item) => item?, None => break },
        };
        summary.scanned += 1;
        match item {
            Item::Skipped { kind, resume } => {
                match kind {
                    SkipKind::NoV1 => summary.skipped_no_v1 += 1,
                    SkipKind::Native => summary.skipped_native_v2 += 1,
                    SkipKind::Migrated => summary.skipped_migrated += 1,
                    SkipKind::InvalidId => summary.skipped_invalid_id += 1,
                }
                pending.push_back((None, resume));
            }
            Item::Publish { actor, resume } => {
                if let Some(rate) = cfg.rate.filter(|r| *r > 0.0) {
                    let due = started + Duration::from_secs_f64(summary.published as f64 / rate);
                    // The actor is not published: the checkpoint stays before it, so a re-run
                    // publishes it.
                    tokio::select! {
                        biased;
                        () = &mut shutdown => { interrupted = true; break; }
                        () = tokio::time::sleep_until(due.into()) => {}
                    }
                }
                let job = Job::new(&cfg.campaign, actor, SystemClock.now_ms(), cfg.recovery);
                let props = amqp::json_properties(&job.message_id(), FieldTable::default());
                let confirm = ch
                    .basic_publish(exchange.as_str().into(), WORK_KEY.into(), Default::default(), &job.encode(), props)
                    .await?;
                pending.push_back((Some(confirm), resume));
                summary.published += 1;
                if let Some(p) = &progress {
                    p.inc(1);
                }
            }
        }
        settle_ready(&mut pending, &mut cp, &exchange)?;
        while pending.len() >= CONFIRM_WINDOW {
            settle_oldest(&mut pending, &mut cp, &exchange).await?;
        }
        cp.maybe_save(&store).await?;
    }
    scanner.abort();
    while !pending.is_empty() {
        settle_oldest(&mut pending, &mut cp, &exchange).await?;
    }
    summary.completed = !interrupted;
    if summary.completed {
        cp.record.status = CampaignStatus::Enqueued;
    } else {
        warn!("interrupted: the checkpoint holds every confirmed job; run again to resume");
    }
    cp.save(&store).await?;
    if let Some(p) = &progress {
        p.finish();
    }
    let _ = ch.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.jobs_per_second = summary.published as f64 / summary.seconds.max(1e-9);
    Ok(summary)
}
