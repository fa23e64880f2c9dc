//! Building audit records (`phiaudit.v1.Record`) from decoded kernel events, the process
//! table and the watch list. Opens that user space finds outside every watched tree (the
//! kernel passes on failed opens it could not judge) end here.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use agent_common::{
    decode::{Accept, Connect, Exec, Exit, KernelEvent, Open, Subject},
    event::{
        AcceptSyscall, AddrOrigin, OpenSyscall as KOpenSyscall, PathOrigin, connect_flags,
        path_flags,
    },
};
use phi_proto::v1::{self as pb, record::Event};

use crate::{
    clock::Clock,
    identity::{Credentials, Identities},
    process::ProcessTable,
    redact::Redactor,
    text::{errno_name, escape_bytes, normalize},
    watch::WatchList,
};

/// Parents listed on every record.
const ANCESTORS: usize = 8;

/// What records are stamped with.
pub struct Stamp {
    pub host_id: String,
    pub boot_id: String,
}

/// Process contexts already built and prepared, reused while the process table has not
/// changed: records of a busy thread differ only in their event.
#[derive(Default)]
pub struct ProcessCache {
    /// By thread id (a context names its thread).
    entries: std::collections::HashMap<u32, CachedProcess>,
}

/// One context, with what it was built from.
struct CachedProcess {
    /// Process table version after building.
    version: u64,
    tgid: u32,
    creds: [u32; 6],
    cgroup_id: u64,
    /// The kernel's `comm` (the context holds it escaped and maybe redacted).
    comm: Vec<u8>,
    prepared: Arc<Prepared>,
}

/// A process context ready to go on many records: redacted once, encoded for the chain once
/// and, when JSON is written, serialized once.
pub struct Prepared {
    /// Redacted.
    pub process: pb::Process,
    /// What redaction changed in it.
    pub redactions: Vec<pb::Redaction>,
    /// `Record.process` as encoded in a record (see `phi_chain::seal::process_field`).
    pub field: Vec<u8>,
    json: std::sync::OnceLock<Vec<u8>>,
}

impl Prepared {
    pub(crate) fn new(process: pb::Process, redactions: Vec<pb::Redaction>) -> Self {
        Prepared {
            field: phi_chain::seal::process_field(&process),
            process,
            redactions,
            json: std::sync::OnceLock::new(),
        }
    }

    /// The proto3 JSON of the context, made on first use.
    pub fn json(&self) -> serde_json::Result<&[u8]> {
        if let Some(json) = self.json.get() {
            return Ok(json);
        }
        let json = serde_json::to_vec(&self.process)?;
        Ok(self.json.get_or_init(|| json))
    }
}

/// A record from the kernel, redacted apart from its event, and its process context, which
/// is not in `record.process`: the chain and the outputs take it from `process` (see
/// `Pipeline::emit_kernel`).
pub struct Built {
    pub record: pb::Record,
    pub process: Arc<Prepared>,
}

/// Contexts kept before the cache is cleared.
const PROCESS_CACHE_MAX: usize = 4096;

/// Everything a record needs besides the event.
pub struct Context<'a> {
    pub stamp: &'a Stamp,
    pub clock: &'a Clock,
    pub processes: &'a mut ProcessTable,
    pub watches: &'a WatchList,
    pub identities: &'a mut Identities,
    pub cache: &'a mut ProcessCache,
    /// Redacts each process context once, when it is built.
    pub redactor: &'a mut Redactor,
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const AF_UNIX: u16 = 1;
const O_ACCMODE: u32 = 0o3;
const O_WRONLY: u32 = 0o1;
const O_RDWR: u32 = 0o2;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;
const O_TMPFILE: u32 = 0o20_200_000;
const EINPROGRESS: i64 = 115;

/// A record with the common stamp and `event`; seq and hashes are the chain's job.
pub fn envelope(stamp: &Stamp, time: phi_proto::Timestamp, event: Event) -> pb::Record {
    pb::Record {
        host_id: stamp.host_id.clone(),
        boot_id: stamp.boot_id.clone(),
        time: Some(time),
        event: Some(event),
        ..Default::default()
    }
}

fn outcome(ret: i64) -> pb::Outcome {
    if ret >= 0 {
        pb::Outcome {
            success: true,
            ret,
            errno: String::new(),
        }
    } else {
        pb::Outcome {
            success: false,
            ret,
            errno: errno_name(-ret),
        }
    }
}

