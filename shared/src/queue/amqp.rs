//! AMQP plumbing over lapin: connecting, publishing with confirms, and the headers ferry
//! reads and writes. The only module that knows lapin's types beyond `Channel`.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, options::BasicPublishOptions};

/// Header: attempts a job has already used (incremented on every retry publish).
pub const ATTEMPTS_HEADER: &str = "x-ferry-attempts";
/// Header: the last transient error of a retried job.
pub const LAST_ERROR_HEADER: &str = "x-ferry-last-error";
/// Headers on a dead letter, for `rabbitmqadmin` users and shovels.
pub const REASON_HEADER: &str = "x-ferry-reason";
pub const ACTOR_HEADER: &str = "x-ferry-actor";
pub const CAMPAIGN_HEADER: &str = "x-ferry-campaign";
/// Header on ferry's own dead letters: already in the store's triage index (written in the
/// audit transaction before the publish), so the dead-letter inbox only acks them.
pub const INDEXED_HEADER: &str = "x-ferry-indexed";
/// The broker's redelivery counter on quorum queues.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Why an AMQP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// lapin's errors display their cause and also expose it as `source`: kept as text only,
    /// so a `{:#}` chain names it once.
    #[error("broker: {0}")]
    Broker(lapin::Error),
    /// The broker at this (redacted) URL did not accept the connection and finish the AMQP
    /// handshake in time: a port that is not RabbitMQ, a firewall that drops packets.
    #[error("connecting to {url}: no AMQP handshake within {}s", timeout.as_secs_f64())]
    Timeout { url: String, timeout: Duration },
    /// Connecting to this (redacted) URL failed: refused, unresolvable, wrong credentials.
    #[error("connecting to {url}: {cause}")]
    Connect { url: String, cause: lapin::Error },
    #[error("broker refused (nacked) a publish to {0}")]
    Nacked(String),
    #[error("publish to {0} timed out waiting for its confirm")]
    ConfirmTimeout(String),
}

impl From<lapin::Error> for AmqpError {
    fn from(e: lapin::Error) -> Self {
        AmqpError::Broker(e)
    }
}

impl AmqpError {
    /// Whether a new connection can succeed where this failed: the broker went away, closed
    /// the connection or lost a publish, as opposed to refusing what was asked of it.
    pub fn is_transient(&self) -> bool {
        match self {
            AmqpError::Broker(e) => is_transient(e),
            AmqpError::Connect { cause, .. } => is_transient(cause),
            // No handshake in time: a broker still starting, or a port that is not RabbitMQ;
            // the retry budget tells the two apart.
            AmqpError::Timeout { .. } => true,
            // Both say the broker could not take the message now (a queue leader moving, a
            // memory alarm); a new connection publishes it again.
            AmqpError::Nacked(_) | AmqpError::ConfirmTimeout(_) => true,
        }
    }
}

/// Whether a lapin error can pass on a new connection: lost or closed connections and
/// channels, and the broker's own passing failures, are transient; refusals (access, vhost,
/// arguments), protocol misuse and anything that says the peer is not an AMQP broker are not.
pub fn is_transient(e: &lapin::Error) -> bool {
    use lapin::ErrorKind as K;
    use lapin::protocol::{AMQPErrorKind, AMQPHardError as H, AMQPSoftError as S};
    match e.kind() {
        K::IOError(_) | K::MissingHeartbeatError => true,
        K::InvalidChannel(_) | K::InvalidChannelState(..) | K::InvalidConnectionState(_) => true,
        K::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => match soft {
                S::RESOURCELOCKED => true,
                S::ACCESSREFUSED
                | S::NOTFOUND
                | S::PRECONDITIONFAILED
                | S::CONTENTTOOLARGE
                | S::NOROUTE
                | S::NOCONSUMERS => false,
            },
            AMQPErrorKind::Hard(hard) => match hard {
                // An operator or a stopping broker closed the connection; out of resources;
                // an internal error (a queue's leader moving).
                H::CONNECTIONFORCED | H::RESOURCEERROR | H::INTERNALERROR => true,
                H::INVALIDPATH
                | H::NOTALLOWED
                | H::FRAMEERROR
                | H::SYNTAXERROR
                | H::COMMANDINVALID
                | H::CHANNELERROR
                | H::UNEXPECTEDFRAME
                | H::NOTIMPLEMENTED => false,
            },
        },
        K::ChannelsLimitReached
        | K::InvalidProtocolVersion(_)
        | K::RuntimeShutdownError(_)
        | K::ParsingError(_)
        | K::SerialisationError(_)
        | K::AuthProviderError(_)
        | K::FutureCompleted
        | K::NoDefaultRuntime => false,
        // lapin's kinds are `#[non_exhaustive]`: a kind this version does not know is not
        // retried blindly.
        _ => false,
    }
}

/// Checks that a URL parses as an AMQP URI, so a malformed one fails at once instead of as
/// an I/O error on every connect (which reads as transient). The reason never echoes the URL.
pub fn check_url(url: &str) -> Result<(), String> {
    url.parse::<lapin::uri::AMQPUri>().map(drop)
}

/// How long a publish waits for its confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`connect`] waits for the TCP connection and the AMQP handshake together, unless
/// told otherwise (`--amqp-connect-timeout-secs`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects within [`DEFAULT_CONNECT_TIMEOUT`], naming the connection after this process.
pub async fn connect(url: &str, name: &str) -> Result<Connection, AmqpError> {
    connect_within(url, name, DEFAULT_CONNECT_TIMEOUT).await
}

