//! The job message (DESIGN.md section 4): JSON, one per actor and campaign,
//! `message_id = {campaign}/{actor}`.
//!
//! Invariant: a message is parsed and validated completely here, at the boundary, before
//! anything reaches the store: size, shape, version, actor id, campaign name, recovery name.

use serde::{Deserialize, Serialize};

use crate::actor::ActorId;
use crate::recovery::Recovery;

/// The only job message version.
pub const JOB_VERSION: u32 = 1;
/// Largest job message accepted; a real one is under 200 bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// Longest campaign name.
pub const MAX_CAMPAIGN_LEN: usize = 128;

/// A migration job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub version: u32,
    pub campaign: String,
    pub actor_id: ActorId,
    pub enqueued_at_ms: i64,
    pub recovery: Option<Recovery>,
    /// The raw requeue ticket a worker found current for this job (`triage::ticket`): set
    /// from the delivery's token header, never part of the message.
    #[serde(skip)]
    pub ticket: Option<Vec<u8>>,
}

/// Why a message is not a job (it is dead-lettered as `bad_message`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadMessage {
    #[error("message is {0} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("message is not a job: {0}")]
    Malformed(String),
    #[error("job version {0} is not supported (expected {JOB_VERSION})")]
    Version(u32),
    #[error("campaign name {0:?} is invalid: 1 to {MAX_CAMPAIGN_LEN} bytes of [A-Za-z0-9_.-]")]
    Campaign(String),
    /// A well-formed job whose actor id cannot name an actor of the store's layout (rivet: a
    /// 30-character base36 id).
    #[error("actor {actor} is not an actor id of the {layout} layout: {detail}")]
    ForeignActor { actor: String, layout: &'static str, detail: String },
}

impl BadMessage {
    /// The kind of problem, safe to log (the error text may quote the body).
    pub fn kind(&self) -> &'static str {
        match self {
            BadMessage::TooLarge(_) => "too_large",
            BadMessage::Malformed(_) => "malformed",
            BadMessage::Version(_) => "version",
            BadMessage::Campaign(_) => "campaign",
            BadMessage::ForeignActor { .. } => "foreign_actor",
        }
    }

    /// The actor and campaign names a body that is not a valid job carries, as far as they can
    /// be read safely: only a body within [`MAX_MESSAGE_BYTES`] is parsed (an oversized one
    /// would be outside the memory budget).
    pub fn names(body: &[u8]) -> BodyNames {
        let raw: serde_json::Value = if body.len() <= MAX_MESSAGE_BYTES {
            serde_json::from_slice(body).unwrap_or(serde_json::Value::Null)
        } else {
            serde_json::Value::Null
        };
        let field = |name: &str| raw.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let (actor, campaign) = (field("actor_id"), field("campaign"));
        BodyNames {
            actor: ActorId::parse(actor).ok().map(|a| a.to_string()),
            campaign: Some(campaign).filter(|c| valid_campaign(c)).map(str::to_string),
            raw_actor: actor.chars().take(80).collect(),
            raw_campaign: campaign.chars().take(80).collect(),
        }
    }
}

/// What [`BadMessage::names`] read from a body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BodyNames {
    /// The actor id, when it is a valid one (safe to log).
    pub actor: Option<String>,
    /// The campaign, when it is a valid name (safe to log).
    pub campaign: Option<String>,
    /// The first 80 characters of `actor_id` as sent, valid or not: kept in the dead letter
    /// for triage, never logged.
    pub raw_actor: String,
    /// The first 80 characters of `campaign` as sent, valid or not (dead letter only).
    pub raw_campaign: String,
}

