//! What an agent recorded for given processes: its record stream (`phi-agent run --stdout`,
//! one proto3 JSON record per line) read back, each record decoded and counted by kind for
//! the processes that acted (`--pid`) and for their children (`--ppid`). The host benchmarks
//! use it to count, per workload, how many of the operations a workload process performed
//! became records: the agent's metrics count all of the host's records, these count only the
//! workload's. (Without a collector the agent keeps only the newest spool segment, so the
//! stream, not the spool, holds every record.)

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::Path,
};

use anyhow::Context as _;
use phi_proto::v1::Record;
use serde::Serialize;

/// Counts by kind ("open", "exec", …).
pub type Kinds = BTreeMap<String, u64>;

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Counts {
    pub schema: &'static str,
    pub benchmark: &'static str,
    /// Records in the stream.
    pub records: u64,
    /// Gap records: losses the agent sealed into its chain.
    pub gaps: u64,
    /// Per acting process (`process.pid`), the records by kind.
    pub by_pid: BTreeMap<u32, Kinds>,
    /// Per parent (`process.ppid`), the records by kind of its children.
    pub by_ppid: BTreeMap<u32, Kinds>,
}

/// Reads the record stream in `file` and counts the records of `pids` and of the children of
/// `ppids`. A line that is not a record is an error naming the line, not a short count.
pub fn count(file: &Path, pids: &[u32], ppids: &[u32]) -> anyhow::Result<Counts> {
    let input = std::fs::File::open(file)
        .with_context(|| format!("cannot open the record stream {}", file.display()))?;
    let mut out = Counts {
        schema: "phi-bench/1",
        benchmark: "records-count",
        by_pid: pids.iter().map(|p| (*p, Kinds::new())).collect(),
        by_ppid: ppids.iter().map(|p| (*p, Kinds::new())).collect(),
        ..Counts::default()
    };
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let mut line = String::new();
    let mut n = 0u64;
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .with_context(|| format!("reading {}", file.display()))?
            == 0
        {
            break;
        }
        n += 1;
        if !line.ends_with('\n') {
            anyhow::bail!(
                "{} line {n} is cut short: its writer did not stop cleanly",
                file.display()
            );
        }
        let record: Record = serde_json::from_str(&line)
            .with_context(|| format!("{} line {n} is not a record", file.display()))?;
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
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use phi_proto::v1::{Exec, Gap, Open, Process, record::Event};

    use super::*;

    fn line(seq: u64, pid: u32, ppid: u32, event: Event) -> String {
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
        serde_json::to_string(&record).expect("a record serializes") + "\n"
    }

    #[test]
    fn counts_the_records_of_the_given_processes_and_their_children() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("records.jsonl");
        let mut out = std::fs::File::create(&file)?;
        let mut seq = 0;
        let mut add = |pid, ppid, event| {
            seq += 1;
            out.write_all(line(seq, pid, ppid, event).as_bytes())
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
        drop(out);
        let c = count(&file, &[10, 12], &[10])?;
        assert_eq!(c.records, 132);
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
    fn a_damaged_stream_is_an_error_not_a_short_count() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("records.jsonl");
        let whole = line(1, 10, 1, Event::Open(Open::default()));
        std::fs::write(&file, format!("{whole}{}", &whole[..whole.len() - 5]))?;
        let e = format!("{:#}", count(&file, &[10], &[]).expect_err("a torn stream"));
        assert!(e.contains("line 2 is cut short"), "{e}");
        std::fs::write(&file, format!("{whole}{{\"seq\": \"x\"}}\n"))?;
        let e = format!("{:#}", count(&file, &[10], &[]).expect_err("not a record"));
        assert!(e.contains("line 2 is not a record"), "{e}");
        let e = format!(
            "{:#}",
            count(&dir.path().join("absent"), &[10], &[]).expect_err("no stream")
        );
        assert!(e.contains("cannot open the record stream"), "{e}");
        Ok(())
    }
}
