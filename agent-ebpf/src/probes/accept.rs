//! `accept`, `accept4` (and i386 `socketcall(SYS_ACCEPT, SYS_ACCEPT4)`) at system call exit:
//! an inbound IPv4 or IPv6 connection accepted on a local port the agent watches
//! (`ACCEPT_PORTS`). Both addresses come from the kernel's new socket, not from the caller's
//! buffers. Failed calls (`EAGAIN` on a non-blocking listener, above all) accepted nothing and
//! are not reported.

use agent_common::{
    event::{AcceptEvent, AcceptSyscall, EventKind, tail_offset},
    offsets::features,
};

use crate::{
    emit::{fill_header, scratch, submit},
    error::{Error, Result},
    kernel::{Kind, current_task_btf, fd_file, has, load_ptr, load_u16, load_u32, off, setting},
    maps::{ACCEPT_PORTS, slot},
};

use super::connect::load_in6;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
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
    let file = fd_file(current_task_btf(), ret)?;
    let sock = load_ptr(file, Kind::File, off!(file_private_data))?;
    let sk = load_ptr(sock, Kind::Socket, off!(socket_sk))?;
    let family = load_u16(sk, Kind::Sock, off!(sk_family))?;
    if family != AF_INET && !(family == AF_INET6 && has(features::IPV6)) {
        return Ok(());
    }
    let lport = load_u16(sk, Kind::Sock, off!(sk_num))?;
    if ACCEPT_PORTS.get_ptr(lport).is_none() {
        return Ok(());
    }

    let buf = scratch(slot::SYSCALL)?;
    fill_header(buf, EventKind::Accept, task)?;
    // SAFETY: the scratch slot holds the header plus this body.
    let body = unsafe { &mut *buf.add(tail_offset::<()>()).cast::<AcceptEvent>() };
    body.fd = ret as i32;
    body.family = family;
    body.lport = lport;
    body.rport = u16::from_be(load_u16(sk, Kind::Sock, off!(sk_dport))?);
    body.syscall = syscall as u8;
    body.compat = u8::from(compat);
    if family == AF_INET {
        // Network byte order as stored: the bytes in memory order.
        let laddr = load_u32(sk, Kind::Sock, off!(sk_rcv_saddr))?.to_ne_bytes();
        let raddr = load_u32(sk, Kind::Sock, off!(sk_daddr))?.to_ne_bytes();
        body.laddr = [0; 16];
        body.raddr = [0; 16];
        body.laddr[..4].copy_from_slice(&laddr);
        body.raddr[..4].copy_from_slice(&raddr);
    } else {
        body.laddr = load_in6(sk, off!(sk_v6_rcv_saddr))?;
        body.raddr = load_in6(sk, off!(sk_v6_daddr))?;
    }
    if has(features::SK_TYPE) {
        body.sock_type = load_u16(sk, Kind::Sock, off!(sk_type))?;
        body.protocol = load_u16(sk, Kind::Sock, off!(sk_protocol))?;
    } else {
        body.sock_type = 0;
        body.protocol = 0;
    }
    submit(buf, tail_offset::<AcceptEvent>())
}
