//! Sensor selection: which kernel hook serves each event kind on this kernel.
//!
//! exec, fork and exit always come from their BTF tracepoints (`tp_btf/sched_process_*`):
//! they fire only for their event, after it happened. The open family, connect, accept and the
//! calls that change directories or mounts ("path changes") come either from per-call `fexit`
//! programs on the system call functions, where the kernel allows `fexit` and they fire, or
//! from the `sys_exit` raw tracepoint, which runs for every system call. Both read the same
//! saved registers and run the same code, so they give the same records.
//!
//! BPF-LSM hooks (`file_open`, `socket_connect`, `bprm_check_security`) are not used for
//! these records: they run before the operation's outcome is known (a record must carry it)
//! and never run for the failures an audit needs most (a lookup that fails with ENOENT or
//! EACCES never reaches `file_open`). Whether BPF-LSM is active is still reported.

use std::collections::HashSet;

use agent_common::sensor::group;
use aya::{
    Btf as AyaBtf, Ebpf,
    maps::{Array, PerCpuArray},
    programs::{FExit, ProgramError},
};
use serde::Deserialize;

/// How the agent picks sensors (`[probes] sensors` in the config file).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SensorMode {
    /// `fexit` where it loads and fires, tracepoints otherwise (the default).
    #[default]
    Auto,
    /// Tracepoints only.
    Tracepoints,
}

impl std::str::FromStr for SensorMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(SensorMode::Auto),
            "tracepoints" => Ok(SensorMode::Tracepoints),
            other => Err(format!(
                "sensors must be \"auto\" or \"tracepoints\", not {other:?}"
            )),
        }
    }
}

/// A sensor group: the kinds it serves and its `fexit` programs.
pub struct Group {
    pub index: u32,
    /// Event kind (or "path-changes") as the start record and metrics name it.
    pub kind: &'static str,
    pub programs: &'static [Program],
}

/// One `fexit` program: its name in the object, what it serves and the kernel functions it
/// can attach to, in order of preference (names changed across releases).
pub struct Program {
    pub name: &'static str,
    pub serves: &'static str,
    pub functions: &'static [&'static str],
    /// An i386 entry: needed only when the kernel has 32-bit system calls.
    pub ia32: bool,
}

const fn on(
    name: &'static str,
    serves: &'static str,
    functions: &'static [&'static str],
) -> Program {
    Program {
        name,
        serves,
        functions,
        ia32: false,
    }
}

const fn ia32(
    name: &'static str,
    serves: &'static str,
    functions: &'static [&'static str],
) -> Program {
    Program {
        ia32: true,
        ..on(name, serves, functions)
    }
}

/// The groups, as data: the loader, the start record and the docs follow it. Each function is
/// one that every system call it serves goes through, on both ABIs, so one program (one
/// verification) serves the whole family.
pub const GROUPS: &[Group] = &[
    Group {
        index: group::OPEN,
        kind: "open",
        programs: &[on(
            "fx_open",
            "open, openat, openat2, creat",
            &["do_sys_openat2"],
        )],
    },
    Group {
        index: group::CONNECT,
        kind: "connect",
        programs: &[on("fx_connect", "connect, socketcall", &["__sys_connect"])],
    },
    Group {
        index: group::ACCEPT,
        kind: "accept",
        programs: &[on(
            "fx_accept",
            "accept, accept4, socketcall",
            &["__sys_accept4"],
        )],
    },
    Group {
        index: group::HOUSEKEEPING,
        kind: "path-changes",
        programs: &[
            on("fx_chdir", "chdir, fchdir", &["set_fs_pwd"]),
            on(
                "fx_rename",
                "rename, renameat, renameat2",
                &["do_renameat2"],
            ),
            on("fx_rmdir", "rmdir, unlinkat(AT_REMOVEDIR)", &["do_rmdir"]),
            on("fx_mount", "mount", &["path_mount"]),
            on("fx_umount", "umount, umount2", &["path_umount"]),
            on("fx_pivot_root64", "pivot_root", &["__x64_sys_pivot_root"]),
            ia32("fx_pivot_root32", "pivot_root", &["__ia32_sys_pivot_root"]),
            on("fx_move_mount64", "move_mount", &["__x64_sys_move_mount"]),
            ia32("fx_move_mount32", "move_mount", &["__ia32_sys_move_mount"]),
            on(
                "fx_mount_setattr64",
                "mount_setattr",
                &["__x64_sys_mount_setattr"],
            ),
            ia32(
                "fx_mount_setattr32",
                "mount_setattr",
                &["__ia32_sys_mount_setattr"],
            ),
        ],
    },
];

