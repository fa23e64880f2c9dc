//! The delivery loop: a consumer follows the store, host by host in seq order and then the
//! alerts in id order, hands each batch to its sink, and moves its durable position only
//! after the sink reported the batch delivered. A failed delivery is retried with
//! exponential backoff until it succeeds; meanwhile the consumer simply falls behind (ingest
//! never waits for it) and catches up from the store. Delivery is at least once: a batch
//! delivered just before a crash or a stop, whose position was not stored yet, is delivered
//! again.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{
    Sink,
    config::{Delivery, Events},
    cursor::Cursors,
    event::{Event, RecordEvent},
    metrics::SinkMetrics,
};
use crate::store::{HostHead, Pool, StoreError};

/// The collector asked to stop.
#[derive(Debug)]
pub struct Stopped;

/// Announces new data in the store (ingest and the rule engine send on it; consumers wait
/// on it, with a poll interval as the fallback for other collectors' writes).
#[derive(Clone)]
pub struct Wake(Arc<watch::Sender<u64>>);

impl Default for Wake {
    fn default() -> Self {
        Wake(Arc::new(watch::channel(0).0))
    }
}

impl Wake {
    pub fn notify(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// One consumer of the store.
pub struct Follower {
    pub name: String,
    pub pool: Arc<Pool>,
    pub delivery: Delivery,
    pub metrics: Option<SinkMetrics>,
    pub wake: watch::Receiver<u64>,
    pub stop: watch::Receiver<bool>,
}

impl Follower {
    /// Waits `d`; `Err(Stopped)` when the collector stops first.
    async fn pause(&mut self, d: Duration) -> Result<(), Stopped> {
        tokio::select! {
            () = tokio::time::sleep(d) => Ok(()),
            _ = self.stop.wait_for(|s| *s) => Err(Stopped),
        }
    }

    /// Runs a store operation until it succeeds (with backoff) or the collector stops.
    async fn store<T: Send + 'static>(
        &mut self,
        what: &str,
        f: impl Fn(&mut dyn crate::store::Store) -> Result<T, StoreError>
        + Send
        + Sync
        + Clone
        + 'static,
    ) -> Result<T, Stopped> {
        let mut wait = self.delivery.retry_min;
        loop {
            match self.pool.run(f.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::warn!(sink = %self.name, "{what} failed: {e}; retrying in {wait:?}");
                    self.pause(wait).await?;
                    wait = (wait * 2).min(self.delivery.retry_max);
                }
            }
        }
    }

    /// Sets the lag metric from the store's heads (best effort).
    async fn refresh_lag(&self, cursors: &Cursors) {
        if self.delivery.events != Events::AlertsOnly
            && let Some(m) = &self.metrics
            && let Ok(heads) = self.pool.run(|s| s.heads()).await
        {
            m.lag.set(cursors.lag(&heads) as f64);
        }
    }

