//! The RabbitMQ topology (DESIGN.md section 4), declared idempotently by the producer and the
//! workers, and exported as a definitions file for `deploy/rabbitmq/definitions.json`.
//!
//! ```text
//! {p}.jobs   (direct exchange) --work--> {p}.work   (quorum; delivery limit; DLX {p}.dead,
//!                                                    at-least-once dead-lettering)
//! {p}.retry  (direct exchange) --{ms}--> {p}.retry.{ms} (quorum, TTL, no consumers)
//!                                          --expired--> {p}.jobs / work
//! {p}.dead   (direct exchange) --dead--> {p}.dead     (quorum: the inbox workers drain into
//!                                                      the store's triage index)
//!                              --dead--> {p}.dead-log (stream: every dead letter, kept with
//!                                                      retention for other tools)
//! ```
//!
//! Every publish goes through one of ferry's own exchanges (retries too: routing key = the
//! tier), never through the default exchange, so a user's write permission names exactly
//! which of ferry's exchanges it may publish to and nothing else in the vhost.
//!
//! Invariants: every queue is durable, and quorum except the dead-letter log (a stream: read
//! without being consumed away, trimmed only by [`DEAD_LOG_MAX_AGE`] and
//! [`DEAD_LOG_MAX_BYTES`]); every hop a message makes without a consumer (retry expiry,
//! delivery-limit dead-lettering) is at-least-once (`x-dead-letter-strategy: at-least-once`
//! with `x-overflow: reject-publish`), so the broker never drops a job between queues; retry
//! tiers have fixed TTLs so an expiry never waits behind a longer one; a queue's arguments
//! never change once shipped (a redeclare with other arguments fails on every existing
//! deployment), so what the inbox needs beyond them comes as a policy ([`Topology::policies`]).

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind, options::*};

/// Default name prefix.
pub const DEFAULT_PREFIX: &str = "ferry";
/// Longest name prefix: exchange and queue names stay far below the broker's 255 bytes.
pub const MAX_PREFIX_LEN: usize = 64;
/// Routing key of work queue bindings.
pub const WORK_KEY: &str = "work";
/// Routing key of dead-letter bindings.
pub const DEAD_KEY: &str = "dead";
/// Default work-queue delivery limit: handbacks and crashes a job survives before the broker
/// dead-letters it as `delivery_limit`.
pub const DEFAULT_DELIVERY_LIMIT: i64 = 10;
/// Retry delay tiers, in milliseconds.
pub const RETRY_TIERS_MS: [u64; 5] = [1_000, 5_000, 30_000, 120_000, 600_000];
/// A job that waits in a queue this long without a consumer is still kept (no TTL on work).
pub const MAX_QUEUE_LENGTH: i64 = 50_000_000;
/// How long the dead-letter log keeps a letter (`x-max-age`; the broker trims whole segments,
/// so a letter may stay a little longer).
pub const DEAD_LOG_MAX_AGE: &str = "30D";
/// The dead-letter log's size bound (`x-max-length-bytes`): at about 1 KiB a letter, some
/// twenty million letters before the oldest segments go.
pub const DEAD_LOG_MAX_BYTES: i64 = 20 << 30;
/// The delivery limit the deploy policy gives the dead-letter inbox: one no redelivery reaches
/// (the inbox never hands a message back; only a worker lost while holding one returns it).
/// RabbitMQ 4.x would otherwise apply its default of 20 and drop the letter at the limit;
/// `-1` (unlimited) is not an option: 3.x refuses it in a policy and 4.x does not honour it
/// from one everywhere.
pub const INBOX_DELIVERY_LIMIT: i64 = 1_000_000;
/// Priority of the inbox policy: above a blanket policy at the default 0 (RabbitMQ applies
/// only the one policy of highest priority to a queue).
pub const INBOX_POLICY_PRIORITY: i64 = 10;

/// The names of one deployment's exchanges and queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub prefix: String,
    pub delivery_limit: i64,
}

