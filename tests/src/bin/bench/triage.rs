//! The triage section (issue 15): `ferry-producer dlq ...` timed as an operator runs it, on a
//! backlog of N dead letters, on each backend.
//!
//! The fixture writes the backlog directly rather than through N migrations: real
//! [`DeadLetter`] records through [`ferry::triage::index::put`] (the record and its two index
//! entries, as a worker's dead-letter transaction writes them), 2,000 letters per store
//! transaction, and the same `DeadLetter::encode()` bodies, with the worker's headers, as
//! confirmed publishes to the dead-letter quorum queue of a unique prefix. Then each command
//! runs as a subprocess of the release `ferry-producer`, its wall time and peak RSS (GNU
//! `time`'s `%M`) measured, and the broker's memory (`mem_used`, read fresh from the
//! management API) is read before and after the whole session.

use std::collections::VecDeque;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use ferry::ActorId;
use ferry::DeadLetterReason as R;
use ferry::jobs::{DeadLetter, Job};
use ferry::queue::Topology;
use ferry::queue::amqp;
use ferry::queue::topology::DEAD_KEY;
use ferry::store::{DynStore, Txn, limits};
use ferry::testing::{Backend, TestStore, amqp_url, unique_name};
use ferry::triage::index;
use ferry::v1::V1Files;
use ferry::v2::{DBHead, Origin};
use ferry_tests::bin;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::Report;

/// Letters per store transaction of the fixture.
const TXN_LETTERS: usize = 2_000;
/// Confirms in flight while the fixture publishes.
const CONFIRM_WINDOW: usize = 2_048;
/// Actors requeued by name, and letters purged, in each session.
pub const MOVED: usize = 1_000;
/// The campaigns of the fixture: two large rollouts and a canary.
const CAMPAIGNS: [&str; 3] = ["rollout-eu", "rollout-us", "canary"];
/// The campaign `list --campaign C --reason wal_sidecar` reads.
const LIST_CAMPAIGN: &str = "rollout-us";
/// The purge's selection (`--reason retries_exhausted --campaign canary`): exactly
/// min(1,000, retries_exhausted letters) letters at every N.
const PURGE_CAMPAIGN: &str = "canary";
/// The targets at a million dead letters.
const PAGE_TARGET_SECS: f64 = 1.0;
const SUMMARY_TARGET_SECS: f64 = 30.0;
const BROKER_MEM_TARGET: f64 = 1.10;
/// The test broker's management API (guest:guest, like `amqp_url`).
const MANAGEMENT: (&str, u16) = ("127.0.0.1", 15672);
const MANAGEMENT_AUTH: &str = "Z3Vlc3Q6Z3Vlc3Q="; // base64("guest:guest")

/// splitmix64: a fixed, seedless spread of the letter number.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The fixture's dead letters, in the same order every time: 60% journal_sidecar, 25%
/// wal_sidecar, 10% integrity_check_failed, 5% retries_exhausted, over three campaigns, with
/// the errors, phases, attempts and v1 sizes a worker records for them.
struct Letters {
    i: u64,
    n: u64,
    retries: u64,
    now_ms: i64,
}

impl Letters {
    fn new(n: u64, now_ms: i64) -> Letters {
        Letters { i: 0, n, retries: 0, now_ms }
    }
}

/// A v1 main file size: most actors small, some medium, a few large (page-aligned).
fn main_size(h: u64) -> u64 {
    let pages = match h % 100 {
        0 => 256 + (h >> 8) % 32_512, // 1 to 128 MiB
        1..=9 => 16 + (h >> 8) % 240, // 64 KiB to 1 MiB
        _ => 1 + (h >> 8) % 15,       // 4 to 64 KiB
    };
    pages * 4096
}

impl Iterator for Letters {
    type Item = DeadLetter;

