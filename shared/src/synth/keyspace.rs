//! The synthetic keyspace generator behind `ferry-producer seed` and `--seed-demo`: a
//! deterministic (per seed) plan of actors, mostly small databases with a long tail of large
//! ones, plus a configurable share of hard cases, written as real SQLite files in the v1
//! layout with other KV entries beside them.
//!
//! Actor ids follow the store's layout: `{prefix}-{index:07}` in ferry's, rivet ids from
//! random UUIDs in rivet's (drawn from their own stream of the seed, so a seed plants the same
//! case and size at each index in both layouts, and the same ids again in the same layout).
//!
//! Each distinct database is built once by SQLite and its bytes reused for every actor that
//! plays it, which keeps 100,000 actors fast without giving up real files.

use std::collections::{BTreeMap, HashMap};

use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::actor::ActorId;
use crate::layout::{Layout, RivetId, Uuid};
use crate::migrate::OutcomeKind;
use crate::reason::DeadLetterReason;
use crate::store::{Store, StoreError};
use crate::v1::keys::{CHUNK_SIZE, FileTag, META_LEN, actor_prefix, chunk_key, encode_meta, file_entries, meta_key};
use crate::v2::head::{DBHead, Origin};

use super::sqlite::{self, DbFiles, DbSpec};
use super::{BatchWriter, put_files};

/// What an actor is planted to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Case {
    Normal,
    Journal,
    Wal,
    Shm,
    Corrupt,
    PageSize,
    MissingChunk,
    Oversize,
    BadHeader,
    BadMeta,
    MissingMain,
    NotAligned,
    Native,
    NoV1,
}

impl Case {
    pub const HARD: [Case; 13] = [
        Case::Journal,
        Case::Wal,
        Case::Shm,
        Case::Corrupt,
        Case::PageSize,
        Case::MissingChunk,
        Case::Oversize,
        Case::BadHeader,
        Case::BadMeta,
        Case::MissingMain,
        Case::NotAligned,
        Case::Native,
        Case::NoV1,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Case::Normal => "normal",
            Case::Journal => "journal",
            Case::Wal => "wal",
            Case::Shm => "shm",
            Case::Corrupt => "corrupt",
            Case::PageSize => "page_size",
            Case::MissingChunk => "missing_chunk",
            Case::Oversize => "oversize",
            Case::BadHeader => "bad_header",
            Case::BadMeta => "bad_meta",
            Case::MissingMain => "missing_main",
            Case::NotAligned => "not_aligned",
            Case::Native => "native",
            Case::NoV1 => "no_v1",
        }
    }

    pub fn parse(s: &str) -> Option<Case> {
        Case::HARD.into_iter().chain([Case::Normal]).find(|c| c.name() == s)
    }

    /// What a migration of this actor must end in.
    pub fn expected(self) -> Expected {
        use DeadLetterReason as R;
        match self {
            Case::Normal => Expected::Outcome(OutcomeKind::Migrated),
            Case::Native => Expected::Outcome(OutcomeKind::SkippedNativeV2),
            Case::NoV1 => Expected::Outcome(OutcomeKind::SkippedNoV1),
            Case::Journal => Expected::DeadLetter(R::JournalSidecar),
            Case::Wal => Expected::DeadLetter(R::WalSidecar),
            Case::Shm => Expected::DeadLetter(R::ShmSidecar),
            Case::Corrupt => Expected::DeadLetter(R::IntegrityCheckFailed),
            Case::PageSize => Expected::DeadLetter(R::UnsupportedPageSize),
            Case::MissingChunk => Expected::DeadLetter(R::ChunkMismatch),
            Case::Oversize => Expected::DeadLetter(R::Oversize),
            Case::BadHeader => Expected::DeadLetter(R::BadHeader),
            Case::BadMeta => Expected::DeadLetter(R::BadMeta),
            Case::MissingMain => Expected::DeadLetter(R::MissingMain),
            Case::NotAligned => Expected::DeadLetter(R::NotPageAligned),
        }
    }
}

/// The planted end of an actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Expected {
    Outcome(OutcomeKind),
    DeadLetter(DeadLetterReason),
}

