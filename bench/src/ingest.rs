//! `phi-bench ingest`: how fast the collector verifies and durably stores records.
//!
//! - `store` mode times `Store::append` (hash links, record decoding, checkpoint signatures,
//!   query columns, session aggregates, one durable transaction per batch) called the way the
//!   ingest service calls it, batch after batch, the hosts' batches interleaved.
//! - `wire` mode starts a real `phi-collector serve` and streams every host's chain over its
//!   own gRPC stream with mutual TLS, all hosts at once, from the first batch sent to the last
//!   acknowledgement (each acknowledgement means durably stored).
//!
//! The chains are generated and signed before the clock starts; each repeat runs on a fresh
//! store. The store runs exactly as the collector runs it (SQLite in WAL mode with
//! `synchronous=FULL`; PostgreSQL with the server's settings): durability is never relaxed
//! for a benchmark, because an acknowledged batch must survive a power loss, so every batch
//! costs at least one flush to disk.

use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::{
    db::Db,
    report::{Machine, Quantity, Report, Runs, now_rfc3339},
    synth::{self, CHECKPOINT_EVERY, Dataset},
    wire,
};

/// Where the records happen: from 2026-11-01T00:00:00Z, one every 10 ms per host.
const START_NS: i64 = 1_793_491_200_000_000_000;
const STEP_NS: i64 = 10_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Store::append in this process (verification and storage, no network).
    Store,
    /// A real phi-collector process over gRPC with mutual TLS.
    Wire,
}

#[derive(Clone, Debug)]
pub struct Args {
    pub records: u64,
    pub hosts: usize,
    pub batch: usize,
    pub mode: Mode,
    pub repeat: usize,
}

#[derive(Serialize)]
pub struct Parameters {
    pub backend: &'static str,
    /// The store, without credentials.
    pub db: String,
    pub mode: Mode,
    pub records: u64,
    pub hosts: usize,
    /// Entries (records and checkpoints) per batch, as the agent sends them.
    pub batch: usize,
    pub repeat: usize,
    /// Records per signed checkpoint.
    pub checkpoint_every: u64,
    /// Concurrent streams (wire mode: one per host; store mode: 1).
    pub streams: usize,
}

#[derive(Serialize)]
pub struct DatasetInfo {
    pub generator: &'static str,
    pub records: u64,
    pub checkpoints: u64,
    pub batches: u64,
    /// The sealed records' bodies (the hashed canonical encoding).
    pub record_body_bytes_mean: Quantity,
    pub record_body_bytes_total: Quantity,
}

#[derive(Serialize)]
pub struct Results {
    /// Records verified and durably stored per second, per repeat.
    pub records_per_second: Runs,
    /// Wall time of the timed section, per repeat.
    pub seconds: Runs,
    /// The store after the last repeat.
    pub store_bytes: Quantity,
    pub store_bytes_per_record: Quantity,
}

pub type IngestReport = Report<Parameters, DatasetInfo, Results>;

pub fn run(db: &Db, args: &Args) -> anyhow::Result<IngestReport> {
    if args.records == 0 || args.hosts == 0 || args.batch == 0 || args.repeat == 0 {
        bail!("--records, --hosts, --batch and --repeat must be at least 1");
    }
    if (args.hosts as u64) > args.records {
        bail!("--hosts may not exceed --records");
    }
    let started_at = now_rfc3339();
    eprintln!(
        "ingest: generating {} records over {} host chains (batches of {}, a checkpoint every {})",
        args.records, args.hosts, args.batch, CHECKPOINT_EVERY
    );
    let t = Instant::now();
    let data = synth::generate(args.records, args.hosts, args.batch, START_NS, STEP_NS);
    eprintln!(
        "ingest: generated in {:.1} s ({} batches, {} checkpoints, {:.0} bytes per record)",
        t.elapsed().as_secs_f64(),
        data.batches,
        data.checkpoints,
        data.body_bytes as f64 / data.records as f64
    );
    let tools = match args.mode {
        Mode::Wire => Some((
            wire::binary("PHI_COLLECTOR_BIN", "phi-collector")?,
            wire::binary("PHICTL_BIN", "phictl")?,
        )),
        Mode::Store => None,
    };
    let mut seconds = Vec::new();
    for r in 0..args.repeat {
        db.wipe()?;
        let elapsed = match &tools {
            None => store_once(db, &data)?,
            Some((collector, phictl)) => wire_once(db, &data, collector, phictl, args.batch)?,
        };
        eprintln!(
            "ingest: repeat {}/{}: {:.3} s, {:.0} records/s",
            r + 1,
            args.repeat,
            elapsed,
            data.records as f64 / elapsed
        );
        seconds.push(elapsed);
    }
    check_stored(db, &data)?;
    let store_bytes = db.size_bytes()?;
    let machine = Machine::probe(db.backend(), db.engine_version());
    Ok(Report::new(
        "ingest",
        started_at,
        Parameters {
            backend: db.backend(),
            db: db.shown(),
            mode: args.mode,
            records: args.records,
            hosts: args.hosts,
            batch: args.batch,
            repeat: args.repeat,
            checkpoint_every: CHECKPOINT_EVERY,
            streams: match args.mode {
                Mode::Store => 1,
                Mode::Wire => args.hosts,
            },
        },
        DatasetInfo {
            generator: synth::GENERATOR,
            records: data.records,
            checkpoints: data.checkpoints,
            batches: data.batches,
            record_body_bytes_mean: Quantity::new(
                "bytes",
                data.body_bytes as f64 / data.records as f64,
            ),
            record_body_bytes_total: Quantity::new("bytes", data.body_bytes as f64),
        },
        Results {
            records_per_second: Runs::new(
                "records/s",
                seconds.iter().map(|s| data.records as f64 / s).collect(),
            ),
            seconds: Runs::new("s", seconds),
            store_bytes: Quantity::new("bytes", store_bytes as f64),
            store_bytes_per_record: Quantity::new(
                "bytes/record",
                store_bytes as f64 / data.records as f64,
            ),
        },
        machine,
    ))
}

