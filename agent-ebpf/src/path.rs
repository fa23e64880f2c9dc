//! Path text in the kernel: resolved paths by walking dentries upward and crossing mounts, and
//! the prefix lookup for failed opens.

use core::ptr::{read_volatile, write_volatile};

use agent_common::{
    event::path_flags,
    limits::{NAME_MAX, PATH_DEPTH_MAX, PATH_MAX, WATCH_PREFIX_MAX},
    offsets::features,
    watch::DirIdentity,
};
use aya_ebpf::{
    helpers::generated::{
        bpf_probe_read_kernel, bpf_probe_read_kernel_str, bpf_probe_read_user_str,
    },
    maps::lpm_trie::Key,
};

use crate::{
    emit::scratch,
    kernel::{Kind, PathRef, cap, has, load_ptr, load_u32, load_u64, off},
    maps::{
        CURSOR_OFFSET, DIR_PATH_BITS, DIR_PATH_MAX, DIR_PATHS, DirPath, PREFIX_KEY, WATCH_PREFIXES,
    },
    verdict,
};

/// Bytes a caller must reserve for [`write_path`]: the logical bound plus one component.
pub const PATH_REGION: usize = PATH_MAX + NAME_MAX + 1;

/// Names up to this long (most of them) are copied as whole words by direct loads.
const SHORT_NAME: usize = 40;
const _: () = assert!(SHORT_NAME.is_multiple_of(8) && SHORT_NAME <= NAME_MAX);

/// Loop state of [`write_path`], kept in map memory: the verifier does not track values in map
/// memory, so each iteration re-reads them as unknown (and bounds-checks them) instead of
/// carrying ever different exact ranges from one iteration to the next, which would make it
/// check every combination of paths through the loop.
#[repr(C)]
pub struct PathCursor {
    pub pos: u32,
    pub flags: u32,
    /// Where the walk stops: the task's root directory.
    pub root: PathRef,
}

/// The largest tail offset [`write_path`] accepts: the path region and the cursor must fit
/// in a scratch slot.
pub const TAIL_MAX: usize = CURSOR_OFFSET - PATH_REGION;

/// Writes the path of `path` leaf first (`"name/parent/…/"`) at byte `tail` of this CPU's
/// scratch slot `slot`, which leaves [`PATH_REGION`] bytes there, stopping at `root` (the
/// task's root) or at the root of its mount namespace. Returns `len | flags << 16`; a read
/// failure ends the walk with `READ_FAILED` and keeps what was written.
#[inline(always)]
pub fn write_path(slot: u32, tail: usize, path: PathRef, root: PathRef) -> u32 {
    let Ok(buf) = scratch(slot) else {
        return u32::from(path_flags::READ_FAILED) << 16;
    };
    // SAFETY: the cursor lies in the last bytes of the scratch slot.
    unsafe { (*buf.add(CURSOR_OFFSET).cast::<PathCursor>()).root = root };
    phi_write_path(slot, tail as u32, path.dentry, path.vfsmnt)
}

/// [`write_path`] for an opened file (`file`, not a directory's): the path of the directory
/// it is in comes from this CPU's `DIR_PATHS` when that remembers it, so only the file's own
/// name is read; otherwise the directory is walked and its path remembered. A remembered path
/// holds as long as the directory's remembered verdict would (same dentry, inode and
/// generations: renames, directory removals, mount and watch changes all renew it) and the
/// walk would stop at the same root. `parent` is the file's parent dentry, as
/// `verdict::for_file` read it. Callers hold the `SYSCALL_BUSY` claim.
#[inline(always)]
pub fn write_file_path(slot: u32, tail: usize, file: PathRef, parent: u64, root: PathRef) -> u32 {
    match file_in_dir(file, parent, root) {
        Some(at) => write_in_dir(slot, tail, &at, root),
        None => write_path(slot, tail, file, root),
    }
}

/// A file whose path is its directory's plus its name, and where its directory's path is
/// remembered.
struct InDir {
    dir: PathRef,
    id: DirIdentity,
    name: u64,
    name_len: usize,
    entry: *mut DirPath,
}

