//! Support for ferry's end-to-end tests: the built binaries, and running them as separate
//! processes against real services.
//!
//! - [`bin`]: the workspace binaries, built once per test process;
//! - [`Proc`]: a child process (a worker, a producer) that is killed when dropped, can be sent
//!   SIGTERM or SIGKILL, paused (SIGSTOP) and resumed, and whose stderr goes to a file printed
//!   when the test fails;
//! - [`WorkerSpec`]: `ferry-worker run` with test-friendly settings;
//! - [`Broker`]: a unique queue prefix on the test broker, its topology declared, with the
//!   queue reads tests need (depths, `basic_get` drains), deleted at the end, also on panic;
//! - [`wait_until`]: a poller, so tests never sleep for a fixed time;
//! - store readers: audit records, leases, v2 heads;
//! - the dead-letter log (the `{p}.dead-log` stream read up to now), messages as the broker
//!   dead-letters them, the management API and policies;
//! - `rabbitmqctl` helpers to find and close one process's broker connections.
//!
//! Services are never optional: a test that needs RabbitMQ or PostgreSQL fails when it is
//! down.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ferry::ActorId;
use ferry::jobs::Job;
use ferry::keys;
use ferry::migrate::lease::Lease;
use ferry::migrate::{AuditRecord, OutcomeKind};
use ferry::queue::Topology;
use ferry::queue::amqp;
use ferry::queue::topology::{DEAD_KEY, WORK_KEY};
use ferry::store::{DynStore, KeyRange, for_each_row};
use ferry::synth::keyspace::{Case, Expected, Mix, SeedConfig};
use ferry::v2::DBHead;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

