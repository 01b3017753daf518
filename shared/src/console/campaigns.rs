//! What the Campaigns page shows: every campaign's progress, outcome counts, rate, ETA and
//! throughput, and the queues, from the same records and code as `ferry-producer status`.
//!
//! - progress is jobs finished (audit records a worker wrote) over jobs published (the
//!   campaign record's `published`, which `enqueue` advances with its confirms);
//! - outcome counts, the rate and the ETA are `queue::status`'s: [`Counts::add`] over the audit
//!   records, [`status::rate`] over its window, [`status::eta`] of the jobs left; the queues are
//!   [`status::queue_depths`];
//! - the throughput chart buckets the audit records' `finished_at_ms` (workers' only, as the
//!   rate): an audit record is an actor's last outcome, so an actor requeued and migrated
//!   later counts once, at its last finish.
//!
//! Cost: one scan of the campaign records and one of the audit records for every campaign at
//! once (what `status` reads for one), so the console caches an [`Overview`] for its refresh
//! interval however many people watch.

use std::collections::BTreeMap;

use crate::campaign::CampaignRecord;
use crate::keys;
use crate::migrate::AuditRecord;
use crate::queue::Topology;
use crate::queue::status::{self, Counts, Depths, Eta, Rate, StatusError};
use crate::store::{KeyRange, Store, StoreError, for_each_row};

/// Bars of a throughput chart.
pub const CHART_BUCKETS: usize = 60;

/// Where the console reads queue depths.
#[derive(Clone, Debug)]
pub struct BrokerView {
    pub amqp_url: String,
    pub topology: Topology,
    pub connect_timeout: std::time::Duration,
}

/// One campaign as the page shows it.
#[derive(Clone, Debug)]
pub struct CampaignView {
    pub name: String,
    pub record: Option<CampaignRecord>,
    pub counts: Counts,
    /// Jobs finished: audit records of this campaign written by a worker.
    pub done: u64,
    /// Jobs published, when the campaign has a record (`enqueue` writes it).
    pub planned: Option<u64>,
    pub rate: Rate,
    /// `None` without a broker (no queue to count consumers on).
    pub eta: Option<Eta>,
    pub chart: Chart,
}

impl CampaignView {
    /// Jobs published and not finished yet.
    pub fn left(&self) -> Option<u64> {
        self.planned.map(|p| p.saturating_sub(self.done))
    }
}

/// A throughput chart's data: `buckets[i]` jobs finished in
/// `[start_ms + i·bucket_ms, start_ms + (i+1)·bucket_ms)`.
#[derive(Clone, Debug, Default)]
pub struct Chart {
    pub start_ms: i64,
    pub bucket_ms: i64,
    pub buckets: Vec<u64>,
}

/// Everything the Campaigns page shows, read at `now_ms`.
#[derive(Clone, Debug)]
pub struct Overview {
    pub now_ms: i64,
    pub campaigns: Vec<CampaignView>,
    /// Every campaign together, as `status` without `--campaign` counts them.
    pub all: Counts,
    pub all_rate: Rate,
    /// The queues; `None` without a broker, the error's text when reading them failed.
    pub depths: Option<Result<Depths, String>>,
    pub all_eta: Option<Eta>,
}

/// What one scan of the audit records gathers for one campaign.
#[derive(Default)]
struct Tally {
    counts: Counts,
    done: u64,
    /// Jobs finished per second (seconds since the epoch) within the chart window.
    per_second: BTreeMap<i64, u64>,
}

