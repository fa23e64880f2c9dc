//! Alert rules, evaluated on what ingest verified and stored. The rules follow the store like a
//! sink does (consumer `rules`, positions in the store), so a record is judged once it is
//! durable, ingest never waits for the rules, and a crash makes the rules judge the last
//! records again (the store keeps one alert per host, kind, seq and detail). Rule alerts are
//! stored as alerts (`phictl alerts`) and forwarded to every sink like the integrity alerts
//! ingest raises itself (chain-break, fork, checkpoint, key-change).
//!
//! Each alert names its rule and type, the evidence records (host, seq) and the identity in
//! its evidence, a JSON object: `{"rule", "type", "identity", "records": [{"host", "seq"}]}`.

pub mod config;
pub mod eval;
pub mod net;

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

pub use self::config::RuleConfig;
use self::eval::Engine;
use crate::{
    sinks::{
        Event, Follower, Sink, SinkError, Wake,
        config::{Delivery, Events},
    },
    store::Pool,
    telemetry::CollectorMetrics,
};

/// The consumer name of the rules in the store.
pub const CONSUMER: &str = "rules";

/// Evaluates batches of records and stores the alerts they raise.
struct RuleSink {
    engine: Engine,
    pool: Arc<Pool>,
    wake: Wake,
    metrics: Arc<CollectorMetrics>,
}

#[tonic::async_trait]
impl Sink for RuleSink {
    async fn send(&mut self, events: &[Event]) -> Result<(), SinkError> {
        let alerts: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Record(r) => Some(self.engine.evaluate(r)),
                Event::Alert(_) => None,
            })
            .flatten()
            .collect();
        if alerts.is_empty() {
            return Ok(());
        }
        for a in &alerts {
            tracing::warn!(host = %a.host_id, kind = %a.kind, seq = ?a.seq, "alert: {}", a.detail);
        }
        let n = alerts.len();
        let kinds: Vec<String> = alerts.iter().map(|a| a.kind.clone()).collect();
        self.pool
            .run(move |s| {
                for a in &alerts {
                    s.alert(a)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| SinkError::new("storing alerts", e))?;
        for k in kinds {
            self.metrics.rule_alert(&k);
        }
        tracing::debug!(alerts = n, "rule alerts stored");
        self.wake.notify();
        Ok(())
    }
}

/// Stores the rules' start position when they are new (call it before ingest starts): newly
/// configured rules judge what arrives from then on.
pub async fn prepare(rules: &[RuleConfig], pool: &Arc<Pool>) -> anyhow::Result<()> {
    if Engine::new(rules).is_empty() {
        return Ok(());
    }
    crate::sinks::cursor::Cursors::start_new_at_end(pool, CONSUMER)
        .await
        .map_err(|e| anyhow::anyhow!("the alert rules cannot store their position: {e}"))
}

