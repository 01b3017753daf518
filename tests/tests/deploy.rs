//! deploy/ is what the code declares and reads: the RabbitMQ definitions equal the topology
//! the code declares (and a real broker loads them and a worker runs against them), every
//! metric the dashboard charts and every FERRY_ variable the manifests set exists in the code,
//! and the manifests carry what a platform team needs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use ferry::queue::Topology;
use ferry::queue::topology::{DEFAULT_PREFIX, MONITOR_USER, PasswordHashes};
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml_docs(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
}

fn kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter().find(|d| d["kind"].as_str() == Some(kind)).unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn definitions_json_is_the_topology_the_code_declares() {
    let file: serde_json::Value = serde_json::from_str(&read("deploy/rabbitmq/definitions.json")).unwrap();
    let code = Topology::new(DEFAULT_PREFIX).deploy_definitions("/", &PasswordHashes::default());
    assert_eq!(file, code, "regenerate with: ferry-producer definitions > deploy/rabbitmq/definitions.json");
}

/// The FERRY_ variables the binaries read (`env = "FERRY_..."` in their clap definitions, in
/// every source file of both binaries).
fn env_vars_in_code() -> BTreeSet<String> {
    let re = regex::Regex::new(r#"env = "(FERRY_[A-Z_]+)""#).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sources: Vec<String> = ["producer/src", "worker/src"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(root.join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}")))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .map(|path| std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect();
    sources.iter().flat_map(|text| re.captures_iter(text).map(|c| c[1].to_string()).collect::<Vec<_>>()).collect()
}

#[test]
fn every_env_variable_of_the_manifests_exists_in_the_code() {
    let known = env_vars_in_code();
    let re = regex::Regex::new(r"\b(FERRY_[A-Z_]+)\b").unwrap();
    for file in [
        "deploy/k8s/config.yaml",
        "deploy/k8s/worker.yaml",
        "deploy/k8s/producer-job.yaml",
        "deploy/k8s/secret.example.yaml",
        "deploy/k8s/console.yaml",
        "deploy/compose.yaml",
        "deploy/Dockerfile",
    ] {
        for m in re.captures_iter(&read(file)) {
            assert!(known.contains(&m[1]), "{file} sets {}, which neither binary reads", &m[1]);
        }
    }
}

/// The pod labels of a manifest's Deployment (what its Service must select).
fn deployment_labels(docs: &[Yaml]) -> Yaml {
    kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].clone()
}

