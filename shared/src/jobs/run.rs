//! Running one job: parse, reserve memory, migrate, and decide the job's fate. The same code
//! path serves the embedded runner and the AMQP worker; they differ only in what they do with
//! the [`Disposition`].
//!
//! Invariants: every job ends in exactly one disposition (ack, retry later, dead-letter); a
//! dead letter's audit record and its triage index record (`triage::index`, fleet and embedded
//! alike) are durable before the disposition is returned, and never replace the outcome of an
//! actor whose head says its migration settled (checked in the letter's transaction); a
//! requeued job runs only while its ticket is current (`triage::ticket`); a job's fate is
//! decided by [`Cause::fate`], never by error text.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use tracing::{Instrument, info, warn};

use crate::budget::MemoryBudget;
use crate::keys;
use crate::metrics as m;
use crate::migrate::{AuditRecord, Cause, Fate, MigrateError, Migrator, Outcome, OutcomeKind, Phase, Request, audit};
use crate::reason::DeadLetterReason;
use crate::store::{StoreError, Txn};
use crate::triage::index;
use crate::triage::ticket::{self, Claim};
use crate::v1::FileTag;
use crate::v1::keys::{decode_meta, meta_key};
use crate::v2::head::{DBHead, Origin};
use crate::v2::keys as v2keys;

use super::dead::{DeadLetter, kept_body};
use super::gate::{Admission, CampaignGate};
use super::message::{BadMessage, Job};
use crate::telemetry::job_span;

/// How transient failures are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; past it a job is `retries_exhausted`.
    pub max_attempts: u32,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 8, min_delay: Duration::from_secs(1), max_delay: Duration::from_secs(120) }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempts + 1`: exponential with jitter.
    pub fn delay(&self, attempts: u32) -> Duration {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempts.saturating_sub(1) as usize)
            .unwrap_or(self.max_delay)
    }
}

/// What to do with a job.
#[derive(Debug)]
pub enum Disposition {
    /// Done (migrated or skipped); the audit record is durable.
    Ack(Outcome),
    /// A transient failure: try again after `delay`. `uses_attempt` is false when the job was
    /// deferred ([`Fate::Defer`]): its attempt does not count toward the retry budget.
    Retry { delay: Duration, error: String, uses_attempt: bool },
    /// Permanent (or out of retries): the dead letter, already in the triage index.
    DeadLetter(DeadLetter),
    /// A second copy of a requeued job whose requeue already ran (or was replaced): acked
    /// with nothing written, before running or, when another copy's outcome landed while it
    /// ran, instead of recording its own (`triage::ticket`, [`Superseded`]).
    Superseded,
}

/// Where a copy of a requeued job was found superseded (the `at` of [`m::SUPERSEDED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Superseded {
    /// Its ticket was gone when it was delivered: never run.
    AtClaim,
    /// Another copy's outcome cleared the ticket while this one ran: it wrote nothing.
    AtRecord,
    /// Another copy's outcome cleared the ticket while this one, at its delivery limit, was
    /// being dead-lettered (never run): nothing written.
    AtDeliveryLimit,
}

impl Superseded {
    pub const ALL: [Superseded; 3] = [Superseded::AtClaim, Superseded::AtRecord, Superseded::AtDeliveryLimit];

    pub fn as_str(self) -> &'static str {
        match self {
            Superseded::AtClaim => "claim",
            Superseded::AtRecord => "record",
            Superseded::AtDeliveryLimit => "delivery_limit",
        }
    }
}

/// What [`JobRunner::record`] did with a dead letter.
enum Recorded {
    /// The letter, its audit and its index record are durable.
    Letter,
    /// Nothing written: the actor's head (this one) says migrated or native, an outcome the
    /// letter must not replace; the skip that head makes.
    Settled(DBHead, OutcomeKind),
}

