//! `ferry-producer import`: loads real SQLite files (with their `-journal`, `-wal` and `-shm`
//! sidecars) from a directory into the v1 layout, one actor per file.
//!
//! The actor id comes from the file name without its extension. In the rivet layout a name
//! that is a rivet id (30 base36 digits, as a file exported from a rivet actor is named) keeps
//! it; any other file gets a fresh rivet id of a random UUID, reported with the file
//! (`assigned`), so the operator has the mapping. Such a file imported twice is two actors.
//!
//! Invariant: in the ferry layout a file whose name is not a valid actor id is reported and
//! skipped, never written under a key of its own making.

use std::path::{Path, PathBuf};

use crate::actor::ActorId;
use crate::layout::{Layout, RivetId};
use crate::store::Store;
use crate::synth::keyspace::rivet_id_of_random;
use crate::synth::{DbFiles, write_v1};

const SIDECARS: [&str; 3] = ["-journal", "-wal", "-shm"];

/// One file's import.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Imported {
    pub path: PathBuf,
    pub actor: Option<String>,
    /// Rivet layout: the actor's id in its UUID form (`RivetId::uuid_display`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rivet_uuid: Option<String>,
    /// Rivet layout: the id was assigned (the file name is not a rivet id).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub assigned: bool,
    pub bytes: u64,
    pub sidecars: Vec<String>,
    pub error: Option<String>,
}

/// The actor a file is imported as, and whether its id was assigned rather than named.
fn actor_for(path: &Path, layout: Layout) -> Result<(ActorId, bool), String> {
    let stem = path.file_stem().and_then(|s| s.to_str());
    match layout {
        Layout::Ferry => {
            let stem = stem.ok_or("file name is not UTF-8")?;
            Ok((ActorId::parse(stem).map_err(|e| e.to_string())?, false))
        }
        Layout::Rivet => match stem.map(RivetId::parse) {
            Some(Ok(id)) => Ok((id.to_actor(), false)),
            _ => Ok((rivet_id_of_random(rand::random()).to_actor(), true)),
        },
    }
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
        let mut rec = Imported {
            path: path.clone(),
            actor: None,
            rivet_uuid: None,
            assigned: false,
            bytes: 0,
            sidecars: vec![],
            error: None,
        };
        match actor_for(&path, store.layout()) {
            Err(e) => rec.error = Some(e),
            Ok((actor, assigned)) => {
                rec.actor = Some(actor.to_string());
                rec.rivet_uuid = RivetId::from_actor(&actor)
                    .ok()
                    .filter(|_| store.layout() == Layout::Rivet)
                    .map(|id| id.uuid_display());
                rec.assigned = assigned;
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
