//! Events the kernel programs write to the ring buffer.
//!
//! Every event starts with an [`EventHeader`]; the header's `kind` says which fixed-size body
//! follows, and `len` gives the total size including the variable-length tail (paths, argv).
//! Paths are written by the kernel leaf first: each component followed by `/`
//! (`"file/dir/data/"` for `/data/dir/file`); the decoder reverses them.

use crate::limits::{COMM_LEN, UNIX_PATH_MAX};

/// What an event is. Decoded from the header's `kind` with `TryFrom<u32>`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Exec = 1,
    Fork = 2,
    Exit = 3,
    Open = 4,
    Connect = 5,
    Chdir = 6,
    Accept = 7,
}

impl TryFrom<u32> for EventKind {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        Ok(match v {
            1 => EventKind::Exec,
            2 => EventKind::Fork,
            3 => EventKind::Exit,
            4 => EventKind::Open,
            5 => EventKind::Connect,
            6 => EventKind::Chdir,
            7 => EventKind::Accept,
            other => return Err(other),
        })
    }
}

/// Common header: who did it and when.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// [`EventKind`] as an integer.
    pub kind: u32,
    /// Total size of the event in bytes, header and tail included.
    pub len: u32,
    /// `CLOCK_BOOTTIME` in nanoseconds.
    pub ktime_ns: u64,
    /// Process id (thread group id).
    pub tgid: u32,
    /// Thread id.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub euid: u32,
    pub egid: u32,
    /// Audit login uid; `u32::MAX` when unset.
    pub loginuid: u32,
    /// Audit session id; `u32::MAX` when unset.
    pub sessionid: u32,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}

/// Which system call opened the file.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenSyscall {
    Open = 1,
    Openat = 2,
    Openat2 = 3,
    Creat = 4,
    /// `IORING_OP_OPENAT` completed by an io_uring (no system call of its own).
    IoUringOpenat = 5,
    /// `IORING_OP_OPENAT2` completed by an io_uring.
    IoUringOpenat2 = 6,
}

impl TryFrom<u8> for OpenSyscall {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        Ok(match v {
            1 => OpenSyscall::Open,
            2 => OpenSyscall::Openat,
            3 => OpenSyscall::Openat2,
            4 => OpenSyscall::Creat,
            5 => OpenSyscall::IoUringOpenat,
            6 => OpenSyscall::IoUringOpenat2,
            other => return Err(other),
        })
    }
}

/// Where the path of an open event came from.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathOrigin {
    /// Rebuilt from the opened `struct file` (successful open): resolved, absolute.
    File = 1,
    /// Failed open: the caller's string, absolute as given.
    Absolute = 2,
    /// Failed open: the caller's relative string plus the resolved path of the directory it
    /// is relative to (dirfd or cwd), carried as the base path.
    Relative = 3,
}

impl TryFrom<u8> for PathOrigin {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        Ok(match v {
            1 => PathOrigin::File,
            2 => PathOrigin::Absolute,
            3 => PathOrigin::Relative,
            other => return Err(other),
        })
    }
}

/// Flags on a kernel-built path or string (`*_flags` fields).
pub mod path_flags {
    /// The string did not fit its bound and was cut.
    pub const TRUNCATED: u16 = 1 << 0;
    /// The directory walk hit `PATH_DEPTH_MAX` before the root.
    pub const DEPTH_EXCEEDED: u16 = 1 << 1;
    /// A memory read failed; the value is incomplete or empty.
    pub const READ_FAILED: u16 = 1 << 2;
    /// Set by the kernel when it could not decide whether a failed open is under a watched
    /// tree (the string contains `..`); user space decides after normalizing.
    pub const UNDECIDED: u16 = 1 << 3;
}

