//! Fuzz entry points: one function per cargo-fuzz target of `fuzz/` ([`v1_rebuild`],
//! [`ltx_decode`], [`head_decode`], [`job_message`]), and the v1 target's input format
//! ([`V1Input`]), whose encoder builds the seed corpus.
//!
//! Invariant: every entry function takes any bytes and returns; a panic is a bug found, in
//! the code it drives or against the invariant it asserts. Each asserts what its decoder
//! promises (round trips, orderings, sizes, one typed rejection per bad input), not merely
//! "no crash"; the v1 target compares the reader with an independent model of DESIGN.md
//! section 2 and section 3 step 4. libFuzzer runs them on nightly (`fuzz/run.sh`);
//! `shared/tests/fuzz_regressions.rs` replays the committed corpus and regressions through the
//! same functions on stable. See `docs/FUZZING.md`.
//!
//! Behind the `test-support` feature, which `fuzz/` and this crate's integration tests turn on:
//! the binaries do not carry the targets.

use std::collections::BTreeMap;

use crate::actor::ActorId;
use crate::jobs::message::{BadMessage, JOB_VERSION, Job, MAX_MESSAGE_BYTES, valid_campaign};
use crate::reason::DeadLetterReason;
use crate::recovery::Recovery;
use crate::store::RangeDigest;
use crate::v1::check::{self, MIN_HEADER_LEN, SQLITE_MAGIC};
use crate::v1::keys::{self, CHUNK_SIZE, FileTag, META_LEN, META_VERSION, SQLITE_PREFIX, SqliteKey};
use crate::v1::read::{self, ReadError, ReadOptions, V1Files};
use crate::v1::reject::V1Rejection;
use crate::v2::head::{DBHead, LEGACY_HEAD_LEN, Origin, PAGE_SIZE};
use crate::v2::ltx;

/// The actor every v1 input is laid out under.
pub const FUZZ_ACTOR: &str = "fuzz-actor";
/// The largest size limit a v1 input can ask for. The reader allocates a file's buffer only
/// after its meta passed the limit, so no input costs more than twice this (main and
/// sidecar), whatever size its metas claim.
pub const FUZZ_MAX_SIZE: u64 = 1 << 20;
/// Rebuilt main files of at most this many pages also go through `quick_check`.
pub const QUICK_CHECK_MAX_PAGES: u32 = 64;

// ---------------------------------------------------------------------------------------------
// v1: rebuild and header checks
// ---------------------------------------------------------------------------------------------

/// One step of building an actor's v1 rows; later records overwrite earlier rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum V1Record {
    /// The meta and chunks of a whole file, as `keys::file_entries` lays it out.
    File(FileTag, Vec<u8>),
    /// A meta row holding `encode_meta(size)`.
    Meta(FileTag, u64),
    /// A meta row holding any bytes (any length, any version).
    RawMeta(FileTag, Vec<u8>),
    /// A chunk row: any index, any length.
    Chunk(FileTag, u32, Vec<u8>),
    /// Removes a chunk row.
    DropChunk(FileTag, u32),
    /// Removes the meta row.
    DropMeta(FileTag),
    /// A chunk row whose index is not 4 bytes (the index bytes, the value).
    MalformedChunk(FileTag, Vec<u8>, Vec<u8>),
    /// A row at `v1/{actor}/08 ++ suffix` (the suffix, the value): mostly outside the layout.
    Unknown(Vec<u8>, Vec<u8>),
}

