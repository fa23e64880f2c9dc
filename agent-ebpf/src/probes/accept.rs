//! `accept`, `accept4` (and i386 `socketcall(SYS_ACCEPT, SYS_ACCEPT4)`) at system call exit:
//! an inbound IPv4 or IPv6 connection accepted on a local port the agent watches
//! (`ACCEPT_PORTS`). Both addresses come from the kernel's new socket, not from the caller's
//! buffers. Failed calls (`EAGAIN` on a non-blocking listener, above all) accepted nothing and
//! are not reported.

use agent_common::event::{AcceptEvent, AcceptSyscall, EventKind, tail_offset};

use crate::{
    emit::{fill_header, scratch, submit},
    error::{Error, Result},
    kernel::{current_task_btf, fd_file, setting},
    maps::{ACCEPT_PORTS, slot},
};

use super::connect::socket_ends;

/// `socketcall` sub-calls that accept.
pub const SYS_ACCEPT: u64 = 5;
pub const SYS_ACCEPT4: u64 = 18;

/// Records the connection an accept call of the current task (`task`, an address) returned
/// as descriptor `ret`, when its local port is watched. Runs as a global subprogram, as
/// connect does, so that its frame is not added to the caller's.
#[inline(always)]
pub fn handle(task: u64, ret: i64, syscall: AcceptSyscall, compat: bool) -> Result<()> {
    if setting!(accept_enabled) == 0 || ret < 0 {
        return Ok(());
    }
    let packed = u64::from(syscall as u8) | (u64::from(compat) << 8);
    match phi_accept_process(task, ret, packed) {
        0 => Ok(()),
        code => Err(Error::from_code(code)),
    }
}

/// The global subprogram behind [`handle`]: returns 0 or the `Error` as an integer.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn phi_accept_process(task: u64, ret: i64, packed: u64) -> u32 {
    let syscall = match packed & 0xff {
        2 => AcceptSyscall::Accept4,
        3 => AcceptSyscall::Socketcall,
        _ => AcceptSyscall::Accept,
    };
    let compat = (packed >> 8) & 1 != 0;
    match record(task, ret, syscall, compat) {
        Ok(()) => 0,
        Err(e) => e as u32,
    }
}

#[inline(always)]
fn record(task: u64, ret: i64, syscall: AcceptSyscall, compat: bool) -> Result<()> {
    let Some(ends) = socket_ends(fd_file(current_task_btf(), ret)?)? else {
        return Ok(());
    };
    if ACCEPT_PORTS.get_ptr(ends.lport).is_none() {
        return Ok(());
    }
    let buf = scratch(slot::SYSCALL)?;
    fill_header(buf, EventKind::Accept, task)?;
    // SAFETY: the scratch slot holds the header plus this body.
    let body = unsafe { &mut *buf.add(tail_offset::<()>()).cast::<AcceptEvent>() };
    body.fd = ret as i32;
    body.family = ends.family;
    body.lport = ends.lport;
    body.rport = ends.rport;
    body.sock_type = ends.sock_type;
    body.protocol = ends.protocol;
    body.syscall = syscall as u8;
    body.compat = u8::from(compat);
    body.laddr = ends.laddr;
    body.raddr = ends.raddr;
    submit(buf, tail_offset::<AcceptEvent>())
}
