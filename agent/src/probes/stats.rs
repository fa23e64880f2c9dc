//! Per-program kernel statistics: how often the kernel skipped a program because it was
//! already running on that CPU (`recursion_misses`). Such a skip loses an event, so it counts
//! as a drop.

use std::os::fd::{AsRawFd, OwnedFd};

use aya_obj::generated::bpf_prog_info;

/// `BPF_OBJ_GET_INFO_BY_FD` command of the bpf(2) system call.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

pub struct ProgramStats {
    programs: Vec<(&'static str, OwnedFd)>,
}

impl ProgramStats {
    pub fn new(programs: Vec<(&'static str, OwnedFd)>) -> Self {
        Self { programs }
    }

    fn info(fd: &OwnedFd) -> Option<bpf_prog_info> {
        // SAFETY: `bpf_prog_info` is a plain C struct; all-zero is a valid value.
        let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
        let mut attr = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: size_of::<bpf_prog_info>() as u32,
            info: (&raw mut info) as u64,
        };
        // SAFETY: bpf(2) with a valid attribute struct pointing at `info`, sized correctly.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &raw mut attr,
                size_of::<InfoAttr>(),
            )
        };
        (ret == 0).then_some(info)
    }

    /// (program, runs, total ns) per program; the kernel counts run time only while
    /// `kernel.bpf_stats_enabled` is 1.
    pub fn run_times(&self) -> Vec<(&'static str, u64, u64)> {
        self.programs
            .iter()
            .filter_map(|(name, fd)| Self::info(fd).map(|i| (*name, i.run_cnt, i.run_time_ns)))
            .collect()
    }

    /// Sum of `recursion_misses` over the agent's programs (0 on kernels before 5.12, which do
    /// not report it).
    pub fn recursion_misses(&self) -> u64 {
        self.programs
            .iter()
            .filter_map(|(_, fd)| Self::info(fd))
            .map(|i| i.recursion_misses)
            .sum()
    }
}