/// Shares of hard cases (the rest is normal).
#[derive(Clone, Debug, PartialEq)]
pub struct Mix(pub BTreeMap<Case, f64>);

impl Default for Mix {
    fn default() -> Self {
        let shares = [
            (Case::Journal, 0.01),
            (Case::Wal, 0.01),
            (Case::Shm, 0.005),
            (Case::Corrupt, 0.005),
            (Case::PageSize, 0.005),
            (Case::MissingChunk, 0.005),
            (Case::Oversize, 0.002),
            (Case::BadHeader, 0.003),
            (Case::BadMeta, 0.002),
            (Case::MissingMain, 0.002),
            (Case::NotAligned, 0.002),
            (Case::Native, 0.01),
            (Case::NoV1, 0.01),
        ];
        Mix(shares.into_iter().collect())
    }
}

impl Mix {
    /// No hard cases.
    pub fn none() -> Mix {
        Mix(BTreeMap::new())
    }

    /// `journal=0.02,wal=0.01,...`; `default` or empty is the default mix, `none` no hard cases.
    pub fn parse(s: &str) -> Result<Mix, String> {
        match s.trim() {
            "" | "default" => return Ok(Mix::default()),
            "none" => return Ok(Mix::none()),
            _ => {}
        }
        let mut shares = BTreeMap::new();
        for part in s.split(',') {
            let (name, share) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected CASE=SHARE"))?;
            let case = Case::parse(name.trim()).filter(|c| *c != Case::Normal).ok_or_else(|| {
                let names: Vec<_> = Case::HARD.iter().map(|c| c.name()).collect();
                format!("unknown case {name:?} (one of {})", names.join(", "))
            })?;
            let share: f64 = share.trim().parse().map_err(|_| format!("{part:?}: share is not a number"))?;
            if !(0.0..=1.0).contains(&share) {
                return Err(format!("{part:?}: share must be between 0 and 1"));
            }
            shares.insert(case, share);
        }
        if shares.values().sum::<f64>() > 1.0 {
            return Err("shares add up to more than 1".into());
        }
        Ok(Mix(shares))
    }

    /// Exact actor counts per hard case for `n` actors.
    pub fn counts(&self, n: u64) -> BTreeMap<Case, u64> {
        self.0.iter().map(|(c, s)| (*c, (s * n as f64).round() as u64)).collect()
    }
}

/// Settings of a generated keyspace.
#[derive(Clone, Debug)]
pub struct SeedConfig {
    pub actors: u64,
    pub seed: u64,
    pub mix: Mix,
    /// Largest database of the long tail, in MiB.
    pub max_mib: u64,
    /// Share of normal actors in the long tail (over 1 MiB).
    pub large_share: f64,
    /// Share of normal actors of 64 KiB to 1 MiB (the rest are a few pages).
    pub medium_share: f64,
    /// Actor ids are `{prefix}-{index:07}` (ferry layout; rivet ids carry no name).
    pub prefix: String,
    /// Which actor ids to plant: the layout of the store seeded.
    pub layout: Layout,
    /// The size limit oversize actors are planted past.
    pub oversize_limit: u64,
}

impl Default for SeedConfig {
    fn default() -> Self {
        SeedConfig {
            actors: 100,
            seed: 1,
            mix: Mix::default(),
            max_mib: 16,
            large_share: 0.01,
            medium_share: 0.09,
            prefix: "actor".into(),
            layout: Layout::Ferry,
            oversize_limit: crate::v1::read::DEFAULT_MAX_SIZE,
        }
    }
}

/// Sizes of normal databases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Size {
    /// A few pages: one of 8 variants.
    Small(u8),
    /// 64 KiB to 1 MiB: one of 4 variants.
    Medium(u8),
    /// Over 1 MiB up to `max_mib`: one of 3 variants.
    Large(u8),
}

/// One planned actor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedActor {
    pub id: ActorId,
    pub case: Case,
    size: Size,
}

