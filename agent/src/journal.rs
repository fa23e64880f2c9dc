//! The chain stage: every record is sealed into the host's hash chain and appended to the
//! spool; the spool is made durable in groups; a signed checkpoint is written every N records
//! or T seconds; records lost to a full spool become a gap record as soon as there is room.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use phi_chain::{
    checkpoint::{HostKey, KeyError},
    seal::{Head, Sealer},
    spool::{Corruption, Durable, Entry, Spool},
};
use phi_proto::v1::{self as pb, Checkpoint, record::Event};
use prost::Message as _;

use crate::clock::Clock;

/// What to do when the spool reaches its size limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Keep reading events, drop the newest records, and put their count in a gap record as
    /// soon as there is room (the default: the agent stays responsive and the loss is in the
    /// chain).
    #[default]
    DropNewest,
    /// Stop reading kernel events until the collector acknowledges enough: the kernel ring
    /// buffer fills and counts its own losses (also gap records).
    Block,
}

#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub spool_dir: PathBuf,
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub checkpoint_records: u64,
    pub checkpoint_interval: Duration,
    /// No collector: records count as delivered once durable (written to stdout).
    pub local_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("spool {dir}: {source}")]
    Spool {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "spool {dir} holds the chain of host {found:?}, but this agent is host {configured:?}: \
         use the same --host-id, or another --spool-dir for a new chain"
    )]
    OtherHost {
        dir: PathBuf,
        found: String,
        configured: String,
    },
    #[error("cannot save the checkpoint state {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The result of appending one record.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    Sealed,
    /// Dropped: the spool is full (`drop-newest`); counted for the next gap record.
    Dropped,
}

pub struct Journal {
    cfg: JournalConfig,
    host_id: String,
    boot_id: String,
    sealer: Sealer,
    spool: Spool,
    key: HostKey,
    state_path: PathBuf,
    last_checkpoint: Option<Checkpoint>,
    since_checkpoint: u64,
    checkpoint_at: Instant,
    last_append: Instant,
    /// Records dropped because the spool was full, not yet reported, by kind.
    dropped: u64,
    dropped_by_kind: std::collections::BTreeMap<&'static str, u64>,
    dropped_total: u64,
    /// Seq of the last record before the current loss began.
    dropped_after: u64,
}

/// How the previous run ended, and what opening found.
pub struct Opened {
    pub journal: Journal,
    /// "first", "clean" or "unclean".
    pub previous_run: &'static str,
    pub corruption: Option<Corruption>,
}

