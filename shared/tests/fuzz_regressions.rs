//! Replays every input of the fuzz corpus (`fuzz/corpus/<target>/`) and every regression
//! (`fuzz/regressions/<target>/`) through the target's entry function in `ferry::fuzzing`, on
//! stable, as part of `cargo test --workspace`: a crash the fuzzer once found stays fixed. A
//! missing or empty directory, or a target in `fuzz/fuzz_targets/` without a test here, fails
//! the run instead of passing vacuously. Every input runs under an allocation tracker: no input
//! may cost an allocation sized by what it merely claims (a meta's size, a header's page size),
//! which libFuzzer's `-malloc_limit_mb` catches while fuzzing but a plain test would not.
//!
//! `generate_seed_corpus` (ignored) rewrites the seed corpus from real data made by ferry's
//! own encoders and SQLite; see `docs/FUZZING.md`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use ferry::fuzzing::{self, FUZZ_ACTOR, FUZZ_MAX_SIZE, V1Input, V1Record};
use ferry::jobs::message::Job;
use ferry::recovery::Recovery;
use ferry::synth::sqlite::{self, DbSpec};
use ferry::v1::FileTag;
use ferry::v1::keys::{CHUNK_SIZE, META_VERSION, encode_meta};
use ferry::v2::head::{DBHead, Origin};
use ferry::v2::ltx::{self, LtxHeader};
use ferry::{ActorId, DeadLetterReason};

/// The system allocator, recording the largest single allocation of the current thread.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the slot is gone while the thread is being torn down.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to `System`; only a thread-local counter is added.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// The largest single allocation `f` makes on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    f();
    LARGEST.with(|l| l.get())
}

type Target = fn(&[u8]);

/// Every cargo-fuzz target and its entry function.
const TARGETS: [(&str, Target); 4] = [
    ("v1_rebuild", fuzzing::v1_rebuild),
    ("ltx_decode", fuzzing::ltx_decode),
    ("head_decode", fuzzing::head_decode),
    ("job_message", fuzzing::job_message),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The inputs of `fuzz/{kind}/{target}/`; fails when the directory is missing or empty.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no inputs", dir.display());
    files
}

/// The largest single allocation a target may make for an input of `len` bytes: v1 main and
/// sidecar buffers are bounded by the size limit, LTX pages by the largest page size, and
/// everything else a target allocates (rows, the model, a re-encoded blob, SQLite's cache) by
/// the input. An allocation sized by what an input merely claims breaks it.
fn allocation_bound(len: usize) -> usize {
    2 * FUZZ_MAX_SIZE as usize + 16 * len + (1 << 20)
}

/// Runs every input of the target's corpus and regressions under the allocation tracker;
/// fails with the names of all inputs that panicked or allocated over the bound.
fn replay(target: &str) {
    let entry = TARGETS.iter().find(|(name, _)| *name == target).expect("known target").1;
    let mut failed = Vec::new();
    let mut count = 0;
    for kind in ["corpus", "regressions"] {
        for path in inputs(kind, target) {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut largest = 0;
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                largest = largest_allocation(|| entry(&data));
            }));
            let bound = allocation_bound(data.len());
            if run.is_err() {
                failed.push(format!("{}: panicked", path.display()));
            } else if largest > bound {
                failed.push(format!("{}: one allocation of {largest} bytes (bound {bound})", path.display()));
            }
            count += 1;
        }
    }
    assert!(failed.is_empty(), "{target}: {} of {count} inputs failed: {failed:#?}", failed.len());
}

#[test]
fn v1_rebuild_corpus_and_regressions() {
    replay("v1_rebuild");
}

#[test]
fn ltx_decode_corpus_and_regressions() {
    replay("ltx_decode");
}

#[test]
fn head_decode_corpus_and_regressions() {
    replay("head_decode");
}

#[test]
fn job_message_corpus_and_regressions() {
    replay("job_message");
}

