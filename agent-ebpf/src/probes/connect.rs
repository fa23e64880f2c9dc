//! `connect` (and i386 `socketcall(SYS_CONNECT)`) at system call exit.
//!
//! When the call succeeded or is in progress on an IPv4/IPv6 socket, the addresses come from
//! the kernel's socket (the caller cannot change them afterwards); otherwise from the
//! caller's `sockaddr`.

use agent_common::{
    event::{AddrOrigin, ConnectEvent, ConnectSyscall, EventKind, connect_flags, tail_offset},
    limits::UNIX_PATH_MAX,
    offsets::features,
};
use aya_ebpf::helpers::generated::bpf_probe_read_user;

use crate::{
    emit::{fill_header, scratch, submit},
    error::{Error, Result},
    kernel::{
        Kind, cap, fd_file, has, load_ptr, load_u16, load_u32, load_u64, off, read_user, setting,
    },
    maps::slot,
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EINPROGRESS: i64 = 115;
const EFAULT: i64 = 14;
const SYS_CONNECT: u64 = 3;

/// Records a connect call of the current task (`task`, an address). Runs as a global
/// subprogram: its buffers then live in a frame of their own, not in that of the program that
/// calls it, whose frame and the open path's subprograms must fit the kernel's 512 bytes of
/// stack together.
#[inline(always)]
pub fn handle(
    task: u64,
    ret: i64,
    syscall: ConnectSyscall,
    a: [u64; 4],
    compat: bool,
) -> Result<()> {
    if setting!(connect_enabled) == 0 {
        return Ok(());
    }
    // The address length is a 32-bit value: the call and the compat bit ride above it.
    let packed =
        (a[2] & 0xffff_ffff) | (u64::from(syscall as u8) << 32) | (u64::from(compat) << 40);
    match phi_connect_process(task, ret, a[0], a[1], packed) {
        0 => Ok(()),
        code => Err(Error::from_code(code)),
    }
}

/// The global subprogram behind [`handle`]: returns 0 or the `Error` as an integer.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn phi_connect_process(task: u64, ret: i64, a0: u64, a1: u64, packed: u64) -> u32 {
    let syscall = if (packed >> 32) & 0xff == ConnectSyscall::Socketcall as u64 {
        ConnectSyscall::Socketcall
    } else {
        ConnectSyscall::Connect
    };
    let compat = (packed >> 40) & 1 != 0;
    match record(task, ret, syscall, [a0, a1, packed & 0xffff_ffff], compat) {
        Ok(()) => 0,
        Err(e) => e as u32,
    }
}

#[inline(always)]
fn record(task: u64, ret: i64, syscall: ConnectSyscall, a: [u64; 3], compat: bool) -> Result<()> {
    let (fd, uaddr, addrlen) = match syscall {
        ConnectSyscall::Connect => (a[0] as i32, a[1], a[2] as u32),
        ConnectSyscall::Socketcall => {
            if a[0] != SYS_CONNECT {
                return Ok(());
            }
            let args: [u32; 3] = read_user(a[1])?;
            (args[0] as i32, u64::from(args[1]), args[2])
        }
    };
    let family: u16 = match read_user(uaddr) {
        Ok(f) => f,
        Err(_) if ret == -EFAULT => return Ok(()),
        Err(e) => return Err(e),
    };
    if !matches!(family, AF_UNIX | AF_INET | AF_INET6) {
        return Ok(());
    }

    let buf = scratch(slot::SYSCALL)?;
    fill_header(buf, EventKind::Connect, task)?;
    // SAFETY: the scratch slot holds the header plus this body.
    let body = unsafe { &mut *buf.add(tail_offset::<()>()).cast::<ConnectEvent>() };
    zero(body);
    body.ret = ret;
    body.fd = fd;
    body.addrlen = addrlen;
    body.family = family;
    body.syscall = syscall as u8;
    body.origin = AddrOrigin::Argument as u8;
    body.compat = u8::from(compat);

    match family {
        AF_INET => {
            // sockaddr_in: family, port (be), addr
            if let Ok(sa) = read_user::<[u8; 8]>(uaddr) {
                body.dport = u16::from_be_bytes([sa[2], sa[3]]);
                body.daddr[..4].copy_from_slice(&sa[4..8]);
            } else {
                body.flags |= connect_flags::ADDR_READ_FAILED;
            }
        }
        AF_INET6 => {
            // sockaddr_in6: family, port (be), flowinfo, addr[16], scope_id
            if let Ok(sa) = read_user::<[u8; 24]>(uaddr) {
                body.dport = u16::from_be_bytes([sa[2], sa[3]]);
                body.daddr.copy_from_slice(&sa[8..24]);
            } else {
                body.flags |= connect_flags::ADDR_READ_FAILED;
            }
        }
        _ => {
            let len = cap((addrlen as usize).saturating_sub(2), UNIX_PATH_MAX);
            // SAFETY: at most `UNIX_PATH_MAX` bytes into `unix_path`.
            let r = unsafe {
                bpf_probe_read_user(
                    body.unix_path.as_mut_ptr().cast(),
                    len as u32,
                    (uaddr + 2) as *const _,
                )
            };
            if r < 0 {
                body.flags |= connect_flags::ADDR_READ_FAILED;
            } else {
                // An abstract name (leading NUL) uses every byte of addrlen; a pathname
                // socket's name ends at its NUL, which user space finds (a scan here costs
                // verifier states that older kernels refuse).
                if len > 0 && body.unix_path[0] == 0 {
                    body.flags |= connect_flags::UNIX_ABSTRACT;
                }
                body.unix_len = len as u16;
            }
        }
    }

    if (ret == 0 || ret == -EINPROGRESS) && family != AF_UNIX {
        if from_socket(fd, body).is_ok() {
            body.origin = AddrOrigin::Socket as u8;
        } else {
            body.flags |= connect_flags::SOCKET_READ_FAILED;
        }
    }
    submit(buf, tail_offset::<ConnectEvent>())
}

