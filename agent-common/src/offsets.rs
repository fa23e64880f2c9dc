//! Kernel structure field offsets. The agent reads them from the running kernel's BTF at load
//! time and hands them to the kernel programs in the read-only global `OFFSETS`; nothing is
//! hard-coded. Composite offsets (`file_dentry` = `file.f_path` + `path.dentry`) are summed in
//! user space so the programs add less.

/// Offset value meaning "this field does not exist in the running kernel".
pub const ABSENT: u32 = u32::MAX;

/// Feature bits of [`KernelOffsets::features`].
pub mod features {
    /// `task_struct.loginuid` exists (`CONFIG_AUDIT`).
    pub const LOGINUID: u32 = 1 << 0;
    /// `task_struct.sessionid` exists (`CONFIG_AUDIT`).
    pub const SESSIONID: u32 = 1 << 1;
    /// `thread_info.status` exists: 32-bit compat system calls can be recognized.
    pub const COMPAT: u32 = 1 << 2;
    /// `task_struct.start_boottime` exists.
    pub const START_BOOTTIME: u32 = 1 << 3;
    /// `sock.sk_type`/`sk_protocol` are plain fields (not bitfields).
    pub const SK_TYPE: u32 = 1 << 4;
    /// `sock_common.skc_v6_daddr` exists (`CONFIG_IPV6`).
    pub const IPV6: u32 = 1 << 5;
    /// The kernel has the `bpf_rdonly_cast` kfunc (6.2 and later): the programs follow
    /// kernel pointers with plain loads checked against BTF instead of
    /// `bpf_probe_read_kernel` calls.
    pub const DIRECT_LOADS: u32 = 1 << 6;
    /// `task_struct.cgroups->dfl_cgrp->kn->id` can be followed with direct loads: the event
    /// header's cgroup id costs a few loads instead of a `bpf_get_current_cgroup_id` call.
    pub const CGROUP_LOADS: u32 = 1 << 7;
    /// The kernel has io_uring and the fields its completions are read from: opens through
    /// a ring are recorded and renames through one make remembered verdicts stale.
    pub const IO_URING: u32 = 1 << 8;
    /// The ring's table of direct descriptors is an array of pointers to nodes that hold
    /// the file (Linux 6.13 and later), not an array of the file words themselves.
    pub const IO_URING_NODES: u32 = 1 << 9;
    /// The kernel traces io_uring submissions with the request (`io_uring_submit_req`) and
    /// the open request's name can be read there: a failed open through a ring is recorded
    /// with the name it was given.
    pub const IO_URING_NAMES: u32 = 1 << 10;
}

/// The helper number the programs call where they mean the `bpf_rdonly_cast` kfunc. No
/// helper has this number: the agent rewrites every such call before loading, into the
/// kfunc call (with the kfunc's BTF id) or, on kernels without it, into `r0 = r1`.
pub const RDONLY_CAST_PLACEHOLDER: i32 = 0x7ead_ca57;

