//! SQLite-level checks of a rebuilt main file: the header (magic, page size, alignment) and
//! `PRAGMA quick_check`, run on the bytes in memory.
//!
//! Invariant: the bytes are checked where they lie, without a copy or a temp file: SQLite
//! reads them through `sqlite3_deserialize` with `SQLITE_DESERIALIZE_READONLY`. A header that
//! says WAL mode (bytes 18-19 = 2) is patched to rollback mode for the check and restored
//! before returning, so the bytes migrated are always v1's own.

use rusqlite::{Connection, OpenFlags, ffi};

use super::reject::V1Rejection;
use crate::v2::head::PAGE_SIZE;

/// `SQLite format 3\0`.
pub const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";
/// Bytes a header needs before the page size can be read.
pub const MIN_HEADER_LEN: usize = 18;
/// Header offsets of the write and read format versions (2 means WAL mode).
const FORMAT_VERSION_BYTES: std::ops::Range<usize> = 18..20;
const WAL_FORMAT: u8 = 2;
const LEGACY_FORMAT: u8 = 1;
/// quick_check lines kept in a rejection.
const MAX_REPORTED_PROBLEMS: usize = 5;

/// The page size a header declares (1 means 65536).
pub fn header_page_size(file: &[u8]) -> Result<u32, V1Rejection> {
    if file.len() < MIN_HEADER_LEN {
        return Err(V1Rejection::BadHeader { detail: format!("file is {} bytes, shorter than a header", file.len()) });
    }
    if &file[..16] != SQLITE_MAGIC {
        return Err(V1Rejection::BadHeader { detail: "magic is not \"SQLite format 3\\0\"".into() });
    }
    Ok(match u16::from_be_bytes([file[16], file[17]]) {
        1 => 65536,
        n => u32::from(n),
    })
}

/// The header checks of DESIGN.md section 3 step 4, in order; returns the page count. A
/// zero-length file is valid and has zero pages.
pub fn check_header(file: &[u8]) -> Result<u32, V1Rejection> {
    if file.is_empty() {
        return Ok(0);
    }
    let page_size = header_page_size(file)?;
    if page_size != PAGE_SIZE {
        return Err(V1Rejection::UnsupportedPageSize { page_size });
    }
    if !file.len().is_multiple_of(PAGE_SIZE as usize) {
        return Err(V1Rejection::NotPageAligned { size: file.len() as u64 });
    }
    // A main file is at most the size limit, far below 2^32 pages.
    Ok(u32::try_from(file.len() / PAGE_SIZE as usize).expect("page count fits u32"))
}

/// Runs `PRAGMA quick_check` on the file in memory; blocking (call it off the async threads).
pub fn quick_check(file: &mut [u8]) -> Result<(), V1Rejection> {
    if file.is_empty() {
        return Ok(());
    }
    let wal_mode = file[FORMAT_VERSION_BYTES].contains(&WAL_FORMAT);
    let saved = [file[18], file[19]];
    if wal_mode {
        file[FORMAT_VERSION_BYTES].fill(LEGACY_FORMAT);
    }
    let result = run_quick_check(file);
    file[18] = saved[0];
    file[19] = saved[1];
    result
}

fn run_quick_check(file: &[u8]) -> Result<(), V1Rejection> {
    let failed = |detail: String| V1Rejection::IntegrityCheckFailed { detail };
    let conn =
        Connection::open_with_flags(":memory:", OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| failed(format!("opening an in-memory connection: {e}")))?;
    let size = i64::try_from(file.len()).map_err(|_| failed("file too large".into()))?;
    // SAFETY: with SQLITE_DESERIALIZE_READONLY (and without FREEONCLOSE or RESIZEABLE) SQLite
    // only reads the buffer and never frees it. `conn` is dropped at the end of this function,
    // while `file` is still borrowed, so SQLite never sees the buffer after it moves or dies.
    let rc = unsafe {
        ffi::sqlite3_deserialize(
            conn.handle(),
            c"main".as_ptr(),
            file.as_ptr().cast_mut(),
            size,
            size,
            ffi::SQLITE_DESERIALIZE_READONLY as _,
        )
    };
    if rc != ffi::SQLITE_OK {
        return Err(failed(format!("SQLite refused the image (code {rc})")));
    }
    let lines: Vec<String> = match conn.prepare("PRAGMA quick_check") {
        Ok(mut stmt) => match stmt.query_map([], |r| r.get::<_, String>(0)).and_then(|rows| rows.collect()) {
            Ok(lines) => lines,
            Err(e) => vec![e.to_string()],
        },
        Err(e) => vec![e.to_string()],
    };
    drop(conn);
    if lines.len() == 1 && lines[0] == "ok" {
        return Ok(());
    }
    Err(failed(one_line_report(&lines)))
}