/// Connects, naming the connection after this process. The TCP connect and the handshake
/// share one bound: lapin waits for the broker's `connection.start` for ever, so a port that
/// accepts and never speaks AMQP would hang the caller.
pub async fn connect_within(url: &str, name: &str, timeout: Duration) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(timeout, Connection::connect(url, props)).await {
        Ok(conn) => conn.map_err(|cause| AmqpError::Connect { url: redacted(url), cause }),
        Err(_) => Err(AmqpError::Timeout { url: redacted(url), timeout }),
    }
}

/// Delays between reconnects after a broker or store failure (the worker's sessions, the
/// producer's attempts): exponential from 200 ms to 10 s with jitter, without end (the caller
/// bounds it by shutdown or a budget).
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The URL with its password hidden, for logs.
pub fn redacted(url: &str) -> String {
    crate::store::redact_url(url)
}

/// Opens a channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, AmqpError> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    Ok(ch)
}

/// Properties of a persistent JSON message.
pub fn json_properties(message_id: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE_JSON.into())
        .with_delivery_mode(2)
        .with_message_id(message_id.into())
        .with_timestamp((crate::clock::Clock::now_ms(&crate::clock::SystemClock) / 1000) as u64)
        .with_headers(headers)
}

/// Publishes and waits for the broker's confirm; a nack or a timeout is an error.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), AmqpError> {
    let confirm =
        ch.basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), body, props).await?;
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Ok(Ok(c)) if c.is_ack() => Ok(()),
        Ok(Ok(_)) => Err(AmqpError::Nacked(format!("{exchange}/{routing_key}"))),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(AmqpError::ConfirmTimeout(format!("{exchange}/{routing_key}"))),
    }
}

/// An integer header (the broker writes them as signed integers of various widths).
pub fn int_header(props: &BasicProperties, name: &str) -> Option<i64> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Whether a message carries a header, whatever its value.
pub fn has_header(props: &BasicProperties, name: &str) -> bool {
    props.headers().as_ref().is_some_and(|h| h.inner().contains_key(name))
}

/// A string header.
pub fn str_header(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The reason the broker gave for dead-lettering a message (`x-first-death-reason`, or the
/// first `x-death` entry).
pub fn death_reason(props: &BasicProperties) -> Option<String> {
    if let Some(r) = str_header(props, "x-first-death-reason") {
        return Some(r);
    }
    let headers = props.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else { return None };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else { return None };
    match first.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Attempts already used by a delivery: retries recorded by ferry plus redeliveries counted
/// by the broker on this queue.
pub fn attempts_before(props: &BasicProperties) -> u32 {
    let retried = int_header(props, ATTEMPTS_HEADER).unwrap_or(0).max(0);
    let redelivered = int_header(props, DELIVERY_COUNT_HEADER).unwrap_or(0).max(0);
    u32::try_from(retried + redelivered).unwrap_or(u32::MAX)
}

/// Builds a header table.
pub fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

pub fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Whether a URL names an AMQP broker.
pub fn is_amqp_url(url: &str) -> bool {
    url.starts_with("amqp://") || url.starts_with("amqps://")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The segments of a `{:#}` chain that repeat an earlier one (`a: b: b` repeats `b`).
    fn repeated_segments(chain: &str) -> Vec<String> {
        let parts: Vec<&str> = chain.split(": ").collect();
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            if parts[..i].contains(p) {
                out.push(p.to_string());
            }
        }
        out
    }

    #[tokio::test]
    async fn a_refused_connection_names_its_cause_once_in_a_chain() {
        // Port 1 on loopback: nothing listens there.
        let e = connect_within("amqp://guest:secret@127.0.0.1:1/%2f", "test", Duration::from_secs(5))
            .await
            .expect_err("nothing listens on port 1");
        let status = crate::queue::status::StatusError::from(e);
        let chain = format!("{:#}", anyhow::Error::new(status).context("status"));
        assert!(chain.contains("Connection refused") && chain.contains("127.0.0.1:1"), "{chain}");
        assert!(!chain.contains("secret"), "{chain}");
        assert_eq!(repeated_segments(&chain), Vec::<String>::new(), "{chain}");
    }

    #[test]
    fn a_store_failure_of_a_migration_names_its_cause_once_in_a_chain() {
        use crate::migrate::{Cause, MigrateError, Phase};
        let store = crate::store::StoreError::Unavailable { backend: "postgres", message: "connection reset".into() };
        let e = MigrateError {
            actor: crate::ActorId::parse("a1").expect("a valid id"),
            phase: Phase::Stage,
            cause: Cause::from(store),
            files: None,
        };
        // Dead letters and audits keep `to_string()`: it must still name the cause.
        assert!(e.to_string().contains("connection reset"), "{e}");
        let chain = format!("{:#}", anyhow::Error::new(e).context("job failed"));
        assert_eq!(repeated_segments(&chain), Vec::<String>::new(), "{chain}");
        let local = crate::embedded::LocalError::from(crate::store::StoreError::Failed {
            backend: "sqlite",
            message: "disk I/O error".into(),
        });
        let chain = format!("{:#}", anyhow::Error::new(local).context("embedded run failed"));
        assert_eq!(repeated_segments(&chain), Vec::<String>::new(), "{chain}");
    }

    #[tokio::test]
    async fn a_port_that_never_speaks_amqp_times_out_naming_the_redacted_url() {
        // Accepts connections and never answers, like a service that is not RabbitMQ.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let port = listener.local_addr().expect("bound address").port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let url = format!("amqp://guest:secret@127.0.0.1:{port}/%2f");
        let started = std::time::Instant::now();
        let e = connect_within(&url, "test", Duration::from_millis(500)).await.expect_err("no handshake");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert!(matches!(e, AmqpError::Timeout { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&format!("127.0.0.1:{port}")) && !text.contains("secret"), "{text}");
        hold.abort();
    }
}