fn write_state(path: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, cp.encode_to_vec())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Journal {
    /// Opens the spool, recovers the chain head and the checkpoint chain, loads (or creates)
    /// the host key.
    pub fn open(
        cfg: JournalConfig,
        state_dir: &Path,
        host_id: &str,
        boot_id: &str,
    ) -> Result<Opened, JournalError> {
        let spool_err = |source| JournalError::Spool {
            dir: cfg.spool_dir.clone(),
            source,
        };
        // Segments small against the limit, so acknowledged ones free room in good time.
        let segment = (cfg.max_bytes / 8).clamp(64 << 10, phi_chain::spool::SEGMENT_BYTES);
        let (spool, recovery) = Spool::open_with(&cfg.spool_dir, segment).map_err(spool_err)?;
        if let Some(found) = recovery.last_record.as_ref().map(|r| r.host_id.clone())
            && found != host_id
        {
            return Err(JournalError::OtherHost {
                dir: cfg.spool_dir.clone(),
                found,
                configured: host_id.to_owned(),
            });
        }
        let key = HostKey::load_or_create(&state_dir.join("host.key"))?;
        let state_path = state_dir.join("checkpoint.pb");
        let saved = std::fs::read(&state_path)
            .ok()
            .and_then(|b| Checkpoint::decode(b.as_slice()).ok());
        let last_checkpoint = match (recovery.last_checkpoint, saved) {
            (Some(a), Some(b)) => Some(if a.seq >= b.seq { a } else { b }),
            (a, b) => a.or(b),
        };
        let previous_run = match &recovery.last_record {
            None => "first",
            Some(r) => match &r.event {
                Some(Event::Agent(a)) if a.phase == pb::agent_lifecycle::Phase::Stop as i32 => {
                    "clean"
                }
                _ => "unclean",
            },
        };
        let head = recovery.head.unwrap_or(Head::EMPTY);
        Ok(Opened {
            journal: Journal {
                host_id: host_id.to_owned(),
                boot_id: boot_id.to_owned(),
                sealer: Sealer::new(head),
                spool,
                key,
                state_path,
                last_checkpoint,
                since_checkpoint: 0,
                checkpoint_at: Instant::now(),
                last_append: Instant::now(),
                dropped: 0,
                dropped_by_kind: std::collections::BTreeMap::new(),
                dropped_total: 0,
                dropped_after: head.seq,
                cfg,
            },
            previous_run,
            corruption: recovery.corruption,
        })
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }

    pub fn head(&self) -> Head {
        self.sealer.head()
    }

    pub fn spool_dir(&self) -> &Path {
        self.spool.dir()
    }

    pub fn durable_handle(&self) -> std::sync::Arc<std::sync::Mutex<Durable>> {
        self.spool.durable_handle()
    }

    /// Records held in the spool.
    pub fn spooled(&self) -> u64 {
        self.spool.records()
    }

    /// Bytes the spool holds.
    pub fn spool_bytes(&self) -> u64 {
        self.spool.bytes()
    }

    /// True when the spool is at its limit.
    pub fn is_full(&self) -> bool {
        self.spool.bytes() >= self.cfg.max_bytes
    }

    pub fn when_full(&self) -> WhenFull {
        self.cfg.when_full
    }

    /// Records dropped because the spool was full, since start.
    pub fn spool_dropped(&self) -> u64 {
        self.dropped_total
    }

    /// Time since the last record.
    pub fn idle_for(&self) -> Duration {
        self.last_append.elapsed()
    }

    /// Seals and appends `record`. When the spool is full, `drop-newest` drops it (counted),
    /// except records about the agent itself and gap records, which always get in.
    pub fn append(&mut self, record: &mut pb::Record) -> std::io::Result<Appended> {
        self.append_with_process(record, &[])
    }

    /// [`Journal::append`] for a record whose process context is given encoded (see
    /// `Sealer::seal_with_process`); `record.process` is `None`.
    pub fn append_with_process(
        &mut self,
        record: &mut pb::Record,
        process: &[u8],
    ) -> std::io::Result<Appended> {
        let essential = matches!(
            record.event,
            Some(Event::Gap(_) | Event::Agent(_) | Event::ConfigChange(_))
        );
        if self.is_full() && !essential && self.cfg.when_full == WhenFull::DropNewest {
            if self.dropped == 0 {
                self.dropped_after = self.sealer.head().seq;
                tracing::warn!(
                    bytes = self.spool.bytes(),
                    limit = self.cfg.max_bytes,
                    "spool full: dropping the newest records until the collector catches up"
                );
            }
            self.dropped += 1;
            self.dropped_total += 1;
            *self.dropped_by_kind.entry(record.kind()).or_insert(0) += 1;
            return Ok(Appended::Dropped);
        }
        let sealed = self.sealer.seal_with_process(record, process);
        self.spool.append(&Entry::Record(sealed))?;
        self.since_checkpoint += 1;
        self.last_append = Instant::now();
        Ok(Appended::Sealed)
    }

    /// The gap record for records dropped while the spool was full, once there is room again.
    /// `first_seq` is the last record before the loss; the gap itself follows the loss.
    pub fn spool_loss(&mut self) -> Option<pb::Gap> {
        if self.dropped == 0 || self.is_full() {
            return None;
        }
        let gap = pb::Gap {
            reason: pb::GapReason::SpoolFull as i32,
            count: self.dropped,
            total: self.dropped_total,
            first_seq: self.dropped_after,
            last_seq: self.sealer.head().seq + 1,
            by_kind: std::mem::take(&mut self.dropped_by_kind)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        };
        tracing::warn!(
            count = self.dropped,
            after_seq = self.dropped_after,
            "records were dropped while the spool was full"
        );
        self.dropped = 0;
        Some(gap)
    }

    /// Makes everything appended durable. Without a collector, durable records are
    /// delivered (written to stdout) and the spool keeps only the newest segment.
    pub fn sync(&mut self) -> std::io::Result<bool> {
        let synced = self.spool.sync()?;
        if synced && self.cfg.local_only {
            self.spool.release(self.spool.durable_seq())?;
        }
        Ok(synced)
    }

    /// Writes a signed checkpoint when N records or T seconds have passed (or `force`).
    pub fn checkpoint_if_due(&mut self, force: bool) -> Result<bool, JournalError> {
        let head = self.sealer.head();
        if head.seq == 0
            || self
                .last_checkpoint
                .as_ref()
                .is_some_and(|c| c.seq == head.seq)
        {
            return Ok(false);
        }
        let due = force
            || self.since_checkpoint >= self.cfg.checkpoint_records
            || self.checkpoint_at.elapsed() >= self.cfg.checkpoint_interval;
        if !due {
            return Ok(false);
        }
        let prev = self
            .last_checkpoint
            .as_ref()
            .map(|c| c.signature.clone())
            .unwrap_or_default();
        let cp = self.key.checkpoint(
            &self.host_id,
            &self.boot_id,
            head.seq,
            &head.hash,
            Clock::now(),
            &prev,
        );
        self.spool
            .append(&Entry::Checkpoint(cp.clone()))
            .map_err(|source| JournalError::Spool {
                dir: self.cfg.spool_dir.clone(),
                source,
            })?;
        write_state(&self.state_path, &cp).map_err(|source| JournalError::State {
            path: self.state_path.clone(),
            source,
        })?;
        self.last_checkpoint = Some(cp);
        self.since_checkpoint = 0;
        self.checkpoint_at = Instant::now();
        Ok(true)
    }

    /// The collector has everything up to `seq`: release whole spool segments.
    pub fn acknowledged(&mut self, seq: u64) -> std::io::Result<u64> {
        self.spool.release(seq)
    }
}