#[test]
fn every_fuzz_target_is_replayed() {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| p.file_stem().expect("file name").to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut known: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    known.sort();
    assert_eq!(found, known, "fuzz/fuzz_targets and the targets replayed here differ");
}

/// The v1 input format round-trips through its encoder, so the seeds mean what they say.
#[test]
fn v1_input_encoding_round_trips() {
    let input = V1Input {
        recovery: Some(Recovery::CheckpointWal),
        ignore_sidecars: true,
        max_size: FUZZ_MAX_SIZE,
        records: vec![
            V1Record::File(FileTag::Main, vec![1; CHUNK_SIZE + 3]),
            V1Record::Meta(FileTag::Wal, u64::MAX),
            V1Record::RawMeta(FileTag::Journal, vec![9; 3]),
            V1Record::Chunk(FileTag::Shm, u32::MAX, vec![2; CHUNK_SIZE + 1]),
            V1Record::DropChunk(FileTag::Main, 1),
            V1Record::DropMeta(FileTag::Journal),
            V1Record::MalformedChunk(FileTag::Main, vec![0; 5], vec![3]),
            V1Record::MalformedChunk(FileTag::Wal, vec![], vec![]),
            V1Record::Unknown(vec![0xff, 0], vec![4; 7]),
        ],
    };
    assert_eq!(V1Input::parse(&input.encode()), input);
    // Every byte string is an input, including the empty one.
    assert!(V1Input::parse(&[]).records.is_empty());
}

// ---------------------------------------------------------------------------------------------
// The seed corpus
// ---------------------------------------------------------------------------------------------

fn v1(recovery: Option<Recovery>, records: Vec<V1Record>) -> Vec<u8> {
    V1Input { recovery, ignore_sidecars: false, max_size: FUZZ_MAX_SIZE, records }.encode()
}

/// What each seed of the v1 target is rebuilt into (or rejected with), so a seed that stops
/// meaning what its name says is caught when the corpus is generated.
fn expect_v1(name: &str, seed: &[u8], expected: Result<(), DeadLetterReason>) {
    let input = V1Input::parse(seed);
    let actor = ActorId::parse(FUZZ_ACTOR).unwrap();
    let rows = input.rows(&actor).into_iter().collect();
    let got = ferry::v1::read::rebuild_rows(&actor, input.options(), rows).map_err(|e| match e {
        ferry::v1::ReadError::Rejected(r) => r.reason(),
        other => panic!("{name}: {other}"),
    });
    assert_eq!(got.map(|_| ()), expected, "seed {name}");
}

