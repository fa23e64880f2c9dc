//! `sys_exit`: one program for every system call exit, which picks out the calls it cares
//! about by number before doing anything else. One hook at exit (instead of an enter/exit
//! pair) keeps the cost for all other system calls at a compare and a return; the arguments
//! are still in the saved registers at exit.
//!
//! Calls it cares about: the open family and connect (events), rename, rmdir and mount changes
//! (they make remembered watch verdicts stale), and the agent's own opens of watched
//! directories (they teach the kernel the directories' dentries).

use agent_common::{
    drops::DropReason,
    event::{AcceptSyscall, ConnectSyscall, OpenSyscall},
    offsets::features,
    sensor::group,
    watch::WatchKey,
};
use aya_ebpf::{
    helpers::generated::bpf_task_pt_regs, macros::btf_tracepoint, programs::BtfTracePointContext,
};

use super::{accept, chdir, connect, open};
use crate::{
    emit::{account, count_drop},
    error::{Error, Result},
    kernel::{
        PathRef, btf_load, current_task_btf, dentry_ino_dev, fd_file, has, off, setting,
        task_number,
    },
    maps::{FEXIT_SERVES, SENSOR_HITS, SYSCALL_BUSY, WATCH_DENTRIES, WATCH_INODES},
    verdict,
};

/// x86_64 system call numbers.
mod nr64 {
    pub const OPEN: i64 = 2;
    pub const CHDIR: i64 = 80;
    pub const FCHDIR: i64 = 81;
    pub const CONNECT: i64 = 42;
    pub const ACCEPT: i64 = 43;
    pub const RENAME: i64 = 82;
    pub const RMDIR: i64 = 84;
    pub const CREAT: i64 = 85;
    pub const PIVOT_ROOT: i64 = 155;
    pub const MOUNT: i64 = 165;
    pub const UMOUNT2: i64 = 166;
    pub const OPENAT: i64 = 257;
    pub const UNLINKAT: i64 = 263;
    pub const RENAMEAT: i64 = 264;
    pub const ACCEPT4: i64 = 288;
    pub const RENAMEAT2: i64 = 316;
    pub const MOVE_MOUNT: i64 = 429;
    pub const OPENAT2: i64 = 437;
    pub const MOUNT_SETATTR: i64 = 442;
}

/// i386 system call numbers (32-bit compat entry, also reachable by `int 0x80` from 64-bit
/// code, so they must be recognized to stay complete).
mod nr32 {
    pub const OPEN: i64 = 5;
    pub const CHDIR: i64 = 12;
    pub const FCHDIR: i64 = 133;
    pub const CREAT: i64 = 8;
    pub const MOUNT: i64 = 21;
    pub const UMOUNT: i64 = 22;
    pub const RENAME: i64 = 38;
    pub const RMDIR: i64 = 40;
    pub const UMOUNT2: i64 = 52;
    pub const SOCKETCALL: i64 = 102;
    pub const PIVOT_ROOT: i64 = 217;
    pub const OPENAT: i64 = 295;
    pub const UNLINKAT: i64 = 301;
    pub const RENAMEAT: i64 = 302;
    pub const RENAMEAT2: i64 = 353;
    pub const CONNECT: i64 = 362;
    pub const ACCEPT4: i64 = 364;
    pub const MOVE_MOUNT: i64 = 429;
    pub const OPENAT2: i64 = 437;
    pub const MOUNT_SETATTR: i64 = 442;
}

/// `socketcall` sub-call that connects (the accepting ones are in `accept`).
const SYS_CONNECT: u64 = 3;

/// x32 ABI marker bit in the system call number.
const X32_SYSCALL_BIT: i64 = 0x4000_0000;
/// `thread_info.status` bit of a task inside a 32-bit system call.
const TS_COMPAT: u32 = 0x0002;
/// `unlinkat` flag that makes it remove a directory.
const AT_REMOVEDIR: u64 = 0x200;

/// What the exiting call was.
#[derive(Clone, Copy)]
enum Call {
    Open(OpenSyscall),
    Connect(ConnectSyscall),
    Accept(AcceptSyscall),
    /// Changes directory names or mounts: remembered verdicts become stale.
    Invalidates,
    /// `unlinkat`: invalidates when it removed a directory.
    Unlinkat,
    /// The working directory changed.
    Chdir,
}

