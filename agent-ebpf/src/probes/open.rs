//! The open family (`open`, `openat`, `openat2`, `creat`) at system call exit.
//!
//! A successful open is judged and named from the new file's `struct file` (what was really
//! opened, immune to the caller changing its string afterwards). A failed open has no file:
//! an absolute string is matched against the watched path prefixes, a relative one is judged
//! by the directory it is relative to (dirfd or cwd) and carried with that directory's
//! resolved path.

use agent_common::{
    drops::DropReason,
    event::{EventKind, OpenEvent, OpenSyscall, PathOrigin, path_flags, tail_offset},
    limits::PATH_MAX,
    offsets::features,
};
use aya_ebpf::{macros::map, maps::PerCpuArray};

use crate::{
    emit::{count_drop, fill_header, scratch, submit},
    error::{Error, Result},
    kernel::{
        PathRef, current_task_btf, dentry_ino_dev, fd_file, has, read, read_user, task_number,
    },
    maps::slot,
    path::{NameIn, prefix_lookup, read_str, write_file_path, write_path},
    verdict::{self, Verdict},
};

const AT_FDCWD: i32 = -100;
const EFAULT: i64 = 14;
const O_WRONLY: u32 = 0o1;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;

const TAIL: usize = tail_offset::<OpenEvent>();
const _: () = assert!(TAIL + crate::path::PATH_REGION + PATH_MAX <= crate::maps::CURSOR_OFFSET);
const _: () = assert!(TAIL <= crate::path::TAIL_MAX);

/// Judges a successful open of the current task `task_btf` (a trusted BTF pointer) here,
/// where the kernel allows direct loads, so that a file outside every watched tree costs a
/// few loads and no further call; then normalizes the arguments, parks them in this CPU's
/// `OPEN_CALLS` slot and processes them. Reading them back from the map turns every
/// per-syscall constant into an unknown value, so the verifier checks the path walks once
/// instead of once per system call variant.
///
/// Without direct loads (before 6.2) the subprogram judges the file: there, the reads
/// through `bpf_probe_read_kernel` need buffers on the stack, and this program's frame, the
/// subprogram's and the path walk's together must stay within the kernel's 512 bytes.
#[inline(always)]
pub fn handle(
    task_btf: u64,
    ret: i64,
    syscall: OpenSyscall,
    a: [u64; 4],
    compat: bool,
) -> Result<()> {
    let judged = if ret >= 0 && has(features::DIRECT_LOADS) {
        let path = PathRef::of_file(fd_file(task_btf, ret)?)?;
        let Some(judged) = recorded(path)? else {
            return Ok(());
        };
        judged
    } else {
        Recorded::NOT_JUDGED
    };
    let (dirfd, user_path, flags, mode) = match syscall {
        OpenSyscall::Open => (AT_FDCWD, a[0], a[1] as u32, a[2] as u32),
        OpenSyscall::Creat => (AT_FDCWD, a[0], O_CREAT | O_WRONLY | O_TRUNC, a[1] as u32),
        OpenSyscall::Openat => (a[0] as i32, a[1], a[2] as u32, a[3] as u32),
        OpenSyscall::Openat2 => {
            // struct open_how { u64 flags; u64 mode; u64 resolve; }
            let how = read_user::<[u64; 2]>(a[2]).unwrap_or([0, 0]);
            (a[0] as i32, a[1], how[0] as u32, how[1] as u32)
        }
        // Not system calls (see `handle_ring`).
        OpenSyscall::IoUringOpenat | OpenSyscall::IoUringOpenat2 => return Ok(()),
    };
    process(Call {
        task: task_number(task_btf),
        ret,
        dentry: judged.path.dentry,
        vfsmnt: judged.path.vfsmnt,
        parent: judged.parent,
        watch_id: judged.watch_id,
        path_flags: u32::from(judged.flags),
        user_path,
        name_in: NameIn::User as u32,
        dirfd,
        flags,
        mode,
        syscall: syscall as u32,
        compat: u32::from(compat),
    })
}

