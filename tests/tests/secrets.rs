//! End to end: no credential and no payload reaches any output, at any `RUST_LOG`, in either
//! `--log-format`; and the logs are fit for machines (JSON lines with a top-level `message`,
//! every line about a job carrying its actor, campaign and worker, no ANSI on a pipe,
//! quick_check reports on one line).
//!
//! The test plants a password in the store URL (a PostgreSQL role of its own with a password;
//! trust auth accepts it anyway, the point is that the URL carries it, once in the userinfo and
//! once as `?password=`), another in the AMQP URL (a RabbitMQ user of its own), and a marker
//! string in a row of a real SQLite database imported into v1. Then every command of both
//! binaries runs at every level (`error`, `info`, `debug`, `trace`, and `trace` for every
//! library target) in both formats, each level and format with its own schema and queues, in
//! parallel, the secrets passed the way a deployment passes them: in the environment. Every
//! stdout and stderr, and every subcommand's `--help`, is searched for the passwords and the
//! marker: verbatim, in any case, as a byte list (`[0, 103, 117, ...]`, as lapin and
//! tokio_postgres debug-print bytes), hex-encoded and base64-encoded. Without the library
//! ceiling of `ferry::telemetry`, lapin's trace prints the broker password as a byte list and
//! tokio_postgres's debug prints the marker's v1 chunks; without `redact`, the `?password=`
//! store URL is printed at INFO and by `scan` and `local`.
//!
//! Needs PostgreSQL (`ferry::testing::postgres_url()`, superuser), RabbitMQ and `rabbitmqctl`;
//! fails when any is missing. The role, the user, the schemas and the queues are removed at the
//! end, also on failure.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ferry::queue::Topology;
use ferry::synth::sqlite::{DbSpec, scribbled};
use ferry::testing::{postgres_url, unique_name};
use ferry_tests::{Broker, audit_count, bin, bounded};
use serde_json::Value;

/// Every library target turned up as far as it goes: what the ceiling has to hold.
const EVERY_TARGET_TRACE: &str = "trace,lapin=trace,amq_protocol=trace,amq_protocol_tcp=trace,\
    amq_protocol_types=trace,tokio_postgres=trace,postgres_protocol=trace,deadpool=trace,\
    deadpool_postgres=trace,deadpool.postgres=trace,rustls=trace,rustls_connector=trace,hyper=trace,\
    h2=trace,tower=trace,axum=trace,hickory_proto=trace,hickory_resolver=trace,hickory_net=trace,\
    rusqlite=trace,log=trace";

const LEVELS: [&str; 5] = ["error", "info", "debug", "trace", EVERY_TARGET_TRACE];
const FORMATS: [&str; 2] = ["pretty", "json"];

/// Messages of lines about one job (they must carry actor, campaign and worker).
const JOB_MESSAGES: &[&str] = &[
    "migrated",
    "skipped",
    "dead-lettered",
    "bad message dead-lettered",
    "transient failure; retrying later",
    "retrying",
    "taking over a stale migration",
    "migration begun",
    "could not write the audit of an exhausted job",
    "could not publish a job's retry or dead letter; handing it back",
    "a job panicked; handing it back",
];

const MARKER_ACTOR: &str = "marked-actor";
const CORRUPT_ACTOR: &str = "corrupt-actor";
const BAD_ACTOR: &str = "bad-version-actor";
const SEEDED: u64 = 3;

// ---------------------------------------------------------------------------------------------
// What must never be found

/// A secret and the encodings it is searched for in.
struct Needle {
    what: &'static str,
    plain: String,
    bytes: Vec<u8>,
    /// Base64 of the secret at each of the three alignments, less the characters that depend
    /// on the neighbouring bytes.
    base64: Vec<String>,
}

impl Needle {
    fn new(what: &'static str, secret: &str) -> Needle {
        let bytes = secret.as_bytes().to_vec();
        let base64 = (0..3)
            .map(|pad| {
                let mut padded = vec![0u8; pad];
                padded.extend_from_slice(&bytes);
                let enc = base64(&padded);
                // Skip the characters that carry the padding bytes, and the last partial one.
                let skip = (pad * 8).div_ceil(6);
                let full = (padded.len() * 8) / 6;
                enc[skip..full.min(enc.len())].to_string()
            })
            .filter(|s| s.len() >= 8)
            .collect();
        Needle { what, plain: secret.to_string(), bytes, base64 }
    }

