//! rivet's own layout (DESIGN.md section 7): the physical universaldb rows that rivet's engine
//! (rivet-dev/rivet at c1976e3) reads and writes for the logical v1 and v2 keys of section 2.
//! Pure functions only: keys, values and ranges in, keys, values and ranges out.
//!
//! ```text
//! v1  P  = tuple(0, 3, 72, Id)             = 14 15 03 15 48 40 ++ 19 id bytes
//!     K' = P ++ tuple((K,))                = P ++ 05 01 esc(K) 00 00
//!     K' ++ 15 04 ++ int(i)                -> DATA row i (10,000 bytes each, the last shorter)
//!     K' ++ 15 2C                          -> METADATA row, BARE KvMetadata
//! v2  S  = tuple(0, 3, "sqlite-storage")   = 14 15 03 02 "sqlite-storage" 00
//!     v2/{actor}/... -> S 02 {actor}/...   value: 00 ++ value (<= 100,000 bytes)
//!                                                 or 01 ++ u32 BE len ++ u32 BE count,
//!     S 03 02 {actor}/... ++ u32 BE i      -> chunk i of a chunked value (10,000 bytes each)
//! ```
//!
//! Invariants: every tuple is packed and unpacked by `foundationdb-tuple` (rivet's `Id` element
//! in `layout::tuple`); the logical-to-physical key maps preserve order, so a range of logical
//! keys is the range of their physical keys; a decoder never returns a partial value, it
//! returns a typed error.

use serde::{Deserialize, Serialize};

use foundationdb_tuple::{Bytes, pack, unpack};

use super::rivet_id::{ID_LEN, ID_STRING_LEN, RivetId, RivetIdError};
use crate::keys::{V1_PREFIX, V2_PREFIX};
use crate::store::KeyRange;

/// Tuple-layer key constants of universaldb (`utils/keys.rs`).
pub const RIVET: u64 = 0;
pub const PEGBOARD: u64 = 3;
pub const ACTOR_KV: u64 = 72;
pub const DATA: u64 = 4;
pub const METADATA: u64 = 44;
/// The element naming sqlite-storage's subspace under `(RIVET, PEGBOARD)`.
pub const SQLITE_STORAGE: &str = "sqlite-storage";

/// Bytes per v1 DATA row (10 KB, FoundationDB's blob advice; pegboard's `VALUE_CHUNK_SIZE`).
pub const V1_VALUE_CHUNK_SIZE: usize = 10_000;
/// The user-key byte of every SQLite v1 key (DESIGN.md section 2).
pub const V1_SQLITE_PREFIX: u8 = 0x08;

/// First byte of a v2 logical key inside `S` (sqlite-storage's `SQLITE_SUBSPACE_PREFIX`).
pub const V2_KEY_PREFIX: u8 = 0x02;
/// First byte of a v2 chunk row inside `S` (`CHUNK_KEY_PREFIX`).
pub const V2_CHUNK_PREFIX: u8 = 0x03;
/// Marker of a value stored whole at its key.
pub const V2_INLINE_MARKER: u8 = 0x00;
/// Marker of a value stored in chunk rows.
pub const V2_CHUNKED_MARKER: u8 = 0x01;
/// The largest logical value stored inline.
pub const V2_INLINE_LIMIT: usize = 100_000;
/// Bytes per v2 chunk row.
pub const V2_VALUE_CHUNK_SIZE: usize = 10_000;
/// Length of a chunked value's marker: `01` ++ u32 total length ++ u32 chunk count.
pub const V2_CHUNKED_MARKER_LEN: usize = 9;

/// One physical row.
pub type Row = (Vec<u8>, Vec<u8>);

/// Why a key or value is not in rivet's layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("key is not under the expected prefix: {0}")]
    NotUnderPrefix(String),
    #[error("key names an actor that is not a rivet id: {0}")]
    BadActor(RivetIdError),
    #[error("key does not unpack as a rivet tuple: {0}")]
    BadTuple(String),
    #[error("key under an actor's KV has sub key {0}, neither DATA nor METADATA")]
    UnexpectedSubKey(u64),
    #[error("v2 value has unknown marker {0:#04x}")]
    UnknownMarker(u8),
    #[error("chunked v2 marker is {got} bytes, expected {V2_CHUNKED_MARKER_LEN}")]
    BadChunkedMarker { got: usize },
    #[error("chunked v2 value has {got} of its {expected} chunk rows")]
    ChunkCount { expected: u32, got: usize },
    #[error("chunked v2 value's chunks hold {got} bytes, its marker says {expected}")]
    ChunkedLength { expected: u32, got: usize },
    #[error("value of {0} bytes is too large for a chunked v2 marker")]
    ValueTooLarge(usize),
}

