//! `phi-agent run`: load the probes, then read events until SIGINT/SIGTERM. SIGHUP re-reads
//! the configuration file and applies watch-list changes without a restart.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use phi_proto::v1::{self as pb, record::Event};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    clock,
    config::{self, FileConfig, Overrides, Settings},
    output::JsonLines,
    pipeline::Pipeline,
    probes::{self, ProbeOptions, Probes},
    process::ProcessTable,
    record::Stamp,
    telemetry::{AgentMetrics, Snapshot},
    watch::WatchList,
};

/// Ring-buffer items handled before the loop looks at signals and timers again.
const DRAIN_BATCH: usize = 8192;
/// How often the ring buffer is drained without a wakeup (the programs wake the agent only
/// for larger batches): the longest a record waits in the kernel.
const POLL: Duration = Duration::from_millis(25);
/// How often kernel counters become gap records and watches are re-checked.
const TICK: Duration = Duration::from_secs(1);
const REVALIDATE_EVERY_TICKS: u64 = 5;

pub struct RunInput {
    pub config_path: Option<PathBuf>,
    pub overrides: Overrides,
    pub settings: Settings,
    pub redactor: crate::redact::Redactor,
    pub journal: crate::journal::Opened,
}

/// How long a stopping agent waits for the collector to acknowledge its last records.
const FINAL_DELIVERY: Duration = Duration::from_secs(5);
/// How long it then waits for the stream to close in order.
const STREAM_CLOSE: Duration = Duration::from_secs(2);