/// The sensor serving each kind, and why a group fell back to the tracepoint.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Bit per group served by `fexit`.
    pub fexit_mask: u32,
    /// Bit per group that records nothing in this configuration (accept without ports): no
    /// sensor serves it, and it does not keep `sys_exit` attached.
    pub off_mask: u32,
    /// (kind, sensor) for every kind, in a stable order.
    pub sensors: Vec<(String, String)>,
    /// (kind, reason) for each group left on `sys_exit` in auto mode.
    pub fallbacks: Vec<(String, String)>,
    /// Whether `bpf` is an active LSM (reported; not used for records).
    pub bpf_lsm_active: bool,
    /// (group index, kernel function) of every attached `fexit` program.
    pub attached: Vec<(u32, String)>,
}

impl Selection {
    /// Bit per group that `sys_exit` leaves alone: served by `fexit`, or off.
    pub fn served(&self) -> u32 {
        self.fexit_mask | self.off_mask
    }

    /// The kernel functions `g`'s programs are attached to.
    pub fn functions(&self, g: &Group) -> Vec<&str> {
        self.attached
            .iter()
            .filter(|(i, _)| *i == g.index)
            .map(|(_, f)| f.as_str())
            .collect()
    }
}

/// Whether `bpf` is in the kernel's active LSM list.
pub fn bpf_lsm_active() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .map(|s| s.trim().split(',').any(|l| l == "bpf"))
        .unwrap_or(false)
}

/// Loads and attaches each group's `fexit` programs, checks that they fire for the agent's
/// own calls, and keeps the groups that do; the others are unloaded and left to `sys_exit`.
pub fn select(
    ebpf: &mut Ebpf,
    btf: &AyaBtf,
    functions: &HashSet<String>,
    mode: SensorMode,
    off_mask: u32,
) -> Selection {
    let mut selection = Selection {
        bpf_lsm_active: bpf_lsm_active(),
        off_mask,
        ..Selection::default()
    };
    if mode == SensorMode::Tracepoints {
        return finish(selection, "forced by sensors = \"tracepoints\"");
    }
    // 32-bit entries are needed only where the kernel runs 32-bit system calls at all.
    let has_ia32 = functions.iter().any(|f| f.starts_with("__ia32_sys_"));
    let mut attached = Vec::new();
    for g in GROUPS.iter().filter(|g| off_mask & (1 << g.index) == 0) {
        match attach_group(ebpf, btf, functions, has_ia32, g) {
            Ok(list) => {
                selection
                    .attached
                    .extend(list.into_iter().map(|f| (g.index, f)));
                attached.push(g);
            }
            Err(reason) => {
                unload_group(ebpf, g);
                selection.fallbacks.push((g.kind.to_owned(), reason));
            }
        }
    }
    if !attached.is_empty() {
        exercise();
        let hits = hits(ebpf);
        for g in attached {
            if hits.get(g.index as usize).copied().unwrap_or(0) > 0 {
                selection.fexit_mask |= 1 << g.index;
            } else {
                unload_group(ebpf, g);
                selection.attached.retain(|(i, _)| *i != g.index);
                selection.fallbacks.push((
                    g.kind.to_owned(),
                    "the fexit programs attached but never ran for the agent's own calls"
                        .to_owned(),
                ));
            }
        }
    }
    finish(selection, "")
}

fn finish(mut selection: Selection, forced: &str) -> Selection {
    for g in GROUPS {
        let sensor = if selection.off_mask & (1 << g.index) != 0 {
            "off".to_owned()
        } else if selection.fexit_mask & (1 << g.index) != 0 {
            format!("fexit/{}", selection.functions(g).join(","))
        } else {
            if !forced.is_empty() {
                selection
                    .fallbacks
                    .push((g.kind.to_owned(), forced.to_owned()));
            }
            "tp_btf/sys_exit".to_owned()
        };
        selection.sensors.push((g.kind.to_owned(), sensor));
    }
    for (kind, tp) in [
        ("exec", "sched_process_exec"),
        ("fork", "sched_process_fork"),
        ("exit", "sched_process_exit"),
    ] {
        selection
            .sensors
            .push((kind.to_owned(), format!("tp_btf/{tp}")));
    }
    selection
}

