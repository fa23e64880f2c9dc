//! Keys of the in-kernel watch filter.

/// A watched directory, identified the way the kernel sees it: the superblock's device number
/// in the kernel's own encoding (`MAJOR << 20 | MINOR`) and the inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WatchKey {
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}

/// Key of the watch prefix trie (`BPF_MAP_TYPE_LPM_TRIE`): the canonical path of a watched
/// directory as bytes, used to decide failed opens that have no `struct file`. Each directory
/// has two entries: `"/dir/"` (everything below) and `"/dir\0"` (the directory itself).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WatchPrefix {
    /// Prefix length in bits.
    pub prefix_len: u32,
    pub data: [u8; crate::limits::WATCH_PREFIX_MAX],
}

/// Encodes a user-space `st_dev` in the kernel's internal `dev_t` encoding.
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xfffff)
}

/// A directory as the in-kernel caches know it: what must still hold for something remembered
/// about it (its verdict, its path) to be used. The dentry and mount are the cache key; both
/// generations must be unchanged, and the dentry must still hold the same inode (`inode`, `sb`
/// and `ino` guard against the dentry's memory being reused for another directory).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirIdentity {
    /// `struct dentry *` of the directory.
    pub dentry: u64,
    /// `struct vfsmount *` it was reached through.
    pub vfsmnt: u64,
    /// Kernel generation: bumped on rename, rmdir and mount changes.
    pub kernel_generation: u64,
    /// Agent generation: bumped on every watch-list change.
    pub agent_generation: u64,
    pub inode: u64,
    pub sb: u64,
    pub ino: u64,
}

/// A remembered verdict for a directory, in a per-CPU direct-mapped cache: whether it lies
/// under a watched tree, valid while `dir` still describes the directory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictEntry {
    pub dir: DirIdentity,
    /// Watch id, 0 for "not under any watched tree".
    pub watch_id: u32,
    pub _pad: u32,
}

/// Index of the kernel-owned and the agent-owned generation in the `GENERATION` array.
pub mod generation {
    pub const KERNEL: u32 = 0;
    pub const AGENT: u32 = 1;
    pub const COUNT: u32 = 2;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding.
    unsafe impl aya::Pod for super::WatchKey {}
}

const _: () = assert!(core::mem::size_of::<WatchKey>() == 16);
const _: () = assert!(core::mem::size_of::<VerdictEntry>() == 64);