    /// Where `text` holds the secret, if it does.
    fn found_in(&self, text: &str) -> Option<String> {
        let lower = text.to_ascii_lowercase();
        if lower.contains(&self.plain.to_ascii_lowercase()) {
            return Some("verbatim".into());
        }
        let hex = hex(&self.bytes);
        if lower.contains(&hex) {
            return Some("hex".into());
        }
        let hex_only: String = lower.chars().filter(char::is_ascii_hexdigit).collect();
        if hex_only.contains(&hex) {
            return Some("hex (with separators)".into());
        }
        if let Some(b) = self.base64.iter().find(|b| text.contains(b.as_str())) {
            return Some(format!("base64 ({b})"));
        }
        for list in byte_lists(text) {
            if list.windows(self.bytes.len()).any(|w| w.eq_ignore_ascii_case(&self.bytes)) {
                return Some("a decoded byte list".into());
            }
        }
        None
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Every run of comma-separated numbers (`[0, 103, 117]`, `0,103,117`) decoded as bytes.
fn byte_lists(text: &str) -> Vec<Vec<u8>> {
    let re = regex::Regex::new(r"\d{1,3}(?:\s*,\s*\d{1,3})+").expect("static regex");
    re.find_iter(text)
        .map(|m| m.as_str().split(',').filter_map(|n| n.trim().parse::<u16>().ok()).map(|n| n as u8).collect())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The planted secrets

/// A PostgreSQL role with a password, owner of the schemas the test creates; dropped with them.
struct PgRole {
    admin: tokio_postgres::Client,
    role: String,
    password: String,
    schemas: Vec<String>,
}

impl PgRole {
    async fn create() -> Result<PgRole> {
        let url = postgres_url();
        let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.with_context(|| {
            format!("PostgreSQL must be running for this test ({})", ferry::store::redact_url(&url))
        })?;
        tokio::spawn(conn);
        let role = unique_name("ferry_secret_role");
        let password = format!("pgPw{}", unique_name("x").replace('_', ""));
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN PASSWORD '{password}'; GRANT CREATE ON DATABASE {} TO {role};",
                current_database(&admin).await?
            ))
            .await
            .context("creating the test role")?;
        Ok(PgRole { admin, role, password, schemas: Vec::new() })
    }

    /// A schema owned by the role.
    async fn schema(&mut self) -> Result<String> {
        let schema = unique_name("ferry_secret");
        self.admin.batch_execute(&format!("CREATE SCHEMA {schema} AUTHORIZATION {}", self.role)).await?;
        self.schemas.push(schema.clone());
        Ok(schema)
    }

    /// The store URL as the role, its password in the userinfo or as `?password=`.
    fn url(&self, schema: &str, in_query: bool) -> String {
        let (host, db) = host_and_db();
        if in_query {
            format!("postgres://{}@{host}/{db}?password={}&schema={schema}", self.role, self.password)
        } else {
            format!("postgres://{}:{}@{host}/{db}?schema={schema}", self.role, self.password)
        }
    }

    async fn drop_all(&self) -> Result<()> {
        for s in &self.schemas {
            self.admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE")).await?;
        }
        self.admin.batch_execute(&format!("DROP OWNED BY {0}; DROP ROLE IF EXISTS {0}", self.role)).await?;
        Ok(())
    }
}

async fn current_database(client: &tokio_postgres::Client) -> Result<String> {
    Ok(client.query_one("SELECT current_database()", &[]).await?.get(0))
}

/// Host, port and database of the test server's URL.
fn host_and_db() -> (String, String) {
    let url = postgres_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let rest = rest.split('?').next().unwrap_or(rest);
    let (host, db) = rest.split_once('/').unwrap_or((rest, "test"));
    (host.to_string(), db.to_string())
}

fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let out = Command::new("rabbitmqctl").args(args).output().context("running rabbitmqctl (is it installed?)")?;
    ensure!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A RabbitMQ user with a password and every permission on `/`; deleted when dropped.
struct AmqpUser {
    name: String,
    password: String,
}

impl AmqpUser {
    fn create() -> Result<AmqpUser> {
        let name = unique_name("ferry_secret_user");
        let password = format!("mqPw{}", unique_name("y").replace('_', ""));
        rabbitmqctl(&["add_user", &name, &password])?;
        let user = AmqpUser { name, password };
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"])?;
        Ok(user)
    }

    fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for AmqpUser {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["delete_user", &self.name]) {
            eprintln!("could not delete the test user {}: {e}", self.name);
        }
    }
}

/// A directory of SQLite files to import: a real database with the marker in its rows, and a
/// corrupt one (its multi-line quick_check report must reach the dead letter as one line).
fn import_dir(dir: &Path, marker: &str) -> Result<PathBuf> {
    let src = dir.join("import");
    std::fs::create_dir_all(&src)?;
    let conn = rusqlite::Connection::open(src.join(format!("{MARKER_ACTOR}.db")))?;
    conn.execute_batch("PRAGMA page_size = 4096; CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, raw BLOB)")?;
    for i in 0..40 {
        conn.execute(
            "INSERT INTO notes (body, raw) VALUES (?1, ?2)",
            rusqlite::params![format!("note {i}: {marker} {}", "x".repeat(i * 7)), marker.as_bytes()],
        )?;
    }
    drop(conn);
    std::fs::write(src.join(format!("{CORRUPT_ACTOR}.db")), scribbled(&DbSpec::small(17)).map_err(|e| anyhow!(e))?)?;
    Ok(src)
}

// ---------------------------------------------------------------------------------------------
// Running the commands

/// What one command printed.
struct Ran {
    what: String,
    level: String,
    format: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// The environment of a deployment: the secrets in the variables, not on the command line.
#[derive(Clone)]
struct Env {
    store: String,
    amqp: String,
    topology: Topology,
    level: String,
    format: String,
    campaign: String,
    dir: PathBuf,
}

impl Env {
    fn command(&self, binary: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin(binary));
        cmd.args(args)
            .env("FERRY_STORE", &self.store)
            .env("FERRY_AMQP_URL", &self.amqp)
            .env("FERRY_QUEUE_PREFIX", &self.topology.prefix)
            .env("FERRY_DELIVERY_LIMIT", self.topology.delivery_limit.to_string())
            .env("FERRY_CAMPAIGN", &self.campaign)
            .env("FERRY_LOG_FORMAT", &self.format)
            .env("RUST_LOG", &self.level)
            // Colours are decided by the terminal test alone.
            .env_remove("NO_COLOR")
            .env("FERRY_HTTP_ADDR", "off")
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, binary: &str, args: &[&str]) -> Result<Ran> {
        let out = self.command(binary, args).output().with_context(|| format!("spawning {binary} {args:?}"))?;
        Ok(Ran {
            what: format!("{binary} {}", args.join(" ")),
            level: self.level.clone(),
            format: self.format.clone(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs a command that has to succeed for the rest to mean anything.
    fn run_ok(&self, binary: &str, args: &[&str]) -> Result<Ran> {
        let ran = self.run(binary, args)?;
        ensure!(
            ran.code == Some(0),
            "{} ({}, {}) exited {:?}: {}",
            ran.what,
            self.level,
            self.format,
            ran.code,
            ran.stderr
        );
        Ok(ran)
    }
}

/// Every command of both binaries, against one fresh schema and topology.
async fn campaign(env: Env, broker: Broker, admin_store: String, import: PathBuf) -> Result<Vec<Ran>> {
    let mut ran = Vec::new();
    let import = import.display().to_string();
    let seeded = SEEDED.to_string();
    ran.push(env.run_ok(
        "ferry-producer",
        &["seed", "--actors", &seeded, "--mix", "none", "--prefix", "seeded", "--max-mib", "1", "--large-share", "0"],
    )?);
    ran.push(env.run_ok("ferry-producer", &["import", &import])?);
    ran.push(env.run_ok("ferry-producer", &["scan"])?);
    ran.push(env.run_ok("ferry-producer", &["enqueue", "--campaign", &env.campaign])?);
    // A job that is not one: its actor and campaign are valid names, its version is not.
    let bad = format!(
        r#"{{"version":2,"campaign":"{}","actor_id":"{BAD_ACTOR}","enqueued_at_ms":0,"recovery":null}}"#,
        env.campaign
    );
    broker.publish_raw(bad.as_bytes(), &format!("{}/{BAD_ACTOR}", env.campaign)).await?;

    // The worker runs until every actor has its outcome and both dead letters are in.
    let out = env.dir.join("worker.out");
    let err = env.dir.join("worker.err");
    let mut worker = env
        .command("ferry-worker", &["run", "--worker-id", &unique_name("secret-worker"), "--retry-min-ms", "100"])
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()
        .context("spawning ferry-worker run")?;
    let store = ferry::store::open(&admin_store, 2).await?;
    let actors = SEEDED as usize + 2;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if audit_count(&store).await? >= actors && broker.dead_log_depth().await? >= 2 {
            break;
        }
        if let Some(status) = worker.try_wait()? {
            bail!("ferry-worker run exited with {status}: {}", std::fs::read_to_string(&err).unwrap_or_default());
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            bail!("the worker did not finish the campaign: {}", std::fs::read_to_string(&err).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = worker.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = worker.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            bail!("ferry-worker run did not stop on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ran.push(Ran {
        what: "ferry-worker run".into(),
        level: env.level.clone(),
        format: env.format.clone(),
        code: status.code(),
        stdout: std::fs::read_to_string(&out)?,
        stderr: std::fs::read_to_string(&err)?,
    });

    for args in [
        &["status", "--campaign", &env.campaign][..],
        &["status", "--campaign", &env.campaign, "--json"],
        &["dlq", "summary"],
        &["dlq", "summary", "--json"],
        &["dlq", "list"],
        &["dlq", "list", "--json"],
        &["dlq", "show", CORRUPT_ACTOR],
        &["dlq", "export"],
        &["dlq", "export", "--format", "csv"],
        &["verify"],
        &["verify", "--json"],
        &["definitions"],
        &["dlq", "requeue", CORRUPT_ACTOR],
        &["dlq", "summary", "--embedded"],
    ] {
        ran.push(env.run("ferry-producer", args)?);
    }
    ran.push(env.run("ferry-worker", &["local", "--json"])?);
    ran.push(env.run("ferry-worker", &["local"])?);
    broker.delete().await?;
    Ok(ran)
}

/// The subcommands a `--help` lists (its `Commands:` section, `help` left out).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// `--help` of every command and subcommand of `binary`, the secrets in the environment.
fn helps(env: &Env, binary: &str) -> Result<Vec<Ran>> {
    let mut out = Vec::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let ran = env.run(binary, &args)?;
        ensure!(ran.code == Some(0), "{} exited {:?}: {}", ran.what, ran.code, ran.stderr);
        for sub in subcommands(&ran.stdout) {
            let mut next = path.clone();
            next.push(sub);
            todo.push(next);
        }
        out.push(ran);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// What the logs must be

/// The fields of a job line: top level or in its span.
fn job_field<'a>(line: &'a Value, name: &str) -> Option<&'a str> {
    line.get(name).or_else(|| line.get("span").and_then(|s| s.get(name))).and_then(Value::as_str)
}

/// Problems with the JSON logs of one run: lines that do not parse, have no top-level
/// `message`, or are about a job without its actor, campaign and worker.
fn json_problems(ran: &Ran) -> Vec<String> {
    let mut problems = Vec::new();
    for line in ran.stderr.lines().filter(|l| !l.trim().is_empty()) {
        // The one plain line a failing command prints last.
        if line.starts_with("ferry-producer: ") || line.starts_with("ferry-worker: ") {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            problems.push(format!("not JSON: {line}"));
            continue;
        };
        let Some(message) = v.get("message").and_then(Value::as_str) else {
            problems.push(format!("no top-level message: {line}"));
            continue;
        };
        let about_job = JOB_MESSAGES.contains(&message) || job_field(&v, "actor").is_some();
        let in_job_span = v.get("span").and_then(|s| s.get("name")).and_then(Value::as_str) == Some("job");
        if (about_job || in_job_span) && message != "bad message dead-lettered" {
            for field in ["actor", "campaign", "worker"] {
                if job_field(&v, field).is_none_or(str::is_empty) {
                    problems.push(format!("a line about a job without {field}: {line}"));
                }
            }
        }
        if let Some(e) = v.get("error").and_then(Value::as_str).filter(|e| e.contains('\n')) {
            problems.push(format!("a multi-line error: {e:?}"));
        }
    }
    problems
}

fn json_lines(ran: &Ran) -> Vec<Value> {
    ran.stderr.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Every place a run printed a secret, one line each.
fn leaks(runs: &[Ran], needles: &[Needle]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for ran in runs {
        for (stream, text) in [("stdout", &ran.stdout), ("stderr", &ran.stderr)] {
            for n in needles {
                if let Some(how) = n.found_in(text) {
                    let line = text.lines().find(|l| n.found_in(l).is_some()).unwrap_or("");
                    let line: String = line.chars().take(300).collect();
                    found.insert(format!(
                        "{} ({} {}): {} on {stream}, {how}: {line}",
                        ran.what, ran.level, ran.format, n.what
                    ));
                }
            }
        }
    }
    found
}

/// clap prints the values of env variables in `--help`: no secret-bearing flag may.
#[tokio::test]
async fn help_never_shows_a_secret_from_the_environment() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (store_pw, amqp_pw) = ("helpStorePw4e1f9a", "helpBrokerPw77c2d0");
    let mut runs = Vec::new();
    for store in [
        format!("postgres://ferry:{store_pw}@127.0.0.1:5432/test"),
        format!("postgres://ferry@127.0.0.1:5432/test?password={store_pw}"),
    ] {
        let env = Env {
            store,
            amqp: format!("amqp://ferry:{amqp_pw}@127.0.0.1:5672/%2f"),
            topology: Topology {
                prefix: "ferry".into(),
                delivery_limit: ferry::queue::topology::DEFAULT_DELIVERY_LIMIT,
            },
            level: "trace".into(),
            format: "pretty".into(),
            campaign: "help".into(),
            dir: dir.path().to_path_buf(),
        };
        runs.extend(helps(&env, "ferry-producer")?);
        runs.extend(helps(&env, "ferry-worker")?);
    }
    // Not vacuous: every subcommand of both binaries was asked (dlq's own included).
    let asked: BTreeSet<&str> = runs.iter().map(|r| r.what.as_str()).collect();
    for what in ["ferry-producer enqueue --help", "ferry-producer dlq show --help", "ferry-worker run --help"] {
        ensure!(asked.contains(what), "{what} was not run: {asked:?}");
    }
    let found =
        leaks(&runs, &[Needle::new("the store password", store_pw), Needle::new("the broker password", amqp_pw)]);
    ensure!(found.is_empty(), "{} leaks:\n{}", found.len(), found.into_iter().collect::<Vec<_>>().join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_or_payload_reaches_any_output_at_any_log_level() -> Result<()> {
    bin("ferry-worker");
    bounded(Duration::from_secs(180), async {
        let dir = tempfile::tempdir()?;
        let marker = format!("PlantedMarker{}", unique_name("z").replace('_', ""));
        let import = import_dir(dir.path(), &marker)?;
        let mut role = PgRole::create().await?;
        let user = AmqpUser::create()?;
        let result = async {
            let needles = Arc::new([
                Needle::new("the store password", &role.password),
                Needle::new("the broker password", &user.password),
                Needle::new("the v1 marker", &marker),
            ]);
            let mut tasks = tokio::task::JoinSet::new();
            for (l, level) in LEVELS.iter().enumerate() {
                for (f, format) in FORMATS.iter().enumerate() {
                    let schema = role.schema().await?;
                    let broker = Broker::new(&format!("secrets{l}{f}")).await?;
                    let run_dir = dir.path().join(format!("run-{l}-{f}"));
                    std::fs::create_dir_all(&run_dir)?;
                    let env = Env {
                        // Both URL forms at every format, across the levels.
                        store: role.url(&schema, (l + f) % 2 == 1),
                        amqp: user.url(),
                        topology: broker.topology.clone(),
                        level: level.to_string(),
                        format: format.to_string(),
                        campaign: format!("secrets-{l}-{f}"),
                        dir: run_dir,
                    };
                    let sep = if postgres_url().contains('?') { '&' } else { '?' };
                    let admin_store = format!("{}{sep}schema={schema}", postgres_url());
                    tasks.spawn(campaign(env, broker, admin_store, import.clone()));
                }
            }
            let mut runs = Vec::new();
            while let Some(done) = tasks.join_next().await {
                runs.extend(done??);
            }
            eprintln!("{} runs", runs.len());

            let mut problems = leaks(&runs, &*needles);
            for ran in &runs {
                if ran.stderr.contains('\x1b') {
                    problems
                        .insert(format!("{} ({} {}): ANSI escape on a piped stderr", ran.what, ran.level, ran.format));
                }
                if ran.format == "json" {
                    for p in json_problems(ran) {
                        problems.insert(format!("{} ({}): {p}", ran.what, ran.level));
                    }
                }
            }

            // The checks above found lines to check: the info-level worker logged the migration,
            // the dead letter with its campaign, and the bad message with the names it could
            // read, all in JSON; and the quick_check report reached `dlq export` on one line.
            let worker_json = runs
                .iter()
                .find(|r| r.what == "ferry-worker run" && r.level == "info" && r.format == "json")
                .ok_or_else(|| anyhow!("no info-level JSON worker run"))?;
            let lines = json_lines(worker_json);
            let migrated = lines
                .iter()
                .find(|l| l["message"] == "migrated" && job_field(l, "actor") == Some(MARKER_ACTOR))
                .ok_or_else(|| anyhow!("no INFO line for the migration of {MARKER_ACTOR}: {}", worker_json.stderr))?;
            ensure!(migrated["level"] == "INFO", "{migrated}");
            for field in ["pages", "bytes", "ms"] {
                ensure!(migrated[field].is_u64(), "migrated line without {field}: {migrated}");
            }
            let dead = lines
                .iter()
                .find(|l| l["message"] == "dead-lettered" && job_field(l, "actor") == Some(CORRUPT_ACTOR))
                .ok_or_else(|| anyhow!("no dead-lettered line for {CORRUPT_ACTOR}: {}", worker_json.stderr))?;
            ensure!(job_field(dead, "campaign") == Some("secrets-1-1"), "{dead}");
            let bad = lines
                .iter()
                .find(|l| l["message"] == "bad message dead-lettered")
                .ok_or_else(|| anyhow!("no bad message line: {}", worker_json.stderr))?;
            ensure!(job_field(bad, "actor") == Some(BAD_ACTOR) && job_field(bad, "campaign").is_some(), "{bad}");
            ensure!(job_field(bad, "worker").is_some(), "{bad}");

            let export = runs
                .iter()
                .find(|r| r.what == "ferry-producer dlq export" && r.level == "info" && r.format == "json")
                .ok_or_else(|| anyhow!("no dlq export"))?;
            let letters: Vec<Value> = serde_json::from_str(&export.stdout).context("dlq export is JSON")?;
            let corrupt = letters
                .iter()
                .find(|l| l["actor_id"] == CORRUPT_ACTOR)
                .ok_or_else(|| anyhow!("no dead letter for {CORRUPT_ACTOR}: {}", export.stdout))?;
            let error = corrupt["error"].as_str().unwrap_or("");
            ensure!(error.contains("quick_check failed") && error.contains("; "), "{corrupt}");
            ensure!(!error.contains('\n'), "the quick_check report is not one line: {error:?}");
            let csv = runs
                .iter()
                .find(|r| r.what == "ferry-producer dlq export --format csv" && r.level == "info")
                .ok_or_else(|| anyhow!("no csv export"))?;
            ensure!(csv.stdout.lines().count() == letters.len() + 1, "CSV records span lines:\n{}", csv.stdout);

            ensure!(
                problems.is_empty(),
                "{} problems:\n{}",
                problems.len(),
                problems.into_iter().collect::<Vec<_>>().join("\n")
            );
            Ok(())
        }
        .await;
        let cleanup = role.drop_all().await;
        drop(user);
        result?;
        cleanup
    })
    .await
}