fn attach_group(
    ebpf: &mut Ebpf,
    btf: &AyaBtf,
    functions: &HashSet<String>,
    has_ia32: bool,
    g: &Group,
) -> Result<Vec<String>, String> {
    let mut attached = Vec::new();
    for p in g.programs {
        let Some(function) = p.functions.iter().find(|f| functions.contains(**f)) else {
            if p.ia32 && !has_ia32 {
                continue;
            }
            return Err(format!(
                "the kernel has no function {} for {} (BTF lists none of them)",
                p.functions.join(" or "),
                p.serves
            ));
        };
        let program: &mut FExit = ebpf
            .program_mut(p.name)
            .ok_or_else(|| format!("the kernel object has no program {}", p.name))?
            .try_into()
            .map_err(|e: ProgramError| format!("{}: {e}", p.name))?;
        let started = std::time::Instant::now();
        program
            .load(function, btf)
            .map_err(|e| format!("fexit/{function}: {}", fexit_error(&e)))?;
        super::log_verified(p.name, started, program.info().ok());
        program
            .attach()
            .map_err(|e| format!("fexit/{function}: {}", fexit_error(&e)))?;
        tracing::debug!(
            program = p.name,
            serves = p.serves,
            "attached fexit/{function}"
        );
        attached.push((*function).to_owned());
    }
    Ok(attached)
}

/// Why `fexit` cannot be used, in terms of the kernel feature.
fn fexit_error(err: &ProgramError) -> String {
    let errno = match err {
        ProgramError::LoadError { io_error, .. } => io_error.raw_os_error(),
        ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(libc::EPERM | libc::EACCES) => format!(
            "loading was refused with {} ({}): this kernel refuses fexit programs (BPF trampolines need Linux >= 5.5 on \
             x86_64 with CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS, and no lockdown or security \
             module forbidding them)",
            if errno == Some(libc::EPERM) {
                "EPERM"
            } else {
                "EACCES"
            },
            std::io::Error::from_raw_os_error(errno.unwrap_or(libc::EPERM))
        ),
        Some(libc::ENOTSUP) | Some(524) => format!(
            "{err}: this kernel has no BPF trampoline for the function (fexit needs \
             CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS)"
        ),
        _ => err.to_string(),
    }
}

fn unload_group(ebpf: &mut Ebpf, g: &Group) {
    for p in g.programs {
        if let Some(program) = ebpf.program_mut(p.name)
            && let Ok(program) = <&mut FExit>::try_from(program)
        {
            // Not loaded is fine: the group may have failed before this program.
            let _ = program.unload();
        }
    }
}

/// One call of each group from the agent itself: an open, a connect (UDP, nothing is sent),
/// an accept of a loopback connection to itself and a rename in a scratch directory.
fn exercise() {
    let _ = std::fs::File::open("/");
    if let Ok(socket) = std::net::UdpSocket::bind("127.0.0.1:0") {
        let _ = socket.connect("127.0.0.1:9");
    }
    if let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0")
        && let Ok(addr) = listener.local_addr()
        && let Ok(_client) = std::net::TcpStream::connect(addr)
    {
        let _ = listener.accept();
    }
    let dir = std::env::temp_dir().join(format!(".phi-agent-sensors-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_ok() {
        let a = dir.join("a");
        if std::fs::write(&a, b"").is_ok() {
            let _ = std::fs::rename(&a, dir.join("b"));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn hits(ebpf: &mut Ebpf) -> Vec<u64> {
    let Some(map) = ebpf.map("SENSOR_HITS") else {
        return Vec::new();
    };
    let Ok(hits) = PerCpuArray::<_, u64>::try_from(map) else {
        return Vec::new();
    };
    (0..group::COUNT)
        .map(|i| hits.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
        .collect()
}

/// Tells `sys_exit` which groups the `fexit` programs serve.
pub fn publish(ebpf: &mut Ebpf, mask: u32) -> Result<(), aya::maps::MapError> {
    let map = ebpf
        .map_mut("FEXIT_SERVES")
        .ok_or(aya::maps::MapError::InvalidName {
            name: "FEXIT_SERVES".into(),
        })?;
    let mut serves = Array::<_, u32>::try_from(map)?;
    serves.set(0, mask, 0)
}