/// Path of a workspace binary, built once per test process (`cargo build --bins`), so the
/// tests run the same executables a user runs.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // Test executables live in target/{profile}/deps, binaries (the bench) in
        // target/{profile}; the workspace binaries are in target/{profile}.
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe.parent().expect("executable directory");
        let dir = if dir.ends_with("deps") { dir.parent().expect("target/{profile}") } else { dir }.to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--bins", "--manifest-path", manifest]);
        // Built into the target directory this executable runs from, where they are looked
        // for: a bench started as target-x/release/bench without CARGO_TARGET_DIR would
        // otherwise build the whole workspace again into ./target. (A cross build's layout,
        // target/{triple}/{profile}, is left to CARGO_BUILD_TARGET's own settings.)
        if std::env::var_os("CARGO_BUILD_TARGET").is_none()
            && let Some(target) = dir.parent()
        {
            cmd.arg("--target-dir").arg(target);
        }
        // The variables cargo sets for this test process (package name, manifest dir, ...)
        // are inputs of some build scripts (ring's): passed on, they would make this build and
        // the next plain `cargo build` rebuild those crates for each other.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_CRATE_")
                || name.starts_with("CARGO_BIN_")
                || ["CARGO_MANIFEST_DIR", "CARGO_MANIFEST_PATH", "CARGO_PRIMARY_PACKAGE", "OUT_DIR"].contains(&&*name)
            {
                cmd.env_remove(&*name);
            }
        }
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for the ferry binaries");
        assert!(status.success(), "cargo build --bins failed");
        dir
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Runs a command to completion and parses its stdout as JSON; a failure carries its stderr.
pub fn run_json(cmd: &mut Command) -> Result<serde_json::Value> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    ensure!(out.status.success(), "{:?} failed ({}): {}", cmd, out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).with_context(|| format!("stdout: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Runs `fut`, failing if it takes longer than `limit` (dropping it, and with it every process
/// and broker guard it holds). Building the binaries (once per test process) comes first and
/// is not part of the bound.
pub async fn bounded<T>(limit: Duration, fut: impl Future<Output = Result<T>>) -> Result<T> {
    bin("ferry-producer");
    let started = Instant::now();
    let result = match tokio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => bail!("test did not finish within {limit:?}"),
    };
    eprintln!("test body took {:.1} s", started.elapsed().as_secs_f64());
    result
}

/// Polls `check` every `every` until it returns `Ok(true)`; an error or `timeout` fails.
pub async fn wait_until_every<F, Fut>(timeout: Duration, every: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await.with_context(|| format!("while waiting until {what}"))? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// [`wait_until_every`] polling every 50 ms.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    wait_until_every(timeout, Duration::from_millis(50), what, check).await
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process under test. Dropping it kills it (SIGKILL) and, unless it was settled with
/// [`Proc::stop`], [`Proc::wait_exit`] or [`Proc::settle`], prints the tail of its stderr: a
/// test that fails (by panic or by error) shows what its processes logged.
pub struct Proc {
    pub name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    exit: Option<ExitStatus>,
    settled: bool,
}

/// Bytes of a log printed when a test fails.
const LOG_TAIL_BYTES: u64 = 48 * 1024;

impl Proc {
    /// Spawns `cmd` with stdout and stderr in `{dir}/{name}.out` and `{dir}/{name}.log`, with
    /// `RUST_LOG=info` and no colours (so logs can be searched).
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Result<Proc> {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.log"));
        cmd.env("RUST_LOG", "info,lapin=warn,amq_protocol=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?);
        let child = cmd.spawn().with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Proc { name: name.to_string(), child, stdout, stderr, exit: None, settled: false })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The last part of what the process wrote to stderr.
    pub fn log_tail(&self) -> String {
        let Ok(mut f) = std::fs::File::open(&self.stderr) else { return String::new() };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(LOG_TAIL_BYTES);
        let _ = f.seek(SeekFrom::Start(start));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if start > 0 { format!("[... {start} bytes before ...]\n{text}") } else { text }
    }

    /// Sends a signal by name (`TERM`, `KILL`, ...) with kill(1).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .context("running kill(1)")?;
        ensure!(status.success(), "kill -{sig} {} failed", self.pid());
        Ok(())
    }

    /// Freezes the process with SIGSTOP, as a stalled VM or a debugger would: its sockets stay
    /// open and its kernel still answers TCP, but it runs no code until [`Proc::resume`].
    pub fn pause(&self) -> Result<()> {
        self.signal("STOP")
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal("CONT")
    }

    /// Whether the process is stopped by a signal (state `T` in `/proc/PID/stat`).
    pub fn is_paused(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // The state follows the command name, which is in parentheses and may hold spaces.
        stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) == Some("T")
    }

    pub fn sigterm(&self) -> Result<()> {
        self.signal("TERM")
    }

    /// Kills the process with SIGKILL and reaps it; it counts as settled.
    pub fn sigkill(&mut self) -> Result<ExitStatus> {
        self.child.kill().context("SIGKILL")?;
        let status = self.child.wait()?;
        self.exit = Some(status);
        self.settled = true;
        Ok(status)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exit = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit {
                return Ok(status);
            }
            if let Some(status) = self.child.try_wait()? {
                self.exit = Some(status);
                self.settled = true;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits (at most `timeout`) for a clean exit with status 0.
    pub async fn stop(&mut self, timeout: Duration) -> Result<()> {
        if self.running() {
            self.sigterm()?;
        }
        let status = self.wait_exit(timeout).await?;
        ensure!(status.success(), "{} exited with {status}", self.name);
        Ok(())
    }

    /// Marks the process as expected to be in whatever state it is in (no log on drop).
    pub fn settle(&mut self) {
        self.settled = true;
    }

    /// The address of the worker's HTTP endpoints, from its `serving ... bound=ADDR` log line.
    pub async fn http_addr(&mut self) -> Result<SocketAddr> {
        let mut found = None;
        wait_until(Duration::from_secs(10), &format!("{} serves HTTP", self.name), || {
            let log = self.log();
            found = log.lines().find_map(|l| {
                let (_, rest) = l.split_once("bound=")?;
                rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
            });
            async move { Ok(found.is_some()) }
        })
        .await?;
        found.ok_or_else(|| anyhow!("no HTTP address"))
    }

    /// Waits until the worker logs that it consumes.
    pub async fn consuming(&mut self) -> Result<()> {
        let name = self.name.clone();
        let mut exited = None;
        wait_until(Duration::from_secs(15), &format!("{name} consumes"), || {
            let ok = self.log().contains("consuming");
            if !ok && !self.running() {
                exited = self.exit;
            }
            async move { Ok(ok || exited.is_some()) }
        })
        .await?;
        match exited {
            Some(status) => bail!("{name} exited with {status} before consuming"),
            None => Ok(()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !self.settled {
            eprintln!(
                "===== {} (pid {}) stderr =====\n{}\n===== end of {} =====",
                self.name,
                self.pid(),
                self.log_tail(),
                self.name
            );
        }
    }
}

/// `ferry-worker run` with test settings: quick retries, no fixed HTTP port, `RUST_LOG=info`.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub store: String,
    pub topology: Topology,
    pub worker_id: String,
    pub concurrency: u16,
    pub lease_ttl_secs: Option<u64>,
    pub shutdown_grace_secs: u64,
    /// Serve `/metrics` on an ephemeral port (found with [`Proc::http_addr`]).
    pub http: bool,
    pub extra: Vec<String>,
}

impl WorkerSpec {
    pub fn new(store: &str, topology: &Topology, id_hint: &str) -> WorkerSpec {
        WorkerSpec {
            store: store.to_string(),
            topology: topology.clone(),
            worker_id: ferry::testing::unique_name(id_hint),
            concurrency: 4,
            lease_ttl_secs: None,
            shutdown_grace_secs: 10,
            http: false,
            extra: Vec::new(),
        }
    }

    pub fn concurrency(mut self, n: u16) -> Self {
        self.concurrency = n;
        self
    }

    pub fn lease_ttl_secs(mut self, secs: u64) -> Self {
        self.lease_ttl_secs = Some(secs);
        self
    }

    pub fn shutdown_grace_secs(mut self, secs: u64) -> Self {
        self.shutdown_grace_secs = secs;
        self
    }

    pub fn http(mut self) -> Self {
        self.http = true;
        self
    }

    /// More `ferry-worker run` arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(bin("ferry-worker"));
        cmd.args(["run", "--store", &self.store, "--amqp", &ferry::testing::amqp_url()])
            .args(["--queue-prefix", &self.topology.prefix])
            .args(["--delivery-limit", &self.topology.delivery_limit.to_string()])
            .args(["--worker-id", &self.worker_id])
            .args(["--concurrency", &self.concurrency.to_string()])
            .args(["--shutdown-grace", &self.shutdown_grace_secs.to_string()])
            .args(["--retry-min-ms", "100", "--retry-max-ms", "500"])
            .args(["--http", if self.http { "127.0.0.1:0" } else { "off" }]);
        if let Some(ttl) = self.lease_ttl_secs {
            cmd.args(["--lease-ttl-secs", &ttl.to_string()]);
        }
        cmd.args(&self.extra);
        cmd
    }

    /// Starts the worker, logging to `{dir}/{worker id}.log`.
    pub fn start(&self, dir: &Path) -> Result<Proc> {
        Proc::spawn(&self.worker_id, self.command(), dir)
    }
}

/// `GET path` from a worker's HTTP endpoint: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).with_context(|| format!("{path} is not UTF-8"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("not an HTTP response: {text}"))?;
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Fetches `/metrics` from a worker.
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    let (status, body) = http_get(addr, "/metrics").await?;
    ensure!(status == 200, "GET /metrics: {status}");
    Ok(body)
}

/// The value of one sample (`name{labels}`, labels exactly as rendered, e.g.
/// `outcome="migrated"`); 0 when the series does not exist yet.
pub fn sample(metrics: &str, name: &str, labels: &str) -> f64 {
    let series = if labels.is_empty() { name.to_string() } else { format!("{name}{{{labels}}}") };
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(series.as_str()))
        .filter_map(|rest| rest.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// Generated keyspaces and campaigns

/// `ferry-producer seed` settings, which also give the plan of what was planted.
#[derive(Clone, Debug)]
pub struct Seed {
    pub actors: u64,
    pub seed: u64,
    pub mix: String,
    pub max_mib: u64,
    pub large_share: f64,
    pub prefix: String,
}

impl Seed {
    pub fn new(actors: u64, prefix: &str) -> Seed {
        Seed { actors, seed: 1, mix: "none".into(), max_mib: 2, large_share: 0.0, prefix: prefix.into() }
    }

    pub fn config(&self) -> SeedConfig {
        SeedConfig {
            actors: self.actors,
            seed: self.seed,
            mix: Mix::parse(&self.mix).expect("test mix parses"),
            max_mib: self.max_mib,
            large_share: self.large_share,
            prefix: self.prefix.clone(),
            ..SeedConfig::default()
        }
    }

    /// What each actor was planted as.
    pub fn plan(&self) -> Vec<(ActorId, Case)> {
        ferry::synth::keyspace::plan(&self.config()).into_iter().map(|a| (a.id, a.case)).collect()
    }

    /// Runs `ferry-producer seed` into `store`.
    pub fn run(&self, store: &str) -> Result<serde_json::Value> {
        run_json(
            Command::new(bin("ferry-producer"))
                .args(["seed", "--store", store, "--json", "--mix", &self.mix, "--prefix", &self.prefix])
                .args(["--seed", &self.seed.to_string(), "--actors", &self.actors.to_string()])
                .args(["--max-mib", &self.max_mib.to_string(), "--large-share", &self.large_share.to_string()]),
        )
    }
}

/// Whether `audit` is the planted end of an actor planted as `case`. A job run again after
/// the migration (a duplicate, a redelivery) records a skip that keeps the migration's fields,
/// so `skipped_already_migrated` counts as migrated.
pub fn ended_as_planted(case: Case, audit: &AuditRecord) -> bool {
    match case.expected() {
        Expected::Outcome(OutcomeKind::Migrated) => {
            matches!(audit.outcome, OutcomeKind::Migrated | OutcomeKind::SkippedAlreadyMigrated)
        }
        Expected::Outcome(kind) => audit.outcome == kind,
        Expected::DeadLetter(reason) => audit.outcome == OutcomeKind::DeadLettered && audit.reason == Some(reason),
    }
}

/// Whether the producer enqueues an actor planted as `case` (it has v1 data and no v2).
pub fn enqueued(case: Case) -> bool {
    !matches!(case, Case::NoV1 | Case::Native)
}

/// `ferry-producer enqueue --json` for `campaign`, with `extra` arguments.
pub fn enqueue_command(store: &str, topology: &Topology, campaign: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("ferry-producer"));
    cmd.args(["enqueue", "--store", store, "--amqp", &ferry::testing::amqp_url(), "--json"])
        .args(["--queue-prefix", &topology.prefix])
        .args(["--delivery-limit", &topology.delivery_limit.to_string()])
        .args(["--campaign", campaign])
        .args(extra);
    cmd
}

/// Runs an enqueue to completion and returns its summary.
pub fn enqueue(store: &str, topology: &Topology, campaign: &str, extra: &[&str]) -> Result<serde_json::Value> {
    let summary = run_json(&mut enqueue_command(store, topology, campaign, extra))?;
    ensure!(summary["completed"] == true, "enqueue did not complete: {summary}");
    Ok(summary)
}

// ---------------------------------------------------------------------------------------------
// Store readers

/// Terminates every PostgreSQL session named `app` (`application_name`), as an operator or a
/// failover would; how many there were.
pub async fn terminate_sessions(app: &str) -> Result<i64> {
    let (admin, conn) = tokio_postgres::connect(&ferry::testing::postgres_url(), tokio_postgres::NoTls)
        .await
        .context("PostgreSQL must be running for this test")?;
    let task = tokio::spawn(conn);
    let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name = $1 AND pid <> pg_backend_pid()";
    let killed: i64 = admin.query_one(terminate, &[&app]).await?.get(0);
    task.abort();
    Ok(killed)
}

/// Records a campaign in `store` as `ferry-producer enqueue` does before its first publish, for
/// tests that publish jobs themselves: a worker runs only jobs whose campaign its store knows.
pub async fn register_campaign(store: &DynStore, name: &str) -> Result<()> {
    let now = ferry::clock::Clock::now_ms(&ferry::clock::SystemClock);
    let record = ferry::campaign::CampaignRecord {
        name: name.to_string(),
        created_at_ms: now,
        updated_at_ms: now,
        filters: ferry::campaign::CampaignFilters::default(),
        status: ferry::campaign::CampaignStatus::Enqueued,
        checkpoint: None,
        ids_done: 0,
        published: 0,
        skipped: 0,
    };
    ferry::campaign::save(&**store, &record).await.with_context(|| format!("registering campaign {name}"))
}

/// Every audit record, by actor id.
pub async fn audits(store: &DynStore) -> Result<BTreeMap<String, AuditRecord>> {
    let mut out = BTreeMap::new();
    let mut bad = Vec::new();
    for_each_row(&**store, &KeyRange::prefix(keys::AUDIT_PREFIX), 1024, |key, value| {
        let actor = String::from_utf8_lossy(&key[keys::AUDIT_PREFIX.len()..]).into_owned();
        match AuditRecord::decode(&value) {
            Some(a) => {
                out.insert(actor, a);
            }
            None => bad.push(actor),
        }
        Ok(())
    })
    .await?;
    ensure!(bad.is_empty(), "audit records that do not decode: {bad:?}");
    Ok(out)
}

/// How many audit records exist.
pub async fn audit_count(store: &DynStore) -> Result<usize> {
    let mut n = 0;
    for_each_row(&**store, &KeyRange::prefix(keys::AUDIT_PREFIX), 1024, |_, _| {
        n += 1;
        Ok(())
    })
    .await?;
    Ok(n)
}

/// Every lease row, by actor id.
pub async fn leases(store: &DynStore) -> Result<BTreeMap<String, Lease>> {
    let mut out = BTreeMap::new();
    for_each_row(&**store, &KeyRange::prefix(keys::LEASE_PREFIX), 1024, |key, value| {
        let actor = String::from_utf8_lossy(&key[keys::LEASE_PREFIX.len()..]).into_owned();
        let lease =
            Lease::decode(&value).unwrap_or(Lease { holder: "<undecodable>".into(), generation: 0, expires_at_ms: 0 });
        out.insert(actor, lease);
        Ok(())
    })
    .await?;
    Ok(out)
}

/// The v2 head of `actor`, if any.
pub async fn v2_head(store: &DynStore, actor: &ActorId) -> Result<Option<DBHead>> {
    match store.get(&ferry::v2::keys::meta(actor)).await? {
        None => Ok(None),
        Some(raw) => Ok(Some(DBHead::decode(&raw).map_err(|e| anyhow!("{actor}: {e}"))?)),
    }
}

/// The txids that have DELTA rows for `actor`.
pub async fn delta_txids(store: &DynStore, actor: &ActorId) -> Result<Vec<u64>> {
    let prefix = ferry::v2::keys::delta_prefix(actor);
    let mut txids = Vec::new();
    let mut cursor = KeyRange::prefix(&prefix);
    // Skip-scan: one key per txid, so the blobs are never read.
    while let Some(key) = store.first_key(&cursor).await? {
        let raw: [u8; 8] = key
            .get(prefix.len()..prefix.len() + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("bad DELTA key {}", keys::printable(&key)))?;
        let txid = u64::from_be_bytes(raw);
        txids.push(txid);
        cursor = KeyRange::new(ferry::v2::keys::delta_txid_range(actor, txid).end, cursor.end.clone());
    }
    Ok(txids)
}

// ---------------------------------------------------------------------------------------------
// The broker

/// A message read from a queue.
#[derive(Clone, Debug)]
pub struct Message {
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl Message {
    pub fn str_header(&self, name: &str) -> Option<String> {
        amqp::str_header(&self.properties, name)
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("body: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One test's exchanges and queues on the test broker, under a unique prefix: declared on
/// creation, deleted by [`Broker::delete`] or, failing that, when dropped (also on panic).
/// Drop the processes that use it first (declare the `Broker` before them).
pub struct Broker {
    pub url: String,
    pub topology: Topology,
    conn: Connection,
    ch: Channel,
    deleted: bool,
}

impl Broker {
    /// A fresh topology with the default delivery limit. Fails when the broker is down.
    pub async fn new(hint: &str) -> Result<Broker> {
        Broker::with_delivery_limit(hint, ferry::queue::topology::DEFAULT_DELIVERY_LIMIT).await
    }

    pub async fn with_delivery_limit(hint: &str, delivery_limit: i64) -> Result<Broker> {
        let url = ferry::testing::amqp_url();
        let topology = Topology { prefix: ferry::testing::unique_name(hint), delivery_limit };
        let conn = amqp::connect(&url, &format!("ferry-tests {}", topology.prefix))
            .await
            .with_context(|| format!("RabbitMQ must be running for this test ({})", amqp::redacted(&url)))?;
        let ch = amqp::confirm_channel(&conn).await?;
        topology.declare(&ch).await?;
        Ok(Broker { url, topology, conn, ch, deleted: false })
    }

    pub fn channel(&self) -> &Channel {
        &self.ch
    }

    /// Ready messages in a queue (not counting unacked deliveries).
    pub async fn depth(&self, queue: &str) -> Result<u32> {
        let opts = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let q = self.ch.queue_declare(queue.into(), opts, FieldTable::default()).await?;
        Ok(q.message_count())
    }

    /// Ready messages in the work queue and every retry queue.
    pub async fn pending(&self) -> Result<u32> {
        let mut n = self.depth(&self.topology.work_queue()).await?;
        for q in self.topology.retry_queues() {
            n += self.depth(&q).await?;
        }
        Ok(n)
    }

    pub async fn dead_depth(&self) -> Result<u32> {
        self.depth(&self.topology.dead_queue()).await
    }

    /// Takes one message (acked) from a queue.
    pub async fn get(&self, queue: &str) -> Result<Option<Message>> {
        let Some(got) = self.ch.basic_get(queue.into(), BasicGetOptions::default()).await? else {
            return Ok(None);
        };
        let d = got.delivery;
        d.acker.ack(BasicAckOptions::default()).await?;
        Ok(Some(Message { properties: d.properties, body: d.data }))
    }

    /// Takes every ready message of a queue.
    pub async fn drain(&self, queue: &str) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        while let Some(m) = self.get(queue).await? {
            out.push(m);
        }
        Ok(out)
    }

    /// Publishes a raw body to the jobs exchange (as the producer does), confirmed.
    pub async fn publish_raw(&self, body: &[u8], message_id: &str) -> Result<()> {
        let props = amqp::json_properties(message_id, FieldTable::default());
        amqp::publish_confirmed(&self.ch, &self.topology.jobs_exchange(), WORK_KEY, body, props).await?;
        Ok(())
    }

    /// Publishes a job, confirmed.
    pub async fn publish_job(&self, job: &Job) -> Result<()> {
        self.publish_raw(&job.encode(), &job.message_id()).await
    }

    /// Deletes the topology now, reporting failures.
    pub async fn delete(mut self) -> Result<()> {
        self.deleted = true;
        self.topology.delete(&self.ch).await.context("deleting the test topology")?;
        let _ = self.conn.close(200, "done".into()).await;
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // Drop may run while unwinding, inside or outside a runtime: use a private thread and
        // runtime, with a fresh connection.
        let (url, topology) = (self.url.clone(), self.topology.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let cleanup = async {
                    let conn = amqp::connect(&url, "ferry-tests cleanup").await.ok()?;
                    let ch = conn.create_channel().await.ok()?;
                    if let Err(e) = topology.delete(&ch).await {
                        eprintln!("could not delete test topology {}: {e}", topology.prefix);
                    }
                    let _ = conn.close(200, "done".into()).await;
                    Some(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), cleanup).await;
            });
        })
        .join();
    }
}

// ---------------------------------------------------------------------------------------------
// The dead-letter inbox and log

/// Header of the marker [`Broker::dead_log`] publishes to find the end of the log.
pub const LOG_MARK_HEADER: &str = "x-ferry-test-log-mark";

impl Broker {
    /// Publishes a raw message to the dead exchange (what the broker does at the work queue's
    /// delivery limit, or another tool), confirmed.
    pub async fn publish_dead(&self, body: &[u8], props: BasicProperties) -> Result<()> {
        amqp::publish_confirmed(&self.ch, &self.topology.dead_exchange(), DEAD_KEY, body, props).await?;
        Ok(())
    }

    /// Messages in the dead-letter log `{p}.dead-log` (the markers of [`Broker::dead_log`]
    /// included): a stream counts what it holds, read or not.
    pub async fn dead_log_depth(&self) -> Result<u32> {
        self.depth(&self.topology.dead_log()).await
    }

    /// Every message of the dead-letter log `{p}.dead-log`, oldest first, up to now: the log is
    /// read from its first offset up to a marker this call publishes to the dead exchange (marked
    /// [`amqp::INDEXED_HEADER`], so a worker's inbox only acks it, and [`LOG_MARK_HEADER`]), so
    /// every dead letter confirmed before the call is in the answer; the markers of earlier calls
    /// are left out. A marker no worker consumes stays in `{p}.dead`.
    pub async fn dead_log(&self) -> Result<Vec<Message>> {
        let mark = ferry::testing::unique_name("mark");
        let headers = amqp::headers(&[
            (amqp::INDEXED_HEADER, lapin::types::AMQPValue::LongLongInt(1)),
            (LOG_MARK_HEADER, amqp::long_string(&mark)),
        ]);
        self.publish_dead(b"{}", amqp::json_properties(&mark, headers)).await?;
        let mut out = Vec::new();
        read_stream(&self.conn, &self.topology.dead_log(), Duration::from_secs(20), |m| {
            match m.str_header(LOG_MARK_HEADER) {
                Some(found) if found == mark => return false,
                Some(_) => {}
                None => out.push(m),
            }
            true
        })
        .await
        .with_context(|| format!("reading {} up to its marker", self.topology.dead_log()))?;
        Ok(out)
    }

    /// The dead-letter log's messages about one actor (`x-ferry-actor` or a job body naming it).
    pub async fn dead_log_of(&self, actor: &str) -> Result<Vec<Message>> {
        let names = |m: &Message| {
            m.str_header(amqp::ACTOR_HEADER).as_deref() == Some(actor)
                || m.json().ok().and_then(|v| v["actor_id"].as_str().map(|a| a == actor)).unwrap_or(false)
        };
        Ok(self.dead_log().await?.into_iter().filter(names).collect())
    }
}

/// Consumes the stream `queue` from its first offset on a channel of its own, acking each
/// message, and hands each to `more` until it returns false; fails after `timeout`.
pub async fn read_stream(
    conn: &Connection,
    queue: &str,
    timeout: Duration,
    mut more: impl FnMut(Message) -> bool,
) -> Result<()> {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    let ch = conn.create_channel().await?;
    // A stream consumer must have a prefetch and ack what it reads (the acks move its credit).
    ch.basic_qos(100, BasicQosOptions::default()).await?;
    let args = amqp::headers(&[("x-stream-offset", amqp::long_string("first"))]);
    let mut consumer =
        ch.basic_consume(queue.into(), "ferry-tests-log".into(), BasicConsumeOptions::default(), args).await?;
    let read = async {
        while let Some(delivery) = consumer.next().await {
            let d = delivery?;
            d.acker.ack(BasicAckOptions::default()).await?;
            if !more(Message { properties: d.properties, body: d.data }) {
                return Ok(());
            }
        }
        bail!("the stream consumer of {queue} ended")
    };
    let result = match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("{queue}: not read to the end within {timeout:?}")),
    };
    let _ = ch.close(200, "done".into()).await;
    result
}

