//! Reads one actor's v1 SQLite files out of the store and rebuilds the main file.
//!
//! Invariants: nothing here writes; a file's buffer is allocated only after its declared size
//! passed the size limit (an absurd meta costs nothing); the main file is assembled in place
//! from one streaming pass over the actor's SQLite keys, one scan batch at a time, so reading
//! a database costs its size in memory and no more; the digest of every key read is returned
//! so finalize can prove v1 did not change. The checks and the assembly are a pure core over
//! rows ([`Rebuild`], [`rebuild_rows`]) that the store reads feed; the `v1_rebuild` fuzz target
//! drives the same core.

use crate::actor::ActorId;
use crate::recovery::Recovery;
use crate::store::{KeyValue, RangeDigest, Read, Store, StoreError, Txn, for_each_row};

use super::keys::{self, CHUNK_SIZE, FileTag, SqliteKey};
use super::reject::V1Rejection;

/// Rows per scan batch while streaming chunks (about 1 MiB of chunk values).
pub const SCAN_BATCH: usize = 256;
/// Default largest main file migrated (DESIGN.md: 128 MiB).
pub const DEFAULT_MAX_SIZE: u64 = 128 * 1024 * 1024;

/// Sizes of the v1 files seen for an actor (the meta's size, or the bytes of its chunks when
/// it has no meta); `None` when the file is absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct V1Files {
    pub main: Option<u64>,
    pub journal: Option<u64>,
    pub wal: Option<u64>,
    pub shm: Option<u64>,
}

impl V1Files {
    pub fn get(&self, tag: FileTag) -> Option<u64> {
        match tag {
            FileTag::Main => self.main,
            FileTag::Journal => self.journal,
            FileTag::Wal => self.wal,
            FileTag::Shm => self.shm,
        }
    }

    fn slot(&mut self, tag: FileTag) -> &mut Option<u64> {
        match tag {
            FileTag::Main => &mut self.main,
            FileTag::Journal => &mut self.journal,
            FileTag::Wal => &mut self.wal,
            FileTag::Shm => &mut self.shm,
        }
    }

    pub fn total(&self) -> u64 {
        FileTag::ALL.iter().filter_map(|t| self.get(*t)).sum()
    }
}

/// What was read for one actor.
#[derive(Debug)]
pub struct V1Image {
    /// The main file, byte for byte as v1 holds it.
    pub main: Vec<u8>,
    /// The journal or WAL, only when the requested recovery needs it.
    pub sidecar: Option<(FileTag, Vec<u8>)>,
    pub files: V1Files,
    /// Digest of every row under `v1/{actor}/08`, as read.
    pub digest: u128,
}

/// Why reading failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Rejected(#[from] V1Rejection),
    /// v1 changed while it was being read (a meta differed between probe and stream).
    #[error("v1 changed while it was read")]
    Changed,
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> ReadError {
        match corrupt_rejection(&e) {
            Some(r) => ReadError::Rejected(r),
            None => ReadError::Store(e),
        }
    }
}

/// The rejection of a v1 SQLite key whose rows the layout found corrupt (rivet: DATA rows
/// without their METADATA row, or the reverse; rivet's own reads fail on both): `bad_meta` for
/// a meta key, `chunk_mismatch` for a chunk key (DESIGN.md section 7). `None` for any other
/// store error, or a corrupt key outside the v1 SQLite keys.
pub fn corrupt_rejection(e: &StoreError) -> Option<V1Rejection> {
    let StoreError::Corrupt { key, detail } = e else {
        return None;
    };
    let rest = key.strip_prefix(crate::keys::V1_PREFIX)?;
    let user_key = &rest[rest.iter().position(|&b| b == b'/')? + 1..];
    let detail = format!("the rows of {} are incomplete: {detail}", crate::keys::printable(user_key));
    match keys::classify(user_key) {
        SqliteKey::Meta(tag) => Some(V1Rejection::BadMeta { file: tag.name(), detail }),
        SqliteKey::Chunk(tag, _) | SqliteKey::MalformedChunk(tag) => {
            Some(V1Rejection::ChunkMismatch { file: tag.name(), detail })
        }
        SqliteKey::Unknown if user_key.first() == Some(&keys::SQLITE_PREFIX) => {
            Some(V1Rejection::ChunkMismatch { file: FileTag::Main.name(), detail })
        }
        SqliteKey::Unknown => None,
    }
}