/// A quick_check report as one line: its rows (SQLite puts several lines in one row, e.g.
/// `*** in database main ***\nPage 5: ...`) split into lines, the heading dropped, the first
/// [`MAX_REPORTED_PROBLEMS`] kept, joined with `"; "`. The rejection carries this text into
/// logs, audit records, dead letters and `dlq export`, where one problem is one line.
pub fn one_line_report(rows: &[String]) -> String {
    let lines: Vec<&str> = rows
        .iter()
        .flat_map(|r| r.lines())
        .map(str::trim)
        // The check is always of `main`: SQLite's per-database heading says nothing.
        .filter(|l| !l.is_empty() && !is_database_heading(l))
        .collect();
    let mut detail = lines.iter().take(MAX_REPORTED_PROBLEMS).copied().collect::<Vec<_>>().join("; ");
    if lines.len() > MAX_REPORTED_PROBLEMS {
        detail.push_str(&format!("; and {} more", lines.len() - MAX_REPORTED_PROBLEMS));
    }
    detail
}

/// SQLite's `*** in database main ***` line.
fn is_database_heading(line: &str) -> bool {
    line.starts_with("*** in database ") && line.ends_with(" ***")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::sqlite::{DbSpec, scribbled};

    fn rejection_detail(mut file: Vec<u8>) -> String {
        match quick_check(&mut file) {
            Err(V1Rejection::IntegrityCheckFailed { detail }) => detail,
            other => panic!("expected integrity_check_failed, got {other:?}"),
        }
    }

    #[test]
    fn a_corrupt_database_is_reported_on_one_line() {
        // A real database with a scribbled b-tree page: SQLite reports its twenty broken cells
        // in one row of many lines.
        let detail = rejection_detail(scribbled(&DbSpec::small(17)).unwrap());
        assert!(!detail.contains(['\n', '\r']), "{detail:?}");
        let problems: Vec<&str> = detail.split("; ").collect();
        assert_eq!(problems.len(), MAX_REPORTED_PROBLEMS + 1, "{detail:?}");
        assert!(problems[..MAX_REPORTED_PROBLEMS].iter().all(|p| p.starts_with("Tree ")), "{detail:?}");
        assert!(problems[MAX_REPORTED_PROBLEMS].starts_with("and ") && detail.ends_with(" more"), "{detail:?}");
        let rejection = V1Rejection::IntegrityCheckFailed { detail };
        assert!(!rejection.to_string().contains('\n'));
    }

    #[test]
    fn sqlite_is_built_without_its_global_memory_statistics_or_bulk_page_cache() {
        // Set in .cargo/config.toml (LIBSQLITE3_FLAGS): with the statistics on, every SQLite
        // allocation on every thread takes one process-wide mutex; the bulk page cache costs
        // each quick_check ~90 KB allocated and faulted in.
        let conn = Connection::open_in_memory().unwrap();
        let options: Vec<String> = conn
            .prepare("PRAGMA compile_options")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for wanted in ["DEFAULT_MEMSTATUS=0", "DEFAULT_PCACHE_INITSZ=0"] {
            assert!(options.iter().any(|o| o == wanted), "{wanted} not in {options:?}");
        }
    }

    #[test]
    fn a_report_of_several_rows_of_several_lines_is_one_line() {
        let rows =
            ["*** in database main ***\nPage 5: never used\r\n".to_string(), "row 3 missing from index i".into()];
        assert_eq!(one_line_report(&rows), "Page 5: never used; row 3 missing from index i");
    }
}
