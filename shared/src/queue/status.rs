//! `ferry-producer status`: queue depths and consumers from the broker, outcome counts from
//! the audit records, the recent rate and an ETA.
//!
//! The rate is jobs finished over the time they were finishing: the span from the first audit
//! finished in the window (or the campaign's creation, when that came first and within the
//! window) to now, never a fixed divisor, so a campaign 20 s old reports its real jobs/s. An
//! ETA is given only when there is a rate and a consumer; [`rate`] and [`eta`] are pure
//! functions of their inputs (time included) so they are tested with controlled time.

use std::collections::BTreeMap;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::clock::{Clock, SystemClock};
use crate::keys;
use crate::migrate::AuditRecord;
use crate::store::{KeyRange, Store, StoreError, for_each_row};

use super::amqp::{self, AmqpError};
use super::topology::Topology;

/// The window the rate is measured over.
pub const RATE_WINDOW_MS: i64 = 5 * 60 * 1000;
/// The shortest span a rate is divided by: one job finished a moment ago is not a rate of
/// thousands per second.
pub const MIN_RATE_SPAN_MS: i64 = 1000;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct QueueDepth {
    pub name: String,
    pub messages: u32,
    pub consumers: u32,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Status {
    pub campaign: Option<String>,
    pub work: QueueDepth,
    pub retry: Vec<QueueDepth>,
    pub dead: QueueDepth,
    pub outcomes: BTreeMap<String, u64>,
    pub dead_letters: BTreeMap<String, u64>,
    /// Jobs finished per second over [`Status::rate_span_seconds`].
    pub rate_per_second: f64,
    /// The span the rate was measured over (at most the five-minute window).
    pub rate_span_seconds: f64,
    /// Seconds until the work and retry queues drain at that rate.
    pub eta_seconds: Option<f64>,
    /// Why there is no ETA: `no consumer`, `no rate yet`, or none.
    pub eta_note: Option<&'static str>,
    pub enqueued: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// lapin's errors display their cause and expose it as source: kept as text only.
    #[error("broker: {0}")]
    Broker(lapin::Error),
    /// Neither a campaign record nor any audit record has this name.
    #[error("no campaign named {0:?} in this store")]
    UnknownCampaign(String),
}

impl From<lapin::Error> for StatusError {
    fn from(e: lapin::Error) -> Self {
        StatusError::Broker(e)
    }
}

/// Outcome counts of a campaign's audit records (and dead letters by reason), with the
/// finish times that fall within the rate window.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub outcomes: BTreeMap<String, u64>,
    pub dead_letters: BTreeMap<String, u64>,
    /// How many finished in (now - window, now].
    pub recent: u64,
    /// The earliest of those.
    pub first_recent_ms: Option<i64>,
}

/// Counts a campaign's (or every campaign's) audit records.
pub async fn outcome_counts(store: &dyn Store, campaign: Option<&str>, now_ms: i64) -> Result<Counts, StoreError> {
    let mut c = Counts::default();
    for_each_row(store, &KeyRange::prefix(keys::AUDIT_PREFIX), 2048, |_, raw| {
        let Some(a) = AuditRecord::decode(&raw) else { return Ok(()) };
        if campaign.is_some_and(|name| name != a.campaign) {
            return Ok(());
        }
        c.add(&a, now_ms);
        Ok(())
    })
    .await?;
    Ok(c)
}

impl Counts {
    /// Counts one audit record read at `now_ms` (what [`outcome_counts`] does for each record of
    /// its campaign; the console counts every campaign in one scan with it).
    pub fn add(&mut self, a: &AuditRecord, now_ms: i64) {
        *self.outcomes.entry(a.outcome.as_str().to_string()).or_default() += 1;
        if let Some(r) = a.reason {
            *self.dead_letters.entry(r.as_str().to_string()).or_default() += 1;
        }
        // The rate is the workers': the producer's skips at enqueue are not jobs finishing.
        if is_job(a) && in_window(a.finished_at_ms, now_ms, RATE_WINDOW_MS) {
            self.recent += 1;
            self.first_recent_ms = Some(self.first_recent_ms.map_or(a.finished_at_ms, |f| f.min(a.finished_at_ms)));
        }
    }
}

/// Whether an audit record is a job a worker finished (not a skip the producer recorded at
/// enqueue, which no job stands for).
pub fn is_job(a: &AuditRecord) -> bool {
    a.worker != crate::queue::enqueue::PRODUCER_WORKER
}

