//! `DBHead`, the v2 head record at `v2/{actor}/META`, BARE-encoded exactly as serde_bare
//! writes the field order of DESIGN.md section 2 (fixed-width little-endian integers, the
//! origin enum as a uint varint of its variant index).
//!
//! Invariant: a head that does not decode completely (trailing bytes included) is corrupt;
//! ferry reports it and never overwrites it.

use serde::{Deserialize, Serialize};

/// `schema_version` ferry writes.
pub const SCHEMA_VERSION: u32 = 2;
/// The only page size v2 stores.
pub const PAGE_SIZE: u32 = 4096;
/// `shard_size` ferry writes.
pub const SHARD_SIZE: u32 = 64;
/// `sqlite_max_storage` ferry writes: 10 GiB.
pub const MAX_STORAGE: u64 = 10 * 1024 * 1024 * 1024;

/// Who made a v2 database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    Native,
    MigratedFromV1,
    MigratingFromV1,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Native => "native",
            Origin::MigratedFromV1 => "migrated_from_v1",
            Origin::MigratingFromV1 => "migrating_from_v1",
        }
    }
}

/// The v2 head record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DBHead {
    pub schema_version: u32,
    pub generation: u64,
    pub head_txid: u64,
    pub next_txid: u64,
    pub materialized_txid: u64,
    pub db_size_pages: u32,
    pub page_size: u32,
    pub shard_size: u32,
    pub creation_ts_ms: i64,
    pub sqlite_storage_used: u64,
    pub sqlite_max_storage: u64,
    pub origin: Origin,
}

/// A head that does not decode.
#[derive(Debug, Clone, thiserror::Error)]
#[error("v2 head does not decode: {0}")]
pub struct CorruptHead(pub String);

impl DBHead {
    /// A head for a migration that is staging `txid` at `generation`. Its `db_size_pages` is 0
    /// until finalize, as rivet's `DBHead::new` has it: a reader that takes over a staging head
    /// must not serve pages that are not committed.
    pub fn staging(generation: u64, txid: u64, creation_ts_ms: i64) -> DBHead {
        DBHead {
            schema_version: SCHEMA_VERSION,
            generation,
            head_txid: 0,
            next_txid: txid + 1,
            materialized_txid: 0,
            db_size_pages: 0,
            page_size: PAGE_SIZE,
            shard_size: SHARD_SIZE,
            creation_ts_ms,
            sqlite_storage_used: 0,
            sqlite_max_storage: MAX_STORAGE,
            origin: Origin::MigratingFromV1,
        }
    }

    /// "A stage is in progress" (DESIGN.md): `next_txid > head_txid + 1`.
    pub fn stage_in_progress(&self) -> bool {
        self.next_txid > self.head_txid.saturating_add(1)
    }

    /// The txid being staged (`next_txid - 1`).
    pub fn staged_txid(&self) -> u64 {
        self.next_txid.saturating_sub(1)
    }

    pub fn encode(&self) -> Vec<u8> {
        // serde_bare serializes a plain struct of integers and a unit enum without failing.
        serde_bare::to_vec(self).expect("DBHead always encodes")
    }

    /// Whether this head ends the actor's v1 migration for good: migrated from v1, or native
    /// (a migration in progress does not).
    pub fn is_settled(&self) -> bool {
        match self.origin {
            Origin::Native | Origin::MigratedFromV1 => true,
            Origin::MigratingFromV1 => false,
        }
    }

    /// Decodes a head. A legacy head of the eleven fields before `origin` existed is a native
    /// head, as rivet's `decode_db_head` reads it.
    pub fn decode(bytes: &[u8]) -> Result<DBHead, CorruptHead> {
        match decode_exact::<DBHead>(bytes) {
            Ok(head) => Ok(head),
            Err(e) => match decode_exact::<LegacyHead>(bytes) {
                Ok(legacy) => Ok(legacy.into()),
                Err(_) => Err(e),
            },
        }
    }
}

