//! The benchmark workloads, run in a process of their own (`cargo xtask bench-worker`) so
//! that each measurement starts fresh under the auditing mode being measured. Prints one JSON
//! object: operations done, seconds, nanoseconds per operation.

use std::{
    ffi::CString,
    net::TcpListener,
    os::unix::ffi::OsStrExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// open + close of a file outside the watched tree.
    OpenOutside,
    /// open + close of a file inside the watched tree.
    OpenInside,
    /// fork + exec of /bin/true, waited for.
    Exec,
    /// TCP connect to a loopback listener, then close.
    Connect,
    /// A one-byte `pread` of a file opened once: a system call the agent does not watch
    /// (not in [`Workload::ALL`]; the sensor-cost comparison uses it).
    Pread,
    /// SHA-256 on every CPU but `--cpu` until killed: no system calls, no memory shared with
    /// anything, only the other CPUs kept busy (not in [`Workload::ALL`]).
    Compute,
}

impl Workload {
    pub const ALL: [Workload; 4] = [
        Workload::OpenOutside,
        Workload::OpenInside,
        Workload::Exec,
        Workload::Connect,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::OpenOutside => "open/close outside the watched tree",
            Workload::OpenInside => "open/close inside the watched tree",
            Workload::Exec => "exec storm (fork+exec /bin/true)",
            Workload::Connect => "connect storm (TCP, loopback)",
            Workload::Pread => "1-byte pread (a system call not watched)",
            Workload::Compute => "SHA-256 on the other CPUs",
        }
    }

    pub fn arg(self) -> &'static str {
        match self {
            Workload::OpenOutside => "open-outside",
            Workload::OpenInside => "open-inside",
            Workload::Exec => "exec",
            Workload::Connect => "connect",
            Workload::Pread => "pread",
            Workload::Compute => "compute",
        }
    }
}

#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    workload: Workload,
    /// Operations to perform.
    #[arg(long)]
    ops: u64,
    /// The benchmark directory (holds `watched/` and `outside/`).
    #[arg(long)]
    dir: PathBuf,
    /// Operations per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// CPU to run on (the other CPUs are left to the auditing side).
    #[arg(long)]
    cpu: Option<usize>,
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within its bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Paces `ops` operations at `rate` per second (0: unpaced) in 1 ms slices.
fn paced(ops: u64, rate: u64, mut op: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    if rate == 0 {
        for _ in 0..ops {
            op()?;
        }
        return Ok(());
    }
    let start = Instant::now();
    let mut done = 0u64;
    while done < ops {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64 + 1;
        while done < due.min(ops) {
            op()?;
            done += 1;
        }
        let next = Duration::from_secs_f64(done as f64 / rate as f64);
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait.min(Duration::from_millis(1)));
        }
    }
    Ok(())
}

fn open_close(path: &CString) -> anyhow::Result<()> {
    // SAFETY: open and close of a valid NUL-terminated path.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            bail!("open failed: {}", std::io::Error::last_os_error());
        }
        libc::close(fd);
    }
    Ok(())
}

/// Closes with a reset (`SO_LINGER` 0) instead of a FIN: no TIME_WAIT entry is left behind.
/// Thousands of connects per run otherwise fill the ephemeral port range with TIME_WAIT
/// entries, and each later connect pays for a longer search for a free port, so the cost of a
/// run would depend on how many runs came before it within a minute.
fn abortive_close(stream: std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own socket with a correctly sized `linger`.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

fn spawn_true(prog: &CString) -> anyhow::Result<()> {
    let argv = [prog.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let mut pid = 0;
    // SAFETY: valid program path, NULL-terminated argv/envp; default attributes.
    let ret = unsafe {
        libc::posix_spawn(
            &mut pid,
            prog.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            argv.as_ptr().cast(),
            envp.as_ptr().cast(),
        )
    };
    if ret != 0 {
        bail!(
            "posix_spawn failed: {}",
            std::io::Error::from_raw_os_error(ret)
        );
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(())
}

/// Keeps every CPU but `spared` busy hashing a buffer of its own with SHA-256 (the agent's
/// heaviest step per record), with no system calls and no memory shared with anything, until
/// killed; says `computing` on stdout once every thread runs.
fn compute_elsewhere(spared: usize) -> ! {
    use sha2::Digest as _;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let others: Vec<usize> = (0..cpus).filter(|&cpu| cpu != spared).collect();
    let (started, running) = std::sync::mpsc::channel();
    for &cpu in &others {
        let started = started.clone();
        std::thread::spawn(move || {
            pin(cpu);
            let _ = started.send(());
            let mut block = [0u8; 4096];
            loop {
                let digest = sha2::Sha256::digest(block);
                block[..32].copy_from_slice(&digest);
            }
        });
    }
    for _ in &others {
        let _ = running.recv();
    }
    println!("computing");
    loop {
        std::thread::park();
    }
}

pub fn run(args: &WorkerArgs) -> anyhow::Result<()> {
    // Only the thread that performs the operations is pinned (the connect workload's
    // accepting thread is started first and may run anywhere).
    let pin_here = || {
        if let Some(cpu) = args.cpu {
            pin(cpu);
        }
    };
    let file = |sub: &str| -> anyhow::Result<CString> {
        let p = args.dir.join(sub).join("record.json");
        std::fs::metadata(&p).with_context(|| format!("missing {}", p.display()))?;
        Ok(CString::new(p.as_os_str().as_bytes())?)
    };
    if args.workload == Workload::Compute {
        compute_elsewhere(args.cpu.unwrap_or(0));
    }
    let started;
    match args.workload {
        Workload::Compute => unreachable!("compute_elsewhere does not return"),
        Workload::OpenOutside | Workload::OpenInside => {
            let path = file(if args.workload == Workload::OpenInside {
                "watched"
            } else {
                "outside"
            })?;
            pin_here();
            started = Instant::now();
            paced(args.ops, args.rate, || open_close(&path))?;
        }
        Workload::Pread => {
            let path = file("outside")?;
            // SAFETY: open of a valid NUL-terminated path.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                bail!("open failed: {}", std::io::Error::last_os_error());
            }
            let mut byte = 0u8;
            pin_here();
            started = Instant::now();
            paced(args.ops, args.rate, || {
                // SAFETY: a one-byte read into a local byte from our own descriptor.
                if unsafe { libc::pread(fd, (&raw mut byte).cast(), 1, 0) } != 1 {
                    bail!("pread failed: {}", std::io::Error::last_os_error());
                }
                Ok(())
            })?;
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
        }
        Workload::Exec => {
            let prog = CString::new("/bin/true")?;
            pin_here();
            started = Instant::now();
            paced(args.ops, args.rate, || spawn_true(&prog))?;
        }
        Workload::Connect => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            // A deep accept queue: when the accepting thread falls behind, a full queue drops
            // SYNs and the connect waits a whole second for its retransmission.
            // SAFETY: listen on our own listening socket only changes its backlog.
            unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
            let addr = listener.local_addr()?;
            std::thread::spawn(move || {
                for s in listener.incoming() {
                    drop(s);
                }
            });
            pin_here();
            started = Instant::now();
            paced(args.ops, args.rate, || {
                let stream = std::net::TcpStream::connect(addr).context("connect")?;
                abortive_close(stream);
                Ok(())
            })?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "ops": args.ops,
            "seconds": secs,
            "ns_per_op": secs * 1e9 / args.ops.max(1) as f64,
            "rate": args.ops as f64 / secs,
        })
    );
    Ok(())
}
