//! `ferry-producer status`: queue depths and consumers from the broker, outcome counts from
//! the audit records, the recent rate and an ETA.

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
    /// Jobs finished per second over the last five minutes.
    pub rate_per_second: f64,
    /// Seconds until the work and retry queues drain at that rate.
    pub eta_seconds: Option<f64>,
    pub enqueued: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
}

/// Outcome counts (and dead letters by reason) of a campaign's audit records, with how many
/// finished within the rate window.
pub async fn outcome_counts(
    store: &dyn Store,
    campaign: Option<&str>,
    now_ms: i64,
) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>, u64), StoreError> {
    let (mut outcomes, mut dead, mut recent) = (BTreeMap::new(), BTreeMap::new(), 0);
    for_each_row(store, &KeyRange::prefix(keys::AUDIT_PREFIX), 2048, |_, raw| {
        let Some(a) = AuditRecord::decode(&raw) else { return Ok(()) };
        if campaign.is_some_and(|c| c != a.campaign) {
            return Ok(());
        }
        *outcomes.entry(a.outcome.as_str().to_string()).or_default() += 1;
        if let Some(r) = a.reason {
            *dead.entry(r.as_str().to_string()).or_default() += 1;
        }
        if now_ms - a.finished_at_ms <= RATE_WINDOW_MS {
            recent += 1;
        }
        Ok(())
    })
    .await?;
    Ok((outcomes, dead, recent))
}

async fn depth(ch: &lapin::Channel, name: String) -> Result<QueueDepth, lapin::Error> {
    let opts = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let q = ch.queue_declare(name.as_str().into(), opts, FieldTable::default()).await?;
    Ok(QueueDepth { name, messages: q.message_count(), consumers: q.consumer_count() })
}

/// Gathers the status of a campaign (or of every campaign in the store).
pub async fn status(
    store: &dyn Store,
    amqp_url: &str,
    topology: &Topology,
    campaign: Option<&str>,
) -> Result<Status, StatusError> {
    let conn = amqp::connect(amqp_url, "ferry-producer status").await?;
    let ch = conn.create_channel().await?;
    let work = depth(&ch, topology.work_queue()).await?;
    let mut retry = Vec::new();
    for q in topology.retry_queues() {
        retry.push(depth(&ch, q).await?);
    }
    let dead = depth(&ch, topology.dead_queue()).await?;
    let _ = conn.close(200, "done".into()).await;
    let now = SystemClock.now_ms();
    let (outcomes, dead_letters, recent) = outcome_counts(store, campaign, now).await?;
    let rate = recent as f64 / (RATE_WINDOW_MS as f64 / 1000.0);
    let waiting = f64::from(work.messages) + retry.iter().map(|q| f64::from(q.messages)).sum::<f64>();
    let enqueued = match campaign {
        Some(c) => crate::campaign::load(store, c).await?.map(|r| r.published),
        None => None,
    };
    Ok(Status {
        campaign: campaign.map(str::to_string),
        work,
        retry,
        dead,
        outcomes,
        dead_letters,
        rate_per_second: rate,
        eta_seconds: (rate > 0.0).then(|| waiting / rate),
        enqueued,
    })
}