/// Why the rows of one v1 user key do not make a value rivet can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum V1EntryError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("no rows")]
    NoRows,
    #[error("rows of more than one user key")]
    MixedKeys,
    #[error("DATA rows without a METADATA row")]
    DataWithoutMetadata { user_key: Vec<u8> },
    #[error("a METADATA row without DATA rows")]
    MetadataWithoutData { user_key: Vec<u8> },
    #[error("DATA row {index} is missing")]
    MissingData { user_key: Vec<u8>, index: u64 },
    #[error("a row appears twice")]
    DuplicateRow { user_key: Vec<u8> },
    #[error("the DATA rows hold no bytes")]
    EmptyValue { user_key: Vec<u8> },
    #[error("METADATA does not decode: {detail}")]
    BadMetadata { user_key: Vec<u8>, detail: String },
}

// ---------------------------------------------------------------------------------------------
// v1: pegboard's actor KV
// ---------------------------------------------------------------------------------------------

/// pegboard's `KvMetadata` (envoy protocol): BARE `data` `version` (uvarint length ++ bytes,
/// the wire form of a string) ++ i64 LE `update_ts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvMetadata {
    pub version: Vec<u8>,
    pub update_ts: i64,
}

impl KvMetadata {
    pub fn encode(&self) -> Vec<u8> {
        // serde_bare writes a byte vector and an integer without failing.
        serde_bare::to_vec(self).expect("KvMetadata always encodes")
    }

    /// As rivet decodes it (`serde_bare::from_slice`: bytes after the struct are ignored).
    pub fn decode(bytes: &[u8]) -> Result<KvMetadata, serde_bare::error::Error> {
        serde_bare::from_slice(bytes)
    }
}

/// `14 15 03 15 48`: the root under which every actor's KV lives, `tuple(0, 3, 72)`.
pub fn v1_root() -> Vec<u8> {
    pack(&(RIVET, PEGBOARD, ACTOR_KV))
}

/// `P`: everything in one actor's KV.
pub fn v1_actor_prefix(id: &RivetId) -> Vec<u8> {
    pack(&(RIVET, PEGBOARD, ACTOR_KV, *id))
}

/// `P ++ FF`: the first key after the actor's KV, where an enumeration jumps next.
pub fn v1_actor_skip_key(id: &RivetId) -> Vec<u8> {
    let mut k = v1_actor_prefix(id);
    k.push(0xff);
    k
}

/// `[P 05 01 08, P 05 01 09)`: the actor's SQLite keys; a row in it means "has v1 SQLite data".
pub fn v1_sqlite_range(id: &RivetId) -> KeyRange {
    v1_user_key_prefix_range(id, &[V1_SQLITE_PREFIX])
}

/// Every row of every user key that starts with `prefix`: `K'` of `prefix` without its two
/// closing `00` bytes, as a prefix. (The escaping is a prefix code, so an escaped key starts
/// with the escaped `prefix` exactly when the key starts with `prefix`.)
pub fn v1_user_key_prefix_range(id: &RivetId, prefix: &[u8]) -> KeyRange {
    let mut start = v1_entry_prefix(id, prefix);
    // v1_entry_prefix always ends with the byte string's 00 and the nested tuple's 00.
    start.truncate(start.len() - 2);
    KeyRange::prefix(&start)
}

/// The actor whose KV holds `key` (a key found while skip-scanning [`v1_root`]).
pub fn v1_actor_of_key(key: &[u8]) -> Result<RivetId, LayoutError> {
    let root = v1_root();
    let rest = key.strip_prefix(root.as_slice()).ok_or_else(|| LayoutError::NotUnderPrefix("v1 root".into()))?;
    let element = rest.get(..1 + ID_LEN).ok_or_else(|| LayoutError::BadTuple("key ends inside the actor id".into()))?;
    unpack::<RivetId>(element).map_err(|e| LayoutError::BadTuple(e.to_string()))
}

/// The logical key `v1/{actor}/{user_key}` (section 2) of a user key of actor `id`.
pub fn v1_logical_key(id: &RivetId, user_key: &[u8]) -> Vec<u8> {
    let mut k = V1_PREFIX.to_vec();
    k.extend_from_slice(id.to_string().as_bytes());
    k.push(b'/');
    k.extend_from_slice(user_key);
    k
}

