//! The fleet worker (`ferry-worker run`): consumes the work queue with prefetch = concurrency,
//! runs each delivery through the [`JobRunner`], and carries out its disposition.
//!
//! Invariants:
//! - a delivery is acked only after its outcome is durable: the audit record (written by the
//!   runner), or a retry or dead-letter message confirmed by the broker; if that publish fails
//!   the delivery is rejected back to the queue, so a job is never in neither queue;
//! - a lost connection or channel makes the worker unready and reconnects with backoff at
//!   once: in-flight jobs go on in the background (their outcomes still become durable; their
//!   acks fail, the broker redelivers them and the redelivered job is skipped), so a dead
//!   channel never stalls the worker. They keep their slots: at most `concurrency` jobs run
//!   at once across sessions, and a delivery whose session died before it got a slot is not
//!   run at all;
//! - on shutdown the consumer is cancelled first, in-flight jobs get the grace period, and
//!   whatever is still unacked goes back to the broker when the channel closes;
//! - every session also runs the dead-letter inbox ([`super::dead_inbox`]) on its own channel
//!   of the same connection: it starts and stops with the session, and its end is a lost
//!   session.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, warn};

use crate::http::Readiness;
use crate::jobs::{DeadLetter, Disposition, JobRunner};
use crate::metrics as m;
use crate::triage::ticket;

use super::amqp::{self, AmqpError};
use super::dead_inbox::DeadInbox;
use super::topology::{DEAD_KEY, Topology};

/// Settings of a fleet worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub amqp_url: String,
    /// How long connecting to the broker (TCP and handshake) may take.
    pub connect_timeout: Duration,
    pub topology: Topology,
    /// Jobs at once; also the prefetch count.
    pub concurrency: u16,
    /// How long in-flight jobs may run after SIGTERM before they are handed back.
    pub shutdown_grace: Duration,
    /// Declare the topology (off when it is loaded from definitions and the user may not
    /// configure).
    pub declare: bool,
    pub worker_id: String,
}

/// Why the worker stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("AMQP URL {0}: must start with amqp:// or amqps://")]
    BadUrl(String),
    /// The first connection failed: a worker that never reached its broker is misconfigured
    /// (or started before it); it exits so the operator, or the orchestrator's restart
    /// backoff, sees why. Once connected, losses are reconnected for ever.
    #[error("first connection to the broker failed: {0}")]
    FirstConnect(AmqpError),
    #[error(transparent)]
    Topology(#[from] super::topology::TopologyError),
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Consumes until `shutdown` resolves, reconnecting after broker failures.
pub async fn run_worker(
    cfg: WorkerConfig,
    runner: JobRunner,
    ready: Readiness,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    if !amqp::is_amqp_url(&cfg.amqp_url) {
        return Err(WorkerError::BadUrl(amqp::redacted(&cfg.amqp_url)));
    }
    cfg.topology.validate()?;
    let runner = Arc::new(runner);
    tokio::pin!(shutdown);
    let mut backoff = amqp::reconnect_backoff();
    // In-flight jobs outlive a lost session: they are drained only at shutdown.
    let mut in_flight = InFlight::new(cfg.concurrency);
    // Whether a session was ever opened: only a session opened after that is a reconnect, and
    // a worker that never connected stops instead of retrying a broker it may never reach.
    let mut opened_before = false;
    loop {
        let end = match session(&cfg, &runner, &ready, &mut in_flight, &mut shutdown, &mut opened_before).await {
            Ok(end) => end,
            Err(e) if !opened_before => return Err(WorkerError::FirstConnect(e)),
            Err(e) => SessionEnd::Lost(e.to_string()),
        };
        ready.set(false);
        match end {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Lost(why) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                warn!(
                    error = %why, ?delay, in_flight = in_flight.tasks.len(), broker = %amqp::redacted(&cfg.amqp_url),
                    "broker connection lost; reconnecting"
                );
                let reconnect = tokio::time::sleep(delay);
                tokio::pin!(reconnect);
                loop {
                    tokio::select! {
                        () = &mut shutdown => {
                            in_flight.finish(cfg.shutdown_grace).await;
                            return Ok(());
                        }
                        () = &mut reconnect => {
                            if opened_before {
                                metrics::counter!(m::RECONNECT_ATTEMPTS).increment(1);
                            }
                            break;
                        }
                        Some(_) = in_flight.tasks.join_next(), if !in_flight.tasks.is_empty() => {}
                    }
                }
            }
        }
    }
}