fn str_arg(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

/// One queue's declaration, shared by [`Topology::declare`] and the definitions export.
#[derive(Clone, Debug)]
pub struct QueueSpec {
    pub name: String,
    pub args: Vec<(&'static str, ArgValue)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ArgValue {
    Str(String),
    Int(i64),
}

impl ArgValue {
    fn amqp(&self) -> AMQPValue {
        match self {
            ArgValue::Str(s) => str_arg(s),
            ArgValue::Int(i) => AMQPValue::LongLongInt(*i),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            ArgValue::Str(s) => serde_json::Value::from(s.as_str()),
            ArgValue::Int(i) => serde_json::Value::from(*i),
        }
    }
}

/// Why a topology was refused before any name reached the broker.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("queue prefix {0:?}: 1 to 64 bytes of [A-Za-z0-9_.-]")]
    BadPrefix(String),
    #[error("delivery limit {0}: must be at least 1")]
    BadDeliveryLimit(i64),
}

/// Checks a name prefix: 1 to [`MAX_PREFIX_LEN`] bytes of `[A-Za-z0-9_.-]`, so every name
/// derived from it is a plain AMQP short string an operator can type (no spaces, no
/// separators of the management API's paths).
pub fn check_prefix(prefix: &str) -> Result<(), TopologyError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok { Ok(()) } else { Err(TopologyError::BadPrefix(prefix.to_string())) }
}

impl Topology {
    /// A topology whose prefix and delivery limit are checked.
    pub fn checked(prefix: &str, delivery_limit: i64) -> Result<Topology, TopologyError> {
        check_prefix(prefix)?;
        if delivery_limit < 1 {
            return Err(TopologyError::BadDeliveryLimit(delivery_limit));
        }
        Ok(Topology { prefix: prefix.to_string(), delivery_limit })
    }

    /// Checks a topology built field by field.
    pub fn validate(&self) -> Result<(), TopologyError> {
        Topology::checked(&self.prefix, self.delivery_limit).map(|_| ())
    }

    pub fn new(prefix: &str) -> Topology {
        Topology { prefix: prefix.to_string(), delivery_limit: DEFAULT_DELIVERY_LIMIT }
    }

    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    pub fn work_queue(&self) -> String {
        format!("{}.work", self.prefix)
    }

    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The stream every dead letter is also routed to, for tools that read dead letters
    /// without taking them (consume it with `x-stream-offset`).
    pub fn dead_log(&self) -> String {
        format!("{}.dead-log", self.prefix)
    }

