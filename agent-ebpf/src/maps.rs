//! Maps shared by the programs and the agent.

use agent_common::{
    drops::DropReason,
    limits::{
        DEFAULT_RING_BUFFER_BYTES, MAX_ACCEPT_PORTS, MAX_WATCHES, PATH_MAX, SCRATCH_SIZE,
        VERDICT_CACHE_ENTRIES, WATCH_PREFIX_MAX,
    },
    watch::{DirIdentity, VerdictEntry, WatchKey, generation},
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
};

/// Events to user space. Its size is set by the agent at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);

/// Per-CPU drop counters, indexed by [`DropReason`].
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

/// Bytes of events this CPU sent since it last woke the agent.
#[map]
pub static WAKE_BYTES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The clock as this CPU last read it: the tick (`jiffies`) and the time then (see
/// `emit::event_time`).
#[repr(C)]
pub struct TickTime {
    pub tick: u64,
    pub ns: u64,
}

#[map]
pub static TICK_TIME: PerCpuArray<TickTime> = PerCpuArray::with_max_entries(1, 0);

/// A buffer in which one event is assembled before it is copied to the ring buffer.
#[repr(C)]
pub struct Scratch {
    pub buf: [u8; SCRATCH_SIZE],
}

/// Scratch slots, one per program: a program never runs twice at once on one CPU, but two
/// different programs can interleave (one preempted by another task).
pub mod slot {
    pub const SYSCALL: u32 = 0;
    pub const EXEC: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Where in a scratch slot the path walk keeps its loop state (past the largest event).
pub const CURSOR_OFFSET: usize = SCRATCH_SIZE - 32;

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(slot::COUNT, 0);

/// Watched directories by (device, inode). Value: watch id.
#[map]
pub static WATCH_INODES: HashMap<WatchKey, u32> = HashMap::with_max_entries(MAX_WATCHES, 0);

/// Watched directories by `struct dentry *`, learned when the agent opens (and so pins) each
/// watched directory. Value: watch id.
#[map]
pub static WATCH_DENTRIES: HashMap<u64, u32> = HashMap::with_max_entries(MAX_WATCHES, 0);

/// Remembered verdicts of directories (see `VerdictEntry`): direct-mapped, per CPU, so a
/// lookup is an array index and a slot is never written by two CPUs at once.
#[map]
pub static VERDICTS: PerCpuArray<VerdictEntry> =
    PerCpuArray::with_max_entries(VERDICT_CACHE_ENTRIES, 0);

/// Bytes of a directory path [`DIR_PATHS`] remembers (longer ones are walked every time).
pub const DIR_PATH_MAX: usize = 256;
/// log2 of the entries of [`DIR_PATHS`] per CPU.
pub const DIR_PATH_BITS: u32 = 8;

/// A directory's path as the path walk wrote it (leaf first, each name followed by '/'),
/// with what must still match for it to hold: the directory as `VERDICTS` knows it, and the
/// root the walk stopped at.
#[repr(C)]
pub struct DirPath {
    pub dir: DirIdentity,
    pub root_dentry: u64,
    pub root_vfsmnt: u64,
    /// Bytes of `path`; 0: nothing remembered.
    pub len: u64,
    pub path: [u8; DIR_PATH_MAX],
}

/// Paths of the directories files were opened in, per CPU and direct-mapped like
/// `VERDICTS` (see `path::write_file_path`); used only under the `SYSCALL_BUSY` claim.
#[map]
pub static DIR_PATHS: PerCpuArray<DirPath> = PerCpuArray::with_max_entries(1 << DIR_PATH_BITS, 0);

/// Generations that invalidate `VERDICTS`: index `generation::KERNEL` is bumped by the
/// programs (rename, rmdir, mount changes), `generation::AGENT` by the agent (watch changes).
#[map]
pub static GENERATION: Array<u64> = Array::with_max_entries(generation::COUNT, 0);

/// Devices that hold at least one watched directory. Value: number of watches on it.
#[map]
pub static WATCH_DEVS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_WATCHES, 0);

/// Canonical watched paths, for failed opens (no `struct file` to walk). Value: watch id.
#[map]
pub static WATCH_PREFIXES: LpmTrie<[u8; WATCH_PREFIX_MAX], u32> =
    LpmTrie::with_max_entries(MAX_WATCHES * 2, 0);

/// Per-CPU key buffer for `WATCH_PREFIXES` lookups (too large for the stack).
#[map]
pub static PREFIX_KEY: PerCpuArray<Key<[u8; WATCH_PREFIX_MAX]>> =
    PerCpuArray::with_max_entries(1, 0);

/// Local ports whose accepted connections are reported (value unused). Filled by the agent
/// at start; empty unless the configuration names ports.
#[map]
pub static ACCEPT_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_ACCEPT_PORTS, 0);

/// Which sensor groups (`agent_common::sensor::group`) the `fexit` programs serve, as a bit
/// mask in entry 0, written by the agent at start: `sys_exit` leaves those calls alone.
#[map]
pub static FEXIT_SERVES: Array<u32> = Array::with_max_entries(1, 0);

/// Runs of each group's `fexit` programs for the agent's own calls: the agent's start check
/// that the programs fire, not only attach.
#[map]
pub static SENSOR_HITS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(agent_common::sensor::group::COUNT, 0);

/// Per-CPU claim on the system call state (`OPEN_CALLS`, `PREFIX_KEY`, the `SYSCALL` scratch
/// slot) while `fexit` programs run: several programs share it, and one can preempt another
/// on the same CPU.
#[map]
pub static SYSCALL_BUSY: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The name an open request submitted to an io_uring was given (NUL-terminated), kept from
/// its submission to its completion: by then the kernel has dropped its own copy, and a
/// failed open has nothing else to name it by.
#[repr(C)]
pub struct RingName {
    pub name: [u8; PATH_MAX],
}

/// Open requests in flight in io_uring instances, by `struct io_kiocb *`. Least recently
/// used entries give way (a request that never completes, or completes without a completion
/// entry, is not waited for).
#[map]
pub static RING_NAMES: LruHashMap<u64, RingName> = LruHashMap::with_max_entries(RING_NAMES_MAX, 0);

/// Open requests [`RING_NAMES`] holds at most (each takes `PATH_MAX` bytes).
pub const RING_NAMES_MAX: u32 = 256;