/// Parks `call` in this CPU's `OPEN_CALLS` slot and processes it (see `handle`). Callers
/// hold the `SYSCALL_BUSY` claim.
#[inline(always)]
fn process(call: Call) -> Result<()> {
    let slot = OPEN_CALLS.get_ptr_mut(0).ok_or(Error::Scratch)?;
    // SAFETY: this CPU's slot; the claim keeps every other program off it.
    unsafe { *slot = call };
    match phi_open_process() {
        0 => Ok(()),
        code => Err(Error::from_code(code)),
    }
}

/// An open request an io_uring completed (see `io_uring`): its arguments and result.
pub struct RingOpen {
    /// The completion's result: the new descriptor, or 0 / the chosen number for a direct
    /// descriptor, or a negative error.
    pub ret: i64,
    pub syscall: OpenSyscall,
    pub dirfd: i32,
    pub flags: u32,
    pub mode: u32,
}

/// Judges `file` (the `struct file` an io_uring opened for the current task `task_btf`, a
/// trusted BTF pointer) and records it as `handle` does a successful open system call's.
#[inline(always)]
pub fn handle_ring(task_btf: u64, file: u64, open: &RingOpen) -> Result<()> {
    let Some(judged) = recorded(PathRef::of_file(file)?)? else {
        return Ok(());
    };
    process(open.call(task_btf, &judged, 0, NameIn::User))
}

/// Judges and records an open request of the current task `task_btf` that an io_uring failed,
/// as `handle` does a failed open system call's; `name` is the address of the name it was
/// given, kept in kernel memory since its submission.
#[inline(always)]
pub fn handle_ring_failed(task_btf: u64, name: u64, open: &RingOpen) -> Result<()> {
    process(open.call(task_btf, &Recorded::NOT_JUDGED, name, NameIn::Kernel))
}

impl RingOpen {
    /// The request as a parked call: its file as judged, and its name where it is known.
    #[inline(always)]
    fn call(&self, task_btf: u64, judged: &Recorded, name: u64, name_in: NameIn) -> Call {
        Call {
            task: task_number(task_btf),
            ret: self.ret,
            dentry: judged.path.dentry,
            vfsmnt: judged.path.vfsmnt,
            parent: judged.parent,
            watch_id: judged.watch_id,
            path_flags: u32::from(judged.flags),
            user_path: name,
            name_in: name_in as u32,
            dirfd: self.dirfd,
            flags: self.flags,
            mode: self.mode,
            syscall: self.syscall as u32,
            compat: 0,
        }
    }
}

/// A global subprogram (verified once per program, not once per caller): returns 0 or the
/// `Error` as an integer (the kernel rejects the BTF of Rust enums in subprogram signatures).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn phi_open_process() -> u32 {
    let Some(slot) = OPEN_CALLS.get_ptr(0) else {
        return Error::Scratch as u32;
    };
    // SAFETY: this CPU's slot, written just before.
    let call = unsafe { &*slot };
    let result = if call.ret >= 0 {
        opened(call)
    } else {
        failed(call, call.user_path)
    };
    match result {
        Ok(()) => 0,
        Err(e) => e as u32,
    }
}

/// One open call, as parked in `OPEN_CALLS`.
#[repr(C)]
pub struct Call {
    task: u64,
    ret: i64,
    /// A successful open's file (`f_path`), already judged to be recorded; 0 when not
    /// judged yet.
    dentry: u64,
    vfsmnt: u64,
    /// Its parent dentry (itself at the root of its filesystem).
    parent: u64,
    /// Its verdict: the watch id, and `path_flags::UNDECIDED` when the kernel cannot tell.
    watch_id: u32,
    path_flags: u32,
    /// The name the caller gave, in the memory `name_in` says (a `NameIn`).
    user_path: u64,
    name_in: u32,
    dirfd: i32,
    flags: u32,
    mode: u32,
    syscall: u32,
    compat: u32,
}

