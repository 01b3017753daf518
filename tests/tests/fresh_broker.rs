//! The deploy definitions on a FRESH broker, as `deploy/compose.yaml` runs them: a second
//! RabbitMQ node on this machine (own ports, own data directory) that loads
//! `deploy/rabbitmq/definitions.json` at boot through `deploy/rabbitmq/rabbitmq.conf`. It has
//! no `guest`, and no deploy user can log in before its password is set at deploy time; once
//! set (as the README says), a campaign runs with the compose credentials: the producer as
//! the operator, workers as `ferry-worker` with `FERRY_NO_DECLARE` (draining the dead-letter
//! inbox into the store, the log keeping every letter, the inbox policy in force), `status` as
//! the triage user, which may read and write nothing on the broker; and the worker user cannot
//! publish anywhere but ferry's retry and dead exchanges.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry::clock::{Clock, SystemClock};
use ferry::keys;
use ferry::migrate::OutcomeKind;
use ferry::migrate::lease::Lease;
use ferry::queue::Topology;
use ferry::queue::amqp;
use ferry::queue::topology::{DEFAULT_PREFIX, MONITOR_USER, OPERATOR_USER, TRIAGE_USER, WORKER_USER};
use ferry::store::Txn;
use ferry::v2::DBHead;
use ferry_tests::{Proc, Seed, audits, bin, bounded, run_json, sample, scrape, wait_until};
use lapin::types::FieldTable;
use yaml_rust2::YamlLoader;

const LIMIT: Duration = Duration::from_secs(240);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A RabbitMQ node of its own, stopped (and its process killed) when dropped, also on panic.
struct Node {
    name: String,
    port: u16,
    child: Child,
    log_dir: PathBuf,
}

impl Node {
    /// Starts a node that loads `definitions` at boot with the settings of
    /// deploy/rabbitmq/rabbitmq.conf, with no plugins.
    fn start(dir: &Path, definitions: &Path) -> Result<Node> {
        let name = format!("{}@localhost", ferry::testing::unique_name("ferry-defs").replace('_', "-"));
        let (port, dist) = (free_port()?, free_port()?);
        let conf = read("deploy/rabbitmq/rabbitmq.conf")
            .replace("/etc/rabbitmq/definitions.json", definitions.to_str().context("path")?);
        ensure!(conf.contains(definitions.to_str().context("path")?), "rabbitmq.conf names no definitions file");
        let conf = format!("{conf}\nlisteners.tcp.1 = 127.0.0.1:{port}\n");
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let log_dir = dir.join("log");
        // Debian's rabbitmq-server runs the node as the `rabbitmq` user (su), which must own
        // its files; rabbitmqctl does the same, so both share that user's Erlang cookie.
        let chown = Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(dir).status()?;
        ensure!(chown.success(), "chown of the node directory to the rabbitmq user");
        let child = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", &log_dir)
            .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("rabbitmq-server must be installed")?;
        Ok(Node { name, port, child, log_dir })
    }

    fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("rabbitmqctl").args(["-n", &self.name]).args(args).output()?;
        ensure!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn await_startup(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("rabbitmq-server exited with {status}; logs in {}", self.log_dir.display());
            }
            if self.ctl(&["await_startup", "--timeout", "5"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the node did not start in 120 s; logs in {}", self.log_dir.display());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn url(&self, user: &str, password: &str) -> String {
        format!("amqp://{user}:{password}@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("timeout").args(["60", "rabbitmqctl", "-n", &self.name, "stop"]).output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The AMQP user and the other environment a compose service runs with.
struct Service {
    user: String,
    env: Vec<(String, String)>,
}

fn compose_service(name: &str) -> Result<Service> {
    let docs = YamlLoader::load_from_str(&read("deploy/compose.yaml"))?;
    let env = &docs[0]["services"][name]["environment"];
    let url = env["FERRY_AMQP_URL"].as_str().with_context(|| format!("{name}: no FERRY_AMQP_URL"))?;
    let user = url.strip_prefix("amqp://").and_then(|r| r.split(':').next()).context("user in the URL")?;
    let mut vars = Vec::new();
    if let Some(map) = env.as_hash() {
        for (k, v) in map {
            if let (Some(k), Some(v)) = (k.as_str(), v.as_str())
                && k == "FERRY_NO_DECLARE"
            {
                vars.push((k.to_string(), v.to_string()));
            }
        }
    }
    Ok(Service { user: user.to_string(), env: vars })
}

async fn can_log_in(url: &str) -> bool {
    match tokio::time::timeout(Duration::from_secs(10), amqp::connect(url, "ferry-tests login")).await {
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "ok".into()).await;
            true
        }
        _ => false,
    }
}

/// Takes one message from `queue` as `url`'s user (without ack: it goes back on close);
/// whether the broker let it read the queue.
async fn may_read(url: &str, queue: &str) -> Result<bool> {
    let conn = amqp::connect(url, "ferry-tests read").await?;
    let ch = conn.create_channel().await?;
    let ok = ch.basic_get(queue.into(), lapin::options::BasicGetOptions::default()).await.is_ok();
    let _ = conn.close(200, "ok".into()).await;
    Ok(ok)
}

/// Publishes one message with confirms as `url`'s user; whether the broker took it.
async fn may_publish(url: &str, exchange: &str, key: &str) -> Result<bool> {
    let conn = amqp::connect(url, "ferry-tests publish").await?;
    let ch = amqp::confirm_channel(&conn).await?;
    let props = amqp::json_properties("probe", FieldTable::default());
    let ok = amqp::publish_confirmed(&ch, exchange, key, b"{}", props).await.is_ok();
    let _ = conn.close(200, "ok".into()).await;
    Ok(ok)
}

fn producer(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("ferry-producer"));
    cmd.args(args).env("RUST_LOG", "warn").env("NO_COLOR", "1");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_broker_with_the_definitions_runs_a_campaign_with_the_compose_users_and_nothing_more() -> Result<()> {
    bounded(LIMIT, async {
        let dir = tempfile::tempdir()?;
        let defs = dir.path().join("definitions.json");
        std::fs::copy(root().join("deploy/rabbitmq/definitions.json"), &defs)?;
        let mut node = Node::start(dir.path(), &defs)?;
        node.await_startup().await?;

        // No guest, and no deploy user logs in before its password is set: not with an empty
        // one, not with the old placeholder.
        assert!(!can_log_in(&node.url("guest", "guest")).await, "guest logs in to a definitions broker");
        for user in [WORKER_USER, OPERATOR_USER, TRIAGE_USER, MONITOR_USER] {
            for password in ["", "change-me", "guest"] {
                assert!(!can_log_in(&node.url(user, password)).await, "{user} logs in with {password:?}");
            }
        }

        // Deploy time: the README's `rabbitmqctl change_password`.
        let password = |user: &str| format!("pw-{user}-{:08x}", rand_u32());
        let passwords: Vec<(&str, String)> =
            [WORKER_USER, OPERATOR_USER, TRIAGE_USER, MONITOR_USER].iter().map(|u| (*u, password(u))).collect();
        for (user, pw) in &passwords {
            node.ctl(&["change_password", user, pw])?;
        }
        let pw = |user: &str| passwords.iter().find(|(u, _)| *u == user).map(|(_, p)| p.clone()).unwrap_or_default();
        let (worker, operator, triage) =
            (compose_service("worker")?, compose_service("producer")?, compose_service("triage")?);
        assert_eq!(
            (worker.user.as_str(), operator.user.as_str(), triage.user.as_str()),
            (WORKER_USER, OPERATOR_USER, TRIAGE_USER)
        );
        assert!(worker.env.iter().any(|(k, v)| k == "FERRY_NO_DECLARE" && v == "true"), "compose workers declare");
        let (worker_url, operator_url, triage_url) = (
            node.url(WORKER_USER, &pw(WORKER_USER)),
            node.url(OPERATOR_USER, &pw(OPERATOR_USER)),
            node.url(TRIAGE_USER, &pw(TRIAGE_USER)),
        );
        assert!(!can_log_in(&node.url("guest", "guest")).await);

        // A keyspace with dead letters, and one actor whose first attempts find another
        // holder's live lease: its retries go through the retry exchange.
        let store_url = format!("sqlite:{}", dir.path().join("ferry.db").display());
        let seed = Seed { mix: "journal=0.3".into(), ..Seed::new(10, "fresh") };
        seed.run(&store_url)?;
        let plan = seed.plan();
        let store = ferry::store::open(&store_url, 1).await?;
        let blocked = plan
            .iter()
            .find(|(_, c)| c.expected() == ferry::synth::keyspace::Expected::Outcome(OutcomeKind::Migrated))
            .context("a normal actor")?
            .0
            .clone();
        let now = SystemClock.now_ms();
        let mut txn = Txn::new();
        txn.set(ferry::v2::keys::meta(&blocked), DBHead::staging(1, 1, now).encode());
        txn.set(
            keys::lease(&blocked),
            Lease { holder: "elsewhere#0000000000000001".into(), generation: 1, expires_at_ms: now + 2_500 }.encode(),
        );
        store.commit(txn).await?;

        // The producer as the operator (it declares: the same arguments as the definitions).
        let summary = run_json(&mut producer(&[
            "enqueue",
            "--store",
            &store_url,
            "--amqp",
            &operator_url,
            "--campaign",
            "fresh",
            "--json",
        ]))?;
        assert_eq!(summary["completed"], true, "{summary}");

        // Workers as ferry-worker, with the compose environment (FERRY_NO_DECLARE).
        let mut cmd = Command::new(bin("ferry-worker"));
        cmd.args(["run", "--store", &store_url, "--amqp", &worker_url, "--worker-id", "fresh-worker"]).args([
            "--concurrency",
            "2",
            "--retry-min-ms",
            "100",
            "--retry-max-ms",
            "500",
            "--http",
            "127.0.0.1:0",
        ]);
        for (k, v) in &worker.env {
            cmd.env(k, v);
        }
        let mut w = Proc::spawn("fresh-worker", cmd, dir.path())?;
        let addr = w.http_addr().await?;
        wait_until(Duration::from_secs(90), "every actor has its outcome", || {
            let store = store.clone();
            let n = plan.len();
            async move { Ok(audits(&store).await?.len() == n) }
        })
        .await?;
        let all = audits(&store).await?;
        for (actor, case) in &plan {
            assert!(
                ferry_tests::ended_as_planted(*case, &all[actor.as_str()]),
                "{actor} ({case:?}): {:?}",
                all[actor.as_str()]
            );
        }
        let metrics = scrape(addr).await?;
        assert!(sample(&metrics, ferry::metrics::RETRIES, "") >= 1.0, "no retry went through the retry exchange");
        let dead: usize = plan
            .iter()
            .filter(|(_, c)| matches!(c.expected(), ferry::synth::keyspace::Expected::DeadLetter(_)))
            .count();
        assert!(dead > 0, "the mix planted no dead letter");
        // The worker user drains the inbox (its own letters, already indexed), and the log
        // keeps every one.
        let depth = |q: &str| {
            let listing = node.ctl(&["list_queues", "-q", "--no-table-headers", "name", "messages"]);
            let q = format!("{q}\t");
            listing.map(|l| l.lines().find_map(|line| line.strip_prefix(q.as_str()).map(str::to_string)))
        };
        wait_until(Duration::from_secs(30), "the worker drained the inbox into the log", || {
            let (inbox, log) = (depth("ferry.dead"), depth("ferry.dead-log"));
            async move { Ok(inbox?.as_deref() == Some("0") && log?.as_deref() == Some(dead.to_string().as_str())) }
        })
        .await?;
        assert_eq!(
            sample(&scrape(addr).await?, ferry::metrics::DEAD_INBOX, "kind=\"indexed_skip\""),
            dead as f64,
            "the worker's inbox did not ack its own dead letters"
        );
        w.stop(Duration::from_secs(20)).await?;
        // The inbox policy came with the definitions, on the inbox only.
        let policies = node.ctl(&["list_queues", "-q", "--no-table-headers", "name", "policy"])?;
        assert!(policies.lines().any(|l| l == "ferry.dead\tferry.dead-inbox"), "{policies}");
        assert!(!policies.lines().any(|l| l.starts_with("ferry.dead-log\tferry")), "{policies}");

        // The triage user: status (passive declares need no permission) and nothing else on
        // the broker (triage reads the store).
        let status = run_json(&mut producer(&[
            "status",
            "--store",
            &store_url,
            "--amqp",
            &triage_url,
            "--campaign",
            "fresh",
            "--json",
        ]))?;
        assert_eq!(status["dead"]["messages"], 0, "{status}");
        let t = Topology::new(DEFAULT_PREFIX);
        for queue in [t.dead_queue(), t.dead_log(), t.work_queue()] {
            assert!(!may_read(&triage_url, &queue).await?, "the triage user read {queue}");
        }
        assert!(!may_publish(&triage_url, &t.jobs_exchange(), "work").await?, "the triage user published a job");
        // ... and it may move nothing.
        let requeue = producer(&["dlq", "--store", &store_url, "--amqp", &triage_url, "requeue", "--force", "--json"])
            .output()?;
        assert!(!requeue.status.success(), "the read-only user requeued: {}", String::from_utf8_lossy(&requeue.stdout));

        // The worker user publishes only through ferry's retry and dead exchanges.
        assert!(!may_publish(&worker_url, "", &t.dead_queue()).await?, "worker published through the default exchange");
        assert!(!may_publish(&worker_url, "", &t.work_queue()).await?, "worker published through the default exchange");
        assert!(!may_publish(&worker_url, &t.jobs_exchange(), "work").await?, "worker published a job");
        assert!(
            !may_publish(&operator_url, "", &t.work_queue()).await?,
            "operator published through the default exchange"
        );
        Ok(())
    })
    .await
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id()
}
