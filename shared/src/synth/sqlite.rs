//! Real SQLite files for the generator, the benchmarks and the tests, made by SQLite itself
//! (rusqlite) in a private temporary directory: plain databases with tables, indexes and
//! overflow pages; hot journals from write transactions caught in flight; WAL and SHM files
//! with committed rows only in the WAL; other page sizes; scribbled b-tree pages. Nothing
//! here hand-crafts "SQLite-looking" bytes.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

/// Serializes the builders that depend on SQLite's process-wide PRNG (journal nonces, WAL
/// salts), so a seeded PRNG gives the same bytes every time.
static PRNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Seeds SQLite's PRNG: journal nonces and WAL salts come from it, and the generator promises
/// the same keyspace for the same seed.
fn seed_sqlite_prng(seed: u64) {
    // SAFETY: SQLITE_TESTCTRL_PRNG_SEED takes an int and a (null) connection pointer; it only
    // resets SQLite's internal PRNG state.
    unsafe {
        rusqlite::ffi::sqlite3_test_control(
            rusqlite::ffi::SQLITE_TESTCTRL_PRNG_SEED,
            (seed as u32 as i32) | 1,
            std::ptr::null_mut::<rusqlite::ffi::sqlite3>(),
        );
    }
}

/// What goes into a database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DbSpec {
    /// Rows in the `items` table.
    pub rows: u32,
    /// Bytes of the blob column per row (over ~4 KiB makes overflow pages).
    pub payload: u32,
    /// Page size (4096 unless a test wants an unsupported one).
    pub page_size: u32,
    /// Seeds the row contents.
    pub seed: u64,
}

impl DbSpec {
    pub fn small(seed: u64) -> DbSpec {
        DbSpec { rows: 20, payload: 64, page_size: 4096, seed }
    }

    /// Rows enough for about `bytes` of file.
    pub fn sized(bytes: u64, seed: u64) -> DbSpec {
        let payload = 3000u32;
        DbSpec { rows: (bytes / u64::from(payload + 200)).max(1) as u32, payload, page_size: 4096, seed }
    }
}

/// The files of one database as they lie on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DbFiles {
    pub main: Vec<u8>,
    pub journal: Option<Vec<u8>>,
    pub wal: Option<Vec<u8>>,
    pub shm: Option<Vec<u8>>,
}

/// A failure to make a fixture (a bug or a full disk, never an input problem).
pub type SynthResult<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

struct Scratch {
    _dir: tempfile::TempDir,
    db: PathBuf,
}

impl Scratch {
    fn new() -> SynthResult<Scratch> {
        let dir = tempfile::Builder::new().prefix("ferry-synth-").tempdir().map_err(err("tempdir"))?;
        let db = dir.path().join("db");
        Ok(Scratch { _dir: dir, db })
    }

    fn sidecar(&self, suffix: &str) -> PathBuf {
        PathBuf::from(format!("{}{suffix}", self.db.display()))
    }

    fn read_files(&self) -> SynthResult<DbFiles> {
        let opt = |p: &Path| std::fs::read(p).ok();
        Ok(DbFiles {
            main: std::fs::read(&self.db).map_err(err("reading main"))?,
            journal: opt(&self.sidecar("-journal")),
            wal: opt(&self.sidecar("-wal")),
            shm: opt(&self.sidecar("-shm")),
        })
    }
}