/// The head and the skip it makes, if it ends the actor's migration: migrated from v1, or
/// native. A head that does not decode is not settled (its own dead letter, `corrupt_v2_meta`,
/// stands), nor is a migration in progress.
pub(crate) fn settled_head(raw: &[u8]) -> Option<(DBHead, OutcomeKind)> {
    let head = DBHead::decode(raw).ok()?;
    let kind = match head.origin {
        Origin::Native => OutcomeKind::SkippedNativeV2,
        Origin::MigratedFromV1 => OutcomeKind::SkippedAlreadyMigrated,
        Origin::MigratingFromV1 => return None,
    };
    Some((head, kind))
}

/// Runs jobs against one store.
#[derive(Clone)]
pub struct JobRunner {
    pub migrator: Migrator,
    pub retry: RetryPolicy,
    pub budget: MemoryBudget,
    /// Fleet mode: jobs run only when the store holds their campaign's record.
    pub gate: Option<Arc<CampaignGate>>,
}

impl JobRunner {
    /// Runs the job in `body`, delivered for the `attempts`-th time, in its [`JobRunner::span`].
    pub async fn run(&self, body: &[u8], attempts: u32) -> Disposition {
        self.run_in_current_span(body, attempts).instrument(self.span(body)).await
    }

    /// [`JobRunner::run`] in the caller's span: for a caller that keeps the job's span around
    /// more than the run (the worker settles the delivery in it).
    pub(crate) async fn run_in_current_span(&self, body: &[u8], attempts: u32) -> Disposition {
        self.run_delivery_in_current_span(body, attempts, None).await
    }

    /// Runs the job in `body`, requeued by triage under `token` when it carries one: a
    /// requeued job runs only while its ticket is current, and its ticket is cleared with its
    /// durable outcome.
    pub async fn run_delivery_in_current_span(&self, body: &[u8], attempts: u32, token: Option<&str>) -> Disposition {
        let job = match self.take_delivery(body, attempts, token).await {
            Ok(job) => job,
            Err(ended) => return ended,
        };
        // The ticket is cleared in the transaction of the job's outcome (`Request::ticket`,
        // or the dead letter's record below).
        self.run_job_in_current_span(&job, attempts).await
    }

    /// The job in `body`, checked against the store's layout, its ticket claimed when it was
    /// requeued under `token`; or the disposition that ends the delivery without running it
    /// (a bad message, a stale second copy of a requeue, a store failure).
    async fn take_delivery(&self, body: &[u8], attempts: u32, token: Option<&str>) -> Result<Job, Disposition> {
        let mut job = match Job::parse(body) {
            Ok(job) => job,
            Err(bad) => return Err(self.bad_message(body, &bad, attempts).await),
        };
        let layout = self.migrator.store().layout();
        if let Err(e) = layout.check_actor(&job.actor_id) {
            let bad = BadMessage::ForeignActor {
                actor: job.actor_id.to_string(),
                layout: layout.as_str(),
                detail: e.to_string(),
            };
            return Err(self.bad_message(body, &bad, attempts).await);
        }
        if let Some(token) = token {
            match ticket::claim(&**self.migrator.store(), &job.actor_id, token).await {
                Ok(Claim::Current(raw)) => job.ticket = Some(raw),
                Ok(Claim::Stale) => {
                    metrics::counter!(m::SUPERSEDED, "at" => Superseded::AtClaim.as_str()).increment(1);
                    info!("a second copy of a requeued job whose requeue already ran; acked without running");
                    return Err(Disposition::Superseded);
                }
                Err(e) => return Err(self.failed(&job, Self::store_error(&job, e), attempts).await),
            }
        }
        Ok(job)
    }

    fn store_error(job: &Job, e: StoreError) -> MigrateError {
        MigrateError { actor: job.actor_id.clone(), phase: Phase::Inspect, cause: Cause::Store(e), files: None }
    }