/// Starts the rule follower and, with a `silent_host` rule, the deadline check.
pub fn spawn(
    rules: &[RuleConfig],
    pool: &Arc<Pool>,
    metrics: &Arc<CollectorMetrics>,
    wake: &Wake,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let engine = Engine::new(rules);
    if !engine.is_empty() {
        let follower = Follower {
            name: CONSUMER.into(),
            pool: Arc::clone(pool),
            delivery: Delivery {
                batch: 500,
                retry_min: Duration::from_millis(500),
                retry_max: Duration::from_secs(30),
                poll: Duration::from_secs(2),
                // Newly configured rules judge what arrives from now on, not the archive.
                start_at_end: true,
                events: Events::Records,
            },
            metrics: None,
            wake: wake.subscribe(),
            stop: stop.clone(),
        };
        let pool = Arc::clone(pool);
        let wake = wake.clone();
        let metrics = Arc::clone(metrics);
        tasks.push(tokio::spawn(async move {
            let mut engine = engine;
            warm_up(&mut engine, &pool).await;
            let sink = RuleSink {
                engine,
                pool,
                wake,
                metrics,
            };
            follower.run(Box::new(sink)).await;
        }));
    }
    let silent: Vec<(String, Duration)> = rules
        .iter()
        .filter_map(|r| match r {
            RuleConfig::SilentHost(s) => Some((s.name.clone(), s.deadline.0)),
            _ => None,
        })
        .collect();
    let every = rules
        .iter()
        .filter_map(|r| match r {
            RuleConfig::SilentHost(s) => Some(s.interval.map_or_else(
                || (s.deadline.0 / 4).clamp(Duration::from_millis(100), Duration::from_secs(30)),
                |i| i.0,
            )),
            _ => None,
        })
        .min();
    if let Some(every) = every {
        tasks.push(tokio::spawn(watch_silence(
            silent,
            every,
            Arc::clone(pool),
            Arc::clone(metrics),
            wake.clone(),
            stop.clone(),
        )));
    }
    for r in rules {
        tracing::info!(rule = r.name(), r#type = r.kind(), "alert rule active");
    }
    tasks
}

/// How many of each host's last judged records are replayed at start.
const WARM_UP_RECORDS: u64 = 20_000;

/// Rebuilds the rules' memory (bulk access windows, processes that read watched data) from
/// the last records each host's rules judged before a restart, without raising their alerts
/// again, so that a restart does not open a blind window. Runs before the rules follow the
/// store; ingest does not wait for it.
async fn warm_up(engine: &mut Engine, pool: &Arc<Pool>) {
    if !engine.is_stateful() {
        return;
    }
    let cursors = match crate::sinks::cursor::Cursors::load(pool, CONSUMER).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                "the alert rules start with empty windows: cannot read their position: {e}"
            );
            return;
        }
    };
    let mut replayed = 0usize;
    for (stream, upto) in &cursors.hosts {
        if *upto == 0 {
            continue;
        }
        let from = upto.saturating_sub(WARM_UP_RECORDS);
        let host = stream.clone();
        let limit = (upto - from) as usize;
        match pool.run(move |s| s.chain(&host, from, limit)).await {
            Ok(rows) => {
                for row in rows {
                    replayed += 1;
                    // Judged before the restart: their alerts are stored already.
                    let _ = engine.evaluate(&crate::sinks::event::RecordEvent::from_row(row));
                }
            }
            Err(e) => tracing::warn!(
                host = %stream,
                "the alert rules start with an empty window for this host: {e}"
            ),
        }
    }
    tracing::info!(
        records = replayed,
        "alert rule windows rebuilt from the store"
    );
}

/// Checks every host's newest record against each deadline, `every` so often.
async fn watch_silence(
    rules: Vec<(String, Duration)>,
    every: Duration,
    pool: Arc<Pool>,
    metrics: Arc<CollectorMetrics>,
    wake: Wake,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let now = crate::store::now_ns();
        let rules = rules.clone();
        let checked = pool
            .run(move |s| {
                let mut raised = Vec::new();
                for h in s.heads()? {
                    if h.head_seq == 0 {
                        continue;
                    }
                    for (name, deadline) in &rules {
                        let limit = i64::try_from(deadline.as_nanos()).unwrap_or(i64::MAX);
                        if now.saturating_sub(h.last_record_ns) > limit {
                            let a = eval::silent_host(
                                name,
                                &h.host_id,
                                h.head_seq,
                                h.last_record_ns,
                                *deadline,
                            );
                            let known = s
                                .alerts(Some(&h.host_id))?
                                .iter()
                                .any(|x| x.alert.kind == a.kind && x.alert.detail == a.detail);
                            if !known {
                                s.alert(&a)?;
                                raised.push(a);
                            }
                        }
                    }
                }
                Ok(raised)
            })
            .await;
        match checked {
            Ok(raised) => {
                for a in &raised {
                    tracing::warn!(host = %a.host_id, "alert: {}", a.detail);
                    metrics.rule_alert(&a.kind);
                }
                if !raised.is_empty() {
                    wake.notify();
                }
            }
            Err(e) => tracing::warn!("the silent-host check failed: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
}