fn seeds_v1() -> Vec<(&'static str, Vec<u8>)> {
    let spec = DbSpec { rows: 3, payload: 16, page_size: 4096, seed: 1 };
    let plain = sqlite::database(&spec).expect("plain database");
    let overflow = sqlite::database(&DbSpec { rows: 1, payload: 5000, ..spec }).expect("overflow database");
    let small_pages = sqlite::database(&DbSpec { page_size: 1024, ..spec }).expect("1 KiB pages");
    let scribbled = sqlite::scribbled(&spec).expect("scribbled database");
    let journal = sqlite::hot_journal(&DbSpec { rows: 2, ..spec }, 2).expect("hot journal");
    let wal = sqlite::wal(&DbSpec { rows: 2, ..spec }, 1).expect("wal");
    let last_chunk = u32::try_from(plain.len().div_ceil(CHUNK_SIZE) - 1).unwrap();
    let mut wrong_version = encode_meta(plain.len() as u64);
    wrong_version[..2].copy_from_slice(&(META_VERSION + 1).to_le_bytes());
    let main = |bytes: &[u8]| V1Record::File(FileTag::Main, bytes.to_vec());
    let tagged = |tag, bytes: &Option<Vec<u8>>| V1Record::File(tag, bytes.clone().expect("sidecar"));
    let seeds = vec![
        ("plain-4-pages", v1(None, vec![main(&plain)]), Ok(())),
        ("overflow-pages", v1(None, vec![main(&overflow)]), Ok(())),
        ("empty-main", v1(None, vec![main(&[])]), Ok(())),
        ("page-size-1024", v1(None, vec![main(&small_pages)]), Ok(())),
        ("scribbled-btree", v1(None, vec![main(&scribbled)]), Ok(())),
        (
            "hot-journal-rollback",
            v1(Some(Recovery::RollbackJournal), vec![main(&journal.main), tagged(FileTag::Journal, &journal.journal)]),
            Ok(()),
        ),
        (
            "wal-shm-checkpoint",
            v1(
                Some(Recovery::CheckpointWal),
                vec![main(&wal.main), tagged(FileTag::Wal, &wal.wal), tagged(FileTag::Shm, &wal.shm)],
            ),
            Ok(()),
        ),
        (
            "missing-last-chunk",
            v1(None, vec![main(&plain), V1Record::DropChunk(FileTag::Main, last_chunk)]),
            Err(DeadLetterReason::ChunkMismatch),
        ),
        (
            "extra-chunk",
            v1(None, vec![main(&plain), V1Record::Chunk(FileTag::Main, last_chunk + 1, vec![0; 8])]),
            Err(DeadLetterReason::ChunkMismatch),
        ),
        (
            "overlong-chunk",
            v1(None, vec![main(&plain), V1Record::Chunk(FileTag::Main, 0, [&plain[..CHUNK_SIZE], &[0]].concat())]),
            Err(DeadLetterReason::ChunkMismatch),
        ),
        (
            "malformed-chunk-key",
            v1(None, vec![main(&small_pages), V1Record::MalformedChunk(FileTag::Main, vec![0; 3], vec![0; 8])]),
            Err(DeadLetterReason::ChunkMismatch),
        ),
        (
            "absurd-meta-size",
            v1(None, vec![main(&small_pages), V1Record::Meta(FileTag::Main, u64::MAX)]),
            Err(DeadLetterReason::Oversize),
        ),
        (
            "meta-wrong-version",
            v1(None, vec![main(&small_pages), V1Record::RawMeta(FileTag::Main, wrong_version.to_vec())]),
            Err(DeadLetterReason::BadMeta),
        ),
        (
            "chunks-without-meta",
            v1(None, vec![main(&small_pages), V1Record::DropMeta(FileTag::Main)]),
            Err(DeadLetterReason::MissingMain),
        ),
        (
            "unknown-key-ignored",
            v1(None, vec![main(&small_pages), V1Record::Unknown(vec![0x02, 0x00], b"actor state".to_vec())]),
            Ok(()),
        ),
    ];
    seeds
        .into_iter()
        .map(|(name, seed, expected)| {
            expect_v1(name, &seed, expected);
            (name, seed)
        })
        .collect()
}

fn seeds_ltx() -> Vec<(&'static str, Vec<u8>)> {
    let db = sqlite::database(&DbSpec { rows: 3, payload: 16, page_size: 4096, seed: 1 }).expect("database");
    let pages: Vec<(u32, &[u8])> = db.chunks(4096).enumerate().map(|(i, p)| (i as u32 + 1, p)).collect();
    let header = |commit: usize| LtxHeader {
        page_size: 4096,
        commit: commit as u32,
        min_txid: 1,
        max_txid: 1,
        timestamp_ms: 1_763_900_000_000,
    };
    let zero = vec![0u8; 4096];
    vec![
        ("empty-commit", ltx::encode(&header(0), &[])),
        ("one-zero-page", ltx::encode(&header(1), &[(1, &zero)])),
        ("sqlite-first-page", ltx::encode(&header(1), &pages[..1])),
        ("sqlite-4-pages", ltx::encode(&header(pages.len()), &pages)),
    ]
}

