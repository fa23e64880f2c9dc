//! `sys_exit`: one program for every system call exit, which picks out the open family and
//! connect by system call number before doing anything else. One hook at exit (instead of an
//! enter/exit pair) keeps the cost for all other system calls at a compare and a return; the
//! arguments are still in the saved registers at exit.

use agent_common::{
    event::{ConnectSyscall, OpenSyscall},
    offsets::features,
};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};

use super::{connect, open};
use crate::{
    emit::account,
    error::Result,
    kernel::{current_task, has, off, read, setting},
};

/// x86_64 system call numbers.
mod nr64 {
    pub const OPEN: i64 = 2;
    pub const CONNECT: i64 = 42;
    pub const CREAT: i64 = 85;
    pub const OPENAT: i64 = 257;
    pub const OPENAT2: i64 = 437;
}

/// i386 system call numbers (32-bit compat entry, also reachable by `int 0x80` from 64-bit
/// code, so they must be recognized to stay complete).
mod nr32 {
    pub const OPEN: i64 = 5;
    pub const CREAT: i64 = 8;
    pub const SOCKETCALL: i64 = 102;
    pub const OPENAT: i64 = 295;
    pub const CONNECT: i64 = 362;
    pub const OPENAT2: i64 = 437;
}

/// x32 ABI marker bit in the system call number.
const X32_SYSCALL_BIT: i64 = 0x4000_0000;
/// `thread_info.status` bit of a task inside a 32-bit system call.
const TS_COMPAT: u32 = 0x0002;

/// What the exiting call was.
#[derive(Clone, Copy)]
enum Call {
    Open(OpenSyscall),
    Connect(ConnectSyscall),
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
pub fn sys_exit(ctx: BtfTracePointContext) -> i32 {
    let regs: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    let nr = (reg!(regs, regs_orig_ax) as i64) & !X32_SYSCALL_BIT;
    match nr {
        nr64::OPEN
        | nr64::CONNECT
        | nr64::CREAT
        | nr64::OPENAT
        | nr64::OPENAT2
        | nr32::OPEN
        | nr32::CREAT
        | nr32::SOCKETCALL
        | nr32::OPENAT
        | nr32::CONNECT => account(try_sys_exit(regs, ret, nr)),
        _ => {}
    }
    0
}

#[inline(always)]
fn try_sys_exit(regs: u64, ret: i64, nr: i64) -> Result<()> {
    if (bpf_get_current_pid_tgid() >> 32) as u32 == setting!(self_tgid) {
        return Ok(());
    }
    let task = current_task();
    let compat = has(features::COMPAT) && read::<u32>(task, off!(task_ti_status))? & TS_COMPAT != 0;
    let call = if compat {
        match nr {
            nr32::OPEN => Call::Open(OpenSyscall::Open),
            nr32::CREAT => Call::Open(OpenSyscall::Creat),
            nr32::OPENAT => Call::Open(OpenSyscall::Openat),
            nr32::OPENAT2 => Call::Open(OpenSyscall::Openat2),
            nr32::CONNECT => Call::Connect(ConnectSyscall::Connect),
            nr32::SOCKETCALL => Call::Connect(ConnectSyscall::Socketcall),
            _ => return Ok(()),
        }
    } else {
        match nr {
            nr64::OPEN => Call::Open(OpenSyscall::Open),
            nr64::CREAT => Call::Open(OpenSyscall::Creat),
            nr64::OPENAT => Call::Open(OpenSyscall::Openat),
            nr64::OPENAT2 => Call::Open(OpenSyscall::Openat2),
            nr64::CONNECT => Call::Connect(ConnectSyscall::Connect),
            _ => return Ok(()),
        }
    };
    // Argument registers: di, si, dx, r10 natively; bx, cx, dx, si for i386 (32-bit values).
    let args = if compat {
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
    };
    match call {
        Call::Open(syscall) => open::handle(task, ret, syscall, args, compat),
        Call::Connect(syscall) => connect::handle(task, ret, syscall, args, compat),
    }
}