#[map]
static OPEN_CALLS: PerCpuArray<Call> = PerCpuArray::with_max_entries(1, 0);

/// Fills the header and the fixed body; the caller adds the tail.
#[inline(always)]
fn start_event(call: &Call, origin: PathOrigin, watch_id: u32) -> Result<*mut u8> {
    let buf = scratch(slot::SYSCALL)?;
    fill_header(buf, EventKind::Open, call.task)?;
    // SAFETY: the scratch slot holds the header plus this body.
    unsafe {
        let body = buf.add(tail_offset::<()>()).cast::<OpenEvent>();
        (*body).ret = call.ret;
        (*body).flags = call.flags;
        (*body).mode = call.mode;
        (*body).dirfd = call.dirfd;
        (*body).watch_id = watch_id;
        (*body).ino = 0;
        (*body).dev = 0;
        (*body).syscall = call.syscall as u8;
        (*body).origin = origin as u8;
        (*body).path_flags = 0;
        (*body).base_len = 0;
        (*body).user_len = 0;
        (*body).user_flags = 0;
        (*body).compat = call.compat as u8;
        (*body)._pad = 0;
    }
    Ok(buf)
}

#[inline(always)]
fn body(buf: *mut u8) -> *mut OpenEvent {
    // SAFETY: the body follows the header in the scratch slot.
    unsafe { buf.add(tail_offset::<()>()).cast::<OpenEvent>() }
}

/// Writes the resolved path of `path` (an opened file when `file_parent` holds its parent
/// dentry, else a directory) at the start of the tail; returns its length.
#[inline(always)]
fn put_base(
    buf: *mut u8,
    task: u64,
    path: PathRef,
    extra_flags: u16,
    file_parent: Option<u64>,
) -> Result<usize> {
    let root = PathRef::root_of(task)?;
    // SAFETY: the tail region of the scratch slot is larger than `PATH_REGION`.
    let packed = match file_parent {
        Some(parent) => write_file_path(slot::SYSCALL, TAIL, path, parent, root),
        None => write_path(slot::SYSCALL, TAIL, path, root),
    };
    let len = (packed & 0xffff) as usize;
    let len = if len > PATH_MAX { PATH_MAX } else { len };
    let flags = (packed >> 16) as u16 | extra_flags;
    count_path_flags(flags);
    // SAFETY: see `body`.
    unsafe {
        (*body(buf)).base_len = len as u16;
        (*body(buf)).path_flags = flags;
    }
    Ok(len)
}

#[inline(always)]
fn count_path_flags(flags: u16) {
    if flags & path_flags::TRUNCATED != 0 {
        count_drop(DropReason::Truncated);
    }
    if flags & path_flags::DEPTH_EXCEEDED != 0 {
        count_drop(DropReason::DepthExceeded);
    }
    if flags & path_flags::READ_FAILED != 0 {
        count_drop(DropReason::ReadFailure);
    }
}

/// An opened file that is to be recorded.
struct Recorded {
    path: PathRef,
    /// Its parent dentry, as the verdict read it.
    parent: u64,
    /// Its watch id, 0 with the path flag `UNDECIDED` when the kernel cannot tell and user
    /// space decides.
    watch_id: u32,
    flags: u16,
}

impl Recorded {
    /// No file judged yet: `opened` judges it (kernels without direct loads), or there is
    /// none (a failed open).
    const NOT_JUDGED: Recorded = Recorded {
        path: PathRef {
            dentry: 0,
            vfsmnt: 0,
        },
        parent: 0,
        watch_id: 0,
        flags: 0,
    };
}

/// Whether an opened file is recorded; `None` outside every watched tree.
#[inline(always)]
fn recorded(path: PathRef) -> Result<Option<Recorded>> {
    let (verdict, parent) = verdict::for_file(path)?;
    let (watch_id, flags) = match verdict {
        Verdict::Watched(id) => (id, 0),
        Verdict::Unwatched => return Ok(None),
        Verdict::Undecided => (0, path_flags::UNDECIDED),
    };
    Ok(Some(Recorded {
        path,
        parent,
        watch_id,
        flags,
    }))
}

