//! Loading, attaching and reading the kernel programs.

pub mod btf;
pub mod events;
pub mod offsets;
pub mod preflight;
pub mod sensors;
mod stats;

use std::{io, os::fd::AsFd as _};

use agent_common::{
    drops::DropReason, limits::WATCH_PREFIX_MAX, offsets::ProbeSettings, watch::WatchKey,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, lpm_trie::LpmTrie},
    programs::{BtfTracePoint, ProgramError},
};

use self::{
    btf::{Btf, BtfError},
    offsets::{MissingFeature, OffsetsError},
    preflight::{Capabilities, PreflightError},
};

/// The compiled kernel programs, built by `build.rs` and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// A copy of the kernel programs' object, 8-byte aligned as the ELF reader needs.
struct Object(Vec<u64>);

impl Object {
    fn bytes(&self) -> &[u8] {
        // SAFETY: a `u64` slice viewed as its bytes, same lifetime.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 8) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 8) }
    }
}

/// Rewrites the programs' calls of [`RDONLY_CAST_PLACEHOLDER`] into calls of the
/// `bpf_rdonly_cast` kfunc with BTF id `kfunc` (aya cannot relocate kfunc calls itself), or,
/// without it, into `r0 = r1`: the code that uses them is then dead, and the verifier drops it
/// (it depends on `features::DIRECT_LOADS`).
///
/// [`RDONLY_CAST_PLACEHOLDER`]: agent_common::offsets::RDONLY_CAST_PLACEHOLDER
fn patch_rdonly_casts(elf: &[u8], kfunc: Option<u32>) -> Result<Object, ProbeError> {
    const BPF_CALL: u8 = 0x85;
    const MOV64_REG: u8 = 0xbf;
    const PSEUDO_KFUNC_CALL: u8 = 2;
    let mut object = Object(vec![0u64; elf.len().div_ceil(8)]);
    object.bytes_mut()[..elf.len()].copy_from_slice(elf);
    let placeholder = agent_common::offsets::RDONLY_CAST_PLACEHOLDER.to_le_bytes();
    for range in code_sections(elf)? {
        for insn in object.bytes_mut()[range].chunks_exact_mut(8) {
            // code, dst|src registers, 16-bit offset, 32-bit immediate.
            if insn[0] != BPF_CALL
                || insn[1] != 0
                || insn[2..4] != [0, 0]
                || insn[4..] != placeholder
            {
                continue;
            }
            match kfunc {
                Some(id) => {
                    insn[1] = PSEUDO_KFUNC_CALL << 4;
                    insn[4..].copy_from_slice(&id.to_le_bytes());
                }
                None => {
                    // r0 = r1: dst 0, src 1.
                    insn[0] = MOV64_REG;
                    insn[1] = 1 << 4;
                    insn[4..].copy_from_slice(&[0; 4]);
                }
            }
        }
    }
    Ok(object)
}

/// The byte ranges of the code sections (`SHF_EXECINSTR`) of a little-endian 64-bit ELF
/// object.
fn code_sections(elf: &[u8]) -> Result<Vec<std::ops::Range<usize>>, ProbeError> {
    const SHF_EXECINSTR: u64 = 0x4;
    let outside = || ProbeError::Object("a section lies outside the file");
    // The `N` bytes at `at`, little-endian.
    fn field<const N: usize>(elf: &[u8], at: Option<usize>) -> Result<[u8; N], ProbeError> {
        at.and_then(|at| elf.get(at..at.checked_add(N)?))
            .and_then(|b| b.try_into().ok())
            .ok_or(ProbeError::Object("a header lies outside the file"))
    }
    let u64_at = |at: Option<usize>| field::<8>(elf, at).map(u64::from_le_bytes);
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(ProbeError::Object("not a little-endian 64-bit ELF object"));
    }
    let shoff = u64_at(Some(0x28))? as usize;
    let shentsize = usize::from(u16::from_le_bytes(field(elf, Some(0x3a))?));
    let shnum = usize::from(u16::from_le_bytes(field(elf, Some(0x3c))?));
    let mut code = Vec::new();
    for i in 0..shnum {
        let sh = i.checked_mul(shentsize).and_then(|o| o.checked_add(shoff));
        if u64_at(sh.and_then(|sh| sh.checked_add(8)))? & SHF_EXECINSTR == 0 {
            continue;
        }
        let offset = u64_at(sh.and_then(|sh| sh.checked_add(0x18)))? as usize;
        let size = u64_at(sh.and_then(|sh| sh.checked_add(0x20)))? as usize;
        let end = offset.checked_add(size).ok_or_else(outside)?;
        if end > elf.len() {
            return Err(outside());
        }
        code.push(offset..end);
    }
    Ok(code)
}