/// Decodes `T` from all of `bytes` (trailing bytes are corruption).
fn decode_exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CorruptHead> {
    let mut reader = bytes;
    let value: T = serde_bare::from_reader(&mut reader).map_err(|e| CorruptHead(e.to_string()))?;
    if !reader.is_empty() {
        return Err(CorruptHead(format!("{} trailing bytes", reader.len())));
    }
    Ok(value)
}

/// Encoded length of a [`LegacyHead`]: eleven fixed-width fields.
pub const LEGACY_HEAD_LEN: usize = 72;

/// The head rivet wrote before the `origin` field existed: every such database is native.
#[derive(Deserialize)]
struct LegacyHead {
    schema_version: u32,
    generation: u64,
    head_txid: u64,
    next_txid: u64,
    materialized_txid: u64,
    db_size_pages: u32,
    page_size: u32,
    shard_size: u32,
    creation_ts_ms: i64,
    sqlite_storage_used: u64,
    sqlite_max_storage: u64,
}

impl From<LegacyHead> for DBHead {
    fn from(h: LegacyHead) -> DBHead {
        DBHead {
            schema_version: h.schema_version,
            generation: h.generation,
            head_txid: h.head_txid,
            next_txid: h.next_txid,
            materialized_txid: h.materialized_txid,
            db_size_pages: h.db_size_pages,
            page_size: h.page_size,
            shard_size: h.shard_size,
            creation_ts_ms: h.creation_ts_ms,
            sqlite_storage_used: h.sqlite_storage_used,
            sqlite_max_storage: h.sqlite_max_storage,
            origin: Origin::Native,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_head_without_origin_decodes_as_native() {
        let head = DBHead { db_size_pages: 5, head_txid: 3, next_txid: 4, ..DBHead::staging(2, 3, 77) };
        let full = head.encode();
        let legacy = &full[..full.len() - 1];
        assert_eq!(legacy.len(), LEGACY_HEAD_LEN);
        let decoded = DBHead::decode(legacy).expect("a legacy head decodes");
        assert_eq!(decoded, DBHead { origin: Origin::Native, ..head });
        assert!(DBHead::decode(&legacy[..LEGACY_HEAD_LEN - 1]).is_err(), "a short head is corrupt");
    }

    #[test]
    fn head_encodes_as_fixed_width_little_endian_with_varint_origin() {
        let head = DBHead {
            schema_version: 2,
            generation: 3,
            head_txid: 4,
            next_txid: 5,
            materialized_txid: 0,
            db_size_pages: 7,
            page_size: 4096,
            shard_size: 64,
            creation_ts_ms: -1,
            sqlite_storage_used: 9,
            sqlite_max_storage: MAX_STORAGE,
            origin: Origin::MigratedFromV1,
        };
        let mut expected = Vec::new();
        expected.extend(2u32.to_le_bytes());
        expected.extend(3u64.to_le_bytes());
        expected.extend(4u64.to_le_bytes());
        expected.extend(5u64.to_le_bytes());
        expected.extend(0u64.to_le_bytes());
        expected.extend(7u32.to_le_bytes());
        expected.extend(4096u32.to_le_bytes());
        expected.extend(64u32.to_le_bytes());
        expected.extend((-1i64).to_le_bytes());
        expected.extend(9u64.to_le_bytes());
        expected.extend(MAX_STORAGE.to_le_bytes());
        expected.push(1);
        assert_eq!(head.encode(), expected);
        assert_eq!(DBHead::decode(&expected).unwrap(), head);
    }

    #[test]
    fn truncated_or_padded_heads_are_corrupt() {
        let bytes = DBHead::staging(1, 1, 0).encode();
        // One byte short of a legacy head (one short of the full head is a legacy head).
        assert!(DBHead::decode(&bytes[..bytes.len() - 2]).is_err());
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(DBHead::decode(&padded).is_err());
        let mut bad_origin = bytes;
        *bad_origin.last_mut().unwrap() = 9;
        assert!(DBHead::decode(&bad_origin).is_err());
    }
}