/// A deterministic byte pattern for row contents (xorshift; cheap and spread enough that LZ4
/// sees realistic, partly compressible data).
fn payload(seed: u64, row: u32, len: u32) -> Vec<u8> {
    let mut x = seed ^ (u64::from(row) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|i| {
            if i % 4 == 3 {
                return b' ';
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

fn create_schema(conn: &Connection, spec: &DbSpec) -> SynthResult<()> {
    conn.pragma_update(None, "page_size", spec.page_size).map_err(err("page_size"))?;
    conn.execute_batch(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, score REAL, body BLOB);
         CREATE INDEX items_name ON items(name);
         CREATE TABLE tags (item_id INTEGER REFERENCES items(id), tag TEXT, PRIMARY KEY (item_id, tag)) WITHOUT ROWID;",
    )
    .map_err(err("schema"))
}

fn insert_rows(conn: &Connection, spec: &DbSpec, from: u32, to: u32) -> SynthResult<()> {
    let mut item = conn
        .prepare_cached("INSERT INTO items (id, name, score, body) VALUES (?1, ?2, ?3, ?4)")
        .map_err(err("prepare"))?;
    let mut tag = conn.prepare_cached("INSERT INTO tags (item_id, tag) VALUES (?1, ?2)").map_err(err("prepare"))?;
    for row in from..to {
        let name = format!("item-{:08x}-{row}", spec.seed.wrapping_mul(u64::from(row) + 1) & 0xffff_ffff);
        item.execute(params![row, name, f64::from(row) * 0.5, payload(spec.seed, row, spec.payload)])
            .map_err(err("insert item"))?;
        tag.execute(params![row, format!("t{}", row % 7)]).map_err(err("insert tag"))?;
    }
    Ok(())
}

/// A plain database in rollback-journal mode, closed cleanly (no sidecars).
pub fn database(spec: &DbSpec) -> SynthResult<Vec<u8>> {
    let s = Scratch::new()?;
    {
        let conn = Connection::open(&s.db).map_err(err("open"))?;
        create_schema(&conn, spec)?;
        conn.execute_batch("BEGIN").map_err(err("begin"))?;
        insert_rows(&conn, spec, 0, spec.rows)?;
        conn.execute_batch("COMMIT").map_err(err("commit"))?;
    }
    Ok(s.read_files()?.main)
}

/// A hot journal: the files as a crash leaves them in the middle of a write transaction.
/// The cache is kept tiny so SQLite spills uncommitted pages into the main file before
/// commit; the journal holds the originals. `committed` rows are committed, `uncommitted`
/// more are in flight.
pub fn hot_journal(spec: &DbSpec, uncommitted: u32) -> SynthResult<DbFiles> {
    let _prng = PRNG.lock().unwrap_or_else(|p| p.into_inner());
    seed_sqlite_prng(spec.seed);
    let s = Scratch::new()?;
    let conn = Connection::open(&s.db).map_err(err("open"))?;
    create_schema(&conn, spec)?;
    conn.execute_batch("BEGIN").map_err(err("begin"))?;
    insert_rows(&conn, spec, 0, spec.rows)?;
    conn.execute_batch("COMMIT").map_err(err("commit"))?;
    conn.execute_batch("PRAGMA cache_size = 2; BEGIN").map_err(err("begin in-flight"))?;
    insert_rows(&conn, spec, spec.rows, spec.rows + uncommitted)?;
    conn.execute("UPDATE items SET name = 'overwritten-' || id WHERE id < ?1", [spec.rows / 2])
        .map_err(err("update in flight"))?;
    // Snapshot the files while the transaction is open: exactly what a crash leaves.
    let files = s.read_files()?;
    drop(conn);
    if files.journal.as_ref().is_none_or(|j| j.is_empty()) {
        return Err("SQLite did not leave a journal for the in-flight transaction".into());
    }
    Ok(files)
}

/// A WAL-mode database whose last `in_wal` rows are committed only in the WAL (never
/// checkpointed), with its SHM file, as a crash leaves them.
pub fn wal(spec: &DbSpec, in_wal: u32) -> SynthResult<DbFiles> {
    let _prng = PRNG.lock().unwrap_or_else(|p| p.into_inner());
    seed_sqlite_prng(spec.seed);
    let s = Scratch::new()?;
    let conn = Connection::open(&s.db).map_err(err("open"))?;
    create_schema(&conn, spec)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(err("wal mode"))?;
    if mode != "wal" {
        return Err(format!("journal_mode is {mode}, not wal"));
    }
    conn.execute_batch("BEGIN").map_err(err("begin"))?;
    insert_rows(&conn, spec, 0, spec.rows)?;
    conn.execute_batch("COMMIT; PRAGMA wal_checkpoint(TRUNCATE); PRAGMA wal_autocheckpoint = 0;")
        .map_err(err("checkpoint"))?;
    conn.execute_batch("BEGIN").map_err(err("begin"))?;
    insert_rows(&conn, spec, spec.rows, spec.rows + in_wal)?;
    conn.execute_batch("COMMIT").map_err(err("commit"))?;
    let files = s.read_files()?;
    drop(conn);
    Ok(files)
}

/// A valid database with one b-tree page scribbled over, so quick_check fails while the
/// header stays good.
pub fn scribbled(spec: &DbSpec) -> SynthResult<Vec<u8>> {
    let mut main = database(spec)?;
    let page = spec.page_size as usize;
    let victim = 2usize.min(main.len() / page - 1);
    let start = victim * page;
    // Keep the page type byte, break the cell pointers and cell content.
    for (i, b) in main[start + 8..start + page].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(151).wrapping_add(7);
    }
    Ok(main)
}

/// Rows of the `items` table, by reading a database file with SQLite (for tests).
pub fn item_count(main: &[u8]) -> SynthResult<i64> {
    let s = Scratch::new()?;
    std::fs::write(&s.db, main).map_err(err("write"))?;
    let conn = Connection::open(&s.db).map_err(err("open"))?;
    conn.query_row("SELECT count(*) FROM items", [], |r| r.get(0)).map_err(err("count"))
}

/// `PRAGMA integrity_check` of a database file (for tests and verification).
pub fn integrity_check(main: &[u8]) -> SynthResult<String> {
    let s = Scratch::new()?;
    std::fs::write(&s.db, main).map_err(err("write"))?;
    let conn = Connection::open(&s.db).map_err(err("open"))?;
    let lines: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
        .map_err(err("integrity_check"))?;
    Ok(lines.join("; "))
}

/// The main file of a WAL database with its WAL left out, plus its SHM: an actor whose only
/// sidecar is the SHM index.
pub fn checkpointed_main(files: &DbFiles) -> SynthResult<DbFiles> {
    Ok(DbFiles { main: files.main.clone(), journal: None, wal: None, shm: files.shm.clone() })
}