#[test]
fn manifests_parse_and_carry_probes_grace_resources_budget_and_autoscaling() -> Result<()> {
    let config = yaml_docs("deploy/k8s/config.yaml");
    let data = &kind(&config, "ConfigMap")["data"];
    let grace: i64 = data["FERRY_SHUTDOWN_GRACE_SECS"].as_str().context("grace")?.parse()?;
    let budget_mib: i64 = data["FERRY_MEMORY_BUDGET_MIB"].as_str().context("budget")?.parse()?;
    // One layout for every pod that reads the ConfigMap (workers, producer, console).
    assert_eq!(data["FERRY_LAYOUT"].as_str(), Some("ferry"), "the layout is set where config is listed");

    let worker = yaml_docs("deploy/k8s/worker.yaml");
    let pod = &kind(&worker, "Deployment")["spec"]["template"]["spec"];
    ensure!(pod["terminationGracePeriodSeconds"].as_i64().context("terminationGracePeriodSeconds")? > grace);
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    let request = c["resources"]["requests"]["memory"].as_str().context("memory request")?;
    let request_mib: i64 = request.trim_end_matches("Mi").parse().context("memory request in Mi")?;
    // The overhead measured over the budget (docs/PERFORMANCE.md, memory at the manifest's
    // settings) is at most 107 MiB: the manifests promise 128.
    ensure!(request_mib >= budget_mib + 128, "memory request {request} does not cover the budget and overhead");
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert!(!kind(&worker, "PodDisruptionBudget")["spec"]["selector"].is_badvalue());

    let job = yaml_docs("deploy/k8s/producer-job.yaml");
    let args = &kind(&job, "Job")["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args[0].as_str(), Some("enqueue"));

    let keda = yaml_docs("deploy/k8s/keda.yaml");
    let scaled = &kind(&keda, "ScaledObject")["spec"];
    assert_eq!(scaled["scaleTargetRef"]["name"].as_str(), Some("ferry-worker"));
    let trigger = &scaled["triggers"][0];
    assert_eq!(trigger["type"].as_str(), Some("rabbitmq"));
    assert_eq!(trigger["metadata"]["queueName"].as_str(), Some(Topology::new(DEFAULT_PREFIX).work_queue().as_str()));
    assert!(scaled["minReplicaCount"].as_i64().is_some() && scaled["maxReplicaCount"].as_i64().is_some());
    assert!(!kind(&keda, "TriggerAuthentication")["spec"]["secretTargetRef"].is_badvalue());

    let console = yaml_docs("deploy/k8s/console.yaml");
    let deployment = &kind(&console, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(deployment["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let c = &deployment["containers"][0];
    assert_eq!(c["args"][0].as_str(), Some("console"));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    let env = |name: &str| c["env"].as_vec().into_iter().flatten().find(|e| e["name"].as_str() == Some(name));
    // A pod address is not loopback: the console refuses to start without its token.
    let token = env("FERRY_CONSOLE_TOKEN").context("the console's token")?;
    assert_eq!(token["valueFrom"]["secretKeyRef"]["name"].as_str(), Some("ferry-secrets"));
    let key = token["valueFrom"]["secretKeyRef"]["key"].as_str().context("token key")?;
    let secret = yaml_docs("deploy/k8s/secret.example.yaml");
    ensure!(!kind(&secret, "Secret")["stringData"][key].is_badvalue(), "secret.example.yaml has no {key}");
    // Read-mostly: the triage broker user, read-only.
    let amqp = env("FERRY_AMQP_URL").context("the console's broker")?;
    assert_eq!(amqp["valueFrom"]["secretKeyRef"]["key"].as_str(), Some("triage-amqp-url"));
    assert_eq!(env("FERRY_CONSOLE_READ_ONLY").and_then(|e| e["value"].as_str()), Some("true"));
    let service = &kind(&console, "Service")["spec"];
    assert_eq!(service["type"].as_str(), Some("ClusterIP"));
    assert_eq!(service["selector"], deployment_labels(&console));

    let compose = yaml_docs("deploy/compose.yaml");
    for service in ["rabbitmq", "postgres", "worker", "producer", "console"] {
        assert!(!compose[0]["services"][service].is_badvalue(), "compose has no {service}");
    }
    // The rehearsal's console: read-only as the triage user, its token required, published on
    // the host's loopback only.
    let console = &compose[0]["services"]["console"];
    let env = &console["environment"];
    assert!(env["FERRY_AMQP_URL"].as_str().is_some_and(|u| u.starts_with("amqp://ferry-triage:")));
    assert_eq!(env["FERRY_CONSOLE_READ_ONLY"].as_str(), Some("true"));
    assert!(env["FERRY_CONSOLE_TOKEN"].as_str().is_some_and(|t| t.contains(":?")), "no default token");
    assert!(console["ports"][0].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")));
    let dockerfile = read("deploy/Dockerfile");
    assert!(dockerfile.contains("AS build") && dockerfile.contains("USER 10001"), "multi-stage, non-root");
    assert!(dockerfile.contains("COPY .cargo .cargo"), "the image is built with the workspace's build settings");
    Ok(())
}

fn rabbitmqctl(args: &[&str]) -> Result<String> {
    let out = Command::new("rabbitmqctl").args(args).output().context("rabbitmqctl must be installed")?;
    ensure!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes the vhost (and everything in it) when dropped.
struct Vhost(String);

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.0]).output();
    }
}

/// The shipped definitions have no password: no deploy user can log in until one is set.
#[test]
fn shipped_definitions_have_no_usable_password() {
    let file: serde_json::Value = serde_json::from_str(&read("deploy/rabbitmq/definitions.json")).unwrap();
    let users = file["users"].as_array().expect("users");
    assert_eq!(users.len(), 4, "{users:?}");
    for user in users {
        assert_eq!(user["password_hash"], "", "{user}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_loads_the_definitions_topology_and_the_code_declares_the_same() -> Result<()> {
    let vhost = Vhost(ferry::testing::unique_name("ferry_defs"));
    rabbitmqctl(&["add_vhost", &vhost.0])?;
    rabbitmqctl(&["set_permissions", "-p", &vhost.0, "guest", ".*", ".*", ".*"])?;
    // The topology only: the users are global on this shared broker (tests/tests/fresh_broker.rs
    // loads the whole file into a broker of its own).
    let mut defs: serde_json::Value = serde_json::from_str(&read("deploy/rabbitmq/definitions.json"))?;
    for key in ["users", "permissions", "vhosts"] {
        defs.as_object_mut().context("definitions")?.remove(key);
    }
    for key in ["exchanges", "queues", "bindings", "policies"] {
        for item in defs[key].as_array_mut().context("list")? {
            item["vhost"] = serde_json::Value::from(vhost.0.as_str());
        }
    }
    let dir = tempfile::tempdir()?;
    let defs_path = dir.path().join("definitions.json");
    std::fs::write(&defs_path, serde_json::to_vec(&defs)?)?;
    rabbitmqctl(&["import_definitions", defs_path.to_str().context("path")?])?;

    // The code's own declaration agrees with what the broker loaded (a difference in any
    // queue argument fails with PRECONDITION_FAILED), and the passive check finds it all.
    let guest = format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost.0);
    let conn = ferry::queue::amqp::connect(&guest, "deploy-test").await?;
    let ch = conn.create_channel().await?;
    let topology = Topology::new(DEFAULT_PREFIX);
    topology.check_exists(&ch).await.context("the loaded topology is complete")?;
    topology.declare(&ch).await.context("redeclaring over the loaded definitions")?;
    let _ = conn.close(200, "ok".into()).await;
    // The inbox policy loaded with them (this broker accepts it) and is the inbox's, only.
    let policies = rabbitmqctl(&["list_queues", "-p", &vhost.0, "-q", "--no-table-headers", "name", "policy"])?;
    let policy_of = |q: &str| {
        policies
            .lines()
            .map(|l| l.split('\t'))
            .find_map(|mut cols| (cols.next() == Some(q)).then(|| cols.next().unwrap_or_default().trim().to_string()))
    };
    assert_eq!(policy_of(&topology.dead_queue()), Some(topology.inbox_policy()), "{policies}");
    for q in [topology.dead_log(), topology.work_queue()] {
        assert_eq!(policy_of(&q), Some(String::new()), "{policies}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dashboard and autoscaling against real scrapes and the real management API

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0, optional basic auth); the body of a 200.
async fn http_get(port: u16, path: &str, auth: Option<(&str, &str)>) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("127.0.0.1:{port} (is the RabbitMQ plugin enabled? .ci/run enables it)"))?;
    let auth = auth.map_or(String::new(), |(u, p)| format!("Authorization: Basic {}\r\n", base64(&format!("{u}:{p}"))));
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n").as_bytes()).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP response")?;
    ensure!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "GET {path}: {head}");
    Ok(body.to_string())
}

fn base64(s: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Port of the rabbitmq_prometheus plugin and of the management API on the test broker.
const PROMETHEUS_PORT: u16 = 15692;
const MANAGEMENT_PORT: u16 = 15672;

fn dashboard_exprs() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/grafana/ferry.json")).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    exprs
}

/// Metric names a PromQL expression reads (`prefix_...` identifiers).
fn names_in(exprs: &[String], prefix: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(&format!(r"\b{prefix}[a-z0-9_]+")).unwrap();
    exprs.iter().flat_map(|e| re.find_iter(e).map(|m| m.as_str().to_string()).collect::<Vec<_>>()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_reads_series_that_real_scrapes_export() -> Result<()> {
    let exprs = dashboard_exprs();
    let ferry_names = names_in(&exprs, "ferry_");
    let rabbit_names = names_in(&exprs, "rabbitmq_");
    assert!(ferry_names.len() >= 10 && !rabbit_names.is_empty(), "{ferry_names:?} {rabbit_names:?}");

    // ferry's series, from a fresh worker (every series exists from the start).
    let dir = tempfile::tempdir()?;
    let store = format!("sqlite:{}", dir.path().join("ferry.db").display());
    ferry::store::open(&store, 1).await?;
    let broker = ferry_tests::Broker::new("deploy_dash").await?;
    let mut w = ferry_tests::WorkerSpec::new(&store, &broker.topology, "dash").http().start(dir.path())?;
    let addr = w.http_addr().await?;
    w.consuming().await?;
    let scraped = ferry_tests::scrape(addr).await?;
    w.stop(std::time::Duration::from_secs(20)).await?;
    let series = |text: &str, name: &str| text.lines().any(|l| !l.starts_with('#') && l.starts_with(name));
    for name in &ferry_names {
        assert!(series(&scraped, name), "the dashboard reads {name}, which a fresh worker does not export");
    }

    // RabbitMQ's, from the plugin's per-object endpoint, labelled with our queues; the
    // default endpoint has no per-queue series (why the README says /metrics/per-object).
    let work = format!("queue=\"{}\"", broker.topology.work_queue());
    let dead = format!("queue=\"{}\"", broker.topology.dead_queue());
    // The plugin reports a new queue after its next statistics round (every few seconds).
    let missing = |per_object: &str| {
        rabbit_names
            .iter()
            .flat_map(|name| [&work, &dead].map(|label| (name.clone(), label.clone())))
            .filter(|(name, label)| {
                !per_object.lines().any(|l| l.starts_with(&format!("{name}{{")) && l.contains(label.as_str()))
            })
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let per_object = http_get(PROMETHEUS_PORT, "/metrics/per-object", None).await?;
        let absent = missing(&per_object);
        if absent.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "/metrics/per-object has no series for {absent:?}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let aggregated = http_get(PROMETHEUS_PORT, "/metrics", None).await?;
    assert!(!aggregated.contains(&work), "the default endpoint is per-queue after all");
    for expr in &exprs {
        if expr.contains("rabbitmq_") {
            assert!(expr.contains("queue=\"ferry.") || expr.contains("queue=~\"ferry\\\\."), "{expr}");
        }
    }
    let dashboard = read("deploy/grafana/ferry.json");
    assert!(dashboard.contains("/metrics/per-object"), "the panel does not say what to scrape");
    let readme = read("README.md");
    let deploying = readme.split("## Deploying").nth(1).context("README has a Deploying section")?;
    assert!(deploying.contains("/metrics/per-object"), "README Deploying does not say what to scrape");
    broker.delete().await
}

#[test]
fn keda_counts_ready_and_unacked_through_the_management_api_with_a_monitoring_user() -> Result<()> {
    let keda = yaml_docs("deploy/k8s/keda.yaml");
    let trigger = &kind(&keda, "ScaledObject")["spec"]["triggers"][0];
    assert_eq!(trigger["metadata"]["protocol"].as_str(), Some("http"));
    assert_eq!(trigger["metadata"]["mode"].as_str(), Some("QueueLength"));
    assert!(trigger["metadata"]["host"].is_badvalue(), "the host (with a password) comes from the secret");
    let auth = &kind(&keda, "TriggerAuthentication")["spec"]["secretTargetRef"][0];
    assert_eq!(auth["parameter"].as_str(), Some("host"));
    let key = auth["key"].as_str().context("secret key")?;
    let secret = yaml_docs("deploy/k8s/secret.example.yaml");
    let host = kind(&secret, "Secret")["stringData"][key].as_str().context("the secret example has the host")?;
    assert!(host.starts_with(&format!("http://{MONITOR_USER}:")) && host.contains(":15672/"), "{host}");
    let defs: serde_json::Value = serde_json::from_str(&read("deploy/rabbitmq/definitions.json"))?;
    let monitor = defs["users"].as_array().context("users")?.iter().find(|u| u["name"] == MONITOR_USER);
    assert_eq!(monitor.context("monitor user")?["tags"], serde_json::json!(["monitoring"]));
    let perms = defs["permissions"].as_array().context("permissions")?.iter().find(|p| p["user"] == MONITOR_USER);
    let perms = perms.context("monitor permissions")?;
    for p in ["configure", "write", "read"] {
        assert_eq!(perms[p], "^$", "the monitoring user may {p}");
    }
    Ok(())
}

/// Deletes a broker user when dropped.
struct User(String);

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_user", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_api_messages_count_unacked_deliveries_for_a_monitoring_user() -> Result<()> {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    let broker = ferry_tests::Broker::new("deploy_keda").await?;
    let user = User(ferry::testing::unique_name("ferry-monitor"));
    let password = ferry::testing::unique_name("pw");
    rabbitmqctl(&["add_user", &user.0, &password])?;
    rabbitmqctl(&["set_user_tags", &user.0, "monitoring"])?;
    rabbitmqctl(&["set_permissions", "-p", "/", &user.0, "^$", "^$", "^$"])?;

    for i in 0..5 {
        broker.publish_raw(b"{}", &format!("keda/{i}")).await?;
    }
    // A consumer holds 3 deliveries unacked (as running jobs are).
    let conn = ferry::queue::amqp::connect(&broker.url, "deploy-test keda").await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(3, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            broker.topology.work_queue().as_str().into(),
            "keda-holder".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await?;
    let mut held = Vec::new();
    while held.len() < 3 {
        held.push(consumer.next().await.context("consumer ended")??);
    }
    let path = format!("/api/queues/%2F/{}", broker.topology.work_queue());
    let mut last = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    // The management API's statistics refresh every few seconds.
    while std::time::Instant::now() < deadline {
        let body = http_get(MANAGEMENT_PORT, &path, Some((&user.0, &password))).await?;
        last = serde_json::from_str(&body)?;
        if last["messages_unacknowledged"] == 3 && last["messages_ready"] == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(last["messages_ready"], 2, "{last}");
    assert_eq!(last["messages_unacknowledged"], 3, "{last}");
    // What `mode: QueueLength` over http scales on: ready + unacked.
    assert_eq!(last["messages"], 5, "{last}");
    let _ = conn.close(200, "done".into()).await;
    broker.delete().await
}