/// Saved register `field` of `regs`, a BTF pointer to `struct pt_regs` (a direct load).
macro_rules! reg {
    ($regs:expr, $field:ident) => {{
        let at = $regs + off!($field);
        // SAFETY: `regs` is the tracepoint's trusted `struct pt_regs *`; the verifier checks
        // the constant offset against the kernel's BTF.
        unsafe { *(at as *const u64) }
    }};
}

#[btf_tracepoint(function = "sys_exit")]
pub fn tp_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let regs: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    let nr = (reg!(regs, regs_orig_ax) as i64) & !X32_SYSCALL_BIT;
    match nr {
        nr64::OPEN
        | nr64::CHDIR
        | nr64::FCHDIR
        | nr64::CONNECT
        | nr64::ACCEPT
        | nr64::ACCEPT4
        | nr64::RENAME
        | nr64::RMDIR
        | nr64::CREAT
        | nr64::PIVOT_ROOT
        | nr64::MOUNT
        | nr64::UMOUNT2
        | nr64::OPENAT
        | nr64::UNLINKAT
        | nr64::RENAMEAT
        | nr64::RENAMEAT2
        | nr64::MOVE_MOUNT
        | nr64::OPENAT2
        | nr64::MOUNT_SETATTR
        | nr32::OPEN
        | nr32::CHDIR
        | nr32::FCHDIR
        | nr32::CREAT
        | nr32::MOUNT
        | nr32::UMOUNT
        | nr32::RENAME
        | nr32::RMDIR
        | nr32::UMOUNT2
        | nr32::SOCKETCALL
        | nr32::PIVOT_ROOT
        | nr32::OPENAT
        | nr32::UNLINKAT
        | nr32::RENAMEAT
        | nr32::RENAMEAT2
        | nr32::CONNECT
        | nr32::ACCEPT4 => account(&ctx, try_sys_exit(regs, ret, nr)),
        _ => {}
    }
    0
}

/// True when `task` (the current task, a trusted BTF pointer) is inside a 32-bit system
/// call: a direct load, cheap enough to do for every candidate number.
#[inline(always)]
fn in_compat_syscall(task: u64) -> bool {
    if !has(features::COMPAT) {
        return false;
    }
    btf_load!(u32, task, task_ti_status) & TS_COMPAT != 0
}

/// True when `task` (the current task, a trusted BTF pointer) belongs to the agent itself.
#[inline(always)]
fn is_own(task: u64) -> bool {
    btf_load!(u32, task, task_tgid) == setting!(self_tgid)
}

/// What the exiting call `nr` is; `regs` (the saved registers) tell the sub-calls of
/// `socketcall` apart.
#[inline(always)]
fn classify(nr: i64, compat: bool, regs: u64) -> Option<Call> {
    Some(if compat {
        match nr {
            nr32::OPEN => Call::Open(OpenSyscall::Open),
            nr32::CREAT => Call::Open(OpenSyscall::Creat),
            nr32::OPENAT => Call::Open(OpenSyscall::Openat),
            nr32::OPENAT2 => Call::Open(OpenSyscall::Openat2),
            nr32::CONNECT => Call::Connect(ConnectSyscall::Connect),
            nr32::ACCEPT4 => Call::Accept(AcceptSyscall::Accept4),
            nr32::SOCKETCALL => match reg!(regs, regs_bx) & 0xffff_ffff {
                SYS_CONNECT => Call::Connect(ConnectSyscall::Socketcall),
                accept::SYS_ACCEPT | accept::SYS_ACCEPT4 => Call::Accept(AcceptSyscall::Socketcall),
                _ => return None,
            },
            nr32::UNLINKAT => Call::Unlinkat,
            nr32::CHDIR | nr32::FCHDIR => Call::Chdir,
            nr32::MOUNT
            | nr32::UMOUNT
            | nr32::RENAME
            | nr32::RMDIR
            | nr32::UMOUNT2
            | nr32::PIVOT_ROOT
            | nr32::RENAMEAT
            | nr32::RENAMEAT2
            | nr32::MOVE_MOUNT
            | nr32::MOUNT_SETATTR => Call::Invalidates,
            _ => return None,
        }
    } else {
        match nr {
            nr64::OPEN => Call::Open(OpenSyscall::Open),
            nr64::CREAT => Call::Open(OpenSyscall::Creat),
            nr64::OPENAT => Call::Open(OpenSyscall::Openat),
            nr64::OPENAT2 => Call::Open(OpenSyscall::Openat2),
            nr64::CONNECT => Call::Connect(ConnectSyscall::Connect),
            nr64::ACCEPT => Call::Accept(AcceptSyscall::Accept),
            nr64::ACCEPT4 => Call::Accept(AcceptSyscall::Accept4),
            nr64::UNLINKAT => Call::Unlinkat,
            nr64::CHDIR | nr64::FCHDIR => Call::Chdir,
            nr64::RENAME
            | nr64::RMDIR
            | nr64::PIVOT_ROOT
            | nr64::MOUNT
            | nr64::UMOUNT2
            | nr64::RENAMEAT
            | nr64::RENAMEAT2
            | nr64::MOVE_MOUNT
            | nr64::MOUNT_SETATTR => Call::Invalidates,
            _ => return None,
        }
    })
}

