//! Decoding of raw ring-buffer bytes into typed events, with size checks at every step.
//! Nothing here trusts the kernel's byte counts without checking them against the buffer.

use crate::event::{
    AcceptEvent, AcceptSyscall, AddrOrigin, ChdirEvent, ConnectEvent, ConnectSyscall, EventHeader,
    EventKind, ExecEvent, ExitEvent, ForkEvent, OpenEvent, OpenSyscall, PathOrigin, connect_flags,
    path_flags,
};

/// Why a ring-buffer item could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {have} bytes is shorter than the {need} bytes its kind needs")]
    NotEnoughBytes { need: usize, have: usize },
    #[error("event header says {declared} bytes but the ring buffer item has {actual}")]
    SizeMismatch { declared: usize, actual: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("event field {field} has invalid value {value}")]
    BadField { field: &'static str, value: u64 },
}

/// Reads a plain-old-data struct from the start of `bytes`.
///
/// Only used with the `#[repr(C)]` integer-only event types of this crate, for which every bit
/// pattern is valid.
fn read_pod<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::NotEnoughBytes {
            need,
            have: bytes.len(),
        });
    }
    // SAFETY: length checked above; `T` is one of this crate's integer-only `#[repr(C)]`
    // types (all bit patterns valid) and `read_unaligned` has no alignment requirement.
    Ok(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A path built by the kernel, already put root first.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct KernelPath {
    /// Absolute path bytes (`/` for the root).
    pub bytes: Vec<u8>,
    /// [`path_flags`] bits.
    pub flags: u16,
}

impl KernelPath {
    /// Turns the kernel's leaf-first encoding (`"file/dir/"`) into `"/dir/file"`.
    pub fn from_leaf_first(raw: &[u8], flags: u16) -> Self {
        let mut bytes = Vec::with_capacity(raw.len() + 1);
        for component in raw.split(|b| *b == b'/').filter(|c| !c.is_empty()).rev() {
            bytes.push(b'/');
            bytes.extend_from_slice(component);
        }
        if bytes.is_empty() {
            bytes.push(b'/');
        }
        Self { bytes, flags }
    }

    pub fn truncated(&self) -> bool {
        self.flags & (path_flags::TRUNCATED | path_flags::DEPTH_EXCEEDED) != 0
    }
}

/// Fields common to every event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    pub ktime_ns: u64,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub euid: u32,
    pub egid: u32,
    /// `None` when unset (`(uid_t)-1`).
    pub loginuid: Option<u32>,
    /// `None` when unset.
    pub sessionid: Option<u32>,
    pub cgroup_id: u64,
    pub comm: Vec<u8>,
}