#[cfg(test)]
mod tests {
    use phi_chain::spool::SpoolReader;

    use super::*;

    fn cfg(dir: &Path, max_bytes: u64) -> JournalConfig {
        JournalConfig {
            spool_dir: dir.join("spool"),
            max_bytes,
            when_full: WhenFull::DropNewest,
            checkpoint_records: 3,
            checkpoint_interval: Duration::from_secs(3600),
            local_only: false,
        }
    }

    fn heartbeat() -> pb::Record {
        pb::Record {
            host_id: "h1".into(),
            event: Some(Event::Heartbeat(pb::Heartbeat::default())),
            ..Default::default()
        }
    }

    #[test]
    fn restarts_continue_the_chain_and_the_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = Journal::open(cfg(dir.path(), 1 << 30), dir.path(), "h1", "b").expect("open");
        assert_eq!(opened.previous_run, "first");
        let mut j = opened.journal;
        for _ in 0..4 {
            j.append(&mut heartbeat()).expect("append");
        }
        assert!(j.checkpoint_if_due(false).expect("checkpoint"));
        j.sync().expect("sync");
        let head = j.head();
        let key = j.public_key();
        let first_cp = j.last_checkpoint.clone().expect("cp");
        drop(j);
        let opened =
            Journal::open(cfg(dir.path(), 1 << 30), dir.path(), "h1", "b").expect("reopen");
        assert_eq!(
            opened.previous_run, "unclean",
            "no stop record closed the chain"
        );
        let mut j = opened.journal;
        assert_eq!(j.head(), head);
        assert_eq!(j.public_key(), key, "same host key");
        let mut r = heartbeat();
        j.append(&mut r).expect("append");
        assert_eq!(r.seq, 5);
        assert_eq!(r.prev_hash, head.hash.to_vec());
        assert!(j.checkpoint_if_due(true).expect("checkpoint"));
        let cp = j.last_checkpoint.clone().expect("cp");
        phi_chain::checkpoint::verify(&cp, &key, &first_cp.signature).expect("checkpoints chain");
        assert!(matches!(
            Journal::open(cfg(dir.path(), 1 << 30), dir.path(), "other", "b"),
            Err(JournalError::OtherHost { .. })
        ));
    }

    #[test]
    fn a_full_spool_drops_and_reports_the_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::open(cfg(dir.path(), 400), dir.path(), "h1", "b")
            .expect("open")
            .journal;
        let mut dropped = 0;
        for _ in 0..40 {
            if j.append(&mut heartbeat()).expect("append") == Appended::Dropped {
                dropped += 1;
            }
        }
        assert!(dropped > 0);
        j.sync().expect("sync");
        assert!(j.spool_loss().is_none(), "no report while still full");
        let head = j.head();
        j.acknowledged(head.seq).expect("ack");
        // Room again only once old segments can go: force a new segment by sealing enough.
        j.cfg.max_bytes = u64::MAX;
        let gap = j.spool_loss().expect("gap once there is room");
        assert_eq!(gap.count, dropped);
        assert_eq!(gap.by_kind.get("heartbeat"), Some(&dropped));
        assert_eq!(gap.first_seq, head.seq);
        let mut reader = SpoolReader::new(&j.spool, 0);
        assert_eq!(
            reader.next_batch(1000).expect("read").len() as u64,
            head.seq,
            "dropped records never got a seq: the chain has no holes"
        );
    }
}
