//! Reading kernel structures at offsets taken from the running kernel's BTF.

use agent_common::offsets::{KernelOffsets, ProbeSettings, RDONLY_CAST_PLACEHOLDER, features};
use aya_ebpf::helpers::{
    bpf_probe_read_kernel, bpf_probe_read_user,
    generated::{bpf_get_current_task, bpf_get_current_task_btf},
};

use crate::error::{Error, Result};

/// Field offsets, filled in by the agent at load time (read-only map, frozen).
#[unsafe(no_mangle)]
pub static OFFSETS: KernelOffsets = KernelOffsets::ZERO;

/// Run-time settings, filled in by the agent at load time.
#[unsafe(no_mangle)]
pub static SETTINGS: ProbeSettings = ProbeSettings {
    self_tgid: 0,
    connect_enabled: 1,
    wakeup_bytes: 0,
    accept_enabled: 0,
};

/// Reads one offset. The volatile read keeps the compiler from folding the placeholder value;
/// the verifier knows the loaded value because the map is read-only and frozen.
macro_rules! off {
    ($field:ident) => {
        // SAFETY: reading a field of a static.
        (unsafe { core::ptr::read_volatile(&$crate::kernel::OFFSETS.$field) } as u64)
    };
}
pub(crate) use off;

macro_rules! setting {
    ($field:ident) => {
        // SAFETY: reading a field of a static.
        unsafe { core::ptr::read_volatile(&$crate::kernel::SETTINGS.$field) }
    };
}
pub(crate) use setting;

/// True when the feature bit is set in `OFFSETS.features`.
#[inline(always)]
pub fn has(feature: u32) -> bool {
    // SAFETY: reading a field of a static.
    (unsafe { core::ptr::read_volatile(&OFFSETS.features) } & feature) != 0
}

/// `PF_KTHREAD`: the task is a kernel thread.
const PF_KTHREAD: u32 = 0x0020_0000;

/// True for kernel threads, whose fork and exit are not process-table events.
#[inline(always)]
pub fn is_kernel_thread(task: u64) -> Result<bool> {
    Ok(load_u32(task, Kind::Task, off!(task_flags))? & PF_KTHREAD != 0)
}

/// Reads a `T` from kernel memory at `base + off`.
#[inline(always)]
pub fn read<T>(base: u64, off: u64) -> Result<T> {
    // SAFETY: `bpf_probe_read_kernel` validates the address; a bad one is an error, not a
    // fault.
    unsafe { bpf_probe_read_kernel((base + off) as *const T) }.map_err(|_| Error::Read)
}

/// Reads a `T` from user memory at `addr`.
#[inline(always)]
pub fn read_user<T>(addr: u64) -> Result<T> {
    // SAFETY: as for `read`, for user memory.
    unsafe { bpf_probe_read_user(addr as *const T) }.map_err(|_| Error::Read)
}

/// The kernel structs read with [`load_u64`] and friends, each checked against its BTF type.
#[derive(Clone, Copy)]
pub enum Kind {
    Task,
    File,
    Dentry,
    Inode,
    SuperBlock,
    Mount,
    FsStruct,
    Cred,
    Binprm,
    Mm,
    Signal,
    Socket,
    Sock,
    CssSet,
    Cgroup,
    KernfsNode,
    /// One pointer-sized array slot, read at offset 0 (as the first pointer of a
    /// `struct list_head`): the verifier accepts only constant offsets into a typed object,
    /// so an array element is cast on its own.
    Slot,
}

impl Kind {
    /// The struct's BTF type id (set at load; a constant to the verifier).
    #[inline(always)]
    fn type_id(self) -> u64 {
        match self {
            Kind::Task => off!(btf_task_struct),
            Kind::File => off!(btf_file),
            Kind::Dentry => off!(btf_dentry),
            Kind::Inode => off!(btf_inode),
            Kind::SuperBlock => off!(btf_super_block),
            Kind::Mount => off!(btf_mount),
            Kind::FsStruct => off!(btf_fs_struct),
            Kind::Cred => off!(btf_cred),
            Kind::Binprm => off!(btf_linux_binprm),
            Kind::Mm => off!(btf_mm_struct),
            Kind::Signal => off!(btf_signal_struct),
            Kind::Socket => off!(btf_socket),
            Kind::Sock => off!(btf_sock),
            Kind::CssSet => off!(btf_css_set),
            Kind::Cgroup => off!(btf_cgroup),
            Kind::KernfsNode => off!(btf_kernfs_node),
            Kind::Slot => off!(btf_slot),
        }
    }
}

/// `bpf_rdonly_cast(addr, type_id)`: the address as a read-only pointer to the struct with
/// that BTF id, which plain loads can follow (the verifier checks each load against the
/// struct's layout and makes it fault-safe). Written as a call of
/// [`RDONLY_CAST_PLACEHOLDER`], which the agent rewrites before loading (aya cannot relocate
/// kfunc calls); the kernel then turns the kfunc call into a register move.
#[inline(always)]
fn rdonly_cast(addr: u64, type_id: u64) -> u64 {
    let out: u64;
    // SAFETY: the call becomes a register move; r1-r5 are declared clobbered, as for any call.
    unsafe {
        core::arch::asm!(
            "call {n}",
            n = const RDONLY_CAST_PLACEHOLDER,
            inlateout("r1") addr => _,
            inlateout("r2") type_id => _,
            lateout("r0") out,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(pure, nomem, nostack),
        );
    }
    out
}