    /// Dead-letters the job in `body` without running it: its delivery `deliveries` reached the
    /// work queue's delivery limit, so the broker would drop it from work next time. Taking the
    /// decision here puts it in the triage index like every other dead letter.
    pub async fn delivery_limit_reached(
        &self,
        body: &[u8],
        attempts: u32,
        deliveries: i64,
        token: Option<&str>,
    ) -> Disposition {
        let job = match self.take_delivery(body, attempts, token).await {
            Ok(job) => job,
            Err(ended) => return ended,
        };
        let error = format!("delivered {deliveries} times without an outcome: the work queue's delivery limit");
        let dead = self.letter(&job, DeadLetterReason::DeliveryLimit, "deliver", error, attempts, None);
        match self.record(&job, &dead).await {
            Ok(Recorded::Letter) => {}
            Ok(Recorded::Settled(head, kind)) => return self.settled(&job, (head, kind), attempts, false).await,
            Err(e) if ticket::is_ticket_conflict(&e) => return Self::superseded(Superseded::AtDeliveryLimit, &e),
            Err(e) => {
                return self.retry_later(attempts, format!("recording dead letter: {e}"), false);
            }
        }
        metrics::counter!(m::DEAD_LETTERS, "reason" => DeadLetterReason::DeliveryLimit.as_str()).increment(1);
        metrics::counter!(m::OUTCOMES, "outcome" => OutcomeKind::DeadLettered.as_str()).increment(1);
        warn!(reason = %DeadLetterReason::DeliveryLimit, deliveries, "dead-lettered");
        Disposition::DeadLetter(dead)
    }

    /// A dead letter of `job`.
    fn letter(
        &self,
        job: &Job,
        reason: DeadLetterReason,
        phase: &str,
        error: String,
        attempts: u32,
        files: Option<crate::v1::V1Files>,
    ) -> DeadLetter {
        DeadLetter {
            actor_id: job.actor_id.to_string(),
            campaign: job.campaign.clone(),
            reason,
            phase: phase.to_string(),
            error,
            attempts,
            worker: self.migrator.config().worker_id.clone(),
            at_ms: self.migrator.now_ms(),
            v1_files: files,
            recovery: job.recovery,
            message: kept_body(&job.encode()),
        }
    }

    /// The span every line about the job in `body` is logged in: its actor, campaign and this
    /// worker. Of a body that is not a valid job, only the names that are valid ids are kept
    /// (nothing else of a body ever reaches a log).
    pub fn span(&self, body: &[u8]) -> tracing::Span {
        let worker = &self.migrator.config().worker_id;
        match Job::parse(body) {
            Ok(job) => self.job_span(&job),
            Err(_) => {
                let names = BadMessage::names(body);
                job_span(names.actor.as_deref(), names.campaign.as_deref(), worker)
            }
        }
    }

    /// The span of `job` (see [`JobRunner::span`]).
    pub fn job_span(&self, job: &Job) -> tracing::Span {
        job_span(Some(job.actor_id.as_str()), Some(&job.campaign), &self.migrator.config().worker_id)
    }

    /// Runs `job` in its span.
    pub async fn run_job(&self, job: &Job, attempts: u32) -> Disposition {
        self.run_job_in_current_span(job, attempts).instrument(self.job_span(job)).await
    }

    /// [`JobRunner::run_job`] in the caller's span (a caller that logs more about the job).
    pub(crate) async fn run_job_in_current_span(&self, job: &Job, attempts: u32) -> Disposition {
        if let Err(e) = self.admit(job).await {
            return self.failed(job, e, attempts).await;
        }
        metrics::counter!(m::ATTEMPTS).increment(1);
        metrics::gauge!(m::JOBS_IN_FLIGHT).increment(1.0);
        let result = self.migrate(job, &Self::request(job, attempts)).await;
        metrics::gauge!(m::JOBS_IN_FLIGHT).decrement(1.0);
        match result {
            Ok(outcome) => {
                metrics::counter!(m::OUTCOMES, "outcome" => outcome.kind().as_str()).increment(1);
                if outcome.kind() == OutcomeKind::Migrated {
                    let a = &outcome.audit;
                    if let Some(bytes) = a.v1_bytes {
                        metrics::histogram!(m::JOB_V1_BYTES).record(bytes as f64);
                    }
                    let ms = (a.finished_at_ms - a.started_at_ms).max(0);
                    info!(pages = a.pages, bytes = a.v1_bytes, ms, "migrated");
                    outcome.timings.record();
                }
                Disposition::Ack(outcome)
            }
            Err(e) => self.failed(job, e, attempts).await,
        }
    }