/// The actor and user key of a logical key `v1/{actor}/{user_key}`; the actor must be a rivet
/// id string.
pub fn v1_split_logical(logical: &[u8]) -> Result<(RivetId, Vec<u8>), LayoutError> {
    let rest = logical.strip_prefix(V1_PREFIX).ok_or_else(|| LayoutError::NotUnderPrefix("v1/".into()))?;
    let (actor, user_key) = match rest.get(ID_STRING_LEN) {
        Some(b'/') => (&rest[..ID_STRING_LEN], &rest[ID_STRING_LEN + 1..]),
        _ => return Err(LayoutError::NotUnderPrefix("v1/{rivet id}/".into())),
    };
    let actor = std::str::from_utf8(actor).map_err(|_| LayoutError::NotUnderPrefix("v1/{rivet id}/".into()))?;
    let id = RivetId::parse(actor).map_err(LayoutError::BadActor)?;
    Ok((id, user_key.to_vec()))
}

/// `K'`: the prefix of every row of user key `user_key`. It is prefix-free (its byte string
/// ends in `00 00`, while a `00` inside it is written `00 FF`), so it holds no other key's rows.
pub fn v1_entry_prefix(id: &RivetId, user_key: &[u8]) -> Vec<u8> {
    pack(&(RIVET, PEGBOARD, ACTOR_KV, *id, (Bytes::from(user_key),)))
}

/// Every row of one user key.
pub fn v1_entry_range(id: &RivetId, user_key: &[u8]) -> KeyRange {
    KeyRange::prefix(&v1_entry_prefix(id, user_key))
}

/// `K' ++ 15 04 ++ int(index)`.
pub fn v1_data_key(id: &RivetId, user_key: &[u8], index: u64) -> Vec<u8> {
    pack(&(RIVET, PEGBOARD, ACTOR_KV, *id, (Bytes::from(user_key),), DATA, index))
}

/// `K' ++ 15 2C`.
pub fn v1_metadata_key(id: &RivetId, user_key: &[u8]) -> Vec<u8> {
    pack(&(RIVET, PEGBOARD, ACTOR_KV, *id, (Bytes::from(user_key),), METADATA))
}

/// The rows pegboard's `put` writes for one user key: DATA rows of [`V1_VALUE_CHUNK_SIZE`]
/// bytes in order (none for an empty value, as rivet writes it), then the METADATA row.
pub fn v1_encode_entry(id: &RivetId, user_key: &[u8], value: &[u8], metadata: &KvMetadata) -> Vec<Row> {
    let mut rows: Vec<Row> = value
        .chunks(V1_VALUE_CHUNK_SIZE)
        .enumerate()
        .map(|(i, chunk)| (v1_data_key(id, user_key, i as u64), chunk.to_vec()))
        .collect();
    rows.push((v1_metadata_key(id, user_key), metadata.encode()));
    rows
}

/// What one row of an actor's KV is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum V1RowKind {
    Data { index: u64 },
    Metadata,
}

/// The user key and kind of one row under `P` of actor `id`.
pub fn v1_parse_row(id: &RivetId, key: &[u8]) -> Result<(Vec<u8>, V1RowKind), LayoutError> {
    if !key.starts_with(&v1_actor_prefix(id)) {
        return Err(LayoutError::NotUnderPrefix("the actor's KV".into()));
    }
    type DataKey<'a> = (u64, u64, u64, RivetId, (Bytes<'a>,), u64, u64);
    type MetadataKey<'a> = (u64, u64, u64, RivetId, (Bytes<'a>,), u64);
    if let Ok((_, _, _, _, (user_key,), sub, index)) = unpack::<DataKey>(key) {
        if sub != DATA {
            return Err(LayoutError::UnexpectedSubKey(sub));
        }
        return Ok((user_key.into_owned(), V1RowKind::Data { index }));
    }
    let (_, _, _, _, (user_key,), sub) =
        unpack::<MetadataKey>(key).map_err(|e| LayoutError::BadTuple(e.to_string()))?;
    if sub != METADATA {
        return Err(LayoutError::UnexpectedSubKey(sub));
    }
    Ok((user_key.into_owned(), V1RowKind::Metadata))
}

/// One user key's logical value, as rivet's `get` assembles it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V1Entry {
    pub user_key: Vec<u8>,
    pub value: Vec<u8>,
    pub metadata: KvMetadata,
}

