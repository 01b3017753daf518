//! `ferry-producer import` loads real SQLite files, sidecars included, into the v1 layout, one
//! actor per file named after it, and refuses file names that are not actor ids.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use ferry::ActorId;
use ferry::synth::sqlite::{DbSpec, database, hot_journal};
use ferry::v1::keys::{FileTag, chunk_range, meta_key};
use ferry::v1::{ReadOptions, read_v1};
use ferry_tests::bin;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_lays_out_files_and_sidecars_and_skips_bad_names() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let files = dir.path().join("dbs");
    std::fs::create_dir(&files)?;
    let plain = database(&DbSpec::small(3)).map_err(anyhow::Error::msg)?;
    std::fs::write(files.join("plain-1.db"), &plain)?;
    let crashed = hot_journal(&DbSpec::small(4), 50).map_err(anyhow::Error::msg)?;
    std::fs::write(files.join("crashed.db"), &crashed.main)?;
    std::fs::write(files.join("crashed.db-journal"), crashed.journal.as_ref().context("journal")?)?;
    std::fs::write(files.join("bad name.db"), &plain)?;
    let store_url = format!("sqlite:{}", dir.path().join("ferry.db").display());

    let out =
        Command::new(bin("ferry-producer")).args(["import", "--store", &store_url, "--json"]).arg(&files).output()?;
    // One file was refused: the command says so with its exit code (5: partial; 2 is a
    // usage error).
    ensure!(out.status.code() == Some(5), "exit {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let refused: Vec<_> = report.as_array().context("array")?.iter().filter(|r| !r["error"].is_null()).collect();
    assert_eq!(refused.len(), 1);
    assert!(refused[0]["path"].as_str().unwrap_or("").ends_with("bad name.db"));

    let store = ferry::store::open(&store_url, 1).await?;
    let plain_actor = ActorId::parse("plain-1")?;
    assert_eq!(read_v1(&*store, &plain_actor, ReadOptions::default()).await?.main, plain);
    let crashed_actor = ActorId::parse("crashed")?;
    assert!(store.get(&meta_key(&crashed_actor, FileTag::Journal)).await?.is_some(), "journal meta");
    assert!(store.first_key(&chunk_range(&crashed_actor, FileTag::Journal)).await?.is_some(), "journal chunks");
    let opts = ReadOptions { recovery: Some(ferry::Recovery::RollbackJournal), ..ReadOptions::default() };
    let image = read_v1(&*store, &crashed_actor, opts).await?;
    assert_eq!(image.main, crashed.main);
    assert_eq!(image.sidecar.map(|(_, b)| b), crashed.journal);
    Ok(())
}