/// A message as the broker dead-letters a job at the work queue's delivery limit: the job's
/// body and properties, with the `x-death` and `x-first-death-*` headers the broker adds.
pub fn broker_dead_lettered(topology: &Topology, job: &Job) -> BasicProperties {
    use lapin::types::{AMQPValue, FieldArray, FieldTable as Table};
    let mut death = Table::default();
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    death.insert("reason".into(), amqp::long_string("delivery_limit"));
    death.insert("queue".into(), amqp::long_string(&topology.work_queue()));
    death.insert("exchange".into(), amqp::long_string(&topology.jobs_exchange()));
    death.insert("routing-keys".into(), AMQPValue::FieldArray(FieldArray::from(vec![amqp::long_string(WORK_KEY)])));
    death.insert("time".into(), AMQPValue::Timestamp((job.enqueued_at_ms / 1000) as u64));
    let headers = amqp::headers(&[
        ("x-death", AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)]))),
        ("x-first-death-reason", amqp::long_string("delivery_limit")),
        ("x-first-death-queue", amqp::long_string(&topology.work_queue())),
        ("x-first-death-exchange", amqp::long_string(&topology.jobs_exchange())),
    ]);
    amqp::json_properties(&job.message_id(), headers)
}

// ---------------------------------------------------------------------------------------------
// The management API

