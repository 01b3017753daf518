//! Migrating one actor: the state machine of DESIGN.md section 3.
//!
//! ```text
//! inspect ─ no v1 ──────────────────────────────► skipped_no_v1
//!    │      v2 Native / MigratedFromV1 ─────────► skipped_native_v2 / skipped_already_migrated
//!    │      v2 MigratingFromV1, live lease ─────► in_progress_elsewhere (retry)
//!    ▼      (stale or no lease: take over)
//! read v1 ─ validate ─ begin ─ stage* ─ finalize ► migrated
//! ```
//!
//! Invariants kept here:
//! - nothing is written to v2 before v1 passed every check;
//! - every state change is one checked transaction: begin checks the head and lease it read,
//!   stage and finalize check that the head (generation) and lease are exactly ours, and
//!   finalize checks the digest of v1's SQLite keys, so a stale copy never commits;
//! - until finalize commits, nothing marks the actor migrated, and finalize writes the PIDX
//!   rows, the head, the audit record and drops the lease in that one transaction, which also
//!   takes the actor's dead letter out of the triage index, checking it is the one it read
//!   ([`crate::triage::index::clear_on_migration`]): a migrated actor is never listed as dead;
//! - nothing under `v1/` is ever in a mutation built here.
//!
//! A small actor costs one batched read ([`Migrator::prefetch`]: its SQLite range, head, lease
//! and dead letter in one [`Store::read_many`](crate::store::Store::read_many)) and one
//! transaction, which commits in a group with other actors' ([`crate::store::group`]), its
//! checks its own. An actor whose transaction raced another writer is inspected again and
//! commits alone.

pub mod audit;
pub mod error;
pub mod lease;
pub mod stage;

use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::actor::ActorId;
use crate::clock::Clock;
use crate::keys;
use crate::metrics as m;
use crate::recovery::Recovery;
use crate::store::group::{Entered, GroupCommitter, GroupConfig};
use crate::store::{DynStore, Read, ReadResult, StoreError, Then, Txn};
use crate::triage::{index, ticket};
use crate::v1::{self, FileTag, ReadError, ReadOptions, V1Files, V1Image, V1Rejection};
use crate::v2::head::{DBHead, Origin};
use crate::v2::keys as v2keys;
use crate::v2::quota;

pub use self::audit::{AuditRecord, OutcomeKind};
pub use self::error::{Cause, Fate, MigrateError, Phase};
use self::lease::Lease;
use self::stage::Staging;

/// How often inspect-and-begin is retried when another migration's begin races ours.
const BEGIN_ATTEMPTS: usize = 4;
/// Default lease time to live: long enough for any stage transaction, short enough that a
/// dead worker's actors are taken over within a minute.
pub const DEFAULT_LEASE_TTL_MS: i64 = 60_000;

/// Settings of a migrator.
#[derive(Clone, Debug)]
pub struct MigrateConfig {
    /// Names this process in leases, audits and dead letters.
    pub worker_id: String,
    /// Largest main file migrated (bigger ones are `oversize`).
    pub max_size: u64,
    pub lease_ttl_ms: i64,
    /// Run `PRAGMA quick_check` before migrating (on by default).
    pub quick_check: bool,
    /// Databases of at most this many pages migrate in one transaction (begin, stage and
    /// finalize at once); 0 stages every database. At most [`ONE_SHOT_MAX_PAGES`].
    pub one_shot_max_pages: u32,
    /// How one-shot transactions of different actors are committed together.
    pub group: GroupConfig,
}

impl Default for MigrateConfig {
    fn default() -> Self {
        MigrateConfig {
            worker_id: "ferry".into(),
            max_size: v1::read::DEFAULT_MAX_SIZE,
            lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
            quick_check: true,
            one_shot_max_pages: ONE_SHOT_MAX_PAGES,
            group: GroupConfig::default(),
        }
    }
}

impl MigrateConfig {
    /// The most pages a database may have to migrate in one transaction: the setting, capped
    /// at [`ONE_SHOT_MAX_PAGES`].
    fn one_shot_limit(&self) -> u32 {
        self.one_shot_max_pages.min(ONE_SHOT_MAX_PAGES)
    }

    /// The lease TTL as a duration, which bounds every store session (see
    /// `store::postgres::SessionLimits`).
    pub fn lease_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::try_from(self.lease_ttl_ms).unwrap_or(0))
    }
}

/// What a job asks for.
#[derive(Clone, Debug)]
pub struct Request {
    pub actor: ActorId,
    pub campaign: String,
    pub recovery: Option<Recovery>,
    /// 1 on the first delivery.
    pub attempts: u32,
    /// The requeue ticket of a requeued job, as its worker claimed it (`triage::ticket`): the
    /// transaction of the job's outcome clears it, so the outcome and the end of the requeue
    /// are one commit. A finalize clears it whatever it is now (a migration wins over a twin's
    /// dead letter, as it takes the letter out); a skip checks it unchanged, so a second copy
    /// that claimed it before the first copy's outcome landed records nothing over that outcome
    /// (a conflict on the ticket: `Cause::Superseded`, acked with nothing written).
    pub ticket: Option<Vec<u8>>,
}

