//! Kernel structure offsets for the programs, read from the running kernel's BTF.

use agent_common::offsets::{KernelOffsets, features};

use super::btf::{Btf, BtfError};

/// A field the programs need but the kernel does not have, with what is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingFeature {
    pub field: String,
    pub consequence: &'static str,
}

/// Offsets plus the optional features this kernel lacks.
pub struct Resolved {
    pub offsets: KernelOffsets,
    pub missing: Vec<MissingFeature>,
    /// The BTF id of the `bpf_rdonly_cast` kfunc, when the kernel has it (then
    /// `features::DIRECT_LOADS` is set).
    pub rdonly_cast: Option<u32>,
    /// The tracepoint that passes each request submitted to an io_uring, when the kernel has
    /// one the submission program can read (then `features::IO_URING_NAMES` is set).
    pub ring_submit: Option<&'static str>,
}

/// The kfunc behind direct loads of kernel structs (Linux 6.2 and later).
pub const RDONLY_CAST: &str = "bpf_rdonly_cast";

/// What is lost without direct loads.
pub const SLOW_READS: &str = "kernel structs are read with bpf_probe_read_kernel, which costs \
    more per event (Linux 6.2 and later read them with direct loads)";

#[derive(Debug, thiserror::Error)]
#[error(
    "the running kernel's BTF lacks a field phi-agent needs ({source}); this kernel is not supported"
)]
pub struct OffsetsError {
    #[source]
    source: BtfError,
}

