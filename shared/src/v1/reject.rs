//! Why a v1 database is refused: one variant per rejection reason of DESIGN.md section 3
//! step 4. Rejections are permanent; the worker dead-letters them.

use crate::reason::DeadLetterReason;

/// A v1 database ferry will not migrate as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum V1Rejection {
    #[error("a rollback journal is present ({size} bytes): the actor crashed inside a write transaction")]
    JournalSidecar { size: u64 },
    #[error("a WAL file is present ({size} bytes)")]
    WalSidecar { size: u64 },
    #[error("an SHM file is present ({size} bytes)")]
    ShmSidecar { size: u64 },
    #[error("no main database file: {detail}")]
    MissingMain { detail: String },
    #[error("bad {file} meta: {detail}")]
    BadMeta { file: &'static str, detail: String },
    #[error("{file} file is {size} bytes, over the {max}-byte limit")]
    Oversize { file: &'static str, size: u64, max: u64 },
    #[error("{file} chunks do not match its meta: {detail}")]
    ChunkMismatch { file: &'static str, detail: String },
    #[error("not a SQLite database: {detail}")]
    BadHeader { detail: String },
    #[error("page size {page_size} is not supported (v2 takes only 4096)")]
    UnsupportedPageSize { page_size: u32 },
    #[error("file size {size} is not a multiple of the page size")]
    NotPageAligned { size: u64 },
    #[error("quick_check failed: {detail}")]
    IntegrityCheckFailed { detail: String },
}

impl V1Rejection {
    pub fn reason(&self) -> DeadLetterReason {
        match self {
            V1Rejection::JournalSidecar { .. } => DeadLetterReason::JournalSidecar,
            V1Rejection::WalSidecar { .. } => DeadLetterReason::WalSidecar,
            V1Rejection::ShmSidecar { .. } => DeadLetterReason::ShmSidecar,
            V1Rejection::MissingMain { .. } => DeadLetterReason::MissingMain,
            V1Rejection::BadMeta { .. } => DeadLetterReason::BadMeta,
            V1Rejection::Oversize { .. } => DeadLetterReason::Oversize,
            V1Rejection::ChunkMismatch { .. } => DeadLetterReason::ChunkMismatch,
            V1Rejection::BadHeader { .. } => DeadLetterReason::BadHeader,
            V1Rejection::UnsupportedPageSize { .. } => DeadLetterReason::UnsupportedPageSize,
            V1Rejection::NotPageAligned { .. } => DeadLetterReason::NotPageAligned,
            V1Rejection::IntegrityCheckFailed { .. } => DeadLetterReason::IntegrityCheckFailed,
        }
    }
}
