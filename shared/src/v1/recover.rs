//! Recoveries that rebuild a main file from v1 bytes with SQLite's own logic (DESIGN.md
//! section 3): `rollback_journal` lets SQLite roll a hot journal back, `checkpoint_wal`
//! replays the WAL's committed frames. Both run on copies in a private temporary directory
//! (mode 0700, removed afterwards); v1 itself is never modified. Blocking: call off the async
//! threads.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::keys::FileTag;
use super::reject::V1Rejection;

/// Applies the recovery that `sidecar` calls for and returns the recovered main file.
pub fn recover(main: &[u8], sidecar: FileTag, bytes: &[u8]) -> Result<Vec<u8>, V1Rejection> {
    let (suffix, name) = match sidecar {
        FileTag::Journal => ("-journal", "rollback_journal"),
        FileTag::Wal => ("-wal", "checkpoint_wal"),
        // The reader only hands over a journal or a WAL.
        FileTag::Main | FileTag::Shm => {
            unreachable!("no recovery replays a {} file", sidecar.name())
        }
    };
    run(main, suffix, bytes, sidecar == FileTag::Wal).map_err(|detail| V1Rejection::IntegrityCheckFailed {
        detail: format!("{name} could not recover the database: {detail}"),
    })
}

fn run(main: &[u8], suffix: &str, sidecar: &[u8], checkpoint: bool) -> Result<Vec<u8>, String> {
    let dir = tempfile::Builder::new().prefix("ferry-recover-").tempdir().map_err(|e| e.to_string())?;
    let db = dir.path().join("db");
    write(&db, main)?;
    write(&dir.path().join(format!("db{suffix}")), sidecar)?;
    {
        let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(|e| e.to_string())?;
        // The first read takes a shared lock, finds the hot journal (or the WAL) and recovers.
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get::<_, i64>(0)).map_err(|e| e.to_string())?;
        if checkpoint {
            let (busy, _, _): (i64, i64, i64) = conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(|e| e.to_string())?;
            if busy != 0 {
                return Err("the WAL checkpoint could not complete".into());
            }
        }
    }
    std::fs::read(&db).map_err(|e| format!("reading the recovered file: {e}"))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}