/// Body of an [`EventKind::Open`] event. Tail: `base_len` bytes of the resolved path (leaf
/// first), then `user_len` bytes of the caller's string (failed opens only).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OpenEvent {
    /// New file descriptor, or `-errno`.
    pub ret: i64,
    /// Open flags as requested (`O_*`).
    pub flags: u32,
    /// Mode as requested (only meaningful with `O_CREAT`/`O_TMPFILE` and `creat`).
    pub mode: u32,
    /// Directory fd argument (`AT_FDCWD` = -100 for calls without one).
    pub dirfd: i32,
    /// Id of the watched tree that matched, 0 when the kernel left the decision to user space.
    pub watch_id: u32,
    /// Inode of the opened file (successful opens).
    pub ino: u64,
    /// Kernel device number of the opened file's superblock (successful opens).
    pub dev: u32,
    /// [`OpenSyscall`].
    pub syscall: u8,
    /// [`PathOrigin`].
    pub origin: u8,
    /// [`path_flags`] of the resolved path.
    pub path_flags: u16,
    /// Bytes of resolved path in the tail.
    pub base_len: u16,
    /// Bytes of the caller's string in the tail.
    pub user_len: u16,
    /// [`path_flags`] of the caller's string.
    pub user_flags: u16,
    /// 1 when the call came through the 32-bit compat entry.
    pub compat: u8,
    pub _pad: u8,
}

/// Flags of an exec event.
pub mod exec_flags {
    /// The argument area was longer than `ARGV_MAX`; argv was cut.
    pub const ARGV_TRUNCATED: u16 = 1 << 0;
    /// Reading the argument area failed.
    pub const ARGV_READ_FAILED: u16 = 1 << 1;
    /// The file name given to execve was cut.
    pub const FILENAME_TRUNCATED: u16 = 1 << 2;
    /// The environment area was longer than `ENV_MAX`; the environment was cut.
    pub const ENV_TRUNCATED: u16 = 1 << 3;
    /// Reading the environment area failed.
    pub const ENV_READ_FAILED: u16 = 1 << 4;
}

/// Body of an [`EventKind::Exec`] event. Tail: `exe_len` bytes of the executable's resolved
/// path (leaf first), `filename_len` bytes of the name given to execve, `argv_len` bytes of
/// the NUL-separated argument area, `env_len` bytes of the NUL-separated environment. After
/// a failed read (`ARGV_READ_FAILED`, `ENV_READ_FAILED`) that area holds zeros.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    /// Parent process id.
    pub ppid: u32,
    /// Thread id that called execve (differs from `tgid` when a non-leader thread exec'd).
    pub old_pid: u32,
    /// Process start time, `CLOCK_BOOTTIME` ns (with the pid, a unique process identity).
    pub start_ns: u64,
    /// Full size of the argument area (`arg_end - arg_start`).
    pub argv_total: u32,
    /// Full size of the environment area (`env_end - env_start`).
    pub env_total: u32,
    pub exe_len: u16,
    pub exe_flags: u16,
    pub filename_len: u16,
    pub argv_len: u16,
    pub env_len: u16,
    /// [`exec_flags`].
    pub flags: u16,
    pub _pad: u32,
}

/// Body of an [`EventKind::Chdir`] event: the task's new working directory. Tail:
/// `path_len` bytes of the resolved path (leaf first).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ChdirEvent {
    pub path_len: u16,
    /// [`path_flags`].
    pub path_flags: u16,
    pub _pad: u32,
}

/// Body of an [`EventKind::Fork`] event (new processes only, not threads). The header
/// describes the parent.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    pub child_tgid: u32,
    pub parent_tgid: u32,
    pub child_start_ns: u64,
}

/// Body of an [`EventKind::Exit`] event, sent when the last thread of a process exits.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    /// `task->exit_code`: `(status << 8) | signal`.
    pub exit_code: u32,
    pub _pad: u32,
    pub start_ns: u64,
}

/// Which call made the connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectSyscall {
    Connect = 1,
    /// 32-bit `socketcall(SYS_CONNECT, …)`.
    Socketcall = 2,
}

/// Where the addresses of a connect event came from.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrOrigin {
    /// The connected socket in the kernel (established or in progress): trustworthy.
    Socket = 1,
    /// The caller's `sockaddr` argument (failed calls, unix sockets).
    Argument = 2,
}

