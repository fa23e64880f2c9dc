//! Bounds shared by the kernel programs and the decoder.

/// Longest path the kernel programs build (bytes, like `PATH_MAX`).
pub const PATH_MAX: usize = 4096;
/// Longest single path component (`NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Directory levels walked when resolving or matching a path. A deeper path is delivered with
/// `PATH_DEPTH_EXCEEDED` set instead of being judged unwatched.
pub const PATH_DEPTH_MAX: u32 = 64;
/// Bytes of the argument area copied at exec (arguments are NUL separated).
pub const ARGV_MAX: usize = 4096;
/// Bytes of the environment area copied at exec (variables are NUL separated).
pub const ENV_MAX: usize = 4096;
/// Bytes of the file name passed to execve that are kept.
pub const EXEC_FILENAME_MAX: usize = 512;
/// Task command name length (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;
/// Bytes of a unix socket path (`sizeof(sun_path)`).
pub const UNIX_PATH_MAX: usize = 108;
/// Key bytes of the watch prefix trie; a watched path must be shorter than this.
pub const WATCH_PREFIX_MAX: usize = 256;
/// Most watched directory trees at once.
pub const MAX_WATCHES: u32 = 1024;
/// Most local ports whose accepted connections are reported.
pub const MAX_ACCEPT_PORTS: u32 = 1024;
/// Slots of the per-CPU verdict cache (a power of two).
pub const VERDICT_CACHE_BITS: u32 = 12;
pub const VERDICT_CACHE_ENTRIES: u32 = 1 << VERDICT_CACHE_BITS;
/// Size of one per-CPU scratch slot in which an event is assembled before it is copied to the
/// ring buffer. Large enough for the biggest event (exec).
pub const SCRATCH_SIZE: usize = 16384;
/// Default ring buffer size (bytes).
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 8 * 1024 * 1024;
