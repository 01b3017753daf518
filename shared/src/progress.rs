//! Progress reporting: an indicatif bar when stderr is a terminal, a log line every few
//! seconds otherwise (containers, CI).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const LOG_EVERY: Duration = Duration::from_secs(5);

/// A counter shown as a bar or as periodic log lines.
#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
    done: Arc<AtomicU64>,
    last_log: Arc<std::sync::Mutex<Instant>>,
    started: Instant,
    total: Option<u64>,
}

impl Progress {
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::new_spinner(),
            };
            let template = match total {
                Some(_) => "{spinner} {msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
                None => "{spinner} {msg} [{elapsed_precise}] {pos} ({per_sec})",
            };
            // The templates above are fixed strings that indicatif accepts.
            bar.set_style(ProgressStyle::with_template(template).expect("valid progress template"));
            bar.set_message(what);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            what,
            done: Arc::new(AtomicU64::new(0)),
            last_log: Arc::new(std::sync::Mutex::new(Instant::now())),
            started: Instant::now(),
            total,
        }
    }

    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.inc(n);
            return;
        }
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= LOG_EVERY {
            *last = Instant::now();
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            match self.total {
                Some(total) => {
                    tracing::info!(done, total, rate = format!("{rate:.0}/s"), "{}", self.what)
                }
                None => tracing::info!(done, rate = format!("{rate:.0}/s"), "{}", self.what),
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