/// The plan for a config: deterministic for a seed, with exactly the mix's counts.
pub fn plan(cfg: &SeedConfig) -> Vec<PlannedActor> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut cases: Vec<Case> = Vec::with_capacity(cfg.actors as usize);
    for (case, count) in cfg.mix.counts(cfg.actors) {
        cases.extend(std::iter::repeat_n(case, count as usize));
    }
    cases.truncate(cfg.actors as usize);
    cases.resize(cfg.actors as usize, Case::Normal);
    cases.shuffle(&mut rng);
    // A stream of its own: the cases and sizes above do not depend on the layout.
    let mut ids = ChaCha8Rng::seed_from_u64(cfg.seed);
    ids.set_stream(RIVET_ID_STREAM);
    cases
        .into_iter()
        .enumerate()
        .map(|(i, case)| {
            let roll: f64 = rng.random();
            let size = if roll < cfg.large_share {
                Size::Large(rng.random_range(0..3))
            } else if roll < cfg.large_share + cfg.medium_share {
                Size::Medium(rng.random_range(0..4))
            } else {
                Size::Small(rng.random_range(0..8))
            };
            let id = match cfg.layout {
                // The prefix is checked by the caller; digits and '-' keep the id valid.
                Layout::Ferry => ActorId::parse(&format!("{}-{i:07}", cfg.prefix)).expect("valid generated actor id"),
                Layout::Rivet => rivet_id(&mut ids).to_actor(),
            };
            PlannedActor { id, case, size }
        })
        .collect()
}

/// The ChaCha stream rivet ids are drawn from (any stream but the plan's 0).
const RIVET_ID_STREAM: u64 = 0x0072_6976_6574;
/// The datacenter label of planted rivet ids.
pub const RIVET_SEED_LABEL: u16 = 1;

/// A rivet id of a random (version 4) UUID.
fn rivet_id(rng: &mut ChaCha8Rng) -> RivetId {
    rivet_id_of_random(rng.random())
}

/// The rivet id of the version 4 UUID made of `random` bits (label [`RIVET_SEED_LABEL`]).
pub(crate) fn rivet_id_of_random(random: u128) -> RivetId {
    let mut bytes = random.to_be_bytes();
    // RFC 9562 version 4 (random) and variant bits, as a UUID generator writes them.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    RivetId::new(Uuid::from_bytes(bytes), RIVET_SEED_LABEL)
}

/// What `seed` wrote.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SeedReport {
    pub actors: u64,
    pub by_case: BTreeMap<&'static str, u64>,
    pub v1_bytes: u64,
    pub seconds: f64,
}

fn spec_for(size: Size, cfg: &SeedConfig) -> DbSpec {
    match size {
        Size::Small(v) => {
            DbSpec { rows: 2 + u32::from(v) * 6, payload: 40 + u32::from(v) * 30, page_size: 4096, seed: u64::from(v) }
        }
        Size::Medium(v) => DbSpec::sized((64 << 10) << v, 100 + u64::from(v)),
        Size::Large(v) => {
            let max = cfg.max_mib.max(2) << 20;
            DbSpec::sized((max >> (2 - v)).max(2 << 20), 200 + u64::from(v))
        }
    }
}

/// Builds (once) and hands out the files of each distinct database.
struct Templates<'c> {
    cfg: &'c SeedConfig,
    built: HashMap<(Case, Size), DbFiles>,
}

impl Templates<'_> {
    fn get(&mut self, case: Case, size: Size) -> Result<&DbFiles, String> {
        // Hard cases share one small template; only normal actors vary in size.
        let size = if case == Case::Normal { size } else { Size::Small(3) };
        if !self.built.contains_key(&(case, size)) {
            let files = build(case, spec_for(size, self.cfg))?;
            self.built.insert((case, size), files);
        }
        Ok(&self.built[&(case, size)])
    }
}

