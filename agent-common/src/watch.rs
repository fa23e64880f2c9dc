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

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding.
    unsafe impl aya::Pod for super::WatchKey {}
}

const _: () = assert!(core::mem::size_of::<WatchKey>() == 16);