/// Byte offsets of every kernel field the programs read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// [`features`] bits.
    pub features: u32,

    // struct pt_regs (x86_64)
    pub regs_orig_ax: u32,
    pub regs_di: u32,
    pub regs_si: u32,
    pub regs_dx: u32,
    pub regs_r10: u32,
    pub regs_bx: u32,
    pub regs_cx: u32,

    // struct task_struct
    pub task_tgid: u32,
    pub task_pid: u32,
    pub task_real_parent: u32,
    pub task_group_leader: u32,
    /// `task_struct.flags` (`PF_*`).
    pub task_flags: u32,
    pub task_loginuid: u32,
    pub task_sessionid: u32,
    pub task_cred: u32,
    pub task_files: u32,
    pub task_fs: u32,
    pub task_mm: u32,
    pub task_signal: u32,
    pub task_exit_code: u32,
    pub task_start_boottime: u32,
    /// `task_struct.thread_info.status`.
    pub task_ti_status: u32,
    /// `task_struct.comm` (16 bytes, NUL-terminated and padded).
    pub task_comm: u32,
    /// `task_struct.cgroups` (`struct css_set *`).
    pub task_cgroups: u32,

    // The default hierarchy's cgroup id: `css_set.dfl_cgrp`, `cgroup.kn`, `kernfs_node.id`.
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,

    // struct cred
    pub cred_uid: u32,
    pub cred_gid: u32,
    pub cred_euid: u32,
    pub cred_egid: u32,

    // struct files_struct / fdtable
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,

    // struct file
    /// `file.f_path.dentry`.
    pub file_dentry: u32,
    /// `file.f_path.mnt`.
    pub file_vfsmnt: u32,
    pub file_private_data: u32,

    // struct dentry
    /// `dentry.d_flags`.
    pub dentry_flags: u32,
    /// `(d_parent - d_flags) / 8` when 1, 2 or 3 (one 32-byte read gives both), else 0.
    pub dentry_flags_parent_words: u32,
    /// `DCACHE_ENTRY_TYPE` mask and the directory types (`DCACHE_DIRECTORY_TYPE`,
    /// `DCACHE_AUTODIR_TYPE`) of `d_flags`.
    pub dcache_type_mask: u32,
    pub dcache_directory_type: u32,
    pub dcache_autodir_type: u32,
    pub dentry_parent: u32,
    /// `dentry.d_name.len`.
    pub dentry_name_len: u32,
    /// `dentry.d_name.name`.
    pub dentry_name_ptr: u32,
    pub dentry_inode: u32,
    pub dentry_sb: u32,

    pub inode_ino: u32,
    pub inode_sb: u32,
    /// `(inode_ino - inode_sb) / 8` when that is 1, 2 or 3 (both fit one 32-byte read),
    /// else 0.
    pub inode_sb_ino_words: u32,
    pub sb_dev: u32,

    // struct mount / vfsmount
    /// `mount.mnt` (the embedded `vfsmount`).
    pub mount_vfsmnt: u32,
    pub mount_parent: u32,
    pub mount_mountpoint: u32,
    pub vfsmnt_root: u32,

    // struct fs_struct
    /// `fs_struct.root.dentry`.
    pub fs_root_dentry: u32,
    /// `fs_struct.root.mnt`.
    pub fs_root_vfsmnt: u32,
    /// `fs_struct.pwd.dentry`.
    pub fs_pwd_dentry: u32,
    /// `fs_struct.pwd.mnt`.
    pub fs_pwd_vfsmnt: u32,

    // struct mm_struct
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub mm_env_start: u32,
    pub mm_env_end: u32,

    // struct linux_binprm
    pub bprm_file: u32,
    pub bprm_filename: u32,

    /// `signal_struct.live.counter`.
    pub signal_live: u32,

    // struct socket / sock / sock_common
    pub socket_sk: u32,
    /// `sock.__sk_common.skc_family`.
    pub sk_family: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_dport: u32,
    pub sk_num: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_type: u32,
    pub sk_protocol: u32,

    // io_uring (features::IO_URING): `io_kiocb.opcode`, `io_kiocb.cqe.res`; the open
    // request in the command area (`io_kiocb.cmd`, a `struct io_open`): `file_slot`, `dfd`,
    // `how.flags`, `how.mode`; the ring's direct descriptors: the array pointer and the
    // number of slots in `io_ring_ctx`, and (with features::IO_URING_NODES) the file word
    // in each node.
    pub req_opcode: u32,
    pub req_res: u32,
    pub req_open_file_slot: u32,
    pub req_open_dfd: u32,
    pub req_open_flags: u32,
    pub req_open_mode: u32,
    pub ctx_fixed_files: u32,
    pub ctx_fixed_count: u32,
    pub rsrc_node_file: u32,
    // (features::IO_URING_NAMES) the open request's `struct filename *` and its `name`.
    pub req_open_filename: u32,
    pub filename_name: u32,

    // BTF type ids of the structs the programs read with direct loads
    // ([`features::DIRECT_LOADS`]).
    pub btf_task_struct: u32,
    pub btf_file: u32,
    pub btf_dentry: u32,
    pub btf_inode: u32,
    pub btf_super_block: u32,
    pub btf_mount: u32,
    pub btf_fs_struct: u32,
    pub btf_cred: u32,
    pub btf_linux_binprm: u32,
    pub btf_mm_struct: u32,
    pub btf_signal_struct: u32,
    pub btf_socket: u32,
    pub btf_sock: u32,
    /// `struct list_head`, whose first member is a pointer: the type through which one
    /// pointer-sized slot of an array (the file table) is loaded.
    pub btf_slot: u32,
    pub btf_css_set: u32,
    pub btf_cgroup: u32,
    pub btf_kernfs_node: u32,
}

