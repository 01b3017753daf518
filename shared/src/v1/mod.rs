//! The v1 side: the key layout, the reader that rebuilds files from chunks, the SQLite-level
//! checks, the rejection reasons, and the recoveries. Read-only for ferry.

pub mod check;
pub mod keys;
pub mod read;
pub mod recover;
pub mod reject;

pub use self::keys::FileTag;
pub use self::read::{ReadError, ReadOptions, V1Files, V1Image, read_v1};
pub use self::reject::V1Rejection;
