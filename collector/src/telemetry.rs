//! The collector's health and Prometheus metrics (`--metrics-listen`, default
//! 127.0.0.1:9465): `/healthz` while the process runs, `/readyz` while the store answers,
//! `/metrics` with ingest, alert, stream and API counters.

use std::{sync::Arc, time::Duration};

use phi_telemetry::{Counter, Gauge, Health, Registry};

use crate::store::Pool;

/// How often the store is asked whether it answers.
pub const STORE_CHECK: Duration = Duration::from_secs(5);

pub struct CollectorMetrics {
    pub registry: Arc<Registry>,
    pub health: Arc<Health>,
    pub records: Counter,
    pub checkpoints: Counter,
    pub batches: Counter,
    pub refused_batches: Counter,
    pub streams_active: Gauge,
    pub streams: Counter,
    pub store_up: Gauge,
    pub ingest_micros: Counter,
}

impl CollectorMetrics {
    pub fn new(name: &str, backend: &str) -> Arc<CollectorMetrics> {
        let r = Registry::new();
        r.gauge(
            "phi_collector_info",
            "The collector's version, name and store backend (always 1).",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("name", name),
                ("backend", backend),
            ],
        )
        .set(1.0);
        Arc::new(CollectorMetrics {
            records: r.counter(
                "phi_collector_records_stored_total",
                "Records verified and stored.",
                &[],
            ),
            checkpoints: r.counter(
                "phi_collector_checkpoints_stored_total",
                "Signed checkpoints verified and stored.",
                &[],
            ),
            batches: r.counter(
                "phi_collector_batches_total",
                "Batches acknowledged to agents.",
                &[],
            ),
            refused_batches: r.counter(
                "phi_collector_batches_refused_total",
                "Batches refused (bad input, limits, storage errors, tamper alerts).",
                &[],
            ),
            streams_active: r.gauge(
                "phi_collector_streams_active",
                "Agent streams open now.",
                &[],
            ),
            streams: r.counter(
                "phi_collector_streams_total",
                "Agent streams accepted since start.",
                &[],
            ),
            store_up: r.gauge("phi_collector_store_up", "1 while the store answers.", &[]),
            ingest_micros: r.counter(
                "phi_collector_ingest_microseconds_total",
                "Time spent verifying and storing batches, in microseconds.",
                &[],
            ),
            registry: r,
            health: Arc::new(Health::new(Duration::from_secs(30))),
        })
    }

    /// A tamper or key-change alert was stored.
    pub fn alert(&self, kind: &str) {
        self.registry
            .counter(
                "phi_collector_alerts_total",
                "Tamper and key-change alerts raised at ingest, by kind.",
                &[("kind", kind)],
            )
            .inc();
    }

    /// An alert rule raised an alert.
    pub fn rule_alert(&self, kind: &str) {
        self.registry
            .counter(
                "phi_collector_rule_alerts_total",
                "Alerts raised by alert rules, by kind.",
                &[("kind", kind)],
            )
            .inc();
    }

    /// A query API call, by method and outcome (ok, denied, unauthenticated).
    pub fn api_call(&self, method: &str, outcome: &str) {
        self.registry
            .counter(
                "phi_collector_api_calls_total",
                "Query API calls, by method and outcome.",
                &[("method", method), ("outcome", outcome)],
            )
            .inc();
    }
}

/// Asks the store every few seconds; ready while it answers. Ends when `stop` fires.
pub async fn watch_store(
    pool: Arc<Pool>,
    metrics: Arc<CollectorMetrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let check = pool.run(|s| s.setting(crate::retention::SETTING));
        match tokio::time::timeout(STORE_CHECK * 2, check).await {
            Ok(Ok(_)) => {
                metrics.store_up.set(1.0);
                metrics.health.ready();
            }
            Ok(Err(e)) => {
                metrics.store_up.set(0.0);
                metrics
                    .health
                    .not_ready(format!("the store does not answer: {e}"));
            }
            Err(_) => {
                metrics.store_up.set(0.0);
                metrics.health.not_ready(format!(
                    "the store did not answer within {} s",
                    (STORE_CHECK * 2).as_secs()
                ));
            }
        }
        metrics.health.beat();
        tokio::select! {
            () = tokio::time::sleep(STORE_CHECK) => {}
            _ = stop.wait_for(|s| *s) => {
                metrics.health.not_ready("stopping");
                break;
            }
        }
    }
}