fn build(case: Case, spec: DbSpec) -> Result<DbFiles, String> {
    let plain = |spec: &DbSpec| sqlite::database(spec).map(|main| DbFiles { main, ..DbFiles::default() });
    Ok(match case {
        Case::Normal | Case::Native | Case::MissingChunk | Case::Oversize | Case::BadMeta | Case::MissingMain => {
            plain(&spec)?
        }
        Case::Journal => sqlite::hot_journal(&spec, 200)?,
        Case::Wal => sqlite::wal(&spec, 10)?,
        Case::Shm => {
            let files = sqlite::wal(&spec, 0)?;
            sqlite::checkpointed_main(&files)?
        }
        Case::Corrupt => DbFiles { main: sqlite::scribbled(&spec)?, ..DbFiles::default() },
        Case::PageSize => plain(&DbSpec { page_size: 8192, ..spec })?,
        Case::BadHeader => {
            let mut f = plain(&spec)?;
            f.main[0] ^= 0x20;
            f
        }
        Case::NotAligned => {
            let mut f = plain(&spec)?;
            f.main.extend_from_slice(&[0u8; 100]);
            f
        }
        Case::NoV1 => DbFiles::default(),
    })
}

/// Writes the planted layout of one actor.
async fn put_actor(
    w: &mut BatchWriter<'_>,
    actor: &PlannedActor,
    files: &DbFiles,
    cfg: &SeedConfig,
) -> Result<u64, StoreError> {
    let id = &actor.id;
    // Other entries of the actor's KV, before and after the SQLite prefix.
    let mut state = actor_prefix(id);
    state.extend_from_slice(b"\x01state");
    w.set(state, format!("{{\"actor\":\"{id}\",\"counter\":42}}").into_bytes()).await?;
    let mut after = actor_prefix(id);
    after.extend_from_slice(b"\x09conn");
    w.set(after, b"last-seen=1763900000000".to_vec()).await?;
    match actor.case {
        Case::NoV1 => return Ok(0),
        Case::MissingChunk => {
            for (k, v) in file_entries(id, FileTag::Main, &files.main) {
                if k != chunk_key(id, FileTag::Main, 1) {
                    w.set(k, v).await?;
                }
            }
        }
        Case::Oversize => {
            w.set(meta_key(id, FileTag::Main), encode_meta(cfg.oversize_limit + CHUNK_SIZE as u64).to_vec()).await?;
            w.set(chunk_key(id, FileTag::Main, 0), files.main[..CHUNK_SIZE].to_vec()).await?;
        }
        Case::BadMeta => {
            let mut meta = encode_meta(files.main.len() as u64);
            meta[0] = 2;
            debug_assert_eq!(meta.len(), META_LEN);
            for (k, v) in file_entries(id, FileTag::Main, &files.main) {
                let v = if k == meta_key(id, FileTag::Main) { meta.to_vec() } else { v };
                w.set(k, v).await?;
            }
        }
        Case::MissingMain => {
            for (k, v) in file_entries(id, FileTag::Main, &files.main).into_iter().skip(1) {
                w.set(k, v).await?;
            }
        }
        Case::Native => {
            put_files(w, id, files).await?;
            let head = DBHead { origin: Origin::Native, head_txid: 1, next_txid: 2, ..DBHead::staging(1, 1, 0) };
            w.set(crate::v2::keys::meta(id), head.encode()).await?;
        }
        _ => put_files(w, id, files).await?,
    }
    Ok(files.main.len() as u64)
}

/// Generates the keyspace of `cfg` into `store`.
pub async fn seed(store: &dyn Store, cfg: &SeedConfig, mut progress: impl FnMut(u64)) -> Result<SeedReport, String> {
    let started = std::time::Instant::now();
    let actors = plan(cfg);
    let mut templates = Templates { cfg, built: HashMap::new() };
    let mut report = SeedReport { actors: cfg.actors, ..SeedReport::default() };
    let mut w = BatchWriter::new(store);
    for (i, actor) in actors.iter().enumerate() {
        let files = templates.get(actor.case, actor.size)?;
        report.v1_bytes += put_actor(&mut w, actor, files, cfg).await.map_err(|e| format!("{}: {e}", actor.id))?;
        *report.by_case.entry(actor.case.name()).or_default() += 1;
        if i % 1000 == 999 {
            progress(i as u64 + 1);
        }
    }
    w.flush().await.map_err(|e| e.to_string())?;
    progress(cfg.actors);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
