//! The stages after the kernel, in order: decode, process table and identity, record building,
//! numbering, output. Each kernel event passes through once; data moves forward only.

use agent_common::{
    decode::{DecodeError, decode},
    drops::DropReason,
};
use phi_proto::v1::{self as pb, record::Event};

use std::sync::Arc;

use tokio::sync::Notify;

use crate::{
    clock::Clock,
    identity::Identities,
    journal::{Appended, Journal, WhenFull},
    output::Sink,
    probes::Counters,
    process::ProcessTable,
    record::{self, Context, Stamp},
    redact::Redactor,
    watch::WatchList,
};

/// Loss and truncation totals, kernel and user space, with what was last put in the chain.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossTotals {
    pub kernel: Counters,
    pub decode_errors: u64,
    pub spool_full: u64,
}

impl LossTotals {
    /// (reason, total) for every reason.
    fn by_reason(&self) -> [(pb::GapReason, u64); 6] {
        [
            (
                pb::GapReason::RingBufferFull,
                self.kernel.get(DropReason::RingBufferFull),
            ),
            (
                pb::GapReason::ReadFailure,
                self.kernel.get(DropReason::ReadFailure),
            ),
            (
                pb::GapReason::Truncated,
                self.kernel.get(DropReason::Truncated),
            ),
            (
                pb::GapReason::DepthExceeded,
                self.kernel.get(DropReason::DepthExceeded),
            ),
            (pb::GapReason::ProgramBusy, self.kernel.program_busy),
            (pb::GapReason::DecodeError, self.decode_errors),
        ]
    }

    /// Reason names, as metrics label them.
    pub const REASONS: [&'static str; 7] = [
        "ring_buffer_full",
        "read_failure",
        "truncated",
        "depth_exceeded",
        "program_busy",
        "decode_error",
        "spool_full",
    ];

    /// (reason, total) under the names of [`LossTotals::REASONS`].
    pub fn named(&self) -> [(&'static str, u64); 7] {
        let c = self.to_proto();
        [
            ("ring_buffer_full", c.ring_buffer_full),
            ("read_failure", c.read_failure),
            ("truncated", c.truncated),
            ("depth_exceeded", c.depth_exceeded),
            ("program_busy", c.program_busy),
            ("decode_error", c.decode_error),
            ("spool_full", c.spool_full),
        ]
    }

    pub fn to_proto(self) -> pb::DropCounters {
        pb::DropCounters {
            ring_buffer_full: self.kernel.get(DropReason::RingBufferFull),
            read_failure: self.kernel.get(DropReason::ReadFailure),
            truncated: self.kernel.get(DropReason::Truncated),
            depth_exceeded: self.kernel.get(DropReason::DepthExceeded),
            program_busy: self.kernel.program_busy,
            decode_error: self.decode_errors,
            spool_full: self.spool_full,
        }
    }

    /// One line for humans.
    pub fn summary(&self) -> String {
        format!(
            "ring_buffer_full={} read_failure={} truncated={} depth_exceeded={} program_busy={} \
             decode_error={} spool_full={}",
            self.kernel.get(DropReason::RingBufferFull),
            self.kernel.get(DropReason::ReadFailure),
            self.kernel.get(DropReason::Truncated),
            self.kernel.get(DropReason::DepthExceeded),
            self.kernel.program_busy,
            self.decode_errors,
            self.spool_full
        )
    }
}

pub struct Pipeline {
    pub stamp: Stamp,
    pub clock: Clock,
    pub processes: ProcessTable,
    pub watches: WatchList,
    identities: Identities,
    contexts: record::ProcessCache,
    redactor: Redactor,
    pub journal: Journal,
    /// JSON lines on standard output, when asked for.
    stdout: Option<Box<dyn Sink + Send>>,
    /// Woken when new records are durable (the transport sends them).
    wake: Arc<Notify>,
    records_since_start: u64,
    /// Records sealed since start, by kind.
    pub records_by_kind: std::collections::BTreeMap<&'static str, u64>,
    decode_errors: u64,
    /// Totals already reported in gap records.
    reported: LossTotals,
}

impl Pipeline {
    pub fn new(
        stamp: Stamp,
        processes: ProcessTable,
        watches: WatchList,
        redactor: Redactor,
        journal: Journal,
        stdout: Option<Box<dyn Sink + Send>>,
    ) -> Self {
        Pipeline {
            stamp,
            clock: Clock::new(),
            processes,
            watches,
            identities: Identities::new(),
            contexts: record::ProcessCache::default(),
            redactor,
            journal,
            stdout,
            wake: Arc::new(Notify::new()),
            records_since_start: 0,
            records_by_kind: std::collections::BTreeMap::new(),
            decode_errors: 0,
            reported: LossTotals::default(),
        }
    }

