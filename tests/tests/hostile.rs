//! Hostile job messages on the real broker: huge, deeply nested, invalid UTF-8, NUL bytes,
//! actor ids that try to escape their prefix, unknown recoveries, wrong versions, bodies that
//! are not objects. Each is dead-lettered `bad_message` by the built `ferry-worker run`, the
//! store is left byte for byte as it was but for the triage index's `bad_message` records (not
//! even an audit record), and the worker keeps running and migrates a good job published after
//! them. Run on both store backends.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use ferry::ActorId;
use ferry::DeadLetterReason;
use ferry::clock::{Clock, SystemClock};
use ferry::jobs::Job;
use ferry::jobs::dead::{DeadLetter, KEPT_MESSAGE_BYTES};
use ferry::jobs::message::MAX_MESSAGE_BYTES;
use ferry::migrate::OutcomeKind;
use ferry::queue::amqp;
use ferry::store::{DynStore, KeyRange, KeyValue, for_each_row};
use ferry::testing::{Backend, TestStore};
use ferry::triage::index;
use ferry::v1::{ReadOptions, read_v1};
use ferry::v2::{Origin, read_v2};
use ferry_tests::{Broker, Message, Seed, WorkerSpec, audits, bin, bounded, register_campaign, wait_until};

/// Every test finishes well within this, or fails (its processes killed, its queues deleted).
const LIMIT: Duration = Duration::from_secs(55);
/// A worker asked to stop (SIGTERM) exits within this.
const STOP: Duration = Duration::from_secs(15);
const CAMPAIGN: &str = "hostile-c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_dead_lettered_bad_message_and_reach_only_the_triage_index_of_the_sqlite_store()
-> Result<()> {
    hostile_messages(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_dead_lettered_bad_message_and_reach_only_the_triage_index_of_the_postgres_store()
-> Result<()> {
    hostile_messages(Backend::Postgres).await
}

fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// Every row of the store.
async fn whole(store: &DynStore) -> Result<Vec<KeyValue>> {
    let mut rows = Vec::new();
    for_each_row(&**store, &KeyRange::new(Vec::new(), vec![0xff; 16]), 1024, |k, v| {
        rows.push((k.to_vec(), v));
        Ok(())
    })
    .await?;
    Ok(rows)
}

/// A job body with `actor_id` spliced in as raw JSON (a string literal, usually).
fn job_with_actor(actor_json: &str) -> Vec<u8> {
    format!(r#"{{"version":1,"campaign":"{CAMPAIGN}","actor_id":{actor_json},"enqueued_at_ms":0,"recovery":null}}"#)
        .into_bytes()
}

/// The hostile bodies, by message id. `good` is a planted actor: the bodies naming it would
/// reach its v1 data if they got past the parser.
fn hostile_bodies(good: &ActorId) -> Vec<(&'static str, Vec<u8>)> {
    let huge = format!("\"{}\"", "x".repeat(1024 * 1024)).into_bytes();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    // Under the size limit, so it is the parser that refuses it.
    let deep_small = format!(r#"{{"version":{}{}}}"#, "[".repeat(8_000), "]".repeat(8_000)).into_bytes();
    let mut invalid_utf8_id = job_with_actor("\"good-\u{1}\"");
    let at = invalid_utf8_id.iter().position(|&b| b == 1).expect("marker byte");
    invalid_utf8_id.splice(at..=at, [0xff, 0xfe, 0xc3]);
    let mut raw_nul_in_id = job_with_actor("\"a\u{1}b\"");
    let at = raw_nul_in_id.iter().position(|&b| b == 1).expect("marker byte");
    raw_nul_in_id[at] = 0;
    vec![
        ("huge-json-string", huge),
        ("deeply-nested", deep),
        ("deeply-nested-under-the-size-limit", deep_small),
        ("invalid-utf8-bytes", vec![0xff, 0xfe, 0xfd, 0x80, b'{', 0xc0, 0xaf]),
        ("invalid-utf8-in-actor-id", invalid_utf8_id),
        ("actor-dot-dot-slash", job_with_actor(r#""../x""#)),
        ("actor-slash", job_with_actor(r#""a/b""#)),
        ("actor-dot-dot", job_with_actor(r#""..""#)),
        ("actor-prefix-escape", job_with_actor(&format!(r#""{good}/../other""#))),
        ("actor-empty", job_with_actor(r#""""#)),
        ("actor-10k-chars", job_with_actor(&format!("\"{}\"", "a".repeat(10_000)))),
        ("actor-escaped-nul", job_with_actor(r#""a\u0000b""#)),
        ("actor-raw-nul", raw_nul_in_id),
        ("actor-number", job_with_actor("42")),
        (
            "unknown-recovery",
            format!(
                r#"{{"version":1,"campaign":"{CAMPAIGN}","actor_id":"{good}","enqueued_at_ms":0,"recovery":"rm_rf"}}"#
            )
            .into_bytes(),
        ),
        (
            "wrong-version",
            format!(r#"{{"version":2,"campaign":"{CAMPAIGN}","actor_id":"{good}","enqueued_at_ms":0,"recovery":null}}"#)
                .into_bytes(),
        ),
        (
            "campaign-slash",
            format!(r#"{{"version":1,"campaign":"a/../b","actor_id":"{good}","enqueued_at_ms":0,"recovery":null}}"#)
                .into_bytes(),
        ),
        (
            "unknown-field",
            format!(
                r#"{{"version":1,"campaign":"{CAMPAIGN}","actor_id":"{good}","enqueued_at_ms":0,"recovery":null,"rm":true}}"#
            )
            .into_bytes(),
        ),
        ("json-number", b"1763900000000".to_vec()),
        ("json-array", format!(r#"["{good}"]"#).into_bytes()),
        ("json-null", b"null".to_vec()),
        ("empty-body", Vec::new()),
        ("nul-bytes", vec![0; 64]),
    ]
}

async fn hostile_messages(backend: Backend) -> Result<()> {
    bin("ferry-worker");
    bin("ferry-producer");
    bounded(LIMIT, async {
        let logs = tempfile::tempdir()?;
        let ts = TestStore::new(backend).await;
        let store = ts.store();
        let broker = Broker::new("hostile").await?;
        let seed = Seed::new(3, "hostile");
        seed.run(&ts.url)?;
        let plan = seed.plan();
        let good = plan[0].0.clone();
        register_campaign(&store, CAMPAIGN).await?;
        let before = whole(&store).await?;
        ensure!(before.iter().any(|(k, _)| k.starts_with(b"v1/")), "the seed planted v1 data");

        let bodies = hostile_bodies(&good);
        let huge = bodies.iter().map(|(_, b)| b.len()).max().unwrap_or(0);
        ensure!(huge > 64 * MAX_MESSAGE_BYTES, "a body of {huge} bytes");
        for (id, body) in &bodies {
            broker.publish_raw(body, id).await.with_context(|| format!("publishing {id}"))?;
        }
        let since = now_ms();
        let mut w = WorkerSpec::new(&ts.url, &broker.topology, "hostile").concurrency(2).start(logs.path())?;
        let broker_ref = &broker;
        let n = bodies.len();
        wait_until(Duration::from_secs(30), "every hostile message is dead-lettered", || async move {
            Ok(broker_ref.dead_log_depth().await? as usize >= n)
        })
        .await?;
        ensure!(w.running(), "the worker stopped on a hostile message");
        ensure!(broker.pending().await? == 0, "hostile messages left in the work or retry queues");

        // Nothing reached the store but the triage index: every other row as it was, no audit,
        // no lease, no v2; the index holds bad messages only.
        let after = whole(&store).await?;
        let (index, rest): (Vec<KeyValue>, Vec<KeyValue>) = after.into_iter().partition(|(k, _)| {
            [index::DEAD_BAD_PREFIX, index::BY_REASON_PREFIX, index::BY_CAMPAIGN_PREFIX]
                .iter()
                .any(|p| k.starts_with(p))
        });
        ensure!(rest == before, "the store changed: {} rows before, {} after", before.len(), rest.len());
        let summary = index::summary(&*store).await?;
        ensure!(summary.iter().all(|g| g.reason == "bad_message"), "{summary:?}");
        let indexed: u64 = summary.iter().map(|g| g.count).sum();
        // Bodies that share their first kept bytes are one bad message to triage.
        ensure!(indexed >= 1 && indexed as usize <= n && !index.is_empty(), "{indexed} indexed of {n}: {summary:?}");

        let messages: Vec<Message> = broker.dead_log().await?;
        ensure!(messages.len() == n, "{} dead letters for {n} hostile messages", messages.len());
        let mut by_id: BTreeMap<String, (Message, DeadLetter)> = BTreeMap::new();
        for m in messages {
            let id = m.properties.message_id().as_ref().map(|s| s.as_str().to_string()).context("message id")?;
            let dl = DeadLetter::decode(&m.body)
                .with_context(|| format!("{id}: dead letter body {:?}", String::from_utf8_lossy(&m.body)))?;
            ensure!(by_id.insert(id.clone(), (m, dl)).is_none(), "{id} dead-lettered twice");
        }
        for (id, body) in &bodies {
            let (m, dl) = by_id.get(*id).with_context(|| format!("no dead letter for {id}"))?;
            ensure!(dl.reason == DeadLetterReason::BadMessage, "{id}: {dl:?}");
            ensure!(m.str_header(amqp::REASON_HEADER).as_deref() == Some("bad_message"), "{id}: reason header");
            ensure!(dl.phase == "parse", "{id}: phase {}", dl.phase);
            ensure!(dl.worker == w.name, "{id}: worker {}", dl.worker);
            ensure!(dl.at_ms >= since - 1000 && !dl.error.is_empty(), "{id}: {dl:?}");
            ensure!(dl.v1_files.is_none() && dl.recovery.is_none(), "{id}: a bad message never reads the store");
            ensure!(dl.attempts == 1, "{id}: {} attempts", dl.attempts);
            // The body is kept as documented: its first KEPT_MESSAGE_BYTES bytes, lossy UTF-8.
            let kept = String::from_utf8_lossy(&body[..body.len().min(KEPT_MESSAGE_BYTES)]);
            ensure!(dl.message == kept, "{id}: kept body {:?}", dl.message.chars().take(80).collect::<String>());
            if body.len() <= KEPT_MESSAGE_BYTES && std::str::from_utf8(body).is_ok() {
                ensure!(dl.message.as_bytes() == body.as_slice(), "{id}: a small UTF-8 body is kept whole");
            }
            // The actor named, as the message named it (at most 80 characters), also in a header.
            ensure!(dl.actor_id.chars().count() <= 80, "{id}: actor id of {} chars", dl.actor_id.len());
            ensure!(m.str_header(amqp::ACTOR_HEADER).as_deref() == Some(dl.actor_id.as_str()), "{id}: actor header");
        }
        for (id, (_, dl)) in &by_id {
            eprintln!("{id}: {}", dl.error.chars().take(120).collect::<String>());
        }
        let actor_of = |id: &str| by_id[id].1.actor_id.clone();
        ensure!(actor_of("actor-dot-dot-slash") == "../x");
        ensure!(actor_of("actor-slash") == "a/b");
        ensure!(actor_of("actor-empty").is_empty());
        ensure!(actor_of("actor-10k-chars") == "a".repeat(80));
        ensure!(actor_of("actor-escaped-nul") == "a\0b");
        ensure!(actor_of("unknown-recovery") == good.as_str());
        ensure!(by_id["unknown-recovery"].1.campaign == CAMPAIGN);
        ensure!(actor_of("huge-json-string").is_empty() && actor_of("nul-bytes").is_empty());
        ensure!(by_id["huge-json-string"].1.message.len() == KEPT_MESSAGE_BYTES, "the huge body is truncated");
        ensure!(by_id["invalid-utf8-bytes"].1.message.contains('\u{fffd}'), "invalid UTF-8 is kept lossily");

        // The worker is still at work: a good job published after them is migrated.
        let job = Job::new(CAMPAIGN, good.clone(), now_ms(), None);
        broker.publish_job(&job).await?;
        let store_ref = &store;
        let good_ref = &good;
        wait_until(Duration::from_secs(20), "the good job is migrated", || async move {
            Ok(audits(store_ref).await?.contains_key(good_ref.as_str()))
        })
        .await?;
        let all = audits(&store).await?;
        ensure!(all.len() == 1, "audit records: {:?}", all.keys());
        let audit = &all[good.as_str()];
        ensure!(audit.outcome == OutcomeKind::Migrated && audit.campaign == CAMPAIGN, "{audit:?}");
        let v1 = read_v1(&*store, &good, ReadOptions::default()).await?;
        let v2 = read_v2(&*store, &good).await?;
        ensure!(v2.head.origin == Origin::MigratedFromV1);
        ensure!(v2.file == v1.main, "v2 of the good job differs from its v1");
        ensure!(w.running(), "the worker stopped");
        ensure!(broker.dead_log().await?.len() == n && broker.pending().await? == 0, "queues after the good job");
        ensure!(!w.log().contains("panicked"), "the worker panicked");
        w.stop(STOP).await?;
        broker.delete().await.map_err(|e| anyhow!("{e:#}"))
    })
    .await
}
