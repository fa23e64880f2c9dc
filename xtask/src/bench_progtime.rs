//! Time spent inside phi-agent's kernel programs per operation, by the kernel's own accounting
//! (`BPF_ENABLE_STATS`: each program run is timed between two clock reads while the returned
//! descriptor is open). Measured in a pass of its own, after the host-overhead rounds: the
//! accounting costs every program run two clock reads, which must not reach those rounds.
//!
//! Set beside what phi-agent adds to each operation in the host-overhead table, it splits the
//! agent's kernel-side cost into the programs' own instructions and everything around them:
//! the hook's dispatch (the empty-hooks row) and what the programs' code and data displace
//! from the caches the system call itself needs.

use std::collections::BTreeMap;

use anyhow::Context as _;
use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};

use crate::bench_load::Workload;

/// One workload's time in the agent's programs (medians over the repetitions).
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramTime {
    pub workload: Workload,
    /// Program runs per operation (all of the agent's programs together).
    pub runs_per_op: f64,
    /// Nanoseconds inside the programs per operation.
    pub ns_per_op: f64,
    /// The programs that ran at least once per hundred operations, by name (the worker's
    /// own start runs the exec and fork programs once, which is not the workload's cost).
    pub programs: Vec<String>,
}

/// Run time (ns) and run count of each loaded program, by id, with its name.
type Snapshot = BTreeMap<u32, (String, u64, u64)>;

/// Ids of every BPF program loaded now.
pub fn loaded_ids() -> anyhow::Result<Vec<u32>> {
    Ok(snapshot(None)?.into_keys().collect())
}

/// The run statistics of the loaded programs (only those in `only`, when given).
fn snapshot(only: Option<&[u32]>) -> anyhow::Result<Snapshot> {
    let mut out = Snapshot::new();
    for info in loaded_programs() {
        // A program unloaded while the list is walked is simply not in it.
        let Ok(info) = info else { continue };
        if only.is_some_and(|ids| !ids.contains(&info.id())) {
            continue;
        }
        let name = info.name_as_str().unwrap_or("?").to_owned();
        out.insert(
            info.id(),
            (name, info.run_time().as_nanos() as u64, info.run_count()),
        );
    }
    Ok(out)
}

/// Keeps the kernel's run-time accounting on while it lives.
pub struct StatsOn {
    _fd: std::os::fd::OwnedFd,
}

impl StatsOn {
    pub fn new() -> anyhow::Result<Self> {
        enable_stats(Stats::RunTime)
            .map(|fd| StatsOn { _fd: fd })
            .context("BPF_ENABLE_STATS was refused (needs Linux >= 5.8 and CAP_SYS_ADMIN)")
    }
}