/// The logical value of one user key from all of its rows (in any order). Rows rivet's read
/// would fail on, or that miss a DATA row in the middle, are an error, never a partial value.
pub fn v1_decode_entry(id: &RivetId, rows: &[Row]) -> Result<V1Entry, V1EntryError> {
    let mut user_key: Option<Vec<u8>> = None;
    let mut data: Vec<(u64, &[u8])> = Vec::new();
    let mut metadata: Option<&[u8]> = None;
    for (key, value) in rows {
        let (k, kind) = v1_parse_row(id, key)?;
        match &user_key {
            Some(first) if *first != k => return Err(V1EntryError::MixedKeys),
            Some(_) => {}
            None => user_key = Some(k),
        }
        match kind {
            V1RowKind::Data { index } => data.push((index, value)),
            V1RowKind::Metadata if metadata.is_some() => {
                return Err(V1EntryError::DuplicateRow { user_key: user_key.unwrap_or_default() });
            }
            V1RowKind::Metadata => metadata = Some(value),
        }
    }
    let user_key = user_key.ok_or(V1EntryError::NoRows)?;
    let Some(metadata) = metadata else {
        return Err(V1EntryError::DataWithoutMetadata { user_key });
    };
    if data.is_empty() {
        return Err(V1EntryError::MetadataWithoutData { user_key });
    }
    data.sort_by_key(|&(index, _)| index);
    let mut value = Vec::with_capacity(data.iter().map(|(_, v)| v.len()).sum());
    for (expected, &(index, bytes)) in (0u64..).zip(&data) {
        if index < expected {
            return Err(V1EntryError::DuplicateRow { user_key });
        }
        if index > expected {
            return Err(V1EntryError::MissingData { user_key, index: expected });
        }
        value.extend_from_slice(bytes);
    }
    if value.is_empty() {
        return Err(V1EntryError::EmptyValue { user_key });
    }
    let metadata = match KvMetadata::decode(metadata) {
        Ok(m) => m,
        Err(e) => return Err(V1EntryError::BadMetadata { user_key, detail: e.to_string() }),
    };
    Ok(V1Entry { user_key, value, metadata })
}

// ---------------------------------------------------------------------------------------------
// v2: sqlite-storage
// ---------------------------------------------------------------------------------------------

/// `S`: sqlite-storage's subspace, `tuple(0, 3, "sqlite-storage")`.
pub fn v2_subspace() -> Vec<u8> {
    pack(&(RIVET, PEGBOARD, SQLITE_STORAGE))
}

/// The physical key of a logical v2 key: `v2/{actor}/...` becomes `S 02 {actor}/...`. The map
/// replaces one prefix by another, so it keeps order and prefixes (a range maps end by end).
pub fn v2_key(logical: &[u8]) -> Result<Vec<u8>, LayoutError> {
    let rest = logical.strip_prefix(V2_PREFIX).ok_or_else(|| LayoutError::NotUnderPrefix("v2/".into()))?;
    let mut k = v2_subspace();
    k.push(V2_KEY_PREFIX);
    k.extend_from_slice(rest);
    Ok(k)
}

/// The logical v2 key of a physical `S 02 ...` key (not of a chunk row).
pub fn v2_logical_key(physical: &[u8]) -> Result<Vec<u8>, LayoutError> {
    let rest = physical
        .strip_prefix(v2_subspace().as_slice())
        .and_then(|r| r.strip_prefix(&[V2_KEY_PREFIX]))
        .ok_or_else(|| LayoutError::NotUnderPrefix("S 02".into()))?;
    let mut k = V2_PREFIX.to_vec();
    k.extend_from_slice(rest);
    Ok(k)
}

/// Both ends of a logical v2 range, mapped.
pub fn v2_range(logical: &KeyRange) -> Result<KeyRange, LayoutError> {
    Ok(KeyRange::new(v2_key(&logical.start)?, v2_key(&logical.end)?))
}

/// `S 03 02 {actor}/... ++ u32 BE index`: chunk `index` of the value at a logical v2 key.
pub fn v2_chunk_key(logical: &[u8], index: u32) -> Result<Vec<u8>, LayoutError> {
    let mut k = v2_chunk_prefix(logical)?;
    k.extend_from_slice(&index.to_be_bytes());
    Ok(k)
}

fn v2_chunk_prefix(logical: &[u8]) -> Result<Vec<u8>, LayoutError> {
    let physical = v2_key(logical)?;
    let subspace_len = v2_subspace().len();
    let mut k = physical[..subspace_len].to_vec();
    k.push(V2_CHUNK_PREFIX);
    k.extend_from_slice(&physical[subspace_len..]);
    Ok(k)
}