/// Reads family, addresses and ports from the connected socket.
#[inline(always)]
fn from_socket(fd: i32, body: &mut ConnectEvent) -> Result<()> {
    let file = fd_file(crate::kernel::current_task_btf(), i64::from(fd))?;
    let Some(ends) = socket_ends(file)? else {
        return Err(Error::Read);
    };
    body.family = ends.family;
    body.dport = ends.rport;
    body.lport = ends.lport;
    body.daddr = ends.raddr;
    body.laddr = ends.laddr;
    body.sock_type = ends.sock_type;
    body.protocol = ends.protocol;
    Ok(())
}

/// The two ends of an IPv4 or IPv6 socket, as the kernel holds them.
pub(super) struct Ends {
    pub family: u16,
    /// Local port, host order.
    pub lport: u16,
    /// Remote port, host order.
    pub rport: u16,
    /// `SOCK_*` type and IP protocol, 0 where the kernel's BTF does not say.
    pub sock_type: u16,
    pub protocol: u16,
    /// Addresses in network order: 4 bytes for IPv4, 16 for IPv6.
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
}

/// The ends of the socket behind `file` (a socket's `struct file`); `None` for a family
/// other than IPv4 and IPv6.
#[inline(always)]
pub(super) fn socket_ends(file: u64) -> Result<Option<Ends>> {
    let sock = load_ptr(file, Kind::File, off!(file_private_data))?;
    let sk = load_ptr(sock, Kind::Socket, off!(socket_sk))?;
    let family = load_u16(sk, Kind::Sock, off!(sk_family))?;
    let (laddr, raddr) = match family {
        AF_INET => {
            // Network byte order as stored: the bytes in memory order.
            let mut laddr = [0u8; 16];
            let mut raddr = [0u8; 16];
            laddr[..4]
                .copy_from_slice(&load_u32(sk, Kind::Sock, off!(sk_rcv_saddr))?.to_ne_bytes());
            raddr[..4].copy_from_slice(&load_u32(sk, Kind::Sock, off!(sk_daddr))?.to_ne_bytes());
            (laddr, raddr)
        }
        AF_INET6 if has(features::IPV6) => (
            load_in6(sk, off!(sk_v6_rcv_saddr))?,
            load_in6(sk, off!(sk_v6_daddr))?,
        ),
        _ => return Ok(None),
    };
    let (sock_type, protocol) = if has(features::SK_TYPE) {
        (
            load_u16(sk, Kind::Sock, off!(sk_type))?,
            load_u16(sk, Kind::Sock, off!(sk_protocol))?,
        )
    } else {
        (0, 0)
    };
    Ok(Some(Ends {
        family,
        lport: load_u16(sk, Kind::Sock, off!(sk_num))?,
        rport: u16::from_be(load_u16(sk, Kind::Sock, off!(sk_dport))?),
        sock_type,
        protocol,
        laddr,
        raddr,
    }))
}

/// An IPv6 address (`struct in6_addr`) of the socket, in memory order.
#[inline(always)]
fn load_in6(sk: u64, at: u64) -> Result<[u8; 16]> {
    let hi = load_u64(sk, Kind::Sock, at)?.to_ne_bytes();
    let lo = load_u64(sk, Kind::Sock, at + 8)?.to_ne_bytes();
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&hi);
    a[8..].copy_from_slice(&lo);
    Ok(a)
}

/// Clears the body (the scratch slot holds the previous event), with volatile stores so the
/// compiler emits plain stores rather than a `memset` call the bpf target lacks.
#[inline(always)]
fn zero(body: &mut ConnectEvent) {
    let words = (body as *mut ConnectEvent).cast::<u64>();
    for i in 0..size_of::<ConnectEvent>() / 8 {
        // SAFETY: `ConnectEvent` is a multiple of 8 bytes and 8-aligned in the slot.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}