/// Measures `run` (which performs `ops` operations of `workload`) `reps` times with the
/// programs `ours` timed, and returns the medians. The caller holds a [`StatsOn`].
pub fn measure(
    workload: Workload,
    ours: &[u32],
    ops: u64,
    reps: usize,
    mut run: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<ProgramTime> {
    let mut ns = Vec::new();
    let mut runs = Vec::new();
    let mut programs = Vec::new();
    for _ in 0..reps.max(1) {
        let before = snapshot(Some(ours))?;
        run()?;
        let after = snapshot(Some(ours))?;
        let (d_ns, d_runs, ran) = delta(&before, &after);
        ns.push(d_ns as f64 / ops as f64);
        runs.push(d_runs as f64 / ops as f64);
        for (name, n) in ran {
            if n * 100 >= ops && !programs.contains(&name) {
                programs.push(name);
            }
        }
    }
    programs.sort();
    Ok(ProgramTime {
        workload,
        runs_per_op: crate::bench::median(runs),
        ns_per_op: crate::bench::median(ns),
        programs,
    })
}

/// Total run time and runs between two snapshots, and the programs that ran (name, runs).
fn delta(before: &Snapshot, after: &Snapshot) -> (u64, u64, Vec<(String, u64)>) {
    let mut ns = 0;
    let mut runs = 0;
    let mut ran = Vec::new();
    for (id, (name, t1, c1)) in after {
        let (t0, c0) = before.get(id).map_or((0, 0), |(_, t, c)| (*t, *c));
        if c1 > &c0 {
            ns += t1.saturating_sub(t0);
            runs += c1 - c0;
            ran.push((name.clone(), c1 - c0));
        }
    }
    (ns, runs, ran)
}

/// Time in the programs per operation, less what the accounting adds to each run
/// (`per_run`, ns): never below zero.
pub fn net_ns(t: &ProgramTime, per_run: f64) -> f64 {
    (t.ns_per_op - per_run * t.runs_per_op).max(0.0)
}

/// The report's section: each workload's time in the programs (net of `per_run`, what the
/// accounting adds to each run) beside what phi-agent adds to the operation (`added`: the
/// median (b) cost minus the median (a) cost, per workload).
pub fn render(times: &[ProgramTime], per_run: f64, added: &[(Workload, f64)]) -> String {
    let mut o = format!(
        "\n### Time inside the agent's kernel programs\n\n\
         A separate pass after the rounds above, phi-agent running with its default settings: \
         the kernel times every run of its programs (`BPF_ENABLE_STATS`, on only for this \
         pass, since its clock reads would burden the rounds), on every CPU, the agent's own \
         system calls included. The accounting adds {per_run:.0} ns to each run (what it \
         measures for the empty hooks on unwatched system calls), taken off below. \
         \"Added\" is what (b) costs per operation over (a) in the table above; the part of \
         it outside the programs is the hook's own dispatch (the empty-hooks row) and what \
         the programs' code and data displace from the caches the system call itself \
         uses.\n\n\
         | workload | program runs per operation | ns in the programs per operation | added by phi-agent per operation | share in the programs | programs that ran |\n\
         | --- | ---: | ---: | ---: | ---: | --- |\n",
    );
    for t in times {
        let ns = net_ns(t, per_run);
        let added = added
            .iter()
            .find(|(w, _)| *w == t.workload)
            .map_or(f64::NAN, |(_, a)| *a);
        let share = if added.is_finite() && added > 0.0 {
            format!("{:.0} %", 100.0 * ns / added)
        } else {
            "–".to_owned()
        };
        let added = if !added.is_finite() {
            "–".to_owned()
        } else if added <= 0.0 {
            // (b) ran no slower than (a): the difference is the machine's noise.
            format!("none measurable ({added:.0} ns)")
        } else {
            format!("{added:.0} ns")
        };
        o.push_str(&format!(
            "| {} | {:.2} | {ns:.0} ns | {added} | {share} | {} |\n",
            t.workload.name(),
            t.runs_per_op,
            t.programs.join(", ")
        ));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(entries: &[(u32, &str, u64, u64)]) -> Snapshot {
        entries
            .iter()
            .map(|(id, n, t, c)| (*id, ((*n).to_owned(), *t, *c)))
            .collect()
    }

    #[test]
    fn delta_counts_only_programs_that_ran() {
        let before = snap(&[(1, "tp_sys_exit", 1_000, 10), (2, "tp_exec", 50, 1)]);
        let after = snap(&[
            (1, "tp_sys_exit", 4_000, 40),
            (2, "tp_exec", 50, 1),
            // Loaded between the snapshots: all of its runs count.
            (3, "io_uring_comple", 70, 2),
        ]);
        let (ns, runs, ran) = delta(&before, &after);
        assert_eq!((ns, runs), (3_070, 32));
        assert_eq!(
            ran,
            vec![
                ("tp_sys_exit".to_owned(), 30),
                ("io_uring_comple".to_owned(), 2)
            ]
        );
    }

    #[test]
    fn render_sets_program_time_beside_the_added_cost() {
        let times = [
            ProgramTime {
                workload: Workload::OpenInside,
                runs_per_op: 2.0,
                ns_per_op: 150.0,
                programs: vec!["tp_sys_exit".to_owned()],
            },
            ProgramTime {
                workload: Workload::Exec,
                runs_per_op: 40.0,
                ns_per_op: 900.0,
                programs: vec!["tp_exec".to_owned(), "tp_sys_exit".to_owned()],
            },
        ];
        // 10 ns of accounting per run: 20 ns off the open pair, 400 ns off the exec.
        let text = render(&times, 10.0, &[(Workload::OpenInside, 260.0)]);
        assert!(text.contains("adds 10 ns to each run"), "{text}");
        assert!(
            text.contains(
                "| open/close inside the watched tree | 2.00 | 130 ns | 260 ns | 50 % | tp_sys_exit |"
            ),
            "{text}"
        );
        // No added cost known: no share is made up.
        assert!(
            text.contains("| 40.00 | 500 ns | – | – | tp_exec, tp_sys_exit |"),
            "{text}"
        );
        // (b) measured no slower than (a): said so, with no share made up.
        let text = render(&times, 10.0, &[(Workload::OpenInside, -40.0)]);
        assert!(
            text.contains("| 130 ns | none measurable (-40 ns) | – | tp_sys_exit |"),
            "{text}"
        );
    }

    #[test]
    fn accounting_never_takes_more_than_was_measured() {
        let t = ProgramTime {
            workload: Workload::Connect,
            runs_per_op: 8.0,
            ns_per_op: 100.0,
            programs: Vec::new(),
        };
        assert_eq!(net_ns(&t, 20.0), 0.0);
        assert_eq!(net_ns(&t, 5.0), 60.0);
    }
}