/// Where the kernel's BTF is read from.
pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// One kernel hook: the program and the BTF-enabled raw tracepoint it attaches to (which
/// event kinds each serves is `sensors`' business). Program names stay within the 15 bytes
/// the kernel keeps of a name (`tp_*` on tracepoints, `fx_*` on fexit, `floor_*` for the
/// empty ones), so that `bpftool prog` and the kernel's statistics tell them apart.
pub struct Hook {
    pub program: &'static str,
    pub tracepoint: &'static str,
}

pub const HOOKS: &[Hook] = &[
    Hook {
        program: "tp_sys_exit",
        tracepoint: "sys_exit",
    },
    Hook {
        program: "tp_exec",
        tracepoint: "sched_process_exec",
    },
    Hook {
        program: "tp_fork",
        tracepoint: "sched_process_fork",
    },
    Hook {
        program: "tp_exit",
        tracepoint: "sched_process_exit",
    },
];

/// Options that shape the kernel side.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Ring buffer size in bytes (a power of two, at least one page).
    pub ring_buffer_bytes: u32,
    /// Report connect calls.
    pub connect: bool,
    /// Report the connections accepted on these local ports (none: accept is off).
    pub accept_ports: Vec<u16>,
    /// How sensors are picked.
    pub sensors: sensors::SensorMode,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
    #[error("cannot create the kernel maps or load the object: {reason}")]
    Load {
        reason: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the kernel refused program {program} (tp_btf/{tracepoint}): {reason}")]
    Program {
        program: &'static str,
        tracepoint: &'static str,
        reason: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "the kernel has no BTF-enabled raw tracepoint {0} (tp_btf needs Linux >= 5.5 with \
         CONFIG_DEBUG_INFO_BTF)"
    )]
    NoTracepoint(&'static str),
    #[error("the embedded kernel object is malformed: {0} (a broken build of phi-agent)")]
    Object(&'static str),
    #[error("the kernel object has no map {0} (build mismatch between agent and programs)")]
    MissingMap(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Loaded and attached programs with the maps user space needs.
pub struct Probes {
    ebpf: Ebpf,
    drops: PerCpuArray<MapData, u64>,
    stats: stats::ProgramStats,
    pub capabilities: Capabilities,
    /// Kernel fields this kernel lacks, and what that costs.
    pub missing: Vec<MissingFeature>,
    /// Which hook serves each event kind.
    pub selection: sensors::Selection,
    /// What io_uring lets processes do unseen, if it is open to them
    /// ([`preflight::io_uring_limitation`]).
    pub io_uring: Option<String>,
}

/// The watch filter maps.
pub struct WatchMaps {
    pub inodes: HashMap<MapData, WatchKey, u32>,
    pub dentries: HashMap<MapData, u64, u32>,
    pub devs: HashMap<MapData, u32, u32>,
    pub prefixes: LpmTrie<MapData, [u8; WATCH_PREFIX_MAX], u32>,
    pub generation: Array<MapData, u64>,
}

/// Whether kernel lockdown is in a mode that keeps BPF from reading kernel memory.
fn lockdown_confidentiality() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lockdown")
        .map(|s| s.contains("[confidentiality]"))
        .unwrap_or(false)
}

/// Explains a program load/attach failure in terms of the kernel feature involved.
fn explain_program_error(err: &ProgramError) -> String {
    let errno = match err {
        ProgramError::LoadError { io_error, .. } => io_error.raw_os_error(),
        ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    };
    // A verifier log means the kernel looked at the program and refused it: that, not a
    // missing privilege, is the reason, whatever the error number (EACCES or EFAULT).
    let verified = matches!(err, ProgramError::LoadError { verifier_log, .. }
        if verifier_log.to_string().lines().any(|l| !l.trim().is_empty()));
    match errno {
        Some(libc::EPERM | libc::EACCES) if !verified && lockdown_confidentiality() => {
            "permission denied by kernel lockdown (confidentiality mode forbids BPF reading kernel \
             memory): boot with lockdown=integrity or none"
                .into()
        }
        Some(libc::EPERM | libc::EACCES) if !verified => {
            "permission denied: tracing programs need CAP_BPF and CAP_PERFMON (or root), and the \
             kernel must allow BPF tracing (kernel.unprivileged_bpf_disabled does not matter for \
             root; a security module may forbid it)"
                .into()
        }
        Some(524) | Some(libc::EOPNOTSUPP) => {
            "not supported: BTF-enabled raw tracepoints need Linux >= 5.5 with CONFIG_BPF_JIT and \
             CONFIG_DEBUG_INFO_BTF"
                .into()
        }
        _ => match err {
            ProgramError::LoadError { verifier_log, .. }
                if ["BPF program is too large", "is too complex"]
                    .iter()
                    .any(|m| verifier_log.to_string().contains(m)) =>
            {
                "the kernel's verifier gave up: the program needs more verification steps or \
                 branches than this kernel allows; this is a phi-agent bug, please report it \
                 with the kernel version"
                    .into()
            }
            ProgramError::LoadError { verifier_log, .. } => {
                let log = verifier_log.to_string();
                // The verifier's last words, without the statistics it prints after them.
                let statistics = ["verification time", "stack depth", "processed "];
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .filter(|l| {
                        !l.trim().is_empty() && !statistics.iter().any(|s| l.starts_with(s))
                    })
                    .take(3)
                    .collect();
                format!(
                    "the verifier rejected it (this kernel lacks a BPF feature the program \
                     uses): {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )
            }
            other => other.to_string(),
        },
    }
}

fn explain_load_error(err: &aya::EbpfError) -> String {
    use aya::EbpfError;
    match err {
        EbpfError::MapError(aya::maps::MapError::CreateError { name, io_error, .. })
            if name == "EVENTS" =>
        {
            format!(
                "creating the ring buffer failed ({io_error}): BPF ring buffers need Linux >= 5.8"
            )
        }
        EbpfError::MapError(aya::maps::MapError::CreateError { name, io_error, .. }) => {
            format!("creating map {name} failed ({io_error})")
        }
        other => other.to_string(),
    }
}

impl Probes {
    /// Checks the host, reads offsets from BTF, loads and attaches every program.
    pub fn load(opts: &ProbeOptions) -> Result<Self, ProbeError> {
        let capabilities = preflight::check(std::path::Path::new(BTF_PATH))?;
        let kernel_btf = Btf::from_sys_fs()?;
        let resolved = offsets::resolve(&kernel_btf)?;
        for m in &resolved.missing {
            tracing::warn!(field = %m.field, "kernel lacks a field: {}", m.consequence);
        }
        for hook in HOOKS {
            if !kernel_btf.has_btf_tracepoint(hook.tracepoint) {
                return Err(ProbeError::NoTracepoint(hook.tracepoint));
            }
        }
        match Self::load_resolved(opts, &kernel_btf, &resolved, capabilities) {
            Err(e @ ProbeError::Program { .. }) if resolved.rdonly_cast.is_some() => {
                tracing::warn!(
                    "the kernel refused the programs' direct loads of kernel structs through \
                     {} ({e}); loading them with bpf_probe_read_kernel instead, which costs \
                     more per event",
                    offsets::RDONLY_CAST
                );
                let mut missing = resolved.missing.clone();
                missing.push(offsets::MissingFeature {
                    field: format!("kfunc {} (refused by the verifier)", offsets::RDONLY_CAST),
                    consequence: offsets::SLOW_READS,
                });
                let mut fallback = offsets::Resolved {
                    offsets: resolved.offsets,
                    missing,
                    rdonly_cast: None,
                    ring_submit: resolved.ring_submit,
                };
                fallback.offsets.features &= !agent_common::offsets::features::DIRECT_LOADS;
                Self::load_resolved(opts, &kernel_btf, &fallback, capabilities)
            }
            other => other,
        }
    }

    /// Loads and attaches every program with these offsets.
    fn load_resolved(
        opts: &ProbeOptions,
        kernel_btf: &Btf,
        resolved: &offsets::Resolved,
        capabilities: Capabilities,
    ) -> Result<Self, ProbeError> {
        tracing::debug!(
            direct_loads = resolved.rdonly_cast.is_some(),
            "loading the kernel programs"
        );
        let object = patch_rdonly_casts(EBPF_OBJECT, resolved.rdonly_cast)?;
        let settings = ProbeSettings {
            self_tgid: std::process::id(),
            connect_enabled: u32::from(opts.connect),
            wakeup_bytes: wakeup_bytes(
                opts.ring_buffer_bytes,
                aya::util::nr_cpus().map_or(1, |n| n as u32),
            ),
            accept_enabled: u32::from(!opts.accept_ports.is_empty()),
        };
        let aya_btf = aya::Btf::from_sys_fs().map_err(|e| {
            ProbeError::Btf(BtfError::Read {
                path: BTF_PATH.into(),
                source: io::Error::other(e.to_string()),
            })
        })?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&aya_btf))
            .override_global("OFFSETS", &resolved.offsets, true)
            .override_global("SETTINGS", &settings, true)
            .map_max_entries("EVENTS", opts.ring_buffer_bytes)
            .load(object.bytes())
            .map_err(|source| ProbeError::Load {
                reason: explain_load_error(&source),
                source: Box::new(source),
            })?;

        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf).map(spawn_log_reader) {
            tracing::debug!("kernel program log not available: {e}");
        }

        set_accept_ports(&mut ebpf, &opts.accept_ports)?;
        // exec, fork and exit first; then the fexit sensors where they load and fire; then
        // sys_exit for whatever they do not serve.
        let off_mask = if opts.accept_ports.is_empty() {
            1 << agent_common::sensor::group::ACCEPT
        } else {
            0
        };
        let selection = sensors::select(
            &mut ebpf,
            &aya_btf,
            &kernel_btf.function_names(),
            opts.sensors,
            off_mask,
        );
        sensors::publish(&mut ebpf, selection.served()).map_err(|source| ProbeError::Map {
            map: "FEXIT_SERVES",
            source,
        })?;
        tracing::info!(
            bpf_lsm_active = selection.bpf_lsm_active,
            "BPF-LSM is reported, not used: its hooks run before an operation's outcome is known"
        );
        for (kind, reason) in &selection.fallbacks {
            tracing::info!(kind = %kind, "served by the sys_exit tracepoint: {reason}");
        }
        let mut program_ids = Vec::new();
        let needs_sys_exit = selection.served() != agent_common::sensor::group::ALL_BITS;
        for hook in HOOKS {
            if hook.tracepoint == "sys_exit" && !needs_sys_exit {
                continue;
            }
            let program: &mut BtfTracePoint = ebpf
                .program_mut(hook.program)
                .ok_or(ProbeError::MissingMap(hook.program))?
                .try_into()
                .map_err(|source| ProbeError::Program {
                    program: hook.program,
                    tracepoint: hook.tracepoint,
                    reason: "not a tp_btf program".into(),
                    source: Box::new(source),
                })?;
            let fail = |source: ProgramError| ProbeError::Program {
                program: hook.program,
                tracepoint: hook.tracepoint,
                reason: explain_program_error(&source),
                source: Box::new(source),
            };
            let started = std::time::Instant::now();
            program.load(hook.tracepoint, &aya_btf).map_err(fail)?;
            log_verified(hook.program, started, program.info().ok());
            program.attach().map_err(fail)?;
            match program.fd().map(|fd| fd.as_fd().try_clone_to_owned()) {
                Ok(Ok(fd)) => program_ids.push((hook.program, fd)),
                _ => tracing::warn!(
                    program = hook.program,
                    "cannot watch the program's skip counter; skipped runs will not be reported"
                ),
            }
            tracing::debug!(
                program = hook.program,
                "attached tp_btf/{}",
                hook.tracepoint
            );
        }

        let mut selection = selection;
        let ring = attach_io_uring(&mut ebpf, &aya_btf, resolved, &mut program_ids);
        match ring {
            RingCoverage::None => {}
            RingCoverage::Opens => selection.sensors.push((
                "io-uring".to_owned(),
                format!("tp_btf/{IO_URING_TRACEPOINT}"),
            )),
            RingCoverage::OpensAndFailures(submit) => selection.sensors.push((
                "io-uring".to_owned(),
                format!("tp_btf/{IO_URING_TRACEPOINT}, tp_btf/{submit}"),
            )),
        }

        for g in sensors::GROUPS {
            if selection.fexit_mask & (1 << g.index) == 0 {
                continue;
            }
            for p in g.programs {
                if let Some(Ok(Ok(fd))) = ebpf
                    .program(p.name)
                    .map(|prog| prog.fd().map(|fd| fd.as_fd().try_clone_to_owned()))
                {
                    program_ids.push((p.name, fd));
                }
            }
        }

        let drops = PerCpuArray::try_from(
            ebpf.take_map("DROPS")
                .ok_or(ProbeError::MissingMap("DROPS"))?,
        )
        .map_err(|source| ProbeError::Map {
            map: "DROPS",
            source,
        })?;
        Ok(Probes {
            ebpf,
            drops,
            stats: stats::ProgramStats::new(program_ids),
            capabilities,
            missing: resolved.missing.clone(),
            selection,
            io_uring: preflight::io_uring_limitation(kernel_btf, ring),
        })
    }

    /// Takes the event ring buffer (once), mapped for reading.
    pub fn take_events(&mut self) -> Result<events::EventRing, ProbeError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(ProbeError::MissingMap("EVENTS"))?;
        let aya::maps::Map::RingBuf(data) = map else {
            return Err(ProbeError::Map {
                map: "EVENTS",
                source: aya::maps::MapError::InvalidMapType { map_type: 0 },
            });
        };
        let size = data
            .info()
            .map_err(|source| ProbeError::Map {
                map: "EVENTS",
                source,
            })?
            .max_entries() as usize;
        events::EventRing::new(data, size).map_err(|e| ProbeError::Map {
            map: "EVENTS",
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "mmap",
                io_error: e,
            }),
        })
    }

    /// Takes the watch filter maps (once).
    pub fn take_watch_maps(&mut self) -> Result<WatchMaps, ProbeError> {
        let mut take =
            |name: &'static str| self.ebpf.take_map(name).ok_or(ProbeError::MissingMap(name));
        let inodes = take("WATCH_INODES")?;
        let dentries = take("WATCH_DENTRIES")?;
        let devs = take("WATCH_DEVS")?;
        let prefixes = take("WATCH_PREFIXES")?;
        let generation = take("GENERATION")?;
        Ok(WatchMaps {
            inodes: HashMap::try_from(inodes).map_err(|source| ProbeError::Map {
                map: "WATCH_INODES",
                source,
            })?,
            dentries: HashMap::try_from(dentries).map_err(|source| ProbeError::Map {
                map: "WATCH_DENTRIES",
                source,
            })?,
            generation: Array::try_from(generation).map_err(|source| ProbeError::Map {
                map: "GENERATION",
                source,
            })?,
            devs: HashMap::try_from(devs).map_err(|source| ProbeError::Map {
                map: "WATCH_DEVS",
                source,
            })?,
            prefixes: LpmTrie::try_from(prefixes).map_err(|source| ProbeError::Map {
                map: "WATCH_PREFIXES",
                source,
            })?,
        })
    }

    /// Totals of the kernel drop counters, summed over CPUs, plus runs the kernel skipped
    /// because a program was already active on that CPU.
    pub fn counters(&self) -> Counters {
        let mut by_reason = [0u64; DropReason::COUNT as usize];
        for reason in DropReason::ALL {
            if let Ok(values) = self.drops.get(&(reason as u32), 0) {
                by_reason[reason as usize] = values.iter().sum();
            }
        }
        Counters {
            by_reason,
            program_busy: self.stats.recursion_misses()
                + by_reason[DropReason::ProgramBusy as usize],
        }
    }

    /// Logs how often each program ran and its mean cost (when `kernel.bpf_stats_enabled`
    /// is on).
    pub fn log_run_times(&self) {
        for (program, runs, ns) in self.stats.run_times() {
            if runs > 0 && ns > 0 {
                tracing::info!(program, runs, mean_ns = ns / runs, "kernel program cost");
            }
        }
    }

    /// Which hook serves each event kind, as (kind, sensor).
    pub fn sensors(&self) -> Vec<(String, String)> {
        self.selection.sensors.clone()
    }
}

