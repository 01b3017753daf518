//! Recovery names a job can ask for (DESIGN.md section 3), typically on a job an operator
//! requeued from the dead-letter queue. The work each one does lives in `v1::recover`.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovery {
    /// Let SQLite roll the hot journal back (in a private temp dir): the last committed state.
    RollbackJournal,
    /// Replay the WAL's committed frames into the main file.
    CheckpointWal,
    /// Ignore the SHM sidecar (an index SQLite rebuilds).
    DiscardShm,
    /// Migrate a file that failed quick_check as it is.
    Force,
}

impl Recovery {
    pub const ALL: [Recovery; 4] =
        [Recovery::RollbackJournal, Recovery::CheckpointWal, Recovery::DiscardShm, Recovery::Force];

    pub fn as_str(self) -> &'static str {
        match self {
            Recovery::RollbackJournal => "rollback_journal",
            Recovery::CheckpointWal => "checkpoint_wal",
            Recovery::DiscardShm => "discard_shm",
            Recovery::Force => "force",
        }
    }
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Recovery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Recovery::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            format!("unknown recovery {s:?} (expected rollback_journal, checkpoint_wal, discard_shm or force)")
        })
    }
}
