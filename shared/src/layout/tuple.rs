//! rivet's one custom element of the FoundationDB tuple layer: its `Id`, type code `0x40`
//! followed by the 19 id bytes raw (fixed length, so neither escaped nor terminated), exactly
//! as rivet's `util-id` packs it. Everything else in a rivet key (integers, byte strings,
//! strings, nested tuples) is packed by the `foundationdb-tuple` crate, the version rivet pins.
//!
//! Invariant: unpacking accepts only `0x40` ++ a version-1 id; anything else is a `PackError`,
//! never a truncated or shifted id.

use std::io;

use foundationdb_tuple::{PackError, PackResult, TupleDepth, TuplePack, TupleUnpack, VersionstampOffset};

use super::rivet_id::{ID_LEN, RivetId};

/// Type code of a rivet `Id` element (`universaldb::utils::codes::ID`).
pub const ID_CODE: u8 = 0x40;

impl TuplePack for RivetId {
    fn pack<W: io::Write>(&self, w: &mut W, _tuple_depth: TupleDepth) -> io::Result<VersionstampOffset> {
        w.write_all(&[ID_CODE])?;
        w.write_all(self.as_bytes())?;
        Ok(VersionstampOffset::None { size: 1 + ID_LEN as u32 })
    }
}

impl<'de> TupleUnpack<'de> for RivetId {
    fn unpack(input: &'de [u8], _tuple_depth: TupleDepth) -> PackResult<(&'de [u8], Self)> {
        let (&code, rest) = input.split_first().ok_or(PackError::MissingBytes)?;
        if code != ID_CODE {
            return Err(PackError::BadCode { found: code, expected: Some(ID_CODE) });
        }
        if rest.len() < ID_LEN {
            return Err(PackError::MissingBytes);
        }
        let (id, rest) = rest.split_at(ID_LEN);
        let id = RivetId::from_bytes(id).map_err(|e| PackError::Message(e.to_string().into()))?;
        Ok((rest, id))
    }
}