/// Reads the campaigns, the audit records and (with a broker) the queues.
pub async fn overview(
    store: &dyn Store,
    broker: Option<&BrokerView>,
    chart_window_ms: i64,
    now_ms: i64,
) -> Result<Overview, StoreError> {
    let mut records = BTreeMap::new();
    for_each_row(store, &KeyRange::prefix(keys::CAMPAIGN_PREFIX), 1000, |_, raw| {
        if let Ok(r) = serde_json::from_slice::<CampaignRecord>(&raw) {
            records.insert(r.name.clone(), r);
        }
        Ok(())
    })
    .await?;
    let window_start = now_ms - chart_window_ms;
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let mut all = Counts::default();
    for_each_row(store, &KeyRange::prefix(keys::AUDIT_PREFIX), 2048, |_, raw| {
        let Some(a) = AuditRecord::decode(&raw) else { return Ok(()) };
        all.add(&a, now_ms);
        let t = tallies.entry(a.campaign.clone()).or_default();
        t.counts.add(&a, now_ms);
        if status::is_job(&a) {
            t.done += 1;
            if a.finished_at_ms > window_start && a.finished_at_ms <= now_ms {
                *t.per_second.entry(a.finished_at_ms.div_euclid(1000)).or_default() += 1;
            }
        }
        Ok(())
    })
    .await?;
    let depths = match broker {
        None => None,
        Some(b) => Some(
            status::queue_depths(&b.amqp_url, b.connect_timeout, &b.topology, "ferry-producer console")
                .await
                .map_err(|e: StatusError| e.to_string()),
        ),
    };
    let consumers = match &depths {
        Some(Ok(d)) => Some(d.work.consumers),
        _ => None,
    };
    let mut names: Vec<String> = records.keys().chain(tallies.keys()).cloned().collect();
    names.sort();
    names.dedup();
    let mut campaigns: Vec<CampaignView> = names
        .into_iter()
        .map(|name| {
            let record = records.remove(&name);
            let t = tallies.remove(&name).unwrap_or_default();
            let created = record.as_ref().map(|r| r.created_at_ms);
            let rate = status::rate(t.counts.recent, t.counts.first_recent_ms, created, now_ms, status::RATE_WINDOW_MS);
            let planned = record.as_ref().map(|r| r.published);
            let left = planned.map(|p| p.saturating_sub(t.done));
            let eta = consumers.map(|c| status::eta(rate.per_second, left.unwrap_or(0), c));
            let first_finish = t.per_second.keys().next().map(|s| s * 1000);
            let chart = chart(&t.per_second, created.or(first_finish), window_start, now_ms);
            CampaignView { name, record, counts: t.counts, done: t.done, planned, rate, eta, chart }
        })
        .collect();
    // Newest first: the campaign being watched is usually the last one started.
    campaigns.sort_by_key(|c| std::cmp::Reverse(c.record.as_ref().map_or(i64::MIN, |r| r.created_at_ms)));
    let all_rate = status::rate(all.recent, all.first_recent_ms, None, now_ms, status::RATE_WINDOW_MS);
    let all_eta = match &depths {
        Some(Ok(d)) => Some(status::eta(all_rate.per_second, d.waiting(), d.work.consumers)),
        _ => None,
    };
    Ok(Overview { now_ms, campaigns, all, all_rate, depths, all_eta })
}

/// [`CHART_BUCKETS`] buckets ending now and starting at the campaign's start (its creation or
/// first finish) or the window's, whichever is later, each at least a second.
fn chart(per_second: &BTreeMap<i64, u64>, started_ms: Option<i64>, window_start: i64, now_ms: i64) -> Chart {
    let start = started_ms.map_or(window_start, |s| s.max(window_start));
    let span = (now_ms - start).max(1000);
    let n = CHART_BUCKETS as i64;
    let bucket_ms = (span + n - 1) / n;
    // Whole seconds: the finish times are counted per second.
    let bucket_ms = ((bucket_ms + 999) / 1000).max(1) * 1000;
    let start_ms = now_ms - bucket_ms * n;
    let mut buckets = vec![0u64; CHART_BUCKETS];
    for (&sec, &count) in per_second {
        let at = sec * 1000;
        if at < start_ms {
            continue;
        }
        let i = ((at - start_ms) / bucket_ms).min(n - 1) as usize;
        buckets[i] += count;
    }
    Chart { start_ms, bucket_ms, buckets }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn a_young_campaign_is_charted_over_its_life_and_every_finish_lands_in_a_bucket() {
        let mut per_second = BTreeMap::new();
        per_second.insert(NOW / 1000 - 100, 3);
        per_second.insert(NOW / 1000 - 1, 2);
        per_second.insert(NOW / 1000, 1);
        let c = chart(&per_second, Some(NOW - 120_000), NOW - 6 * 3_600_000, NOW);
        assert_eq!(c.buckets.len(), CHART_BUCKETS);
        assert_eq!(c.bucket_ms, 2000, "120 s over 60 bars");
        assert_eq!(c.buckets.iter().sum::<u64>(), 6, "{c:?}");
        assert_eq!(c.start_ms + c.bucket_ms * CHART_BUCKETS as i64, NOW);
    }

    #[test]
    fn an_old_campaign_is_charted_over_the_window_only() {
        let mut per_second = BTreeMap::new();
        per_second.insert(NOW / 1000 - 3600, 5);
        let c = chart(&per_second, Some(NOW - 30 * 86_400_000), NOW - 6 * 3_600_000, NOW);
        assert_eq!(c.bucket_ms, 360_000, "6 h over 60 bars");
        assert_eq!(c.buckets.iter().sum::<u64>(), 5);
    }
}