/// Whether `name` can name a campaign (it appears in keys and message ids).
pub fn valid_campaign(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CAMPAIGN_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl Job {
    pub fn new(campaign: &str, actor: ActorId, enqueued_at_ms: i64, recovery: Option<Recovery>) -> Job {
        Job {
            version: JOB_VERSION,
            campaign: campaign.to_string(),
            actor_id: actor,
            enqueued_at_ms,
            recovery,
            ticket: None,
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Job, BadMessage> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(BadMessage::TooLarge(bytes.len()));
        }
        // serde_json rejects invalid UTF-8 and nesting deeper than its recursion limit.
        let job: Job = serde_json::from_slice(bytes).map_err(|e| BadMessage::Malformed(e.to_string()))?;
        if job.version != JOB_VERSION {
            return Err(BadMessage::Version(job.version));
        }
        if !valid_campaign(&job.campaign) {
            return Err(BadMessage::Campaign(job.campaign.chars().take(160).collect()));
        }
        Ok(job)
    }

    pub fn encode(&self) -> Vec<u8> {
        // Strings, integers and an enum: serialization cannot fail.
        serde_json::to_vec(self).expect("job serializes")
    }

    /// `{campaign}/{actor}`: the AMQP message id.
    pub fn message_id(&self) -> String {
        format!("{}/{}", self.campaign, self.actor_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_round_trips_in_the_contract_shape() {
        let raw = br#"{"version": 1, "campaign": "nov-backfill", "actor_id": "a1b2c3",
                       "enqueued_at_ms": 1763900000000, "recovery": null}"#;
        let job = Job::parse(raw).unwrap();
        assert_eq!(job.actor_id.as_str(), "a1b2c3");
        assert_eq!(job.message_id(), "nov-backfill/a1b2c3");
        assert_eq!(Job::parse(&job.encode()).unwrap(), job);
        let with_recovery =
            br#"{"version":1,"campaign":"c","actor_id":"a","enqueued_at_ms":0,"recovery":"rollback_journal"}"#;
        assert_eq!(Job::parse(with_recovery).unwrap().recovery, Some(Recovery::RollbackJournal));
    }

    #[test]
    fn a_bad_message_gives_only_valid_names_to_the_logs() {
        let names = BadMessage::names(br#"{"version":2,"campaign":"c-1","actor_id":"a1","x":"secret payload"}"#);
        assert_eq!((names.actor.as_deref(), names.campaign.as_deref()), (Some("a1"), Some("c-1")));
        let names = BadMessage::names(br#"{"version":1,"campaign":"c/../d","actor_id":"../x","enqueued_at_ms":0}"#);
        assert_eq!((names.actor, names.campaign), (None, None));
        assert_eq!((names.raw_actor.as_str(), names.raw_campaign.as_str()), ("../x", "c/../d"));
        assert_eq!(BadMessage::names(b"not json"), BodyNames::default());
        let bad = Job::parse(br#"{"version":1,"campaign":"c","actor_id":"a","enqueued_at_ms":"secret payload"}"#);
        let bad = bad.unwrap_err();
        assert_eq!(bad.kind(), "malformed");
    }

    #[test]
    fn hostile_messages_are_bad_messages() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let huge = format!(
            r#"{{"version":1,"campaign":"c","actor_id":"{}","enqueued_at_ms":0,"recovery":null}}"#,
            "a".repeat(20_000)
        );
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"not json".to_vec(),
            vec![0xff, 0xfe, b'{'],
            deep.into_bytes(),
            huge.into_bytes(),
            br#"{"version":1,"campaign":"c","actor_id":"../x","enqueued_at_ms":0,"recovery":null}"#.to_vec(),
            br#"{"version":1,"campaign":"c","actor_id":"a/b","enqueued_at_ms":0,"recovery":null}"#.to_vec(),
            br#"{"version":1,"campaign":"c","actor_id":"a","enqueued_at_ms":0,"recovery":"rm_rf"}"#.to_vec(),
            br#"{"version":2,"campaign":"c","actor_id":"a","enqueued_at_ms":0,"recovery":null}"#.to_vec(),
            br#"{"version":1,"campaign":"c/d","actor_id":"a","enqueued_at_ms":0,"recovery":null}"#.to_vec(),
            br#"{"version":1,"campaign":"c","actor_id":"a","enqueued_at_ms":0,"recovery":null,"x":1}"#.to_vec(),
        ];
        for raw in cases {
            assert!(Job::parse(&raw).is_err(), "{:?}", String::from_utf8_lossy(&raw[..raw.len().min(80)]));
        }
    }
}