    /// Name of the policy of the dead-letter inbox ([`Topology::policies`]).
    pub fn inbox_policy(&self) -> String {
        format!("{}.dead-inbox", self.prefix)
    }

    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }

    /// ferry's exchanges: jobs, retry, dead.
    pub fn exchanges(&self) -> [String; 3] {
        [self.jobs_exchange(), self.retry_exchange(), self.dead_exchange()]
    }

    pub fn retry_queue(&self, tier_ms: u64) -> String {
        format!("{}.retry.{tier_ms}", self.prefix)
    }

    pub fn retry_queues(&self) -> Vec<String> {
        RETRY_TIERS_MS.iter().map(|t| self.retry_queue(*t)).collect()
    }

    /// The retry tier for a delay: the smallest tier at least as long, else the longest.
    pub fn retry_tier_for(delay: Duration) -> u64 {
        let ms = delay.as_millis() as u64;
        RETRY_TIERS_MS.iter().copied().find(|t| *t >= ms).unwrap_or(RETRY_TIERS_MS[RETRY_TIERS_MS.len() - 1])
    }

    /// The retry queue for a delay ([`Topology::retry_tier_for`]).
    pub fn retry_queue_for(&self, delay: Duration) -> String {
        self.retry_queue(Self::retry_tier_for(delay))
    }

    /// Routing key of a retry tier on the retry exchange.
    pub fn retry_key(tier_ms: u64) -> String {
        tier_ms.to_string()
    }

    /// Every binding: (queue, exchange, routing key).
    pub fn bindings(&self) -> Vec<(String, String, String)> {
        let mut out = vec![(self.work_queue(), self.jobs_exchange(), WORK_KEY.to_string())];
        for tier in RETRY_TIERS_MS {
            out.push((self.retry_queue(tier), self.retry_exchange(), Self::retry_key(tier)));
        }
        out.push((self.dead_queue(), self.dead_exchange(), DEAD_KEY.to_string()));
        out.push((self.dead_log(), self.dead_exchange(), DEAD_KEY.to_string()));
        out
    }

    /// Every name ferry declares (exchanges and queues).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.exchanges().into();
        names.extend(self.queues().into_iter().map(|q| q.name));
        names
    }

    fn at_least_once(args: &mut Vec<(&'static str, ArgValue)>) {
        args.push(("x-dead-letter-strategy", ArgValue::Str("at-least-once".into())));
        args.push(("x-overflow", ArgValue::Str("reject-publish".into())));
        args.push(("x-max-length", ArgValue::Int(MAX_QUEUE_LENGTH)));
    }

    /// Every queue with its arguments.
    pub fn queues(&self) -> Vec<QueueSpec> {
        let quorum = || vec![("x-queue-type", ArgValue::Str("quorum".into()))];
        let mut work = quorum();
        work.push(("x-delivery-limit", ArgValue::Int(self.delivery_limit)));
        work.push(("x-dead-letter-exchange", ArgValue::Str(self.dead_exchange())));
        work.push(("x-dead-letter-routing-key", ArgValue::Str(DEAD_KEY.into())));
        Self::at_least_once(&mut work);
        let mut specs = vec![QueueSpec { name: self.work_queue(), args: work }];
        for tier in RETRY_TIERS_MS {
            let mut args = quorum();
            args.push(("x-message-ttl", ArgValue::Int(tier as i64)));
            args.push(("x-dead-letter-exchange", ArgValue::Str(self.jobs_exchange())));
            args.push(("x-dead-letter-routing-key", ArgValue::Str(WORK_KEY.into())));
            Self::at_least_once(&mut args);
            specs.push(QueueSpec { name: self.retry_queue(tier), args });
        }
        specs.push(QueueSpec { name: self.dead_queue(), args: quorum() });
        // A stream takes none of the quorum dead-lettering and overflow arguments: nothing is
        // dead-lettered out of it, and it is bounded by age and size, not length.
        let log = vec![
            ("x-queue-type", ArgValue::Str("stream".into())),
            ("x-max-age", ArgValue::Str(DEAD_LOG_MAX_AGE.into())),
            ("x-max-length-bytes", ArgValue::Int(DEAD_LOG_MAX_BYTES)),
        ];
        specs.push(QueueSpec { name: self.dead_log(), args: log });
        specs
    }

    /// The policies the deploy definitions carry: (name, pattern, definition). One, for the
    /// dead-letter inbox `{p}.dead`, whose arguments (quorum, no delivery limit) predate it:
    /// a delivery limit no redelivery reaches ([`INBOX_DELIVERY_LIMIT`]), and, should one reach
    /// it, dead-lettering back to `{p}.dead`, at-least-once (`overflow: reject-publish` is what
    /// at-least-once requires; the inbox has no length limit for it to act on). That does not
    /// loop: the broker drops a message dead-lettered into a queue it already died in unless a
    /// death on the way was `rejected` (a hand-back at the limit is `delivery_limit`), so the
    /// letter lands only in the `{p}.dead-log` stream, a second time, with
    /// `x-first-death-queue` = `{p}.dead` for ferry's own. At-most-once, the default, would
    /// not even do that: RabbitMQ 3.x delivers no at-most-once dead letter of a quorum queue to
    /// a stream.
    pub fn policies(&self) -> Vec<(String, String, serde_json::Value)> {
        let definition = serde_json::json!({
            "delivery-limit": INBOX_DELIVERY_LIMIT,
            "dead-letter-exchange": self.dead_exchange(),
            "dead-letter-routing-key": DEAD_KEY,
            "dead-letter-strategy": "at-least-once",
            "overflow": "reject-publish",
        });
        vec![(self.inbox_policy(), format!("^{}$", self.dead_queue().replace('.', "\\.")), definition)]
    }

    /// Declares everything (idempotent: the same arguments every time).
    pub async fn declare(&self, ch: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for exchange in self.exchanges() {
            ch.exchange_declare(exchange.as_str().into(), ExchangeKind::Direct, durable, FieldTable::default()).await?;
        }
        for spec in self.queues() {
            let mut args = FieldTable::default();
            for (k, v) in &spec.args {
                args.insert((*k).into(), v.amqp());
            }
            ch.queue_declare(spec.name.as_str().into(), QueueDeclareOptions::durable(), args).await?;
        }
        for (q, x, k) in self.bindings() {
            ch.queue_bind(
                q.as_str().into(),
                x.as_str().into(),
                k.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        Ok(())
    }

    /// Checks that every exchange and queue exists without declaring anything (passive
    /// declares need no permission at all): for users that may not configure.
    pub async fn check_exists(&self, ch: &Channel) -> Result<(), lapin::Error> {
        let passive = ExchangeDeclareOptions { passive: true, durable: true, ..Default::default() };
        for exchange in self.exchanges() {
            ch.exchange_declare(exchange.as_str().into(), ExchangeKind::Direct, passive, FieldTable::default()).await?;
        }
        for spec in self.queues() {
            let opts = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
            ch.queue_declare(spec.name.as_str().into(), opts, FieldTable::default()).await?;
        }
        Ok(())
    }

    /// Deletes every queue and exchange (tests).
    pub async fn delete(&self, ch: &Channel) -> Result<(), lapin::Error> {
        for spec in self.queues() {
            ch.queue_delete(spec.name.as_str().into(), QueueDeleteOptions::default()).await?;
        }
        for exchange in self.exchanges() {
            ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await?;
        }
        Ok(())
    }

    /// The topology as RabbitMQ definitions (exchanges, queues, bindings, policies) for
    /// `vhost`.
    pub fn definitions(&self, vhost: &str) -> serde_json::Value {
        let exchanges: Vec<_> = self
            .exchanges()
            .iter()
            .map(|name| {
                serde_json::json!({"name": name, "vhost": vhost, "type": "direct", "durable": true,
                                   "auto_delete": false, "internal": false, "arguments": {}})
            })
            .collect();
        let queues: Vec<_> = self
            .queues()
            .iter()
            .map(|q| {
                let args: serde_json::Map<String, serde_json::Value> =
                    q.args.iter().map(|(k, v)| (k.to_string(), v.json())).collect();
                serde_json::json!({"name": q.name, "vhost": vhost, "durable": true, "auto_delete": false, "arguments": args})
            })
            .collect();
        let bindings: Vec<_> = self
            .bindings()
            .into_iter()
            .map(|(q, x, k)| {
                serde_json::json!({"source": x, "vhost": vhost, "destination": q, "destination_type": "queue",
                                   "routing_key": k, "arguments": {}})
            })
            .collect();
        let policies: Vec<_> = self
            .policies()
            .into_iter()
            .map(|(name, pattern, definition)| {
                serde_json::json!({"vhost": vhost, "name": name, "pattern": pattern, "apply-to": "queues",
                                   "definition": definition, "priority": INBOX_POLICY_PRIORITY})
            })
            .collect();
        serde_json::json!({"exchanges": exchanges, "queues": queues, "bindings": bindings, "policies": policies})
    }
}

/// The least-privilege worker user: consumes the work queue and the dead-letter inbox,
/// publishes retries and dead letters, configures nothing.
pub const WORKER_USER: &str = "ferry-worker";
/// The operator user: the producer (declare, enqueue) and triage that moves dead letters;
/// configure, write and read on ferry's names only.
pub const OPERATOR_USER: &str = "ferry-operator";
/// The read-only triage user: no permission at all in the vhost (triage reads the store's
/// index, not the broker); it logs in for `status`, whose passive declares need none.
pub const TRIAGE_USER: &str = "ferry-triage";
/// The monitoring user KEDA reads queue lengths with through the management API (tag
/// `monitoring`, no permission in the vhost beyond access).
pub const MONITOR_USER: &str = "ferry-monitor";
/// The hashing algorithm of the password hashes given to [`Topology::deploy_definitions`]
/// (what `rabbitmqctl hash_password` prints).
pub const HASHING_ALGORITHM: &str = "rabbit_password_hashing_sha256";

/// Password hashes of the deploy users. An empty hash is no password: the user cannot log in
/// until one is set (`rabbitmqctl change_password USER PASSWORD`), so the shipped definitions
/// have no working default.
#[derive(Clone, Debug, Default)]
pub struct PasswordHashes {
    pub worker: String,
    pub operator: String,
    pub triage: String,
    pub monitor: String,
}

fn regex_of(names: &[String]) -> String {
    let alts: Vec<String> = names.iter().map(|n| n.replace('.', "\\.")).collect();
    format!("^({})$", alts.join("|"))
}

/// Matches no name.
const NOTHING: &str = "^$";

impl Topology {
    /// Each deploy user's permissions in `vhost`: (user, configure, write, read).
    pub fn permissions(&self) -> Vec<(&'static str, String, String, String)> {
        let all = regex_of(&self.names());
        vec![
            (
                WORKER_USER,
                NOTHING.into(),
                regex_of(&[self.retry_exchange(), self.dead_exchange()]),
                regex_of(&[self.work_queue(), self.dead_queue()]),
            ),
            (OPERATOR_USER, all.clone(), all.clone(), all),
            (TRIAGE_USER, NOTHING.into(), NOTHING.into(), NOTHING.into()),
            (MONITOR_USER, NOTHING.into(), NOTHING.into(), NOTHING.into()),
        ]
    }

    /// The whole `deploy/rabbitmq/definitions.json`: vhost, the deploy users and their
    /// permissions, and the topology. Nothing else may declare the topology on such a broker:
    /// workers run with `--no-declare`, triage and `status` only check that it exists.
    pub fn deploy_definitions(&self, vhost: &str, hashes: &PasswordHashes) -> serde_json::Value {
        let mut defs = self.definitions(vhost);
        defs["vhosts"] = serde_json::json!([{"name": vhost}]);
        let user = |name: &str, hash: &str, tags: &[&str]| {
            serde_json::json!({"name": name, "password_hash": hash, "hashing_algorithm": HASHING_ALGORITHM,
                               "tags": tags})
        };
        defs["users"] = serde_json::json!([
            user(WORKER_USER, &hashes.worker, &[]),
            user(OPERATOR_USER, &hashes.operator, &[]),
            user(TRIAGE_USER, &hashes.triage, &[]),
            user(MONITOR_USER, &hashes.monitor, &["monitoring"]),
        ]);
        defs["permissions"] = self
            .permissions()
            .into_iter()
            .map(|(user, configure, write, read)| {
                serde_json::json!({"user": user, "vhost": vhost, "configure": configure, "write": write,
                                   "read": read})
            })
            .collect();
        defs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_plain_names_of_1_to_64_bytes() {
        for good in ["ferry", "a", "ferry-prod_2.eu", &"p".repeat(MAX_PREFIX_LEN)] {
            assert_eq!(check_prefix(good), Ok(()), "{good:?}");
        }
        for bad in ["", "bad prefix!", "a b", "a/b", "é", &"p".repeat(MAX_PREFIX_LEN + 1)] {
            assert_eq!(check_prefix(bad), Err(TopologyError::BadPrefix(bad.to_string())), "{bad:?}");
        }
        assert_eq!(Topology::checked("ferry", 0), Err(TopologyError::BadDeliveryLimit(0)));
        assert!(Topology { prefix: "bad prefix!".into(), delivery_limit: 10 }.validate().is_err());
    }

    #[test]
    fn the_dead_log_is_a_bounded_stream_on_the_dead_exchange_with_no_quorum_arguments() {
        let t = Topology::new("ferry");
        let log = t.queues().into_iter().find(|q| q.name == "ferry.dead-log").expect("the dead log is declared");
        let keys: Vec<&str> = log.args.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["x-queue-type", "x-max-age", "x-max-length-bytes"]);
        assert_eq!(log.args[0].1, ArgValue::Str("stream".into()));
        assert!(t.bindings().contains(&("ferry.dead-log".into(), "ferry.dead".into(), DEAD_KEY.into())));
        // The inbox keeps the arguments it shipped with.
        let inbox = t.queues().into_iter().find(|q| q.name == "ferry.dead").expect("the inbox");
        assert_eq!(inbox.args, vec![("x-queue-type", ArgValue::Str("quorum".into()))]);
    }

    #[test]
    fn the_worker_reads_the_inbox_the_triage_user_nothing_and_the_policy_matches_the_inbox_only() {
        let t = Topology::new("ferry");
        let perms = t.permissions();
        let of = |user: &str| perms.iter().find(|p| p.0 == user).cloned().expect("a deploy user");
        assert_eq!(of(WORKER_USER).3, "^(ferry\\.work|ferry\\.dead)$");
        let triage = of(TRIAGE_USER);
        assert_eq!((triage.1.as_str(), triage.2.as_str(), triage.3.as_str()), (NOTHING, NOTHING, NOTHING));
        let policies = t.policies();
        assert_eq!(policies.len(), 1);
        // Anchored, the dot escaped: the inbox only (tests/tests/dead_inbox.rs checks on a broker).
        assert_eq!(policies[0].1, "^ferry\\.dead$");
        assert_eq!(policies[0].2["delivery-limit"], INBOX_DELIVERY_LIMIT);
    }
}
