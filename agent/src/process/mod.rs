//! The process table: seeded from /proc at start, then kept exact by the kernel's fork, exec and
//! exit events, so that even a process that has already exited when its events are read is
//! attributed to the right executable and parent.

mod procfs;

use std::collections::{HashMap, hash_map::Entry};

use agent_common::decode::{Exec, Fork};

/// What the agent knows about one process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    pub ppid: u32,
    /// Start time, `CLOCK_BOOTTIME` ns (0 when unknown).
    pub start_ns: u64,
    /// Resolved path of the executable.
    pub exe: Option<Vec<u8>>,
    pub argv: Vec<Vec<u8>>,
    pub argv_truncated: bool,
}

#[derive(Default)]
pub struct ProcessTable {
    procs: HashMap<u32, ProcessInfo>,
}

impl ProcessTable {
    /// A table filled with every process /proc shows now.
    pub fn seeded() -> Self {
        let mut table = ProcessTable::default();
        for (pid, info) in procfs::scan() {
            table.procs.insert(pid, info);
        }
        table
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// A new process inherits its parent's image.
    pub fn on_fork(&mut self, fork: &Fork) {
        let parent = self
            .procs
            .get(&fork.parent_tgid)
            .cloned()
            .unwrap_or_default();
        self.procs.insert(
            fork.child_tgid,
            ProcessInfo {
                ppid: fork.parent_tgid,
                start_ns: fork.child_start_ns,
                exe: parent.exe,
                argv: parent.argv,
                argv_truncated: parent.argv_truncated,
            },
        );
    }

    /// A process replaced its image.
    pub fn on_exec(&mut self, exec: &Exec) {
        self.procs.insert(
            exec.subject.tgid,
            ProcessInfo {
                ppid: exec.ppid,
                start_ns: exec.start_ns,
                exe: Some(exec.exe.bytes.clone()),
                argv: exec.argv.clone(),
                argv_truncated: exec.argv_truncated,
            },
        );
    }

    /// A process ended; its entry is returned and forgotten. Its pid may be reused.
    pub fn on_exit(&mut self, tgid: u32) -> Option<ProcessInfo> {
        self.procs.remove(&tgid)
    }

    /// The entry of `tgid`, reading /proc for a process the table has not seen (one that
    /// started between the /proc scan and the probes attaching).
    pub fn get(&mut self, tgid: u32) -> Option<&ProcessInfo> {
        match self.procs.entry(tgid) {
            Entry::Occupied(e) => Some(e.into_mut()),
            Entry::Vacant(v) => Some(v.insert(procfs::read(tgid)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use agent_common::decode::{KernelPath, Subject};

    use super::*;

    fn subject(tgid: u32) -> Subject {
        Subject {
            ktime_ns: 0,
            tgid,
            pid: tgid,
            uid: 0,
            gid: 0,
            euid: 0,
            egid: 0,
            loginuid: None,
            sessionid: None,
            cgroup_id: 0,
            comm: b"x".to_vec(),
        }
    }

    #[test]
    fn fork_exec_exit_keep_the_table_exact() {
        let mut t = ProcessTable::default();
        t.on_exec(&Exec {
            subject: subject(100),
            ppid: 1,
            old_pid: 100,
            start_ns: 5,
            exe: KernelPath::from_leaf_first(b"bash/bin/usr/", 0),
            filename: b"/bin/bash".to_vec(),
            filename_truncated: false,
            argv: vec![b"bash".to_vec()],
            argv_truncated: false,
            argv_read_failed: false,
            argv_total: 5,
        });
        t.on_fork(&Fork {
            subject: subject(100),
            child_tgid: 4_000_000,
            parent_tgid: 100,
            child_start_ns: 9,
        });
        let child = t.get(4_000_000).expect("child known without /proc").clone();
        assert_eq!(child.ppid, 100);
        assert_eq!(child.exe.as_deref(), Some(&b"/usr/bin/bash"[..]));
        assert_eq!(child.start_ns, 9);
        assert!(t.on_exit(4_000_000).is_some());
        assert!(t.on_exit(4_000_000).is_none());
    }

    #[test]
    fn seeds_from_proc_and_reads_late_processes() {
        let mut t = ProcessTable::seeded();
        assert!(t.len() > 1);
        let me = std::process::id();
        let info = t.get(me).expect("this process is in /proc").clone();
        assert!(info.exe.is_some());
        assert!(!info.argv.is_empty());
        assert_ne!(info.start_ns, 0);
    }
}