/// Successful open: judge the new file (unless `handle` did) and name it.
#[inline(always)]
fn opened(call: &Call) -> Result<()> {
    let judged = if call.dentry != 0 {
        Recorded {
            path: PathRef {
                dentry: call.dentry,
                vfsmnt: call.vfsmnt,
            },
            parent: call.parent,
            watch_id: call.watch_id,
            flags: call.path_flags as u16,
        }
    } else {
        let path = PathRef::of_file(fd_file(current_task_btf(), call.ret)?)?;
        let Some(judged) = recorded(path)? else {
            return Ok(());
        };
        judged
    };
    let path = judged.path;
    let buf = start_event(call, PathOrigin::File, judged.watch_id)?;
    if let Ok((ino, dev)) = dentry_ino_dev(path.dentry) {
        // SAFETY: see `body`.
        unsafe {
            (*body(buf)).ino = ino;
            (*body(buf)).dev = dev;
        }
    }
    let len = put_base(buf, call.task, path, judged.flags, Some(judged.parent))?;
    submit(buf, TAIL + len)
}

/// Failed open: decide from the caller's string and the directory it is relative to.
#[inline(always)]
fn failed(call: &Call, user_path: u64) -> Result<()> {
    if call.ret == -EFAULT {
        // Nothing was named, so nothing was attempted on a file.
        return Ok(());
    }
    let from = NameIn::of(call.name_in);
    let first: u8 = match from {
        NameIn::User => read_user(user_path)?,
        NameIn::Kernel => read(user_path, 0)?,
    };
    let (origin, watch_id, base) = if first == b'/' {
        let Some((id, dotdot)) = prefix_lookup(user_path, from) else {
            return Err(Error::Read);
        };
        if id == 0 && !dotdot {
            return Ok(());
        }
        (PathOrigin::Absolute, id, None)
    } else {
        let base = if call.dirfd == AT_FDCWD {
            PathRef::cwd_of(call.task)?
        } else {
            PathRef::of_file(fd_file(current_task_btf(), i64::from(call.dirfd))?)?
        };
        let id = match verdict::for_dir(base)? {
            Verdict::Watched(id) => id,
            Verdict::Undecided => 0,
            Verdict::Unwatched => {
                // `..` can climb from an unwatched directory into a watched one.
                match prefix_lookup(user_path, from) {
                    Some((_, true)) => 0,
                    Some((_, false)) => return Ok(()),
                    None => return Err(Error::Read),
                }
            }
        };
        (PathOrigin::Relative, id, Some(base))
    };
    let buf = start_event(call, origin, watch_id)?;
    let undecided = if watch_id == 0 {
        path_flags::UNDECIDED
    } else {
        0
    };
    let base_len = match base {
        Some(base) => put_base(buf, call.task, base, undecided, None)?,
        None => {
            // SAFETY: see `body`.
            unsafe { (*body(buf)).path_flags = undecided };
            0
        }
    };
    // SAFETY: `base_len <= PATH_MAX`; the string gets at most `PATH_MAX` bytes after it,
    // inside the scratch slot.
    let n = read_str(
        unsafe { buf.add(TAIL + base_len) },
        PATH_MAX as u32,
        user_path,
        from,
    );
    let (user_len, user_flags) = if n < 0 {
        count_drop(DropReason::ReadFailure);
        (0, path_flags::READ_FAILED)
    } else if n as usize >= PATH_MAX {
        count_drop(DropReason::Truncated);
        (PATH_MAX, path_flags::TRUNCATED)
    } else {
        (n as usize, 0)
    };
    // SAFETY: see `body`.
    unsafe {
        (*body(buf)).user_len = user_len as u16;
        (*body(buf)).user_flags = user_flags;
    }
    submit(buf, TAIL + base_len + user_len)
}