/// A v1 fuzz input: read options and the records that make the actor's rows.
///
/// ```text
/// byte 0      options: bits 0-2 recovery (0 none, 1 rollback_journal, 2 checkpoint_wal,
///             3 discard_shm, 4 force, 5-7 none), bit 3 ignore_sidecars
/// bytes 1-4   max_size, u32 LE, capped at FUZZ_MAX_SIZE
/// records     op byte: bits 0-1 the file tag, bits 2-4 the kind, then
///   0 File            u24 LE length, bytes
///   1 Meta            u64 LE size
///   2 RawMeta         u8 length, bytes
///   3 Chunk           u32 BE index, u16 LE length, bytes
///   4 DropChunk       u32 BE index
///   5 DropMeta        -
///   6 MalformedChunk  u8 n (index length: n % 8, plus one from 4 up), index bytes,
///                     u16 LE length, bytes
///   7 Unknown         u8 length, suffix bytes, u16 LE length, bytes
/// ```
///
/// Parsing is total: a field cut short by the end of the input reads as what is there
/// (lengths clamp, integers take zero bytes), so every byte string is an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V1Input {
    pub recovery: Option<Recovery>,
    pub ignore_sidecars: bool,
    pub max_size: u64,
    pub records: Vec<V1Record>,
}

const IGNORE_SIDECARS: u8 = 1 << 3;
const RECOVERY_BITS: u8 = 0b111;

struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn le(&mut self, n: usize) -> u64 {
        self.take(n).iter().rev().fold(0, |acc, &b| (acc << 8) | u64::from(b))
    }

    fn be_u32(&mut self) -> u32 {
        let b = self.take(4);
        let mut a = [0u8; 4];
        a[..b.len()].copy_from_slice(b);
        u32::from_be_bytes(a)
    }

    fn bytes_u16(&mut self) -> Vec<u8> {
        let n = self.le(2) as usize;
        self.take(n).to_vec()
    }
}

fn tag_of(op: u8) -> FileTag {
    // Two bits index the four tags.
    FileTag::ALL[usize::from(op & 0b11)]
}

/// The index lengths a malformed chunk key can have: anything but 4.
fn malformed_index_len(n: u8) -> usize {
    let n = usize::from(n % 8);
    if n >= 4 { n + 1 } else { n }
}

impl V1Input {
    pub fn parse(data: &[u8]) -> V1Input {
        let mut c = Cursor { data };
        let options = c.u8();
        let recovery = match options & RECOVERY_BITS {
            1 => Some(Recovery::RollbackJournal),
            2 => Some(Recovery::CheckpointWal),
            3 => Some(Recovery::DiscardShm),
            4 => Some(Recovery::Force),
            _ => None,
        };
        let max_size = c.le(4).min(FUZZ_MAX_SIZE);
        let mut records = Vec::new();
        while !c.data.is_empty() {
            let op = c.u8();
            let tag = tag_of(op);
            records.push(match (op >> 2) & 0b111 {
                0 => {
                    let n = c.le(3) as usize;
                    V1Record::File(tag, c.take(n).to_vec())
                }
                1 => V1Record::Meta(tag, c.le(8)),
                2 => {
                    let n = usize::from(c.u8());
                    V1Record::RawMeta(tag, c.take(n).to_vec())
                }
                3 => {
                    let index = c.be_u32();
                    V1Record::Chunk(tag, index, c.bytes_u16())
                }
                4 => V1Record::DropChunk(tag, c.be_u32()),
                5 => V1Record::DropMeta(tag),
                6 => {
                    let n = malformed_index_len(c.u8());
                    let index = c.take(n).to_vec();
                    V1Record::MalformedChunk(tag, index, c.bytes_u16())
                }
                _ => {
                    let n = usize::from(c.u8());
                    let suffix = c.take(n).to_vec();
                    V1Record::Unknown(suffix, c.bytes_u16())
                }
            });
        }
        V1Input { recovery, ignore_sidecars: options & IGNORE_SIDECARS != 0, max_size, records }
    }