/// `file`'s directory and name, when the path can be built from them: the file is not the
/// walk's root, nor the root of its file system or mount, and its name is short; `None`
/// otherwise (and without direct loads, where the plain walk is kept).
#[inline(always)]
fn file_in_dir(file: PathRef, parent: u64, root: PathRef) -> Option<InDir> {
    if !has(features::DIRECT_LOADS) || file == root {
        return None;
    }
    let mnt_root = load_ptr(
        file.vfsmnt - off!(mount_vfsmnt),
        Kind::Mount,
        off!(mount_vfsmnt) + off!(vfsmnt_root),
    )
    .ok()?;
    if parent == file.dentry || file.dentry == mnt_root {
        return None;
    }
    let name_len = load_u32(file.dentry, Kind::Dentry, off!(dentry_name_len)).ok()? as usize;
    if name_len == 0 || name_len > SHORT_NAME {
        return None;
    }
    let name = load_ptr(file.dentry, Kind::Dentry, off!(dentry_name_ptr)).ok()?;
    let dir = PathRef {
        dentry: parent,
        vfsmnt: file.vfsmnt,
    };
    let id = verdict::identity(dir).ok()??;
    let entry = DIR_PATHS.get_ptr_mut(verdict::slot_of(dir, DIR_PATH_BITS))?;
    Some(InDir {
        dir,
        id,
        name,
        name_len,
        entry,
    })
}

/// Writes the file's name, then its directory's path (remembered, or walked and then
/// remembered). Returns `len | flags << 16` as [`write_path`] does.
#[inline(always)]
fn write_in_dir(slot: u32, tail: usize, at: &InDir, root: PathRef) -> u32 {
    let Ok(base) = scratch(slot) else {
        return u32::from(path_flags::READ_FAILED) << 16;
    };
    if tail > TAIL_MAX {
        return u32::from(path_flags::READ_FAILED) << 16;
    }
    // SAFETY: `tail + PATH_REGION <= CURSOR_OFFSET`, inside the slot.
    let buf = unsafe { base.add(tail) };
    let name_len = cap(at.name_len, SHORT_NAME);
    for i in 0..SHORT_NAME / 8 {
        if 8 * i >= name_len {
            break;
        }
        let Ok(word) = load_u64(at.name + 8 * i as u64, Kind::Slot, 0) else {
            return u32::from(path_flags::READ_FAILED) << 16;
        };
        // SAFETY: `8 * i < SHORT_NAME < PATH_REGION`; unaligned stores are allowed.
        unsafe { buf.add(8 * i).cast::<u64>().write_unaligned(word) };
    }
    // SAFETY: `name_len <= SHORT_NAME`.
    unsafe { *buf.add(name_len) = b'/' };
    let leaf = name_len + 1;
    // SAFETY: this CPU's entry; the caller holds the claim, so nothing else uses it now.
    let e = unsafe { &mut *at.entry };
    let id = &at.id;
    let remembered =
        e.len != 0 && e.dir == *id && e.root_dentry == root.dentry && e.root_vfsmnt == root.vfsmnt;
    if remembered {
        let len = cap(e.len as usize, DIR_PATH_MAX);
        let words = e.path.as_ptr().cast::<u64>();
        for i in 0..DIR_PATH_MAX / 8 {
            if 8 * i >= len {
                break;
            }
            // SAFETY: word `i` of the entry's path; `leaf + 8 * i + 8 <= SHORT_NAME + 1 +
            // DIR_PATH_MAX`, inside the region.
            unsafe {
                buf.add(leaf + 8 * i)
                    .cast::<u64>()
                    .write_unaligned(*words.add(i));
            }
        }
        return (leaf + len) as u32;
    }
    let packed = write_path(slot, tail + leaf, at.dir, root);
    let len = (packed & 0xffff) as usize;
    let flags = packed >> 16;
    if flags == 0 && len != 0 && len <= DIR_PATH_MAX {
        let words = e.path.as_mut_ptr().cast::<u64>();
        for i in 0..DIR_PATH_MAX / 8 {
            if 8 * i >= len {
                break;
            }
            // SAFETY: word `i` of the entry's path and of the walked path in the region.
            unsafe {
                *words.add(i) = buf.add(leaf + 8 * i).cast::<u64>().read_unaligned();
            }
        }
        e.len = len as u64;
        e.dir = *id;
        e.root_dentry = root.dentry;
        e.root_vfsmnt = root.vfsmnt;
    }
    let total = leaf + len;
    if total > PATH_MAX {
        return PATH_MAX as u32 | (flags | u32::from(path_flags::TRUNCATED)) << 16;
    }
    total as u32 | flags << 16
}