/// Flags of a connect event.
pub mod connect_flags {
    /// Reading the caller's sockaddr failed.
    pub const ADDR_READ_FAILED: u16 = 1 << 0;
    /// The kernel socket could not be read; addresses come from the argument.
    pub const SOCKET_READ_FAILED: u16 = 1 << 1;
    /// An abstract unix socket (name starts with NUL).
    pub const UNIX_ABSTRACT: u16 = 1 << 2;
}

/// Body of an [`EventKind::Connect`] event (fixed size).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectEvent {
    /// 0, or `-errno` (`-EINPROGRESS` for a non-blocking connect under way).
    pub ret: i64,
    pub fd: i32,
    /// `addrlen` argument.
    pub addrlen: u32,
    /// `AF_*` of the destination.
    pub family: u16,
    /// Destination port (host order).
    pub dport: u16,
    /// Local port (host order) when known.
    pub lport: u16,
    /// `SOCK_*` type when known.
    pub sock_type: u16,
    /// Destination address: 4 bytes for IPv4, 16 for IPv6 (network order).
    pub daddr: [u8; 16],
    /// Local address when known.
    pub laddr: [u8; 16],
    /// Unix socket path (`sun_path`), `unix_len` bytes.
    pub unix_path: [u8; UNIX_PATH_MAX],
    pub unix_len: u16,
    /// [`connect_flags`].
    pub flags: u16,
    /// IP protocol when known.
    pub protocol: u16,
    /// [`ConnectSyscall`].
    pub syscall: u8,
    /// [`AddrOrigin`].
    pub origin: u8,
    pub compat: u8,
    pub _pad: [u8; 3],
}

/// Which call accepted the connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptSyscall {
    Accept = 1,
    Accept4 = 2,
    /// 32-bit `socketcall(SYS_ACCEPT or SYS_ACCEPT4, …)`.
    Socketcall = 3,
}

impl TryFrom<u8> for AcceptSyscall {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        Ok(match v {
            1 => AcceptSyscall::Accept,
            2 => AcceptSyscall::Accept4,
            3 => AcceptSyscall::Socketcall,
            other => return Err(other),
        })
    }
}

/// Body of an [`EventKind::Accept`] event (fixed size): an inbound IPv4 or IPv6 connection
/// accepted on a watched local port, as the kernel's new socket has it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AcceptEvent {
    /// The new connection's descriptor.
    pub fd: i32,
    /// `AF_INET` or `AF_INET6` (an IPv6 socket shows IPv4 peers as `::ffff:a.b.c.d`).
    pub family: u16,
    /// Local (listening) port, host order.
    pub lport: u16,
    /// Remote port, host order.
    pub rport: u16,
    /// `SOCK_*` type when known (0 otherwise).
    pub sock_type: u16,
    /// IP protocol when known (0 otherwise).
    pub protocol: u16,
    /// [`AcceptSyscall`].
    pub syscall: u8,
    pub compat: u8,
    /// Local address: 4 bytes for IPv4, 16 for IPv6 (network order).
    pub laddr: [u8; 16],
    /// Remote address, as `laddr`.
    pub raddr: [u8; 16],
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<AcceptEvent>() == 48);
    assert!(offset_of!(AcceptEvent, laddr) == 16);
    assert!(size_of::<EventHeader>() == 72);
    assert!(offset_of!(EventHeader, cgroup_id) == 48);
    assert!(size_of::<OpenEvent>() == 48);
    assert!(size_of::<ExecEvent>() == 40);
    assert!(offset_of!(ExecEvent, _pad) == 36);
    assert!(size_of::<ChdirEvent>() == 8);
    assert!(size_of::<ForkEvent>() == 16);
    assert!(size_of::<ExitEvent>() == 16);
    assert!(size_of::<ConnectEvent>() == 176);
    assert!(offset_of!(ConnectEvent, unix_path) == 56);
    assert!(offset_of!(ConnectEvent, _pad) == 173);
    assert!(size_of::<ConnectEvent>().is_multiple_of(8));
};

/// Offset of the tail (variable part) of an event whose body is `B`.
pub const fn tail_offset<B>() -> usize {
    core::mem::size_of::<EventHeader>() + core::mem::size_of::<B>()
}