impl KernelOffsets {
    /// All offsets zero, for the kernel programs' placeholder global.
    pub const ZERO: KernelOffsets = KernelOffsets {
        features: 0,
        regs_orig_ax: 0,
        regs_di: 0,
        regs_si: 0,
        regs_dx: 0,
        regs_r10: 0,
        regs_bx: 0,
        regs_cx: 0,
        task_tgid: 0,
        task_pid: 0,
        task_real_parent: 0,
        task_group_leader: 0,
        task_flags: 0,
        task_loginuid: 0,
        task_sessionid: 0,
        task_cred: 0,
        task_files: 0,
        task_fs: 0,
        task_mm: 0,
        task_signal: 0,
        task_exit_code: 0,
        task_start_boottime: 0,
        task_ti_status: 0,
        task_comm: 0,
        task_cgroups: 0,
        css_set_dfl_cgrp: 0,
        cgroup_kn: 0,
        kernfs_node_id: 0,
        cred_uid: 0,
        cred_gid: 0,
        cred_euid: 0,
        cred_egid: 0,
        files_fdt: 0,
        fdt_max_fds: 0,
        fdt_fd: 0,
        file_dentry: 0,
        file_vfsmnt: 0,
        file_private_data: 0,
        dentry_flags: 0,
        dentry_flags_parent_words: 0,
        dcache_type_mask: 0,
        dcache_directory_type: 0,
        dcache_autodir_type: 0,
        dentry_parent: 0,
        dentry_name_len: 0,
        dentry_name_ptr: 0,
        dentry_inode: 0,
        dentry_sb: 0,
        inode_ino: 0,
        inode_sb: 0,
        inode_sb_ino_words: 0,
        sb_dev: 0,
        mount_vfsmnt: 0,
        mount_parent: 0,
        mount_mountpoint: 0,
        vfsmnt_root: 0,
        fs_root_dentry: 0,
        fs_root_vfsmnt: 0,
        fs_pwd_dentry: 0,
        fs_pwd_vfsmnt: 0,
        mm_arg_start: 0,
        mm_arg_end: 0,
        mm_env_start: 0,
        mm_env_end: 0,
        bprm_file: 0,
        bprm_filename: 0,
        signal_live: 0,
        socket_sk: 0,
        sk_family: 0,
        sk_daddr: 0,
        sk_rcv_saddr: 0,
        sk_dport: 0,
        sk_num: 0,
        sk_v6_daddr: 0,
        sk_v6_rcv_saddr: 0,
        sk_type: 0,
        sk_protocol: 0,
        req_opcode: 0,
        req_res: 0,
        req_open_file_slot: 0,
        req_open_dfd: 0,
        req_open_flags: 0,
        req_open_mode: 0,
        ctx_fixed_files: 0,
        ctx_fixed_count: 0,
        rsrc_node_file: 0,
        req_open_filename: 0,
        filename_name: 0,
        btf_task_struct: 0,
        btf_file: 0,
        btf_dentry: 0,
        btf_inode: 0,
        btf_super_block: 0,
        btf_mount: 0,
        btf_fs_struct: 0,
        btf_cred: 0,
        btf_linux_binprm: 0,
        btf_mm_struct: 0,
        btf_signal_struct: 0,
        btf_socket: 0,
        btf_sock: 0,
        btf_slot: 0,
        btf_css_set: 0,
        btf_cgroup: 0,
        btf_kernfs_node: 0,
    };
}

/// Run-time settings of the kernel programs (read-only global `SETTINGS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeSettings {
    /// The agent's own process id: its own activity is not reported.
    pub self_tgid: u32,
    /// Report connect calls (1) or not (0).
    pub connect_enabled: u32,
    /// Each CPU wakes the agent once per this many bytes of events it sends (the agent also
    /// polls on a short timer), so that a burst costs one wakeup per so many bytes, not one
    /// per event.
    pub wakeup_bytes: u32,
    /// Report accepted connections (1: on the local ports in `ACCEPT_PORTS`) or not (0).
    pub accept_enabled: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]` structs of `u32` only, no padding.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProbeSettings {}
}

const _: () = assert!(core::mem::size_of::<KernelOffsets>().is_multiple_of(4));