    /// Hands `events` to the sink until it accepts them.
    async fn deliver(
        &mut self,
        sink: &mut dyn Sink,
        events: &[Event],
        cursors: &Cursors,
    ) -> Result<(), Stopped> {
        let mut wait = self.delivery.retry_min;
        loop {
            let sent = tokio::select! {
                r = sink.send(events) => r,
                _ = self.stop.wait_for(|s| *s) => return Err(Stopped),
            };
            match sent {
                Ok(()) => {
                    if let Some(m) = &self.metrics {
                        let alerts = events
                            .iter()
                            .filter(|e| matches!(e, Event::Alert(_)))
                            .count() as u64;
                        m.alerts.add(alerts);
                        m.records.add(events.len() as u64 - alerts);
                        m.up.set(1.0);
                        m.last_delivery.set(
                            std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0.0, |d| d.as_secs_f64()),
                        );
                    }
                    return Ok(());
                }
                Err(e) => {
                    if let Some(m) = &self.metrics {
                        m.errors.inc();
                        m.up.set(0.0);
                    }
                    tracing::warn!(
                        sink = %self.name,
                        events = events.len(),
                        "delivery failed: {e}; retrying in {wait:?}"
                    );
                    self.refresh_lag(cursors).await;
                    self.pause(wait).await?;
                    wait = (wait * 2).min(self.delivery.retry_max);
                }
            }
        }
    }

    /// Follows the store until the collector stops.
    pub async fn run(mut self, mut sink: Box<dyn Sink>) {
        let _ = self.follow(sink.as_mut()).await;
        tracing::debug!(sink = %self.name, "stopped");
    }

    async fn follow(&mut self, sink: &mut dyn Sink) -> Result<(), Stopped> {
        let mut cursors = loop {
            match Cursors::load(&self.pool, &self.name).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(sink = %self.name, "cannot read its position: {e}");
                    let wait = self.delivery.retry_min;
                    self.pause(wait).await?;
                }
            }
        };
        if cursors.new && self.delivery.start_at_end {
            let mut wait = self.delivery.retry_min;
            while let Err(e) = cursors.start_at_end(&self.pool).await {
                tracing::warn!(sink = %self.name, "cannot store its start position: {e}");
                self.pause(wait).await?;
                wait = (wait * 2).min(self.delivery.retry_max);
            }
        }
        tracing::info!(
            sink = %self.name,
            hosts = cursors.hosts.len(),
            alerts_after = cursors.alerts,
            "following the store"
        );
        loop {
            // Marks what is announced now as seen: anything later wakes the next wait.
            self.wake.borrow_and_update();
            let progressed = self.round(sink, &mut cursors).await?;
            if !progressed {
                let poll = self.delivery.poll;
                tokio::select! {
                    () = tokio::time::sleep(poll) => {}
                    _ = self.wake.changed() => {}
                    _ = self.stop.wait_for(|s| *s) => return Err(Stopped),
                }
            }
        }
    }

    /// One pass: at most one batch per host (so that a busy host does not starve the
    /// others), then one batch of alerts. True when anything was delivered.
    async fn round(&mut self, sink: &mut dyn Sink, cursors: &mut Cursors) -> Result<bool, Stopped> {
        let heads: Vec<HostHead> = self.store("reading the hosts", |s| s.heads()).await?;
        let records = self.delivery.events != Events::AlertsOnly;
        if records && let Some(m) = &self.metrics {
            m.lag.set(cursors.lag(&heads) as f64);
        }
        let mut progressed = false;
        let batch = self.delivery.batch;
        if records {
            for h in &heads {
                let mut after = cursors.host(&h.host_id);
                if after < h.anchor_seq {
                    tracing::warn!(
                        sink = %self.name,
                        host = %h.host_id,
                        "records {}..={} were removed by retention before this sink delivered \
                         them",
                        after + 1,
                        h.anchor_seq
                    );
                    after = h.anchor_seq;
                    self.save(cursors, Position::Host(&h.host_id, after))
                        .await?;
                }
                if after >= h.head_seq {
                    continue;
                }
                let host = h.host_id.clone();
                let rows = self
                    .store("reading records", move |s| s.chain(&host, after, batch))
                    .await?;
                let Some(last) = rows.last().map(|r| r.seq) else {
                    continue;
                };
                let events: Vec<Event> = rows
                    .into_iter()
                    .map(|r| Event::Record(RecordEvent::from_row(r)))
                    .collect();
                self.deliver(sink, &events, cursors).await?;
                self.save(cursors, Position::Host(&h.host_id, last)).await?;
                progressed = true;
            }
        }
        if self.delivery.events != Events::Records {
            let after = cursors.alerts;
            let alerts = self
                .store("reading alerts", move |s| s.alerts_after(after, batch))
                .await?;
            if let Some(last) = alerts.last().map(|a| a.id) {
                let events: Vec<Event> = alerts.into_iter().map(Event::Alert).collect();
                self.deliver(sink, &events, cursors).await?;
                self.save(cursors, Position::Alerts(last)).await?;
                progressed = true;
            }
        }
        if records && let Some(m) = &self.metrics {
            m.lag.set(cursors.lag(&heads) as f64);
        }
        Ok(progressed)
    }

    /// Stores a position until it sticks.
    async fn save(&mut self, cursors: &mut Cursors, pos: Position<'_>) -> Result<(), Stopped> {
        let mut wait = self.delivery.retry_min;
        let pool = Arc::clone(&self.pool);
        loop {
            let stored = match pos {
                Position::Host(host, seq) => cursors.advance_host(&pool, host, seq).await,
                Position::Alerts(id) => cursors.advance_alerts(&pool, id).await,
            };
            match stored {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(sink = %self.name, "cannot store its position: {e}");
                    self.pause(wait).await?;
                    wait = (wait * 2).min(self.delivery.retry_max);
                }
            }
        }
    }
}

/// A position to store.
#[derive(Clone, Copy)]
enum Position<'a> {
    Host(&'a str, u64),
    Alerts(u64),
}