/// Port of the management API on the test broker.
pub const MANAGEMENT_PORT: u16 = 15672;

/// One request to the test broker's management API as `guest` (HTTP/1.0, JSON body): the
/// status code and the body.
pub async fn management(method: &str, path: &str, body: Option<&serde_json::Value>) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", MANAGEMENT_PORT))
        .await
        .context("the management API on 127.0.0.1:15672 (.ci/run enables rabbitmq_management)")?;
    let body = body.map(serde_json::Value::to_string).unwrap_or_default();
    // guest:guest in base64.
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("not an HTTP response: {text}"))?;
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("{method} {path}: no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// A policy on the test broker's default vhost, deleted when dropped (also on panic).
pub struct Policy(pub String);

impl Policy {
    /// Sets `name` from a definitions entry (`pattern`, `apply-to`, `definition`, `priority`).
    pub async fn set(name: &str, entry: &serde_json::Value) -> Result<Policy> {
        let body = serde_json::json!({
            "pattern": entry["pattern"], "apply-to": entry["apply-to"],
            "definition": entry["definition"], "priority": entry["priority"],
        });
        let (status, text) = management("PUT", &format!("/api/policies/%2F/{name}"), Some(&body)).await?;
        ensure!(matches!(status, 201 | 204), "setting policy {name}: {status} {text}");
        Ok(Policy(name.to_string()))
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["clear_policy", &self.0]).output();
    }
}