    /// The bytes [`V1Input::parse`] reads back as `self` (for the seed corpus). Panics on a
    /// field too long for its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let recovery = match self.recovery {
            None => 0,
            Some(Recovery::RollbackJournal) => 1,
            Some(Recovery::CheckpointWal) => 2,
            Some(Recovery::DiscardShm) => 3,
            Some(Recovery::Force) => 4,
        };
        let mut out = vec![recovery | if self.ignore_sidecars { IGNORE_SIDECARS } else { 0 }];
        let max = u32::try_from(self.max_size.min(FUZZ_MAX_SIZE)).expect("FUZZ_MAX_SIZE fits u32");
        out.extend_from_slice(&max.to_le_bytes());
        fn len_le(out: &mut Vec<u8>, len: usize, width: usize) {
            assert!(width == 8 || len < 1 << (8 * width), "field of {len} bytes over its {width}-byte length");
            out.extend_from_slice(&(len as u64).to_le_bytes()[..width]);
        }
        for r in &self.records {
            let op = |kind: u8, tag: FileTag| (kind << 2) | tag as u8;
            match r {
                V1Record::File(tag, bytes) => {
                    out.push(op(0, *tag));
                    len_le(&mut out, bytes.len(), 3);
                    out.extend_from_slice(bytes);
                }
                V1Record::Meta(tag, size) => {
                    out.push(op(1, *tag));
                    out.extend_from_slice(&size.to_le_bytes());
                }
                V1Record::RawMeta(tag, bytes) => {
                    out.push(op(2, *tag));
                    len_le(&mut out, bytes.len(), 1);
                    out.extend_from_slice(bytes);
                }
                V1Record::Chunk(tag, index, bytes) => {
                    out.push(op(3, *tag));
                    out.extend_from_slice(&index.to_be_bytes());
                    len_le(&mut out, bytes.len(), 2);
                    out.extend_from_slice(bytes);
                }
                V1Record::DropChunk(tag, index) => {
                    out.push(op(4, *tag));
                    out.extend_from_slice(&index.to_be_bytes());
                }
                V1Record::DropMeta(tag) => out.push(op(5, *tag)),
                V1Record::MalformedChunk(tag, index, bytes) => {
                    out.push(op(6, *tag));
                    let n = index.len();
                    assert!(n != 4 && n <= 8, "a malformed index is 0 to 8 bytes but 4, not {n}");
                    // The inverse of `malformed_index_len`.
                    out.push(if n > 4 { n - 1 } else { n } as u8);
                    out.extend_from_slice(index);
                    len_le(&mut out, bytes.len(), 2);
                    out.extend_from_slice(bytes);
                }
                V1Record::Unknown(suffix, bytes) => {
                    out.push(op(7, FileTag::Main));
                    len_le(&mut out, suffix.len(), 1);
                    out.extend_from_slice(suffix);
                    len_le(&mut out, bytes.len(), 2);
                    out.extend_from_slice(bytes);
                }
            }
        }
        out
    }

    /// The actor's rows under `v1/{actor}/08`, in key order, as a store scan returns them.
    pub fn rows(&self, actor: &ActorId) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut rows = BTreeMap::new();
        for r in &self.records {
            match r {
                V1Record::File(tag, bytes) => rows.extend(keys::file_entries(actor, *tag, bytes)),
                V1Record::Meta(tag, size) => {
                    rows.insert(keys::meta_key(actor, *tag), keys::encode_meta(*size).to_vec());
                }
                V1Record::RawMeta(tag, bytes) => {
                    rows.insert(keys::meta_key(actor, *tag), bytes.clone());
                }
                V1Record::Chunk(tag, index, bytes) => {
                    rows.insert(keys::chunk_key(actor, *tag, *index), bytes.clone());
                }
                V1Record::DropChunk(tag, index) => {
                    rows.remove(&keys::chunk_key(actor, *tag, *index));
                }
                V1Record::DropMeta(tag) => {
                    rows.remove(&keys::meta_key(actor, *tag));
                }
                V1Record::MalformedChunk(tag, index, bytes) => {
                    // A chunk key is the chunk prefix of its file followed by a u32 BE index.
                    let mut key = keys::chunk_key(actor, *tag, 0);
                    key.truncate(key.len() - std::mem::size_of::<u32>());
                    key.extend_from_slice(index);
                    rows.insert(key, bytes.clone());
                }
                V1Record::Unknown(suffix, bytes) => {
                    let mut key = keys::actor_prefix(actor);
                    key.push(SQLITE_PREFIX);
                    key.extend_from_slice(suffix);
                    rows.insert(key, bytes.clone());
                }
            }
        }
        rows
    }

    pub fn options(&self) -> ReadOptions {
        ReadOptions { max_size: self.max_size, recovery: self.recovery, ignore_sidecars: self.ignore_sidecars }
    }
}

