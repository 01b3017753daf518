//! Metric names (all prefixed `ferry_`), declared once so the code, the dashboard and the
//! tests agree, with their help text. Labels: `outcome`, `reason`, `phase`, `kind`, `at`.
//!
//! Invariant: [`register`] describes every metric and creates every series it can have (each
//! outcome, dead-letter reason, phase and failure kind) at zero, so a fresh worker exports
//! all of them and `rate()` and `increase()` count from the first scrape, not from the
//! second event.

use metrics::Unit;

use crate::migrate::{Cause, OutcomeKind, Phase};
use crate::queue::dead_inbox::Settled;
use crate::reason::DeadLetterReason;

/// Jobs finished, by `outcome` (migrated, skipped_*, dead_lettered).
pub const OUTCOMES: &str = "ferry_outcomes_total";
/// Dead letters, by `reason`.
pub const DEAD_LETTERS: &str = "ferry_dead_letters_total";
/// Migration attempts started.
pub const ATTEMPTS: &str = "ferry_attempts_total";
/// Failed attempts, by `phase` and `kind` (transient or a reason).
pub const FAILURES: &str = "ferry_failures_total";
/// Retries scheduled.
pub const RETRIES: &str = "ferry_retries_total";
/// Copies of requeued jobs acked without an outcome of their own, by `at`
/// ([`crate::jobs::Superseded`]).
pub const SUPERSEDED: &str = "ferry_superseded_total";
/// Seconds per successful migration.
pub const MIGRATION_SECONDS: &str = "ferry_migration_duration_seconds";
/// v1 main-file bytes per job (histogram of sizes).
pub const JOB_V1_BYTES: &str = "ferry_job_v1_bytes";
pub const PAGES_MIGRATED: &str = "ferry_pages_migrated_total";
pub const V1_BYTES_MIGRATED: &str = "ferry_v1_bytes_migrated_total";
pub const DELTA_BYTES_WRITTEN: &str = "ferry_delta_bytes_written_total";
/// Actors whose v1 held a hot journal (rejected, or rolled back by recovery).
pub const JOURNALS_REJECTED: &str = "ferry_journals_rejected_total";
pub const JOURNALS_ROLLED_BACK: &str = "ferry_journals_rolled_back_total";
/// Jobs being worked on now.
pub const JOBS_IN_FLIGHT: &str = "ferry_jobs_in_flight";
/// Bytes reserved by jobs in flight under the memory budget.
pub const BYTES_IN_FLIGHT: &str = "ferry_bytes_in_flight";
/// 1 while connected to the broker and consuming.
pub const CONSUMING: &str = "ferry_consuming";
/// Broker sessions opened again after a lost one (reconnects that succeeded).
pub const RECONNECTS: &str = "ferry_broker_reconnects_total";
/// Attempts to open a broker session after a lost one (each try, failed ones included).
pub const RECONNECT_ATTEMPTS: &str = "ferry_broker_reconnect_attempts_total";

/// Store write transactions committed (a group of actors committed together counts once).
pub const STORE_COMMITS: &str = "ferry_store_commits_total";
/// Transactions in each group commit (`store::group`).
pub const GROUP_SIZE: &str = "ferry_group_commit_size";
/// Seconds of each step of a migrated job, by `step` ([`JOB_STEPS`]): where a job's time goes,
/// and what the rest of its cycle (the broker's hand-off) is not.
pub const JOB_STEP_SECONDS: &str = "ferry_job_step_seconds";
/// The steps of [`JOB_STEP_SECONDS`]: `read` (every store read of the v1 files, the head and
/// the lease), `validate` (SQLite's checks of the image), `encode` (LZ4 pages and LTX),
/// `write` (staged deltas of a large actor), `finalize` (the commit, a group's wait included)
/// and `settle` (the ack, or the retry or dead letter published before it).
pub const JOB_STEPS: [&str; 6] = ["read", "validate", "encode", "write", "finalize", SETTLE_STEP];
/// The worker's own step of [`JOB_STEPS`]; the others are `migrate::Timings`' fields, in order.
pub const SETTLE_STEP: &str = "settle";

/// Messages the dead-letter inbox settled, by `kind` (`queue::dead_inbox::Settled`):
/// `indexed_skip`, `admitted`, `duplicate`, `actor_settled`.
pub const DEAD_INBOX: &str = "ferry_dead_inbox_total";

/// Buckets of [`MIGRATION_SECONDS`]: from 1 ms, as most small actors migrate in a few.
pub const SECONDS_BUCKETS: [f64; 17] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
/// Buckets of [`JOB_V1_BYTES`]: one page to the largest database ferry migrates.
pub const BYTES_BUCKETS: [f64; 9] =
    [4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0, 134217728.0];

/// Buckets of [`JOB_STEP_SECONDS`]: from 0.1 ms, as a small job's steps take a fraction of one.
pub const STEP_BUCKETS: [f64; 12] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0, 60.0];
/// Buckets of [`GROUP_SIZE`]: one transaction to the largest groups.
pub const GROUP_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Every metric name, for the dashboard test.
pub const ALL: &[&str] = &[
    OUTCOMES,
    DEAD_LETTERS,
    ATTEMPTS,
    FAILURES,
    RETRIES,
    SUPERSEDED,
    MIGRATION_SECONDS,
    JOB_V1_BYTES,
    PAGES_MIGRATED,
    V1_BYTES_MIGRATED,
    DELTA_BYTES_WRITTEN,
    JOURNALS_REJECTED,
    JOURNALS_ROLLED_BACK,
    JOBS_IN_FLIGHT,
    BYTES_IN_FLIGHT,
    CONSUMING,
    RECONNECTS,
    RECONNECT_ATTEMPTS,
    DEAD_INBOX,
    STORE_COMMITS,
    GROUP_SIZE,
    JOB_STEP_SECONDS,
];

