//! What an agent recorded for given processes: its spool read back the way its sender reads it
//! (durable entries, in order), each record decoded and counted by kind for the processes that
//! acted (`--pid`) and for their children (`--ppid`). The host benchmarks use it to count, per
//! workload, how many of the operations a workload process performed became records: the
//! agent's metrics count all of the host's records, these count only the workload's. The
//! spool holds every record only while no collector has acknowledged them (an agent without a
//! collector keeps just its newest segment), so the benchmarks give the agent a collector
//! that is not listening.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;
use phi_chain::spool::{Entry, Spool, SpoolReader};
use phi_proto::v1::Record;
use prost::Message as _;
use serde::Serialize;

/// Counts by kind ("open", "exec", …).
pub type Kinds = BTreeMap<String, u64>;

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Counts {
    pub schema: &'static str,
    pub benchmark: &'static str,
    /// Records in the spool.
    pub records: u64,
    /// Gap records: losses the agent sealed into its chain.
    pub gaps: u64,
    /// The first record in the spool (0 when it holds none): 1 when it holds the whole chain.
    pub first_seq: u64,
    /// Per acting process (`process.pid`), the records by kind.
    pub by_pid: BTreeMap<u32, Kinds>,
    /// Per parent (`process.ppid`), the records by kind of its children.
    pub by_ppid: BTreeMap<u32, Kinds>,
}

/// Reads the spool in `dir` and counts the records of `pids` and of the children of `ppids`.
/// Opening the spool checks its newest segment as the agent does at start; a torn or corrupt
/// tail is an error here (the agent that wrote it was stopped cleanly).
pub fn count(dir: &Path, pids: &[u32], ppids: &[u32]) -> anyhow::Result<Counts> {
    if !dir.is_dir() {
        anyhow::bail!("{}: no such spool directory", dir.display());
    }
    let (spool, recovery) =
        Spool::open(dir).with_context(|| format!("cannot open the spool {}", dir.display()))?;
    if let Some(c) = recovery.corruption {
        anyhow::bail!(
            "the spool {} ends in a damaged entry at byte {} ({}): its agent did not stop \
             cleanly",
            dir.display(),
            c.offset,
            c.reason
        );
    }
    let mut out = Counts {
        schema: "phi-bench/1",
        benchmark: "spool-count",
        by_pid: pids.iter().map(|p| (*p, Kinds::new())).collect(),
        by_ppid: ppids.iter().map(|p| (*p, Kinds::new())).collect(),
        ..Counts::default()
    };
    let mut reader = SpoolReader::new(&spool, 0);
    loop {
        let batch = reader.next_batch(4096).context("reading the spool")?;
        if batch.is_empty() {
            break;
        }
        for entry in batch {
            let Entry::Record(sealed) = entry else {
                continue;
            };
            let record = Record::decode(sealed.body.as_slice())
                .with_context(|| format!("record {} does not decode", sealed.seq))?;
            if out.records == 0 {
                out.first_seq = sealed.seq;
            }
            out.records += 1;
            let kind = record.kind();
            if kind == "gap" {
                out.gaps += 1;
            }
            let Some(process) = &record.process else {
                continue;
            };
            if let Some(kinds) = out.by_pid.get_mut(&process.pid) {
                *kinds.entry(kind.to_owned()).or_default() += 1;
            }
            if let Some(kinds) = out.by_ppid.get_mut(&process.ppid) {
                *kinds.entry(kind.to_owned()).or_default() += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use phi_proto::v1::{Exec, Gap, Open, Process, SealedRecord, record::Event};

    use super::*;

    fn sealed(seq: u64, pid: u32, ppid: u32, event: Event) -> Entry {
        let record = Record {
            seq,
            process: (pid != 0).then(|| Process {
                pid,
                ppid,
                ..Process::default()
            }),
            event: Some(event),
            ..Record::default()
        };
        Entry::Record(SealedRecord {
            seq,
            body: record.encode_to_vec(),
            hash: vec![0; 32],
        })
    }

    #[test]
    fn counts_the_records_of_the_given_processes_and_their_children() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let spool_dir = dir.path().join("spool");
        {
            // Small segments, so that the count crosses from one to the next.
            let (mut spool, _) = Spool::open_with(&spool_dir, 4096)?;
            let mut seq = 0;
            let mut add = |pid, ppid, event| {
                seq += 1;
                spool.append(&sealed(seq, pid, ppid, event))
            };
            for _ in 0..100 {
                add(10, 1, Event::Open(Open::default()))?;
            }
            for child in 0..30 {
                add(100 + child, 10, Event::Exec(Exec::default()))?;
            }
            // Another process's records are not counted.
            add(11, 1, Event::Open(Open::default()))?;
            add(0, 0, Event::Gap(Gap::default()))?;
            spool.sync()?;
        }
        assert!(
            std::fs::read_dir(&spool_dir)?.count() > 1,
            "the test needs several segments"
        );
        let c = count(&spool_dir, &[10, 12], &[10])?;
        assert_eq!(c.records, 132);
        assert_eq!(c.first_seq, 1);
        assert_eq!(c.gaps, 1);
        assert_eq!(c.by_pid[&10].get("open"), Some(&100));
        assert_eq!(c.by_pid[&10].get("exec"), None);
        // Asked for, nothing recorded: present and empty.
        assert!(c.by_pid[&12].is_empty());
        assert_eq!(c.by_ppid[&10].get("exec"), Some(&30));
        assert_eq!(c.by_ppid[&10].values().sum::<u64>(), 30);
        Ok(())
    }

    #[test]
    fn a_damaged_spool_is_an_error_not_a_short_count() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let spool_dir = dir.path().join("spool");
        {
            let (mut spool, _) = Spool::open(&spool_dir)?;
            for seq in 1..=5 {
                spool.append(&sealed(seq, 10, 1, Event::Open(Open::default())))?;
            }
            spool.sync()?;
        }
        let seg = std::fs::read_dir(&spool_dir)?
            .next()
            .context("no segment")??
            .path();
        let len = std::fs::metadata(&seg)?.len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)?
            .set_len(len - 3)?;
        let e = count(&spool_dir, &[10], &[])
            .expect_err("a torn spool")
            .to_string();
        assert!(e.contains("did not stop cleanly"), "{e}");
        let e = count(&dir.path().join("absent"), &[10], &[])
            .expect_err("no spool")
            .to_string();
        assert!(e.contains("no such spool directory"), "{e}");
        Ok(())
    }
}