/// One file's rows, as the model sees them.
#[derive(Default)]
struct ModelFile {
    meta: Option<Vec<u8>>,
    chunks: BTreeMap<u32, Vec<u8>>,
    malformed: bool,
}

impl ModelFile {
    fn present(&self) -> bool {
        self.meta.is_some() || !self.chunks.is_empty() || self.malformed
    }

    /// The meta's size: 10 bytes, u16 LE version 1, u64 LE size.
    fn meta_size(&self) -> Option<u64> {
        let m = self.meta.as_deref().filter(|m| m.len() == META_LEN)?;
        (u16::from_le_bytes([m[0], m[1]]) == META_VERSION).then(|| {
            let mut size = [0u8; 8];
            size.copy_from_slice(&m[2..]);
            u64::from_le_bytes(size)
        })
    }

    /// DESIGN.md section 2: `ceil(size / 4096)` chunks with indexes `0..n`, none longer than
    /// 4096 bytes and none reaching past `size`; uncovered bytes stay zero.
    fn assemble(&self, size: u64) -> Result<Vec<u8>, DeadLetterReason> {
        let n = size.div_ceil(CHUNK_SIZE as u64);
        let indexes_ok = self.chunks.keys().copied().map(u64::from).eq(0..n);
        if self.malformed || !indexes_ok {
            return Err(DeadLetterReason::ChunkMismatch);
        }
        let mut buf = vec![0u8; size as usize];
        for (&i, c) in &self.chunks {
            let start = i as usize * CHUNK_SIZE;
            if c.len() > CHUNK_SIZE || start + c.len() > buf.len() {
                return Err(DeadLetterReason::ChunkMismatch);
            }
            buf[start..start + c.len()].copy_from_slice(c);
        }
        Ok(buf)
    }
}

type ModelImage = (Vec<u8>, Option<(FileTag, Vec<u8>)>, V1Files);

