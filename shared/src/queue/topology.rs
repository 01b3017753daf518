//! The RabbitMQ topology (DESIGN.md section 4), declared idempotently by the producer and the
//! workers, and exported as a definitions file for `deploy/rabbitmq/definitions.json`.
//!
//! ```text
//! {p}.jobs   (direct exchange) --work--> {p}.work   (quorum; delivery limit; DLX {p}.dead,
//!                                                    at-least-once dead-lettering)
//! {p}.retry.{ms} (quorum, TTL, no consumers) --expired--> {p}.jobs / work
//! {p}.dead   (direct exchange) --dead--> {p}.dead   (quorum: the triage queue)
//! ```
//!
//! Invariants: every queue is quorum and durable; every hop a message makes without a
//! consumer (retry expiry, delivery-limit dead-lettering) is at-least-once
//! (`x-dead-letter-strategy: at-least-once` with `x-overflow: reject-publish`), so the broker
//! never drops a job between queues; retry tiers have fixed TTLs so an expiry never waits
//! behind a longer one.

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

    pub fn retry_queue(&self, tier_ms: u64) -> String {
        format!("{}.retry.{tier_ms}", self.prefix)
    }

    pub fn retry_queues(&self) -> Vec<String> {
        RETRY_TIERS_MS.iter().map(|t| self.retry_queue(*t)).collect()
    }

    /// The retry queue for a delay: the smallest tier at least as long, else the longest.
    pub fn retry_queue_for(&self, delay: Duration) -> String {
        let ms = delay.as_millis() as u64;
        let tier =
            RETRY_TIERS_MS.iter().copied().find(|t| *t >= ms).unwrap_or(RETRY_TIERS_MS[RETRY_TIERS_MS.len() - 1]);
        self.retry_queue(tier)
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
        specs
    }

    /// Declares everything (idempotent: the same arguments every time).
    pub async fn declare(&self, ch: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for exchange in [self.jobs_exchange(), self.dead_exchange()] {
            ch.exchange_declare(exchange.as_str().into(), ExchangeKind::Direct, durable, FieldTable::default()).await?;
        }
        for spec in self.queues() {
            let mut args = FieldTable::default();
            for (k, v) in &spec.args {
                args.insert((*k).into(), v.amqp());
            }
            ch.queue_declare(spec.name.as_str().into(), QueueDeclareOptions::durable(), args).await?;
        }
        let bind = |q: String, x: String, k: &'static str| async move {
            ch.queue_bind(
                q.as_str().into(),
                x.as_str().into(),
                k.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        };
        bind(self.work_queue(), self.jobs_exchange(), WORK_KEY).await?;
        bind(self.dead_queue(), self.dead_exchange(), DEAD_KEY).await?;
        Ok(())
    }

    /// Deletes every queue and exchange (tests).
    pub async fn delete(&self, ch: &Channel) -> Result<(), lapin::Error> {
        for spec in self.queues() {
            ch.queue_delete(spec.name.as_str().into(), QueueDeleteOptions::default()).await?;
        }
        for exchange in [self.jobs_exchange(), self.dead_exchange()] {
            ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await?;
        }
        Ok(())
    }

    /// The topology as RabbitMQ definitions (exchanges, queues, bindings) for `vhost`.
    pub fn definitions(&self, vhost: &str) -> serde_json::Value {
        let exchanges: Vec<_> = [self.jobs_exchange(), self.dead_exchange()]
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
        let binding = |q: String, x: String, k: &str| {
            serde_json::json!({"source": x, "vhost": vhost, "destination": q, "destination_type": "queue",
                               "routing_key": k, "arguments": {}})
        };
        serde_json::json!({
            "exchanges": exchanges,
            "queues": queues,
            "bindings": [binding(self.work_queue(), self.jobs_exchange(), WORK_KEY),
                         binding(self.dead_queue(), self.dead_exchange(), DEAD_KEY)],
        })
    }
}

/// The least-privilege worker user in the deploy definitions.
pub const WORKER_USER: &str = "ferry-worker";
/// rabbit_password_hashing_sha256 of `change-me`: the placeholder the deploy docs tell
/// operators to replace (`rabbitmqctl change_password ferry-worker ...`).
pub const PLACEHOLDER_PASSWORD_HASH: &str = "kIoSPJ+KZjeeLWQvlOtsy+yMfT4W10kzrC6Wiu0VtcXtfyNE";

fn regex_of(names: &[String]) -> String {
    let alts: Vec<String> = names.iter().map(|n| n.replace('.', "\\.")).collect();
    format!("^({})$", alts.join("|"))
}

impl Topology {
    /// The worker's permissions: read the work queue; write the jobs and dead exchanges and
    /// the default exchange (retry tiers are addressed by queue name); configure nothing, so
    /// workers run with `--no-declare` against the loaded definitions.
    pub fn worker_permissions(&self, vhost: &str) -> serde_json::Value {
        let write = regex_of(&["amq.default".into(), self.jobs_exchange(), self.dead_exchange()]);
        serde_json::json!({"user": WORKER_USER, "vhost": vhost, "configure": "^$", "write": write,
                           "read": regex_of(&[self.work_queue()])})
    }

    /// The whole `deploy/rabbitmq/definitions.json`: vhost, worker user and permissions, and
    /// the topology.
    pub fn deploy_definitions(&self, vhost: &str, password_hash: &str) -> serde_json::Value {
        let mut defs = self.definitions(vhost);
        defs["vhosts"] = serde_json::json!([{"name": vhost}]);
        defs["users"] = serde_json::json!([{"name": WORKER_USER, "password_hash": password_hash,
            "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []}]);
        defs["permissions"] = serde_json::json!([self.worker_permissions(vhost)]);
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
}
