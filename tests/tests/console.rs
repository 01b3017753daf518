//! End to end: `ferry-producer console` in a real browser (Debian's headless chromium, driven
//! through chromedriver by fantoccini), against the real PostgreSQL, RabbitMQ and workers.
//!
//! - a campaign with hot-journal and WAL actors: the Campaigns page moves while a worker runs
//!   (0, then what the store holds while the worker is paused, then every job); the
//!   dead-letter chart's numbers are `dlq summary --json`'s; the list filters by reason,
//!   campaign and actor prefix and pages with cursors; the hot journals are requeued from the
//!   page with the `rollback_journal` it offers (a recovery that does not fit is refused
//!   without force), then show `migrated` with the recovery in their audit; verify runs from
//!   the page; an actor id and an error text holding markup are shown escaped and no script
//!   element exists; screenshots of the main pages go to `docs/console/`;
//! - the safety defaults: read-only shows no action and refuses a POST; a non-loopback bind
//!   needs a token, refuses requests without it (401), takes it as a bearer header or through
//!   the login form (an HttpOnly, SameSite=Strict cookie) and never logs it; a POST without the
//!   CSRF token is refused (403), with the form's token it works; an open console refuses a
//!   Host that is not this machine's;
//! - a sweep from the page confirms with a dry run's count and removes only the letter of an
//!   actor migrated since, its skip in the audit.
//!
//! Needs /usr/bin/chromium and /usr/bin/chromedriver (`apt-get install chromium
//! chromium-driver`, done by .ci/run) and fails, never skips, without them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fantoccini::{Client, ClientBuilder, Locator};
use ferry::jobs::DeadLetter;
use ferry::keys;
use ferry::migrate::{AuditRecord, OutcomeKind};
use ferry::store::{DynStore, KeyRange, Txn, for_each_row};
use ferry::synth::sqlite::{self as fixtures, DbFiles, DbSpec};
use ferry::testing::{Backend, TestStore, amqp_url};
use ferry::triage::index;
use ferry::{ActorId, DeadLetterReason, Recovery};
use ferry_tests::{Broker, Proc, WorkerSpec, bin, bounded, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const TOKEN: &str = "console-test-token-5b1f0c";
const SCRIPT: &str = "<script>alert(1)</script>";
const MARKUP_ID: &str = "<img src=x onerror=alert(2)>";

fn id(s: &str) -> ActorId {
    ActorId::parse(s).expect("valid test actor id")
}

fn msg<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// A command with no ferry settings inherited from the environment.
fn command(name: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    for (k, _) in std::env::vars() {
        if k.starts_with("FERRY_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// The browser

/// chromedriver on a free loopback port and a headless chromium session on it.
struct Browser {
    client: Client,
    _driver: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(logs: &Path) -> Result<Browser> {
        for path in [CHROMIUM, CHROMEDRIVER] {
            ensure!(
                Path::new(path).exists(),
                "{path} is missing: install Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; .ci/run does)"
            );
        }
        let port = free_port()?;
        let mut cmd = Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}")).arg("--allowed-ips=127.0.0.1");
        let mut driver = Proc::spawn("chromedriver", cmd, logs)?;
        wait_until(Duration::from_secs(20), "chromedriver listens", || async move {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok())
        })
        .await?;
        let profile = tempfile::tempdir()?;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,1100", "--hide-scrollbars", "--no-first-run",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .with_context(|| format!("starting a chromium session: {}", driver.log_tail()))?;
        driver.settle();
        Ok(Browser { client, _driver: driver, _profile: profile })
    }

    async fn goto(&self, url: &str) -> Result<()> {
        self.client.goto(url).await.with_context(|| format!("opening {url}"))
    }

    async fn texts(&self, css: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in self.client.find_all(Locator::Css(css)).await? {
            out.push(e.text().await?);
        }
        Ok(out)
    }

    async fn text(&self, css: &str) -> Result<String> {
        Ok(self.client.find(Locator::Css(css)).await.with_context(|| format!("no {css}"))?.text().await?)
    }

    async fn count(&self, css: &str) -> Result<usize> {
        Ok(self.client.find_all(Locator::Css(css)).await?.len())
    }

    /// Clicks a link or a submit button and waits for the page it loads: every click of these
    /// tests navigates, and reading before the old document is gone meets stale elements.
    async fn click(&self, css: &str) -> Result<()> {
        let old = self.client.find(Locator::Css("html")).await?;
        self.client.find(Locator::Css(css)).await.with_context(|| format!("no {css} to click"))?.click().await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while old.tag_name().await.is_ok() {
            anyhow::ensure!(std::time::Instant::now() < deadline, "clicking {css} loaded no new page");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.client.wait().for_element(Locator::Css("body")).await?;
        Ok(())
    }

    /// The campaign card's `data-done` and `data-planned`.
    async fn progress(&self, campaign: &str) -> Result<(u64, u64)> {
        let card = self.client.find(Locator::Css(&format!("div.campaign[data-campaign=\"{campaign}\"]"))).await?;
        let num = |v: Option<String>| v.and_then(|s| s.parse::<u64>().ok()).context("a number attribute");
        Ok((num(card.attr("data-done").await?)?, num(card.attr("data-planned").await?)?))
    }

    /// A screenshot for the README, into `docs/console/{name}.png`.
    async fn screenshot(&self, name: &str) -> Result<()> {
        let png = self.client.screenshot().await?;
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/console"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.png")), png)?;
        Ok(())
    }

    async fn close(self) -> Result<()> {
        self.client.close().await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The console and plain HTTP

/// `ferry-producer console` on `http` (a free port of it), reading `store`, with the broker
/// topology `prefix` (`None`: embedded).
fn console_command(http: &str, store: &str, prefix: Option<&str>, extra: &[&str]) -> Command {
    let mut cmd = command("ferry-producer");
    cmd.args(["console", "--http", http, "--store", store, "--refresh-secs", "0", "--page-size", "4"]);
    match prefix {
        Some(p) => cmd.args(["--amqp", &amqp_url(), "--queue-prefix", p]),
        None => cmd.arg("--embedded"),
    };
    cmd.args(extra);
    cmd
}

async fn start_console(name: &str, cmd: Command, logs: &Path) -> Result<(Proc, SocketAddr)> {
    let mut p = Proc::spawn(name, cmd, logs)?;
    let bound = p.http_addr().await?;
    // A console bound to every address is reached on loopback.
    let addr = if bound.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], bound.port())) } else { bound };
    Ok((p, addr))
}