/// Options of a read.
#[derive(Clone, Copy, Debug)]
pub struct ReadOptions {
    pub max_size: u64,
    pub recovery: Option<Recovery>,
    /// Rebuild the main file even when sidecars are present (verification reads v1 as it is
    /// now; a migration never sets this).
    pub ignore_sidecars: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions { max_size: DEFAULT_MAX_SIZE, recovery: None, ignore_sidecars: false }
    }
}

/// Whether the actor has v1 SQLite data (some key under `v1/{actor}/08`).
pub async fn has_sqlite_data(store: &dyn Store, actor: &ActorId) -> Result<bool, StoreError> {
    Ok(store.first_key(&keys::sqlite_range(actor)).await?.is_some())
}

/// The metas (raw values) and which files are present, without reading any chunk.
#[derive(Debug, Default)]
pub struct Probe {
    metas: [Option<Vec<u8>>; 4],
    has_chunks: [bool; 4],
    /// The first chunk row of each file, as a probe made of several reads saw it: with the
    /// metas, what [`Probe::confirm`] checks.
    first_chunks: [Option<KeyValue>; 4],
}

impl Probe {
    /// The probe of an actor whose whole SQLite range is in `rows`.
    fn from_rows(actor: &ActorId, rows: &[(Vec<u8>, Vec<u8>)]) -> Probe {
        let prefix_len = keys::actor_prefix(actor).len();
        let mut probe = Probe::default();
        for (key, value) in rows {
            match keys::classify(&key[prefix_len..]) {
                SqliteKey::Meta(tag) => probe.metas[tag as usize] = Some(value.clone()),
                SqliteKey::Chunk(tag, _) | SqliteKey::MalformedChunk(tag) => probe.has_chunks[tag as usize] = true,
                SqliteKey::Unknown => {}
            }
        }
        probe
    }

    pub async fn run(store: &dyn Store, actor: &ActorId) -> Result<Probe, StoreError> {
        let mut probe = Probe::default();
        for (key, value) in store.scan(&keys::meta_range(actor), 16).await? {
            let user_key = &key[keys::actor_prefix(actor).len()..];
            if let SqliteKey::Meta(tag) = keys::classify(user_key) {
                probe.metas[tag as usize] = Some(value);
            }
        }
        for tag in FileTag::ALL {
            let first = store.scan(&keys::chunk_range(actor, tag), 1).await?.into_iter().next();
            probe.has_chunks[tag as usize] = first.is_some();
            probe.first_chunks[tag as usize] = first;
        }
        Ok(probe)
    }

    /// The checks that v1 still is what this probe (made of several reads, so possibly torn
    /// by a writer) saw: the same metas, the same first chunk of each file that had one, no
    /// chunk of the others. A rejection drawn from the probe stands only if they hold.
    pub fn confirmation(&self, actor: &ActorId) -> Txn {
        let mut txn = Txn::new();
        for tag in FileTag::ALL {
            txn.check_value(keys::meta_key(actor, tag), self.metas[tag as usize].clone());
            match &self.first_chunks[tag as usize] {
                Some((key, value)) => txn.check_value(key.clone(), Some(value.clone())),
                None => txn.check_range_digest(keys::chunk_range(actor, tag), RangeDigest::new().finish()),
            };
        }
        txn
    }

    pub fn present(&self, tag: FileTag) -> bool {
        self.metas[tag as usize].is_some() || self.has_chunks[tag as usize]
    }

    /// File sizes as the metas declare them (0 for a present file whose meta is unreadable or
    /// missing: its chunks are not counted without reading them).
    pub fn files(&self) -> V1Files {
        let mut files = V1Files::default();
        for tag in FileTag::ALL {
            if self.present(tag) {
                let size = self.metas[tag as usize].as_deref().and_then(|m| keys::decode_meta(m).ok());
                *files.slot(tag) = Some(size.unwrap_or(0));
            }
        }
        files
    }

