//! Actor ids: 1 to 64 bytes of `[A-Za-z0-9_-]`. Checked once at every boundary (job message,
//! CLI, keyspace scan), so no key is ever built from an id that could escape its prefix.

use std::fmt;

/// The longest actor id, in bytes.
pub const MAX_ACTOR_ID_LEN: usize = 64;

/// A validated actor id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct ActorId(String);

/// Why a string is not an actor id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidActorId {
    #[error("actor id is empty")]
    Empty,
    #[error("actor id is {0} bytes, over the {MAX_ACTOR_ID_LEN}-byte limit")]
    TooLong(usize),
    #[error("actor id {0:?} has a byte outside [A-Za-z0-9_-]")]
    BadByte(String),
}

impl ActorId {
    pub fn parse(s: &str) -> Result<ActorId, InvalidActorId> {
        Self::from_bytes(s.as_bytes())
    }

    pub fn from_bytes(b: &[u8]) -> Result<ActorId, InvalidActorId> {
        if b.is_empty() {
            return Err(InvalidActorId::Empty);
        }
        if b.len() > MAX_ACTOR_ID_LEN {
            return Err(InvalidActorId::TooLong(b.len()));
        }
        if !b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-') {
            return Err(InvalidActorId::BadByte(String::from_utf8_lossy(&b[..b.len().min(80)]).into_owned()));
        }
        // Every byte was checked to be ASCII just above.
        Ok(ActorId(String::from_utf8(b.to_vec()).expect("ASCII is UTF-8")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ActorId {
    type Err = InvalidActorId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ActorId::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for ActorId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ActorId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_ids_outside_the_alphabet_are_rejected() {
        assert!(ActorId::parse("a1b2-c3_D").is_ok());
        assert_eq!(ActorId::parse(""), Err(InvalidActorId::Empty));
        assert!(matches!(ActorId::parse(&"a".repeat(65)), Err(InvalidActorId::TooLong(65))));
        for bad in ["a/b", "..", "a b", "é", "a\0"] {
            assert!(ActorId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ActorId::parse(&"a".repeat(64)).is_ok());
    }
}
