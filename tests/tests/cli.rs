//! The command lines of both binaries, run as a user runs them: no default store or broker,
//! global options after the subcommand, `--version` everywhere, secrets hidden from `--help`,
//! nonsense values refused at parse time, exit 4 for commands that did nothing, bounded AMQP
//! connects that name the redacted URL, an HTTP port collision that names the address and the
//! flag, and `status`'s rate and ETA.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ferry::testing::{Backend, TestStore, amqp_url};
use ferry_tests::{Broker, Proc, Seed, WorkerSpec, audit_count, bin, bounded, enqueue, run_json, wait_until};

const PASSWORD: &str = "hunter2-cli-test";

/// A binary with none of the environment's `FERRY_*` variables (they would stand in for the
/// flags under test).
fn command(name: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FERRY_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("NO_COLOR", "1").env("RUST_LOG", "info,lapin=warn,amq_protocol=warn").stdin(Stdio::null());
    cmd
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("spawning {cmd:?}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn expect_code(cmd: &mut Command, code: i32) -> Result<Output> {
    let out = output(cmd)?;
    ensure!(
        out.status.code() == Some(code),
        "{cmd:?}: exit {:?}, expected {code}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    Ok(out)
}

#[test]
fn global_options_are_accepted_after_the_subcommand() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let ts = rt.block_on(TestStore::new(Backend::Sqlite));
    let broker = rt.block_on(Broker::new("cli_global"))?;
    let prefix = broker.topology.prefix.clone();
    // Embedded: the store after the leaf subcommand.
    let out = expect_code(command("ferry-producer").args(["dlq", "summary", "--store", &ts.url, "--embedded"]), 0)?;
    ensure!(String::from_utf8_lossy(&out.stdout).contains("0 dead letters"), "{out:?}");
    // Broker: every store and broker flag after the leaf, then some before it.
    let after = ["dlq", "list", "--json", "--store", &ts.url, "--amqp", &broker.url, "--queue-prefix", &prefix];
    let listed = run_json(command("ferry-producer").args(after))?;
    ensure!(listed == serde_json::json!([]), "{listed}");
    let mixed = ["dlq", "--store", &ts.url, "summary", "--amqp", &broker.url, "--queue-prefix", &prefix, "--json"];
    run_json(command("ferry-producer").args(mixed))?;
    // The log format is global in both binaries.
    expect_code(
        command("ferry-producer").args(["dlq", "summary", "--store", &ts.url, "--embedded", "--log-format", "json"]),
        0,
    )?;
    rt.block_on(broker.delete())
}

#[test]
fn version_works_on_every_subcommand() -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    for (name, args) in [
        ("ferry-producer", vec!["--version"]),
        ("ferry-producer", vec!["dlq", "summary", "--version"]),
        ("ferry-producer", vec!["enqueue", "--version"]),
        ("ferry-worker", vec!["run", "--version"]),
        ("ferry-worker", vec!["local", "--version"]),
    ] {
        let out = expect_code(command(name).args(&args), 0)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(stdout.contains(version), "{name} {args:?}: {stdout}");
    }
    Ok(())
}

