//! The process table: seeded from /proc at start, then kept exact by the kernel's fork, exec,
//! chdir and exit events, so that even a process that has already exited when its events are
//! read is attributed to the right executable, working directory and parents. Exited
//! processes stay for a while, so their children's parent chains stay complete.

mod procfs;

use std::collections::{HashMap, VecDeque, hash_map::Entry};

use agent_common::decode::{Chdir, Exec, Fork, Subject};

/// Exited processes remembered for the parent chains of their descendants.
const EXITED_KEPT: usize = 8192;

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
    /// Resolved working directory.
    pub cwd: Option<Vec<u8>>,
    pub comm: Vec<u8>,
    /// Credentials last seen for the process.
    pub uid: u32,
    pub euid: u32,
    pub loginuid: Option<u32>,
    pub sessionid: Option<u32>,
    /// `SSH_CONNECTION` and `SSH_TTY` from the process's environment, when set: hints for
    /// the login session.
    pub ssh_connection: Option<String>,
    pub ssh_tty: Option<String>,
    pub exited: bool,
}

#[derive(Default)]
pub struct ProcessTable {
    procs: HashMap<u32, ProcessInfo>,
    /// Bumped on every change: what was built from the table is still right while it stays.
    version: u64,
    /// Exited pids, oldest first, with their start times (a reused pid is not evicted).
    exited: VecDeque<(u32, u64)>,
}

