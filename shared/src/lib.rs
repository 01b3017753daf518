//! ferry: migrates actor SQLite databases from the v1 chunked layout to the v2 page store.
//!
//! See `ARCHITECTURE.md` at the repository root for the map, and `docs/FORMAT.md` for every
//! byte layout, key and record (the project's design contract, kept beside the repository in
//! `../shared/DESIGN.md`, is the authority on them).

pub mod actor;
pub mod budget;
pub mod campaign;
pub mod census;
pub mod checksum;
pub mod clock;
pub mod console;
pub mod embedded;
// Test support is not part of the library the binaries ship: fixtures and fuzz entry points
// compile only with the `test-support` feature (ferry's own integration tests, ferry-tests and
// fuzz/ enable it), and the fixtures also for this crate's unit tests, which use them.
#[cfg(feature = "test-support")]
pub mod fuzzing;
pub mod http;
pub mod import;
pub mod jobs;
pub mod keys;
pub mod layout;
pub mod metrics;
pub mod migrate;
pub mod progress;
pub mod queue;
pub mod reason;
pub mod recovery;
pub mod scan;
pub mod store;
pub mod synth;
pub mod telemetry;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod triage;
pub mod v1;
pub mod v2;
pub mod verify;

pub use actor::ActorId;
pub use reason::DeadLetterReason;
pub use recovery::Recovery;