#[inline(always)]
fn try_sys_exit(regs: u64, ret: i64, nr: i64) -> Result<()> {
    // The one helper call on the way: everything else about the task is a direct load from
    // this pointer (each helper call costs a call and a return, dear on kernels that guard
    // returns against speculation).
    let task = current_task_btf();
    let compat = in_compat_syscall(task);
    let Some(call) = classify(nr, compat, regs) else {
        return Ok(());
    };
    if fexit_serves() & (1 << group_of(call)) != 0 {
        return Ok(());
    }
    // Claimed even when no `fexit` program shares the state (the kernel never runs this
    // program twice at once on one CPU, so the claim then always succeeds): one inlined copy
    // of the handlers instead of two halves the verifier's work.
    claimed(|| dispatch(task, regs, ret, call, compat))
}

/// What an `fexit` program handles: the calls of its group that reach its function.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Select {
    Open,
    Connect,
    Accept,
    Chdir,
    Invalidate,
}

/// The `fexit` programs' entry: the same work as `sys_exit` for the system call under way,
/// read from the task's saved registers, limited to `select`'s calls (so that each program
/// holds only its own path for the verifier). `ret` is the function's return value (the
/// system call's, for the functions the agent attaches to), when `select` needs it.
#[inline(always)]
pub fn fexit_call(select: Select, ret: impl FnOnce() -> Result<i64>) -> Result<()> {
    let task = current_task_btf();
    // SAFETY: helper without preconditions; it returns the trusted saved registers of the
    // current task.
    let regs = unsafe { bpf_task_pt_regs(task as *mut _) } as u64;
    if regs == 0 {
        return Err(Error::Read);
    }
    let nr = (reg!(regs, regs_orig_ax) as i64) & !X32_SYSCALL_BIT;
    let compat = in_compat_syscall(task);
    let Some(call) = classify(nr, compat, regs) else {
        return Ok(());
    };
    let wanted = matches!(
        (select, call),
        (Select::Open, Call::Open(_))
            | (Select::Connect, Call::Connect(_))
            | (Select::Accept, Call::Accept(_))
            | (Select::Chdir, Call::Chdir)
            | (Select::Invalidate, Call::Invalidates | Call::Unlinkat)
    );
    if !wanted {
        return Ok(());
    }
    let own = is_own(task);
    if own && let Some(hits) = SENSOR_HITS.get_ptr_mut(group_of(call)) {
        // SAFETY: per-CPU slot; a lost increment under preemption only delays the check.
        unsafe { *hits += 1 };
    }
    match select {
        // Only reached after the change was made: a failed rename also invalidates, which
        // costs a cache refill and nothing else.
        Select::Invalidate => {
            let remove_dir = match call {
                Call::Unlinkat => args_of(regs, compat)[2] & AT_REMOVEDIR != 0,
                _ => true,
            };
            if remove_dir {
                verdict::bump_kernel_generation();
            }
            Ok(())
        }
        // `set_fs_pwd` runs only when the change succeeded.
        Select::Chdir if own => Ok(()),
        Select::Chdir => claimed(|| chdir::handle(task_number(task))),
        Select::Open | Select::Connect | Select::Accept => {
            let ret = ret()?;
            claimed(|| dispatch(task, regs, ret, call, compat))
        }
    }
}

