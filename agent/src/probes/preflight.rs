//! Checks before anything is loaded, each failing with one line that names the fix.

use std::path::Path;

/// Linux capabilities the agent cares about (numbers from `linux/capability.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    DacReadSearch = 2,
    SysPtrace = 19,
    SysAdmin = 21,
    SysResource = 24,
    Perfmon = 38,
    Bpf = 39,
}

impl Cap {
    /// What the agent uses, in the order it reports them.
    pub const ALL: [Cap; 6] = [
        Cap::Bpf,
        Cap::Perfmon,
        Cap::DacReadSearch,
        Cap::SysPtrace,
        Cap::SysResource,
        Cap::SysAdmin,
    ];

    /// What a complete record needs (CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON;
    /// CAP_SYS_RESOURCE only matters before Linux 5.11, which the agent does not support).
    pub const NEEDED: [Cap; 4] = [Cap::Bpf, Cap::Perfmon, Cap::DacReadSearch, Cap::SysPtrace];

    pub const fn name(self) -> &'static str {
        match self {
            Cap::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::SysResource => "CAP_SYS_RESOURCE",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }

    /// What the records lack when the agent runs without this capability.
    const fn consequence(self) -> &'static str {
        match self {
            Cap::DacReadSearch => {
                "watched directories this user cannot search are refused, and /proc details of \
                 other users' processes may be missing"
            }
            Cap::SysPtrace => {
                "the executable, working directory and environment (ssh origin) of other users' \
                 processes that started before the agent are not recorded"
            }
            Cap::Bpf | Cap::Perfmon | Cap::SysAdmin | Cap::SysResource => "",
        }
    }
}

/// The effective capability set of this process.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities(u64);

impl Capabilities {
    pub fn current() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Self::from_status(&status)
    }

    fn from_status(status: &str) -> Self {
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        Capabilities(eff)
    }

    pub fn has(self, cap: Cap) -> bool {
        self.0 & (1u64 << cap as u32) != 0
    }

    /// Names of the capabilities of [`Cap::ALL`] that are held.
    pub fn held(self) -> Vec<String> {
        Cap::ALL
            .iter()
            .filter(|c| self.has(**c))
            .map(|c| c.name().to_owned())
            .collect()
    }

    /// Names of the capabilities of [`Cap::NEEDED`] that are not held (CAP_SYS_ADMIN covers
    /// CAP_BPF and CAP_PERFMON).
    pub fn lacking(self) -> Vec<String> {
        Cap::NEEDED
            .iter()
            .filter(|c| {
                let covered = matches!(c, Cap::Bpf | Cap::Perfmon) && self.has(Cap::SysAdmin);
                !self.has(**c) && !covered
            })
            .map(|c| c.name().to_owned())
            .collect()
    }

    /// For each needed capability not held, what the records will lack.
    pub fn consequences(self) -> Vec<String> {
        Cap::NEEDED
            .iter()
            .filter(|c| !self.has(**c) && !c.consequence().is_empty())
            .map(|c| format!("without {}: {}", c.name(), c.consequence()))
            .collect()
    }

    /// Loading tracing programs needs CAP_BPF with CAP_PERFMON, or CAP_SYS_ADMIN.
    pub fn can_load_probes(self) -> bool {
        (self.has(Cap::Bpf) && self.has(Cap::Perfmon)) || self.has(Cap::SysAdmin)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "kernel BTF not found at {0}: phi-agent needs a kernel built with CONFIG_DEBUG_INFO_BTF=y \
         (Linux >= 5.11; most distribution kernels since 2021 have it)"
    )]
    NoBtf(String),
    #[error(
        "phi-agent lacks the privileges to load kernel probes (has: {held}): run it as root, or \
         grant CAP_BPF and CAP_PERFMON (plus CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE for complete \
         records), e.g. `setcap cap_bpf,cap_perfmon,cap_dac_read_search,cap_sys_ptrace+ep phi-agent` \
         or AmbientCapabilities= in the systemd unit"
    )]
    Privileges { held: String },
    #[error(
        "Linux {found} is too old: phi-agent needs Linux >= 5.11 with BTF (BPF ring buffers, BTF task pointers)"
    )]
    KernelTooOld { found: String },
}

/// The running kernel's release string (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Where the kernel says who may use io_uring (Linux 6.6 and later).
const IO_URING_DISABLED: &str = "/proc/sys/kernel/io_uring_disabled";