/// A completed migration or skip; its audit record is already durable.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub audit: AuditRecord,
    /// DELTA bytes written (0 for skips).
    pub bytes_written: u64,
    /// Where the time went (zero for skips).
    pub timings: Timings,
}

/// Wall time per phase of a migration. Encoding (CPU, on a blocking thread) and writing
/// (stage transactions) overlap; each is its own total.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Timings {
    pub read: std::time::Duration,
    pub validate: std::time::Duration,
    pub encode: std::time::Duration,
    pub write: std::time::Duration,
    pub finalize: std::time::Duration,
}

impl Timings {
    /// Records each step in [`m::JOB_STEP_SECONDS`] (the settle step is the worker's).
    pub fn record(&self) {
        let Timings { read, validate, encode, write, finalize } = *self;
        // In the order of `m::JOB_STEPS`, whose last step (settle) the zip leaves out.
        for (step, took) in m::JOB_STEPS.iter().zip([read, validate, encode, write, finalize]) {
            metrics::histogram!(m::JOB_STEP_SECONDS, "step" => *step).record(took.as_secs_f64());
        }
    }
}

impl Outcome {
    pub fn kind(&self) -> OutcomeKind {
        self.audit.outcome
    }
}

/// The state of the actor's v2 side, as inspect found it.
enum V2State {
    Fresh,
    Native,
    Migrated {
        head: DBHead,
    },
    /// A MigratingFromV1 head without a live lease: ours to take over.
    Stale {
        head: DBHead,
        head_raw: Vec<u8>,
        lease_raw: Option<Vec<u8>>,
    },
}

/// A validated main file, ready to stage.
struct Validated {
    main: Vec<u8>,
    pages: u32,
    files: V1Files,
    digest: u128,
    /// The recovery that changed something (recorded in the audit), if any.
    applied: Option<Recovery>,
    /// The one-shot blob, when it was encoded with the validation.
    encoded: Option<Encoded>,
    timings: Timings,
}

/// A whole database encoded as one LTX blob for `txid`.
struct Encoded {
    txid: u64,
    blob: Vec<u8>,
    checksum: crate::checksum::DatabaseChecksum,
}

/// What one batched read found for an actor ([`Migrator::prefetch`]): the first batch of its
/// SQLite range (all of it for a small actor), its v2 head, its lease and its dead letter;
/// for a small fresh actor, its image validated (and encoded) with the read.
pub struct Prefetched {
    first: v1::read::FirstBatch,
    head: Option<Vec<u8>>,
    lease: Option<Vec<u8>>,
    dead: Option<Vec<u8>>,
    validated: Option<Box<Validated>>,
    /// When the migration started: just before the read (the encoded blob carries it).
    started: i64,
    /// The reads' own time, the validation's left out.
    read_time: std::time::Duration,
}

impl Prefetched {
    /// Whether the image was validated with the read (a small fresh actor), so that
    /// [`Migrator::migrate_from`] neither reads nor validates it again.
    pub fn validated_with_read(&self) -> bool {
        self.validated.is_some()
    }

    /// How long the reads took (without the validation done with them).
    pub fn read_time(&self) -> std::time::Duration {
        self.read_time
    }

    /// Whether the read holds the actor's whole SQLite range (nothing more to read).
    pub fn is_whole(&self) -> bool {
        self.first.is_whole()
    }

    /// The main file's size as its meta declares it (a whole read holds every meta).
    pub fn main_size(&self, actor: &ActorId) -> Option<u64> {
        self.first.declared_size(actor, FileTag::Main)
    }
}

/// Migrates actors from v1 to v2 in one store.
#[derive(Clone)]
pub struct Migrator {
    store: DynStore,
    clock: Arc<dyn Clock>,
    cfg: Arc<MigrateConfig>,
    group: GroupCommitter,
}

impl Migrator {
    pub fn new(store: DynStore, clock: Arc<dyn Clock>, cfg: MigrateConfig) -> Migrator {
        let group = GroupCommitter::new(store.clone(), cfg.group);
        Migrator { store, clock, cfg: Arc::new(cfg), group }
    }