/// The tracepoint at which io_uring completes requests.
const IO_URING_TRACEPOINT: &str = "io_uring_complete";

/// What the io_uring programs record on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingCoverage {
    /// Nothing: opens and renames through a ring pass unseen.
    None,
    /// Successful opens (and renames); a failed open is not recorded.
    Opens,
    /// Opens, failed ones included, and renames; submissions are seen at this tracepoint.
    OpensAndFailures(&'static str),
}

/// Attaches the io_uring completion program where the kernel has io_uring and the fields it
/// reads (`features::IO_URING`), and the submission program that keeps open requests' names
/// where it can (`features::IO_URING_NAMES`). A kernel that refuses them costs the records
/// of opens through a ring, not the agent: that is logged and the start record says what is
/// missed.
fn attach_io_uring(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    resolved: &offsets::Resolved,
    program_ids: &mut Vec<(&'static str, std::os::fd::OwnedFd)>,
) -> RingCoverage {
    use agent_common::offsets::features;
    let features = resolved.offsets.features;
    if features & features::IO_URING == 0 {
        tracing::info!(
            "no io_uring completions to read on this kernel (no io_uring, or not the fields \
             phi-agent reads)"
        );
        return RingCoverage::None;
    }
    // The submission program first: a request submitted between the two attaches then has
    // its name kept before its completion is looked at. `ring_submit` is set exactly when
    // `features::IO_URING_NAMES` is.
    let submit = match resolved.ring_submit {
        Some(tracepoint) => {
            match attach_tp_btf(ebpf, btf, "tp_ring_submit", tracepoint, program_ids) {
                Ok(()) => Some(tracepoint),
                Err(reason) => {
                    tracing::warn!(
                        "the kernel refused the io_uring submission program (tp_btf/\
                         {tracepoint}): {reason}; failed opens through an io_uring will not \
                         be recorded"
                    );
                    None
                }
            }
        }
        None => {
            tracing::info!(
                "io_uring submissions cannot be read on this kernel: failed opens through an \
                 io_uring will not be recorded"
            );
            None
        }
    };
    match attach_tp_btf(
        ebpf,
        btf,
        "tp_ring_complete",
        IO_URING_TRACEPOINT,
        program_ids,
    ) {
        Ok(()) if let Some(tracepoint) = submit => RingCoverage::OpensAndFailures(tracepoint),
        Ok(()) => RingCoverage::Opens,
        Err(reason) => {
            tracing::warn!(
                "the kernel refused the io_uring completion program (tp_btf/{}): {reason}; \
                 opens through an io_uring will not be recorded",
                IO_URING_TRACEPOINT
            );
            RingCoverage::None
        }
    }
}

/// Loads and attaches the `tp_btf` program `program` to `tracepoint`, keeping its descriptor
/// for the statistics; the error says why the kernel refused it.
fn attach_tp_btf(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    program: &'static str,
    tracepoint: &str,
    program_ids: &mut Vec<(&'static str, std::os::fd::OwnedFd)>,
) -> Result<(), String> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or("the object has no such program (a broken build)")?
        .try_into()
        .map_err(|e: ProgramError| e.to_string())?;
    let started = std::time::Instant::now();
    prog.load(tracepoint, btf)
        .map_err(|e| explain_program_error(&e))?;
    log_verified(program, started, prog.info().ok());
    prog.attach().map_err(|e| explain_program_error(&e))?;
    if let Ok(Ok(fd)) = prog.fd().map(|fd| fd.as_fd().try_clone_to_owned()) {
        program_ids.push((program, fd));
    }
    tracing::debug!(program, "attached tp_btf/{tracepoint}");
    Ok(())
}

/// Logs (at debug level) how long the kernel took to verify and load a program and how many
/// instructions its verifier walked: the figure to watch when a program grows, since slow
/// verification delays the agent's start on every host (and most on emulated ones).
pub(crate) fn log_verified(
    program: &str,
    started: std::time::Instant,
    info: Option<aya::programs::ProgramInfo>,
) {
    tracing::debug!(
        program,
        load_ms = started.elapsed().as_millis() as u64,
        verified_insns = info.and_then(|i| i.verified_instruction_count()),
        "program verified"
    );
}

/// Empty programs on the same hooks (see `phi-agent floor`).
const FLOOR: &[(&str, &str)] = &[
    ("floor_sys_exit", "sys_exit"),
    ("floor_exec", "sched_process_exec"),
    ("floor_fork", "sched_process_fork"),
    ("floor_exit", "sched_process_exit"),
];

/// Fills `ACCEPT_PORTS` with the local ports whose accepted connections are reported.
fn set_accept_ports(ebpf: &mut aya::Ebpf, ports: &[u16]) -> Result<(), ProbeError> {
    let map = ebpf
        .map_mut("ACCEPT_PORTS")
        .ok_or(ProbeError::MissingMap("ACCEPT_PORTS"))?;
    let mut map =
        aya::maps::HashMap::<_, u16, u8>::try_from(map).map_err(|source| ProbeError::Map {
            map: "ACCEPT_PORTS",
            source,
        })?;
    for port in ports {
        map.insert(port, 1, 0).map_err(|source| ProbeError::Map {
            map: "ACCEPT_PORTS",
            source,
        })?;
    }
    Ok(())
}

/// Attaches only the empty programs, to the agent's hooks; they stay attached while the
/// returned object lives.
pub fn attach_floor() -> Result<aya::Ebpf, ProbeError> {
    preflight::check(std::path::Path::new(BTF_PATH)).map_err(ProbeError::Preflight)?;
    let aya_btf = aya::Btf::from_sys_fs().map_err(|e| {
        ProbeError::Btf(BtfError::Read {
            path: BTF_PATH.into(),
            source: io::Error::other(e.to_string()),
        })
    })?;
    // The empty programs make no kfunc calls; the rewrite keeps the object valid as a whole.
    let object = patch_rdonly_casts(EBPF_OBJECT, None)?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&aya_btf))
        .load(object.bytes())
        .map_err(|source| ProbeError::Load {
            reason: explain_load_error(&source),
            source: Box::new(source),
        })?;
    for (name, tracepoint) in FLOOR {
        let program: &mut BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or(ProbeError::MissingMap(name))?
            .try_into()
            .map_err(|source| ProbeError::Program {
                program: name,
                tracepoint,
                reason: "not a tp_btf program".into(),
                source: Box::new(source),
            })?;
        let fail = |source: ProgramError| ProbeError::Program {
            program: name,
            tracepoint,
            reason: explain_program_error(&source),
            source: Box::new(source),
        };
        program.load(tracepoint, &aya_btf).map_err(fail)?;
        program.attach().map_err(fail)?;
    }
    Ok(ebpf)
}