/// Resolves every offset. Required fields fail the load; optional ones clear a feature bit.
pub fn resolve(btf: &Btf) -> Result<Resolved, OffsetsError> {
    let req = |s: &str, path: &[&str]| -> Result<u32, OffsetsError> {
        btf.member(s, path)
            .map(|m| m.offset)
            .map_err(|source| OffsetsError { source })
    };
    let mut missing = Vec::new();
    let mut features = 0u32;
    let mut opt = |s: &str, path: &[&str], bit: u32, consequence: &'static str| -> u32 {
        match btf.member(s, path) {
            Ok(m) => {
                features |= bit;
                m.offset
            }
            Err(_) => {
                missing.push(MissingFeature {
                    field: format!("{s}.{}", path.join(".")),
                    consequence,
                });
                agent_common::offsets::ABSENT
            }
        }
    };

    let task_loginuid = opt(
        "task_struct",
        &["loginuid"],
        features::LOGINUID,
        "login uid unavailable (kernel without CONFIG_AUDITSYSCALL)",
    );
    let task_sessionid = opt(
        "task_struct",
        &["sessionid"],
        features::SESSIONID,
        "audit session id unavailable (kernel without CONFIG_AUDITSYSCALL)",
    );
    let task_start_boottime = opt(
        "task_struct",
        &["start_boottime"],
        features::START_BOOTTIME,
        "process start times unavailable",
    );
    let ti_status = opt(
        "thread_info",
        &["status"],
        features::COMPAT,
        "32-bit compat system calls are not recognized",
    );
    let sk_type = opt(
        "sock",
        &["sk_type"],
        features::SK_TYPE,
        "socket type and protocol of connections unavailable",
    );
    let sk_protocol = if sk_type == agent_common::offsets::ABSENT {
        sk_type
    } else {
        opt(
            "sock",
            &["sk_protocol"],
            features::SK_TYPE,
            "socket protocol unavailable",
        )
    };
    let sk_v6_daddr = opt(
        "sock_common",
        &["skc_v6_daddr"],
        features::IPV6,
        "IPv6 connection addresses come from the caller only (kernel without CONFIG_IPV6)",
    );
    let sk_v6_rcv_saddr = if sk_v6_daddr == agent_common::offsets::ABSENT {
        sk_v6_daddr
    } else {
        opt(
            "sock_common",
            &["skc_v6_rcv_saddr"],
            features::IPV6,
            "IPv6 local address unavailable",
        )
    };
    let task_ti = if ti_status == agent_common::offsets::ABSENT {
        0
    } else {
        // thread_info is embedded in task_struct (CONFIG_THREAD_INFO_IN_TASK).
        match btf.member("task_struct", &["thread_info"]) {
            Ok(m) => m.offset,
            Err(_) => {
                features &= !features::COMPAT;
                missing.push(MissingFeature {
                    field: "task_struct.thread_info".into(),
                    consequence: "32-bit compat system calls are not recognized",
                });
                0
            }
        }
    };

    let sock_common = req("sock", &["__sk_common"])?;
    let inode_sb = req("inode", &["i_sb"])?;
    let inode_ino = req("inode", &["i_ino"])?;
    let inode_sb_ino_words = match inode_ino.checked_sub(inode_sb) {
        Some(d) if d % 8 == 0 && (8..=24).contains(&d) => d / 8,
        _ => 0,
    };
    let dentry_flags = req("dentry", &["d_flags"])?;
    let dentry_parent = req("dentry", &["d_parent"])?;
    let dentry_flags_parent_words = match dentry_parent.checked_sub(dentry_flags) {
        Some(d) if d % 8 == 0 && (8..=24).contains(&d) && dentry_flags % 8 == 0 => d / 8,
        _ => 0,
    };
    // Dentry type bits: an enum in recent kernels, long-stable macro values before.
    let flag = |name: &str, fallback: u32| btf.enum_value(name).map_or(fallback, |v| v as u32);
    let file_vfsmnt = req("file", &["f_path", "mnt"])?;
    let file_dentry = req("file", &["f_path", "dentry"])?;
    if file_dentry != file_vfsmnt + 8 {
        return Err(OffsetsError {
            source: BtfError::Malformed("struct path is not { mnt, dentry }"),
        });
    }
    let rdonly_cast = btf.function_id(RDONLY_CAST);
    if rdonly_cast.is_some() {
        features |= features::DIRECT_LOADS;
    } else {
        missing.push(MissingFeature {
            field: format!("kfunc {RDONLY_CAST}"),
            consequence: SLOW_READS,
        });
    }
    let type_id = |name: &str| {
        btf.struct_id(name)
            .map_err(|source| OffsetsError { source })
    };
    // The cgroup id by direct loads needs the chain of fields and their structs' type ids;
    // without any of them the programs ask `bpf_get_current_cgroup_id` (same value).
    let cgroup = (|| -> Option<[u32; 7]> {
        let member = |s: &str, f: &str| btf.member(s, &[f]).ok().map(|m| m.offset);
        let id = |s: &str| btf.struct_id(s).ok();
        Some([
            member("task_struct", "cgroups")?,
            member("css_set", "dfl_cgrp")?,
            member("cgroup", "kn")?,
            member("kernfs_node", "id")?,
            id("css_set")?,
            id("cgroup")?,
            id("kernfs_node")?,
        ])
    })();
    if cgroup.is_some() && features & features::DIRECT_LOADS != 0 {
        features |= features::CGROUP_LOADS;
    }
    let [
        task_cgroups,
        css_set_dfl_cgrp,
        cgroup_kn,
        kernfs_node_id,
        btf_css_set,
        btf_cgroup,
        btf_kernfs_node,
    ] = cgroup.unwrap_or([0; 7]);
    let ring = io_uring(btf);
    if let Some(r) = &ring {
        features |= features::IO_URING;
        if r.nodes {
            features |= features::IO_URING_NODES;
        }
        if r.names.is_some() {
            features |= features::IO_URING_NAMES;
        }
    }
    let ring_submit = ring.as_ref().and_then(|r| r.names).map(|n| n.0);
    let ring = ring.unwrap_or_default();
    let offsets = KernelOffsets {
        features,
        regs_orig_ax: req("pt_regs", &["orig_ax"])?,
        regs_di: req("pt_regs", &["di"])?,
        regs_si: req("pt_regs", &["si"])?,
        regs_dx: req("pt_regs", &["dx"])?,
        regs_r10: req("pt_regs", &["r10"])?,
        regs_bx: req("pt_regs", &["bx"])?,
        regs_cx: req("pt_regs", &["cx"])?,
        task_tgid: req("task_struct", &["tgid"])?,
        task_pid: req("task_struct", &["pid"])?,
        task_real_parent: req("task_struct", &["real_parent"])?,
        task_group_leader: req("task_struct", &["group_leader"])?,
        task_flags: req("task_struct", &["flags"])?,
        task_loginuid,
        task_sessionid,
        task_cred: req("task_struct", &["cred"])?,
        task_files: req("task_struct", &["files"])?,
        task_fs: req("task_struct", &["fs"])?,
        task_mm: req("task_struct", &["mm"])?,
        task_signal: req("task_struct", &["signal"])?,
        task_exit_code: req("task_struct", &["exit_code"])?,
        task_start_boottime,
        task_ti_status: task_ti.wrapping_add(ti_status),
        task_comm: req("task_struct", &["comm"])?,
        task_cgroups,
        css_set_dfl_cgrp,
        cgroup_kn,
        kernfs_node_id,
        cred_uid: req("cred", &["uid"])?,
        cred_gid: req("cred", &["gid"])?,
        cred_euid: req("cred", &["euid"])?,
        cred_egid: req("cred", &["egid"])?,
        files_fdt: req("files_struct", &["fdt"])?,
        fdt_max_fds: req("fdtable", &["max_fds"])?,
        fdt_fd: req("fdtable", &["fd"])?,
        file_dentry,
        file_vfsmnt,
        file_private_data: req("file", &["private_data"])?,
        dentry_flags,
        dentry_flags_parent_words,
        dcache_type_mask: flag("DCACHE_ENTRY_TYPE", 7 << 20),
        dcache_directory_type: flag("DCACHE_DIRECTORY_TYPE", 2 << 20),
        dcache_autodir_type: flag("DCACHE_AUTODIR_TYPE", 3 << 20),
        dentry_parent,
        dentry_name_len: req("dentry", &["d_name", "len"])?,
        dentry_name_ptr: req("dentry", &["d_name", "name"])?,
        dentry_inode: req("dentry", &["d_inode"])?,
        dentry_sb: req("dentry", &["d_sb"])?,
        inode_ino,
        inode_sb,
        inode_sb_ino_words,
        sb_dev: req("super_block", &["s_dev"])?,
        mount_vfsmnt: req("mount", &["mnt"])?,
        mount_parent: req("mount", &["mnt_parent"])?,
        mount_mountpoint: req("mount", &["mnt_mountpoint"])?,
        vfsmnt_root: req("vfsmount", &["mnt_root"])?,
        fs_root_dentry: req("fs_struct", &["root", "dentry"])?,
        fs_root_vfsmnt: req("fs_struct", &["root", "mnt"])?,
        fs_pwd_dentry: req("fs_struct", &["pwd", "dentry"])?,
        fs_pwd_vfsmnt: req("fs_struct", &["pwd", "mnt"])?,
        mm_arg_start: req("mm_struct", &["arg_start"])?,
        mm_arg_end: req("mm_struct", &["arg_end"])?,
        mm_env_start: req("mm_struct", &["env_start"])?,
        mm_env_end: req("mm_struct", &["env_end"])?,
        bprm_file: req("linux_binprm", &["file"])?,
        bprm_filename: req("linux_binprm", &["filename"])?,
        signal_live: req("signal_struct", &["live"])?,
        socket_sk: req("socket", &["sk"])?,
        sk_family: sock_common + req("sock_common", &["skc_family"])?,
        sk_daddr: sock_common + req("sock_common", &["skc_daddr"])?,
        sk_rcv_saddr: sock_common + req("sock_common", &["skc_rcv_saddr"])?,
        sk_dport: sock_common + req("sock_common", &["skc_dport"])?,
        sk_num: sock_common + req("sock_common", &["skc_num"])?,
        sk_v6_daddr: sock_common.wrapping_add(sk_v6_daddr),
        sk_v6_rcv_saddr: sock_common.wrapping_add(sk_v6_rcv_saddr),
        sk_type,
        sk_protocol,
        req_opcode: ring.opcode,
        req_res: ring.res,
        req_open_file_slot: ring.open_file_slot,
        req_open_dfd: ring.open_dfd,
        req_open_flags: ring.open_flags,
        req_open_mode: ring.open_mode,
        ctx_fixed_files: ring.fixed_files,
        ctx_fixed_count: ring.fixed_count,
        rsrc_node_file: ring.node_file,
        req_open_filename: ring.names.map_or(0, |n| n.1),
        filename_name: ring.names.map_or(0, |n| n.2),
        btf_task_struct: type_id("task_struct")?,
        btf_file: type_id("file")?,
        btf_dentry: type_id("dentry")?,
        btf_inode: type_id("inode")?,
        btf_super_block: type_id("super_block")?,
        btf_mount: type_id("mount")?,
        btf_fs_struct: type_id("fs_struct")?,
        btf_cred: type_id("cred")?,
        btf_linux_binprm: type_id("linux_binprm")?,
        btf_mm_struct: type_id("mm_struct")?,
        btf_signal_struct: type_id("signal_struct")?,
        btf_socket: type_id("socket")?,
        btf_sock: type_id("sock")?,
        btf_slot: type_id("list_head")?,
        btf_css_set,
        btf_cgroup,
        btf_kernfs_node,
    };
    Ok(Resolved {
        offsets,
        missing,
        rdonly_cast,
        ring_submit,
    })
}