fn in_window(at_ms: i64, now_ms: i64, window_ms: i64) -> bool {
    at_ms > now_ms - window_ms && at_ms <= now_ms
}

/// A rate and the span it was measured over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub span_seconds: f64,
}

/// Jobs per second: `recent` jobs finished in the window, the first at `first_recent_ms`,
/// divided by the span from that first finish (or from `campaign_created_ms`, when the
/// campaign was created within the window before it) to `now_ms`, at least
/// [`MIN_RATE_SPAN_MS`].
pub fn rate(
    recent: u64,
    first_recent_ms: Option<i64>,
    campaign_created_ms: Option<i64>,
    now_ms: i64,
    window_ms: i64,
) -> Rate {
    let Some(first) = first_recent_ms.filter(|_| recent > 0) else {
        return Rate { per_second: 0.0, span_seconds: 0.0 };
    };
    let window_start = now_ms - window_ms;
    let start = match campaign_created_ms {
        Some(created) if created > window_start && created < first => created,
        _ => first.max(window_start),
    };
    let span_ms = (now_ms - start).max(MIN_RATE_SPAN_MS);
    let span_seconds = span_ms as f64 / 1000.0;
    Rate { per_second: recent as f64 / span_seconds, span_seconds }
}

/// What can be said about the time left.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Eta {
    /// Seconds until the waiting jobs are done at the rate.
    Seconds(f64),
    /// Nothing waits.
    Drained,
    /// Jobs wait and nothing consumes the work queue: they will not move.
    NoConsumer,
    /// Jobs wait, a consumer is there, but nothing finished in the window yet.
    NoRate,
}

impl Eta {
    pub fn note(self) -> Option<&'static str> {
        match self {
            Eta::Seconds(_) | Eta::Drained => None,
            Eta::NoConsumer => Some("no consumer"),
            Eta::NoRate => Some("no rate yet"),
        }
    }
}

/// The ETA of `waiting` jobs (work and retry queues) at `rate` jobs/s, with `work_consumers`
/// consumers on the work queue (retry queues have none by design: they expire into it).
pub fn eta(rate: f64, waiting: u64, work_consumers: u32) -> Eta {
    if waiting == 0 {
        Eta::Drained
    } else if work_consumers == 0 {
        Eta::NoConsumer
    } else if rate > 0.0 {
        Eta::Seconds(waiting as f64 / rate)
    } else {
        Eta::NoRate
    }
}

async fn depth(ch: &lapin::Channel, name: String) -> Result<QueueDepth, lapin::Error> {
    let opts = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let q = ch.queue_declare(name.as_str().into(), opts, FieldTable::default()).await?;
    Ok(QueueDepth { name, messages: q.message_count(), consumers: q.consumer_count() })
}

/// The depths and consumers of the work, retry and dead-letter queues.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Depths {
    pub work: QueueDepth,
    pub retry: Vec<QueueDepth>,
    pub dead: QueueDepth,
}

impl Depths {
    /// Jobs waiting: ready in the work queue and in every retry queue.
    pub fn waiting(&self) -> u64 {
        u64::from(self.work.messages) + self.retry.iter().map(|q| u64::from(q.messages)).sum::<u64>()
    }
}