/// One HTTP/1.1 request without a browser: the status code and the body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        req.push_str(&format!("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("an HTTP status line")?;
    Ok((status, text))
}

// ---------------------------------------------------------------------------------------------
// The store

async fn audits(store: &DynStore, campaign: &str) -> Result<BTreeMap<String, AuditRecord>> {
    let mut out = BTreeMap::new();
    for_each_row(&**store, &KeyRange::prefix(keys::AUDIT_PREFIX), 1024, |_, raw| {
        if let Some(a) = AuditRecord::decode(&raw)
            && a.campaign == campaign
        {
            out.insert(a.actor_id.to_string(), a);
        }
        Ok(())
    })
    .await?;
    Ok(out)
}

/// Writes `d` into the triage index as a worker would (record and index entries in one
/// transaction).
async fn plant_letter(store: &DynStore, d: &DeadLetter) -> Result<()> {
    let old = index::current(&**store, d).await?;
    let mut txn = Txn::new();
    index::put(&mut txn, old.as_deref(), d);
    store.commit(txn).await?;
    Ok(())
}

fn letter(actor: &str, campaign: &str, reason: DeadLetterReason, error: &str, n: i64) -> DeadLetter {
    DeadLetter {
        actor_id: actor.to_string(),
        campaign: campaign.to_string(),
        reason,
        phase: "validate".into(),
        error: error.to_string(),
        attempts: 1,
        worker: "planted".into(),
        at_ms: ferry::clock::Clock::now_ms(&ferry::clock::SystemClock) - 60_000 + n,
        v1_files: Some(ferry::v1::V1Files { main: Some(8192), journal: None, wal: None, shm: None }),
        recovery: None,
        message: format!("{{\"planted\":{n}}}"),
    }
}

