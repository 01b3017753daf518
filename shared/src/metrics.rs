//! Metric names (all prefixed `ferry_`), declared once so the code, the dashboard and the
//! tests agree. Labels: `outcome`, `reason`, `phase`, `kind`.

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
/// Broker reconnects.
pub const RECONNECTS: &str = "ferry_broker_reconnects_total";

/// Every metric name, for the dashboard test.
pub const ALL: &[&str] = &[
    OUTCOMES,
    DEAD_LETTERS,
    ATTEMPTS,
    FAILURES,
    RETRIES,
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
];
