//! The v2 side: the head record, the key layout, the LTX blob codec, and the reader that
//! rebuilds a database from v2. The writer (staged commit) is `migrate`'s, the only code that
//! writes v2.

pub mod head;
pub mod keys;
pub mod ltx;
pub mod quota;
pub mod read;

pub use self::head::{DBHead, Origin};
pub use self::read::{V2Database, V2ReadError, read_v2};