    /// The sidecar rejections, in the order DESIGN.md lists them, minus what the recovery
    /// takes care of.
    pub fn sidecar_rejection(&self, recovery: Option<Recovery>) -> Option<V1Rejection> {
        let files = self.files();
        let size = |t| files.get(t).unwrap_or(0);
        if self.present(FileTag::Journal) && recovery != Some(Recovery::RollbackJournal) {
            return Some(V1Rejection::JournalSidecar { size: size(FileTag::Journal) });
        }
        if self.present(FileTag::Wal) && recovery != Some(Recovery::CheckpointWal) {
            return Some(V1Rejection::WalSidecar { size: size(FileTag::Wal) });
        }
        let shm_ignored = matches!(recovery, Some(Recovery::DiscardShm | Recovery::CheckpointWal));
        if self.present(FileTag::Shm) && !shm_ignored {
            return Some(V1Rejection::ShmSidecar { size: size(FileTag::Shm) });
        }
        None
    }

    /// The main file's size, checked: present, readable meta, within the limit.
    pub fn main_size_checked(&self, max: u64) -> Result<u64, V1Rejection> {
        self.main_size(max)
    }

    fn main_size(&self, max: u64) -> Result<u64, V1Rejection> {
        let Some(meta) = &self.metas[FileTag::Main as usize] else {
            let detail = if self.has_chunks[FileTag::Main as usize] {
                "main chunks exist without a meta".to_string()
            } else {
                "only sidecar files are present".to_string()
            };
            return Err(V1Rejection::MissingMain { detail });
        };
        sized(FileTag::Main, meta, max)
    }
}

fn sized(tag: FileTag, meta: &[u8], max: u64) -> Result<u64, V1Rejection> {
    let size = keys::decode_meta(meta).map_err(|detail| V1Rejection::BadMeta { file: tag.name(), detail })?;
    if size > max {
        return Err(V1Rejection::Oversize { file: tag.name(), size, max });
    }
    Ok(size)
}

const MALFORMED_INDEX: &str = "a chunk key's index is not 4 bytes";

/// Rebuilds one file from its chunks: exactly `ceil(size / CHUNK_SIZE)` chunks with indexes
/// `0..n`, none longer than `CHUNK_SIZE` and none past `size`; uncovered bytes stay zero.
struct Assembler {
    tag: FileTag,
    buf: Vec<u8>,
    expected: u64,
    next: u64,
}

impl Assembler {
    fn new(tag: FileTag, size: u64) -> Assembler {
        // `size` passed the size limit (far below usize::MAX on 64-bit targets).
        let len = usize::try_from(size).expect("checked against the size limit");
        Assembler { tag, buf: vec![0u8; len], expected: size.div_ceil(CHUNK_SIZE as u64), next: 0 }
    }

    fn mismatch(&self, detail: String) -> V1Rejection {
        V1Rejection::ChunkMismatch { file: self.tag.name(), detail }
    }

    fn place(&mut self, index: u32, bytes: &[u8]) -> Result<(), V1Rejection> {
        let index = u64::from(index);
        if index >= self.expected {
            return Err(self.mismatch(format!("chunk {index} is out of range ({} chunks expected)", self.expected)));
        }
        if index != self.next {
            // Keys arrive in ascending order, so a gap means chunk `next` is missing.
            return Err(self.mismatch(format!("chunk {} is missing", self.next)));
        }
        if bytes.len() > CHUNK_SIZE {
            return Err(self.mismatch(format!("chunk {index} is {} bytes, over {CHUNK_SIZE}", bytes.len())));
        }
        let start = index as usize * CHUNK_SIZE;
        let end = start + bytes.len();
        if end > self.buf.len() {
            return Err(self.mismatch(format!("chunk {index} reaches byte {end}, past the size {}", self.buf.len())));
        }
        self.buf[start..end].copy_from_slice(bytes);
        self.next += 1;
        Ok(())
    }

    fn finish(self) -> Result<Vec<u8>, V1Rejection> {
        if self.next != self.expected {
            return Err(self.mismatch(format!("chunk {} is missing ({} chunks expected)", self.next, self.expected)));
        }
        Ok(self.buf)
    }
}

/// Reads the actor's main file (and the sidecar a recovery needs), applying every check of
/// the v1 layout. The SQLite-level checks (header, page size, quick_check) are `v1::check`'s.
pub async fn read_v1(store: &dyn Store, actor: &ActorId, opts: ReadOptions) -> Result<V1Image, ReadError> {
    let first = first_batch(store, actor).await?;
    read_v1_from(store, actor, opts, first).await
}