/// The prepared process context of `subject`.
fn process(subject: &Subject, ctx: &mut Context<'_>, ppid_hint: Option<u32>) -> Arc<Prepared> {
    let creds = [
        subject.uid,
        subject.euid,
        subject.gid,
        subject.egid,
        subject.loginuid.unwrap_or(u32::MAX),
        subject.sessionid.unwrap_or(u32::MAX),
    ];
    let version = ctx.processes.version();
    if ppid_hint.is_none()
        && let Some(c) = ctx.cache.entries.get(&subject.pid)
        && c.version == version
        && c.tgid == subject.tgid
        && c.creds == creds
        && c.cgroup_id == subject.cgroup_id
        && c.comm == subject.comm
    {
        return Arc::clone(&c.prepared);
    }
    let mut built = build_process(subject, ctx, ppid_hint);
    let redactions = ctx.redactor.process(&mut built);
    let prepared = Arc::new(Prepared::new(built, redactions));
    // Building may have read /proc and changed the table; key by the version after it.
    if ctx.cache.entries.len() >= PROCESS_CACHE_MAX {
        ctx.cache.entries.clear();
    }
    ctx.cache.entries.insert(
        subject.pid,
        CachedProcess {
            version: ctx.processes.version(),
            tgid: subject.tgid,
            creds,
            cgroup_id: subject.cgroup_id,
            comm: subject.comm.clone(),
            prepared: Arc::clone(&prepared),
        },
    );
    prepared
}

fn build_process(subject: &Subject, ctx: &mut Context<'_>, ppid_hint: Option<u32>) -> pb::Process {
    let known = ctx.processes.get(subject.tgid).cloned().unwrap_or_default();
    let (ancestors, cut) = ctx.processes.ancestors(subject.tgid, ANCESTORS);
    let names = &mut ctx.identities.names;
    let mut chain: Vec<pb::Ancestor> = ancestors
        .iter()
        .map(|(pid, a)| pb::Ancestor {
            pid: *pid,
            comm: escape_bytes(&a.comm),
            exe: a.exe.as_deref().map(escape_bytes).unwrap_or_default(),
            uid: a.uid,
            user: names.user(a.uid),
            start_time: (a.start_ns != 0).then(|| ctx.clock.timestamp(a.start_ns)),
            truncated: false,
        })
        .collect();
    if cut && let Some(last) = chain.last_mut() {
        last.truncated = true;
    }
    let creds = Credentials {
        tgid: subject.tgid,
        uid: subject.uid,
        euid: subject.euid,
        gid: subject.gid,
        egid: subject.egid,
        loginuid: subject.loginuid,
        sessionid: subject.sessionid,
    };
    let identity = ctx.identities.identity(&creds, ctx.processes, ctx.clock);
    pb::Process {
        pid: subject.tgid,
        tid: subject.pid,
        ppid: ppid_hint.unwrap_or(known.ppid),
        comm: escape_bytes(&subject.comm),
        exe: known.exe.as_deref().map(escape_bytes).unwrap_or_default(),
        argv: known.argv.iter().map(|a| escape_bytes(a)).collect(),
        start_time: (known.start_ns != 0).then(|| ctx.clock.timestamp(known.start_ns)),
        identity: Some(identity),
        cgroup_id: subject.cgroup_id,
        cwd: known.cwd.as_deref().map(escape_bytes).unwrap_or_default(),
        ancestors: chain,
        container: ctx
            .identities
            .containers
            .resolve(subject.cgroup_id, subject.tgid),
    }
}

fn kernel_record(
    subject: &Subject,
    ctx: &mut Context<'_>,
    event: Event,
    ppid: Option<u32>,
) -> Built {
    let mut record = envelope(ctx.stamp, ctx.clock.timestamp(subject.ktime_ns), event);
    let process = process(subject, ctx, ppid);
    record.redactions = process.redactions.clone();
    Built { record, process }
}

