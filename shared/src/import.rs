//! `ferry-producer import`: loads real SQLite files (with their `-journal`, `-wal` and `-shm`
//! sidecars) from a directory into the v1 layout, one actor per file, the actor id from the
//! file name without its extension.
//!
//! Invariant: a file whose name is not a valid actor id is reported and skipped, never
//! written under a key of its own making.

use std::path::{Path, PathBuf};

use crate::actor::ActorId;
use crate::store::Store;
use crate::synth::{DbFiles, write_v1};

const SIDECARS: [&str; 3] = ["-journal", "-wal", "-shm"];

/// One file's import.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Imported {
    pub path: PathBuf,
    pub actor: Option<String>,
    pub bytes: u64,
    pub sidecars: Vec<String>,
    pub error: Option<String>,
}

fn actor_for(path: &Path) -> Result<ActorId, String> {
    let stem = path.file_stem().and_then(|s| s.to_str()).ok_or("file name is not UTF-8")?;
    ActorId::parse(stem).map_err(|e| e.to_string())
}

fn read_files(main: &Path) -> Result<(DbFiles, Vec<String>), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut files = DbFiles { main: read(main)?, ..DbFiles::default() };
    let mut found = Vec::new();
    for suffix in SIDECARS {
        let p = PathBuf::from(format!("{}{suffix}", main.display()));
        if p.exists() {
            let bytes = read(&p)?;
            match suffix {
                "-journal" => files.journal = Some(bytes),
                "-wal" => files.wal = Some(bytes),
                _ => files.shm = Some(bytes),
            }
            found.push(suffix.trim_start_matches('-').to_string());
        }
    }
    Ok((files, found))
}

/// Imports every main file of `dir` (sidecars ride along with their main file).
pub async fn import_dir(store: &dyn Store, dir: &Path) -> Result<Vec<Imported>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| !SIDECARS.iter().any(|s| p.to_string_lossy().ends_with(s)))
        .collect();
    paths.sort();
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let mut rec = Imported { path: path.clone(), actor: None, bytes: 0, sidecars: vec![], error: None };
        match actor_for(&path) {
            Err(e) => rec.error = Some(e),
            Ok(actor) => {
                rec.actor = Some(actor.to_string());
                match read_files(&path) {
                    Err(e) => rec.error = Some(e),
                    Ok((files, sidecars)) => {
                        rec.bytes = files.main.len() as u64;
                        rec.sidecars = sidecars;
                        if let Err(e) = write_v1(store, &actor, &files).await {
                            rec.error = Some(e.to_string());
                        }
                    }
                }
            }
        }
        out.push(rec);
    }
    Ok(out)
}
