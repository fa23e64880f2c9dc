//! SIEM sinks: every stored record and alert, forwarded to the systems security teams work
//! in. Each sink is a `[[sinks]]` table chosen by `type`:
//!
//! - `ocsf_file`: OCSF JSON lines in a rotated file ([`file`]);
//! - `ocsf_http`: OCSF JSON lines POSTed over HTTPS ([`ocsf_http`]);
//! - `syslog`: RFC 5424 over TLS with octet counting ([`syslog`]);
//! - `splunk_hec`: Splunk HTTP Event Collector with indexer acknowledgement ([`hec`]).
//!
//! Sinks read what the store committed ([`delivery`]): nothing that was acknowledged to an
//! agent can be lost on the way, an outage only makes a sink fall behind, and each sink's
//! position survives restarts in the store ([`cursor`]).

pub mod config;
pub mod cursor;
pub mod delivery;
pub mod event;
pub mod file;
pub mod hec;
pub mod http;
pub mod metrics;
pub mod ocsf;
pub mod ocsf_http;
pub mod syslog;
pub mod tls;

use std::sync::Arc;

pub use self::{
    config::SinkConfig,
    delivery::{Follower, Wake},
    event::Event,
};
use crate::{store::Pool, telemetry::CollectorMetrics};

/// Why a delivery failed: the call and what the receiver or the system said.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {detail}")]
pub struct SinkError {
    pub call: &'static str,
    pub detail: String,
}

impl SinkError {
    pub fn new(call: &'static str, detail: impl std::fmt::Display) -> SinkError {
        SinkError {
            call,
            detail: detail.to_string(),
        }
    }
}

/// A destination. `send` returns once the receiver has the whole batch (as far as its
/// protocol can tell); any error makes the caller retry the same batch later, so a sink
/// drops its connection on error and reconnects on the next call.
#[tonic::async_trait]
pub trait Sink: Send {
    async fn send(&mut self, events: &[Event]) -> Result<(), SinkError>;
}

impl SinkConfig {
    /// The sink, ready to connect on its first delivery.
    pub fn build(&self) -> anyhow::Result<Box<dyn Sink>> {
        Ok(match self {
            SinkConfig::OcsfFile(c) => Box::new(file::OcsfFile::new(c)),
            SinkConfig::OcsfHttp(c) => Box::new(ocsf_http::OcsfHttp::new(c)?),
            SinkConfig::Syslog(c) => Box::new(syslog::Syslog::new(c)?),
            SinkConfig::SplunkHec(c) => Box::new(hec::Hec::new(c)?),
        })
    }
}

/// A sink ready to start: its configuration and the sink itself.
pub struct Built {
    pub config: SinkConfig,
    pub delivery: config::Delivery,
    pub sink: Box<dyn Sink>,
}

/// Builds every sink (reading TLS material and tokens): errors name the sink and the key.
pub fn build_all(sinks: &[SinkConfig]) -> anyhow::Result<Vec<Built>> {
    sinks
        .iter()
        .map(|c| {
            let name = c.name();
            Ok(Built {
                config: c.clone(),
                delivery: c.delivery().map_err(anyhow::Error::msg)?,
                sink: c
                    .build()
                    .map_err(|e| anyhow::anyhow!("sink {name:?}: {e:#}"))?,
            })
        })
        .collect()
}

/// Stores the start position of new sinks that start at the end (call it before ingest
/// starts).
pub async fn prepare(sinks: &[Built], pool: &Arc<Pool>) -> anyhow::Result<()> {
    for b in sinks.iter().filter(|b| b.delivery.start_at_end) {
        cursor::Cursors::start_new_at_end(pool, &consumer(b.config.name()))
            .await
            .map_err(|e| {
                anyhow::anyhow!("sink {:?}: cannot store its position: {e}", b.config.name())
            })?;
    }
    Ok(())
}

/// The consumer name of a sink in the store.
pub fn consumer(sink: &str) -> String {
    format!("sink:{sink}")
}

/// Starts one follower per sink; they end when `stop` fires.
pub fn spawn(
    sinks: Vec<Built>,
    pool: &Arc<Pool>,
    metrics: &CollectorMetrics,
    wake: &Wake,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for Built {
        config: c,
        delivery,
        sink,
    } in sinks
    {
        let follower = Follower {
            name: consumer(c.name()),
            pool: Arc::clone(pool),
            delivery,
            metrics: Some(metrics::SinkMetrics::new(
                &metrics.registry,
                c.name(),
                c.kind(),
            )),
            wake: wake.subscribe(),
            stop: stop.clone(),
        };
        tracing::info!(
            sink = c.name(),
            r#type = c.kind(),
            "forwarding to a SIEM sink"
        );
        tasks.push(tokio::spawn(follower.run(sink)));
    }
    tasks
}
