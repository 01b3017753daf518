//! End to end: every command that works on an existing store, pointed at one that does not
//! exist, fails with a message naming the store and creates nothing: no file, no directory.
//! (Only `seed`, `import` and `ferry-worker local --seed-demo` create a store.) A worker that
//! silently opened a new empty store would ack a whole campaign as `skipped_no_v1`.

use std::process::{Command, Stdio};

use anyhow::{Result, ensure};
use ferry_tests::bin;

/// Runs `binary args...` (`STORE` replaced by `store`, `AMQP` by the test broker) with no ferry
/// settings from the environment; returns whether it succeeded and its stderr.
fn run(binary: &str, args: &[&str], store: &str) -> Result<(bool, String)> {
    let mut cmd = Command::new(bin(binary));
    for (k, _) in std::env::vars() {
        if k.starts_with("FERRY_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(args.iter().map(|a| match *a {
            "STORE" => store.to_string(),
            "AMQP" => ferry::testing::amqp_url(),
            other => other.to_string(),
        }))
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// A queue prefix no other test uses (nothing is declared: the store is opened first).
const PREFIX: &str = "ferry_missing_store_test";

#[test]
fn read_only_and_worker_commands_on_a_missing_sqlite_store_fail_clearly_and_create_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing_dir = dir.path().join("x");
    let url = format!("sqlite:{}", missing_dir.join("missing.db").display());
    let commands: &[(&str, &[&str])] = &[
        ("ferry-producer", &["scan", "--store", "STORE"]),
        ("ferry-producer", &["verify", "--store", "STORE"]),
        (
            "ferry-producer",
            &["status", "--store", "STORE", "--amqp", "AMQP", "--campaign", "c1", "--queue-prefix", PREFIX],
        ),
        (
            "ferry-producer",
            &["enqueue", "--store", "STORE", "--amqp", "AMQP", "--campaign", "c1", "--queue-prefix", PREFIX],
        ),
        ("ferry-producer", &["dlq", "--store", "STORE", "list", "--embedded"]),
        ("ferry-worker", &["local", "--store", "STORE"]),
        ("ferry-worker", &["run", "--store", "STORE", "--amqp", "AMQP", "--http", "off", "--queue-prefix", PREFIX]),
    ];
    for (binary, args) in commands {
        let (ok, stderr) = run(binary, args, &url)?;
        let what = format!("{binary} {}", args.join(" "));
        ensure!(!ok, "{what} succeeded on a missing store:\n{stderr}");
        ensure!(
            stderr.contains(&format!("no ferry store at {url}")) && stderr.contains("no such file"),
            "{what}: the error does not name the missing store:\n{stderr}"
        );
        ensure!(!missing_dir.exists(), "{what} created {}", missing_dir.display());
    }
    ensure!(std::fs::read_dir(dir.path())?.count() == 0, "something was created in {}", dir.path().display());

    // `seed` is the command that creates a store; every command above then opens it.
    let (ok, stderr) = run("ferry-producer", &["seed", "--store", "STORE", "--actors", "3", "--mix", "none"], &url)?;
    ensure!(ok, "seed failed:\n{stderr}");
    let (ok, stderr) = run("ferry-producer", &["scan", "--store", "STORE"], &url)?;
    ensure!(ok, "scan of the seeded store failed:\n{stderr}");
    Ok(())
}
