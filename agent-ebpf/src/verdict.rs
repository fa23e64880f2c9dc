//! The watch decision: does a file or directory lie under a watched tree?
//!
//! A directory's verdict is remembered in `VERDICTS`, a per-CPU direct-mapped cache keyed by
//! (dentry, mount), so that an open outside the watched trees normally costs a handful of reads
//! instead of a walk to the root.
//! A remembered verdict is used only while nothing that could change it has happened: the
//! agent bumps its generation on every watch-list change, the programs bump theirs on every
//! successful rename, rmdir and mount change, and the dentry must still hold the same inode
//! (same address, superblock and inode number), so reuse of its memory is noticed.

use agent_common::{
    limits::{PATH_DEPTH_MAX, VERDICT_CACHE_BITS},
    watch::{DirIdentity, VerdictEntry, generation},
};

use crate::{
    error::{Error, Result},
    kernel::{Kind, PathRef, dentry_flags_parent, inode_sb_ino, load_ptr, load_u32, load_u64, off},
    maps::{GENERATION, VERDICTS, WATCH_DENTRIES, WATCH_DEVS},
};

/// The kernel's judgement of a path.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Under the watched tree with this id.
    Watched(u32),
    /// Not under any watched tree.
    Unwatched,
    /// Too deep to decide within `PATH_DEPTH_MAX` levels: user space must see it.
    Undecided,
}

/// Verdict for an opened file: the file itself may be a watched directory; otherwise its
/// directory decides. Also returns the file's parent dentry (itself at the root of its
/// filesystem), which naming the file needs next.
#[inline(always)]
pub fn for_file(path: PathRef) -> Result<(Verdict, u64)> {
    let (flags, parent) = dentry_flags_parent(path.dentry)?;
    let kind = flags & (off!(dcache_type_mask) as u32);
    if (kind == off!(dcache_directory_type) as u32 || kind == off!(dcache_autodir_type) as u32)
        && let Some(id) = watched_dentry(path.dentry)
    {
        return Ok((Verdict::Watched(id), parent));
    }
    // At the root of its filesystem, its mount decides (`for_dir` of the file itself).
    let verdict = for_dir(PathRef {
        dentry: parent,
        vfsmnt: path.vfsmnt,
    })?;
    Ok((verdict, parent))
}

/// Verdict for a directory (itself or an ancestor watched): from the cache when it holds
/// the directory (checked inline: no call), else from `phi_decide_dir`.
#[inline(always)]
pub fn for_dir(dir: PathRef) -> Result<Verdict> {
    if let Some(verdict) = remembered(dir)? {
        return Ok(verdict);
    }
    match phi_decide_dir(dir.dentry, dir.vfsmnt) {
        UNWATCHED => Ok(Verdict::Unwatched),
        UNDECIDED => Ok(Verdict::Undecided),
        READ_ERROR => Err(Error::Read),
        id => Ok(Verdict::Watched(id as u32)),
    }
}

// Results of `decide_dir`; positive values are watch ids. Subprograms return plain integers:
// the kernel rejects the BTF of Rust enums.
const UNWATCHED: i64 = 0;
const UNDECIDED: i64 = -1;
const READ_ERROR: i64 = -2;

#[inline(always)]
fn watched_dentry(dentry: u64) -> Option<u32> {
    // SAFETY: pointer to a map value returned by the lookup.
    WATCH_DENTRIES.get_ptr(dentry).map(|id| unsafe { *id })
}

#[inline(always)]
fn generation(index: u32) -> u64 {
    // SAFETY: pointer to a map value returned by the lookup.
    GENERATION.get_ptr(index).map_or(0, |g| unsafe { *g })
}

/// Marks every remembered verdict stale (after a rename, rmdir or mount change).
#[inline(always)]
pub fn bump_kernel_generation() {
    if let Some(g) = GENERATION.get_ptr_mut(generation::KERNEL) {
        // An atomic add (`BPF_XADD`): concurrent bumps on several CPUs must not merge into
        // one. core has no atomic read-modify-write for the bpf target.
        // SAFETY: `g` points to an 8-byte aligned array value that lives as long as the map.
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({g} + 0) += {one}",
                g = in(reg) g,
                one = in(reg) 1u64,
                options(nostack),
            );
        }
    }
}

/// The verdict of a directory as a global subprogram (verified once per program, however
/// many callers): a watch id, `UNWATCHED`, `UNDECIDED` or `READ_ERROR`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn phi_decide_dir(dentry: u64, vfsmnt: u64) -> i64 {
    match decide_dir_inner(PathRef { dentry, vfsmnt }) {
        Ok(Verdict::Watched(id)) => i64::from(id),
        Ok(Verdict::Unwatched) => UNWATCHED,
        Ok(Verdict::Undecided) => UNDECIDED,
        Err(_) => READ_ERROR,
    }
}