/// Reads [`Depths`] with passive declares on one connection named `client` (they change
/// nothing on the broker).
pub async fn queue_depths(
    amqp_url: &str,
    connect_timeout: std::time::Duration,
    topology: &Topology,
    client: &str,
) -> Result<Depths, StatusError> {
    let conn = amqp::connect_within(amqp_url, client, connect_timeout).await?;
    let read = async {
        let ch = conn.create_channel().await?;
        let work = depth(&ch, topology.work_queue()).await?;
        let mut retry = Vec::new();
        for q in topology.retry_queues() {
            retry.push(depth(&ch, q).await?);
        }
        let dead = depth(&ch, topology.dead_queue()).await?;
        ch.close(200, "done".into()).await?;
        Ok::<_, lapin::Error>(Depths { work, retry, dead })
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    Ok(read?)
}

/// Gathers the status of a campaign (or of every campaign in the store). A campaign with
/// neither a campaign record nor an audit record is [`StatusError::UnknownCampaign`].
pub async fn status(
    store: &dyn Store,
    amqp_url: &str,
    connect_timeout: std::time::Duration,
    topology: &Topology,
    campaign: Option<&str>,
) -> Result<Status, StatusError> {
    let record = match campaign {
        Some(c) => crate::campaign::load(store, c).await?,
        None => None,
    };
    let now = SystemClock.now_ms();
    let counts = outcome_counts(store, campaign, now).await?;
    if let Some(c) = campaign
        && record.is_none()
        && counts.outcomes.is_empty()
    {
        return Err(StatusError::UnknownCampaign(c.to_string()));
    }
    let Depths { work, retry, dead } =
        queue_depths(amqp_url, connect_timeout, topology, "ferry-producer status").await?;
    let rate =
        rate(counts.recent, counts.first_recent_ms, record.as_ref().map(|r| r.created_at_ms), now, RATE_WINDOW_MS);
    let waiting = u64::from(work.messages) + retry.iter().map(|q| u64::from(q.messages)).sum::<u64>();
    let eta = eta(rate.per_second, waiting, work.consumers);
    Ok(Status {
        campaign: campaign.map(str::to_string),
        work,
        retry,
        dead,
        outcomes: counts.outcomes,
        dead_letters: counts.dead_letters,
        rate_per_second: rate.per_second,
        rate_span_seconds: rate.span_seconds,
        eta_seconds: match eta {
            Eta::Seconds(s) => Some(s),
            Eta::Drained => Some(0.0),
            Eta::NoConsumer | Eta::NoRate => None,
        },
        eta_note: eta.note(),
        enqueued: record.map(|r| r.published),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn a_campaign_twenty_seconds_old_reports_its_real_rate() {
        // 3,800 jobs in the 20 s since the campaign was created: 190/s, not 3,800 / 300.
        let r = rate(3800, Some(NOW - 19_500), Some(NOW - 20_000), NOW, RATE_WINDOW_MS);
        assert_eq!(r.span_seconds, 20.0);
        assert!((r.per_second - 190.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn without_a_campaign_record_the_span_starts_at_the_first_finish_in_the_window() {
        let r = rate(100, Some(NOW - 10_000), None, NOW, RATE_WINDOW_MS);
        assert_eq!(r, Rate { per_second: 10.0, span_seconds: 10.0 });
        // An old campaign whose workers started 10 s ago: the same.
        let r = rate(100, Some(NOW - 10_000), Some(NOW - 3_600_000), NOW, RATE_WINDOW_MS);
        assert_eq!(r, Rate { per_second: 10.0, span_seconds: 10.0 });
    }

    #[test]
    fn a_steady_campaign_is_measured_over_the_whole_window_at_most() {
        let r = rate(3000, Some(NOW - RATE_WINDOW_MS + 1), Some(NOW - 3_600_000), NOW, RATE_WINDOW_MS);
        assert!((r.span_seconds - 300.0).abs() < 0.01 && (r.per_second - 10.0).abs() < 0.01, "{r:?}");
    }

    #[test]
    fn one_job_just_finished_is_divided_by_at_least_a_second() {
        let r = rate(1, Some(NOW - 5), None, NOW, RATE_WINDOW_MS);
        assert_eq!(r, Rate { per_second: 1.0, span_seconds: 1.0 });
    }

    #[test]
    fn nothing_finished_is_no_rate() {
        assert_eq!(rate(0, None, Some(NOW - 1000), NOW, RATE_WINDOW_MS).per_second, 0.0);
    }

    #[test]
    fn the_window_excludes_what_finished_before_it() {
        assert!(in_window(NOW - RATE_WINDOW_MS + 1, NOW, RATE_WINDOW_MS));
        assert!(!in_window(NOW - RATE_WINDOW_MS, NOW, RATE_WINDOW_MS));
        assert!(!in_window(NOW + 1, NOW, RATE_WINDOW_MS));
    }

    #[test]
    fn eta_only_with_a_rate_and_a_consumer() {
        assert_eq!(eta(10.0, 100, 2), Eta::Seconds(10.0));
        assert_eq!(eta(10.0, 100, 0), Eta::NoConsumer);
        assert_eq!(eta(0.0, 100, 0), Eta::NoConsumer);
        assert_eq!(eta(0.0, 100, 1), Eta::NoRate);
        assert_eq!(eta(0.0, 0, 0), Eta::Drained);
        assert_eq!(Eta::NoConsumer.note(), Some("no consumer"));
    }
}