/// Describes every metric to the installed recorder and creates every series at zero.
pub fn register() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(OUTCOMES, "Jobs finished, by outcome (migrated, skipped_*, dead_lettered).");
    describe_counter!(DEAD_LETTERS, "Jobs dead-lettered, by reason.");
    describe_counter!(ATTEMPTS, "Migration attempts started (a retried job counts once per attempt).");
    describe_counter!(FAILURES, "Failed migration attempts, by phase and kind (a transient cause or a reason).");
    describe_counter!(RETRIES, "Retries scheduled after a transient failure.");
    describe_counter!(
        SUPERSEDED,
        "Copies of requeued jobs acked without an outcome of their own, another copy's standing, by where it \
         was found (claim: never run; record: ran, wrote nothing; delivery_limit: dead-lettered at its \
         delivery limit, never run)."
    );
    describe_histogram!(MIGRATION_SECONDS, Unit::Seconds, "Wall time of each successful migration.");
    describe_histogram!(JOB_V1_BYTES, Unit::Bytes, "Size of the v1 main file of each migrated job.");
    describe_counter!(PAGES_MIGRATED, "SQLite pages written to v2.");
    describe_counter!(V1_BYTES_MIGRATED, Unit::Bytes, "Bytes of v1 main files migrated.");
    describe_counter!(DELTA_BYTES_WRITTEN, Unit::Bytes, "Bytes of LTX blobs written to DELTA rows.");
    describe_counter!(JOURNALS_REJECTED, "Actors dead-lettered for a hot rollback journal.");
    describe_counter!(JOURNALS_ROLLED_BACK, "Hot rollback journals rolled back by a recovery.");
    describe_gauge!(JOBS_IN_FLIGHT, "Jobs being worked on now.");
    describe_gauge!(BYTES_IN_FLIGHT, Unit::Bytes, "Bytes reserved under the memory budget by jobs in flight.");
    describe_gauge!(CONSUMING, "1 while connected to the broker and consuming, else 0.");
    describe_counter!(RECONNECTS, "Broker sessions opened again after a lost one (reconnects that succeeded).");
    describe_counter!(RECONNECT_ATTEMPTS, "Attempts to open a broker session after a lost one, failed ones included.");
    describe_counter!(
        STORE_COMMITS,
        "Store write transactions committed (a group commit of several actors counts once)."
    );
    describe_histogram!(GROUP_SIZE, "Transactions committed together by each group commit.");
    describe_histogram!(
        JOB_STEP_SECONDS,
        Unit::Seconds,
        "Wall time of each step of a migrated job, by step (read, validate, encode, write, finalize: the commit, \
         a group's wait included; settle: the ack or the publish before it)."
    );
    describe_counter!(
        DEAD_INBOX,
        "Messages of the dead-letter queue settled by the inbox, by kind (indexed_skip: ferry's own, already indexed; \
         admitted: written to the store index; duplicate: its record already held a letter; actor_settled: its \
         actor is migrated or native already, not listed)."
    );

    for outcome in OutcomeKind::ALL {
        metrics::counter!(OUTCOMES, "outcome" => outcome.as_str()).increment(0);
    }
    for reason in DeadLetterReason::ALL {
        metrics::counter!(DEAD_LETTERS, "reason" => reason.as_str()).increment(0);
    }
    for at in crate::jobs::Superseded::ALL {
        metrics::counter!(SUPERSEDED, "at" => at.as_str()).increment(0);
    }
    for kind in Settled::ALL {
        metrics::counter!(DEAD_INBOX, "kind" => kind.as_str()).increment(0);
    }
    for phase in Phase::ALL {
        for kind in Cause::kinds() {
            metrics::counter!(FAILURES, "phase" => phase.as_str(), "kind" => kind).increment(0);
        }
    }
    for counter in [
        ATTEMPTS,
        RETRIES,
        PAGES_MIGRATED,
        V1_BYTES_MIGRATED,
        DELTA_BYTES_WRITTEN,
        JOURNALS_REJECTED,
        JOURNALS_ROLLED_BACK,
        RECONNECTS,
        RECONNECT_ATTEMPTS,
        STORE_COMMITS,
    ] {
        metrics::counter!(counter).increment(0);
    }
    for gauge in [JOBS_IN_FLIGHT, BYTES_IN_FLIGHT, CONSUMING] {
        // Registering only: a gauge another part already moved keeps its value.
        metrics::gauge!(gauge).increment(0.0);
    }
    for histogram in [MIGRATION_SECONDS, JOB_V1_BYTES, GROUP_SIZE] {
        // A registered histogram is exported with empty buckets until its first sample.
        let _ = metrics::histogram!(histogram);
    }
    for step in JOB_STEPS {
        let _ = metrics::histogram!(JOB_STEP_SECONDS, "step" => step);
    }
}