    /// The migration `job` asks for, on its `attempts`-th delivery.
    fn request(job: &Job, attempts: u32) -> Request {
        Request {
            actor: job.actor_id.clone(),
            campaign: job.campaign.clone(),
            recovery: job.recovery,
            attempts,
            ticket: job.ticket.clone(),
        }
    }

    /// Reserves the job's memory and migrates. A job without a recovery first reserves what one
    /// batched read can hold and reads its range, head and lease in one call
    /// ([`Migrator::prefetch`], which validates a small fresh actor with the read, within that
    /// reservation): a small actor then needs no other read. One the read shows to be larger
    /// lets it go, reserves its real footprint and reads again.
    async fn migrate(&self, job: &Job, req: &Request) -> Result<Outcome, MigrateError> {
        if job.recovery.is_none() {
            let first = self.budget.reserve(MemoryBudget::first_read_footprint()).await;
            let entered = self.migrator.enter();
            let prefetched = self.migrator.prefetch(&job.actor_id, first.bytes).await?;
            let prefetch = prefetched.read_time();
            let max = self.migrator.config().max_size;
            let main = prefetched.main_size(&job.actor_id).unwrap_or(0).min(max);
            if prefetched.is_whole() && MemoryBudget::footprint(main, 0, false) <= first.bytes {
                let outcome = self.migrator.migrate_from(req, Some(prefetched), entered).await;
                drop(first);
                return outcome.map(|mut o| {
                    o.timings.read += prefetch;
                    o
                });
            }
        }
        let _reservation = self.budget.reserve(self.footprint(job).await).await;
        self.migrator.migrate(req).await
    }

    /// Passes the campaign gate, if there is one.
    async fn admit(&self, job: &Job) -> Result<(), MigrateError> {
        let Some(gate) = &self.gate else { return Ok(()) };
        let store = self.migrator.store();
        let cause = match gate.admit(&**store, &job.campaign).await {
            Ok(Admission::Known) => return Ok(()),
            Ok(Admission::Unknown) => {
                Cause::UnknownCampaign { campaign: job.campaign.clone(), store: store.describe() }
            }
            Err(e) => Cause::Store(e),
        };
        Err(MigrateError { actor: job.actor_id.clone(), phase: Phase::Inspect, cause, files: None })
    }

    /// The bytes this job will hold ([`MemoryBudget::footprint`]): its main file, and its
    /// sidecars under a recovery.
    async fn footprint(&self, job: &Job) -> u64 {
        let store = self.migrator.store();
        let max = self.migrator.config().max_size;
        let size = |tag: FileTag| async move {
            match store.get(&meta_key(&job.actor_id, tag)).await {
                Ok(Some(meta)) => decode_meta(&meta).unwrap_or(0).min(max),
                _ => 0,
            }
        };
        let main = size(FileTag::Main).await;
        let mut sidecars = 0;
        if job.recovery.is_some() {
            for tag in FileTag::ALL.into_iter().filter(|t| *t != FileTag::Main) {
                sidecars += size(tag).await;
            }
        }
        MemoryBudget::footprint(main, sidecars, job.recovery.is_some())
    }