    fn next(&mut self) -> Option<DeadLetter> {
        if self.i >= self.n {
            return None;
        }
        let i = self.i;
        self.i += 1;
        let h = mix(i);
        let h2 = mix(h ^ 0x5151);
        let actor =
            format!("{:08x}-{:04x}-{:04x}-{:04x}-{:012x}", h >> 32, (h >> 16) & 0xffff, h & 0xffff, h2 & 0xffff, i);
        let reason = match h % 100 {
            0..60 => R::JournalSidecar,
            60..85 => R::WalSidecar,
            85..95 => R::IntegrityCheckFailed,
            _ => R::RetriesExhausted,
        };
        let campaign = if reason == R::RetriesExhausted && self.retries < MOVED as u64 {
            PURGE_CAMPAIGN
        } else {
            match (h2 >> 20) % 100 {
                0..50 => CAMPAIGNS[0],
                50..90 => CAMPAIGNS[1],
                // The canary's retries_exhausted letters are exactly the purge's selection.
                _ if reason == R::RetriesExhausted => CAMPAIGNS[(h2 >> 40) as usize % 2],
                _ => CAMPAIGNS[2],
            }
        };
        if reason == R::RetriesExhausted {
            self.retries += 1;
        }
        let main = main_size(h2 >> 8);
        let side = 512 + (h2 >> 32) % 65_024;
        let wal = 32 + (1 + (h2 >> 32) % 64) * (24 + 4096);
        let (phase, error, attempts, files) = match reason {
            R::JournalSidecar => (
                "read",
                format!(
                    "actor {actor}: read: a rollback journal is present ({side} bytes): the actor crashed inside a write transaction"
                ),
                1,
                V1Files { main: Some(main), journal: Some(side), ..V1Files::default() },
            ),
            R::WalSidecar => (
                "read",
                format!("actor {actor}: read: a WAL file is present ({wal} bytes)"),
                1,
                V1Files { main: Some(main), wal: Some(wal), shm: Some(32_768), ..V1Files::default() },
            ),
            R::IntegrityCheckFailed => (
                "validate",
                format!(
                    "actor {actor}: validate: quick_check failed: *** in database main ***\nPage {}: btreeInitPage() returns error code 11",
                    2 + (h2 >> 16) % (main / 4096).max(1)
                ),
                1,
                V1Files { main: Some(main), ..V1Files::default() },
            ),
            _ => (
                "stage",
                format!(
                    "actor {actor}: stage: postgres: FATAL 57P01: terminating connection due to administrator command (server 10.20.0.{}:5432, postgres://ferry@ferry-pg:5432/ferry)",
                    (h2 >> 24) % 250
                ),
                5,
                V1Files { main: Some(main), ..V1Files::default() },
            ),
        };
        // Spread over the last week, as a campaign's backlog builds up.
        let at_ms = self.now_ms - (h >> 12) as i64 % (7 * 86_400_000);
        let job = Job::new(campaign, ActorId::parse(&actor).expect("hex and dashes"), at_ms - 30_000, None);
        Some(DeadLetter {
            actor_id: actor,
            campaign: campaign.to_string(),
            reason,
            phase: phase.to_string(),
            error,
            attempts,
            worker: format!("ferry-worker-6c9f7d8b54-{:05x}", (h >> 40) % 24),
            at_ms,
            v1_files: Some(files),
            recovery: None,
            message: ferry::jobs::dead::kept_body(&job.encode()),
        })
    }
}