/// A value loaded through a cast pointer, as a plain number: a pointer member loads as a
/// typed pointer, which may not be hashed, stored as a number or passed to a global
/// subprogram. Negating twice leaves the value and makes the verifier forget the type.
#[inline(always)]
fn number(v: u64) -> u64 {
    let mut v = v;
    // SAFETY: two register instructions, no memory.
    unsafe {
        core::arch::asm!(
            "{v} = -{v}",
            "{v} = -{v}",
            v = inout(reg) v,
            options(pure, nomem, nostack),
        );
    }
    v
}

/// A pointer argument of a tracepoint as a plain number (see [`number`]), for
/// `bpf_probe_read_kernel` at offsets the verifier does not know as constants.
#[inline(always)]
pub fn untyped(v: u64) -> u64 {
    number(v)
}

/// Reads the `T` (a `u64`, `u32` or `u16`: one load instruction) at byte `at` of the `kind`
/// struct at `base`: a direct load where the kernel allows ([`features::DIRECT_LOADS`]), else
/// `bpf_probe_read_kernel`.
#[inline(always)]
fn load<T: Copy>(base: u64, kind: Kind, at: u64) -> Result<T> {
    if has(features::DIRECT_LOADS) {
        let p = rdonly_cast(base, kind.type_id());
        // SAFETY: `p` is a BTF pointer; the verifier checks the offset and makes the load
        // fault-safe (a fault reads 0).
        Ok(unsafe { *((p + at) as *const T) })
    } else {
        read(base, at)
    }
}

/// [`load`] of a `u64` member, as a plain number (see [`number`]).
#[inline(always)]
pub fn load_u64(base: u64, kind: Kind, at: u64) -> Result<u64> {
    load::<u64>(base, kind, at).map(number)
}

/// [`load`] of a `u32` member.
#[inline(always)]
pub fn load_u32(base: u64, kind: Kind, at: u64) -> Result<u32> {
    load(base, kind, at)
}

/// [`load`] of a `u16` member.
#[inline(always)]
pub fn load_u16(base: u64, kind: Kind, at: u64) -> Result<u16> {
    load(base, kind, at)
}

/// [`load_u64`] for a pointer member that is never NULL in a live object: NULL (also what
/// a faulting direct load reads) is a read failure.
#[inline(always)]
pub fn load_ptr(base: u64, kind: Kind, at: u64) -> Result<u64> {
    match load_u64(base, kind, at)? {
        0 => Err(Error::Read),
        v => Ok(v),
    }
}

/// The current task (`struct task_struct *`) as an address.
#[inline(always)]
pub fn current_task() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_task() }
}

/// Loads a field through a BTF pointer (`struct task_struct *` from
/// `bpf_get_current_task_btf`, and what its pointer fields lead to): a plain load that the
/// verifier checks against the kernel's BTF and guards against faults, much cheaper than a
/// `bpf_probe_read_kernel` call.
macro_rules! btf_load {
    ($ty:ty, $base:expr, $field:ident) => {{
        let at = $base + off!($field);
        // SAFETY: `$base` is a BTF pointer; the verifier checks the constant offset and turns
        // the load into a fault-safe one.
        unsafe { *(at as *const $ty) }
    }};
}
pub(crate) use btf_load;

/// The current task as a BTF pointer (for `btf_load!`).
#[inline(always)]
pub fn current_task_btf() -> u64 {
    // SAFETY: helper without preconditions; returns a trusted `struct task_struct *`.
    (unsafe { bpf_get_current_task_btf() }) as u64
}

/// A trusted task pointer (from `bpf_get_current_task_btf`) as a plain number, for the
/// functions that take a task address (see [`number`]).
#[inline(always)]
pub fn task_number(task_btf: u64) -> u64 {
    number(task_btf)
}

/// `task->files->fdt->fd[fd]` for the current task `task` (a trusted BTF pointer, see
/// [`current_task_btf`]), or an error when the fd is out of range.
#[inline(always)]
pub fn fd_file(task: u64, fd: i64) -> Result<u64> {
    if fd < 0 {
        return Err(Error::Read);
    }
    let files = btf_load!(u64, task, task_files);
    if files == 0 {
        return Err(Error::Read);
    }
    let fdt = btf_load!(u64, files, files_fdt);
    if fdt == 0 {
        return Err(Error::Read);
    }
    let max_fds = btf_load!(u32, fdt, fdt_max_fds);
    if fd as u64 >= u64::from(max_fds) {
        return Err(Error::Read);
    }
    let fds = btf_load!(u64, fdt, fdt_fd);
    let file = load_u64(fds + (fd as u64) * 8, Kind::Slot, 0)?;
    if file == 0 {
        return Err(Error::Read);
    }
    Ok(file)
}