/// What DESIGN.md says reading these rows gives: the files, or the first rejection in the
/// order section 3 step 4 lists them (sidecars, main meta and size, the sidecar a recovery
/// reads, then chunks).
fn model(
    actor: &ActorId,
    rows: &BTreeMap<Vec<u8>, Vec<u8>>,
    opts: ReadOptions,
) -> Result<ModelImage, DeadLetterReason> {
    let prefix = keys::actor_prefix(actor);
    let mut files: [ModelFile; 4] = Default::default();
    for (key, value) in rows {
        let user_key = key.strip_prefix(&prefix[..]).expect("rows are under the actor");
        match keys::classify(user_key) {
            SqliteKey::Meta(t) => files[t as usize].meta = Some(value.clone()),
            SqliteKey::Chunk(t, i) => {
                files[t as usize].chunks.insert(i, value.clone());
            }
            SqliteKey::MalformedChunk(t) => files[t as usize].malformed = true,
            SqliteKey::Unknown => {}
        }
    }
    let file = |t: FileTag| &files[t as usize];
    let mut sizes = V1Files::default();
    for (t, slot) in [
        (FileTag::Main, &mut sizes.main),
        (FileTag::Journal, &mut sizes.journal),
        (FileTag::Wal, &mut sizes.wal),
        (FileTag::Shm, &mut sizes.shm),
    ] {
        if file(t).present() {
            *slot = Some(file(t).meta_size().unwrap_or(0));
        }
    }
    if !opts.ignore_sidecars {
        if file(FileTag::Journal).present() && opts.recovery != Some(Recovery::RollbackJournal) {
            return Err(DeadLetterReason::JournalSidecar);
        }
        if file(FileTag::Wal).present() && opts.recovery != Some(Recovery::CheckpointWal) {
            return Err(DeadLetterReason::WalSidecar);
        }
        let shm_ignored = matches!(opts.recovery, Some(Recovery::DiscardShm | Recovery::CheckpointWal));
        if file(FileTag::Shm).present() && !shm_ignored {
            return Err(DeadLetterReason::ShmSidecar);
        }
    }
    let sized = |t: FileTag| -> Result<u64, DeadLetterReason> {
        let size = file(t).meta_size().ok_or(DeadLetterReason::BadMeta)?;
        if size > opts.max_size {
            return Err(DeadLetterReason::Oversize);
        }
        Ok(size)
    };
    if file(FileTag::Main).meta.is_none() {
        return Err(DeadLetterReason::MissingMain);
    }
    let main_size = sized(FileTag::Main)?;
    let sidecar_tag = match opts.recovery {
        Some(Recovery::RollbackJournal) if file(FileTag::Journal).present() => Some(FileTag::Journal),
        Some(Recovery::CheckpointWal) if file(FileTag::Wal).present() => Some(FileTag::Wal),
        _ => None,
    };
    let sidecar_size = sidecar_tag.map(sized).transpose()?;
    let main = file(FileTag::Main).assemble(main_size)?;
    let sidecar = match (sidecar_tag, sidecar_size) {
        (Some(t), Some(size)) => Some((t, file(t).assemble(size)?)),
        _ => None,
    };
    Ok((main, sidecar, sizes))
}

/// Fuzz target `v1_rebuild`: builds an actor's v1 rows from a [`V1Input`], rebuilds its
/// files with the reader's pure core ([`read::rebuild_rows`]) and checks the outcome against
/// the model: the same files, sizes and digest for consistent rows, otherwise the same typed
/// rejection. A rebuilt main file then goes through the header checks (and `quick_check`
/// when small), and so do the raw input bytes (header checks only).
pub fn v1_rebuild(data: &[u8]) {
    let input = V1Input::parse(data);
    let actor = ActorId::parse(FUZZ_ACTOR).expect("FUZZ_ACTOR is a valid actor id");
    let rows = input.rows(&actor);
    let opts = input.options();
    let expected = model(&actor, &rows, opts);
    let mut digest = RangeDigest::new();
    for (k, v) in &rows {
        digest.update(k, v);
    }
    let actual = read::rebuild_rows(&actor, opts, rows.into_iter().collect());
    match (&actual, expected) {
        (Ok(image), Ok((main, sidecar, files))) => {
            assert!(image.main.len() as u64 <= opts.max_size, "main over the size limit");
            assert!(image.main == main, "main file differs from the model ({} bytes)", main.len());
            assert!(image.sidecar == sidecar, "sidecar differs from the model");
            assert_eq!(image.files, files, "file sizes");
            assert_eq!(image.digest, digest.finish(), "digest of the rows read");
        }
        (Err(ReadError::Rejected(r)), Err(reason)) => {
            assert_eq!(r.reason(), reason, "rejection {r}");
            if let V1Rejection::Oversize { size, max, .. } = r {
                assert!(size > max && *max == opts.max_size, "{r}");
            }
        }
        (Ok(image), Err(reason)) => {
            panic!("reader accepted {} bytes of main, the model rejects it: {reason:?}", image.main.len())
        }
        (Err(e), Ok((main, ..))) => panic!("reader failed ({e}), the model rebuilds {} bytes of main", main.len()),
        (Err(e), Err(reason)) => panic!("reader failed with {e}, not a rejection (model: {reason:?})"),
    }
    if let Ok(image) = actual {
        check_file(&image.main, true);
    }
    check_file(data, false);
}

