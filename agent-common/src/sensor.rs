//! Sensor groups: the system calls that the per-call `fexit` programs can serve instead of the
//! `sys_exit` raw tracepoint. The agent decides at start which groups the `fexit` programs
//! serve (they must load, attach and fire); `sys_exit` serves the rest.

/// Index of a group in `SENSOR_HITS`, and its bit (`1 << index`) in `FEXIT_SERVES`.
pub mod group {
    /// The open family: open, openat, openat2, creat.
    pub const OPEN: u32 = 0;
    /// connect, and i386 socketcall.
    pub const CONNECT: u32 = 1;
    /// Calls that change directories or mounts (remembered verdicts go stale) and the
    /// working directory: rename*, rmdir, unlinkat, mount family, pivot_root, chdir, fchdir.
    pub const HOUSEKEEPING: u32 = 2;
    /// accept, accept4, and i386 socketcall(SYS_ACCEPT, SYS_ACCEPT4).
    pub const ACCEPT: u32 = 3;
    /// Number of groups.
    pub const COUNT: u32 = 4;
    /// Every group's bit.
    pub const ALL_BITS: u32 = (1 << COUNT) - 1;
}