/// Jobs running in this worker, whichever session delivered them: at most `concurrency` run
/// at once, also while a lost session's jobs finish after a reconnect.
struct InFlight {
    tasks: JoinSet<()>,
    slots: Arc<Semaphore>,
}

impl InFlight {
    fn new(concurrency: u16) -> InFlight {
        InFlight { tasks: JoinSet::new(), slots: Arc::new(Semaphore::new(usize::from(concurrency.max(1)))) }
    }

    fn spawn(&mut self, delivery: Delivery, runner: Arc<JobRunner>, publish: Channel, topology: Topology) {
        let slots = Arc::clone(&self.slots);
        self.tasks.spawn(async move {
            // The semaphore is never closed.
            let Ok(_slot) = slots.acquire_owned().await else { return };
            if !publish.status().connected() {
                // Its session is gone and the delivery is back on the broker: not ours to run.
                return;
            }
            handle(delivery, &runner, &publish, &topology).await;
        });
    }

    /// Shutdown: in-flight jobs get the grace period.
    async fn finish(&mut self, grace: Duration) {
        info!(in_flight = self.tasks.len(), ?grace, "shutting down: finishing in-flight jobs");
        drain(&mut self.tasks, grace).await;
    }
}

/// An open connection with its channels and consumer.
struct Session {
    conn: Connection,
    consume: Channel,
    publish: Channel,
    consumer: lapin::Consumer,
    tag: String,
    inbox: DeadInbox,
}

async fn open_session(cfg: &WorkerConfig, store: &crate::store::DynStore) -> Result<Session, AmqpError> {
    let conn =
        amqp::connect_within(&cfg.amqp_url, &format!("ferry-worker {}", cfg.worker_id), cfg.connect_timeout).await?;
    let consume = conn.create_channel().await?;
    if cfg.declare {
        cfg.topology.declare(&consume).await?;
    } else {
        // Loaded from definitions: an older file without an exchange this worker publishes
        // to (the retry exchange) must fail here, by name, not close the channel at a retry.
        cfg.topology.check_exists(&consume).await?;
    }
    let publish = amqp::confirm_channel(&conn).await?;
    consume.basic_qos(cfg.concurrency.max(1), BasicQosOptions::default()).await?;
    let tag = format!("{}-{:08x}", cfg.worker_id, rand::random::<u32>());
    let consumer = consume
        .basic_consume(
            cfg.topology.work_queue().as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let inbox = DeadInbox::start(&conn, &cfg.topology, store.clone(), &tag).await?;
    Ok(Session { conn, consume, publish, consumer, tag, inbox })
}

async fn session(
    cfg: &WorkerConfig,
    runner: &Arc<JobRunner>,
    ready: &Readiness,
    in_flight: &mut InFlight,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
    opened_before: &mut bool,
) -> Result<SessionEnd, AmqpError> {
    // Opening can hang on an unreachable broker: SIGTERM must still be heard.
    let Session { conn, consume, publish, mut consumer, tag, mut inbox } = tokio::select! {
        biased;
        () = &mut *shutdown => {
            in_flight.finish(cfg.shutdown_grace).await;
            return Ok(SessionEnd::Shutdown);
        }
        opened = open_session(cfg, runner.migrator.store()) => opened?,
    };
    if *opened_before {
        metrics::counter!(m::RECONNECTS).increment(1);
    }
    *opened_before = true;
    ready.set(true);
    info!(queue = %cfg.topology.work_queue(), prefetch = cfg.concurrency, "consuming");
    let end = loop {
        tokio::select! {
            () = &mut *shutdown => break SessionEnd::Shutdown,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => in_flight.spawn(delivery, runner.clone(), publish.clone(), cfg.topology.clone()),
                Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
                None => break SessionEnd::Lost("consumer stream ended".into()),
            },
            Some(_) = in_flight.tasks.join_next(), if !in_flight.tasks.is_empty() => {}
            () = inbox.ended() => break SessionEnd::Lost("the dead-letter inbox consumer ended".into()),
        }
    };
    ready.set(false);
    if let SessionEnd::Shutdown = &end {
        let _ = consume.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
        in_flight.finish(cfg.shutdown_grace).await;
    }
    // After the jobs: the dead letters of those that finished in the grace are settled too.
    inbox.stop().await;
    // After a loss this also fails the in-flight jobs' pending publishes and acks at once
    // (their deliveries are back on the broker), so none waits on a dead channel.
    close(&conn, &consume, &publish).await;
    Ok(end)
}