// ---------------------------------------------------------------------------------------------
// rabbitmqctl

fn rabbitmqctl(args: &[&str]) -> Result<String> {
    let out = Command::new("rabbitmqctl").args(args).output().context("running rabbitmqctl (is it installed?)")?;
    ensure!(out.status.success(), "rabbitmqctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The broker's pids of the connections named exactly `name` (the AMQP `connection_name`
/// client property; workers use `ferry-worker {worker id}`).
pub fn connections_named(name: &str) -> Result<Vec<String>> {
    Ok(connections_of(&[name])?.remove(name).unwrap_or_default())
}

/// The broker's pids of the connections of each of `names`, from one listing (`rabbitmqctl`
/// is slow to start: seconds on a busy machine).
pub fn connections_of<'a>(names: &[&'a str]) -> Result<BTreeMap<&'a str, Vec<String>>> {
    let listing = rabbitmqctl(&["list_connections", "-q", "--no-table-headers", "pid", "client_properties"])?;
    let mut out = BTreeMap::new();
    for name in names {
        let needle = format!("{{\"connection_name\",{}}}", serde_json::Value::from(*name));
        let pids = listing
            .lines()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| l.split('\t').next())
            .map(|pid| pid.trim().to_string())
            .filter(|pid| pid.starts_with('<'))
            .collect();
        out.insert(*name, pids);
    }
    Ok(out)
}

/// Closes one connection by its broker pid, as an operator would (`rabbitmqctl
/// close_connection`). Only this test's connections are touched: tests run in parallel.
pub fn close_connection(pid: &str, reason: &str) -> Result<()> {
    rabbitmqctl(&["close_connection", pid, reason]).map(|_| ())
}

/// Writes dead letters straight into the store as a fleet worker does (each with its actor's
/// `dead_lettered` audit, in one transaction with its triage index record): quicker than a
/// campaign of hundreds of rejected actors, and the same rows.
pub async fn index_as_worker(store: &ferry::store::DynStore, letters: &[ferry::jobs::DeadLetter]) -> Result<()> {
    for chunk in letters.chunks(100) {
        let mut txn = ferry::store::Txn::new();
        for d in chunk {
            let actor = ferry::ActorId::parse(&d.actor_id)?;
            txn.set(ferry::keys::audit(&actor), d.audit(&actor, d.at_ms - 5).encode());
            ferry::triage::index::put(&mut txn, ferry::triage::index::current(&**store, d).await?.as_deref(), d);
        }
        store.commit(txn).await?;
    }
    Ok(())
}