/// What the records miss because of io_uring, or `None` when no process can use it or
/// nothing is missed. A file opened through an io_uring (`IORING_OP_OPENAT`) is opened by the
/// kernel on the ring's behalf, not by an `open` system call, so the probes on system call
/// exits do not see it; likewise a rename through one. `recorded` tells what the io_uring
/// programs attached here record. `btf` is the running kernel's.
pub fn io_uring_limitation(btf: &super::btf::Btf, recorded: super::RingCoverage) -> Option<String> {
    let setting = std::fs::read_to_string(IO_URING_DISABLED).ok();
    io_uring_limitation_for(setting.as_deref(), recorded, || has_io_uring(btf))
}

/// Whether the kernel was built with io_uring (its BTF describes the system call).
fn has_io_uring(btf: &super::btf::Btf) -> bool {
    ["io_uring_setup", "__x64_sys_io_uring_setup"]
        .iter()
        .any(|f| btf.function_id(f).is_some())
}

/// [`io_uring_limitation`] for the contents of `kernel.io_uring_disabled` (`None`: no such
/// setting), `in_kernel` telling whether the kernel was built with io_uring.
fn io_uring_limitation_for(
    setting: Option<&str>,
    recorded: super::RingCoverage,
    in_kernel: impl FnOnce() -> bool,
) -> Option<String> {
    const FIX: &str = "set kernel.io_uring_disabled=2 (sysctl) on hosts that hold ePHI";
    // Renames through a ring do not pass the system calls either, so without the completion
    // program the kernel's remembered verdicts of directories are not renewed by them.
    const UNSEEN: &str = "files opened through an io_uring are not recorded, and a directory \
                          renamed through one may for a while be judged by its old place \
                          (watched or not)";
    // With it, successful opens are recorded; a failed one has no file, and the kernel has
    // dropped the name it was given before it reports the failure.
    const FAILED: &str = "an attempt to open a file through an io_uring that fails is not \
                          recorded (successful opens through a ring are)";
    let missed = match recorded {
        super::RingCoverage::None => UNSEEN,
        super::RingCoverage::Opens => FAILED,
        super::RingCoverage::OpensAndFailures(_) => return None,
    };
    match setting.map(str::trim) {
        Some("2") => None,
        Some("1") => Some(format!(
            "io_uring is open to root and to the members of kernel.io_uring_group \
             (kernel.io_uring_disabled=1): {missed}; {FIX}"
        )),
        Some("0") => Some(format!(
            "io_uring is open to every process (kernel.io_uring_disabled=0): {missed}; {FIX}"
        )),
        Some(other) => Some(format!(
            "io_uring may be open to processes (kernel.io_uring_disabled={other}, a value this \
             agent does not know): {missed}; {FIX}"
        )),
        None if in_kernel() => Some(format!(
            "io_uring is open to every process and this kernel cannot switch it off (no \
             kernel.io_uring_disabled before Linux 6.6): {missed}; on hosts that hold ePHI use \
             Linux 6.6 or later with kernel.io_uring_disabled=2, or a kernel built without \
             io_uring"
        )),
        None => None,
    }
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

/// Runs every check. Raises `RLIMIT_MEMLOCK` for kernels that still charge BPF memory to it.
pub fn check(btf_path: &Path) -> Result<Capabilities, PreflightError> {
    let release = kernel_release();
    if let Some(v) = parse_version(&release)
        && v < (5, 11)
    {
        return Err(PreflightError::KernelTooOld { found: release });
    }
    if !btf_path.exists() {
        return Err(PreflightError::NoBtf(btf_path.display().to_string()));
    }
    let caps = Capabilities::current();
    if !caps.can_load_probes() {
        let held = caps.held();
        return Err(PreflightError::Privileges {
            held: if held.is_empty() {
                "none".into()
            } else {
                held.join(", ")
            },
        });
    }
    raise_memlock();
    Ok(caps)
}

/// Kernels before 5.11 account BPF maps against `RLIMIT_MEMLOCK`; lift it where allowed.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain system call with a valid struct.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if ret != 0 {
        tracing::debug!(
            "could not lift RLIMIT_MEMLOCK ({}); only matters before Linux 5.11",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn io_uring_is_a_limitation_unless_disabled_for_everyone() {
        use super::io_uring_limitation_for as limitation;
        let never = || -> bool { panic!("the kernel is only searched without the setting") };
        use crate::probes::RingCoverage;
        for recorded in [RingCoverage::None, RingCoverage::Opens] {
            assert_eq!(limitation(Some("2\n"), recorded, never), None);
            let open = limitation(Some("0\n"), recorded, never).expect("open to all");
            assert!(
                open.contains("every process") && open.contains("kernel.io_uring_disabled=2"),
                "{open}"
            );
            let group = limitation(Some("1\n"), recorded, never).expect("open to a group");
            assert!(
                group.contains("io_uring_group") && group.contains("not recorded"),
                "{group}"
            );
            let odd = limitation(Some("7"), recorded, never).expect("unknown value");
            assert!(odd.contains("kernel.io_uring_disabled=7"), "{odd}");
            let old = limitation(None, recorded, || true).expect("no switch");
            assert!(old.contains("Linux 6.6"), "{old}");
            assert_eq!(limitation(None, recorded, || false), None);
        }
        // Without the completion program every open and rename through a ring is unseen;
        // with it, only failed opens.
        let unseen = limitation(Some("0"), RingCoverage::None, never).expect("open to all");
        assert!(
            unseen.contains("files opened through an io_uring are not recorded")
                && unseen.contains("renamed through one"),
            "{unseen}"
        );
        let failed = limitation(Some("0"), RingCoverage::Opens, never).expect("open to all");
        assert!(
            failed.contains("fails is not recorded")
                && failed.contains("successful opens through a ring are")
                && !failed.contains("renamed"),
            "{failed}"
        );
        // With the submission program too, nothing through a ring goes unrecorded, whoever
        // may use it.
        for setting in [Some("0"), Some("1"), Some("2"), Some("7"), None] {
            assert_eq!(
                limitation(
                    setting,
                    RingCoverage::OpensAndFailures("io_uring_submit_req"),
                    || true
                ),
                None,
                "{setting:?}"
            );
        }
    }

    #[test]
    fn this_kernel_has_io_uring() {
        // This kernel has the setting; the fallback for kernels without it must still
        // recognize io_uring in a kernel's BTF.
        let btf = super::super::btf::Btf::from_sys_fs().expect("kernel BTF");
        assert!(super::has_io_uring(&btf));
    }

    use super::*;

    #[test]
    fn missing_btf_names_the_kernel_option() {
        let err = check(Path::new("/nonexistent/vmlinux")).expect_err("no BTF there");
        let msg = err.to_string();
        assert!(msg.contains("CONFIG_DEBUG_INFO_BTF"), "{msg}");
        assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");
        assert_eq!(msg.lines().count(), 1);
    }

    #[test]
    fn parses_kernel_versions() {
        assert_eq!(parse_version("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(parse_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_version("5.10rc1"), Some((5, 10)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn reads_capabilities_from_status() {
        let caps = Capabilities::from_status("Name:\tx\nCapEff:\t000000c000000000\n");
        assert!(caps.has(Cap::Bpf) && caps.has(Cap::Perfmon));
        assert!(!caps.has(Cap::SysAdmin));
        assert!(caps.can_load_probes());
        let none = Capabilities::from_status("CapEff:\t0000000000000000\n");
        assert!(!none.can_load_probes());
        assert_eq!(none.held(), Vec::<String>::new());
        assert!(none.lacking().contains(&"CAP_BPF".to_owned()));
        assert_eq!(none.consequences().len(), 2);

        // The set the DaemonSet and the systemd unit grant: nothing lacking.
        let granted = Capabilities(
            (1 << Cap::Bpf as u32)
                | (1 << Cap::Perfmon as u32)
                | (1 << Cap::DacReadSearch as u32)
                | (1 << Cap::SysPtrace as u32),
        );
        assert!(granted.lacking().is_empty(), "{:?}", granted.lacking());
        assert!(granted.consequences().is_empty());
        // Without ptrace: loads, but says what the records will miss.
        let no_ptrace = Capabilities::from_status("CapEff:\t000000c000000004\n");
        assert!(no_ptrace.can_load_probes());
        assert_eq!(no_ptrace.lacking(), vec!["CAP_SYS_PTRACE".to_owned()]);
        assert!(no_ptrace.consequences()[0].contains("ssh origin"));
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON.
        let admin = Capabilities(1 << Cap::SysAdmin as u32);
        assert!(admin.can_load_probes());
        assert!(!admin.lacking().contains(&"CAP_BPF".to_owned()));
    }
}
