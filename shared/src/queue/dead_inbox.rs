//! The dead-letter inbox: every `ferry-worker run` also consumes `{p}.dead` (on its own
//! channel, prefetch [`PREFETCH`]) and brings what the broker dead-lettered by itself into the
//! store's triage index (`triage::index`).
//!
//! Two kinds of message reach `{p}.dead`:
//! - ferry's own dead letters, marked [`amqp::INDEXED_HEADER`]: a worker wrote them to the
//!   index in the audit transaction before publishing them, so the inbox acks them and does
//!   nothing else (admitting one again could bring back a letter an operator already requeued
//!   or purged);
//! - everything else: a job the work queue dead-lettered at its delivery limit, or a dead
//!   letter published before workers marked theirs. The inbox admits it
//!   ([`index::admit`]: written unless its record already holds a letter or its actor is
//!   migrated or native already) and then acks it.
//!
//! Invariant: a message leaves the inbox only once its dead letter is in the index (admitted
//! now, already there, or ferry's own), and it is never handed back (no reject, no nack): every
//! return raises a quorum queue's delivery count, and at the queue's delivery limit the broker
//! drops the message (RabbitMQ 4.x defaults to 20). A store failure is retried in-process
//! until the store answers or the worker stops; only a worker that stops or loses its
//! connection while holding messages returns them, once each. Every dead letter is also kept,
//! whatever the inbox does, in the `{p}.dead-log` stream ([`Topology::dead_log`]).

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::actor::ActorId;
use crate::jobs::DeadLetter;
use crate::jobs::message::valid_campaign;
use crate::metrics as m;
use crate::store::{DynStore, StoreError};
use crate::triage::index;

use super::amqp::{self, AmqpError};
use super::topology::Topology;

/// Messages the inbox holds unacked at once: enough to keep the store busy, few enough that a
/// worker that stops returns little.
pub const PREFETCH: u16 = 32;
/// How long stopping waits for the deliveries already received to be admitted, so they are
/// acked instead of returned.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest free-text field kept of a letter admitted from the broker: a dead letter published
/// by another tool may carry anything, and a record over the store's value limit could never
/// be written (the inbox would retry it for ever).
const MAX_TEXT: usize = 4096;

/// What the inbox did with one message, as counted in [`m::DEAD_INBOX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// ferry's own dead letter, indexed by the worker that published it.
    IndexedSkip,
    /// Written to the index.
    Admitted,
    /// Its record already held a dead letter (a copy published twice, or a letter indexed
    /// first by a worker).
    Duplicate,
    /// Its actor is migrated (or native) already: not listed ([`index::Admitted::ActorSettled`]).
    ActorSettled,
}

impl Settled {
    pub const ALL: [Settled; 4] = [Settled::IndexedSkip, Settled::Admitted, Settled::Duplicate, Settled::ActorSettled];

    pub fn as_str(self) -> &'static str {
        match self {
            Settled::IndexedSkip => "indexed_skip",
            Settled::Admitted => "admitted",
            Settled::Duplicate => "duplicate",
            Settled::ActorSettled => "actor_settled",
        }
    }
}

/// A running inbox consumer of one broker session.
pub struct DeadInbox {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl DeadInbox {
    /// Opens a channel on `conn` and starts consuming `{p}.dead`. Fails when the queue cannot
    /// be consumed (missing, or a worker user without read on it): the session fails with it,
    /// by name, instead of running without an inbox.
    pub async fn start(conn: &Connection, topology: &Topology, store: DynStore, tag: &str) -> Result<Self, AmqpError> {
        let ch = conn.create_channel().await?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let tag = format!("{tag}-dead");
        let queue = topology.dead_queue();
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Not "consuming": tests and operators read that line as the work consumer being up.
        info!(%queue, prefetch = PREFETCH, "dead-letter inbox started");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(consume(ch, consumer, tag, store, stopped));
        Ok(DeadInbox { stop, task })
    }

    /// Resolves when the consumer ended by itself (its channel or connection is gone, or the
    /// broker cancelled it): the session is then lost, and reconnecting starts a new inbox.
    pub async fn ended(&mut self) {
        let _ = (&mut self.task).await;
    }

    /// Stops consuming, admits what was already delivered (for at most [`STOP_GRACE`]) and
    /// closes the channel; whatever is left unacked goes back to the queue.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        // Finished: its end was already awaited by `ended` (a join handle is awaited once).
        if task.is_finished() {
            return;
        }
        if tokio::time::timeout(STOP_GRACE + Duration::from_secs(1), &mut task).await.is_err() {
            task.abort();
        }
    }
}

