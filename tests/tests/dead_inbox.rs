//! The dead-letter inbox and log, end to end: `ferry-worker run` processes on the machine's
//! RabbitMQ, against a SQLite or PostgreSQL store (where the store matters, both).
//!
//! What is proven: a job the broker dead-lettered by itself is admitted into the store's
//! triage index by a running worker, once however often it arrives; ferry's own dead letter
//! (marked `x-ferry-indexed`) is acked and never admitted; every dead letter, ferry's and the
//! broker's, stays in the `{p}.dead-log` stream after the inbox drained; a store outage holds
//! the letter unacked in the worker (never handed back, so its delivery count does not grow)
//! until the store is back; and the deploy policy of the inbox loads on this broker, applies
//! to the inbox only, and at its delivery limit (lowered for the test) moves the letter to the
//! log without a loop.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry::ActorId;
use ferry::DeadLetterReason;
use ferry::clock::{Clock, SystemClock};
use ferry::jobs::{DeadLetter, Job};
use ferry::queue::Topology;
use ferry::queue::amqp;
use ferry::queue::topology::INBOX_DELIVERY_LIMIT;
use ferry::store::{DynStore, Txn};
use ferry::testing::{Backend, TestStore};
use ferry::triage::index::{self, LetterId};
use ferry_tests::{
    Broker, LOG_MARK_HEADER, Message, Policy, WorkerSpec, bounded, broker_dead_lettered, management, sample, scrape,
    wait_until,
};
use lapin::options::{BasicGetOptions, BasicRejectOptions};
use lapin::types::AMQPValue;

/// Every test finishes well within this, or fails (its processes killed, its queues deleted).
const LIMIT: Duration = Duration::from_secs(90);
/// A worker asked to stop (SIGTERM) exits within this.
const STOP: Duration = Duration::from_secs(20);
/// How long a running worker may take to settle an inbox message.
const SETTLE: Duration = Duration::from_secs(15);

fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// One test's store (shared with its worker) and a directory for process logs.
struct Ctx {
    logs: tempfile::TempDir,
    test_store: TestStore,
}

impl Ctx {
    async fn new(backend: Backend) -> Result<Ctx> {
        Ok(Ctx { logs: tempfile::tempdir()?, test_store: TestStore::new(backend).await })
    }

    fn url(&self) -> &str {
        &self.test_store.url
    }

    fn store(&self) -> DynStore {
        self.test_store.store()
    }

    fn logs(&self) -> &std::path::Path {
        self.logs.path()
    }
}

/// The worker's count of inbox messages settled as `kind`.
async fn settled(addr: std::net::SocketAddr, kind: &str) -> Result<f64> {
    Ok(sample(&scrape(addr).await?, ferry::metrics::DEAD_INBOX, &format!("kind=\"{kind}\"")))
}

/// The dead letter of `actor` in the store index, if any.
async fn indexed(store: &DynStore, actor: &ActorId) -> Result<Option<index::Stored>> {
    Ok(index::get(&**store, &LetterId::Actor(actor.clone())).await?)
}

/// A job for `actor` of a campaign named after the test.
fn job(actor: &str) -> Result<Job> {
    Ok(Job::new("inbox-campaign", ActorId::parse(actor)?, now_ms(), None))
}

/// What `ferry-worker` publishes for one of its own dead letters: the record, with the
/// headers of `queue::worker::dead_letter` (marked indexed).
fn own_dead_letter(job: &Job) -> (Vec<u8>, lapin::BasicProperties) {
    let dead = DeadLetter {
        actor_id: job.actor_id.to_string(),
        campaign: job.campaign.clone(),
        reason: DeadLetterReason::JournalSidecar,
        phase: "inspect".into(),
        error: "hot journal".into(),
        attempts: 1,
        worker: "elsewhere".into(),
        at_ms: now_ms(),
        v1_files: None,
        recovery: None,
        message: String::from_utf8_lossy(&job.encode()).into_owned(),
    };
    let headers = amqp::headers(&[
        (amqp::REASON_HEADER, amqp::long_string(dead.reason.as_str())),
        (amqp::ACTOR_HEADER, amqp::long_string(&dead.actor_id)),
        (amqp::CAMPAIGN_HEADER, amqp::long_string(&dead.campaign)),
        (amqp::ATTEMPTS_HEADER, AMQPValue::LongLongInt(1)),
        (amqp::INDEXED_HEADER, AMQPValue::LongLongInt(1)),
    ]);
    (dead.encode(), amqp::json_properties(&job.message_id(), headers))
}