/// Waits for in-flight jobs up to `grace`, then abandons the rest (their deliveries return to
/// the broker when the channel closes).
async fn drain(tasks: &mut JoinSet<()>, grace: Duration) {
    let finished = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        warn!(handed_back = tasks.len(), "grace period over: handing unfinished jobs back to the broker");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

async fn close(conn: &Connection, consume: &Channel, publish: &Channel) {
    let _ = publish.close(200, "bye".into()).await;
    let _ = consume.close(200, "bye".into()).await;
    let _ = conn.close(200, "bye".into()).await;
}

/// Runs one delivery and settles it, in the job's span: the run's lines and the settle's
/// (retry, dead letter, hand-back) carry its actor, campaign and worker.
async fn handle(delivery: Delivery, runner: &JobRunner, publish: &Channel, topology: &Topology) {
    let span = runner.span(&delivery.data);
    handle_in_span(delivery, runner, publish, topology).instrument(span).await;
}

async fn handle_in_span(delivery: Delivery, runner: &JobRunner, publish: &Channel, topology: &Topology) {
    let attempts = amqp::attempts_before(&delivery.properties).saturating_add(1);
    let token = amqp::str_header(&delivery.properties, ticket::TOKEN_HEADER);
    let deliveries = amqp::int_header(&delivery.properties, amqp::DELIVERY_COUNT_HEADER).unwrap_or(0);
    // A panic in a job is a bug; hand the job back instead of holding its prefetch slot, so
    // it reaches the delivery limit below if it keeps happening.
    let run = async {
        if deliveries >= topology.delivery_limit {
            // Handed back this often (crashes, panics, shutdowns): once more and the broker
            // would dead-letter it past the triage index, so the worker does it instead.
            runner.delivery_limit_reached(&delivery.data, attempts, deliveries, token.as_deref()).await
        } else {
            runner.run_delivery_in_current_span(&delivery.data, attempts, token.as_deref()).await
        }
    };
    let run = std::panic::AssertUnwindSafe(run);
    let Ok(disposition) = futures::FutureExt::catch_unwind(run).await else {
        error!("a job panicked; handing it back");
        if let Err(e) = delivery.acker.reject(BasicRejectOptions { requeue: true }).await {
            warn!(error = %e, "could not hand back a delivery");
        }
        return;
    };
    let settle_started = std::time::Instant::now();
    let migrated = matches!(&disposition, Disposition::Ack(o) if o.kind() == crate::migrate::OutcomeKind::Migrated);
    let settled = match disposition {
        Disposition::Ack(_) | Disposition::Superseded => Ok(()),
        Disposition::Retry { delay, error, uses_attempt } => {
            // A deferred job goes back with the attempts it came with.
            let counted = if uses_attempt { attempts } else { attempts - 1 };
            retry(&delivery, publish, topology, counted, delay, &error).await
        }
        Disposition::DeadLetter(dead) => dead_letter(&delivery, publish, topology, &dead).await,
    };
    let result = match settled {
        Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await,
        Err(e) => {
            error!(error = %e, "could not publish a job's retry or dead letter; handing it back");
            delivery.acker.reject(BasicRejectOptions { requeue: true }).await
        }
    };
    if migrated {
        metrics::histogram!(m::JOB_STEP_SECONDS, "step" => m::SETTLE_STEP)
            .record(settle_started.elapsed().as_secs_f64());
    }
    // Not settled (an error, or `false` from a closed channel): the broker redelivers the job,
    // which is then skipped or redone.
    match result {
        Ok(true) => {}
        Ok(false) => warn!("could not settle a delivery: its channel is closed"),
        Err(e) => warn!(error = %e, "could not settle a delivery"),
    }
}

async fn retry(
    delivery: &Delivery,
    publish: &Channel,
    topology: &Topology,
    attempts: u32,
    delay: Duration,
    error: &str,
) -> Result<(), AmqpError> {
    let tier = Topology::retry_tier_for(delay);
    let mut headers = amqp::headers(&[
        (amqp::ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::from(attempts))),
        (amqp::LAST_ERROR_HEADER, amqp::long_string(&error.chars().take(500).collect::<String>())),
    ]);
    // A requeued job keeps its ticket's token through its retries.
    if let Some(token) = amqp::str_header(&delivery.properties, ticket::TOKEN_HEADER) {
        headers.insert(ticket::TOKEN_HEADER.into(), amqp::long_string(&token));
    }
    let id = delivery.properties.message_id().as_ref().map(|s| s.as_str().to_string()).unwrap_or_default();
    let props = amqp::json_properties(&id, headers);
    amqp::publish_confirmed(publish, &topology.retry_exchange(), &Topology::retry_key(tier), &delivery.data, props)
        .await
}