/// A (dentry, vfsmount) pair, like `struct path`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PathRef {
    pub dentry: u64,
    pub vfsmnt: u64,
}

impl PathRef {
    /// `file->f_path` in one read (`struct path` is `{ mnt, dentry }`, checked at load).
    #[inline(always)]
    pub fn of_file(file: u64) -> Result<Self> {
        if has(features::DIRECT_LOADS) {
            return Ok(PathRef {
                dentry: load_ptr(file, Kind::File, off!(file_dentry))?,
                vfsmnt: load_ptr(file, Kind::File, off!(file_vfsmnt))?,
            });
        }
        let [vfsmnt, dentry] = read::<[u64; 2]>(file, off!(file_vfsmnt))?;
        Ok(PathRef { dentry, vfsmnt })
    }

    /// The task's root directory (`fs->root`), where absolute paths stop.
    #[inline(always)]
    pub fn root_of(task: u64) -> Result<Self> {
        let fs = load_ptr(task, Kind::Task, off!(task_fs))?;
        Ok(PathRef {
            dentry: load_ptr(fs, Kind::FsStruct, off!(fs_root_dentry))?,
            vfsmnt: load_ptr(fs, Kind::FsStruct, off!(fs_root_vfsmnt))?,
        })
    }

    /// The task's working directory (`fs->pwd`).
    #[inline(always)]
    pub fn cwd_of(task: u64) -> Result<Self> {
        let fs = load_ptr(task, Kind::Task, off!(task_fs))?;
        Ok(PathRef {
            dentry: load_ptr(fs, Kind::FsStruct, off!(fs_pwd_dentry))?,
            vfsmnt: load_ptr(fs, Kind::FsStruct, off!(fs_pwd_vfsmnt))?,
        })
    }
}

/// Superblock pointer and inode number of an inode, in one read when the kernel's layout
/// puts them within 32 bytes (`inode_sb_ino_words`, set at load), else in two.
#[inline(always)]
pub fn inode_sb_ino(inode: u64) -> Result<(u64, u64)> {
    if has(features::DIRECT_LOADS) {
        return Ok((
            load_ptr(inode, Kind::Inode, off!(inode_sb))?,
            load_u64(inode, Kind::Inode, off!(inode_ino))?,
        ));
    }
    let w = read::<[u64; 4]>(inode, off!(inode_sb))?;
    // SAFETY: reading a field of a static.
    let gap = unsafe { core::ptr::read_volatile(&OFFSETS.inode_sb_ino_words) };
    let ino = match gap {
        1 => w[1],
        2 => w[2],
        3 => w[3],
        _ => read(inode, off!(inode_ino))?,
    };
    Ok((w[0], ino))
}

/// `d_flags` and `d_parent` of a dentry, in one read where the layout allows.
#[inline(always)]
pub fn dentry_flags_parent(dentry: u64) -> Result<(u32, u64)> {
    if has(features::DIRECT_LOADS) {
        return Ok((
            load_u32(dentry, Kind::Dentry, off!(dentry_flags))?,
            load_ptr(dentry, Kind::Dentry, off!(dentry_parent))?,
        ));
    }
    // SAFETY: reading a field of a static.
    let gap = unsafe { core::ptr::read_volatile(&OFFSETS.dentry_flags_parent_words) };
    if gap == 0 {
        return Ok((
            read(dentry, off!(dentry_flags))?,
            read(dentry, off!(dentry_parent))?,
        ));
    }
    let w = read::<[u64; 4]>(dentry, off!(dentry_flags))?;
    let parent = match gap {
        1 => w[1],
        2 => w[2],
        _ => w[3],
    };
    Ok((w[0] as u32, parent))
}

/// Inode number and kernel device number of a dentry.
#[inline(always)]
pub fn dentry_ino_dev(dentry: u64) -> Result<(u64, u32)> {
    let inode = load_u64(dentry, Kind::Dentry, off!(dentry_inode))?;
    let ino = if inode == 0 {
        0
    } else {
        load_u64(inode, Kind::Inode, off!(inode_ino))?
    };
    let sb = load_ptr(dentry, Kind::Dentry, off!(dentry_sb))?;
    let dev = load_u32(sb, Kind::SuperBlock, off!(sb_dev))?;
    Ok((ino, dev))
}

/// `len` capped at `max`, in a shape every verifier can bound: the comparison and the
/// clamp are one register's, written out so the compiler cannot compare one copy and pass
/// another (a spilled one) to a helper, whose bound the 6.1 verifier does not carry over.
#[inline(always)]
pub fn cap(len: usize, max: usize) -> usize {
    let mut v = len as u64;
    // SAFETY: two register instructions, no memory.
    unsafe {
        core::arch::asm!(
            "if {v} <= {max} goto +1",
            "{v} = {max}",
            v = inout(reg) v,
            max = in(reg) max as u64,
            options(pure, nomem, nostack),
        );
    }
    v as usize
}