/// What is stored at a v2 key: the value itself, or where its chunks are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum V2Stored {
    Inline(Vec<u8>),
    Chunked { total_len: u32, chunk_count: u32 },
}

impl V2Stored {
    /// Decodes the physical value at a v2 key. An empty physical value is an empty logical
    /// value, as sqlite-storage's `decode_value` reads it.
    pub fn decode(stored: &[u8]) -> Result<V2Stored, LayoutError> {
        match stored.split_first() {
            None => Ok(V2Stored::Inline(Vec::new())),
            Some((&V2_INLINE_MARKER, value)) => Ok(V2Stored::Inline(value.to_vec())),
            Some((&V2_CHUNKED_MARKER, header)) => {
                if stored.len() != V2_CHUNKED_MARKER_LEN {
                    return Err(LayoutError::BadChunkedMarker { got: stored.len() });
                }
                let total_len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
                let chunk_count = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
                Ok(V2Stored::Chunked { total_len, chunk_count })
            }
            Some((&other, _)) => Err(LayoutError::UnknownMarker(other)),
        }
    }

    /// The keys of the chunk rows a chunked value needs (none for an inline one).
    pub fn chunk_keys(&self, logical: &[u8]) -> Result<Vec<Vec<u8>>, LayoutError> {
        match self {
            V2Stored::Inline(_) => Ok(Vec::new()),
            V2Stored::Chunked { chunk_count, .. } => (0..*chunk_count).map(|i| v2_chunk_key(logical, i)).collect(),
        }
    }

    /// The logical value, given the chunk rows' values in index order (ignored when inline).
    pub fn assemble(self, chunks: &[Vec<u8>]) -> Result<Vec<u8>, LayoutError> {
        match self {
            V2Stored::Inline(value) => Ok(value),
            V2Stored::Chunked { total_len, chunk_count } => {
                if chunks.len() != chunk_count as usize {
                    return Err(LayoutError::ChunkCount { expected: chunk_count, got: chunks.len() });
                }
                let got: usize = chunks.iter().map(Vec::len).sum();
                if got != total_len as usize {
                    return Err(LayoutError::ChunkedLength { expected: total_len, got });
                }
                Ok(chunks.concat())
            }
        }
    }
}

/// The physical rows of one logical v2 value, as sqlite-storage's `tx_write_value` writes them:
/// the marker row first, then the chunk rows in index order.
pub fn v2_encode_value(logical: &[u8], value: &[u8]) -> Result<Vec<Row>, LayoutError> {
    let key = v2_key(logical)?;
    if value.len() <= V2_INLINE_LIMIT {
        let mut stored = Vec::with_capacity(1 + value.len());
        stored.push(V2_INLINE_MARKER);
        stored.extend_from_slice(value);
        return Ok(vec![(key, stored)]);
    }
    let total_len = u32::try_from(value.len()).map_err(|_| LayoutError::ValueTooLarge(value.len()))?;
    // total_len fits in u32, so its chunk count does too.
    let chunk_count = total_len.div_ceil(V2_VALUE_CHUNK_SIZE as u32);
    let mut marker = Vec::with_capacity(V2_CHUNKED_MARKER_LEN);
    marker.push(V2_CHUNKED_MARKER);
    marker.extend_from_slice(&total_len.to_be_bytes());
    marker.extend_from_slice(&chunk_count.to_be_bytes());
    let mut rows = vec![(key, marker)];
    for (i, chunk) in (0u32..).zip(value.chunks(V2_VALUE_CHUNK_SIZE)) {
        rows.push((v2_chunk_key(logical, i)?, chunk.to_vec()));
    }
    Ok(rows)
}

/// The ranges that clear all of an actor's v2 state: its keys `S 02 {actor}/...` and every
/// chunk row `S 03 02 {actor}/...` (rivet's own delete clears `[k, k ++ 00)`, which leaves
/// chunk rows behind, so ferry clears them by prefix).
pub fn v2_clear_ranges(actor: &RivetId) -> [KeyRange; 2] {
    let mut logical = V2_PREFIX.to_vec();
    logical.extend_from_slice(actor.to_string().as_bytes());
    logical.push(b'/');
    // `logical` starts with V2_PREFIX by construction.
    let keys = v2_key(&logical).expect("starts with v2/");
    let chunks = v2_chunk_prefix(&logical).expect("starts with v2/");
    [KeyRange::prefix(&keys), KeyRange::prefix(&chunks)]
}