/// DESIGN.md section 3 step 4, the header part: `Ok(pages)` or the rejection.
fn model_header(file: &[u8]) -> Result<u32, V1Rejection> {
    if file.is_empty() {
        return Ok(0);
    }
    if file.len() < MIN_HEADER_LEN || file[..SQLITE_MAGIC.len()] != SQLITE_MAGIC[..] {
        return Err(V1Rejection::BadHeader { detail: String::new() });
    }
    let page_size = match u16::from_be_bytes([file[16], file[17]]) {
        1 => 65536,
        n => u32::from(n),
    };
    if page_size != PAGE_SIZE {
        return Err(V1Rejection::UnsupportedPageSize { page_size });
    }
    if !file.len().is_multiple_of(PAGE_SIZE as usize) {
        return Err(V1Rejection::NotPageAligned { size: file.len() as u64 });
    }
    Ok((file.len() / PAGE_SIZE as usize) as u32)
}

/// Header validation of any file: `Ok` (page size 4096, whole pages) or a typed rejection,
/// as the model says; with `quick`, a small accepted file also goes through `quick_check`,
/// which must leave its bytes as they were.
pub fn check_file(file: &[u8], quick: bool) {
    let actual = check::check_header(file);
    match (&actual, model_header(file)) {
        (Ok(pages), Ok(expected)) => {
            assert_eq!(*pages, expected, "page count");
            if !file.is_empty() {
                assert_eq!(check::header_page_size(file), Ok(PAGE_SIZE), "page size of an accepted header");
            }
        }
        (Err(V1Rejection::BadHeader { .. }), Err(V1Rejection::BadHeader { .. })) => {
            assert!(check::header_page_size(file).is_err(), "a bad header has no page size");
        }
        (Err(a), Err(e)) => assert_eq!(a, &e, "header rejection"),
        (a, e) => panic!("header check gave {a:?}, the model {e:?}"),
    }
    if let Ok(pages) = actual
        && quick
        && pages <= QUICK_CHECK_MAX_PAGES
    {
        let mut copy = file.to_vec();
        match check::quick_check(&mut copy) {
            Ok(()) | Err(V1Rejection::IntegrityCheckFailed { .. }) => {}
            Err(other) => panic!("quick_check rejected with {other:?}"),
        }
        assert!(copy == file, "quick_check changed the file's bytes");
    }
}

// ---------------------------------------------------------------------------------------------
// v2: LTX blob and head
// ---------------------------------------------------------------------------------------------

/// Fuzz target `ltx_decode`: a blob that decodes keeps the promises of `v2::ltx`: the header
/// is exactly what the encoder writes with a SQLite page size, `commit` pages in strictly increasing pgno order from
/// 1, each `page_size` bytes, an index whose entries point at the frames one after another,
/// and re-encoding the pages decodes to the same header and pages.
pub fn ltx_decode(data: &[u8]) {
    let Ok(blob) = ltx::decode(data) else { return };
    let h = blob.header;
    assert_eq!(data[..ltx::HEADER_SIZE], h.encode()[..], "header bytes");
    assert!(h.page_size.is_power_of_two() && (ltx::MIN_PAGE_SIZE..=ltx::MAX_PAGE_SIZE).contains(&h.page_size));
    assert_eq!(h.commit as usize, blob.pages.len(), "commit");
    assert!(blob.pages.first().is_none_or(|(pgno, _)| *pgno >= 1), "page 0");
    assert!(blob.pages.windows(2).all(|w| w[0].0 < w[1].0), "pgnos not strictly increasing");
    assert!(blob.pages.iter().all(|(_, p)| p.len() == h.page_size as usize), "page of the wrong size");
    assert_eq!(blob.index.len(), blob.pages.len(), "index entries");
    let mut offset = ltx::HEADER_SIZE as u64;
    for (e, (pgno, _)) in blob.index.iter().zip(&blob.pages) {
        assert_eq!((e.pgno, e.offset), (*pgno, offset), "index entry");
        let frame = &data[offset as usize..];
        assert_eq!(frame[..4], pgno.to_be_bytes(), "frame pgno");
        assert!(e.size >= ltx::FRAME_HEADER_SIZE as u64, "frame size");
        offset += e.size;
    }
    assert_eq!(data[offset as usize..offset as usize + ltx::FRAMES_END.len()], ltx::FRAMES_END, "end of frames");

    let pages: Vec<(u32, &[u8])> = blob.pages.iter().map(|(n, p)| (*n, &p[..])).collect();
    let again = ltx::decode(&ltx::encode(&h, &pages)).expect("a re-encoded blob decodes");
    assert_eq!(again.header, h, "re-encoded header");
    assert!(again.pages == blob.pages, "re-encoded pages");
}

