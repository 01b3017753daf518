//! deploy/ is what the code declares and reads: the RabbitMQ definitions equal the topology
//! the code declares (and a real broker loads them and a worker runs against them), every
//! metric the dashboard charts and every FERRY_ variable the manifests set exists in the code,
//! and the manifests carry what a platform team needs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use ferry::queue::Topology;
use ferry::queue::topology::{DEFAULT_PREFIX, PLACEHOLDER_PASSWORD_HASH};
use ferry_tests::bin;
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
    let code = Topology::new(DEFAULT_PREFIX).deploy_definitions("/", PLACEHOLDER_PASSWORD_HASH);
    assert_eq!(file, code, "regenerate with: ferry-producer definitions > deploy/rabbitmq/definitions.json");
}

#[test]
fn every_dashboard_metric_exists_in_the_code() {
    let dashboard = read("deploy/grafana/ferry.json");
    let used: BTreeSet<String> = regex::Regex::new(r"ferry_[a-z0-9_]+")
        .unwrap()
        .find_iter(&dashboard)
        .map(|m| m.as_str().trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count").to_string())
        .filter(|m| m != "ferry_fleet")
        .collect();
    assert!(used.len() >= 10, "the dashboard charts too little: {used:?}");
    for metric in &used {
        assert!(
            ferry::metrics::ALL.contains(&metric.as_str()),
            "dashboard uses {metric}, which the code never records"
        );
    }
}

/// The FERRY_ variables the binaries read (`env = "FERRY_..."` in their clap definitions).
fn env_vars_in_code() -> BTreeSet<String> {
    let re = regex::Regex::new(r#"env = "(FERRY_[A-Z_]+)""#).unwrap();
    ["producer/src/main.rs", "worker/src/main.rs"]
        .iter()
        .flat_map(|f| re.captures_iter(&read(f)).map(|c| c[1].to_string()).collect::<Vec<_>>())
        .collect()
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
        "deploy/compose.yaml",
        "deploy/Dockerfile",
    ] {
        for m in re.captures_iter(&read(file)) {
            assert!(known.contains(&m[1]), "{file} sets {}, which neither binary reads", &m[1]);
        }
    }
}

#[test]
fn manifests_parse_and_carry_probes_grace_resources_budget_and_autoscaling() -> Result<()> {
    let config = yaml_docs("deploy/k8s/config.yaml");
    let data = &kind(&config, "ConfigMap")["data"];
    let grace: i64 = data["FERRY_SHUTDOWN_GRACE_SECS"].as_str().context("grace")?.parse()?;
    let budget_mib: i64 = data["FERRY_MEMORY_BUDGET_MIB"].as_str().context("budget")?.parse()?;

    let worker = yaml_docs("deploy/k8s/worker.yaml");
    let pod = &kind(&worker, "Deployment")["spec"]["template"]["spec"];
    ensure!(pod["terminationGracePeriodSeconds"].as_i64().context("terminationGracePeriodSeconds")? > grace);
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    let request = c["resources"]["requests"]["memory"].as_str().context("memory request")?;
    let request_mib: i64 = request.trim_end_matches("Mi").parse().context("memory request in Mi")?;
    ensure!(request_mib >= budget_mib + 64, "memory request {request} does not cover the budget and overhead");
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

    let compose = yaml_docs("deploy/compose.yaml");
    for service in ["rabbitmq", "postgres", "worker", "producer"] {
        assert!(!compose[0]["services"][service].is_badvalue(), "compose has no {service}");
    }
    let dockerfile = read("deploy/Dockerfile");
    assert!(dockerfile.contains("AS build") && dockerfile.contains("USER 10001"), "multi-stage, non-root");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_loads_the_definitions_and_a_least_privilege_worker_runs_against_them() -> Result<()> {
    let vhost = Vhost(ferry::testing::unique_name("ferry_defs"));
    rabbitmqctl(&["add_vhost", &vhost.0])?;
    rabbitmqctl(&["set_permissions", "-p", &vhost.0, "guest", ".*", ".*", ".*"])?;
    let defs =
        read("deploy/rabbitmq/definitions.json").replace("\"vhost\": \"/\"", &format!("\"vhost\": \"{}\"", vhost.0));
    let defs = defs.replace("\"name\": \"/\"", &format!("\"name\": \"{}\"", vhost.0));
    let dir = tempfile::tempdir()?;
    let defs_path = dir.path().join("definitions.json");
    std::fs::write(&defs_path, defs)?;
    rabbitmqctl(&["import_definitions", defs_path.to_str().context("path")?])?;

    // The code's own declaration agrees with what the broker loaded (a difference in any
    // queue argument fails with PRECONDITION_FAILED).
    let guest = format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost.0);
    let conn = ferry::queue::amqp::connect(&guest, "deploy-test").await?;
    let ch = conn.create_channel().await?;
    Topology::new(DEFAULT_PREFIX).declare(&ch).await.context("redeclaring over the loaded definitions")?;
    let _ = conn.close(200, "ok".into()).await;

    // A worker as the least-privilege user, without declaring, migrates an enqueued actor.
    let store = format!("sqlite:{}", dir.path().join("ferry.db").display());
    let ok = |c: &mut Command| -> Result<()> {
        let out = c.output()?;
        ensure!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    ok(Command::new(bin("ferry-producer")).args(["seed", "--store", &store, "--actors", "5", "--mix", "none"]))?;
    ok(Command::new(bin("ferry-producer")).args([
        "enqueue",
        "--store",
        &store,
        "--campaign",
        "defs",
        "--json",
        "--amqp",
        &guest,
    ]))?;
    let worker_url = format!("amqp://ferry-worker:change-me@127.0.0.1:5672/{}", vhost.0);
    let mut worker = Command::new(bin("ferry-worker"))
        .args(["run", "--store", &store, "--amqp", &worker_url, "--no-declare", "--http", "off"])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let db = ferry::store::open(&store, 1).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let migrated = loop {
        let audits = db.scan(&ferry::store::KeyRange::prefix(ferry::keys::AUDIT_PREFIX), 100).await?;
        if audits.len() == 5 || std::time::Instant::now() > deadline {
            break audits.len();
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let _ = worker.kill();
    let out = worker.wait_with_output()?;
    assert_eq!(migrated, 5, "worker log:\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
