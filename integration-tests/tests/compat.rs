//! 32-bit system calls made with `int 0x80` from a 64-bit process are recorded too: they use
//! other system call numbers and argument registers, and are an easy way around a filter that
//! only knows the 64-bit table.

use std::{ffi::CString, net::TcpListener, os::unix::ffi::OsStrExt as _};

use integration_tests::{Agent, TestDir, as_u64, is};

/// Memory below 4 GiB, reachable by 32-bit pointers.
struct LowPage(*mut u8);

impl LowPage {
    fn new() -> Self {
        // SAFETY: anonymous private mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        assert!((p as usize) < (1 << 32));
        LowPage(p.cast())
    }

    fn put(&self, off: usize, bytes: &[u8]) -> u32 {
        assert!(off + bytes.len() <= 4096);
        // SAFETY: within the mapping.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.add(off), bytes.len()) };
        (self.0 as usize + off) as u32
    }
}

impl Drop for LowPage {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.0.cast(), 4096) };
    }
}

/// An i386 system call through `int 0x80` (ebx is reserved by LLVM, so it is swapped in).
fn int80(nr: u32, a: u32, b: u32, c: u32) -> i32 {
    let ret: i32;
    // SAFETY: the i386 entry only reads the registers given; memory passed is ours.
    unsafe {
        std::arch::asm!(
            "xchg {a:r}, rbx",
            "int 0x80",
            "xchg {a:r}, rbx",
            a = inout(reg) u64::from(a) => _,
            inout("eax") nr => ret,
            in("ecx") b,
            in("edx") c,
        );
    }
    ret
}

#[test]
fn int80_open_and_connect_are_recorded() {
    let w = TestDir::new("compat");
    let file = w.file("chart.txt", "x\n");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);

    let page = LowPage::new();
    let path = CString::new(file.as_os_str().as_bytes()).expect("cstring");
    let path_ptr = page.put(0, path.as_bytes_with_nul());
    // i386 open(path, O_RDONLY, 0) is system call 5.
    let fd = int80(5, path_ptr, 0, 0);
    assert!(fd >= 0, "int 0x80 open failed: {fd}");
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    let r = agent.wait_for("the int 0x80 open", |r| {
        is::open_of(&file)(r) && is::from_pid(r, std::process::id())
    });
    assert_eq!(r["open"]["compat"], true);
    assert_eq!(r["open"]["syscall"], "OPEN_SYSCALL_OPEN");
    assert_eq!(r["open"]["read"], true);

    // i386 socket(AF_INET, SOCK_STREAM, 0) is 359; connect(fd, addr, len) is 362.
    let sock = int80(359, libc::AF_INET as u32, libc::SOCK_STREAM as u32, 0);
    assert!(sock >= 0, "int 0x80 socket failed: {sock}");
    let mut sa = [0u8; 16];
    sa[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    sa[2..4].copy_from_slice(&port.to_be_bytes());
    sa[4..8].copy_from_slice(&[127, 0, 0, 1]);
    let sa_ptr = page.put(1024, &sa);
    let rc = int80(362, sock as u32, sa_ptr, 16);
    assert_eq!(rc, 0, "int 0x80 connect failed");
    let r = agent.wait_for("the int 0x80 connect", |r| {
        r.get("connect").is_some()
            && is::from_pid(r, std::process::id())
            && as_u64(&r["connect"]["port"]) == u64::from(port)
    });
    assert_eq!(r["connect"]["compat"], true);
    assert_eq!(r["connect"]["address"], "127.0.0.1");
    assert_eq!(r["connect"]["outcome"]["success"], true);
    // SAFETY: closing the socket created above.
    unsafe { libc::close(sock) };
    agent.stop();
}

#[test]
fn int80_socketcall_accept_is_recorded() {
    use std::os::fd::AsRawFd as _;
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let mut agent = Agent::start(["--accept-port", &port.to_string()]);
    let client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // i386 socketcall(SYS_ACCEPT = 5, args) with args = [fd, NULL, NULL] (32-bit words).
    let page = LowPage::new();
    let mut args = [0u8; 12];
    args[..4].copy_from_slice(&(listener.as_raw_fd() as u32).to_ne_bytes());
    let args_ptr = page.put(0, &args);
    let fd = int80(102, 5, args_ptr, 0);
    assert!(fd >= 0, "int 0x80 socketcall(SYS_ACCEPT) failed: {fd}");
    let r = agent.wait_for("the int 0x80 accept", |r| {
        r.get("accept").is_some()
            && is::from_pid(r, std::process::id())
            && as_u64(&r["accept"]["localPort"]) == u64::from(port)
    });
    let a = &r["accept"];
    assert_eq!(a["syscall"], "socketcall");
    assert_eq!(a["compat"], true);
    assert_eq!(a["remoteAddress"], "127.0.0.1");
    assert_eq!(
        as_u64(&a["remotePort"]),
        u64::from(client.local_addr().expect("client").port())
    );
    assert_eq!(as_u64(&a["fd"]), fd as u64);
    // SAFETY: closing the socket accepted above.
    unsafe { libc::close(fd) };
    agent.stop();
}