    async fn failed(&self, job: &Job, e: MigrateError, attempts: u32) -> Disposition {
        metrics::counter!(m::FAILURES, "phase" => e.phase.as_str(), "kind" => e.cause.kind()).increment(1);
        let reason = match e.fate() {
            Fate::Defer => {
                warn!(store = %self.migrator.store().describe(), error = %e,
                      "job handed back: its campaign is not in this worker's store");
                // The longest delay of the policy: a misdirected worker must not spin on the jobs
                // it hands back.
                return Disposition::Retry { delay: self.retry.max_delay, error: e.to_string(), uses_attempt: false };
            }
            Fate::Superseded => return Self::superseded(Superseded::AtRecord, &e),
            Fate::DeadLetter(reason) => reason,
            Fate::Retry if attempts < self.retry.max_attempts => {
                info!(attempts, delay = ?self.retry.delay(attempts), error = %e, "transient failure; retrying later");
                return self.retry_later(attempts, e.to_string(), true);
            }
            Fate::Retry => DeadLetterReason::RetriesExhausted,
        };
        let dead = self.letter(job, reason, e.phase.as_str(), e.to_string(), attempts, e.files.clone());
        // The triage index is where every dead letter is found: none is given up before it is
        // there, whatever the reason (a store that is down is waited for).
        match self.record(job, &dead).await {
            Ok(Recorded::Letter) => {}
            Ok(Recorded::Settled(head, kind)) => return self.settled(job, (head, kind), attempts, true).await,
            Err(err) if ticket::is_ticket_conflict(&err) => return Self::superseded(Superseded::AtRecord, &err),
            Err(err) => return self.retry_later(attempts, format!("recording dead letter: {err}"), true),
        }
        if matches!(e.cause, Cause::Rejected(crate::v1::V1Rejection::JournalSidecar { .. })) {
            metrics::counter!(m::JOURNALS_REJECTED).increment(1);
        }
        metrics::counter!(m::DEAD_LETTERS, "reason" => reason.as_str()).increment(1);
        metrics::counter!(m::OUTCOMES, "outcome" => OutcomeKind::DeadLettered.as_str()).increment(1);
        warn!(%reason, attempts, error = %e, "dead-lettered");
        Disposition::DeadLetter(dead)
    }

    /// Writes the dead letter's audit record and its triage index record in one transaction,
    /// clearing the job's requeue ticket with them, unless the actor's v2 head says its
    /// migration is settled ([`Recorded::Settled`]). The transaction checks the head it read,
    /// so a finalize that lands meanwhile fails it (a conflict: retried) instead of being
    /// buried under the letter.
    async fn record(&self, job: &Job, dead: &DeadLetter) -> Result<Recorded, StoreError> {
        let store = self.migrator.store();
        let meta = v2keys::meta(&job.actor_id);
        let head = store.get(&meta).await?;
        if let Some((settled, kind)) = head.as_deref().and_then(settled_head) {
            return Ok(Recorded::Settled(settled, kind));
        }
        let old = index::current(&**store, dead).await?;
        // The letter carries the job's campaign and recovery.
        let audit = dead.audit(&job.actor_id, job.enqueued_at_ms);
        let mut txn = Txn::new();
        txn.check_value(meta, head);
        txn.set(keys::audit(&job.actor_id), audit.encode());
        index::put(&mut txn, old.as_deref(), dead);
        if let Some(raw) = &job.ticket {
            ticket::settle(&mut txn, &job.actor_id, raw);
        }
        store.commit(txn).await.map(|()| Recorded::Letter)
    }