/// Turns one kernel event into a record, updating the process table. `None` for events that
/// are bookkeeping only (fork) or that user space finds outside every watched tree.
pub fn from_event(event: &KernelEvent, ctx: &mut Context<'_>) -> Option<Built> {
    ctx.processes.observe(event.subject());
    match event {
        KernelEvent::Chdir(chdir) => {
            ctx.processes.on_chdir(chdir);
            None
        }
        KernelEvent::Fork(fork) => {
            ctx.processes.on_fork(fork);
            None
        }
        KernelEvent::Exec(exec) => {
            ctx.processes.on_exec(exec);
            Some(kernel_record(
                &exec.subject,
                ctx,
                Event::Exec(exec_event(exec)),
                Some(exec.ppid),
            ))
        }
        KernelEvent::Exit(exit) => {
            let rec = kernel_record(&exit.subject, ctx, Event::Exit(exit_event(exit)), None);
            ctx.processes.on_exit(exit.subject.tgid);
            Some(rec)
        }
        KernelEvent::Open(open) => {
            let ev = open_event(open, ctx.watches)?;
            Some(kernel_record(&open.subject, ctx, Event::Open(ev), None))
        }
        KernelEvent::Connect(connect) => Some(kernel_record(
            &connect.subject,
            ctx,
            Event::Connect(connect_event(connect)),
            None,
        )),
        KernelEvent::Accept(accept) => Some(kernel_record(
            &accept.subject,
            ctx,
            Event::Accept(accept_event(accept)),
            None,
        )),
    }
}

fn exec_event(exec: &Exec) -> pb::Exec {
    pb::Exec {
        exe: escape_bytes(&exec.exe.bytes),
        filename: escape_bytes(&exec.filename),
        argv: exec.argv.iter().map(|a| escape_bytes(a)).collect(),
        argv_truncated: exec.argv_truncated || exec.argv_read_failed,
        argv_bytes: exec.argv_total,
        old_tid: if exec.old_pid != exec.subject.tgid {
            exec.old_pid
        } else {
            0
        },
        exe_truncated: exec.exe.truncated(),
        filename_truncated: exec.filename_truncated,
        env: exec.env.iter().map(|v| escape_bytes(v)).collect(),
        env_truncated: exec.env_truncated,
        env_bytes: exec.env_total,
    }
}

fn exit_event(exit: &Exit) -> pb::ProcessExit {
    let code = exit.exit_code;
    let signal = code & 0x7f;
    pb::ProcessExit {
        status: (signal == 0).then_some((code >> 8) & 0xff),
        signal: (signal != 0).then_some(signal),
        core_dumped: code & 0x80 != 0,
    }
}

/// True when a path string has a `..` component.
fn has_dotdot(path: &[u8]) -> bool {
    path.split(|b| *b == b'/').any(|c| c == b"..")
}

/// Builds an open record, deciding the watched tree for paths the kernel left open.
fn open_event(open: &Open, watches: &WatchList) -> Option<pb::Open> {
    let (path, source) = match open.origin {
        PathOrigin::File => (open.base.bytes.clone(), pb::PathSource::File),
        PathOrigin::Absolute => (normalize(b"/", &open.user), pb::PathSource::Attempted),
        PathOrigin::Relative => (
            normalize(&open.base.bytes, &open.user),
            pb::PathSource::Attempted,
        ),
    };
    let truncated = open.base.truncated()
        || open.user_flags & (path_flags::TRUNCATED | path_flags::DEPTH_EXCEEDED) != 0;
    // The kernel's match stands unless the caller's string climbs with `..`, which only the
    // normalized path can settle.
    let kernel_watch = (open.watch_id != 0 && !has_dotdot(&open.user))
        .then(|| watches.by_id(open.watch_id))
        .flatten();
    let watch = match kernel_watch {
        Some(w) => Some(w.display()),
        None => match watches.containing(&path) {
            Some(w) => Some(w.display()),
            // Too deep to judge anywhere: deliver rather than guess.
            None if open.base.flags & path_flags::DEPTH_EXCEEDED != 0 => None,
            None if open.origin == PathOrigin::File
                && open.base.flags & path_flags::UNDECIDED == 0 =>
            {
                // The kernel matched a watch that has since been removed.
                None
            }
            None => return None,
        },
    };
    let flags = open.flags;
    let acc = flags & O_ACCMODE;
    let syscall = match open.syscall {
        KOpenSyscall::Open => pb::OpenSyscall::Open,
        KOpenSyscall::Openat => pb::OpenSyscall::Openat,
        KOpenSyscall::Openat2 => pb::OpenSyscall::Openat2,
        KOpenSyscall::Creat => pb::OpenSyscall::Creat,
        KOpenSyscall::IoUringOpenat => pb::OpenSyscall::IoUringOpenat,
        KOpenSyscall::IoUringOpenat2 => pb::OpenSyscall::IoUringOpenat2,
    };
    let creates = flags & O_CREAT != 0 || flags & O_TMPFILE == O_TMPFILE;
    Some(pb::Open {
        path: escape_bytes(&path),
        path_source: source as i32,
        syscall: syscall as i32,
        flags,
        read: acc == 0 || acc == O_RDWR,
        write: acc == O_WRONLY || acc == O_RDWR || flags & O_TRUNC != 0,
        create: creates,
        truncate: flags & O_TRUNC != 0,
        mode: if creates { open.mode } else { 0 },
        outcome: Some(outcome(open.ret)),
        watch: watch.unwrap_or_default(),
        path_truncated: truncated,
        requested: if open.origin == PathOrigin::File {
            String::new()
        } else {
            escape_bytes(&open.user)
        },
        inode: open.ino,
        device: if open.dev != 0 {
            format!("{}:{}", open.dev >> 20, open.dev & 0xfffff)
        } else {
            String::new()
        },
        compat: open.compat,
    })
}