async fn dead_count(store: &DynStore) -> Result<u64> {
    Ok(ferry::triage::summary(store).await?.dead_letters)
}

// ---------------------------------------------------------------------------------------------
// A campaign watched and triaged in the browser

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_is_watched_and_its_hot_journals_requeued_from_the_browser() -> Result<()> {
    bounded(Duration::from_secs(420), async {
        let logs = tempfile::tempdir()?;
        let broker = Broker::new("ferry_t_console").await?;
        let ts = TestStore::new(Backend::Postgres).await;
        let store = ts.store();
        let campaign = "console-c1";
        let committed = 20u32;
        let journal = fixtures::hot_journal(&DbSpec { rows: committed, payload: 100, page_size: 4096, seed: 71 }, 200)
            .map_err(msg)?;
        let wal = fixtures::wal(&DbSpec { rows: 10, payload: 100, page_size: 4096, seed: 72 }, 5).map_err(msg)?;
        let normal = 150;
        for i in 0..normal {
            let files =
                DbFiles { main: fixtures::database(&DbSpec::small(100 + i)).map_err(msg)?, ..DbFiles::default() };
            ferry::synth::write_v1(&*store, &id(&format!("n-{i:03}")), &files).await?;
        }
        let journal_actors: BTreeSet<String> = (0..6).map(|i| format!("j-{i}")).collect();
        for a in &journal_actors {
            ferry::synth::write_v1(&*store, &id(a), &journal).await?;
        }
        for i in 0..3 {
            ferry::synth::write_v1(&*store, &id(&format!("w-{i}")), &wal).await?;
        }
        let planned = normal + 6 + 3;
        let enqueued = ferry_tests::enqueue(&ts.url, &broker.topology, campaign, &[])?;
        assert_eq!(enqueued["published"], planned, "{enqueued}");

        let (mut console, addr) = start_console(
            "console",
            console_command("127.0.0.1:0", &ts.url, Some(&broker.topology.prefix), &[]),
            logs.path(),
        )
        .await?;
        let base = format!("http://{addr}");
        let browser = Browser::start(logs.path()).await?;

        // Before any worker: nothing done, the jobs waiting, no consumer.
        browser.goto(&format!("{base}/campaigns")).await?;
        assert_eq!(browser.progress(campaign).await?, (0, planned), "before the workers");
        let work_row = format!("tr[data-queue=\"{}\"] td", broker.topology.work_queue());
        assert_eq!(
            browser.texts(&work_row).await?[1..],
            [planned.to_string(), "0".into()],
            "work queue: jobs, no consumer"
        );
        assert!(browser.text("div.campaign .eta").await?.contains("no consumer"));

        // While a worker runs: paused part-way, the page shows what the store holds.
        let spec = WorkerSpec::new(&ts.url, &broker.topology, "console-w").concurrency(1);
        let mut worker = Proc::spawn("worker", spec.command(), logs.path())?;
        wait_until(Duration::from_secs(60), "the worker finishes some jobs", || async {
            Ok(audits(&store, campaign).await?.values().filter(|a| a.worker != "ferry-producer").count() >= 10)
        })
        .await
        .with_context(|| worker.log_tail())?;
        worker.pause()?;
        // A commit the worker sent just before the pause may still land.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let held = audits(&store, campaign).await?.len() as u64;
        browser.client.refresh().await?;
        let (done, _) = browser.progress(campaign).await?;
        eprintln!("paused part-way: {done} of {planned} jobs done");
        assert_eq!(done, held, "the page shows the store's audit records");
        assert!(done > 0 && done < planned, "part-way: {done} of {planned}");
        worker.resume()?;

        wait_until(Duration::from_secs(120), "the campaign to finish", || async {
            Ok(audits(&store, campaign).await?.len() as u64 == planned && broker.pending().await? == 0)
        })
        .await
        .with_context(|| worker.log_tail())?;
        browser.client.refresh().await?;
        assert_eq!(browser.progress(campaign).await?, (planned, planned), "after the workers");
        let outcome = |k: &str| format!("div.campaign table.outcomes tr[data-outcome=\"{k}\"] td.n");
        assert_eq!(browser.text(&outcome("migrated")).await?, normal.to_string());
        assert_eq!(browser.text(&outcome("dead_lettered")).await?, "9");
        let chart = browser.client.find(Locator::Css("div.campaign svg.throughput")).await?;
        assert_eq!(
            chart.attr("data-total").await?.as_deref(),
            Some(planned.to_string().as_str()),
            "every job is charted"
        );
        browser.screenshot("campaigns").await?;

        // Markup from data: an error text and a bad message's actor id.
        plant_letter(&store, &letter("xss-1", campaign, DeadLetterReason::IntegrityCheckFailed, SCRIPT, 1)).await?;
        let mut bad = letter(MARKUP_ID, "", DeadLetterReason::BadMessage, "job message does not parse", 2);
        bad.message = format!("{{\"actor_id\":\"{MARKUP_ID}\"}}");
        plant_letter(&store, &bad).await?;

        // The chart's numbers are `dlq summary`'s.
        let mut cli = command("ferry-producer");
        cli.args(["dlq", "summary", "--json", "--store", &ts.url]);
        let summary = ferry_tests::run_json(&mut cli)?;
        let expected: BTreeSet<(String, String, u64)> = summary["groups"]
            .as_array()
            .context("summary groups")?
            .iter()
            .map(|g| {
                (
                    g["reason"].as_str().unwrap_or("").into(),
                    g["campaign"].as_str().unwrap_or("").into(),
                    g["count"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        browser.goto(&format!("{base}/dead")).await?;
        let mut charted = BTreeSet::new();
        for bar in browser.client.find_all(Locator::Css("svg.chart.dead rect.bar")).await? {
            let reason = bar.attr("data-reason").await?.unwrap_or_default();
            let campaign = bar.attr("data-campaign").await?.unwrap_or_default();
            let count: u64 = bar.attr("data-count").await?.unwrap_or_default().parse()?;
            charted.insert((reason, campaign, count));
        }
        assert_eq!(charted, expected, "the chart against dlq summary --json: {summary}");
        assert_eq!(browser.text("#dead-total").await?, summary["dead_letters"].to_string());
        assert!(expected.contains(&("journal_sidecar".into(), campaign.into(), 6)), "{expected:?}");
        let counts: Vec<String> = browser.texts("svg.chart.dead text.count").await?;
        let mut shown: Vec<u64> = counts.iter().filter_map(|c| c.parse().ok()).collect();
        let mut wanted: Vec<u64> = expected.iter().map(|(_, _, n)| *n).collect();
        shown.sort();
        wanted.sort();
        assert_eq!(shown, wanted, "the numbers written on the bars");

        // Escaped, and no script element anywhere.
        let source = browser.client.source().await?;
        assert!(source.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "the error text is escaped");
        assert!(source.contains("&lt;img src=x onerror=alert(2)&gt;"), "the actor id is escaped");
        assert_eq!(browser.count("script").await?, 0, "no script element");
        assert_eq!(browser.count("main img").await?, 0, "no img element from data");
        assert!(browser.texts("td.error").await?.iter().any(|t| t == SCRIPT), "shown as text");
        browser.goto(&format!("{base}/dead/actor/xss-1")).await?;
        assert_eq!(browser.text("pre.error").await?, SCRIPT, "the actor page shows the text as text");
        assert_eq!(browser.count("script").await?, 0);
        browser.goto(&format!("{base}/dead/actor/w-0")).await?;
        // Times as UTC dates, no epoch milliseconds (the kept message, raw JSON, aside).
        let epoch_ms = regex::Regex::new(r"\b1[0-9]{12}\b")?;
        for block in ["dl.letter", "dl.audit"] {
            let text = browser.text(block).await?;
            assert!(text.contains("UTC") && !epoch_ms.is_match(&text), "{block}: {text}");
        }
        browser.screenshot("actor").await?;

        // Filtering through the form, then paging (4 a page).
        browser.goto(&format!("{base}/dead")).await?;
        browser.client.find(Locator::Css("select#reason")).await?.select_by_value("journal_sidecar").await?;
        browser.client.find(Locator::Css("input#campaign")).await?.send_keys(campaign).await?;
        browser.click("button#apply").await?;
        let mut seen = browser.texts("tr.letter a.actor").await?;
        assert_eq!(seen.len(), 4, "a page of 4: {seen:?}");
        browser.screenshot("dead-letters").await?;
        browser.click("a#next").await?;
        let second = browser.texts("tr.letter a.actor").await?;
        assert_eq!(second.len(), 2, "the rest: {second:?}");
        assert_eq!(browser.count("a#next").await?, 0, "the last page has no next");
        seen.extend(second);
        assert_eq!(
            seen.iter().cloned().collect::<BTreeSet<_>>(),
            journal_actors,
            "both pages: every journal actor once"
        );
        assert_eq!(seen.len(), 6);
        browser.goto(&format!("{base}/dead?prefix=w-")).await?;
        assert_eq!(browser.texts("tr.letter a.actor").await?, ["w-0", "w-1", "w-2"], "by actor prefix");
        browser.goto(&format!("{base}/dead?reason=journal_sidecar&campaign={campaign}&prefix=j-3")).await?;
        assert_eq!(browser.texts("tr.letter a.actor").await?, ["j-3"], "reason, campaign and prefix");

        // Requeue the hot journals from the page: the fitting recovery is offered.
        browser.goto(&format!("{base}/dead?reason=journal_sidecar&campaign={campaign}")).await?;
        browser.click("a#requeue").await?;
        let confirm_url = browser.client.current_url().await?;
        assert_eq!(browser.text("#count").await?, "6");
        let offered = browser.client.find(Locator::Css("select#recovery")).await?.prop("value").await?;
        assert_eq!(offered.as_deref(), Some("rollback_journal"), "the recovery that fits journal_sidecar");
        browser.screenshot("requeue").await?;
        // One that does not fit, without force: refused, nothing moves.
        browser.client.find(Locator::Css("select#recovery")).await?.select_by_value("checkpoint_wal").await?;
        browser.click("button#do").await?;
        assert!(browser.text("main").await?.contains("does not fit"), "a mismatch needs force");
        assert_eq!(
            ferry::triage::summary(&store)
                .await?
                .groups
                .iter()
                .filter(|g| g.reason == "journal_sidecar")
                .map(|g| g.count)
                .sum::<u64>(),
            6
        );
        browser.goto(confirm_url.as_str()).await?;
        browser.click("button#do").await?;
        assert!(browser.text("#result").await?.contains("Requeued 6 actors"), "{}", browser.text("main").await?);

        wait_until(Duration::from_secs(90), "the requeued hot journals to migrate", || async {
            let a = audits(&store, campaign).await?;
            Ok(journal_actors.iter().all(|j| a.get(j).is_some_and(|a| a.outcome == OutcomeKind::Migrated)))
        })
        .await
        .with_context(|| worker.log_tail())?;
        for j in &journal_actors {
            let a = &audits(&store, campaign).await?[j];
            assert_eq!(a.recovery, Some(Recovery::RollbackJournal), "{j}: the audit names the recovery");
            browser.goto(&format!("{base}/dead/actor/{j}")).await?;
            assert_eq!(browser.text("#outcome").await?, "migrated", "{j}");
            assert_eq!(browser.text("#recovery").await?, "rollback_journal", "{j}");
        }

        // Verify the campaign from its page.
        browser.goto(&format!("{base}/campaigns")).await?;
        browser.click("div.campaign a.button[href^=\"/actions/verify\"]").await?;
        browser.click("button#do").await?;
        let verified = browser.text("#result").await?;
        assert!(verified.contains(&format!("All {} actors verified", normal + 6)), "{verified}");

        assert!(!console.log().contains("guest:guest"), "no broker password in the console's log");
        assert!(!console.log().contains(" ERROR "), "the console logged an error: {}", console.log());
        browser.close().await?;
        worker.stop(Duration::from_secs(30)).await?;
        console.stop(Duration::from_secs(10)).await?;
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Safety defaults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_token_and_csrf_refuse_what_they_must() -> Result<()> {
    bounded(Duration::from_secs(240), async {
        let logs = tempfile::tempdir()?;
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        for i in 0..3 {
            plant_letter(&store, &letter(&format!("s-{i}"), "safe", DeadLetterReason::JournalSidecar, "planted", i))
                .await?;
        }
        let browser = Browser::start(logs.path()).await?;

        // Read-only: no action anywhere, and an action request is refused.
        let (mut ro, addr) =
            start_console("read-only", console_command("127.0.0.1:0", &ts.url, None, &["--read-only"]), logs.path())
                .await?;
        let base = format!("http://{addr}");
        for path in ["/campaigns", "/dead", "/dead/actor/s-0"] {
            browser.goto(&format!("{base}{path}")).await?;
            assert!(browser.count("tr.letter, #actor-id, div.card").await? > 0, "{path} shows something");
            assert_eq!(browser.count("form[method=post]").await?, 0, "{path}: no form that acts");
            assert_eq!(browser.count("a[href^=\"/actions/\"]").await?, 0, "{path}: no link to an action");
        }
        let (status, _) = http(addr, "POST", "/actions/purge", &[], "reason=journal_sidecar&csrf=whatever").await?;
        assert_eq!(status, 403, "read-only refuses an action");
        assert_eq!(http(addr, "GET", "/actions/purge?reason=journal_sidecar", &[], "").await?.0, 403);
        assert_eq!(dead_count(&store).await?, 3, "nothing purged");
        ro.stop(Duration::from_secs(10)).await?;

        // An open console (loopback, no token): a POST without the CSRF token is refused, and
        // a Host that is not this machine's is refused.
        let (mut open, addr) =
            start_console("open", console_command("127.0.0.1:0", &ts.url, None, &[]), logs.path()).await?;
        let (status, body) = http(addr, "POST", "/actions/purge", &[], "reason=journal_sidecar").await?;
        assert_eq!(status, 403, "a forged POST without the CSRF token: {body}");
        let csp = body.lines().find(|l| l.to_ascii_lowercase().starts_with("content-security-policy:"));
        assert!(csp.is_some_and(|l| l.contains("default-src 'none'") && !l.contains("script-src")), "{body}");
        assert!(body.contains("CSRF"), "{body}");
        let (status, _) = http(addr, "POST", "/actions/purge", &[], "reason=journal_sidecar&csrf=00ff").await?;
        assert_eq!(status, 403, "a wrong CSRF token");
        assert_eq!(dead_count(&store).await?, 3, "nothing purged");
        let (status, _) = http(addr, "GET", "/dead", &[("Host", "rebound.example:8080")], "").await?;
        assert_eq!(status, 421, "a DNS name that is not localhost");
        open.stop(Duration::from_secs(10)).await?;

        // Every address without a token: refused at start.
        let out = console_command("0.0.0.0:0", &ts.url, None, &[]).output()?;
        assert_eq!(out.status.code(), Some(2), "exit 2 without a token: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("FERRY_CONSOLE_TOKEN"));

        // With a token: nothing without it, the bearer header or the login's cookie with it.
        let mut cmd = console_command("0.0.0.0:0", &ts.url, None, &[]);
        cmd.env("FERRY_CONSOLE_TOKEN", TOKEN);
        let (mut guarded, addr) = start_console("guarded", cmd, logs.path()).await?;
        let base = format!("http://{addr}");
        assert_eq!(http(addr, "GET", "/dead", &[], "").await?.0, 401, "no token");
        assert_eq!(http(addr, "GET", "/dead/actor/s-0", &[("Authorization", "Bearer wrong")], "").await?.0, 401);
        let bearer = format!("Bearer {TOKEN}");
        let (status, page) = http(addr, "GET", "/dead", &[("Authorization", &bearer)], "").await?;
        assert_eq!(status, 200, "{page}");
        assert!(page.contains("s-0"));
        let (status, _) =
            http(addr, "POST", "/actions/purge", &[("Authorization", &bearer)], "reason=journal_sidecar").await?;
        assert_eq!(status, 403, "the token is not a CSRF token");
        assert_eq!(http(addr, "POST", "/actions/purge", &[], "reason=journal_sidecar").await?.0, 401);
        assert_eq!(dead_count(&store).await?, 3, "nothing purged");

        browser.goto(&format!("{base}/dead")).await?;
        assert_eq!(browser.count("tr.letter").await?, 0, "the login page, not the letters");
        browser.client.find(Locator::Css("input#token")).await?.send_keys("not-the-token").await?;
        browser.click("button#login").await?;
        assert!(browser.text("main").await?.contains("wrong access token"));
        browser.screenshot("login").await?;
        browser.client.find(Locator::Css("input#token")).await?.send_keys(TOKEN).await?;
        browser.click("button#login").await?;
        browser.goto(&format!("{base}/dead")).await?;
        assert_eq!(browser.count("tr.letter").await?, 3, "logged in");
        let cookie = browser.client.get_named_cookie("ferry_console").await?;
        assert_eq!(cookie.http_only(), Some(true), "{cookie:?}");
        assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)", "{cookie:?}");
        assert!(!cookie.value().contains(TOKEN), "the cookie is not the token");

        // The form's CSRF token makes the same purge work, from the page.
        browser.click("a#purge").await?;
        browser.click("button#do").await?;
        assert!(browser.text("#result").await?.contains("Purged 3"), "{}", browser.text("main").await?);
        assert_eq!(dead_count(&store).await?, 0);
        let audit =
            store.get(&keys::audit(&id("s-1"))).await?.and_then(|r| AuditRecord::decode(&r)).context("audit")?;
        assert!(audit.purged_at_ms.is_some(), "the purge is in the audit, as the CLI records it");

        guarded.stop(Duration::from_secs(10)).await?;
        for p in [&ro, &open, &guarded] {
            if p.log().contains(TOKEN) {
                bail!("{} logged the token", p.name);
            }
        }
        browser.close().await?;
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Sweep

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_from_the_page_removes_only_the_letter_of_an_actor_migrated_since() -> Result<()> {
    bounded(Duration::from_secs(240), async {
        let logs = tempfile::tempdir()?;
        let ts = TestStore::new(Backend::Sqlite).await;
        let store = ts.store();
        for i in 0..3 {
            plant_letter(&store, &letter(&format!("sw-{i}"), "sweep", DeadLetterReason::JournalSidecar, "planted", i))
                .await?;
        }
        // rivet's own migration finished sw-1 after ferry gave up on it.
        let head =
            ferry::v2::DBHead { origin: ferry::v2::Origin::MigratedFromV1, ..ferry::v2::DBHead::staging(4, 2, 1) };
        let mut txn = Txn::new();
        txn.set(ferry::v2::keys::meta(&id("sw-1")), head.encode());
        store.commit(txn).await?;
        let browser = Browser::start(logs.path()).await?;
        let (mut console, addr) =
            start_console("sweep", console_command("127.0.0.1:0", &ts.url, None, &[]), logs.path()).await?;

        browser.goto(&format!("http://{addr}/dead")).await?;
        browser.click("a#sweep").await?;
        assert_eq!(browser.text("#count").await?, "1", "{}", browser.text("main").await?);
        assert_eq!(dead_count(&store).await?, 3, "the confirmation is a dry run");
        browser.click("button#do").await?;
        let result = browser.text("#result").await?;
        assert!(result.contains("Removed 1 of 3"), "{result}");
        assert_eq!(dead_count(&store).await?, 2);
        assert!(store.get(&keys::dead(&id("sw-1"))).await?.is_none(), "sw-1's letter is gone");
        let audit = store
            .get(&keys::audit(&id("sw-1")))
            .await?
            .and_then(|r| AuditRecord::decode(&r))
            .context("sw-1's audit")?;
        assert_eq!((audit.outcome, audit.generation), (OutcomeKind::SkippedAlreadyMigrated, Some(head.generation)));

        console.stop(Duration::from_secs(10)).await?;
        browser.close().await?;
        Ok(())
    })
    .await
}