    /// The actor's first SQLite batch, head, lease and dead letter (which a finalize removes),
    /// in one call to the store. An actor the batch holds whole, with no v2 head (a campaign's
    /// usual actor) and a main file whose footprint fits `validate_up_to` bytes is also
    /// validated, and encoded for a one-shot commit as a fresh actor's, right after the reads
    /// and off the async threads: in the same blocking call on SQLite
    /// ([`Store::read_many_then`](crate::store::Store::read_many_then)). Anything else (a head, a
    /// rejection, a sidecar) is left to [`Migrator::migrate_from`], which reads and validates
    /// as it does without a prefetch, with the same checks and errors.
    pub async fn prefetch(&self, actor: &ActorId, validate_up_to: u64) -> Result<Prefetched, MigrateError> {
        let reads = [
            v1::read::first_batch_read(actor),
            Read::Get(v2keys::meta(actor)),
            Read::Get(keys::lease(actor)),
            Read::Get(keys::dead(actor)),
        ];
        let speculation = Speculation {
            actor: actor.clone(),
            validate_up_to,
            max_size: self.cfg.max_size,
            quick_check: self.cfg.quick_check,
            one_shot_max: self.cfg.one_shot_limit(),
            started: self.clock.now_ms(),
        };
        let read_started = std::time::Instant::now();
        let mut prefetched = crate::store::read_then(&*self.store, &reads, move |answers| speculation.read(answers))
            .await
            .map_err(|e| MigrateError { actor: actor.clone(), phase: Phase::Inspect, cause: e.into(), files: None })?;
        let worked =
            prefetched.validated.as_ref().map_or(Default::default(), |v| v.timings.validate + v.timings.encode);
        prefetched.read_time = read_started.elapsed().saturating_sub(worked);
        Ok(prefetched)
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    pub fn config(&self) -> &MigrateConfig {
        &self.cfg
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Migrates one actor (or records why it was skipped). Its lines are logged in the caller's
    /// job span (`telemetry::job_span`: actor, campaign, worker).
    pub async fn migrate(&self, req: &Request) -> Result<Outcome, MigrateError> {
        self.migrate_from(req, None, self.enter()).await
    }

    /// Counts a migration that may join a group commit, until the guard is dropped (a group
    /// holding a transaction of every entered migration does not wait for more). Taken before
    /// [`Migrator::prefetch`], so a group waits (a few ms at most) for a job still reading.
    pub fn enter(&self) -> Entered {
        self.group.enter()
    }

    /// [`Migrator::migrate`] from what [`Migrator::prefetch`] read (`None`: read it here), with
    /// the guard of [`Migrator::enter`], dropped as soon as the migration cannot join a group.
    pub async fn migrate_from(
        &self,
        req: &Request,
        prefetched: Option<Prefetched>,
        entered: Entered,
    ) -> Result<Outcome, MigrateError> {
        let mut entered = Some(entered);
        let started = prefetched.as_ref().map_or_else(|| self.clock.now_ms(), |p| p.started);
        let fail = |phase: Phase, cause: Cause, files: Option<V1Files>| MigrateError {
            actor: req.actor.clone(),
            phase,
            cause,
            files,
        };
        let (first, mut read_at_start, mut validated) = match prefetched {
            // Validated as a job without a recovery (the only kind a worker prefetches for).
            Some(p) => {
                (p.first, Some((p.head, p.lease, p.dead)), p.validated.filter(|_| req.recovery.is_none()).map(|v| *v))
            }
            None => (
                v1::read::first_batch(&*self.store, &req.actor)
                    .await
                    .map_err(|e| fail(Phase::Inspect, e.into(), None))?,
                None,
                None,
            ),
        };
        if validated.is_none() && first.is_empty() {
            entered.take();
            return self.skip(req, OutcomeKind::SkippedNoV1, None, started).await;
        }
        // An image validated with the read holds the batch's rows already.
        let mut first = validated.is_none().then_some(first);
        for attempt in 0..BEGIN_ATTEMPTS {
            let inspected = match read_at_start.take() {
                Some((head, lease, dead)) => {
                    self.inspect_read(head, || async move { Ok(lease) }).await.map(|s| (s, dead))
                }
                None => self.inspect(&req.actor).await,
            };
            let (state, dead_raw) = inspected.map_err(|c| fail(Phase::Inspect, c, None))?;
            let (previous_raw, lease_raw, generation, txid) = match state {
                V2State::Native => {
                    entered.take();
                    return self.skip(req, OutcomeKind::SkippedNativeV2, None, started).await;
                }
                V2State::Migrated { head } => {
                    entered.take();
                    return self.skip(req, OutcomeKind::SkippedAlreadyMigrated, Some(head), started).await;
                }
                V2State::Fresh => (None, None, 1, 1),
                V2State::Stale { head, head_raw, lease_raw } => {
                    (Some(head_raw), lease_raw, head.generation + 1, head.next_txid.max(1))
                }
            };
            let image = match (validated.take(), first.take()) {
                (Some(v), _) => v,
                // The image is kept across attempts, so the first batch is read exactly once.
                (None, None) => unreachable!("no image and no first batch"),
                (None, Some(first)) => match self.read_and_validate(req, first, (txid, started)).await {
                    Ok(v) => v,
                    Err(e) => {
                        if let (Some(head_raw), Cause::Rejected(_)) = (&previous_raw, &e.cause) {
                            self.clear_stage(&req.actor, head_raw, lease_raw.as_deref()).await;
                        }
                        return Err(e);
                    }
                },
            };
            let files = Some(image.files.clone());
            if image.pages <= self.cfg.one_shot_limit() {
                let prev = Previous {
                    head_raw: previous_raw.as_deref(),
                    lease_raw: lease_raw.as_deref(),
                    dead_raw: dead_raw.as_deref(),
                };
                // The first try commits in a group; after a race the actor commits alone.
                let grouped = attempt == 0;
                if !grouped {
                    entered.take();
                }
                match self.one_shot(req, prev, generation, txid, image, started, grouped).await {
                    Ok(outcome) => return Ok(outcome),
                    Err(OneShotError::Raced(image)) => {
                        debug!("migration raced another one; inspecting again");
                        validated = Some(*image);
                        continue;
                    }
                    Err(OneShotError::Failed(phase, cause)) => return Err(fail(phase, cause, files)),
                }
            }
            entered.take();
            let begun = self
                .begin(
                    &req.actor,
                    previous_raw.as_deref(),
                    lease_raw.as_deref(),
                    generation,
                    txid,
                    image.pages,
                    started,
                )
                .await;
            match begun {
                Ok(staging) => {
                    let result = self.stage_and_finalize(req, staging, image, started).await;
                    return result.map_err(|(phase, cause)| fail(phase, cause, files));
                }
                Err(StoreError::Conflict { .. }) => {
                    debug!("begin raced another migration; inspecting again");
                    validated = Some(image);
                }
                Err(e) => return Err(fail(Phase::Begin, e.into(), files)),
            }
        }
        Err(fail(
            Phase::Begin,
            Cause::InProgressElsewhere { holder: "concurrent begin".into(), expires_at_ms: 0 },
            None,
        ))
    }

    /// The actor's dead letter as stored (a staged finalize takes it out of the triage index).
    async fn dead_letter(&self, actor: &ActorId) -> Result<Option<Vec<u8>>, Cause> {
        Ok(self.store.get(&keys::dead(actor)).await?)
    }

    /// Inspect, from the head and the dead letter (which a one-shot commit removes) read in one
    /// call; the state, and the letter as read.
    async fn inspect(&self, actor: &ActorId) -> Result<(V2State, Option<Vec<u8>>), Cause> {
        let reads = [Read::Get(v2keys::meta(actor)), Read::Get(keys::dead(actor))];
        let mut read = self.store.read_many(&reads).await?.into_iter().map(ReadResult::into_value);
        let (head, dead) = (read.next().flatten(), read.next().flatten());
        let state = self.inspect_read(head, || async { self.store.get(&keys::lease(actor)).await }).await?;
        Ok((state, dead))
    }

    /// Inspect from the head read, reading the lease with `lease` only if the head needs it.
    async fn inspect_read<F, Fut>(&self, head: Option<Vec<u8>>, lease: F) -> Result<V2State, Cause>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<Vec<u8>>, StoreError>>,
    {
        let Some(head_raw) = head else {
            return Ok(V2State::Fresh);
        };
        let head = DBHead::decode(&head_raw).map_err(|e| Cause::CorruptV2Meta(e.0))?;
        match head.origin {
            Origin::Native => Ok(V2State::Native),
            Origin::MigratedFromV1 => Ok(V2State::Migrated { head }),
            Origin::MigratingFromV1 => {
                let lease_raw = lease().await?;
                if let Some(lease) = lease_raw.as_deref().and_then(Lease::decode)
                    && lease.is_live(self.clock.now_ms())
                {
                    return Err(Cause::InProgressElsewhere {
                        holder: lease.holder,
                        expires_at_ms: lease.expires_at_ms,
                    });
                }
                if lease_raw.is_none()
                    && let Some(window) = self.store.layout().foreign_migration_window()
                {
                    let until = head.creation_ts_ms.saturating_add(window.as_millis() as i64);
                    if self.clock.now_ms() < until {
                        // No ferry lease: rivet's own migration, whose only lease is its age.
                        return Err(Cause::InProgressElsewhere {
                            holder: format!("{} (a MigratingFromV1 head without a ferry lease)", self.store.layout()),
                            expires_at_ms: until,
                        });
                    }
                }
                info!(generation = head.generation, "taking over a stale migration");
                Ok(V2State::Stale { head, head_raw, lease_raw })
            }
        }
    }

    /// Reads and validates the image, and encodes it for a one-shot commit as `encode_as`
    /// (txid, timestamp) if it is small enough for one, in the same blocking call.
    async fn read_and_validate(
        &self,
        req: &Request,
        first: v1::read::FirstBatch,
        encode_as: (u64, i64),
    ) -> Result<Validated, MigrateError> {
        let opts = ReadOptions { max_size: self.cfg.max_size, recovery: req.recovery, ignore_sidecars: false };
        let read_started = std::time::Instant::now();
        let fail = |phase, cause, files| MigrateError { actor: req.actor.clone(), phase, cause, files };
        let image = match v1::read::read_v1_from(&*self.store, &req.actor, opts, first).await {
            Ok(image) => image,
            Err(ReadError::Rejected(r)) => {
                let files = v1::read::Probe::run(&*self.store, &req.actor).await.ok().map(|p| p.files());
                return Err(fail(Phase::Read, Cause::Rejected(r), files));
            }
            Err(ReadError::Changed) => return Err(fail(Phase::Read, Cause::V1Changed, None)),
            Err(ReadError::Store(e)) => return Err(fail(Phase::Read, e.into(), None)),
        };
        let (files, digest) = (image.files.clone(), image.digest);
        let read = read_started.elapsed();
        let validate_started = std::time::Instant::now();
        let (quick_check, recovery) = (self.cfg.quick_check, req.recovery);
        let one_shot_max = self.cfg.one_shot_limit();
        let checked = tokio::task::spawn_blocking(move || {
            let mut validated = validate(image, quick_check, recovery)?;
            // One thread hop for both: a database small enough for one shot is encoded for the
            // txid the caller expects to commit it as (after a race it is encoded again).
            if validated.pages <= one_shot_max {
                let (txid, started) = encode_as;
                let encode_started = std::time::Instant::now();
                let main = std::mem::take(&mut validated.main);
                let (main, blob, checksum) = stage::encode_whole(main, validated.pages, txid, started);
                validated.main = main;
                validated.encoded = Some(Encoded { txid, blob, checksum });
                validated.timings.encode = encode_started.elapsed();
            }
            Ok(validated)
        })
        .await
        .map_err(|e| fail(Phase::Validate, Cause::Internal(format!("validate task: {e}")), Some(files.clone())))?;
        let mut validated = match checked {
            Ok(v) => v,
            Err(r) => {
                let cause = self.rejection_or_change(&req.actor, digest, r).await;
                return Err(fail(Phase::Validate, cause, Some(files)));
            }
        };
        validated.timings.read = read;
        // Validation alone: the encode done in the same call is timed on its own.
        validated.timings.validate = validate_started.elapsed().saturating_sub(validated.timings.encode);
        Ok(validated)
    }

    /// A rejection stands only if v1 still is what was validated. An image read in several
    /// scans while a writer was at work may never have existed as a whole (a torn read can
    /// fail quick_check): that is a change to retry, not a verdict on the actor.
    async fn rejection_or_change(&self, actor: &ActorId, digest: u128, rejection: V1Rejection) -> Cause {
        match v1::read::unchanged_since(&*self.store, actor, digest).await {
            Ok(true) => Cause::Rejected(rejection),
            Ok(false) => Cause::V1Changed,
            Err(e) => e.into(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn begin(
        &self,
        actor: &ActorId,
        previous_raw: Option<&[u8]>,
        lease_raw: Option<&[u8]>,
        generation: u64,
        txid: u64,
        pages: u32,
        started: i64,
    ) -> Result<Staging, StoreError> {
        // Nothing of the actor's v2 is left but the head: the usage is META's own.
        let (head, head_raw) =
            quota::with_usage(self.store.layout(), actor, &DBHead::staging(generation, txid, started), 0);
        let lease = Lease {
            holder: format!("{}#{:016x}", self.cfg.worker_id, rand::random::<u64>()),
            generation,
            expires_at_ms: self.clock.now_ms() + self.cfg.lease_ttl_ms,
        };
        let new_lease_raw = lease.encode();
        let mut txn = Txn::new();
        txn.check_value(v2keys::meta(actor), previous_raw.map(<[u8]>::to_vec));
        txn.check_value(keys::lease(actor), lease_raw.map(<[u8]>::to_vec));
        if previous_raw.is_some() {
            for range in v2keys::page_ranges(actor) {
                txn.clear_range(range);
            }
        }
        txn.set(v2keys::meta(actor), head_raw.clone());
        txn.set(keys::lease(actor), new_lease_raw.clone());
        self.store.commit(txn).await?;
        debug!(generation, txid, pages, "migration begun");
        Ok(Staging {
            actor: actor.clone(),
            txid,
            pages,
            head,
            head_raw,
            lease,
            lease_raw: new_lease_raw,
            delta_usage: 0,
        })
    }

    async fn stage_and_finalize(
        &self,
        req: &Request,
        mut staging: Staging,
        mut image: Validated,
        started: i64,
    ) -> Result<Outcome, (Phase, Cause)> {
        let clock = self.clock.clone();
        let staged = stage::stage(
            &*self.store,
            &mut staging,
            std::mem::take(&mut image.main),
            started,
            move || clock.now_ms(),
            self.cfg.lease_ttl_ms,
        )
        .await;
        let staged = match staged {
            Ok(s) => s,
            Err(cause) => return Err(self.abandon(&staging, Phase::Stage, cause).await),
        };
        let mut timings = Timings { encode: staged.encode_time, write: staged.write_time, ..image.timings };
        let finalize_started = std::time::Instant::now();
        let audit = self.migrated_audit(
            req,
            &image,
            staged.main.len() as u64,
            staged.checksum,
            (staging.head.generation, staging.txid),
            started,
        );
        let mut txn = Txn::new();
        staging.fence(&mut txn);
        txn.check_range_digest(v1::keys::sqlite_range(&req.actor), image.digest);
        let txid_bytes = staging.txid.to_be_bytes();
        for pgno in 1..=image.pages {
            txn.set(v2keys::pidx(&req.actor, pgno), txid_bytes.to_vec());
        }
        let head = DBHead {
            origin: Origin::MigratedFromV1,
            head_txid: staging.txid,
            next_txid: staging.txid + 1,
            db_size_pages: image.pages,
            ..staging.head.clone()
        };
        let usage = staging.delta_usage + quota::pidx_usage(self.store.layout(), &req.actor, image.pages);
        txn.set(v2keys::meta(&req.actor), quota::with_usage(self.store.layout(), &req.actor, &head, usage).1);
        txn.set(keys::audit(&req.actor), audit.encode());
        txn.clear(keys::lease(&req.actor));
        if req.ticket.is_some() {
            txn.clear(ticket::key(&req.actor));
        }
        self.commit_finalize(&staging, txn).await?;
        timings.finalize = finalize_started.elapsed();
        record_success(started, self.clock.now_ms(), image.pages, staged.main.len() as u64, staged.delta_bytes);
        Ok(Outcome { audit, bytes_written: staged.delta_bytes, timings })
    }

    /// Commits a staged migration's finalize `txn` with what takes the actor's dead letter out
    /// of the triage index, read just before. A letter written since that read fails only its
    /// own check (3; the fence is 0 and 1, the v1 digest 2): it is read again and the finalize
    /// retried, a few times at most.
    async fn commit_finalize(&self, staging: &Staging, txn: Txn) -> Result<(), (Phase, Cause)> {
        let mut tries = 0;
        loop {
            tries += 1;
            let dead = match self.dead_letter(&staging.actor).await {
                Ok(dead) => dead,
                Err(cause) => return Err(self.abandon(staging, Phase::Finalize, cause).await),
            };
            let mut attempt = txn.clone();
            index::clear_on_migration(&mut attempt, &staging.actor, dead.as_deref());
            return match self.store.commit(attempt).await {
                Ok(()) => Ok(()),
                Err(StoreError::Conflict { index: 2, .. }) => {
                    Err(self.abandon(staging, Phase::Finalize, Cause::V1Changed).await)
                }
                Err(StoreError::Conflict { index: 3, .. }) if tries < FINALIZE_TRIES => continue,
                Err(StoreError::Conflict { index: 0 | 1, .. }) => Err((Phase::Finalize, Cause::Fenced)),
                Err(e) => Err(self.abandon(staging, Phase::Finalize, e.into()).await),
            };
        }
    }

    fn migrated_audit(
        &self,
        req: &Request,
        image: &Validated,
        v1_bytes: u64,
        checksum: crate::checksum::DatabaseChecksum,
        (generation, txid): (u64, u64),
        started: i64,
    ) -> AuditRecord {
        AuditRecord {
            actor_id: req.actor.clone(),
            campaign: req.campaign.clone(),
            outcome: OutcomeKind::Migrated,
            reason: None,
            phase: None,
            error: None,
            recovery: image.applied,
            pages: Some(image.pages),
            v1_bytes: Some(v1_bytes),
            checksum: Some(checksum.hex()),
            generation: Some(generation),
            worker: self.cfg.worker_id.clone(),
            started_at_ms: started,
            finished_at_ms: self.clock.now_ms(),
            v1_files: Some(image.files.clone()),
            attempts: Some(req.attempts),
            purged_at_ms: None,
            head_txid: Some(txid),
        }
    }

    /// Begin, stage and finalize as one transaction, for a database whose whole blob fits in
    /// one: the same checks (the head and lease read at inspect, the v1 digest, the dead letter
    /// it removes), the same end state, and no MigratingFromV1 head ever visible. `grouped`:
    /// committed in a group with other actors' transactions (its checks still its own), else
    /// alone.
    #[allow(clippy::too_many_arguments)]
    async fn one_shot(
        &self,
        req: &Request,
        prev: Previous<'_>,
        generation: u64,
        txid: u64,
        image: Validated,
        started: i64,
        grouped: bool,
    ) -> Result<Outcome, OneShotError> {
        let encode_started = std::time::Instant::now();
        let Validated { main, pages, files, digest, applied, encoded, mut timings } = image;
        let (main, blob, checksum) = match encoded {
            Some(e) if e.txid == txid => (main, e.blob, e.checksum),
            _ => {
                let encoded =
                    tokio::task::spawn_blocking(move || stage::encode_whole(main, pages, txid, started)).await;
                let encoded = encoded
                    .map_err(|e| OneShotError::Failed(Phase::Stage, Cause::Internal(format!("encoder task: {e}"))))?;
                timings.encode = encode_started.elapsed();
                encoded
            }
        };
        let image = Validated { main, pages, files, digest, applied, encoded: None, timings };
        let actor = &req.actor;
        let head = DBHead {
            origin: Origin::MigratedFromV1,
            head_txid: txid,
            next_txid: txid + 1,
            db_size_pages: pages,
            ..DBHead::staging(generation, txid, started)
        };
        let mut usage = quota::pidx_usage(self.store.layout(), actor, pages);
        let audit = self.migrated_audit(req, &image, image.main.len() as u64, checksum, (generation, txid), started);
        let mut txn = Txn::new();
        txn.check_value(v2keys::meta(actor), prev.head_raw.map(<[u8]>::to_vec));
        txn.check_value(keys::lease(actor), prev.lease_raw.map(<[u8]>::to_vec));
        txn.check_range_digest(v1::keys::sqlite_range(actor), image.digest);
        if prev.head_raw.is_some() {
            for range in v2keys::page_ranges(actor) {
                txn.clear_range(range);
            }
        }
        for (i, slice) in blob.chunks(stage::DELTA_CHUNK_SIZE).enumerate() {
            // A one-shot blob is a few MiB: a handful of slices.
            let key = v2keys::delta_chunk(actor, txid, i as u32);
            usage += quota::entry_size(self.store.layout(), &key, slice);
            txn.set(key, slice.to_vec());
        }
        let txid_bytes = txid.to_be_bytes();
        for pgno in 1..=pages {
            txn.set(v2keys::pidx(actor, pgno), txid_bytes.to_vec());
        }
        txn.set(v2keys::meta(actor), quota::with_usage(self.store.layout(), actor, &head, usage).1);
        txn.set(keys::audit(actor), audit.encode());
        if prev.lease_raw.is_some() {
            txn.clear(keys::lease(actor));
        }
        if req.ticket.is_some() {
            txn.clear(ticket::key(&req.actor));
        }
        // Check 3: the dead letter read with the head is still what it was.
        index::clear_on_migration(&mut txn, actor, prev.dead_raw);
        let finalize_started = std::time::Instant::now();
        let committed = if grouped { self.group.commit(txn).await } else { self.store.commit(txn).await };
        match committed {
            Ok(()) => {}
            // Checks 0 and 1 are the head and lease read at inspect; 2 is the v1 digest; 3 the
            // dead letter (a conflict there, like one on 0 or 1, is a race: inspect again).
            Err(StoreError::Conflict { index: 2, .. }) => {
                return Err(OneShotError::Failed(Phase::Finalize, Cause::V1Changed));
            }
            Err(StoreError::Conflict { .. }) => return Err(OneShotError::Raced(Box::new(image))),
            Err(e) => return Err(OneShotError::Failed(Phase::Finalize, e.into())),
        }
        let timings = Timings { finalize: finalize_started.elapsed(), ..image.timings };
        record_success(started, self.clock.now_ms(), pages, image.main.len() as u64, blob.len() as u64);
        Ok(Outcome { audit, bytes_written: blob.len() as u64, timings })
    }

    /// After a failure past begin: if the migration is still ours, clear what it staged so the
    /// actor is back where it started (no head left MigratingFromV1 without a live lease).
    async fn abandon(&self, staging: &Staging, phase: Phase, cause: Cause) -> (Phase, Cause) {
        if !matches!(cause, Cause::Fenced) {
            self.clear_stage(&staging.actor, &staging.head_raw, Some(&staging.lease_raw)).await;
        }
        (phase, cause)
    }

    /// Clears a MigratingFromV1 head, its pages and its lease, if they are still exactly
    /// `head_raw` and `lease_raw`. Best effort: a failure leaves a stale stage that the next
    /// attempt takes over.
    async fn clear_stage(&self, actor: &ActorId, head_raw: &[u8], lease_raw: Option<&[u8]>) {
        let mut txn = Txn::new();
        txn.check_value(v2keys::meta(actor), Some(head_raw.to_vec()));
        txn.check_value(keys::lease(actor), lease_raw.map(<[u8]>::to_vec));
        for range in v2keys::page_ranges(actor) {
            txn.clear_range(range);
        }
        txn.clear(v2keys::meta(actor));
        txn.clear(keys::lease(actor));
        if let Err(e) = self.store.commit(txn).await {
            warn!(error = %e, "could not clear an abandoned stage; the next attempt takes it over");
        }
    }

    async fn skip(
        &self,
        req: &Request,
        kind: OutcomeKind,
        head: Option<DBHead>,
        started: i64,
    ) -> Result<Outcome, MigrateError> {
        let now = self.clock.now_ms();
        let mut skip =
            AuditRecord::skipped(&req.actor, &req.campaign, kind, head.as_ref(), &self.cfg.worker_id, (started, now));
        skip.attempts = Some(req.attempts);
        let audit = audit::record_skip(&*self.store, skip, req.ticket.as_deref()).await.map_err(|e| MigrateError {
            actor: req.actor.clone(),
            phase: Phase::Inspect,
            cause: e.into(),
            files: None,
        })?;
        debug!(outcome = %kind, "skipped");
        Ok(Outcome { audit, bytes_written: 0, timings: Timings::default() })
    }
}

/// What [`Migrator::prefetch`] does with its reads: a cheap look at them (where they land: an
/// async thread, or SQLite's blocking call), then, off the async threads, the validation of a
/// small fresh actor, done as `migrate_from` would do it for a fresh actor (no recovery: a
/// prefetch is only for jobs without one).
struct Speculation {
    actor: ActorId,
    validate_up_to: u64,
    max_size: u64,
    quick_check: bool,
    one_shot_max: u32,
    started: i64,
}

impl Speculation {
    /// The prefetch from the answers to its four reads, in their order; for a small fresh
    /// actor, with the work that validates it.
    fn read(self, answers: Vec<ReadResult>) -> Then<Prefetched> {
        let mut answers = answers.into_iter();
        let mut next = || answers.next().unwrap_or(ReadResult::Value(None));
        let first = v1::read::FirstBatch::from_rows(next().into_rows());
        let (head, lease, dead) = (next().into_value(), next().into_value(), next().into_value());
        let prefetched = Prefetched {
            first,
            head,
            lease,
            dead,
            validated: None,
            started: self.started,
            read_time: Default::default(),
        };
        // With a head the actor is not fresh: its txid, and whether it migrates at all, come
        // from inspect.
        if prefetched.head.is_some() || !self.fits(&prefetched.first) {
            return Then::Done(prefetched);
        }
        Then::Work(Box::new(move || {
            // A panic here is left to the normal path's validation, which reports it as its own
            // (an internal error of the validate phase), as without a prefetch.
            let validated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.validate(&prefetched.first)));
            Prefetched { validated: validated.ok().flatten().map(Box::new), ..prefetched }
        }))
    }

    /// Whether the batch is the whole range and its main file's footprint fits the job's
    /// reservation.
    fn fits(&self, first: &v1::read::FirstBatch) -> bool {
        let main = first.declared_size(&self.actor, FileTag::Main).map(|m| m.min(self.max_size));
        first.is_whole()
            && main.is_some_and(|m| crate::budget::MemoryBudget::footprint(m, 0, false) <= self.validate_up_to)
    }

    /// The image of a whole batch, validated and, if small enough, encoded as txid 1; `None`
    /// whenever anything is not plain (the normal path then does it, errors included).
    fn validate(&self, first: &v1::read::FirstBatch) -> Option<Validated> {
        let validate_started = std::time::Instant::now();
        let opts = ReadOptions { max_size: self.max_size, recovery: None, ignore_sidecars: false };
        let image = first.rebuild(&self.actor, opts).ok()?;
        let mut validated = validate(image, self.quick_check, None).ok()?;
        validated.timings.validate = validate_started.elapsed();
        if validated.pages <= self.one_shot_max {
            let encode_started = std::time::Instant::now();
            let main = std::mem::take(&mut validated.main);
            let (main, blob, checksum) = stage::encode_whole(main, validated.pages, 1, self.started);
            validated.main = main;
            validated.encoded = Some(Encoded { txid: 1, blob, checksum });
            validated.timings.encode = encode_started.elapsed();
        }
        Some(validated)
    }
}

/// Largest database migrated in one transaction (begin, stage and finalize at once): its blob
/// and PIDX rows stay far under the transaction limit even when nothing compresses.
pub const ONE_SHOT_MAX_PAGES: u32 = 1024;

/// Most commits of one staged finalize: each but the last may fail on a dead letter written
/// since it was read ([`Migrator::commit_finalize`]).
const FINALIZE_TRIES: u32 = 3;

/// What inspect read: the head and lease a migration's first transaction checks.
#[derive(Clone, Copy)]
struct Previous<'a> {
    head_raw: Option<&'a [u8]>,
    lease_raw: Option<&'a [u8]>,
    /// The actor's dead letter, read with the head.
    dead_raw: Option<&'a [u8]>,
}

enum OneShotError {
    /// Another migration changed the head or lease since inspect: inspect again.
    Raced(Box<Validated>),
    Failed(Phase, Cause),
}

fn record_success(started: i64, now: i64, pages: u32, v1_bytes: u64, delta_bytes: u64) {
    let elapsed = (now - started).max(0) as f64 / 1000.0;
    metrics::histogram!(m::MIGRATION_SECONDS).record(elapsed);
    metrics::counter!(m::PAGES_MIGRATED).increment(u64::from(pages));
    metrics::counter!(m::V1_BYTES_MIGRATED).increment(v1_bytes);
    metrics::counter!(m::DELTA_BYTES_WRITTEN).increment(delta_bytes);
}

/// The SQLite-level checks on a read image (blocking). Records which recovery actually
/// changed the outcome: a replayed journal or WAL, an SHM that was present, or `force` on a
/// file that failed quick_check.
fn validate(image: V1Image, quick_check: bool, recovery: Option<Recovery>) -> Result<Validated, V1Rejection> {
    let V1Image { mut main, sidecar, files, digest } = image;
    let mut applied = None;
    if let Some((tag, bytes)) = sidecar {
        main = v1::recover::recover(&main, tag, &bytes)?;
        applied = recovery;
        if tag == FileTag::Journal {
            metrics::counter!(m::JOURNALS_ROLLED_BACK).increment(1);
        }
    }
    if recovery == Some(Recovery::DiscardShm) && files.shm.is_some() {
        applied = recovery;
    }
    let pages = v1::check::check_header(&main)?;
    if quick_check {
        match v1::check::quick_check(&mut main) {
            Ok(()) => {}
            Err(problem) if recovery == Some(Recovery::Force) => {
                warn!(%problem, "quick_check failed; migrating as it is (force)");
                applied = recovery;
            }
            Err(problem) => return Err(problem),
        }
    }
    Ok(Validated { main, pages, files, digest, applied, encoded: None, timings: Timings::default() })
}
