//! rivet's actor id (`Id` in rivet's `util-id`, DESIGN.md section 7): 19 bytes = version `01`
//! ++ a 16-byte UUID ++ a u16 BE datacenter label.
//!
//! Its string form, the `{actor}` of jobs, audits and v2 keys under `--layout rivet`, is the 19
//! bytes read as one little-endian number (byte 0, the version, least significant) written in
//! 30 base36 digits `[0-9a-z]`, least significant digit first. Upper case is accepted on input;
//! output is always lower case, so `parse(s).to_string()` is `s` lower-cased.
//!
//! Invariant: a `RivetId` always holds version 1; every 19-byte array with version 1 has
//! exactly one 30-digit string and back (36^30 > 2^152, and a string whose number does not
//! fit in 19 bytes is rejected).

use std::fmt;

use foundationdb_tuple::Uuid;

use crate::actor::ActorId;

/// Bytes in the binary form.
pub const ID_LEN: usize = 19;
/// Characters in the string form.
pub const ID_STRING_LEN: usize = 30;
/// The only id version rivet defines.
pub const ID_VERSION: u8 = 1;

const BASE: u32 = 36;

/// A rivet actor id (version 1).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RivetId([u8; ID_LEN]);

/// Why bytes or a string are not a rivet id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RivetIdError {
    #[error("rivet id is {got} bytes, expected {ID_LEN}")]
    BadLength { got: usize },
    #[error("rivet id string is {got} bytes, expected {ID_STRING_LEN}")]
    BadStringLength { got: usize },
    #[error("rivet id string has {found:?} at byte {index}, outside base36 [0-9a-zA-Z]")]
    BadChar { index: usize, found: char },
    #[error("rivet id string is a number too large for {ID_LEN} bytes")]
    Overflow,
    #[error("rivet id version {0}, only version {ID_VERSION} exists")]
    UnsupportedVersion(u8),
}

impl RivetId {
    /// The id of `uuid` in datacenter `label`.
    pub fn new(uuid: Uuid, label: u16) -> RivetId {
        let mut b = [0u8; ID_LEN];
        b[0] = ID_VERSION;
        b[1..17].copy_from_slice(uuid.as_bytes());
        b[17..].copy_from_slice(&label.to_be_bytes());
        RivetId(b)
    }

    /// From the 19-byte binary form (v1 rows).
    pub fn from_bytes(bytes: &[u8]) -> Result<RivetId, RivetIdError> {
        let b: [u8; ID_LEN] = bytes.try_into().map_err(|_| RivetIdError::BadLength { got: bytes.len() })?;
        Self::from_array(b)
    }

    fn from_array(b: [u8; ID_LEN]) -> Result<RivetId, RivetIdError> {
        if b[0] != ID_VERSION {
            return Err(RivetIdError::UnsupportedVersion(b[0]));
        }
        Ok(RivetId(b))
    }

    /// From the 30-character string form (jobs, audits, v2 rows).
    pub fn parse(s: &str) -> Result<RivetId, RivetIdError> {
        let s = s.as_bytes();
        if s.len() != ID_STRING_LEN {
            return Err(RivetIdError::BadStringLength { got: s.len() });
        }
        // Horner's rule from the most significant digit (the last character) down, on a
        // little-endian byte number.
        let mut n = [0u8; ID_LEN];
        for (index, &c) in s.iter().enumerate().rev() {
            let mut carry = digit_value(c).ok_or(RivetIdError::BadChar { index, found: char::from(c) })?;
            for byte in n.iter_mut() {
                let v = u32::from(*byte) * BASE + carry;
                *byte = (v & 0xff) as u8;
                carry = v >> 8;
            }
            if carry != 0 {
                return Err(RivetIdError::Overflow);
            }
        }
        Self::from_array(n)
    }

    /// The id of a validated ferry actor id (its string form).
    pub fn from_actor(actor: &ActorId) -> Result<RivetId, RivetIdError> {
        Self::parse(actor.as_str())
    }

    /// The ferry actor id that names this id (its string form; always a valid `ActorId`).
    pub fn to_actor(&self) -> ActorId {
        // 30 characters of [0-9a-z] is inside ActorId's 1-64 bytes of [A-Za-z0-9_-].
        ActorId::parse(&self.to_string()).expect("a rivet id string is a valid actor id")
    }

    /// The 19-byte binary form.
    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }

    pub fn uuid(&self) -> Uuid {
        // Bytes 1..17 are exactly 16 bytes.
        Uuid::from_bytes(self.0[1..17].try_into().expect("16 bytes"))
    }

    /// The datacenter label.
    pub fn label(&self) -> u16 {
        u16::from_be_bytes([self.0[17], self.0[18]])
    }

    /// `{uuid}@{label}`, for operators who know the actor by its UUID.
    pub fn uuid_display(&self) -> String {
        format!("{}@{}", self.uuid().hyphenated(), self.label())
    }
}

fn digit_value(c: u8) -> Option<u32> {
    match c {
        b'0'..=b'9' => Some(u32::from(c - b'0')),
        b'a'..=b'z' => Some(u32::from(c - b'a') + 10),
        b'A'..=b'Z' => Some(u32::from(c - b'A') + 10),
        _ => None,
    }
}

impl fmt::Display for RivetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Repeated division of the little-endian number by 36, from its most significant byte;
        // each remainder is the next digit, least significant first.
        let mut n = self.0;
        let mut out = [0u8; ID_STRING_LEN];
        for digit in out.iter_mut() {
            let mut rem = 0u32;
            for byte in n.iter_mut().rev() {
                let v = (rem << 8) | u32::from(*byte);
                *byte = (v / BASE) as u8;
                rem = v % BASE;
            }
            *digit = if rem < 10 { b'0' + rem as u8 } else { b'a' + (rem - 10) as u8 };
        }
        // Every digit is ASCII [0-9a-z].
        f.write_str(std::str::from_utf8(&out).expect("base36 digits are ASCII"))
    }
}

impl fmt::Debug for RivetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RivetId({self})")
    }
}

impl std::str::FromStr for RivetId {
    type Err = RivetIdError;

    fn from_str(s: &str) -> Result<RivetId, RivetIdError> {
        RivetId::parse(s)
    }
}
