//! Dead-letter reasons: the exact strings of DESIGN.md sections 3 and 4. Tools outside this
//! repo match on them, so they are spelled once, here.

use std::fmt;

/// Why a job was dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    JournalSidecar,
    WalSidecar,
    ShmSidecar,
    MissingMain,
    BadMeta,
    Oversize,
    ChunkMismatch,
    BadHeader,
    UnsupportedPageSize,
    NotPageAligned,
    IntegrityCheckFailed,
    CorruptV2Meta,
    BadMessage,
    RetriesExhausted,
    DeliveryLimit,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 15] = [
        DeadLetterReason::JournalSidecar,
        DeadLetterReason::WalSidecar,
        DeadLetterReason::ShmSidecar,
        DeadLetterReason::MissingMain,
        DeadLetterReason::BadMeta,
        DeadLetterReason::Oversize,
        DeadLetterReason::ChunkMismatch,
        DeadLetterReason::BadHeader,
        DeadLetterReason::UnsupportedPageSize,
        DeadLetterReason::NotPageAligned,
        DeadLetterReason::IntegrityCheckFailed,
        DeadLetterReason::CorruptV2Meta,
        DeadLetterReason::BadMessage,
        DeadLetterReason::RetriesExhausted,
        DeadLetterReason::DeliveryLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::JournalSidecar => "journal_sidecar",
            DeadLetterReason::WalSidecar => "wal_sidecar",
            DeadLetterReason::ShmSidecar => "shm_sidecar",
            DeadLetterReason::MissingMain => "missing_main",
            DeadLetterReason::BadMeta => "bad_meta",
            DeadLetterReason::Oversize => "oversize",
            DeadLetterReason::ChunkMismatch => "chunk_mismatch",
            DeadLetterReason::BadHeader => "bad_header",
            DeadLetterReason::UnsupportedPageSize => "unsupported_page_size",
            DeadLetterReason::NotPageAligned => "not_page_aligned",
            DeadLetterReason::IntegrityCheckFailed => "integrity_check_failed",
            DeadLetterReason::CorruptV2Meta => "corrupt_v2_meta",
            DeadLetterReason::BadMessage => "bad_message",
            DeadLetterReason::RetriesExhausted => "retries_exhausted",
            DeadLetterReason::DeliveryLimit => "delivery_limit",
        }
    }

    pub fn parse(s: &str) -> Option<DeadLetterReason> {
        DeadLetterReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_spelling_matches_the_contract_strings() {
        for r in DeadLetterReason::ALL {
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{}\"", r.as_str()));
            assert_eq!(DeadLetterReason::parse(r.as_str()), Some(r));
        }
    }
}