/// The hosts' batches interleaved the way concurrent streams arrive: one of each in turn.
fn interleaved(data: &Dataset) -> Vec<(usize, phi_proto::v1::Batch)> {
    let most = data.hosts.iter().map(|h| h.2.len()).max().unwrap_or(0);
    let mut out = Vec::with_capacity(data.batches as usize);
    for i in 0..most {
        for (h, (_, _, batches)) in data.hosts.iter().enumerate() {
            if let Some(b) = batches.get(i) {
                out.push((h, b.clone()));
            }
        }
    }
    out
}

/// One timed pass through `Store::append` on a fresh store; seconds.
fn store_once(db: &Db, data: &Dataset) -> anyhow::Result<f64> {
    let mut store = db.open()?;
    for (host, key, _) in &data.hosts {
        store.pin_host(host, key)?;
    }
    // Copies made before the clock starts (append consumes its batch).
    let batches = interleaved(data);
    let started = Instant::now();
    for (h, batch) in batches {
        let host = &data.hosts[h].0;
        let want = batch.records.len();
        let appended = store.append(host, batch)?;
        if let Some(p) = appended.problem {
            bail!(
                "{host}: the store refused a batch: {} ({})",
                p.detail,
                p.kind
            );
        }
        if appended.records != want {
            bail!("{host}: {} of {want} records stored", appended.records);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(store);
    Ok(elapsed)
}

/// One timed pass through a real collector on a fresh store; seconds.
fn wire_once(
    db: &Db,
    data: &Dataset,
    collector_bin: &std::path::Path,
    phictl: &std::path::Path,
    batch: usize,
) -> anyhow::Result<f64> {
    let hosts: Vec<String> = data.hosts.iter().map(|h| h.0.clone()).collect();
    let pki = wire::Pki::init(phictl, &hosts)?;
    let mut collector = wire::Collector::start(collector_bin, &pki, db, batch)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let port = collector.port;
    let result = runtime.block_on(async {
        let mut streams = Vec::new();
        for (host, key, _) in &data.hosts {
            streams.push(wire::Stream::open(&pki, port, host, *key).await?);
        }
        // Copies made before the clock starts.
        let work: Vec<_> = streams
            .into_iter()
            .zip(data.hosts.iter().map(|h| h.2.clone()))
            .collect();
        // Every stream is connected and welcomed: the clock starts with the first batch.
        let started = Instant::now();
        let tasks: Vec<_> = work
            .into_iter()
            .map(|(stream, batches)| tokio::spawn(stream.send(batches)))
            .collect();
        let mut last = started;
        for t in tasks {
            let acked = t.await.context("stream task")??;
            last = last.max(acked);
        }
        Ok::<_, anyhow::Error>((last - started).as_secs_f64())
    });
    let stopped = collector.stop();
    let elapsed = result.with_context(|| format!("collector log:\n{}", collector.log()))?;
    stopped?;
    Ok(elapsed)
}

/// The last repeat's store holds every chain completely.
fn check_stored(db: &Db, data: &Dataset) -> anyhow::Result<()> {
    let mut store = db.open()?;
    for (host, _, batches) in &data.hosts {
        let want: u64 = batches.iter().map(|b| b.records.len() as u64).sum();
        let info = store
            .host_info(host)?
            .with_context(|| format!("{host} is not in the store"))?;
        if info.head_seq != want {
            bail!(
                "{host}: the store's head is seq {}, not {want}",
                info.head_seq
            );
        }
    }
    Ok(())
}