/// Where the io_uring completion program reads a request and its ring.
#[derive(Default)]
struct IoUringOffsets {
    opcode: u32,
    res: u32,
    open_file_slot: u32,
    open_dfd: u32,
    open_flags: u32,
    open_mode: u32,
    fixed_files: u32,
    fixed_count: u32,
    node_file: u32,
    nodes: bool,
    /// The submission tracepoint, `io_open.filename` (in the command area) and
    /// `filename.name`, where the submission tracepoint passes the request first
    /// (`features::IO_URING_NAMES`).
    names: Option<(&'static str, u32, u32)>,
}

/// The io_uring offsets, when the kernel has io_uring, its completion tracepoint and every
/// field the program reads (`None`: opens through a ring stay unrecorded, which the start
/// record says).
fn io_uring(btf: &Btf) -> Option<IoUringOffsets> {
    if !btf.has_btf_tracepoint("io_uring_complete")
        || btf.btf_tracepoint_args("io_uring_complete")? < 2
    {
        return None;
    }
    let at = |s: &str, path: &[&str]| btf.member(s, path).ok().map(|m| m.offset);
    // The open request lives in the request's command area.
    let cmd = at("io_kiocb", &["cmd"])?;
    // Direct descriptors: since 6.13 `file_table.data` { nr, nodes } with the file word in
    // each node; before, `file_table.files` (the file words) and `nr_user_files`.
    let (fixed_files, fixed_count, node_file, nodes) =
        match at("io_ring_ctx", &["file_table", "data", "nodes"]) {
            Some(table) => (
                table,
                at("io_ring_ctx", &["file_table", "data", "nr"])?,
                at("io_rsrc_node", &["file_ptr"])?,
                true,
            ),
            None => (
                at("io_ring_ctx", &["file_table", "files"])?,
                at("io_ring_ctx", &["nr_user_files"])?,
                at("io_fixed_file", &["file_ptr"])?,
                false,
            ),
        };
    Some(IoUringOffsets {
        opcode: at("io_kiocb", &["opcode"])?,
        res: at("io_kiocb", &["cqe", "res"])?,
        open_file_slot: cmd + at("io_open", &["file_slot"])?,
        open_dfd: cmd + at("io_open", &["dfd"])?,
        open_flags: cmd + at("io_open", &["how", "flags"])?,
        open_mode: cmd + at("io_open", &["how", "mode"])?,
        fixed_files,
        fixed_count,
        node_file,
        nodes,
        names: io_uring_names(btf, cmd),
    })
}

/// The tracepoint at which submitted requests are seen, and where a submitted open request's
/// name is (`io_open.filename` in the command area at `cmd`, then `filename.name`): the
/// request is the tracepoint's first argument, after the kernel prepared it
/// (`io_uring_submit_req`, Linux 6.4 and later; `io_uring_submit_sqe` before, with a second
/// argument).
fn io_uring_names(btf: &Btf, cmd: u32) -> Option<(&'static str, u32, u32)> {
    let tracepoint = [("io_uring_submit_req", 1), ("io_uring_submit_sqe", 2)]
        .into_iter()
        .find(|&(name, args)| {
            btf.has_btf_tracepoint(name) && btf.btf_tracepoint_args(name) == Some(args)
        })?
        .0;
    let filename = btf.member("io_open", &["filename"]).ok()?.offset;
    let name = btf.member("filename", &["name"]).ok()?.offset;
    Some((tracepoint, cmd + filename, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_kernel_offsets_are_plausible() {
        let btf = Btf::from_sys_fs().expect("kernel BTF present");
        let r = resolve(&btf).expect("offsets resolve on the host kernel");
        let o = r.offsets;
        // pt_regs is a fixed user ABI on x86_64: orig_ax follows the 15 general registers.
        assert_eq!(o.regs_orig_ax, 15 * 8);
        assert_eq!(o.regs_di, 14 * 8);
        // cred: euid follows uid, gid, suid, sgid.
        assert_eq!(o.cred_euid, o.cred_uid + 16);
        assert_eq!(o.cred_egid, o.cred_euid + 4);
        // d_name.name follows d_name.len in struct qstr.
        assert!(o.dentry_name_ptr > o.dentry_name_len);
        assert_ne!(
            o.features & features::LOGINUID,
            0,
            "this kernel has CONFIG_AUDIT"
        );
        assert!(
            r.missing.is_empty(),
            "missing on host kernel: {:?}",
            r.missing
        );
        // This kernel (6.18) has the kfunc: the programs read kernel structs directly.
        assert!(r.rdonly_cast.is_some());
        assert_ne!(o.features & features::DIRECT_LOADS, 0);
        assert!(o.btf_file != 0 && o.btf_dentry != o.btf_file && o.btf_slot != 0);
        // And follows the cgroup id with direct loads.
        assert_ne!(o.features & features::CGROUP_LOADS, 0);
        assert!(o.btf_css_set != 0 && o.btf_cgroup != 0 && o.btf_kernfs_node != 0);
        // io_uring completions can be read; 6.18 keeps direct descriptors in nodes.
        assert_ne!(o.features & features::IO_URING, 0);
        assert_ne!(o.features & features::IO_URING_NODES, 0);
        assert_ne!(o.features & features::IO_URING_NAMES, 0);
        assert!(o.req_open_filename != 0 && o.req_open_filename != o.req_open_dfd);
        // `struct io_cqe` { user_data, res }, and the open request's `how` follows its
        // file, dfd, file_slot and filename.
        assert_eq!(
            o.req_res,
            btf.member("io_kiocb", &["cqe"])
                .expect("io_kiocb.cqe")
                .offset
                + 8
        );
        assert!(o.req_open_flags > o.req_open_file_slot && o.req_open_mode == o.req_open_flags + 8);
    }
}