/// An address of a socket as text: 4 bytes for IPv4, 16 for IPv6.
fn ip_text(family: u16, a: &[u8; 16]) -> String {
    if family == AF_INET {
        Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string()
    } else {
        Ipv6Addr::from(*a).to_string()
    }
}

fn socket_type(sock_type: u16) -> String {
    match sock_type {
        1 => "stream",
        2 => "dgram",
        3 => "raw",
        5 => "seqpacket",
        _ => "",
    }
    .to_owned()
}

fn accept_event(a: &Accept) -> pb::Accept {
    pb::Accept {
        family: if a.family == AF_INET {
            pb::AddressFamily::Inet
        } else {
            pb::AddressFamily::Inet6
        } as i32,
        remote_address: ip_text(a.family, &a.raddr),
        remote_port: u32::from(a.rport),
        local_address: ip_text(a.family, &a.laddr),
        local_port: u32::from(a.lport),
        fd: a.fd,
        socket_type: socket_type(a.sock_type),
        syscall: match a.syscall {
            AcceptSyscall::Accept => "accept",
            AcceptSyscall::Accept4 => "accept4",
            AcceptSyscall::Socketcall => "socketcall",
        }
        .to_owned(),
        compat: a.compat,
    }
}

fn connect_event(c: &Connect) -> pb::Connect {
    let (family, address, local) = match c.family {
        AF_INET | AF_INET6 => (
            if c.family == AF_INET {
                pb::AddressFamily::Inet
            } else {
                pb::AddressFamily::Inet6
            },
            ip_text(c.family, &c.daddr),
            ip_text(c.family, &c.laddr),
        ),
        AF_UNIX => (pb::AddressFamily::Unix, String::new(), String::new()),
        _ => (pb::AddressFamily::Unspecified, String::new(), String::new()),
    };
    let from_socket = c.origin == AddrOrigin::Socket;
    let unix_path = if c.family == AF_UNIX {
        if c.flags & connect_flags::UNIX_ABSTRACT != 0 {
            format!(
                "@{}",
                escape_bytes(c.unix_path.get(1..).unwrap_or_default())
            )
        } else {
            escape_bytes(&c.unix_path)
        }
    } else {
        String::new()
    };
    pb::Connect {
        family: family as i32,
        address,
        port: u32::from(c.dport),
        unix_path,
        local_address: if from_socket { local } else { String::new() },
        local_port: if from_socket { u32::from(c.lport) } else { 0 },
        in_progress: c.ret == -EINPROGRESS,
        outcome: Some(outcome(c.ret)),
        address_source: if from_socket {
            pb::AddressSource::Socket
        } else {
            pb::AddressSource::Argument
        } as i32,
        fd: c.fd,
        socket_type: socket_type(c.sock_type),
        compat: c.compat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_decode() {
        let e = |code| Exit {
            subject: Subject {
                ktime_ns: 0,
                tgid: 1,
                pid: 1,
                uid: 0,
                gid: 0,
                euid: 0,
                egid: 0,
                loginuid: None,
                sessionid: None,
                cgroup_id: 0,
                comm: vec![],
            },
            exit_code: code,
            start_ns: 0,
        };
        let normal = exit_event(&e(3 << 8));
        assert_eq!((normal.status, normal.signal), (Some(3), None));
        let killed = exit_event(&e(9));
        assert_eq!((killed.status, killed.signal), (None, Some(9)));
        assert!(exit_event(&e(11 | 0x80)).core_dumped);
    }

    #[test]
    fn outcomes_name_errors() {
        let o = outcome(-13);
        assert!(!o.success);
        assert_eq!(o.errno, "EACCES");
        assert!(outcome(3).success);
    }

    #[test]
    fn dotdot_detection() {
        assert!(has_dotdot(b"../x"));
        assert!(has_dotdot(b"/a/../b"));
        assert!(!has_dotdot(b"/a/..b/c"));
    }
}
