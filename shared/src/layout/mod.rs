//! Layouts (DESIGN.md section 7): how the logical keyspace of section 2 maps onto physical
//! rows. The `ferry` layout is the identity and needs no code; this module holds the codec of
//! rivet's own layout, byte for byte as rivet's engine writes it at commit c1976e3: its actor
//! id, its tuple element, and the v1 (pegboard actor KV) and v2 (sqlite-storage) rows.
//!
//! Everything here is pure (no store, no I/O), so the codec is tested against fixed bytes.

pub mod rivet;
pub mod rivet_id;
pub mod tuple;

pub use rivet_id::{RivetId, RivetIdError};