/// Finds `NAME=value` in a NUL-split environment.
fn env_value(env: &[Vec<u8>], name: &str) -> Option<String> {
    env.iter().find_map(|kv| {
        let kv = kv.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(kv).into_owned())
    })
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

    /// Processes known (running, or exited and kept a while for attribution).
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// The table's version: it changes whenever anything in the table changes.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Records the credentials and name an event shows for its process.
    pub fn observe(&mut self, s: &Subject) {
        let Some(p) = self.get_mut(s.tgid) else {
            return;
        };
        if (p.uid, p.euid, p.loginuid, p.sessionid) != (s.uid, s.euid, s.loginuid, s.sessionid)
            || p.comm != s.comm
        {
            p.uid = s.uid;
            p.euid = s.euid;
            p.loginuid = s.loginuid;
            p.sessionid = s.sessionid;
            p.comm.clone_from(&s.comm);
            self.version += 1;
        }
    }

    /// A new process inherits its parent's image, directory and environment hints.
    pub fn on_fork(&mut self, fork: &Fork) {
        self.version += 1;
        let parent = self.get(fork.parent_tgid).cloned().unwrap_or_default();
        self.procs.insert(
            fork.child_tgid,
            ProcessInfo {
                ppid: fork.parent_tgid,
                start_ns: fork.child_start_ns,
                exited: false,
                ..parent
            },
        );
    }

    /// A process replaced its image.
    pub fn on_exec(&mut self, exec: &Exec) {
        self.version += 1;
        let previous = self.get(exec.subject.tgid).cloned().unwrap_or_default();
        let s = &exec.subject;
        self.procs.insert(
            s.tgid,
            ProcessInfo {
                ppid: exec.ppid,
                start_ns: exec.start_ns,
                exe: Some(exec.exe.bytes.clone()),
                argv: exec.argv.clone(),
                argv_truncated: exec.argv_truncated,
                cwd: previous.cwd,
                comm: s.comm.clone(),
                uid: s.uid,
                euid: s.euid,
                loginuid: s.loginuid,
                sessionid: s.sessionid,
                ssh_connection: env_value(&exec.env, "SSH_CONNECTION"),
                ssh_tty: env_value(&exec.env, "SSH_TTY"),
                exited: false,
            },
        );
    }

    /// A process changed its working directory.
    pub fn on_chdir(&mut self, chdir: &Chdir) {
        self.version += 1;
        if let Some(p) = self.get_mut(chdir.subject.tgid) {
            p.cwd = Some(chdir.cwd.bytes.clone());
        }
    }

    /// A process ended. It stays known (marked exited) for a while: its children may still
    /// have records to attribute.
    pub fn on_exit(&mut self, tgid: u32) {
        self.version += 1;
        let Some(p) = self.procs.get_mut(&tgid) else {
            return;
        };
        p.exited = true;
        self.exited.push_back((tgid, p.start_ns));
        while self.exited.len() > EXITED_KEPT {
            let Some((pid, start)) = self.exited.pop_front() else {
                break;
            };
            if let Entry::Occupied(e) = self.procs.entry(pid)
                && e.get().exited
                && e.get().start_ns == start
            {
                e.remove();
            }
        }
    }

    fn get_mut(&mut self, tgid: u32) -> Option<&mut ProcessInfo> {
        match self.procs.entry(tgid) {
            Entry::Occupied(e) => Some(e.into_mut()),
            Entry::Vacant(v) => {
                let info = procfs::read(tgid)?;
                self.version += 1;
                Some(v.insert(info))
            }
        }
    }

    /// The entry of `tgid`, reading /proc for a process the table has not seen (one that
    /// started between the /proc scan and the probes attaching).
    pub fn get(&mut self, tgid: u32) -> Option<&ProcessInfo> {
        self.get_mut(tgid).map(|p| &*p)
    }

    /// Known parents of `tgid`, nearest first, at most `max`. The bool says whether the chain
    /// was cut (depth bound or an unknown parent) before reaching pid 1 or 0.
    pub fn ancestors(&mut self, tgid: u32, max: usize) -> (Vec<(u32, ProcessInfo)>, bool) {
        let mut out = Vec::new();
        let mut pid = match self.get(tgid) {
            Some(p) => p.ppid,
            None => return (out, true),
        };
        while pid > 0 {
            if out.len() == max || out.iter().any(|(seen, _)| *seen == pid) {
                return (out, true);
            }
            let Some(p) = self.get(pid).cloned() else {
                return (out, true);
            };
            let next = p.ppid;
            out.push((pid, p));
            if pid == 1 {
                break;
            }
            pid = next;
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use agent_common::decode::KernelPath;

    use super::*;

    fn subject(tgid: u32, uid: u32) -> Subject {
        Subject {
            ktime_ns: 0,
            tgid,
            pid: tgid,
            uid,
            gid: 0,
            euid: uid,
            egid: 0,
            loginuid: Some(1000),
            sessionid: Some(7),
            cgroup_id: 0,
            comm: b"x".to_vec(),
        }
    }

    fn exec(tgid: u32, ppid: u32, exe: &[u8], env: &[&[u8]]) -> Exec {
        Exec {
            subject: subject(tgid, 1000),
            ppid,
            old_pid: tgid,
            start_ns: 5,
            exe: KernelPath::from_leaf_first(exe, 0),
            filename: b"/bin/bash".to_vec(),
            filename_truncated: false,
            argv: vec![b"bash".to_vec()],
            argv_truncated: false,
            argv_read_failed: false,
            argv_total: 5,
            env: env.iter().map(|e| e.to_vec()).collect(),
            env_truncated: false,
            env_total: 0,
        }
    }

    #[test]
    fn fork_exec_chdir_exit_keep_the_table_exact() {
        let mut t = ProcessTable::default();
        t.on_exec(&exec(
            4_000_100,
            1,
            b"bash/bin/usr/",
            &[b"SSH_CONNECTION=127.0.0.1 5000 127.0.0.1 22", b"HOME=/root"],
        ));
        t.on_chdir(&Chdir {
            subject: subject(4_000_100, 1000),
            cwd: KernelPath::from_leaf_first(b"ehr/srv/", 0),
        });
        t.on_fork(&Fork {
            subject: subject(4_000_100, 1000),
            child_tgid: 4_000_200,
            parent_tgid: 4_000_100,
            child_start_ns: 9,
        });
        let child = t.get(4_000_200).expect("child known without /proc").clone();
        assert_eq!(child.ppid, 4_000_100);
        assert_eq!(child.exe.as_deref(), Some(&b"/usr/bin/bash"[..]));
        assert_eq!(child.cwd.as_deref(), Some(&b"/srv/ehr"[..]));
        assert_eq!(child.start_ns, 9);
        assert_eq!(
            child.ssh_connection.as_deref(),
            Some("127.0.0.1 5000 127.0.0.1 22")
        );
        // The parent exits first; the child's chain still names it.
        t.on_exit(4_000_100);
        let (chain, cut) = t.ancestors(4_000_200, 8);
        assert_eq!(chain[0].0, 4_000_100);
        assert!(chain[0].1.exited);
        assert_eq!(chain.len(), 2, "parent, then pid 1 from /proc");
        assert!(!cut);
    }

    #[test]
    fn ancestor_chains_are_bounded_and_survive_cycles() {
        let mut t = ProcessTable::default();
        for pid in 4_000_001..4_000_020u32 {
            t.on_exec(&exec(pid, pid - 1, b"sh/bin/", &[]));
        }
        let (chain, cut) = t.ancestors(4_000_019, 4);
        assert_eq!(chain.len(), 4);
        assert!(cut);
        // A pid reused by its own descendant must not loop.
        t.on_exec(&exec(4_000_001, 4_000_019, b"sh/bin/", &[]));
        let (chain, cut) = t.ancestors(4_000_019, 100);
        assert!(chain.len() < 100 && cut);
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
        assert!(info.cwd.is_some());
        assert_eq!(info.uid, 0);
    }
}