pub async fn run(input: RunInput) -> anyhow::Result<()> {
    let RunInput {
        config_path,
        overrides,
        settings,
        redactor,
        journal: opened,
    } = input;
    // Handlers first: a signal during start-up must still end with a stop record.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let previous_run = opened.previous_run;
    let corruption = opened.corruption;
    let journal = opened.journal;
    let key_id = phi_chain::checkpoint::key_id(&journal.public_key());

    let mut probes = Probes::load(&ProbeOptions {
        ring_buffer_bytes: settings.ring_buffer_bytes,
        connect: settings.connect,
        accept_ports: settings.accept_ports.clone(),
        sensors: settings.sensors,
    })?;
    let capabilities = probes.capabilities;
    tracing::info!(
        held = %capabilities.held().join(","),
        lacking = %capabilities.lacking().join(","),
        "kernel probes attached"
    );
    let mut consequences = capabilities.consequences();
    consequences.extend(probes.io_uring.clone());
    for c in &consequences {
        tracing::warn!("{c}");
    }
    let sensors: Vec<(String, String)> = probes.sensors();
    let metrics = Arc::new(AgentMetrics::new(
        &settings.host_id,
        &probes::preflight::kernel_release(),
        &sensors,
        &capabilities.held(),
        &capabilities.lacking(),
    ));
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = settings.metrics_listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(%addr, "health and metrics on http://{addr}/metrics, /healthz, /readyz");
                tokio::spawn(phi_telemetry::serve(
                    listener,
                    Arc::clone(&metrics.registry),
                    Arc::clone(&metrics.health),
                    async {
                        let _ = metrics_stopped.await;
                    },
                ));
            }
            // Recording matters more than metrics: say so loudly and go on.
            Err(e) => tracing::error!(
                "cannot serve health and metrics on {addr}: {e}; recording continues without \
                 them (choose another port with --metrics-listen, or off)"
            ),
        }
    }

    let mut watches = WatchList::new(probes.take_watch_maps()?);
    for dir in &settings.watch {
        watches.add(dir)?;
    }
    if watches.is_empty() {
        tracing::warn!("no directory is watched: only exec and connect are recorded");
    }
    let ring = probes.take_events()?;
    // SAFETY: the ring buffer owns its map fd for as long as the `AsyncFd` holds it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("cannot poll the kernel ring buffer")?;

    // Seeded after the probes attached: a process started in between is seen by both, never
    // by neither.
    let processes = ProcessTable::seeded();
    let stamp = Stamp {
        host_id: settings.host_id.clone(),
        boot_id: clock::boot_id(),
    };
    let stdout: Option<Box<dyn crate::output::Sink + Send>> = if settings.stdout {
        Some(Box::new(JsonLines::stdout()))
    } else {
        None
    };
    let public_key = journal.public_key();
    let spool_dir = journal.spool_dir().to_owned();
    let durable = journal.durable_handle();
    let mut pipeline = Pipeline::new(stamp, processes, watches, redactor, journal, stdout);
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let mut reports = settings.collector.clone().map(|collector| {
        crate::transport::spawn(crate::transport::Stream {
            collector,
            host_id: settings.host_id.clone(),
            boot_id: pipeline.stamp.boot_id.clone(),
            public_key,
            spool_dir,
            durable,
            wake: pipeline.wake_handle(),
            closing,
        })
    });
    let mut acked = 0u64;
    // Whether the stream to the collector is up (as its last report said).
    let mut connected = false;

    pipeline.emit_agent(Event::Agent(pb::AgentLifecycle {
        phase: pb::agent_lifecycle::Phase::Start as i32,
        version: env!("CARGO_PKG_VERSION").into(),
        kernel_release: probes::preflight::kernel_release(),
        watch: pipeline.watches.paths(),
        sensors: sensors
            .iter()
            .map(|(kind, hook)| pb::Sensor {
                kind: kind.clone(),
                hook: hook.clone(),
            })
            .collect(),
        drops: None,
        capabilities: capabilities.held(),
        reason: previous_run.into(),
        ring_buffer_bytes: settings.ring_buffer_bytes,
        accept_ports: settings
            .accept_ports
            .iter()
            .map(|p| u32::from(*p))
            .collect(),
        key_id: key_id.clone(),
        limitations: probes
            .missing
            .iter()
            .map(|m| format!("{}: {}", m.field, m.consequence))
            .chain(consequences.iter().cloned())
            .collect(),
    }))?;
    if let Some(c) = corruption {
        // A torn spool tail (a crash while writing): skipped, and said so in the chain.
        pipeline.emit_agent(Event::Gap(pb::Gap {
            reason: pb::GapReason::SpoolCorrupt as i32,
            count: 1,
            total: 1,
            first_seq: pipeline.journal.head().seq,
            last_seq: pipeline.journal.head().seq + 1,
            by_kind: Default::default(),
        }))?;
        tracing::warn!(
            offset = c.offset,
            bytes = c.bytes,
            "skipped a torn spool entry"
        );
    }
    pipeline.flush()?;
    tracing::info!(watch = ?pipeline.watches.paths(), "recording");
    publish(&metrics, &pipeline, probes.counters(), acked);
    metrics.health.ready();

    let mut tick = tokio::time::interval(TICK);
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;

    let reason = loop {
        tokio::select! {
            report = async { reports.as_mut()?.recv().await }, if reports.is_some() => {
                match report {
                    Some(crate::transport::Report::Acked(seq)) => {
                        acked = acked.max(seq);
                        pipeline.acknowledged(seq)?;
                    }
                    Some(crate::transport::Report::Connected(up)) => {
                        connected = up;
                        metrics.connected(up);
                    }
                    None => reports = None,
                }
            }
            guard = ring.readable_mut(), if !pipeline.blocked() => {
                let mut guard = guard.context("polling the kernel ring buffer")?;
                if drain(guard.get_inner_mut(), &mut pipeline, DRAIN_BATCH)? < DRAIN_BATCH {
                    guard.clear_ready();
                }
            }
            _ = poll.tick() => {
                if pipeline.blocked() {
                    pipeline.flush()?;
                } else {
                    drain(ring.get_mut(), &mut pipeline, DRAIN_BATCH)?;
                }
            }
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
            _ = sighup.recv() => {
                reload(
                    &mut pipeline,
                    config_path.as_deref(),
                    &overrides,
                    &settings,
                )?;
                pipeline.flush()?;
            }
            _ = tick.tick() => {
                ticks += 1;
                pipeline.clock.refresh();
                pipeline.report_losses(probes.counters())?;
                pipeline.heartbeat_if_idle(settings.heartbeat)?;
                publish(&metrics, &pipeline, probes.counters(), acked);
                if ticks.is_multiple_of(REVALIDATE_EVERY_TICKS) {
                    for note in pipeline.watches.revalidate() {
                        tracing::warn!("{note}");
                    }
                }
                pipeline.flush()?;
            }
        }
    };

    metrics.health.not_ready(format!("stopping on {reason}"));
    // Drain what the kernel already handed over, then account for every loss.
    drain(ring.get_mut(), &mut pipeline, usize::MAX)?;
    let counters = probes.counters();
    pipeline.report_losses(counters)?;
    let totals = pipeline.totals(counters);
    pipeline.emit_agent(Event::Agent(pb::AgentLifecycle {
        phase: pb::agent_lifecycle::Phase::Stop as i32,
        version: env!("CARGO_PKG_VERSION").into(),
        kernel_release: probes::preflight::kernel_release(),
        watch: pipeline.watches.paths(),
        sensors: Vec::new(),
        drops: Some(totals.to_proto()),
        capabilities: Vec::new(),
        reason: reason.into(),
        ring_buffer_bytes: settings.ring_buffer_bytes,
        accept_ports: settings
            .accept_ports
            .iter()
            .map(|p| u32::from(*p))
            .collect(),
        key_id,
        limitations: Vec::new(),
    }))?;
    pipeline.close()?;
    probes.log_run_times();
    drop(probes);
    // Give a connected collector a moment to take the last records; the rest waits in the
    // spool. Not connected, there is nothing to wait for: the stop is not held up.
    if let Some(rx) = reports.as_mut() {
        let head = pipeline.journal.head().seq;
        let deadline = tokio::time::Instant::now() + FINAL_DELIVERY;
        while connected && acked < head {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(crate::transport::Report::Acked(seq))) => {
                    acked = acked.max(seq);
                    pipeline.acknowledged(seq)?;
                }
                Ok(Some(crate::transport::Report::Connected(up))) => connected = up,
                Ok(None) | Err(_) => break,
            }
        }
        if acked < head && !connected {
            tracing::warn!(
                acked,
                head,
                "not connected to the collector: the records it has not acknowledged stay in \
                 the spool and are sent when the agent next runs"
            );
        } else if acked < head {
            tracing::warn!(
                acked,
                head,
                "the collector has not acknowledged everything; the rest stays in the spool"
            );
        }
        // Close the stream cleanly so the collector sees an orderly end, not a reset.
        let _ = closing_tx.send(true);
        let deadline = tokio::time::Instant::now() + STREAM_CLOSE;
        while let Ok(Some(report)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if let crate::transport::Report::Acked(seq) = report {
                acked = acked.max(seq);
                pipeline.acknowledged(seq)?;
            }
        }
    }
    let _ = stop_metrics.send(());
    eprintln!(
        "phi-agent: stopped on {reason}, probes detached; drop counters: {}",
        totals.summary()
    );
    Ok(())
}

