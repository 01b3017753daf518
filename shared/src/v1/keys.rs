//! The v1 layout of an actor's SQLite files inside its KV (DESIGN.md section 2). ferry only
//! reads these keys; nothing in ferry builds a mutation from them.
//!
//! ```text
//! v1/{actor}/08 01 00 TAG              -> meta: u16 LE version (1) ++ u64 LE file size
//! v1/{actor}/08 01 01 TAG ++ u32 BE i  -> chunk i: at most CHUNK_SIZE bytes at offset i * CHUNK_SIZE
//! ```

use crate::actor::ActorId;
use crate::keys::V1_PREFIX;
use crate::store::KeyRange;

/// Bytes per v1 chunk.
pub const CHUNK_SIZE: usize = 4096;
/// The user-key byte that starts every SQLite key in an actor's KV.
pub const SQLITE_PREFIX: u8 = 0x08;
/// The only meta version v1 wrote.
pub const META_VERSION: u16 = 1;
/// Length of a meta value: u16 version ++ u64 size.
pub const META_LEN: usize = 10;

const META: u8 = 0x00;
const CHUNK: u8 = 0x01;
const SCHEMA: u8 = 0x01;

/// One of the four files a v1 SQLite database can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileTag {
    Main = 0,
    Journal = 1,
    Wal = 2,
    Shm = 3,
}

impl FileTag {
    pub const ALL: [FileTag; 4] = [FileTag::Main, FileTag::Journal, FileTag::Wal, FileTag::Shm];

    pub fn from_byte(b: u8) -> Option<FileTag> {
        FileTag::ALL.get(usize::from(b)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            FileTag::Main => "main",
            FileTag::Journal => "journal",
            FileTag::Wal => "wal",
            FileTag::Shm => "shm",
        }
    }
}

/// `v1/{actor}/`: everything in the actor's KV.
pub fn actor_prefix(actor: &ActorId) -> Vec<u8> {
    let mut k = V1_PREFIX.to_vec();
    k.extend_from_slice(actor.as_bytes());
    k.push(b'/');
    k
}

/// `v1/{actor}/08`: the actor's SQLite keys, the range v1 change detection digests.
pub fn sqlite_range(actor: &ActorId) -> KeyRange {
    let mut p = actor_prefix(actor);
    p.push(SQLITE_PREFIX);
    KeyRange::prefix(&p)
}

/// All meta keys of the actor (at most one per tag).
pub fn meta_range(actor: &ActorId) -> KeyRange {
    let mut p = actor_prefix(actor);
    p.extend_from_slice(&[SQLITE_PREFIX, SCHEMA, META]);
    KeyRange::prefix(&p)
}

pub fn meta_key(actor: &ActorId, tag: FileTag) -> Vec<u8> {
    let mut k = actor_prefix(actor);
    k.extend_from_slice(&[SQLITE_PREFIX, SCHEMA, META, tag as u8]);
    k
}

/// All chunk keys of one file.
pub fn chunk_range(actor: &ActorId, tag: FileTag) -> KeyRange {
    let mut p = actor_prefix(actor);
    p.extend_from_slice(&[SQLITE_PREFIX, SCHEMA, CHUNK, tag as u8]);
    KeyRange::prefix(&p)
}

pub fn chunk_key(actor: &ActorId, tag: FileTag, index: u32) -> Vec<u8> {
    let mut k = actor_prefix(actor);
    k.extend_from_slice(&[SQLITE_PREFIX, SCHEMA, CHUNK, tag as u8]);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// What a key under `v1/{actor}/08` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqliteKey {
    Meta(FileTag),
    Chunk(FileTag, u32),
    /// A chunk key of a known file whose index is not 4 bytes.
    MalformedChunk(FileTag),
    /// Under 0x08 but not a layout ferry knows; left alone, though v1 change detection covers it.
    Unknown,
}

/// Classifies the user key (the part after `v1/{actor}/`).
pub fn classify(user_key: &[u8]) -> SqliteKey {
    match user_key {
        [SQLITE_PREFIX, SCHEMA, META, tag] => FileTag::from_byte(*tag).map_or(SqliteKey::Unknown, SqliteKey::Meta),
        [SQLITE_PREFIX, SCHEMA, CHUNK, tag, rest @ ..] => match (FileTag::from_byte(*tag), <[u8; 4]>::try_from(rest)) {
            (Some(t), Ok(idx)) => SqliteKey::Chunk(t, u32::from_be_bytes(idx)),
            (Some(t), Err(_)) => SqliteKey::MalformedChunk(t),
            (None, _) => SqliteKey::Unknown,
        },
        _ => SqliteKey::Unknown,
    }
}

/// Encodes a meta value (used by the importer and the generator, which write v1 test data).
pub fn encode_meta(size: u64) -> [u8; META_LEN] {
    let mut m = [0u8; META_LEN];
    m[..2].copy_from_slice(&META_VERSION.to_le_bytes());
    m[2..].copy_from_slice(&size.to_le_bytes());
    m
}

/// Decodes a meta value: `Err` carries what is wrong with it.
pub fn decode_meta(value: &[u8]) -> Result<u64, String> {
    let Ok(m) = <[u8; META_LEN]>::try_from(value) else {
        return Err(format!("meta is {} bytes, expected {META_LEN}", value.len()));
    };
    let version = u16::from_le_bytes([m[0], m[1]]);
    if version != META_VERSION {
        return Err(format!("meta version {version}, expected {META_VERSION}"));
    }
    // The slice is exactly 8 bytes by the length check above.
    Ok(u64::from_le_bytes(m[2..].try_into().expect("8 bytes")))
}

/// The keys and values that lay `bytes` out as file `tag` of `actor` (the inverse of the
/// reader; for the importer, the generator and tests).
pub fn file_entries(actor: &ActorId, tag: FileTag, bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::with_capacity(1 + bytes.len().div_ceil(CHUNK_SIZE));
    out.push((meta_key(actor, tag), encode_meta(bytes.len() as u64).to_vec()));
    for (i, chunk) in bytes.chunks(CHUNK_SIZE).enumerate() {
        // A file of u32::MAX chunks is 16 TiB; nothing ferry lays out comes near.
        let index = u32::try_from(i).expect("chunk index fits u32");
        out.push((chunk_key(actor, tag, index), chunk.to_vec()));
    }
    out
}