/// The walk of [`write_path`], a global subprogram: the kernel verifies it once per program
/// instead of once per caller (every caller's copy would otherwise repeat a 64-step loop).
/// Its arguments are plain numbers, so it finds its buffer itself and checks `tail`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn phi_write_path(slot: u32, tail: u32, dentry: u64, vfsmnt: u64) -> u32 {
    let tail = tail as usize;
    if tail > TAIL_MAX {
        return u32::from(path_flags::READ_FAILED) << 16;
    }
    let Ok(base) = scratch(slot) else {
        return u32::from(path_flags::READ_FAILED) << 16;
    };
    // SAFETY: `tail + PATH_REGION <= CURSOR_OFFSET`, inside the slot.
    let buf = unsafe { base.add(tail) };
    let cursor = unsafe { base.add(CURSOR_OFFSET) }.cast::<PathCursor>();
    let path = PathRef { dentry, vfsmnt };
    // SAFETY: `cursor` points into this CPU's scratch slot.
    let root = unsafe { (*cursor).root };
    // SAFETY (all cursor accesses): `cursor` points into this CPU's scratch slot.
    let pos_at = unsafe { &raw mut (*cursor).pos };
    let flags_at = unsafe { &raw mut (*cursor).flags };
    let add_flag = |f: u16| unsafe {
        write_volatile(flags_at, read_volatile(flags_at) | u32::from(f));
    };
    unsafe {
        write_volatile(pos_at, 0);
        write_volatile(flags_at, 0);
    }
    let mut dentry = path.dentry;
    let mut vfsmnt = path.vfsmnt;
    let mut mnt = vfsmnt - off!(mount_vfsmnt);
    let Ok(mut mnt_root) = load_ptr(mnt, Kind::Mount, off!(mount_vfsmnt) + off!(vfsmnt_root))
    else {
        return u32::from(path_flags::READ_FAILED) << 16;
    };
    let mut finished = false;
    for _ in 0..PATH_DEPTH_MAX {
        if dentry == root.dentry && vfsmnt == root.vfsmnt {
            finished = true;
            break;
        }
        if dentry == mnt_root {
            let Ok(parent_mnt) = load_ptr(mnt, Kind::Mount, off!(mount_parent)) else {
                add_flag(path_flags::READ_FAILED);
                break;
            };
            if parent_mnt == mnt {
                finished = true;
                break;
            }
            let (Ok(mountpoint), Ok(root_of_parent)) = (
                load_ptr(mnt, Kind::Mount, off!(mount_mountpoint)),
                load_ptr(
                    parent_mnt,
                    Kind::Mount,
                    off!(mount_vfsmnt) + off!(vfsmnt_root),
                ),
            ) else {
                add_flag(path_flags::READ_FAILED);
                break;
            };
            dentry = mountpoint;
            mnt = parent_mnt;
            vfsmnt = mnt + off!(mount_vfsmnt);
            mnt_root = root_of_parent;
            continue;
        }
        let (Ok(parent), Ok(name_len), Ok(name)) = (
            load_ptr(dentry, Kind::Dentry, off!(dentry_parent)),
            load_u32(dentry, Kind::Dentry, off!(dentry_name_len)),
            load_ptr(dentry, Kind::Dentry, off!(dentry_name_ptr)),
        ) else {
            add_flag(path_flags::READ_FAILED);
            break;
        };
        if parent == dentry {
            finished = true;
            break;
        }
        let mut len = name_len as usize;
        if len > NAME_MAX {
            len = NAME_MAX;
            add_flag(path_flags::TRUNCATED);
        }
        let pos = unsafe { read_volatile(pos_at) } as usize;
        if pos > PATH_MAX || pos + len + 1 > PATH_MAX {
            add_flag(path_flags::TRUNCATED);
            finished = true;
            break;
        }
        if len <= SHORT_NAME && has(features::DIRECT_LOADS) {
            // Most names: a few direct loads instead of a helper call. The words past the
            // name's end (inside the dentry's inline name or the slab object of an external
            // one; a load that faults reads 0) land past `pos + len`, which the '/' below,
            // the next name or the end of the path covers or leaves unsent.
            // As many words as the name needs.
            for i in 0..SHORT_NAME / 8 {
                if 8 * i >= len {
                    break;
                }
                let Ok(word) = load_u64(name + 8 * i as u64, Kind::Slot, 0) else {
                    break;
                };
                // SAFETY: `pos <= PATH_MAX` and `8 * i < SHORT_NAME`, so the word ends
                // within `PATH_REGION`; the map value allows unaligned stores.
                unsafe { buf.add(pos + 8 * i).cast::<u64>().write_unaligned(word) };
            }
        } else {
            // SAFETY: `pos <= PATH_MAX` and `len <= NAME_MAX`, inside the region.
            if unsafe { bpf_probe_read_kernel(buf.add(pos).cast(), len as u32, name as *const _) }
                < 0
            {
                add_flag(path_flags::READ_FAILED);
                break;
            }
        }
        // SAFETY: `pos <= PATH_MAX` and `len <= NAME_MAX`, so `pos + len + 1 <= PATH_REGION`.
        unsafe {
            *buf.add(pos + len) = b'/';
            write_volatile(pos_at, (pos + len + 1) as u32);
        }
        dentry = parent;
    }
    let flags = unsafe { read_volatile(flags_at) } as u16;
    let flags = if !finished && flags & path_flags::READ_FAILED == 0 {
        flags | path_flags::DEPTH_EXCEEDED
    } else {
        flags
    };
    let pos = unsafe { read_volatile(pos_at) } as usize;
    let pos = if pos > PATH_MAX { PATH_MAX } else { pos };
    pos as u32 | (u32::from(flags) << 16)
}