    /// The job of an actor whose migration settled while the job failed (a duplicate delivery
    /// whose other copy finalized, a commit that landed though its connection was lost): its
    /// outcome is the skip the head says (`skipped_already_migrated`, keeping the migration's
    /// audit fields, or `skipped_native_v2`), recorded from the head `record` read, never a dead
    /// letter over the audit. Nothing else is read: not v1, which may be gone by now.
    /// `uses_attempt`: whether a failure to record it counts toward the retry budget (as the
    /// letter's own failure would on this path).
    async fn settled(
        &self,
        job: &Job,
        (head, kind): (DBHead, OutcomeKind),
        attempts: u32,
        uses_attempt: bool,
    ) -> Disposition {
        info!(outcome = %kind, "the actor's migration settled while its job failed; recording the skip, not a dead letter");
        let now = self.migrator.now_ms();
        let worker = &self.migrator.config().worker_id;
        let mut skip = AuditRecord::skipped(&job.actor_id, &job.campaign, kind, Some(&head), worker, (now, now));
        skip.attempts = Some(attempts);
        match audit::record_skip(&**self.migrator.store(), skip, job.ticket.as_deref()).await {
            Ok(audit) => {
                metrics::counter!(m::OUTCOMES, "outcome" => kind.as_str()).increment(1);
                Disposition::Ack(Outcome { audit, bytes_written: 0, timings: Default::default() })
            }
            // `uses_attempt` tells a run's failure from a job dead-lettered at its delivery limit.
            Err(e) if ticket::is_ticket_conflict(&e) => {
                Self::superseded(if uses_attempt { Superseded::AtRecord } else { Superseded::AtDeliveryLimit }, &e)
            }
            Err(e) => self.retry_later(attempts, format!("recording the skip of a settled actor: {e}"), uses_attempt),
        }
    }

    /// The end of a copy of a requeued job that claimed its ticket while another copy ran,
    /// and found the other's outcome recorded when it came to record its own (`why`): acked
    /// with nothing written, the other copy's outcome standing.
    fn superseded(at: Superseded, why: &dyn std::fmt::Display) -> Disposition {
        metrics::counter!(m::SUPERSEDED, "at" => at.as_str()).increment(1);
        info!(error = %why, "another copy of this requeued job recorded its outcome first; acked without one");
        Disposition::Superseded
    }

    /// The job's retry after a transient failure (`error`, on its `attempts`-th delivery),
    /// counted: every retry the runner hands back is one, whichever step failed. `uses_attempt`:
    /// whether it counts toward the retry budget.
    fn retry_later(&self, attempts: u32, error: String, uses_attempt: bool) -> Disposition {
        metrics::counter!(m::RETRIES).increment(1);
        Disposition::Retry { delay: self.retry.delay(attempts), error, uses_attempt }
    }

    /// A message that is not a job: dead-lettered (in the index, by the hash of its body) and
    /// never run.
    async fn bad_message(&self, body: &[u8], bad: &BadMessage, attempts: u32) -> Disposition {
        let names = BadMessage::names(body);
        let dead = DeadLetter {
            actor_id: names.raw_actor,
            campaign: names.raw_campaign,
            reason: DeadLetterReason::BadMessage,
            phase: "parse".into(),
            error: bad.to_string(),
            attempts,
            worker: self.migrator.config().worker_id.clone(),
            at_ms: self.migrator.now_ms(),
            v1_files: None,
            recovery: None,
            message: kept_body(body),
        };
        let store = self.migrator.store();
        let written = async {
            let old = index::current(&**store, &dead).await?;
            let mut txn = Txn::new();
            index::put(&mut txn, old.as_deref(), &dead);
            store.commit(txn).await
        };
        if let Err(e) = written.await {
            return self.retry_later(attempts, format!("recording a bad message's dead letter: {e}"), true);
        }
        metrics::counter!(m::DEAD_LETTERS, "reason" => DeadLetterReason::BadMessage.as_str()).increment(1);
        metrics::counter!(m::OUTCOMES, "outcome" => OutcomeKind::DeadLettered.as_str()).increment(1);
        // The log names the problem, never the body (the dead letter keeps it for triage).
        warn!(problem = bad.kind(), bytes = body.len(), "bad message dead-lettered");
        Disposition::DeadLetter(dead)
    }
}