    /// Redacts, seals into the chain, spools and writes one record. Every record passes
    /// here: nothing reaches the spool or an output unredacted.
    pub fn emit(&mut self, mut record: pb::Record) -> std::io::Result<()> {
        self.redactor.record(&mut record);
        if self.journal.append(&mut record)? == Appended::Sealed {
            self.sealed(&record);
            if let Some(out) = self.stdout.as_mut() {
                out.write(&record, None)?;
            }
        }
        Ok(())
    }

    /// [`Pipeline::emit`] for a record from the kernel: its process context comes prepared
    /// (redacted, encoded, its JSON made once) from `record::from_event`'s context cache, and
    /// the rest of the record is redacted here.
    fn emit_kernel(&mut self, built: record::Built) -> std::io::Result<()> {
        let record::Built {
            mut record,
            process,
        } = built;
        self.redactor.record_with_redacted_process(&mut record);
        if self
            .journal
            .append_with_process(&mut record, &process.field)?
            == Appended::Sealed
        {
            self.sealed(&record);
            if let Some(out) = self.stdout.as_mut() {
                out.write(&record, Some(&process))?;
            }
        }
        Ok(())
    }

    fn sealed(&mut self, record: &pb::Record) {
        self.records_since_start += 1;
        *self.records_by_kind.entry(record.kind()).or_default() += 1;
    }

    /// The notifier the transport waits on.
    pub fn wake_handle(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// True while the spool is full and the policy is to stop reading events.
    pub fn blocked(&self) -> bool {
        self.journal.when_full() == WhenFull::Block && self.journal.is_full()
    }

    /// A heartbeat record when nothing was recorded for `idle`.
    pub fn heartbeat_if_idle(&mut self, idle: std::time::Duration) -> std::io::Result<()> {
        if self.journal.idle_for() >= idle {
            let beat = pb::Heartbeat {
                records_since_start: self.records_since_start,
                spool_records: self.journal.spooled(),
            };
            self.emit_agent(Event::Heartbeat(beat))?;
        }
        Ok(())
    }

    /// The collector durably holds everything up to `seq`.
    pub fn acknowledged(&mut self, seq: u64) -> std::io::Result<()> {
        self.journal.acknowledged(seq)?;
        Ok(())
    }

    /// A record about the agent itself, stamped now.
    pub fn emit_agent(&mut self, event: Event) -> std::io::Result<()> {
        let rec = record::envelope(&self.stamp, Clock::now(), event);
        self.emit(rec)
    }

    /// Group commit: checkpoint if due, make the spool durable, wake the transport, and
    /// report records the spool had to drop once there is room again.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(out) = self.stdout.as_mut() {
            out.flush()?;
        }
        if let Some(gap) = self.journal.spool_loss() {
            self.emit_agent(Event::Gap(gap))?;
        }
        self.journal.checkpoint_if_due(false)?;
        if self.journal.sync()? {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Final checkpoint over everything, made durable.
    pub fn close(&mut self) -> anyhow::Result<()> {
        self.flush()?;
        self.journal.checkpoint_if_due(true)?;
        if self.journal.sync()? {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Handles one ring-buffer item.
    pub fn handle(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match decode(bytes) {
            Ok(event) => {
                let mut ctx = Context {
                    stamp: &self.stamp,
                    clock: &self.clock,
                    processes: &mut self.processes,
                    watches: &self.watches,
                    identities: &mut self.identities,
                    cache: &mut self.contexts,
                    redactor: &mut self.redactor,
                };
                if let Some(built) = record::from_event(&event, &mut ctx) {
                    self.emit_kernel(built)?;
                }
            }
            Err(e) => self.decode_failed(&e),
        }
        Ok(())
    }

    fn decode_failed(&mut self, e: &DecodeError) {
        self.decode_errors += 1;
        if self.decode_errors.is_power_of_two() {
            tracing::warn!(
                total = self.decode_errors,
                "cannot decode a kernel event ({e}); counted as a gap"
            );
        }
    }

    /// Current totals, given the kernel's counters.
    pub fn totals(&self, kernel: Counters) -> LossTotals {
        LossTotals {
            kernel,
            decode_errors: self.decode_errors,
            spool_full: self.journal.spool_dropped(),
        }
    }

    /// Writes a gap record for every reason whose total grew since the last call.
    pub fn report_losses(&mut self, kernel: Counters) -> std::io::Result<()> {
        let now = self.totals(kernel);
        let before = self.reported.by_reason();
        for (i, (reason, total)) in now.by_reason().into_iter().enumerate() {
            let count = total.saturating_sub(before[i].1);
            if count == 0 {
                continue;
            }
            if matches!(
                reason,
                pb::GapReason::RingBufferFull
                    | pb::GapReason::ReadFailure
                    | pb::GapReason::ProgramBusy
                    | pb::GapReason::DecodeError
            ) {
                tracing::warn!(reason = reason.as_str_name(), count, total, "events lost");
            }
            self.emit_agent(Event::Gap(pb::Gap {
                reason: reason as i32,
                count,
                total,
                first_seq: 0,
                last_seq: 0,
                by_kind: Default::default(),
            }))?;
        }
        self.reported = now;
        Ok(())
    }
}