/// Writes `n` dead letters through the triage index, [`TXN_LETTERS`] per transaction (fewer
/// if a transaction would pass the store's write limit). Returns letters/s.
async fn write_store(store: &DynStore, n: u64, now_ms: i64) -> Result<f64> {
    let started = Instant::now();
    let mut txn = Txn::new();
    let mut in_txn = 0;
    for d in Letters::new(n, now_ms) {
        index::put(&mut txn, None, &d);
        in_txn += 1;
        if in_txn == TXN_LETTERS || txn.write_bytes() > limits::MAX_TXN_WRITE_BYTES / 2 {
            store.commit(std::mem::take(&mut txn)).await?;
            in_txn = 0;
        }
    }
    if in_txn > 0 {
        store.commit(txn).await?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The letters whose actors the fixture settles (a migrated v2 head, as rivet's own migration
/// leaves it), for `dlq sweep` to remove: the first [`MOVED`] `integrity_check_failed` ones,
/// a reason neither the requeue nor the purge selects.
fn settled_letters(n: u64, now_ms: i64) -> impl Iterator<Item = DeadLetter> {
    Letters::new(n, now_ms).filter(|d| d.reason == R::IntegrityCheckFailed).take(MOVED)
}

/// Writes the settled actors' heads, 500 per transaction.
async fn settle_some(store: &DynStore, n: u64, now_ms: i64) -> Result<()> {
    let head = DBHead { origin: Origin::MigratedFromV1, ..DBHead::staging(1, 1, 1) }.encode();
    let actors: Vec<ActorId> =
        settled_letters(n, now_ms).map(|d| ActorId::parse(&d.actor_id)).collect::<Result<_, _>>()?;
    for chunk in actors.chunks(500) {
        let mut txn = Txn::new();
        for a in chunk {
            txn.set(ferry::v2::keys::meta(a), head.clone());
        }
        store.commit(txn).await?;
    }
    Ok(())
}

/// Declares the topology of `prefix` and publishes the first `n` letters' bodies to its
/// dead-letter queue with confirms, as a worker dead-letters a job. Returns messages/s.
async fn publish_broker(prefix: &str, n: u64, now_ms: i64) -> Result<f64> {
    let conn = amqp::connect(&amqp_url(), "bench triage fixture").await?;
    let ch = amqp::confirm_channel(&conn).await?;
    let topology = Topology::new(prefix);
    topology.declare(&ch).await?;
    let started = Instant::now();
    let mut pending = VecDeque::new();
    for d in Letters::new(n, now_ms) {
        let headers = amqp::headers(&[
            (amqp::REASON_HEADER, amqp::long_string(d.reason.as_str())),
            (amqp::ACTOR_HEADER, amqp::long_string(&d.actor_id)),
            (amqp::CAMPAIGN_HEADER, amqp::long_string(&d.campaign)),
            (amqp::ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::from(d.attempts))),
        ]);
        let props = amqp::json_properties(&format!("{}/{}", d.campaign, d.actor_id), headers);
        let exchange = topology.dead_exchange();
        pending.push_back(
            ch.basic_publish(
                exchange.as_str().into(),
                DEAD_KEY.into(),
                BasicPublishOptions::default(),
                &d.encode(),
                props,
            )
            .await?,
        );
        while pending.len() >= CONFIRM_WINDOW {
            ensure!(pending.pop_front().context("a confirm")?.await?.is_ack(), "the broker nacked a dead letter");
        }
    }
    while let Some(c) = pending.pop_front() {
        ensure!(c.await?.is_ack(), "the broker nacked a dead letter");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
    let q = ch.queue_declare(topology.dead_queue().as_str().into(), passive, FieldTable::default()).await?;
    ensure!(u64::from(q.message_count()) == n, "dead-letter queue holds {} of {n}", q.message_count());
    let _ = conn.close(200, "ok".into()).await;
    Ok(rate)
}

/// A GET of the management API, as JSON.
async fn management(path: &str) -> Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(MANAGEMENT).await.context("the management API (port 15672)")?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {}\r\nAuthorization: Basic {MANAGEMENT_AUTH}\r\n\r\n", MANAGEMENT.0);
    conn.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP response")?;
    ensure!(head.contains(" 200 "), "GET {path}: {head}");
    Ok(serde_json::from_str(body)?)
}

/// The broker node's memory in use, in MiB: `mem_used` of `GET /api/nodes`, read fresh.
/// `/api/nodes` serves a sample the node refreshes only every 20 s or so (two reads a minute
/// apart can agree to the byte), so the figure is taken from the node's memory breakdown,
/// computed on each request, under the node's own `mem_calculation_strategy` (`rss` on the
/// test broker): the same quantity `mem_used` samples.
async fn broker_mem_mib() -> Result<f64> {
    let nodes = management("/api/nodes").await?;
    let node = nodes[0]["name"].as_str().context("a node in /api/nodes")?;
    let breakdown = management(&format!("/api/nodes/{node}/memory")).await?;
    let strategy = breakdown["memory"]["strategy"].as_str().unwrap_or("rss");
    let used = breakdown["memory"]["total"][strategy]
        .as_f64()
        .with_context(|| format!("memory.total.{strategy} in /api/nodes/{node}/memory"))?;
    Ok(used / 1048576.0)
}

/// One command as it ran.
struct Ran {
    secs: f64,
    /// None without `/usr/bin/time`.
    peak_rss_mib: Option<f64>,
    code: i32,
    stdout: String,
    stderr: String,
}

/// GNU time, which reports its child's peak RSS. Not `wait4` on our own child: Linux carries
/// the RSS high-water mark of the process that forks (or vforks) across `exec`, so a child of
/// this harness would report at least the harness's own peak; time's is a few hundred KiB.
const TIME: &str = "/usr/bin/time";

/// Runs `ferry-producer dlq ARGS` to its end: wall time from spawn to exit, and its peak RSS
/// (through [`TIME`], when present). Stdout is read (or sent to /dev/null, as `> /dev/null`
/// does), stderr kept for errors.
fn run_dlq(args: &[String], discard_stdout: bool) -> Result<Ran> {
    let producer = bin("ferry-producer");
    let rss_file = tempfile::NamedTempFile::new()?;
    let timed = std::path::Path::new(TIME).exists();
    let mut cmd = if timed {
        let mut c = Command::new(TIME);
        c.arg("-f").arg("%M").arg("-o").arg(rss_file.path()).arg(&producer);
        c
    } else {
        Command::new(&producer)
    };
    cmd.arg("dlq").args(args).env("RUST_LOG", "warn").stdin(Stdio::null()).stderr(Stdio::piped());
    cmd.stdout(if discard_stdout { Stdio::null() } else { Stdio::piped() });
    let started = Instant::now();
    let mut child = cmd.spawn().context("spawning ferry-producer")?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut out);
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = child.wait()?;
    let secs = started.elapsed().as_secs_f64();
    // time writes "Command exited with non-zero status N" before the figure on a failure.
    let peak_rss_mib = if timed {
        let text = std::fs::read_to_string(rss_file.path())?;
        let kib: f64 = text.lines().last().unwrap_or("").trim().parse().with_context(|| format!("{TIME}: {text:?}"))?;
        Some(kib / 1024.0)
    } else {
        None
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Ran { secs, peak_rss_mib, code: status.code().unwrap_or(-1), stdout, stderr })
}

fn short(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// Every triage session: each of `sizes` on SQLite and PostgreSQL, the broker side up to
/// `broker_max` letters.
pub async fn triage(report: &mut Report, sizes: &[u64], broker_max: u64) -> Result<()> {
    report.notes.push(format!(
        "triage: the fixture writes the dead letters directly (index::put, {TXN_LETTERS} per txn, and confirmed publishes of the same bodies to the dead-letter queue), not through migrations; requeue and purge move {MOVED} letters each"
    ));
    if !std::path::Path::new(TIME).exists() {
        report.notes.push(format!("triage: no {TIME}: peak RSS not measured"));
    }
    for &n in sizes {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            session(report, backend, n, n.min(broker_max)).await?;
        }
    }
    Ok(())
}

async fn session(report: &mut Report, backend: Backend, n: u64, on_broker: u64) -> Result<()> {
    let name = format!("{backend:?}").to_lowercase();
    let tag = format!("{name} {}", short(n));
    let now_ms = ferry::clock::Clock::now_ms(&ferry::clock::SystemClock);
    let store = TestStore::new(backend).await;
    let prefix = unique_name("bench_triage");
    eprintln!("  {tag}: writing {n} dead letters to the store and {on_broker} to {prefix}.dead");
    let mem_empty = broker_mem_mib().await?;
    let started = Instant::now();
    let fixture = tokio::try_join!(write_store(&store.store, n, now_ms), publish_broker(&prefix, on_broker, now_ms));
    let (store_rate, broker_rate) = match fixture {
        Ok(rates) => rates,
        Err(e) => {
            let _ = super::delete_topology(&prefix).await;
            return Err(e);
        }
    };
    let fixture_secs = started.elapsed().as_secs_f64();
    if let Err(e) = settle_some(&store.store, n, now_ms).await {
        let _ = super::delete_topology(&prefix).await;
        return Err(e);
    }
    report.add("triage", &format!("{tag}: fixture store writes"), store_rate, "letters/s", "-", 0.0, None);
    report.notes.push(format!(
        "triage {tag}: fixture {fixture_secs:.0} s (store {store_rate:.0} letters/s, broker {broker_rate:.0} msgs/s, concurrently); {on_broker} messages on the dead-letter queue"
    ));
    let result = commands(report, &store, &prefix, &tag, n, now_ms, mem_empty).await;
    // Deleting a million-message quorum queue takes the broker a moment: done before the next
    // session, whatever this one did.
    super::delete_topology(&prefix).await?;
    result
}

/// Checks a command's output: it did the whole job it was timed on.
type Check = Box<dyn Fn(&Ran) -> Result<()>>;

/// One timed command of a session.
struct Step {
    label: String,
    args: Vec<String>,
    discard_stdout: bool,
    /// The time limit, if it sets one.
    target: Option<f64>,
    check: Check,
}

impl Step {
    fn new(label: &str, args: Vec<String>, target: Option<f64>, check: Check) -> Step {
        Step { label: label.to_string(), args, discard_stdout: false, target, check }
    }
}

async fn commands(
    report: &mut Report,
    store: &TestStore,
    prefix: &str,
    tag: &str,
    n: u64,
    now_ms: i64,
    mem_empty: f64,
) -> Result<()> {
    // What the commands name, from the fixture's own sequence (not held whole: at a million
    // letters that would be a GiB in this process).
    let show_actor = Letters::new(n, now_ms).nth(n as usize / 2).context("a letter to show")?.actor_id;
    let requeued: Vec<String> =
        Letters::new(n, now_ms).filter(|d| d.reason == R::JournalSidecar).take(MOVED).map(|d| d.actor_id).collect();
    let purged =
        Letters::new(n, now_ms).filter(|d| d.reason == R::RetriesExhausted && d.campaign == PURGE_CAMPAIGN).count();
    let settled = settled_letters(n, now_ms).count() as u64;
    let store_args = ["--store".to_string(), store.url.clone()];
    let with = |rest: &[&str]| store_args.iter().cloned().chain(rest.iter().map(|s| s.to_string())).collect::<Vec<_>>();
    let requeue_args = {
        let mut a =
            with(&["requeue", "--amqp", &amqp_url(), "--queue-prefix", prefix, "--recovery", "rollback_journal"]);
        a.push("--json".into());
        a.push(requeued.join(","));
        a
    };
    let campaign_list = format!("list --campaign {LIST_CAMPAIGN} --reason wal_sidecar --limit 20");
    // One ` attempts=` per letter line (an error text may span lines).
    let lines = |want: usize| -> Check {
        Box::new(move |r: &Ran| {
            let got = r.stdout.matches(" attempts=").count();
            ensure!(got == want, "printed {got} letters, expected {want}");
            Ok(())
        })
    };
    let page = Some(PAGE_TARGET_SECS);
    let steps = vec![
        Step::new(
            "summary",
            with(&["summary", "--json"]),
            Some(SUMMARY_TARGET_SECS),
            Box::new(move |r: &Ran| {
                let s: serde_json::Value = serde_json::from_str(&r.stdout)?;
                ensure!(s["dead_letters"].as_u64() == Some(n), "summary counted {} of {n}", s["dead_letters"]);
                Ok(())
            }),
        ),
        Step::new("list --limit 20", with(&["list", "--limit", "20"]), page, lines(20)),
        Step::new(
            "list --reason journal_sidecar --limit 20",
            with(&["list", "--reason", "journal_sidecar", "--limit", "20"]),
            page,
            lines(20),
        ),
        Step::new(&campaign_list, with(&campaign_list.split(' ').collect::<Vec<_>>()), page, lines(20)),
        Step::new(
            "show ACTOR",
            with(&["show", &show_actor]),
            page,
            Box::new(|r: &Ran| {
                let s: serde_json::Value = serde_json::from_str(&r.stdout)?;
                ensure!(s["dead_letters"].as_array().is_some_and(|d| d.len() == 1), "show found no dead letter");
                Ok(())
            }),
        ),
        Step {
            discard_stdout: true,
            ..Step::new(
                "export --format csv > /dev/null",
                with(&["export", "--format", "csv"]),
                None,
                Box::new(|_| Ok(())),
            )
        },
        // Every letter is walked and its actor's head and audit read.
        Step::new(
            "sweep --dry-run (every letter)",
            with(&["sweep", "--dry-run", "--json"]),
            None,
            Box::new(move |r: &Ran| {
                let s: serde_json::Value = serde_json::from_str(&r.stdout)?;
                ensure!(s["checked"].as_u64() == Some(n), "sweep checked {} of {n}", s["checked"]);
                ensure!(s["migrated"].as_u64() == Some(settled), "would remove {} of {settled}", s["migrated"]);
                Ok(())
            }),
        ),
        Step::new(
            &format!("sweep (every letter, {} settled)", short(settled)),
            with(&["sweep", "--json"]),
            None,
            Box::new(move |r: &Ran| {
                let s: serde_json::Value = serde_json::from_str(&r.stdout)?;
                ensure!(s["migrated"].as_u64() == Some(settled), "removed {} of {settled}", s["migrated"]);
                Ok(())
            }),
        ),
        Step::new(
            &format!("requeue {MOVED} actors by name"),
            requeue_args,
            None,
            Box::new(move |r: &Ran| {
                let s: serde_json::Value = serde_json::from_str(&r.stdout)?;
                let got = s["actors"].as_array().map_or(0, Vec::len);
                ensure!(got == MOVED, "requeued {got} of {MOVED} named actors");
                Ok(())
            }),
        ),
        Step::new(
            &format!("purge --reason retries_exhausted --campaign {PURGE_CAMPAIGN}"),
            with(&["purge", "--reason", "retries_exhausted", "--campaign", PURGE_CAMPAIGN, "--yes"]),
            None,
            Box::new(move |r: &Ran| {
                let want = format!("purged {purged} dead letters");
                ensure!(r.stdout.starts_with(&want), "{:?}, expected {want:?}", r.stdout.trim());
                Ok(())
            }),
        ),
    ];
    // Open across the session: closed if the broker restarts meanwhile (another client's
    // `rabbitmqctl stop_app`), when its memory before and after are not comparable.
    let witness = amqp::connect(&amqp_url(), "bench triage witness").await?;
    let mem_before = broker_mem_mib().await?;
    for Step { label, args, discard_stdout, target, check } in steps {
        let ran = tokio::task::spawn_blocking(move || run_dlq(&args, discard_stdout)).await??;
        if ran.code != 0 {
            bail!("{tag}: dlq {label} exited {}: {}", ran.code, ran.stderr.trim());
        }
        check(&ran).with_context(|| format!("{tag}: dlq {label}"))?;
        match target {
            Some(limit) => report.add_at_most(
                "triage",
                &format!("{tag}: {label}"),
                ran.secs,
                "s",
                "issue 15 target (at 1M)",
                limit,
                1.0,
            ),
            None => report.add("triage", &format!("{tag}: {label}"), ran.secs, "s", "-", 0.0, None),
        }
        if let Some(rss) = ran.peak_rss_mib {
            report.add("triage", &format!("{tag}: {label}: peak RSS"), rss, "MiB", "-", 0.0, None);
        }
    }
    let mem_after = broker_mem_mib().await?;
    let restarted = !witness.status().connected();
    let _ = witness.close(200, "ok".into()).await;
    if restarted {
        report.add(
            "triage",
            &format!("{tag}: broker mem_used after the session (the broker restarted during it)"),
            mem_after,
            "MiB",
            "mem_used before it",
            mem_before,
            None,
        );
    } else {
        report.add_at_most(
            "triage",
            &format!("{tag}: broker mem_used after the session"),
            mem_after,
            "MiB",
            "mem_used before it",
            mem_before,
            BROKER_MEM_TARGET,
        );
    }
    report.notes.push(format!(
        "triage {tag}: broker mem_used {mem_empty:.0} MiB before the fixture, {mem_before:.0} MiB with it, {mem_after:.0} MiB after the session (node-wide: other clients of the broker count too){}",
        if restarted { "; the broker restarted during the session (another client stopped it), so the two are not comparable" } else { "" }
    ));
    Ok(())
}