#[test]
fn help_never_prints_the_env_values_of_secret_flags() -> Result<()> {
    let store = format!("postgres://ferry:{PASSWORD}@127.0.0.1:5432/test");
    let amqp = format!("amqp://ferry:{PASSWORD}@127.0.0.1:5672/%2f");
    let mut seen = 0;
    for (name, args) in [
        ("ferry-producer", vec!["enqueue"]),
        ("ferry-producer", vec!["status"]),
        ("ferry-producer", vec!["dlq"]),
        ("ferry-producer", vec!["dlq", "requeue"]),
        ("ferry-producer", vec!["seed"]),
        ("ferry-producer", vec!["verify"]),
        ("ferry-producer", vec!["definitions"]),
        ("ferry-worker", vec!["run"]),
        ("ferry-worker", vec!["local"]),
    ] {
        let out = expect_code(
            command(name)
                .args(&args)
                .arg("--help")
                .env("FERRY_STORE", &store)
                .env("FERRY_AMQP_URL", &amqp)
                .env("FERRY_WORKER_PASSWORD_HASH", PASSWORD),
            0,
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(!text.contains(PASSWORD), "{name} {args:?} --help prints a secret:\n{text}");
        seen += usize::from(text.contains("FERRY_STORE"));
    }
    ensure!(seen >= 7, "the help names the variables ({seen})");
    Ok(())
}

#[test]
fn no_store_and_no_broker_by_default() -> Result<()> {
    let cwd = tempfile::tempdir()?;
    let cases: [(&str, Vec<&str>, &str); 6] = [
        ("ferry-worker", vec!["run", "--amqp", "amqp://u:p@127.0.0.1:1/%2f"], "--store"),
        ("ferry-worker", vec!["local"], "--store"),
        ("ferry-worker", vec!["run", "--store", "sqlite:x.db"], "--amqp"),
        ("ferry-producer", vec!["enqueue", "--store", "sqlite:x.db", "--campaign", "c"], "--amqp"),
        ("ferry-producer", vec!["status", "--store", "sqlite:x.db"], "--amqp"),
        ("ferry-producer", vec!["scan"], "--store"),
    ];
    for (name, args, flag) in cases {
        let out = expect_code(command(name).args(&args).current_dir(cwd.path()), 2)?;
        ensure!(stderr(&out).contains(flag), "{name} {args:?} does not ask for {flag}: {}", stderr(&out));
    }
    // dlq takes its store and broker as globals: still required, and named (the broker only
    // by a fleet requeue: reads need the store alone).
    let out = expect_code(command("ferry-producer").args(["dlq", "summary", "--embedded"]).current_dir(cwd.path()), 2)?;
    ensure!(stderr(&out).contains("--store or FERRY_STORE"), "{}", stderr(&out));
    let out = expect_code(
        command("ferry-producer").args(["dlq", "requeue", "--store", "sqlite:x.db"]).current_dir(cwd.path()),
        2,
    )?;
    ensure!(stderr(&out).contains("--amqp or FERRY_AMQP_URL"), "{}", stderr(&out));
    let left: Vec<_> = std::fs::read_dir(cwd.path())?.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    ensure!(!left.iter().any(|f| f.to_string_lossy().starts_with("ferry.db")), "a default store was opened: {left:?}");
    Ok(())
}

#[test]
fn nonsense_values_are_refused_at_parse_time() -> Result<()> {
    // Unreachable store and broker: only the parser can refuse these, with a usage error.
    let run = ["run", "--store", "sqlite:/nonexistent/x.db", "--amqp", "amqp://u:p@127.0.0.1:1/%2f"];
    let worker_cases: [(&[&str], &str); 12] = [
        (&["--concurrency", "0"], "--concurrency"),
        (&["--memory-budget-mib", "0"], "--memory-budget-mib"),
        (&["--queue-prefix", "bad prefix!"], "--queue-prefix"),
        (&["--queue-prefix", ""], "--queue-prefix"),
        (&["--max-attempts", "0"], "--max-attempts"),
        (&["--lease-ttl-secs", "0"], "--lease-ttl-secs"),
        (&["--retry-min-ms", "0"], "--retry-min-ms"),
        (&["--retry-min-ms", "5000", "--retry-max-ms", "10"], "--retry-max-ms"),
        (&["--shutdown-grace", "1000000"], "--shutdown-grace"),
        (&["--delivery-limit", "0"], "--delivery-limit"),
        (&["--http", "nonsense"], "--http"),
        (&["--amqp-connect-timeout-secs", "0"], "--amqp-connect-timeout-secs"),
    ];
    for (extra, flag) in worker_cases {
        let out = expect_code(command("ferry-worker").args(run).args(extra), 2)?;
        ensure!(stderr(&out).contains(flag), "{extra:?}: {}", stderr(&out));
    }
    let enqueue = ["enqueue", "--store", "sqlite:/nonexistent/x.db", "--amqp", "amqp://u:p@127.0.0.1:1/%2f"];
    let producer_cases: [(&[&str], &str); 9] = [
        (&["--campaign", "c", "--rate", "0"], "--rate"),
        (&["--campaign", "c", "--rate=-5"], "--rate"),
        (&["--campaign", "c", "--rate", "NaN"], "--rate"),
        (&["--campaign", "c", "--limit", "0"], "--limit"),
        (&["--campaign", "c", "--queue-prefix", "bad prefix!"], "--queue-prefix"),
        (&["--campaign", "c", "--delivery-limit", "0"], "--delivery-limit"),
        (&["--campaign", "c", "--amqp-connect-timeout-secs", "0"], "--amqp-connect-timeout-secs"),
        (&["--campaign", "c", "--queue-prefix", &"p".repeat(65)], "--queue-prefix"),
        (&["--campaign", "c", "--ids-file"], "--ids-file"),
    ];
    for (extra, flag) in producer_cases {
        let out = expect_code(command("ferry-producer").args(enqueue).args(extra), 2)?;
        ensure!(stderr(&out).contains(flag), "{extra:?}: {}", stderr(&out));
    }
    for (args, flag) in [
        (vec!["seed", "--store", "sqlite:/nonexistent/x.db", "--actors", "0"], "--actors"),
        (vec!["seed", "--store", "sqlite:/nonexistent/x.db", "--actors", "5", "--large-share", "1.5"], "--large-share"),
        (vec!["seed", "--store", "sqlite:/nonexistent/x.db", "--actors", "5", "--max-mib", "0"], "--max-mib"),
        (vec!["dlq", "--store", "sqlite:/nonexistent/x.db", "--embedded", "list", "--limit", "0"], "--limit"),
        (vec!["definitions", "--queue-prefix", "a b"], "--queue-prefix"),
    ] {
        let out = expect_code(command("ferry-producer").args(&args), 2)?;
        ensure!(stderr(&out).contains(flag), "{args:?}: {}", stderr(&out));
    }
    Ok(())
}

#[test]
fn commands_that_did_nothing_exit_4_and_say_why() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let ts = rt.block_on(TestStore::new(Backend::Sqlite));
    let broker = rt.block_on(Broker::new("cli_nothing"))?;
    let amqp = broker.url.clone();
    let prefix = broker.topology.prefix.clone();
    let cases: [(Vec<&str>, &str); 5] = [
        (
            vec!["status", "--store", &ts.url, "--amqp", &amqp, "--queue-prefix", &prefix, "--campaign", "nope"],
            "no campaign named \"nope\"",
        ),
        (vec!["dlq", "--store", &ts.url, "--embedded", "show", "nobody"], "actor nobody has no dead letter"),
        (
            vec!["dlq", "--store", &ts.url, "--amqp", &amqp, "--queue-prefix", &prefix, "show", "nobody"],
            "actor nobody has no dead letter",
        ),
        (
            vec!["dlq", "--store", &ts.url, "--embedded", "requeue", "--json"],
            "no dead letter matched: nothing requeued",
        ),
        (vec!["verify", "--store", &ts.url, "--json"], "verify selected no migrated actor"),
    ];
    for (args, says) in cases {
        let out = expect_code(command("ferry-producer").args(&args), 4)?;
        ensure!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    // A campaign that exists (it has a record) is not "nothing", even with no outcome yet.
    Seed::new(3, "cli_known").run(&ts.url)?;
    enqueue(&ts.url, &broker.topology, "known", &[])?;
    let status = run_json(
        command("ferry-producer")
            .args(["status", "--store", &ts.url, "--amqp", &amqp, "--queue-prefix", &prefix])
            .args(["--campaign", "known", "--json"]),
    )?;
    ensure!(status["enqueued"] == 3, "{status}");
    rt.block_on(broker.delete())
}

/// Accepts TCP connections and never answers, like a port that is not RabbitMQ.
async fn silent_port() -> Result<(u16, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    Ok((port, task))
}

#[tokio::test]
async fn an_amqp_port_that_is_not_rabbitmq_fails_every_command_within_the_bound() -> Result<()> {
    bounded(Duration::from_secs(120), async {
        let ts = TestStore::new(Backend::Sqlite).await;
        let (silent, task) = silent_port().await?;
        // A port nothing listens on: bound, then released.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let timeout_secs = 2;
        for (port, kind) in [(silent, "no AMQP handshake within 2s"), (closed, "refused")] {
            let url = format!("amqp://ferry:{PASSWORD}@127.0.0.1:{port}/%2f");
            let shown = format!("amqp://ferry:***@127.0.0.1:{port}/%2f");
            let t = timeout_secs.to_string();
            let commands: [(&str, Vec<&str>); 4] = [
                // Its retry budget is what decides how long it keeps trying a broker that
                // is down; at 0 it gives up at the first failed connect.
                (
                    "ferry-producer",
                    vec!["enqueue", "--store", &ts.url, "--campaign", "c", "--amqp", &url, "--retry-budget-secs", "0"],
                ),
                ("ferry-producer", vec!["status", "--store", &ts.url, "--amqp", &url]),
                ("ferry-producer", vec!["dlq", "requeue", "--store", &ts.url, "--amqp", &url]),
                ("ferry-worker", vec!["run", "--store", &ts.url, "--amqp", &url, "--http", "off"]),
            ];
            for (name, args) in commands {
                let started = Instant::now();
                let out = tokio::task::spawn_blocking({
                    let mut cmd = command(name);
                    cmd.args(&args).args(["--amqp-connect-timeout-secs", &t]);
                    move || cmd.output()
                })
                .await??;
                let took = started.elapsed();
                let err = stderr(&out);
                ensure!(!out.status.success(), "{name} {args:?} succeeded: {err}");
                ensure!(took < Duration::from_secs(timeout_secs + 8), "{name} {args:?} took {took:?}");
                ensure!(err.contains(&shown), "{name} {args:?} does not name {shown}: {err}");
                ensure!(err.to_lowercase().contains(&kind.to_lowercase()), "{name} {args:?} is not {kind:?}: {err}");
                ensure!(!err.contains(PASSWORD), "{name} {args:?} prints the password: {err}");
                eprintln!("{name} {} on port {port}: exit {:?} in {took:?}", args[0], out.status.code());
            }
        }
        task.abort();
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_second_worker_on_the_same_http_port_names_the_address_and_the_flag() -> Result<()> {
    bounded(Duration::from_secs(60), async {
        let ts = TestStore::new(Backend::Sqlite).await;
        let broker = Broker::new("cli_http").await?;
        let logs = tempfile::tempdir()?;
        let mut first = WorkerSpec::new(&ts.url, &broker.topology, "http_first").http().start(logs.path())?;
        let addr = first.http_addr().await?;
        let mut cmd = command("ferry-worker");
        cmd.args(["run", "--store", &ts.url, "--amqp", &broker.url, "--queue-prefix", &broker.topology.prefix])
            .args(["--http", &addr.to_string()]);
        let mut second = Proc::spawn("http_second", cmd, logs.path())?;
        let status = second.wait_exit(Duration::from_secs(20)).await?;
        let log = second.log();
        ensure!(!status.success(), "the second worker ran: {log}");
        let expected = format!("HTTP listener on {addr} (--http / FERRY_HTTP_ADDR)");
        ensure!(log.contains(&expected) && log.contains("in use"), "{log}");
        second.settle();
        first.stop(Duration::from_secs(20)).await?;
        drop(first);
        broker.delete().await
    })
    .await
}

#[tokio::test]
async fn status_reports_the_real_rate_and_no_consumer_when_none_consumes() -> Result<()> {
    bounded(Duration::from_secs(120), async {
        let ts = TestStore::new(Backend::Sqlite).await;
        let broker = Broker::new("cli_status").await?;
        let logs = tempfile::tempdir()?;
        let n = 60u64;
        Seed::new(n, "cli_rate").run(&ts.url)?;
        enqueue(&ts.url, &broker.topology, "rate", &[])?;
        let status_cmd = |json: bool| {
            let mut cmd = command("ferry-producer");
            cmd.args(["status", "--store", &ts.url, "--amqp", &amqp_url(), "--queue-prefix", &broker.topology.prefix])
                .args(["--campaign", "rate"]);
            if json {
                cmd.arg("--json");
            }
            cmd
        };
        // Jobs wait and nothing consumes: no ETA, and it says why.
        let before = run_json(&mut status_cmd(true))?;
        ensure!(before["work"]["messages"] == n && before["work"]["consumers"] == 0, "{before}");
        ensure!(before["eta_seconds"].is_null() && before["eta_note"] == "no consumer", "{before}");
        let text = expect_code(&mut status_cmd(false), 0)?;
        let text = String::from_utf8_lossy(&text.stdout).into_owned();
        ensure!(text.contains("ETA unknown: no consumer"), "{text}");

        let mut worker = WorkerSpec::new(&ts.url, &broker.topology, "rate").concurrency(8).start(logs.path())?;
        let store = ts.store();
        wait_until(Duration::from_secs(60), "every job finished", || {
            let store = store.clone();
            async move { Ok(audit_count(&store).await? as u64 >= n) }
        })
        .await?;
        let after = run_json(&mut status_cmd(true))?;
        worker.stop(Duration::from_secs(20)).await?;
        let rate = after["rate_per_second"].as_f64().context("rate")?;
        let span = after["rate_span_seconds"].as_f64().context("span")?;
        // The span is the campaign's life so far, not a fixed 300 s, and the rate is the jobs
        // finished over it.
        ensure!(span > 0.0 && span < 100.0, "{after}");
        ensure!((rate * span - n as f64).abs() < 0.5, "rate {rate} over {span} s is not {n} jobs: {after}");
        ensure!(rate > 3.0 * n as f64 / 300.0, "{after}");
        ensure!(after["eta_seconds"] == 0.0 && after["eta_note"].is_null(), "drained: {after}");
        eprintln!("status after the campaign: {rate:.1} jobs/s over {span:.1} s");
        drop(worker);
        broker.delete().await
    })
    .await
}