/// Kernel-side loss and truncation totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub by_reason: [u64; DropReason::COUNT as usize],
    pub program_busy: u64,
}

impl Counters {
    pub fn get(&self, reason: DropReason) -> u64 {
        self.by_reason[reason as usize]
    }
}

fn spawn_log_reader<T: log::Log + Send + 'static>(logger: aya_log::EbpfLogger<T>) {
    // SAFETY: the logger owns its ring buffer fd for as long as the `AsyncFd` holds it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// How many bytes of events each CPU sends before it wakes the agent: an eighth of the ring
/// buffer (at most 256 KiB) shared among the CPUs that may send, at least 4 KiB. So the
/// ring holds at most about that eighth, however the events spread over CPUs, before some
/// CPU wakes the agent; below it the agent picks events up on its poll timer.
pub fn wakeup_bytes(ring_buffer_bytes: u32, cpus: u32) -> u32 {
    ((ring_buffer_bytes / 8).min(256 * 1024) / cpus.max(1)).max(4096)
}

/// Default size of the event ring buffer.
pub fn default_ring_buffer_bytes() -> u32 {
    agent_common::limits::DEFAULT_RING_BUFFER_BYTES
}

/// Checks a ring buffer size: a power of two and at least one page.
pub fn validate_ring_buffer_bytes(bytes: u64) -> Result<u32, String> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    if bytes < page || !bytes.is_power_of_two() || bytes > (1 << 30) {
        return Err(format!(
            "ring buffer size {bytes} must be a power of two between {page} (one page) and 1 GiB"
        ));
    }
    Ok(bytes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each CPU's share of the wakeup threshold: together the CPUs never let more than an
    /// eighth of the ring (at most 256 KiB) wait before one of them wakes the agent, unless
    /// the 4 KiB floor per CPU is what bounds it.
    #[test]
    fn the_wakeup_threshold_is_shared_among_cpus() {
        let ring = default_ring_buffer_bytes();
        assert_eq!(wakeup_bytes(ring, 1), 256 * 1024);
        assert_eq!(wakeup_bytes(ring, 2), 128 * 1024);
        assert_eq!(wakeup_bytes(ring, 512), 4096);
        assert_eq!(wakeup_bytes(ring, 0), 256 * 1024);
        assert_eq!(wakeup_bytes(64 * 1024, 2), 4096);
        for cpus in [1, 2, 3, 7, 16, 96] {
            for ring in [4096u32, 64 << 10, 1 << 20, 8 << 20, 1 << 30] {
                let each = wakeup_bytes(ring, cpus);
                assert!(each >= 4096);
                let bound = u64::from((ring / 8).min(256 * 1024)).max(4096 * u64::from(cpus));
                assert!(u64::from(each) * u64::from(cpus) <= bound, "{ring} {cpus}");
            }
        }
    }

    /// The instructions of the object's code sections matching `want` (8 bytes).
    fn count(elf: &[u8], want: impl Fn(&[u8]) -> bool) -> usize {
        code_sections(elf)
            .expect("an ELF object")
            .into_iter()
            .map(|r| elf[r].chunks_exact(8).filter(|i| want(i)).count())
            .sum()
    }

    fn placeholder(i: &[u8]) -> bool {
        i[0] == 0x85
            && i[1] == 0
            && i[4..] == agent_common::offsets::RDONLY_CAST_PLACEHOLDER.to_le_bytes()
    }

    #[test]
    fn placeholder_calls_become_kfunc_calls_or_register_moves() {
        let calls = count(EBPF_OBJECT, placeholder);
        assert!(
            calls >= 10,
            "the programs read kernel structs through casts ({calls} calls)"
        );

        let object = patch_rdonly_casts(EBPF_OBJECT, Some(0x0001_2345)).expect("patched");
        let bytes = &object.bytes()[..EBPF_OBJECT.len()];
        assert_eq!(count(bytes, placeholder), 0);
        let kfunc =
            |i: &[u8]| i[0] == 0x85 && i[1] == 0x20 && i[4..] == 0x0001_2345u32.to_le_bytes();
        assert_eq!(count(bytes, kfunc), calls);
        // Nothing else changed.
        let changed = EBPF_OBJECT
            .iter()
            .zip(bytes)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            changed <= calls * 5,
            "{changed} bytes changed for {calls} calls"
        );

        let object = patch_rdonly_casts(EBPF_OBJECT, None).expect("patched");
        let bytes = &object.bytes()[..EBPF_OBJECT.len()];
        assert_eq!(count(bytes, placeholder), 0);
        let mov = |i: &[u8]| i == [0xbf, 0x10, 0, 0, 0, 0, 0, 0];
        assert!(count(bytes, mov) >= calls);
    }

    #[test]
    fn a_malformed_object_is_refused() {
        assert!(matches!(
            patch_rdonly_casts(b"not an object", None),
            Err(ProbeError::Object(_))
        ));
        let mut truncated = EBPF_OBJECT[..64].to_vec();
        truncated[0x28..0x30].copy_from_slice(&1_000_000u64.to_le_bytes());
        assert!(matches!(
            patch_rdonly_casts(&truncated, None),
            Err(ProbeError::Object(_))
        ));
        // Section headers that point past the end of the address space.
        truncated[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            patch_rdonly_casts(&truncated, None),
            Err(ProbeError::Object(_))
        ));
    }
}