impl From<&EventHeader> for Subject {
    fn from(h: &EventHeader) -> Self {
        let comm_len = h.comm.iter().position(|b| *b == 0).unwrap_or(h.comm.len());
        let unset = |v: u32| (v != u32::MAX).then_some(v);
        Subject {
            ktime_ns: h.ktime_ns,
            tgid: h.tgid,
            pid: h.pid,
            uid: h.uid,
            gid: h.gid,
            euid: h.euid,
            egid: h.egid,
            loginuid: unset(h.loginuid),
            sessionid: unset(h.sessionid),
            cgroup_id: h.cgroup_id,
            comm: h.comm[..comm_len].to_vec(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exec {
    pub subject: Subject,
    pub ppid: u32,
    pub old_pid: u32,
    pub start_ns: u64,
    /// Resolved path of the executed file.
    pub exe: KernelPath,
    /// The file name given to execve.
    pub filename: Vec<u8>,
    pub filename_truncated: bool,
    pub argv: Vec<Vec<u8>>,
    pub argv_truncated: bool,
    pub argv_read_failed: bool,
    /// Size of the whole argument area in the process.
    pub argv_total: u32,
    pub env: Vec<Vec<u8>>,
    pub env_truncated: bool,
    pub env_total: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chdir {
    pub subject: Subject,
    /// The new working directory, resolved.
    pub cwd: KernelPath,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fork {
    pub subject: Subject,
    pub child_tgid: u32,
    pub parent_tgid: u32,
    pub child_start_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub subject: Subject,
    pub exit_code: u32,
    pub start_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub subject: Subject,
    pub ret: i64,
    pub flags: u32,
    pub mode: u32,
    pub dirfd: i32,
    pub watch_id: u32,
    pub ino: u64,
    pub dev: u32,
    pub syscall: OpenSyscall,
    pub origin: PathOrigin,
    /// Resolved path: of the file (success) or of the base directory (relative failure).
    pub base: KernelPath,
    /// The caller's string (failed opens).
    pub user: Vec<u8>,
    pub user_flags: u16,
    pub compat: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub subject: Subject,
    pub ret: i64,
    pub fd: i32,
    pub addrlen: u32,
    pub family: u16,
    pub dport: u16,
    pub lport: u16,
    pub sock_type: u16,
    pub protocol: u16,
    pub daddr: [u8; 16],
    pub laddr: [u8; 16],
    pub unix_path: Vec<u8>,
    pub flags: u16,
    pub syscall: ConnectSyscall,
    pub origin: AddrOrigin,
    pub compat: bool,
}

/// An inbound connection accepted on a watched local port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    pub subject: Subject,
    pub fd: i32,
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub sock_type: u16,
    pub protocol: u16,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    pub syscall: AcceptSyscall,
    pub compat: bool,
}

/// A decoded kernel event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Exec(Exec),
    Fork(Fork),
    Exit(Exit),
    Open(Open),
    Connect(Connect),
    Chdir(Chdir),
    Accept(Accept),
}

impl KernelEvent {
    pub fn subject(&self) -> &Subject {
        match self {
            KernelEvent::Exec(e) => &e.subject,
            KernelEvent::Fork(e) => &e.subject,
            KernelEvent::Exit(e) => &e.subject,
            KernelEvent::Open(e) => &e.subject,
            KernelEvent::Connect(e) => &e.subject,
            KernelEvent::Chdir(e) => &e.subject,
            KernelEvent::Accept(e) => &e.subject,
        }
    }
}

/// Splits `len` bytes off the front of `tail`.
fn take<'a>(tail: &mut &'a [u8], len: usize) -> Result<&'a [u8], DecodeError> {
    if tail.len() < len {
        return Err(DecodeError::NotEnoughBytes {
            need: len,
            have: tail.len(),
        });
    }
    let (head, rest) = tail.split_at(len);
    *tail = rest;
    Ok(head)
}

fn body_and_tail<B: Copy>(bytes: &[u8]) -> Result<(B, &[u8]), DecodeError> {
    let off = size_of::<EventHeader>();
    let body = read_pod::<B>(&bytes[off..])?;
    Ok((body, &bytes[off + size_of::<B>()..]))
}

/// Splits a NUL-separated argument area into arguments. A trailing argument without NUL (cut
/// by truncation) is kept.
fn split_args(area: &[u8]) -> Vec<Vec<u8>> {
    let area = area.strip_suffix(&[0]).unwrap_or(area);
    if area.is_empty() {
        return Vec::new();
    }
    area.split(|b| *b == 0).map(<[u8]>::to_vec).collect()
}

/// Cuts a byte string at its first NUL.
fn until_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// Decodes one ring-buffer item.
pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    let header = read_pod::<EventHeader>(bytes)?;
    let declared = header.len as usize;
    if declared != bytes.len() {
        return Err(DecodeError::SizeMismatch {
            declared,
            actual: bytes.len(),
        });
    }
    let kind = EventKind::try_from(header.kind).map_err(DecodeError::UnknownKind)?;
    let subject = Subject::from(&header);
    Ok(match kind {
        EventKind::Exec => {
            let (b, mut tail) = body_and_tail::<ExecEvent>(bytes)?;
            let exe = take(&mut tail, usize::from(b.exe_len))?;
            let filename = take(&mut tail, usize::from(b.filename_len))?;
            let argv = take(&mut tail, usize::from(b.argv_len))?;
            let env = take(&mut tail, usize::from(b.env_len))?;
            use crate::event::exec_flags as f;
            KernelEvent::Exec(Exec {
                subject,
                ppid: b.ppid,
                old_pid: b.old_pid,
                start_ns: b.start_ns,
                exe: KernelPath::from_leaf_first(exe, b.exe_flags),
                filename: until_nul(filename).to_vec(),
                filename_truncated: b.flags & f::FILENAME_TRUNCATED != 0,
                // After a failed read the bytes are zeros kept for their length.
                argv: if b.flags & f::ARGV_READ_FAILED != 0 {
                    Vec::new()
                } else {
                    split_args(argv)
                },
                argv_truncated: b.flags & f::ARGV_TRUNCATED != 0,
                argv_read_failed: b.flags & f::ARGV_READ_FAILED != 0,
                argv_total: b.argv_total,
                env: if b.flags & f::ENV_READ_FAILED != 0 {
                    Vec::new()
                } else {
                    split_args(env)
                },
                env_truncated: b.flags & (f::ENV_TRUNCATED | f::ENV_READ_FAILED) != 0,
                env_total: b.env_total,
            })
        }
        EventKind::Fork => {
            let (b, _) = body_and_tail::<ForkEvent>(bytes)?;
            KernelEvent::Fork(Fork {
                subject,
                child_tgid: b.child_tgid,
                parent_tgid: b.parent_tgid,
                child_start_ns: b.child_start_ns,
            })
        }
        EventKind::Exit => {
            let (b, _) = body_and_tail::<ExitEvent>(bytes)?;
            KernelEvent::Exit(Exit {
                subject,
                exit_code: b.exit_code,
                start_ns: b.start_ns,
            })
        }
        EventKind::Open => {
            let (b, mut tail) = body_and_tail::<OpenEvent>(bytes)?;
            let syscall = OpenSyscall::try_from(b.syscall).map_err(|v| DecodeError::BadField {
                field: "open.syscall",
                value: v.into(),
            })?;
            let origin = PathOrigin::try_from(b.origin).map_err(|v| DecodeError::BadField {
                field: "open.origin",
                value: v.into(),
            })?;
            let base = take(&mut tail, usize::from(b.base_len))?;
            let user = take(&mut tail, usize::from(b.user_len))?;
            KernelEvent::Open(Open {
                subject,
                ret: b.ret,
                flags: b.flags,
                mode: b.mode,
                dirfd: b.dirfd,
                watch_id: b.watch_id,
                ino: b.ino,
                dev: b.dev,
                syscall,
                origin,
                base: KernelPath::from_leaf_first(base, b.path_flags),
                user: until_nul(user).to_vec(),
                user_flags: b.user_flags,
                compat: b.compat != 0,
            })
        }
        EventKind::Chdir => {
            let (b, mut tail) = body_and_tail::<ChdirEvent>(bytes)?;
            let path = take(&mut tail, usize::from(b.path_len))?;
            KernelEvent::Chdir(Chdir {
                subject,
                cwd: KernelPath::from_leaf_first(path, b.path_flags),
            })
        }
        EventKind::Accept => {
            let (b, _) = body_and_tail::<AcceptEvent>(bytes)?;
            let syscall =
                AcceptSyscall::try_from(b.syscall).map_err(|v| DecodeError::BadField {
                    field: "accept.syscall",
                    value: v.into(),
                })?;
            KernelEvent::Accept(Accept {
                subject,
                fd: b.fd,
                family: b.family,
                lport: b.lport,
                rport: b.rport,
                sock_type: b.sock_type,
                protocol: b.protocol,
                laddr: b.laddr,
                raddr: b.raddr,
                syscall,
                compat: b.compat != 0,
            })
        }
        EventKind::Connect => {
            let (b, _) = body_and_tail::<ConnectEvent>(bytes)?;
            let syscall = match b.syscall {
                1 => ConnectSyscall::Connect,
                2 => ConnectSyscall::Socketcall,
                v => {
                    return Err(DecodeError::BadField {
                        field: "connect.syscall",
                        value: v.into(),
                    });
                }
            };
            let origin = match b.origin {
                1 => AddrOrigin::Socket,
                2 => AddrOrigin::Argument,
                v => {
                    return Err(DecodeError::BadField {
                        field: "connect.origin",
                        value: v.into(),
                    });
                }
            };
            let mut unix_len = usize::from(b.unix_len).min(b.unix_path.len());
            if b.flags & connect_flags::UNIX_ABSTRACT == 0 {
                // A pathname socket's name ends at its first NUL (the kernel side copies
                // addrlen bytes).
                if let Some(nul) = b.unix_path[..unix_len].iter().position(|&c| c == 0) {
                    unix_len = nul;
                }
            }
            KernelEvent::Connect(Connect {
                subject,
                ret: b.ret,
                fd: b.fd,
                addrlen: b.addrlen,
                family: b.family,
                dport: b.dport,
                lport: b.lport,
                sock_type: b.sock_type,
                protocol: b.protocol,
                daddr: b.daddr,
                laddr: b.laddr,
                unix_path: b.unix_path[..unix_len].to_vec(),
                flags: b.flags,
                syscall,
                origin,
                compat: b.compat != 0,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: EventKind, len: usize) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            len: len as u32,
            ktime_ns: 7,
            tgid: 10,
            pid: 11,
            uid: 1000,
            gid: 1000,
            euid: 0,
            egid: 0,
            loginuid: u32::MAX,
            sessionid: 3,
            cgroup_id: 99,
            comm: *b"cat\0\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: test-only view of an integer-only repr(C) value.
        unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn open_event(base: &[u8], user: &[u8]) -> Vec<u8> {
        let len = size_of::<EventHeader>() + size_of::<OpenEvent>() + base.len() + user.len();
        let body = OpenEvent {
            ret: -2,
            flags: 0o1101,
            mode: 0o644,
            dirfd: -100,
            watch_id: 0,
            ino: 0,
            dev: 0,
            syscall: OpenSyscall::Openat as u8,
            origin: PathOrigin::Relative as u8,
            path_flags: 0,
            base_len: base.len() as u16,
            user_len: user.len() as u16,
            user_flags: 0,
            compat: 0,
            _pad: 0,
        };
        let mut out = bytes_of(&header(EventKind::Open, len));
        out.extend(bytes_of(&body));
        out.extend_from_slice(base);
        out.extend_from_slice(user);
        out
    }

    #[test]
    fn decodes_open_with_tail() {
        let raw = open_event(b"phi/data/", b"missing.txt\0");
        let KernelEvent::Open(open) = decode(&raw).expect("decodes") else {
            panic!("not an open event")
        };
        assert_eq!(open.base.bytes, b"/data/phi");
        assert_eq!(open.user, b"missing.txt");
        assert_eq!(open.ret, -2);
        assert_eq!(open.origin, PathOrigin::Relative);
        assert_eq!(
            open.subject.loginuid, None,
            "unset login uid decodes as None"
        );
        assert_eq!(open.subject.sessionid, Some(3));
        assert_eq!(open.subject.comm, b"cat");
    }

    #[test]
    fn rejects_length_mismatch_and_short_tail() {
        let mut raw = open_event(b"a/", b"");
        raw.push(0);
        assert!(matches!(
            decode(&raw),
            Err(DecodeError::SizeMismatch { .. })
        ));
        // Header claims a longer tail than the event holds.
        let mut raw = open_event(b"a/", b"");
        let off = size_of::<EventHeader>() + core::mem::offset_of!(OpenEvent, base_len);
        raw[off] = 200;
        assert!(matches!(
            decode(&raw),
            Err(DecodeError::NotEnoughBytes { .. })
        ));
    }

    #[test]
    fn rejects_unknown_kind_and_short_buffers() {
        let mut raw = open_event(b"", b"");
        raw[0] = 77;
        assert_eq!(decode(&raw), Err(DecodeError::UnknownKind(77)));
        assert!(matches!(
            decode(&raw[..10]),
            Err(DecodeError::NotEnoughBytes { .. })
        ));
    }

    #[test]
    fn rejects_bad_discriminants() {
        let mut raw = open_event(b"", b"");
        raw[size_of::<EventHeader>() + core::mem::offset_of!(OpenEvent, syscall)] = 9;
        assert_eq!(
            decode(&raw),
            Err(DecodeError::BadField {
                field: "open.syscall",
                value: 9
            })
        );
    }

    #[test]
    fn path_and_args_decoding() {
        assert_eq!(KernelPath::from_leaf_first(b"", 0).bytes, b"/");
        assert_eq!(KernelPath::from_leaf_first(b"c/b/a/", 0).bytes, b"/a/b/c");
        assert_eq!(
            split_args(b"ls\0-l\0/tmp\0"),
            vec![b"ls".to_vec(), b"-l".to_vec(), b"/tmp".to_vec()]
        );
        assert_eq!(
            split_args(b"ls\0-l\0/tm"),
            vec![b"ls".to_vec(), b"-l".to_vec(), b"/tm".to_vec()]
        );
        assert_eq!(
            split_args(b"a\0\0b\0"),
            vec![b"a".to_vec(), b"".to_vec(), b"b".to_vec()]
        );
        assert!(split_args(b"").is_empty());
    }

    fn unix_connect(name: &[u8], flags: u16) -> Vec<u8> {
        let mut unix_path = [0u8; crate::limits::UNIX_PATH_MAX];
        unix_path[..name.len()].copy_from_slice(name);
        let body = ConnectEvent {
            ret: 0,
            fd: 3,
            addrlen: (name.len() + 2) as u32,
            family: 1,
            dport: 0,
            lport: 0,
            sock_type: 1,
            daddr: [0; 16],
            laddr: [0; 16],
            unix_path,
            unix_len: name.len() as u16,
            flags,
            protocol: 0,
            syscall: ConnectSyscall::Connect as u8,
            origin: AddrOrigin::Argument as u8,
            compat: 0,
            _pad: [0; 3],
        };
        let len = size_of::<EventHeader>() + size_of::<ConnectEvent>();
        let mut out = bytes_of(&header(EventKind::Connect, len));
        out.extend(bytes_of(&body));
        out
    }

    fn accept(syscall: u8) -> Vec<u8> {
        let mut raddr = [0u8; 16];
        raddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        let body = AcceptEvent {
            fd: 7,
            family: 2,
            lport: 5432,
            rport: 40000,
            sock_type: 1,
            protocol: 6,
            syscall,
            compat: 0,
            laddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            raddr,
        };
        let len = size_of::<EventHeader>() + size_of::<AcceptEvent>();
        let mut out = bytes_of(&header(EventKind::Accept, len));
        out.extend(bytes_of(&body));
        out
    }

    #[test]
    fn accepts_decode_and_a_bad_call_number_is_refused() {
        let KernelEvent::Accept(a) = decode(&accept(AcceptSyscall::Accept4 as u8)).expect("ok")
        else {
            panic!("not an accept event")
        };
        assert_eq!((a.fd, a.family, a.lport, a.rport), (7, 2, 5432, 40000));
        assert_eq!(&a.raddr[..4], &[10, 1, 2, 3]);
        assert_eq!(a.syscall, AcceptSyscall::Accept4);
        assert_eq!(a.subject.tgid, 10);
        assert!(matches!(
            decode(&accept(9)),
            Err(DecodeError::BadField {
                field: "accept.syscall",
                value: 9
            })
        ));
        // A body cut short is an error, not a partial event.
        let mut short = accept(1);
        short.truncate(short.len() - 8);
        let len = short.len() as u32;
        short[4..8].copy_from_slice(&len.to_ne_bytes());
        assert!(decode(&short).is_err());
    }

    #[test]
    fn unix_names_end_at_nul_unless_abstract() {
        // The kernel side copies addrlen bytes; a pathname ends at its first NUL.
        let KernelEvent::Connect(c) =
            decode(&unix_connect(b"/run/db.sock\0junk", 0)).expect("decodes")
        else {
            panic!("not a connect event")
        };
        assert_eq!(c.unix_path, b"/run/db.sock");
        // An abstract name keeps every byte, NULs included.
        let raw = unix_connect(b"\0phi\0x", connect_flags::UNIX_ABSTRACT);
        let KernelEvent::Connect(c) = decode(&raw).expect("decodes") else {
            panic!("not a connect event")
        };
        assert_eq!(c.unix_path, b"\0phi\0x");
    }

    #[test]
    fn failed_argument_reads_leave_no_arguments() {
        use crate::event::exec_flags;
        let exec = |flags: u16| {
            let (argv, env) = (b"ls\0-l\0".as_slice(), [0u8; 4]);
            let body = ExecEvent {
                ppid: 1,
                old_pid: 10,
                start_ns: 5,
                argv_total: argv.len() as u32,
                env_total: 4,
                exe_len: 0,
                exe_flags: 0,
                filename_len: 0,
                argv_len: argv.len() as u16,
                env_len: 4,
                flags,
                _pad: 0,
            };
            let len = size_of::<EventHeader>() + size_of::<ExecEvent>() + argv.len() + 4;
            let mut out = bytes_of(&header(EventKind::Exec, len));
            out.extend(bytes_of(&body));
            out.extend_from_slice(argv);
            out.extend_from_slice(&env);
            let KernelEvent::Exec(e) = decode(&out).expect("decodes") else {
                panic!("not an exec event")
            };
            e
        };
        let ok = exec(0);
        assert_eq!(ok.argv, vec![b"ls".to_vec(), b"-l".to_vec()]);
        assert!(!ok.argv_read_failed);
        // After a failed read the area holds zeros for its length: no arguments, flagged.
        let failed = exec(exec_flags::ARGV_READ_FAILED | exec_flags::ENV_READ_FAILED);
        assert!(failed.argv.is_empty() && failed.argv_read_failed);
        assert!(failed.env.is_empty() && failed.env_truncated);
    }
}