/// The first scan batch of the actor's SQLite range: the whole range for small actors, so
/// they are read in one query (empty: the actor has no v1 SQLite data).
pub async fn first_batch(store: &dyn Store, actor: &ActorId) -> Result<FirstBatch, StoreError> {
    let rows = store.scan(&keys::sqlite_range(actor), SCAN_BATCH).await?;
    Ok(FirstBatch::from_rows(rows))
}

/// The read of [`first_batch`], to send in a batch with others ([`Store::read_many`]).
pub fn first_batch_read(actor: &ActorId) -> Read {
    Read::Scan { range: keys::sqlite_range(actor), limit: SCAN_BATCH }
}

/// The start of an actor's SQLite range, as [`first_batch`] read it.
#[derive(Clone, Debug)]
pub struct FirstBatch {
    rows: Vec<(Vec<u8>, Vec<u8>)>,
    /// The rows are the whole range.
    whole: bool,
}

impl FirstBatch {
    /// The batch of rows [`first_batch_read`] returned.
    pub fn from_rows(rows: Vec<KeyValue>) -> FirstBatch {
        FirstBatch { whole: rows.len() < SCAN_BATCH, rows }
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether the batch is the actor's whole SQLite range (it is then read with no other call).
    pub fn is_whole(&self) -> bool {
        self.whole
    }

    /// The image of a whole batch ([`rebuild_rows`] on a copy of its rows: the batch stays for
    /// a read that starts over).
    pub fn rebuild(&self, actor: &ActorId, opts: ReadOptions) -> Result<V1Image, ReadError> {
        rebuild_rows(actor, opts, self.rows.clone())
    }

    /// The size the meta of `tag` declares, if the batch holds a readable one. Metas sort
    /// before every chunk, so a batch holds all of the actor's metas.
    pub fn declared_size(&self, actor: &ActorId, tag: FileTag) -> Option<u64> {
        let key = keys::meta_key(actor, tag);
        let row = self.rows.iter().find(|(k, _)| *k == key)?;
        keys::decode_meta(&row.1).ok()
    }
}

/// [`read_v1`] from a first batch already read.
pub async fn read_v1_from(
    store: &dyn Store,
    actor: &ActorId,
    opts: ReadOptions,
    first: FirstBatch,
) -> Result<V1Image, ReadError> {
    if first.whole {
        return rebuild_rows(actor, opts, first.rows);
    }
    let probe = Probe::run(store, actor).await?;
    let confirmation = probe.confirmation(actor);
    let mut rebuild = match Rebuild::start(actor, probe, opts) {
        Ok(rebuild) => rebuild,
        Err(r) if holds(store, confirmation).await? => return Err(r.into()),
        Err(_) => return Err(ReadError::Changed),
    };
    for_each_row(store, &keys::sqlite_range(actor), SCAN_BATCH, |key, value| {
        rebuild.visit(key, value);
        Ok(())
    })
    .await?;
    // Rows read over several scans while a writer is at work may never have existed
    // together: a rejection of them stands only if v1 still hashes to what was read.
    let digest = rebuild.digest();
    match rebuild.finish() {
        Err(ReadError::Rejected(r)) if unchanged_since(store, actor, digest).await? => Err(r.into()),
        Err(ReadError::Rejected(_)) => Err(ReadError::Changed),
        other => other,
    }
}

/// Whether the actor's SQLite rows still hash to `digest` (a check-only transaction, so the
/// answer is the store's, not a second read's).
pub async fn unchanged_since(store: &dyn Store, actor: &ActorId, digest: u128) -> Result<bool, StoreError> {
    let mut txn = Txn::new();
    txn.check_range_digest(keys::sqlite_range(actor), digest);
    holds(store, txn).await
}

/// Whether every check of a check-only transaction holds.
async fn holds(store: &dyn Store, checks: Txn) -> Result<bool, StoreError> {
    match store.commit(checks).await {
        Ok(()) => Ok(true),
        Err(StoreError::Conflict { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The whole rebuild from every row of the actor's SQLite range (`v1/{actor}/08...`), in
/// ascending key order with unique keys, as a store scan returns them: what [`read_v1_from`]
/// does for an actor read in one batch. Pure: no store, no I/O.
pub fn rebuild_rows(actor: &ActorId, opts: ReadOptions, rows: Vec<(Vec<u8>, Vec<u8>)>) -> Result<V1Image, ReadError> {
    let probe = Probe::from_rows(actor, &rows);
    let mut rebuild = Rebuild::start(actor, probe, opts)?;
    for (key, value) in rows {
        rebuild.visit(&key, value);
    }
    rebuild.finish()
}

/// The pure core of a read: the checks that need only the probe ([`Rebuild::start`]), then
/// the actor's SQLite rows in key order ([`Rebuild::visit`]), then the image or the first
/// failure ([`Rebuild::finish`]). The main buffer (and the sidecar's) is allocated in `start`,
/// only after its size passed the limit.
pub struct Rebuild {
    probe: Probe,
    prefix: Vec<u8>,
    main: Assembler,
    sidecar: Option<Assembler>,
    digest: RangeDigest,
    failure: Option<ReadError>,
}

impl Rebuild {
    /// Applies the sidecar, meta and size checks and allocates the buffers.
    pub fn start(actor: &ActorId, probe: Probe, opts: ReadOptions) -> Result<Rebuild, V1Rejection> {
        if let Some(rejection) = probe.sidecar_rejection(opts.recovery).filter(|_| !opts.ignore_sidecars) {
            return Err(rejection);
        }
        let main_size = probe.main_size(opts.max_size)?;
        let main = Assembler::new(FileTag::Main, main_size);
        let sidecar_tag = match opts.recovery {
            Some(Recovery::RollbackJournal) if probe.present(FileTag::Journal) => Some(FileTag::Journal),
            Some(Recovery::CheckpointWal) if probe.present(FileTag::Wal) => Some(FileTag::Wal),
            _ => None,
        };
        let sidecar = match sidecar_tag {
            Some(tag) => {
                let Some(meta) = &probe.metas[tag as usize] else {
                    return Err(V1Rejection::BadMeta {
                        file: tag.name(),
                        detail: "chunks exist without a meta".into(),
                    });
                };
                Some(Assembler::new(tag, sized(tag, meta, opts.max_size)?))
            }
            None => None,
        };
        Ok(Rebuild {
            probe,
            prefix: keys::actor_prefix(actor),
            main,
            sidecar,
            digest: RangeDigest::new(),
            failure: None,
        })
    }

    /// One row of the actor's SQLite range; rows come in ascending key order. After the first
    /// failure the rows are only digested.
    pub fn visit(&mut self, key: &[u8], value: Vec<u8>) {
        self.digest.update(key, &value);
        if self.failure.is_some() {
            return;
        }
        let class = key.strip_prefix(&self.prefix[..]).map_or(SqliteKey::Unknown, keys::classify);
        let sidecar_tag = self.sidecar.as_ref().map(|a| a.tag);
        let step = match class {
            SqliteKey::Meta(tag) if self.probe.metas[tag as usize].as_deref() != Some(&value[..]) => {
                Err(ReadError::Changed)
            }
            SqliteKey::Chunk(FileTag::Main, i) => self.main.place(i, &value).map_err(ReadError::from),
            SqliteKey::MalformedChunk(FileTag::Main) => Err(self.main.mismatch(MALFORMED_INDEX.into()).into()),
            // `sidecar_tag` is Some exactly when `sidecar` is.
            SqliteKey::Chunk(tag, i) if Some(tag) == sidecar_tag => {
                self.sidecar.as_mut().expect("sidecar assembler").place(i, &value).map_err(ReadError::from)
            }
            SqliteKey::MalformedChunk(tag) if Some(tag) == sidecar_tag => {
                Err(self.sidecar.as_ref().expect("sidecar assembler").mismatch(MALFORMED_INDEX.into()).into())
            }
            _ => Ok(()),
        };
        if let Err(e) = step {
            self.failure = Some(e);
        }
    }

    /// The digest of every row visited so far.
    pub fn digest(&self) -> u128 {
        self.digest.finish()
    }

    /// The image, or the first failure: a rejection seen in the rows, then a file short of
    /// chunks.
    pub fn finish(self) -> Result<V1Image, ReadError> {
        if let Some(e) = self.failure {
            return Err(e);
        }
        let main = self.main.finish()?;
        let sidecar = match self.sidecar {
            Some(a) => {
                let tag = a.tag;
                Some((tag, a.finish()?))
            }
            None => None,
        };
        Ok(V1Image { main, sidecar, files: self.probe.files(), digest: self.digest.finish() })
    }
}
