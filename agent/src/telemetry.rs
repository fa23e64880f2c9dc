//! The agent's health and Prometheus metrics (`--metrics-listen`, default 127.0.0.1:9464):
//! `/healthz` while the main loop turns, `/readyz` once the probes are attached and records
//! flow, `/metrics` with what the agent recorded, lost, spooled and delivered.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use phi_telemetry::{Counter, Gauge, Health, Registry};

use crate::pipeline::LossTotals;

/// The main loop beats every second; silent this long means stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

pub struct AgentMetrics {
    pub registry: Arc<Registry>,
    pub health: Arc<Health>,
    records: BTreeMap<&'static str, Counter>,
    lost: BTreeMap<&'static str, Counter>,
    head_seq: Gauge,
    acked_seq: Gauge,
    spool_records: Gauge,
    spool_bytes: Gauge,
    connected: Gauge,
    disconnects: Counter,
    watched: Gauge,
    processes: Gauge,
}

/// Record kinds, as `Record::kind` names them.
const KINDS: [&str; 9] = [
    "exec",
    "open",
    "connect",
    "accept",
    "exit",
    "gap",
    "heartbeat",
    "agent",
    "config_change",
];

/// What the main loop publishes once a second.
pub struct Snapshot<'a> {
    pub records: &'a BTreeMap<&'static str, u64>,
    pub losses: LossTotals,
    pub head_seq: u64,
    pub acked_seq: u64,
    pub spool_records: u64,
    pub spool_bytes: u64,
    pub watched: usize,
    pub processes: usize,
}

impl AgentMetrics {
    pub fn new(
        host_id: &str,
        kernel: &str,
        sensors: &[(String, String)],
        capabilities: &[String],
        lacking: &[String],
    ) -> AgentMetrics {
        let r = Registry::new();
        r.gauge(
            "phi_agent_info",
            "The agent's version, host id and kernel (always 1).",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("host_id", host_id),
                ("kernel", kernel),
            ],
        )
        .set(1.0);
        for (kind, hook) in sensors {
            r.gauge(
                "phi_agent_sensor_info",
                "Which kernel hook serves each event kind (always 1).",
                &[("kind", kind), ("hook", hook)],
            )
            .set(1.0);
        }
        for (caps, held) in [(capabilities, 1.0), (lacking, 0.0)] {
            for cap in caps {
                r.gauge(
                    "phi_agent_capability",
                    "Capabilities the agent holds (1) or lacks (0).",
                    &[("capability", cap)],
                )
                .set(held);
            }
        }
        let records = KINDS
            .iter()
            .map(|k| {
                (
                    *k,
                    r.counter(
                        "phi_agent_records_total",
                        "Records sealed into the chain, by kind.",
                        &[("kind", k)],
                    ),
                )
            })
            .collect();
        let lost = LossTotals::REASONS
            .iter()
            .map(|reason| {
                (
                    *reason,
                    r.counter(
                        "phi_agent_events_lost_total",
                        "Events lost or shortened, by reason (each is also a gap record).",
                        &[("reason", reason)],
                    ),
                )
            })
            .collect();
        AgentMetrics {
            records,
            lost,
            head_seq: r.gauge(
                "phi_agent_chain_head_seq",
                "Seq of the newest record in the chain.",
                &[],
            ),
            acked_seq: r.gauge(
                "phi_agent_acknowledged_seq",
                "Newest seq the collector holds durably.",
                &[],
            ),
            spool_records: r.gauge(
                "phi_agent_spool_records",
                "Records in the spool (not yet acknowledged, or kept).",
                &[],
            ),
            spool_bytes: r.gauge("phi_agent_spool_bytes", "Size of the spool in bytes.", &[]),
            connected: r.gauge(
                "phi_agent_collector_connected",
                "1 while a stream to the collector is up.",
                &[],
            ),
            disconnects: r.counter(
                "phi_agent_collector_disconnects_total",
                "Streams to the collector that ended in an error.",
                &[],
            ),
            watched: r.gauge(
                "phi_agent_watched_directories",
                "Directory trees being watched.",
                &[],
            ),
            processes: r.gauge(
                "phi_agent_processes_tracked",
                "Processes in the agent's process table.",
                &[],
            ),
            registry: r,
            health: Arc::new(Health::new(STALE_AFTER)),
        }
    }

    pub fn publish(&self, s: &Snapshot<'_>) {
        for (kind, n) in s.records {
            if let Some(c) = self.records.get(kind) {
                c.set_total(*n);
            }
        }
        for (reason, n) in s.losses.named() {
            if let Some(c) = self.lost.get(reason) {
                c.set_total(n);
            }
        }
        self.head_seq.set(s.head_seq as f64);
        self.acked_seq.set(s.acked_seq as f64);
        self.spool_records.set(s.spool_records as f64);
        self.spool_bytes.set(s.spool_bytes as f64);
        self.watched.set(s.watched as f64);
        self.processes.set(s.processes as f64);
        self.health.beat();
    }

    pub fn connected(&self, up: bool) {
        self.connected.set(if up { 1.0 } else { 0.0 });
        if !up {
            self.disconnects.inc();
        }
    }
}