/// Runs `f` holding this CPU's claim on the system call state; without the claim (another
/// program holds it, preempted) the event is counted as lost.
#[inline(always)]
pub fn claimed(f: impl FnOnce() -> Result<()>) -> Result<()> {
    let Some(busy) = SYSCALL_BUSY.get_ptr_mut(0) else {
        return Err(Error::Scratch);
    };
    let mut old = 1u64;
    // SAFETY: an atomic exchange on this CPU's 8-byte aligned map value.
    unsafe {
        core::arch::asm!(
            "{old} = xchg_64({busy} + 0, {old})",
            busy = in(reg) busy,
            old = inout(reg) old,
            options(nostack),
        );
    }
    if old != 0 {
        count_drop(DropReason::ProgramBusy);
        return Ok(());
    }
    let result = f();
    // SAFETY: this CPU's value, claimed above.
    unsafe { core::ptr::write_volatile(busy, 0) };
    result
}

#[inline(always)]
fn fexit_serves() -> u32 {
    // SAFETY: pointer to a map value returned by the lookup.
    FEXIT_SERVES.get_ptr(0).map_or(0, |m| unsafe { *m })
}

#[inline(always)]
fn group_of(call: Call) -> u32 {
    match call {
        Call::Open(_) => group::OPEN,
        Call::Connect(_) => group::CONNECT,
        Call::Accept(_) => group::ACCEPT,
        Call::Invalidates | Call::Unlinkat | Call::Chdir => group::HOUSEKEEPING,
    }
}

/// Argument registers: di, si, dx, r10 natively; bx, cx, dx, si for i386 (32-bit values).
#[inline(always)]
fn args_of(regs: u64, compat: bool) -> [u64; 4] {
    if compat {
        [
            reg!(regs, regs_bx) & 0xffff_ffff,
            reg!(regs, regs_cx) & 0xffff_ffff,
            reg!(regs, regs_dx) & 0xffff_ffff,
            reg!(regs, regs_si) & 0xffff_ffff,
        ]
    } else {
        [
            reg!(regs, regs_di),
            reg!(regs, regs_si),
            reg!(regs, regs_dx),
            reg!(regs, regs_r10),
        ]
    }
}

/// Handles one exiting call of the current task `task_btf` (a trusted BTF pointer).
#[inline(always)]
fn dispatch(task_btf: u64, regs: u64, ret: i64, call: Call, compat: bool) -> Result<()> {
    let args = args_of(regs, compat);
    let task = task_number(task_btf);
    let own = is_own(task_btf);
    match call {
        Call::Invalidates => {
            if ret == 0 {
                verdict::bump_kernel_generation();
            }
            Ok(())
        }
        Call::Unlinkat => {
            if ret == 0 && args[2] & AT_REMOVEDIR != 0 {
                verdict::bump_kernel_generation();
            }
            Ok(())
        }
        Call::Open(_) if own => {
            if ret >= 0 {
                register_watched_dentry(task_btf, ret)?;
            }
            Ok(())
        }
        Call::Connect(_) | Call::Accept(_) | Call::Chdir if own => Ok(()),
        Call::Chdir => {
            if ret == 0 {
                chdir::handle(task)?;
            }
            Ok(())
        }
        Call::Open(syscall) => open::handle(task_btf, ret, syscall, args, compat),
        Call::Connect(syscall) => connect::handle(task, ret, syscall, args, compat),
        Call::Accept(syscall) => accept::handle(task, ret, syscall, compat),
    }
}

/// The agent opens every watched directory (and keeps it open, which pins its dentry): if the
/// file it just opened is a watched directory, remember its dentry.
#[inline(always)]
fn register_watched_dentry(task_btf: u64, fd: i64) -> Result<()> {
    let path = PathRef::of_file(fd_file(task_btf, fd)?)?;
    let (ino, dev) = dentry_ino_dev(path.dentry)?;
    if let Some(id) = WATCH_INODES.get_ptr(WatchKey { dev, _pad: 0, ino }) {
        // SAFETY: pointer to a map value returned by the lookup.
        let id = unsafe { *id };
        WATCH_DENTRIES
            .insert(path.dentry, id, 0)
            .map_err(|_| crate::error::Error::Read)?;
    }
    Ok(())
}
