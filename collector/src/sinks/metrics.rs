//! Per-sink metrics in the collector's Prometheus registry, labelled by sink name.

use phi_telemetry::{Counter, Gauge, Registry};

#[derive(Clone)]
pub struct SinkMetrics {
    pub records: Counter,
    pub alerts: Counter,
    pub errors: Counter,
    pub lag: Gauge,
    pub up: Gauge,
    pub last_delivery: Gauge,
}

impl SinkMetrics {
    pub fn new(r: &Registry, sink: &str, kind: &str) -> SinkMetrics {
        let labels = [("sink", sink), ("type", kind)];
        let event = |what: &str| {
            r.counter(
                "phi_collector_sink_events_total",
                "Events a sink delivered and its receiver accepted, by event (record, alert).",
                &[("sink", sink), ("type", kind), ("event", what)],
            )
        };
        SinkMetrics {
            records: event("record"),
            alerts: event("alert"),
            errors: r.counter(
                "phi_collector_sink_errors_total",
                "Failed deliveries (each is retried with backoff; nothing is dropped).",
                &labels,
            ),
            lag: r.gauge(
                "phi_collector_sink_lag_records",
                "Stored records the sink has not delivered yet, over all hosts.",
                &labels,
            ),
            up: r.gauge(
                "phi_collector_sink_up",
                "1 while the sink's last delivery succeeded, 0 after a failure.",
                &labels,
            ),
            last_delivery: r.gauge(
                "phi_collector_sink_last_delivery_timestamp_seconds",
                "When the sink last delivered successfully (seconds since the epoch).",
                &labels,
            ),
        }
    }
}
