//! ferry's own records (`ferry/lease/`, `ferry/audit/`, `ferry/campaign/`, `ferry/dead/`) and
//! the top-level prefixes of the keyspace (DESIGN.md section 2). v1 and v2 keys live with their
//! formats, in `v1::keys` and `v2::keys`.

use crate::actor::ActorId;

pub const V1_PREFIX: &[u8] = b"v1/";
pub const V2_PREFIX: &[u8] = b"v2/";
pub const LEASE_PREFIX: &[u8] = b"ferry/lease/";
pub const AUDIT_PREFIX: &[u8] = b"ferry/audit/";
pub const CAMPAIGN_PREFIX: &[u8] = b"ferry/campaign/";
pub const DEAD_PREFIX: &[u8] = b"ferry/dead/";

fn join(prefix: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + tail.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(tail);
    k
}

pub fn lease(actor: &ActorId) -> Vec<u8> {
    join(LEASE_PREFIX, actor.as_bytes())
}

pub fn audit(actor: &ActorId) -> Vec<u8> {
    join(AUDIT_PREFIX, actor.as_bytes())
}

pub fn dead(actor: &ActorId) -> Vec<u8> {
    join(DEAD_PREFIX, actor.as_bytes())
}

pub fn campaign(name: &str) -> Vec<u8> {
    join(CAMPAIGN_PREFIX, name.as_bytes())
}

/// A key as text for logs: printable ASCII kept, other bytes as `\xNN`.
pub fn printable(key: &[u8]) -> String {
    key.iter()
        .flat_map(|&b| if b.is_ascii_graphic() { vec![b as char] } else { format!("\\x{b:02x}").chars().collect() })
        .collect()
}
