//! `ferry-producer scan`: a census of the keyspace before a campaign, without the broker: the
//! actors with v1 data, their sizes, and the predicted outcome of each.
//!
//! Predictions come from what is cheap to read: the metas, the first chunk (header, page size)
//! and the v2 head. `chunk_mismatch` and `integrity_check_failed` need the whole file and show
//! only at migration; the census says so in its output rather than reading every chunk.

use std::collections::BTreeMap;

use crate::actor::ActorId;
use crate::scan::ActorScan;
use crate::store::{Store, StoreError};
use crate::v1::FileTag;
use crate::v1::check::{MIN_HEADER_LEN, header_page_size};
use crate::v1::keys::{CHUNK_SIZE, chunk_key};
use crate::v1::read::{DEFAULT_MAX_SIZE, Probe, has_sqlite_data};
use crate::v2::head::{DBHead, Origin, PAGE_SIZE};

/// Size buckets of the histogram (upper bounds, bytes).
pub const SIZE_BUCKETS: [(u64, &str); 7] = [
    (16 << 10, "<=16KiB"),
    (64 << 10, "<=64KiB"),
    (1 << 20, "<=1MiB"),
    (16 << 20, "<=16MiB"),
    (64 << 20, "<=64MiB"),
    (128 << 20, "<=128MiB"),
    (u64::MAX, ">128MiB"),
];

/// The census of a keyspace.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Census {
    pub actors: u64,
    pub with_v1_sqlite: u64,
    pub invalid_actor_ids: u64,
    pub total_v1_bytes: u64,
    pub largest: Option<(String, u64)>,
    pub size_histogram: BTreeMap<String, u64>,
    /// Predicted outcome (`migrate`, `skipped_*`, `in_progress`) or dead-letter reason.
    pub predicted: BTreeMap<String, u64>,
    /// v1 bytes by predicted outcome.
    pub predicted_bytes: BTreeMap<String, u64>,
    pub note: &'static str,
}

fn bucket(size: u64) -> &'static str {
    SIZE_BUCKETS.iter().find(|(max, _)| size <= *max).map_or(">128MiB", |(_, name)| name)
}

/// Predicts one actor's outcome and reports its main file size.
pub async fn predict(store: &dyn Store, actor: &ActorId, max_size: u64) -> Result<(&'static str, u64), StoreError> {
    if !has_sqlite_data(store, actor).await? {
        return Ok(("skipped_no_v1", 0));
    }
    let probe = Probe::run(store, actor).await?;
    let size = probe.files().main.unwrap_or(0);
    if let Some(raw) = store.get(&crate::v2::keys::meta(actor)).await? {
        match DBHead::decode(&raw).map(|h| h.origin) {
            Ok(Origin::Native) => return Ok(("skipped_native_v2", size)),
            Ok(Origin::MigratedFromV1) => return Ok(("skipped_already_migrated", size)),
            Ok(Origin::MigratingFromV1) => return Ok(("in_progress", size)),
            Err(_) => return Ok(("corrupt_v2_meta", size)),
        }
    }
    if let Some(r) = probe.sidecar_rejection(None) {
        return Ok((r.reason().as_str(), size));
    }
    if let Err(r) = probe.main_size_checked(max_size) {
        return Ok((r.reason().as_str(), size));
    }
    if size == 0 {
        return Ok(("migrate", 0));
    }
    let first = store.get(&chunk_key(actor, FileTag::Main, 0)).await?.unwrap_or_default();
    let head_len = (size as usize).min(CHUNK_SIZE).min(first.len());
    if head_len < MIN_HEADER_LEN.min(size as usize) {
        return Ok(("chunk_mismatch", size));
    }
    match header_page_size(&first[..head_len]) {
        Err(r) => Ok((r.reason().as_str(), size)),
        Ok(ps) if ps != PAGE_SIZE => Ok(("unsupported_page_size", size)),
        Ok(_) if !size.is_multiple_of(u64::from(PAGE_SIZE)) => Ok(("not_page_aligned", size)),
        Ok(_) => Ok(("migrate", size)),
    }
}

/// Runs the census over every actor (or those whose id starts with `prefix`).
pub async fn census(store: &dyn Store, prefix: Option<&str>, mut progress: impl FnMut()) -> Result<Census, StoreError> {
    let mut c = Census {
        note: "predictions read metas, the first chunk and the v2 head; chunk_mismatch and \
               integrity_check_failed show only at migration",
        ..Census::default()
    };
    let mut scan = match prefix {
        Some(p) => ActorScan::with_prefix(store, p, None),
        None => ActorScan::new(store, None),
    };
    while let Some(found) = scan.next().await? {
        c.actors += 1;
        progress();
        let Ok(actor) = found.id else {
            c.invalid_actor_ids += 1;
            continue;
        };
        let (outcome, size) = predict(store, &actor, DEFAULT_MAX_SIZE).await?;
        *c.predicted.entry(outcome.into()).or_default() += 1;
        *c.predicted_bytes.entry(outcome.into()).or_default() += size;
        if outcome == "skipped_no_v1" {
            continue;
        }
        c.with_v1_sqlite += 1;
        c.total_v1_bytes += size;
        *c.size_histogram.entry(bucket(size).into()).or_default() += 1;
        if c.largest.as_ref().is_none_or(|(_, s)| size > *s) {
            c.largest = Some((actor.to_string(), size));
        }
    }
    Ok(c)
}