async fn dead_letter(
    delivery: &Delivery,
    publish: &Channel,
    topology: &Topology,
    dead: &DeadLetter,
) -> Result<(), AmqpError> {
    let headers = amqp::headers(&[
        (amqp::REASON_HEADER, amqp::long_string(dead.reason.as_str())),
        (amqp::ACTOR_HEADER, amqp::long_string(&dead.actor_id)),
        (amqp::CAMPAIGN_HEADER, amqp::long_string(&dead.campaign)),
        (amqp::ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::from(dead.attempts))),
        // Already in the store's index: the dead-letter inbox only acks it.
        (amqp::INDEXED_HEADER, AMQPValue::LongLongInt(1)),
    ]);
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|| format!("{}/{}", dead.campaign, dead.actor_id));
    amqp::publish_confirmed(
        publish,
        &topology.dead_exchange(),
        DEAD_KEY,
        &dead.encode(),
        amqp::json_properties(&id, headers),
    )
    .await
}

/// Everything `ferry-worker run` needs.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub store_url: String,
    /// The store's layout (`--layout`).
    pub layout: crate::layout::Layout,
    pub worker: WorkerConfig,
    pub migrate: crate::migrate::MigrateConfig,
    pub retry: crate::jobs::RetryPolicy,
    pub memory_budget: u64,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (none: not served).
    pub http: Option<std::net::SocketAddr>,
}

/// Why the fleet worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Names the address and where it came from: two workers on one host collide on the
    /// default port.
    #[error("HTTP listener on {addr} (--http / FERRY_HTTP_ADDR): {cause}")]
    Http { addr: std::net::SocketAddr, cause: std::io::Error },
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// Opens the store, serves HTTP, and consumes until `shutdown`.
pub async fn run(cfg: FleetConfig, shutdown: impl Future<Output = ()>) -> Result<(), FleetError> {
    // A connection per job, two spare, and one for the dead-letter inbox (it makes one store
    // call at a time), so admitting dead letters never waits behind the jobs.
    let pool = usize::from(cfg.worker.concurrency) + 3;
    // The worker never creates its store: a wrong URL must fail, not ack a campaign away.
    let opts = crate::store::OpenOptions::new(pool, crate::store::OpenMode::Existing)
        .layout(cfg.layout)
        .lease_ttl(cfg.migrate.lease_ttl());
    let store = crate::store::open_with(&cfg.store_url, &opts).await?;
    info!(store = %store.describe(), broker = %amqp::redacted(&cfg.worker.amqp_url), "worker starting");
    let ready = Readiness::default();
    let http = match cfg.http {
        Some(addr) => {
            let (bound, task) = crate::http::serve(addr, crate::http::install_metrics(), ready.clone())
                .await
                .map_err(|cause| FleetError::Http { addr, cause })?;
            info!(%bound, "serving /metrics, /healthz, /readyz");
            Some(task)
        }
        None => None,
    };
    let runner = JobRunner {
        migrator: crate::migrate::Migrator::new(store, Arc::new(crate::clock::SystemClock), cfg.migrate),
        retry: cfg.retry,
        budget: crate::budget::MemoryBudget::new(cfg.memory_budget),
        gate: Some(Arc::new(crate::jobs::CampaignGate::new(ready.clone()))),
    };
    let result = run_worker(cfg.worker, runner, ready, shutdown).await;
    if let Some(task) = http {
        task.abort();
    }
    info!("worker stopped");
    Ok(result?)
}