/// Where the name of an open comes from: the caller's memory (a system call's argument), or
/// the kernel's (an io_uring request's name, kept since its submission).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NameIn {
    User = 0,
    Kernel = 1,
}

impl NameIn {
    /// From its number, as passed to subprograms and parked in maps.
    #[inline(always)]
    pub fn of(raw: u32) -> NameIn {
        if raw == NameIn::Kernel as u32 {
            NameIn::Kernel
        } else {
            NameIn::User
        }
    }
}

/// Copies the NUL-terminated string at `src` (in `from`'s memory) into `dst`, at most `max`
/// bytes with the NUL; returns the bytes copied with the NUL, or a negative error.
#[inline(always)]
pub fn read_str(dst: *mut u8, max: u32, src: u64, from: NameIn) -> i64 {
    // SAFETY: the helpers validate `src`; callers give a `dst` with `max` bytes.
    unsafe {
        match from {
            NameIn::User => bpf_probe_read_user_str(dst.cast(), max, src as *const _),
            NameIn::Kernel => bpf_probe_read_kernel_str(dst.cast(), max, src as *const _),
        }
    }
}

/// Looks a failed open's absolute string up in the watch prefix trie. `path` is the name's
/// address in `from`'s memory. Returns the watch id, 0 when no watched path is a prefix, or
/// `None` when the string cannot be read. Also says whether the string contains `..` (then a
/// prefix miss does not prove the path is unwatched).
#[inline(always)]
pub fn prefix_lookup(path: u64, from: NameIn) -> Option<(u32, bool)> {
    let r = phi_prefix_lookup(path, from as u32);
    if r < 0 {
        return None;
    }
    Some((r as u32, (r >> 32) != 0))
}

/// [`prefix_lookup`] as a global subprogram: `id | dotdot << 32`, or -1.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn phi_prefix_lookup(path: u64, from: u32) -> i64 {
    match prefix_lookup_inner(path, NameIn::of(from)) {
        Some((id, dotdot)) => i64::from(id) | (i64::from(dotdot) << 32),
        None => -1,
    }
}

#[inline(always)]
fn prefix_lookup_inner(path: u64, from: NameIn) -> Option<(u32, bool)> {
    let key = PREFIX_KEY.get_ptr_mut(0)?;
    // SAFETY: `key` is this CPU's key buffer of `WATCH_PREFIX_MAX` data bytes.
    let key = unsafe { &mut *key };
    let data = key.data.as_mut_ptr();
    let n = read_str(data, WATCH_PREFIX_MAX as u32, path, from);
    if n <= 0 {
        return None;
    }
    let n = (n as usize) & (WATCH_PREFIX_MAX * 2 - 1);
    let n = if n > WATCH_PREFIX_MAX {
        WATCH_PREFIX_MAX
    } else {
        n
    };
    key.prefix_len = (n * 8) as u32;
    let id = WATCH_PREFIXES.get(&*key).copied().unwrap_or(0);
    // The scan ends at the NUL that the string helpers always write inside the
    // buffer, not at `n`: the compiler folds `i < n` and `i < WATCH_PREFIX_MAX` into one
    // counter whose bound verifiers before 6.8 cannot follow.
    let mut dotdot = false;
    let mut prev = 0u8;
    for i in 0..WATCH_PREFIX_MAX {
        let c = key.data[i];
        if c == 0 {
            break;
        }
        if c == b'.' && prev == b'.' {
            dotdot = true;
            break;
        }
        prev = c;
    }
    Some((id, dotdot))
}

/// A key type check: the trie key is the packed `Key` of aya.
const _: () = assert!(core::mem::size_of::<Key<[u8; WATCH_PREFIX_MAX]>>() == 4 + WATCH_PREFIX_MAX);