/// `dir` as the caches know it now; `None` for a negative dentry (never cached).
#[inline(always)]
pub fn identity(dir: PathRef) -> Result<Option<DirIdentity>> {
    let kernel_generation = generation(generation::KERNEL);
    let agent_generation = generation(generation::AGENT);
    let inode = load_u64(dir.dentry, Kind::Dentry, off!(dentry_inode))?;
    if inode == 0 {
        return Ok(None);
    }
    let (sb, ino) = inode_sb_ino(inode)?;
    Ok(Some(DirIdentity {
        dentry: dir.dentry,
        vfsmnt: dir.vfsmnt,
        kernel_generation,
        agent_generation,
        inode,
        sb,
        ino,
    }))
}

/// The cache slot of `dir`, and the verdict it remembers for `dir` if it still holds.
#[inline(always)]
fn lookup(dir: PathRef, id: DirIdentity) -> Result<(*mut VerdictEntry, Option<Verdict>)> {
    let slot = VERDICTS
        .get_ptr_mut(cache_slot(dir))
        .ok_or(Error::Scratch)?;
    // SAFETY: this CPU's slot; only the programs on this CPU touch the cache, one at a time.
    let e = unsafe { &*slot };
    let hit = e.dir == id;
    let verdict = match (hit, e.watch_id) {
        (false, _) => None,
        (true, 0) => Some(Verdict::Unwatched),
        (true, watch_id) => Some(Verdict::Watched(watch_id)),
    };
    Ok((slot, verdict))
}

/// The remembered verdict of `dir`, if the cache holds one that is still valid.
#[inline(always)]
fn remembered(dir: PathRef) -> Result<Option<Verdict>> {
    match identity(dir)? {
        Some(id) => Ok(lookup(dir, id)?.1),
        None => Ok(None),
    }
}

#[inline(always)]
fn decide_dir_inner(dir: PathRef) -> Result<Verdict> {
    let Some(id) = identity(dir)? else {
        return walk(dir);
    };
    let (slot, remembered) = lookup(dir, id)?;
    if let Some(verdict) = remembered {
        return Ok(verdict);
    }
    let verdict = walk(dir)?;
    let watch_id = match verdict {
        Verdict::Watched(id) => id,
        Verdict::Unwatched => 0,
        Verdict::Undecided => return Ok(verdict),
    };
    // SAFETY: as in `lookup`.
    unsafe {
        *slot = VerdictEntry {
            dir: id,
            watch_id,
            _pad: 0,
        };
    }
    Ok(verdict)
}

/// Cache slot of a directory: a multiplicative hash of the dentry and mount addresses.
#[inline(always)]
fn cache_slot(dir: PathRef) -> u32 {
    slot_of(dir, VERDICT_CACHE_BITS)
}

/// Slot of a directory in a direct-mapped per-CPU cache of `1 << bits` entries.
#[inline(always)]
pub fn slot_of(dir: PathRef, bits: u32) -> u32 {
    let mixed = (dir.dentry ^ dir.vfsmnt.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> (64 - bits)) as u32
}

#[inline(always)]
fn sb_watched(dentry: u64) -> Result<bool> {
    let sb = load_ptr(dentry, Kind::Dentry, off!(dentry_sb))?;
    let dev = load_u32(sb, Kind::SuperBlock, off!(sb_dev))?;
    Ok(WATCH_DEVS.get_ptr(dev).is_some())
}

/// Walks from `dir` to the root of its mount namespace: every ancestor in each filesystem
/// that holds a watched directory, then the mount point the filesystem is mounted on.
/// Filesystems without watched directories are crossed in one step.
#[inline(always)]
fn walk(dir: PathRef) -> Result<Verdict> {
    let mut dentry = dir.dentry;
    let mut mnt = dir.vfsmnt - off!(mount_vfsmnt);
    let mut watched_sb = sb_watched(dentry)?;
    for _ in 0..PATH_DEPTH_MAX {
        if watched_sb {
            if let Some(id) = watched_dentry(dentry) {
                return Ok(Verdict::Watched(id));
            }
            let parent = load_ptr(dentry, Kind::Dentry, off!(dentry_parent))?;
            if parent != dentry {
                dentry = parent;
                continue;
            }
        }
        // At the root of this filesystem, or nothing on it is watched: go on from the mount
        // point in the parent mount.
        let parent_mnt = load_ptr(mnt, Kind::Mount, off!(mount_parent))?;
        if parent_mnt == mnt {
            return Ok(Verdict::Unwatched);
        }
        dentry = load_ptr(mnt, Kind::Mount, off!(mount_mountpoint))?;
        mnt = parent_mnt;
        watched_sb = sb_watched(dentry)?;
    }
    Ok(Verdict::Undecided)
}