async fn consume(
    ch: Channel,
    mut consumer: Consumer,
    tag: String,
    store: DynStore,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => break,
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                let mut stopping = stopped.clone();
                let stop = async move {
                    let _ = stopping.wait_for(|s| *s).await;
                };
                settle(delivery, &*store, stop).await;
            }
            Some(Err(e)) => {
                warn!(error = %e, "dead-letter inbox consumer failed");
                return;
            }
            None => {
                warn!("dead-letter inbox consumer was cancelled by the broker");
                return;
            }
        }
    }
    // Stopping: no new deliveries, and those already here are admitted and acked while the
    // grace lasts rather than returned (a return raises their delivery count).
    let _ = ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
    let drain = async {
        while let Some(Ok(delivery)) = consumer.next().await {
            settle(delivery, &*store, tokio::time::sleep(STOP_GRACE)).await;
        }
    };
    let _ = tokio::time::timeout(STOP_GRACE, drain).await;
    let _ = ch.close(200, "bye".into()).await;
}

/// Settles one delivery: acks it once its letter is in the index, retrying the store until
/// `give_up` resolves (then it stays unacked and returns to the queue with the channel).
async fn settle(delivery: Delivery, store: &dyn crate::store::Store, give_up: impl Future<Output = ()>) {
    let settled = if amqp::has_header(&delivery.properties, amqp::INDEXED_HEADER) {
        Some(Settled::IndexedSkip)
    } else {
        let letter = storable(crate::triage::from_message(&delivery.properties, &delivery.data));
        admit_retrying(store, &letter, give_up).await
    };
    let Some(settled) = settled else { return };
    metrics::counter!(m::DEAD_INBOX, "kind" => settled.as_str()).increment(1);
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        // Settled, but back on the queue with its closed channel: its next delivery is settled
        // again (a duplicate, or ferry's own once more).
        Ok(false) => warn!("could not ack a dead letter: its channel is closed"),
        Err(e) => warn!(error = %e, "could not ack a dead letter"),
    }
}

/// [`index::admit`] until it answers or `give_up` resolves (`None`).
async fn admit_retrying(
    store: &dyn crate::store::Store,
    letter: &DeadLetter,
    give_up: impl Future<Output = ()>,
) -> Option<Settled> {
    tokio::pin!(give_up);
    let mut backoff = amqp::reconnect_backoff();
    loop {
        let error = match index::admit(store, letter).await {
            Ok(index::Admitted::Listed) => return Some(Settled::Admitted),
            Ok(index::Admitted::AlreadyListed) => return Some(Settled::Duplicate),
            Ok(index::Admitted::ActorSettled) => return Some(Settled::ActorSettled),
            Err(e) => e,
        };
        let delay = backoff.next().unwrap_or(Duration::from_secs(10));
        log_store_error(letter, &error, delay);
        tokio::select! {
            biased;
            () = &mut give_up => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Names of the letter that may be logged: only valid ids, never the body or error text.
fn log_store_error(letter: &DeadLetter, error: &StoreError, delay: Duration) {
    let actor = ActorId::parse(&letter.actor_id).ok().map(|a| a.to_string()).unwrap_or_default();
    let campaign = if valid_campaign(&letter.campaign) { letter.campaign.as_str() } else { "" };
    warn!(
        actor, campaign, reason = letter.reason.as_str(), %error, ?delay,
        "could not admit a dead letter to the store index; retrying (the message stays unacked)"
    );
}

/// The letter with every free-text field cut to [`MAX_TEXT`] bytes, so its record fits the
/// store's value limit whatever the message held.
fn storable(mut d: DeadLetter) -> DeadLetter {
    for text in [&mut d.actor_id, &mut d.campaign, &mut d.phase, &mut d.error, &mut d.worker, &mut d.message] {
        if text.len() > MAX_TEXT {
            let mut end = MAX_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason::DeadLetterReason;

    #[test]
    fn a_letter_of_any_size_fits_the_store_after_storable() {
        let huge = "é".repeat(200_000);
        let d = DeadLetter {
            actor_id: huge.clone(),
            campaign: huge.clone(),
            reason: DeadLetterReason::BadMessage,
            phase: huge.clone(),
            error: huge.clone(),
            attempts: 1,
            worker: huge.clone(),
            at_ms: 0,
            v1_files: None,
            recovery: None,
            message: huge,
        };
        let d = storable(d);
        assert!(d.encode().len() <= crate::store::limits::MAX_VALUE_BYTES, "{}", d.encode().len());
        assert!(d.error.len() <= MAX_TEXT && d.error.chars().all(|c| c == 'é'));
    }

    #[test]
    fn settled_kinds_are_the_metric_labels() {
        let kinds: Vec<&str> = Settled::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(kinds, ["indexed_skip", "admitted", "duplicate", "actor_settled"]);
    }
}