/// Fuzz target `head_decode`: a head that decodes has no trailing bytes, and re-encodes to
/// a head that decodes equal, byte for byte the same but for the origin's varint (BARE
/// decoders accept a non-minimal varint; the encoder writes the minimal one). A legacy head
/// (the eleven fields before `origin`) decodes as native with its fields as written.
pub fn head_decode(data: &[u8]) {
    let Ok(head) = DBHead::decode(data) else { return };
    let bytes = head.encode();
    if data.len() == LEGACY_HEAD_LEN {
        // A legacy head (no origin field) reads as native, with every other field as written.
        assert_eq!(head.origin, Origin::Native, "a legacy head is native");
        assert_eq!(data[..], bytes[..LEGACY_HEAD_LEN], "legacy fixed-width fields");
        return;
    }
    assert_eq!(DBHead::decode(&bytes).expect("an encoded head decodes"), head);
    // Every field is fixed-width but the origin, which is one varint byte when minimal.
    let fixed = bytes.len() - 1;
    assert!(data.len() >= bytes.len(), "decoded from fewer bytes than the encoding");
    assert_eq!(data[..fixed], bytes[..fixed], "fixed-width fields");
    let (last, continued) = data[fixed..].split_last().expect("origin varint");
    assert!(*last < 0x80 && continued.iter().all(|b| *b >= 0x80), "trailing bytes after the origin");
    let _ = (head.stage_in_progress(), head.staged_txid(), head.origin.as_str());
}

// ---------------------------------------------------------------------------------------------
// jobs: message parser
// ---------------------------------------------------------------------------------------------

/// Fuzz target `job_message`: a message that parses is within the size limit, has the
/// supported version, a valid campaign and actor id, and re-encodes to a message that parses
/// equal; one over the limit is `TooLarge` whatever it holds.
pub fn job_message(data: &[u8]) {
    match Job::parse(data) {
        Ok(job) => {
            assert!(data.len() <= MAX_MESSAGE_BYTES, "accepted a message over the limit");
            assert_eq!(job.version, JOB_VERSION, "version");
            assert!(valid_campaign(&job.campaign), "campaign {:?}", job.campaign);
            assert_eq!(ActorId::parse(job.actor_id.as_str()).as_ref(), Ok(&job.actor_id), "actor id");
            let again = Job::parse(&job.encode()).expect("an encoded job parses");
            assert_eq!(again, job, "re-encoded job");
            let id = job.message_id();
            assert_eq!(id.split_once('/'), Some((job.campaign.as_str(), job.actor_id.as_str())), "message id");
        }
        Err(BadMessage::TooLarge(n)) => assert!(n == data.len() && n > MAX_MESSAGE_BYTES, "TooLarge({n})"),
        Err(_) => assert!(data.len() <= MAX_MESSAGE_BYTES, "a message over the limit is not TooLarge"),
    }
}