fn seeds_head() -> Vec<(&'static str, Vec<u8>)> {
    let staging = DBHead::staging(1, 1, 1_763_900_000_000);
    let migrated = DBHead {
        head_txid: 1,
        materialized_txid: 1,
        sqlite_storage_used: 16384,
        origin: Origin::MigratedFromV1,
        ..staging.clone()
    };
    let native = DBHead {
        generation: u64::MAX,
        head_txid: 900,
        next_txid: 901,
        creation_ts_ms: -1,
        origin: Origin::Native,
        ..migrated.clone()
    };
    vec![("staging", staging.encode()), ("migrated", migrated.encode()), ("native", native.encode())]
}

fn seeds_job() -> Vec<(&'static str, Vec<u8>)> {
    let actor = ActorId::parse("a1b2c3").unwrap();
    let mut seeds = vec![
        (
            "contract-example",
            br#"{"version": 1, "campaign": "nov-backfill", "actor_id": "a1b2c3", "enqueued_at_ms": 1763900000000, "recovery": null}"#
                .to_vec(),
        ),
        ("no-recovery", Job::new("nov-backfill", actor.clone(), 1_763_900_000_000, None).encode()),
    ];
    for (name, r) in [
        ("rollback-journal", Recovery::RollbackJournal),
        ("checkpoint-wal", Recovery::CheckpointWal),
        ("discard-shm", Recovery::DiscardShm),
        ("force", Recovery::Force),
    ] {
        seeds.push((name, Job::new("requeue.2025-11_b", actor.clone(), 0, Some(r)).encode()));
    }
    seeds
}

/// Rewrites `fuzz/corpus/<target>/` from real data: SQLite files made by SQLite and laid out
/// as v1 rows, LTX blobs and heads from ferry's encoders, job messages from `Job::encode`.
/// Run: `cargo test -p ferry --test fuzz_regressions -- --ignored generate_seed_corpus`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand when the formats change"]
fn generate_seed_corpus() {
    for (target, seeds) in [
        ("v1_rebuild", seeds_v1()),
        ("ltx_decode", seeds_ltx()),
        ("head_decode", seeds_head()),
        ("job_message", seeds_job()),
    ] {
        let dir = fuzz_dir().join("corpus").join(target);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).expect("clearing the old corpus");
        }
        std::fs::create_dir_all(&dir).expect("corpus directory");
        let entry = TARGETS.iter().find(|(n, _)| *n == target).expect("known target").1;
        for (name, bytes) in seeds {
            entry(&bytes);
            std::fs::write(dir.join(name), bytes).expect("writing a seed");
        }
    }
}

/// Prints what a v1 input holds (options and records, bytes summarized), for triage:
/// `FUZZ_INPUT=path cargo test -p ferry --test fuzz_regressions -- --ignored describe_v1_input --nocapture`.
#[test]
#[ignore = "triage tool: describes the v1 input at $FUZZ_INPUT"]
fn describe_v1_input() {
    let path = std::env::var("FUZZ_INPUT").expect("FUZZ_INPUT names a v1_rebuild input");
    let input = V1Input::parse(&std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")));
    println!("recovery {:?}, ignore_sidecars {}, max_size {}", input.recovery, input.ignore_sidecars, input.max_size);
    for r in &input.records {
        match r {
            V1Record::File(t, b) => println!("File {t:?}: {} bytes", b.len()),
            V1Record::RawMeta(t, b) => println!("RawMeta {t:?}: {b:02x?}"),
            V1Record::Chunk(t, i, b) => println!("Chunk {t:?} {i}: {} bytes", b.len()),
            V1Record::MalformedChunk(t, i, b) => println!("MalformedChunk {t:?} index {i:02x?}: {} bytes", b.len()),
            V1Record::Unknown(k, b) => println!("Unknown 08 ++ {k:02x?}: {} bytes", b.len()),
            other => println!("{other:?}"),
        }
    }
}