/// Publishes the pipeline's state to the metrics and beats the liveness clock.
fn publish(metrics: &AgentMetrics, pipeline: &Pipeline, kernel: probes::Counters, acked: u64) {
    metrics.publish(&Snapshot {
        records: &pipeline.records_by_kind,
        losses: pipeline.totals(kernel),
        head_seq: pipeline.journal.head().seq,
        acked_seq: acked,
        spool_records: pipeline.journal.spooled(),
        spool_bytes: pipeline.journal.spool_bytes(),
        watched: pipeline.watches.paths().len(),
        processes: pipeline.processes.len(),
    });
}

/// Handles up to `max` ring-buffer items; returns how many there were.
fn drain(
    ring: &mut crate::probes::events::EventRing,
    pipeline: &mut Pipeline,
    max: usize,
) -> anyhow::Result<usize> {
    let handled = ring.drain(max, |record| pipeline.handle(record))?;
    if handled > 0 {
        pipeline.flush()?;
    }
    Ok(handled)
}

/// SIGHUP: re-read the config file and apply the new watch list. Settings that need a restart
/// (the accept ports) are reported, not applied. A config file that no longer parses changes
/// nothing.
fn reload(
    pipeline: &mut Pipeline,
    config_path: Option<&std::path::Path>,
    overrides: &Overrides,
    running: &config::Settings,
) -> anyhow::Result<()> {
    let Some(path) = config_path else {
        tracing::info!("SIGHUP without --config: nothing to reload");
        return Ok(());
    };
    let mut change = pb::ConfigChange {
        source: "SIGHUP".into(),
        ..Default::default()
    };
    let file = match FileConfig::load(path) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("reload refused, configuration unchanged: {e}");
            change.errors.push(e.to_string());
            change.watch = pipeline.watches.paths();
            pipeline.emit_agent(Event::ConfigChange(change))?;
            return Ok(());
        }
    };
    let watch = match config::merge(&file, overrides) {
        Ok(s) if s.accept_ports != running.accept_ports => {
            let e = format!(
                "accept_ports {:?} differ from the running agent's {:?}: they take effect when \
                 the agent restarts",
                s.accept_ports, running.accept_ports
            );
            tracing::warn!("{e}");
            change.errors.push(e);
            s.watch
        }
        Ok(s) => s.watch,
        Err(e) => {
            tracing::error!("reload refused, configuration unchanged: {e}");
            change.errors.push(e.to_string());
            change.watch = pipeline.watches.paths();
            pipeline.emit_agent(Event::ConfigChange(change))?;
            return Ok(());
        }
    };
    let applied = pipeline.watches.set(&watch);
    for e in &applied.errors {
        tracing::error!("watch entry not applied: {e}");
    }
    tracing::info!(added = ?applied.added, removed = ?applied.removed, "configuration reloaded");
    change.watch_added = applied.added;
    change.watch_removed = applied.removed;
    change.errors.extend(applied.errors);
    change.watch = pipeline.watches.paths();
    pipeline.emit_agent(Event::ConfigChange(change))?;
    Ok(())
}