/// The queue and reason of a message's first death (`x-first-death-*`: the `x-death` array
/// does not survive a RabbitMQ 3.x stream, these do).
fn first_death(m: &Message) -> (Option<String>, Option<String>) {
    (m.str_header("x-first-death-queue"), m.str_header("x-first-death-reason"))
}

async fn a_job_the_broker_dead_lettered_is_admitted_into_the_store_index_once_even_if_published_twice(
    backend: Backend,
) -> Result<()> {
    bounded(LIMIT, async {
        let ctx = Ctx::new(backend).await?;
        let store = ctx.store();
        let broker = Broker::new("inbox_admit").await?;
        let mut w = WorkerSpec::new(ctx.url(), &broker.topology, "inbox").http().start(ctx.logs())?;
        let addr = w.http_addr().await?;
        w.consuming().await?;

        let job = job("inbox-admit-1")?;
        let props = broker_dead_lettered(&broker.topology, &job);
        broker.publish_dead(&job.encode(), props.clone()).await?;
        wait_until(SETTLE, "the broker's dead letter is in the store index", || {
            let (store, actor) = (store.clone(), job.actor_id.clone());
            async move { Ok(indexed(&store, &actor).await?.is_some()) }
        })
        .await?;
        let first = indexed(&store, &job.actor_id).await?.context("admitted")?;
        let d = &first.letter;
        assert_eq!(
            (d.reason, d.campaign.as_str(), d.phase.as_str()),
            (DeadLetterReason::DeliveryLimit, "inbox-campaign", "broker")
        );
        assert!(d.error.contains("delivery_limit"), "{d:?}");
        assert_eq!(Job::parse(d.message.as_bytes())?, job, "the letter keeps the job to requeue");

        // The same message again (a second copy, or a redelivery after a lost ack).
        broker.publish_dead(&job.encode(), props).await?;
        wait_until(SETTLE, "the second copy is settled as a duplicate", || async move {
            Ok(settled(addr, "duplicate").await? == 1.0)
        })
        .await?;
        assert_eq!(settled(addr, "admitted").await?, 1.0);
        assert_eq!(settled(addr, "indexed_skip").await?, 0.0);
        let again = indexed(&store, &job.actor_id).await?.context("still indexed")?;
        assert_eq!(again.raw, first.raw, "the duplicate rewrote the record");
        let groups = index::summary(&*store).await?;
        assert_eq!(groups.len(), 1, "{groups:?}");
        assert_eq!((groups[0].reason.as_str(), groups[0].count), ("delivery_limit", 1), "{groups:?}");
        let inbox = broker.topology.dead_queue();
        wait_until(SETTLE, "the inbox is empty", || async { Ok(broker.depth(&inbox).await? == 0) }).await?;

        w.stop(STOP).await?;
        broker.delete().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_broker_dead_lettered_is_admitted_into_the_store_index_once_even_if_published_twice_sqlite()
-> Result<()> {
    a_job_the_broker_dead_lettered_is_admitted_into_the_store_index_once_even_if_published_twice(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_broker_dead_lettered_is_admitted_into_the_store_index_once_even_if_published_twice_postgres()
-> Result<()> {
    a_job_the_broker_dead_lettered_is_admitted_into_the_store_index_once_even_if_published_twice(Backend::Postgres)
        .await
}

async fn ferrys_own_dead_letter_is_acked_and_not_admitted_so_a_removed_record_stays_removed(
    backend: Backend,
) -> Result<()> {
    bounded(LIMIT, async {
        let ctx = Ctx::new(backend).await?;
        let store = ctx.store();
        let broker = Broker::new("inbox_own").await?;
        let mut w = WorkerSpec::new(ctx.url(), &broker.topology, "inbox").http().start(ctx.logs())?;
        let addr = w.http_addr().await?;
        w.consuming().await?;

        // The actor has a letter in the index, which an operator then removes (a requeue).
        let job = job("inbox-own-1")?;
        broker.publish_dead(&job.encode(), broker_dead_lettered(&broker.topology, &job)).await?;
        wait_until(SETTLE, "the letter is indexed", || {
            let (store, actor) = (store.clone(), job.actor_id.clone());
            async move { Ok(indexed(&store, &actor).await?.is_some()) }
        })
        .await?;
        let stored = indexed(&store, &job.actor_id).await?.context("indexed")?;
        let mut txn = Txn::new();
        index::remove(&mut txn, &stored.raw, &stored.letter);
        store.commit(txn).await?;

        // ferry's own dead letter of that actor reaches the inbox: acked, nothing written.
        let (body, props) = own_dead_letter(&job);
        broker.publish_dead(&body, props).await?;
        wait_until(SETTLE, "the own dead letter is settled", || async move {
            Ok(settled(addr, "indexed_skip").await? == 1.0)
        })
        .await?;
        assert!(indexed(&store, &job.actor_id).await?.is_none(), "an indexed letter was admitted again");
        assert_eq!(index::summary(&*store).await?, Vec::new());
        assert_eq!((settled(addr, "admitted").await?, settled(addr, "duplicate").await?), (1.0, 0.0));
        let inbox = broker.topology.dead_queue();
        wait_until(SETTLE, "the inbox is empty", || async { Ok(broker.depth(&inbox).await? == 0) }).await?;

        w.stop(STOP).await?;
        broker.delete().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferrys_own_dead_letter_is_acked_and_not_admitted_so_a_removed_record_stays_removed_sqlite() -> Result<()> {
    ferrys_own_dead_letter_is_acked_and_not_admitted_so_a_removed_record_stays_removed(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferrys_own_dead_letter_is_acked_and_not_admitted_so_a_removed_record_stays_removed_postgres() -> Result<()> {
    ferrys_own_dead_letter_is_acked_and_not_admitted_so_a_removed_record_stays_removed(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dead_letter_ferrys_and_the_brokers_stays_in_the_dead_log_after_the_inbox_drained() -> Result<()> {
    bounded(LIMIT, async {
        let ctx = Ctx::new(Backend::Sqlite).await?;
        let store = ctx.store();
        // A delivery limit of 1: the second hand-back makes the broker dead-letter the job.
        let broker = Broker::with_delivery_limit("inbox_log", 1).await?;

        // 1. The broker's own dead letter: a job handed back past the work queue's limit.
        let handed_back = job("inbox-log-limit")?;
        broker.publish_job(&handed_back).await?;
        let work = broker.topology.work_queue();
        let mut handbacks = 0;
        while let Some(got) = broker.channel().basic_get(work.as_str().into(), BasicGetOptions::default()).await? {
            got.delivery.acker.reject(BasicRejectOptions { requeue: true }).await?;
            handbacks += 1;
            ensure!(handbacks <= 5, "the broker never dead-lettered the job");
        }
        // 2. A dead letter another tool (or an older ferry) published: no mark.
        let raw = job("inbox-log-raw")?;
        broker.publish_dead(&raw.encode(), broker_dead_lettered(&broker.topology, &raw)).await?;
        // 3. ferry's own: a worker dead-letters a bad message (marked indexed).
        broker.publish_raw(b"not a job", "inbox/bad").await?;

        let mut w = WorkerSpec::new(ctx.url(), &broker.topology, "inbox").http().start(ctx.logs())?;
        let addr = w.http_addr().await?;
        w.consuming().await?;
        let inbox = broker.topology.dead_queue();
        wait_until(SETTLE, "the inbox settled all three", || async move {
            let n = settled(addr, "admitted").await? + settled(addr, "indexed_skip").await?;
            Ok(n == 3.0)
        })
        .await?;
        wait_until(SETTLE, "the inbox is empty", || async { Ok(broker.depth(&inbox).await? == 0) }).await?;
        for actor in [&handed_back.actor_id, &raw.actor_id] {
            let d = indexed(&store, actor).await?.with_context(|| format!("{actor} admitted"))?.letter;
            assert_eq!(d.reason, DeadLetterReason::DeliveryLimit, "{d:?}");
        }

        // The log still holds all three, read as often as anyone likes.
        for read in 0..2 {
            let log = broker.dead_log().await?;
            assert_eq!(log.len(), 3, "read {read}: {log:?}");
            let limit = broker.dead_log_of(handed_back.actor_id.as_str()).await?;
            assert_eq!(limit.len(), 1, "{limit:?}");
            assert_eq!(first_death(&limit[0]), (Some(work.clone()), Some("delivery_limit".into())), "{limit:?}");
            assert_eq!(Job::parse(&limit[0].body)?, handed_back);
            let raw_copy = broker.dead_log_of(raw.actor_id.as_str()).await?;
            assert_eq!(raw_copy.len(), 1, "{raw_copy:?}");
            let own: Vec<&Message> =
                log.iter().filter(|m| amqp::has_header(&m.properties, amqp::INDEXED_HEADER)).collect();
            assert_eq!(own.len(), 1, "{log:?}");
            assert_eq!(own[0].str_header(amqp::REASON_HEADER).as_deref(), Some("bad_message"));
            assert!(log.iter().all(|m| m.str_header(LOG_MARK_HEADER).is_none()));
        }
        w.stop(STOP).await?;
        broker.delete().await
    })
    .await
}

/// The `message_stats` counter `name` of a queue in the management API (0 while absent).
async fn queue_stat(queue: &str, name: &str) -> Result<u64> {
    let (status, body) = management("GET", &format!("/api/queues/%2F/{queue}"), None).await?;
    ensure!(status == 200, "GET queue {queue}: {status} {body}");
    let q: serde_json::Value = serde_json::from_str(&body)?;
    Ok(q["message_stats"][name].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_waits_unacked_in_the_worker_while_the_store_is_down_and_is_admitted_once_it_is_back()
-> Result<()> {
    bounded(LIMIT, async {
        let ctx = Ctx::new(Backend::Postgres).await?;
        let store = ctx.store();
        let broker = Broker::new("inbox_down").await?;
        // Statements waiting on a lock fail fast: the store is "down" while a test transaction
        // holds its table, and back when it ends.
        let url = format!("{}&options=-c%20lock_timeout%3D300", ctx.url());
        let schema = ctx.url().rsplit_once("schema=").context("schema in the URL")?.1.to_string();
        let mut w = WorkerSpec::new(&url, &broker.topology, "inbox").http().start(ctx.logs())?;
        let addr = w.http_addr().await?;
        w.consuming().await?;

        let (admin, conn) = tokio_postgres::connect(&ferry::testing::postgres_url(), tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        admin.batch_execute(&format!("BEGIN; LOCK TABLE {schema}.kv IN ACCESS EXCLUSIVE MODE")).await?;

        let job = job("inbox-down-1")?;
        broker.publish_dead(&job.encode(), broker_dead_lettered(&broker.topology, &job)).await?;
        let failure = "could not admit a dead letter";
        wait_until(SETTLE, "the worker retried the store twice", || {
            let n = w.log().matches(failure).count();
            async move { Ok(n >= 2) }
        })
        .await?;
        let line = w.log().lines().find(|l| l.contains(failure)).map(str::to_string).unwrap_or_default();
        assert!(line.contains("inbox-down-1") && line.contains("delivery_limit"), "{line}");
        assert!(!line.contains("enqueued_at_ms"), "a payload in the log: {line}");

        admin.batch_execute("ROLLBACK").await?;
        let inbox = broker.topology.dead_queue();
        wait_until(SETTLE, "the letter is admitted once the store is back", || {
            let (store, actor) = (store.clone(), job.actor_id.clone());
            async move { Ok(indexed(&store, &actor).await?.is_some()) }
        })
        .await?;
        assert_eq!(settled(addr, "admitted").await?, 1.0);
        // Never handed back: the broker delivered it once and never again (its quorum delivery
        // count did not grow). The management statistics arrive every few seconds.
        wait_until(SETTLE, "the management API counts the ack", || {
            let inbox = inbox.clone();
            async move { Ok(queue_stat(&inbox, "ack").await? >= 1) }
        })
        .await?;
        assert_eq!(queue_stat(&inbox, "redeliver").await?, 0, "the inbox letter was redelivered");
        assert_eq!(queue_stat(&inbox, "deliver").await?, 1, "the inbox letter was delivered more than once");

        w.stop(STOP).await?;
        conn.abort();
        broker.delete().await
    })
    .await
}

/// The policies of `topology` as the definitions carry them.
fn policy_entries(topology: &Topology) -> Vec<serde_json::Value> {
    topology.definitions("/")["policies"].as_array().cloned().unwrap_or_default()
}

/// The management API's view of a queue.
async fn queue_info(queue: &str) -> Result<serde_json::Value> {
    let (status, body) = management("GET", &format!("/api/queues/%2F/{queue}"), None).await?;
    ensure!(status == 200, "GET queue {queue}: {status} {body}");
    Ok(serde_json::from_str(&body)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_policy_of_the_definitions_loads_on_this_broker_and_applies_to_the_inbox_only() -> Result<()> {
    bounded(LIMIT, async {
        let broker = Broker::new("inbox_policy").await?;
        let t = broker.topology.clone();
        let entries = policy_entries(&t);
        assert_eq!(entries.len(), 1, "{entries:?}");
        let _policy = Policy::set(&t.inbox_policy(), &entries[0]).await?;
        let inbox = t.dead_queue();
        wait_until(SETTLE, "the inbox has the policy", || {
            let (inbox, name) = (inbox.clone(), t.inbox_policy());
            async move { Ok(queue_info(&inbox).await?["policy"] == name.as_str()) }
        })
        .await?;
        let effective = queue_info(&inbox).await?["effective_policy_definition"].clone();
        assert_eq!(effective["delivery-limit"], INBOX_DELIVERY_LIMIT, "{effective}");
        assert_eq!(effective["dead-letter-exchange"], t.dead_exchange().as_str(), "{effective}");
        assert_eq!(effective["dead-letter-routing-key"], ferry::queue::topology::DEAD_KEY, "{effective}");
        assert_eq!(effective["dead-letter-strategy"], "at-least-once", "{effective}");
        // The pattern is anchored: not the log, not the work queue, not another prefix's inbox.
        for other in [t.dead_log(), t.work_queue()] {
            let q = queue_info(&other).await?;
            assert!(q["policy"].is_null() || q["policy"] == "", "{other}: {}", q["policy"]);
        }
        broker.delete().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_inbox_delivery_limit_the_policy_moves_the_letter_to_the_log_without_a_loop() -> Result<()> {
    bounded(LIMIT, async {
        let broker = Broker::new("inbox_cycle").await?;
        let t = broker.topology.clone();
        // The shipped policy with a limit a test reaches.
        let mut entry = policy_entries(&t).into_iter().next().context("a policy")?;
        entry["definition"]["delivery-limit"] = serde_json::json!(1);
        let _policy = Policy::set(&t.inbox_policy(), &entry).await?;
        let inbox = t.dead_queue();
        wait_until(SETTLE, "the inbox has the policy", || {
            let inbox = inbox.clone();
            async move { Ok(queue_info(&inbox).await?["effective_policy_definition"]["delivery-limit"] == 1) }
        })
        .await?;

        // ferry's own letter: its only death will be the inbox's.
        let job = job("inbox-cycle-1")?;
        let (body, props) = own_dead_letter(&job);
        broker.publish_dead(&body, props).await?;
        // Handed back past the limit (what no ferry inbox does; a crashing consumer would).
        let mut handbacks = 0;
        while let Some(got) = broker.channel().basic_get(inbox.as_str().into(), BasicGetOptions::default()).await? {
            got.delivery.acker.reject(BasicRejectOptions { requeue: true }).await?;
            handbacks += 1;
            ensure!(handbacks <= 5, "the broker never dead-lettered the inbox letter");
        }
        let actor = job.actor_id.to_string();
        wait_until(SETTLE, "the dropped letter reaches the log", || async {
            Ok(broker.dead_log_of(&actor).await?.len() >= 2)
        })
        .await?;
        let copies = broker.dead_log_of(&actor).await?;
        assert_eq!(copies.len(), 2, "{copies:?}");
        assert_eq!(first_death(&copies[0]), (None, None), "{copies:?}");
        assert_eq!(first_death(&copies[1]), (Some(inbox.clone()), Some("delivery_limit".into())), "{copies:?}");
        assert_eq!(copies[1].body, body, "the letter itself");
        // Dead-lettered into a queue it already died in, with no rejection on the way: the
        // broker did not route it back to the inbox (only the log markers are there).
        let left = broker.drain(&inbox).await?;
        assert!(left.iter().all(|m| m.str_header(LOG_MARK_HEADER).is_some()), "the letter looped: {left:?}");
        broker.delete().await
    })
    .await
}
