//! `sqlite_storage_used`, counted as rivet's sqlite-storage quota counts it: the sum, over an
//! actor's META, DELTA, PIDX and SHARD entries, of the logical key length plus the logical value
//! length, META's own encoded length included.
//!
//! Invariant: the head written is a fixed point: its `sqlite_storage_used` counts the META entry
//! exactly as encoded with that very number (a number one digit longer does not change a
//! fixed-width field, so the loop ends after one or two rounds).

use crate::actor::ActorId;
use crate::layout::Layout;

use super::head::DBHead;
use super::keys as v2keys;

/// What one tracked entry (a DELTA slice, a PIDX row, a SHARD) adds to the usage: its key as
/// the layout counts it (rivet: `02 {actor}/...`) plus its logical value.
pub fn entry_size(layout: Layout, key: &[u8], value: &[u8]) -> u64 {
    layout.quota_key_len(key) + value.len() as u64
}

/// What the PIDX rows of a database of `pages` pages add to the usage.
pub fn pidx_usage(layout: Layout, actor: &ActorId, pages: u32) -> u64 {
    // Every PIDX key has the same length; its value is a u64 txid.
    let row = entry_size(layout, &v2keys::pidx(actor, 0), &0u64.to_be_bytes());
    row * u64::from(pages)
}

/// `head` with `sqlite_storage_used` set to `usage_without_meta` plus META's own key and encoded
/// value, and its encoding.
pub fn with_usage(layout: Layout, actor: &ActorId, head: &DBHead, usage_without_meta: u64) -> (DBHead, Vec<u8>) {
    let meta_key_len = layout.quota_key_len(&v2keys::meta(actor));
    let mut total = usage_without_meta;
    loop {
        let head = DBHead { sqlite_storage_used: total, ..head.clone() };
        let encoded = head.encode();
        let next = usage_without_meta + meta_key_len + encoded.len() as u64;
        if next == total {
            return (head, encoded);
        }
        total = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v2::head::Origin;

    #[test]
    fn usage_counts_meta_key_and_its_own_encoding() {
        let actor = ActorId::parse("quota-actor").unwrap();
        let head = DBHead { origin: Origin::MigratedFromV1, ..DBHead::staging(3, 7, 0) };
        let (head, encoded) = with_usage(Layout::Ferry, &actor, &head, 1_024);
        assert_eq!(encoded, head.encode());
        assert_eq!(head.sqlite_storage_used, 1_024 + v2keys::meta(&actor).len() as u64 + encoded.len() as u64);
    }

    #[test]
    fn pidx_rows_count_key_and_eight_byte_value() {
        let actor = ActorId::parse("quota-actor").unwrap();
        assert_eq!(pidx_usage(Layout::Ferry, &actor, 3), 3 * (v2keys::pidx(&actor, 1).len() as u64 + 8));
        assert_eq!(pidx_usage(Layout::Ferry, &actor, 0), 0);
    }
}
