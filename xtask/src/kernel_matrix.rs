//! `cargo xtask kernel-matrix`: boots Debian's own kernels under qemu and proves on each that
//! the agent records what it promises, not only that its programs attach.
//!
//! For every kernel of [`KERNELS`] it downloads the image package (`apt-get download`, cached
//! under `target/kernel-matrix/debian/`, never installed), unpacks the kernel's ELF image from
//! its `vmlinuz` (qemu enters it through its PVH note: the guest does not decompress itself),
//! builds one initramfs (static busybox, the release `phi-agent` with the shared libraries it
//! links, an `/init` and the test driver), boots it with `qemu-system-x86_64 -accel tcg` and
//! reads the driver's result line from the serial console (kept in
//! `target/kernel-matrix/logs/`). The same driver also runs directly on the host, against the
//! running kernel. The driver starts the agent, performs a successful open, a failed open, an
//! exec, a TCP connect (whose listener's accept is recorded too: the agent watches its port)
//! and a rename into the watched tree, an open and a directory rename
//! through an io_uring (with this program's `ring`), stops the agent, and checks that
//! every one of them became a record and that the stop record carries the drop counters.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{
    cmd::{self, exec, output, step},
    setup,
};

/// One kernel of the matrix: a Debian meta-package that names the current image of a series.
pub struct Kernel {
    /// Name in the table and for `--only`.
    pub name: &'static str,
    /// Meta-package whose dependency is the current image package of this series and flavour;
    /// the matching `-unsigned` package is the one downloaded.
    pub meta: &'static str,
    /// Why this kernel is in the matrix.
    pub why: &'static str,
    /// The kernel allows `fexit`: the agent's automatic choice must use it (the driver fails
    /// the row if it fell back to tracepoints).
    pub fexit: bool,
}

/// The kernels the agent is proven on (data in one place). Debian 12 ships 6.1 as its kernel
/// and 6.12 in bookworm-security; the meta-packages always name the newest image of each.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "debian-6.1-cloud",
        meta: "linux-image-cloud-amd64",
        why: "Debian 12's kernel, the flavour of cloud images",
        fexit: true,
    },
    Kernel {
        name: "debian-6.1-amd64",
        meta: "linux-image-amd64",
        why: "Debian 12's kernel, the generic flavour of installed servers",
        fexit: true,
    },
    Kernel {
        name: "debian-6.12-cloud",
        meta: "linux-image-6.12-cloud-amd64",
        why: "the 6.12 kernel Debian 12 offers (and Debian 13's series)",
        fexit: true,
    },
];

/// The name of the host row.
const HOST: &str = "host";

/// Security modules to enable in the guests when the kernel's own default list is unknown.
const FALLBACK_LSM: &str = "lockdown,capability,landlock,yama,bpf";

/// Marker lines the driver prints on the console.
const RESULT_MARK: &str = "PHI-MATRIX-RESULT";
const BOOTED_MARK: &str = "PHI-MATRIX-BOOTED";
const SENSORS_MARK: &str = "PHI-MATRIX-SENSORS";
const LIMITATIONS_MARK: &str = "PHI-MATRIX-LIMITATIONS";
const KERNEL_MARK: &str = "PHI-MATRIX-KERNEL";

/// Loopback port the driver's listener uses in the guests (nothing else runs there).
const GUEST_PORT: u16 = 47613;

const DEFAULT_TIMEOUT: u64 = 240;
const DEFAULT_JOBS: usize = 1;
const DEFAULT_SMP: u32 = 2;
const DEFAULT_ACCEL: &str = "tcg";

#[derive(Args)]
pub struct KernelMatrixArgs {
    /// Run only these rows (a kernel name from the list, or "host"); repeatable.
    #[arg(long, value_name = "NAME")]
    only: Vec<String>,
    /// Skip the host row (running the agent on the host needs root).
    #[arg(long)]
    no_host: bool,
    /// Seconds one guest may take from power-on to power-off.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT)]
    timeout: u64,
    /// Guests booted at the same time. Under TCG two guests of two CPUs each on a two-core
    /// host take longer together than one after the other.
    #[arg(long, default_value_t = DEFAULT_JOBS)]
    jobs: usize,
    /// CPUs of each guest (two, so that per-CPU maps and cross-CPU wakeups are exercised).
    #[arg(long, default_value_t = DEFAULT_SMP)]
    smp: u32,
    /// qemu accelerator (tcg works everywhere; kvm where the host allows it).
    #[arg(long, default_value = DEFAULT_ACCEL)]
    accel: String,
    /// Instead of the matrix: measure what the sensors cost an open/close loop on the newest
    /// kernel of the list that allows fexit (no agent, tracepoints, fexit), as ratios.
    #[arg(long)]
    sensor_cost: bool,
    /// Rounds of `--sensor-cost`.
    #[arg(long, default_value_t = 5, requires = "sensor_cost")]
    rounds: u32,
    /// Operations per run of `--sensor-cost`.
    #[arg(long, default_value_t = 20_000, requires = "sensor_cost")]
    ops: u64,
}

impl Default for KernelMatrixArgs {
    /// Every kernel of the list and the host, as `cargo xtask kernel-matrix` runs them.
    fn default() -> Self {
        KernelMatrixArgs {
            only: Vec::new(),
            no_host: false,
            timeout: DEFAULT_TIMEOUT,
            jobs: DEFAULT_JOBS,
            smp: DEFAULT_SMP,
            accel: DEFAULT_ACCEL.to_owned(),
            sensor_cost: false,
            rounds: 5,
            ops: 20_000,
        }
    }
}

/// An image package resolved from a meta-package.
pub(crate) struct Image {
    pub kernel: &'static Kernel,
    pub package: String,
    pub version: String,
}

/// What one row of the matrix found.
struct Outcome {
    name: String,
    package: String,
    release: String,
    pass: bool,
    reason: String,
    boot: Option<Duration>,
    total: Duration,
    sensors: String,
    limitations: String,
    log: PathBuf,
}

impl Outcome {
    /// A row that failed before the driver could say anything.
    fn failed(
        name: &str,
        package: &str,
        release: &str,
        reason: String,
        total: Duration,
        log: &Path,
    ) -> Outcome {
        Outcome {
            name: name.to_owned(),
            package: package.to_owned(),
            release: release.to_owned(),
            pass: false,
            reason,
            boot: None,
            total,
            sensors: String::new(),
            limitations: String::new(),
            log: log.to_owned(),
        }
    }
}

pub fn run(args: &KernelMatrixArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run()?;
    if args.sensor_cost {
        step("sensor cost: build the release agent");
        exec(cmd::cargo().args(["build", "--release", "-p", "phi-agent"]))?;
        let agent = cmd::workspace_root().join("target/release/phi-agent");
        step("sensor cost: open/close loops under each sensor, in a guest that allows fexit");
        let report = crate::sensor_cost::measure(&agent, args.rounds, args.ops)?;
        println!("{}", report.markdown());
        println!("    took {:.1}s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    for name in &args.only {
        if name != HOST && !KERNELS.iter().any(|k| k.name == name) {
            bail!(
                "unknown kernel {name:?}: the list has {} and {HOST}",
                KERNELS
                    .iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let run_host = wanted(HOST) && !args.no_host;
    let kernels: Vec<&'static Kernel> = KERNELS.iter().filter(|k| wanted(k.name)).collect();

    let dir = cmd::workspace_root().join("target/kernel-matrix");
    fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("cannot create {}", dir.display()))?;

    step("kernel-matrix: build the release agent");
    exec(cmd::cargo().args(["build", "--release", "-p", "phi-agent"]))?;
    let agent = cmd::workspace_root().join("target/release/phi-agent");

    step("kernel-matrix: kernels and busybox (cached in target/kernel-matrix)");
    let (images, busybox_version) = resolve(&kernels)?;
    let busybox = fetch_busybox(&dir, &busybox_version)?;
    let mut boots = Vec::new();
    for image in &images {
        let boot = fetch_kernel(&dir, image)?;
        println!(
            "    {}: {} {} ({})",
            image.kernel.name, image.package, image.version, image.kernel.why
        );
        boots.push((image, boot));
    }
    if args.only.is_empty() {
        let mut used: Vec<PathBuf> = images.iter().map(|i| kernel_dir(&dir, i)).collect();
        used.push(busybox_dir(&dir, &busybox_version));
        prune(&dir.join("debian"), &used);
    }

    let me = own_copy(&dir)?;
    let mut outcomes = Vec::new();
    if run_host {
        step("kernel-matrix: the driver on the host kernel");
        outcomes.push(run_on_host(&dir, &agent, &busybox, &me));
    }
    if !boots.is_empty() {
        step("kernel-matrix: initramfs");
        let built = Instant::now();
        let initrd = build_initramfs(&dir, &agent, &busybox, &me, None)?;
        println!(
            "    {} ({} KiB) in {:.1}s",
            initrd.display(),
            fs::metadata(&initrd).map_or(0, |m| m.len() / 1024),
            built.elapsed().as_secs_f64()
        );
        step(format!(
            "kernel-matrix: boot {} kernel(s) under qemu ({}, {} at a time, {} s limit each)",
            boots.len(),
            args.accel,
            args.jobs.max(1),
            args.timeout
        ));
        outcomes.extend(boot_all(&dir, &initrd, &boots, args));
    }

    print_table(&outcomes);
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.pass)
        .map(|o| o.name.as_str())
        .collect();
    println!(
        "    kernel-matrix took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if outcomes.is_empty() {
        bail!("nothing to run: --only and --no-host left no row");
    }
    if !failed.is_empty() {
        bail!(
            "the agent failed on {} (console logs in {})",
            failed.join(", "),
            dir.join("logs").display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Packages

/// One section per package of `apt-cache depends|policy` output: a section starts at an
/// unindented line that names the package.
fn sections(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some((_, body)) = out.last_mut() {
                body.push_str(line);
                body.push('\n');
            }
        } else if !line.is_empty() {
            out.push((line.trim_end_matches(':').to_owned(), String::new()));
        }
    }
    out
}

/// `apt-cache COMMAND PACKAGES…` (one call: each loads the package lists anew, about a second),
/// the section of each package in order; `apt-get update` once when one is unknown.
fn apt_cache(command: &str, packages: &[&str]) -> anyhow::Result<Vec<String>> {
    let query = || -> Option<Vec<String>> {
        let out = output(Command::new("apt-cache").arg(command).args(packages))?;
        let found = sections(&out);
        packages
            .iter()
            .map(|p| found.iter().find(|(n, _)| n == p).map(|(_, b)| b.clone()))
            .collect()
    };
    if let Some(found) = query() {
        return Ok(found);
    }
    let what = packages.join(", ");
    if !cmd::is_root() {
        bail!("the package lists do not know all of {what}: run `sudo apt-get update`");
    }
    println!("    the package lists do not know all of {what}: apt-get update");
    exec(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["update", "-q"]),
    )?;
    query().with_context(|| {
        format!("apt-cache does not know all of {what}, even after apt-get update")
    })
}

/// The image package a meta-package depends on, from `apt-cache depends` output.
fn image_of_meta(depends: &str) -> Option<String> {
    depends.lines().find_map(|l| {
        let pkg = l.trim().strip_prefix("Depends:")?.trim();
        pkg.starts_with("linux-image-").then(|| {
            let pkg = pkg.trim_start_matches('<').trim_end_matches('>');
            if pkg.ends_with("-unsigned") {
                pkg.to_owned()
            } else {
                format!("{pkg}-unsigned")
            }
        })
    })
}

/// The candidate version from `apt-cache policy` output.
fn candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| v != "(none)")
}

/// The image package of every kernel and the busybox-static version, from the package lists.
pub(crate) fn resolve(kernels: &[&'static Kernel]) -> anyhow::Result<(Vec<Image>, String)> {
    let metas: Vec<&str> = kernels.iter().map(|k| k.meta).collect();
    let depends = if metas.is_empty() {
        Vec::new()
    } else {
        apt_cache("depends", &metas)?
    };
    let packages = kernels
        .iter()
        .zip(&depends)
        .map(|(k, d)| {
            image_of_meta(d)
                .with_context(|| format!("{} names no linux-image package: {d}", k.meta))
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    let mut wanted: Vec<&str> = packages.iter().map(String::as_str).collect();
    wanted.push("busybox-static");
    let policies = apt_cache("policy", &wanted)?;
    let mut versions = wanted
        .iter()
        .zip(&policies)
        .map(|(p, policy)| {
            candidate(policy).with_context(|| format!("no installable version of {p}"))
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    let busybox = versions.pop().context("no busybox-static version")?;
    let images = kernels
        .iter()
        .zip(packages)
        .zip(versions)
        .map(|((kernel, package), version)| Image {
            kernel,
            package,
            version,
        })
        .collect();
    Ok((images, busybox))
}

/// Version text safe for a directory name.
fn dir_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Downloads `package=version` and extracts the members under `member` (a tar wildcard)
/// into `dest`, which appears only once complete.
fn fetch_deb(
    dir: &Path,
    package: &str,
    version: &str,
    member: &str,
    dest: &Path,
) -> anyhow::Result<()> {
    let staging = dir.join("download");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    exec(
        Command::new("apt-get")
            .current_dir(&staging)
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .arg(format!("{package}={version}")),
    )
    .with_context(|| format!("downloading {package} {version}"))?;
    let deb = fs::read_dir(&staging)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", staging.display()))?;
    let unpacked = staging.join("unpacked");
    fs::create_dir_all(&unpacked)?;
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start dpkg-deb")?;
    let tar_in = dpkg.stdout.take().context("dpkg-deb has no stdout")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&unpacked)
        .args(["--wildcards", member])
        .stdin(tar_in)
        .status()
        .context("cannot start tar")?;
    let dpkg = dpkg.wait()?;
    if !tar.success() || !dpkg.success() {
        bail!(
            "cannot unpack {member} from {} (dpkg-deb {dpkg}, tar {tar})",
            deb.display()
        );
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    let _ = fs::remove_dir_all(dest);
    fs::rename(&unpacked, dest)
        .with_context(|| format!("cannot move the unpacked files to {}", dest.display()))?;
    fs::remove_dir_all(&staging).ok();
    Ok(())
}

fn busybox_dir(dir: &Path, version: &str) -> PathBuf {
    dir.join("debian")
        .join(format!("busybox-static_{}", dir_safe(version)))
}

fn kernel_dir(dir: &Path, image: &Image) -> PathBuf {
    dir.join("debian")
        .join(format!("{}_{}", image.package, dir_safe(&image.version)))
}

/// Removes what earlier runs left in the cache that the list no longer names (older images).
fn prune(cache: &Path, used: &[PathBuf]) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if !used.contains(&path) && fs::remove_dir_all(&path).is_ok() {
            println!("    removed {} (no longer in the list)", path.display());
        }
    }
}

/// The static busybox of the guests and of the host run (downloaded, not installed: a host's
/// `busybox` package would have to make way for it).
pub(crate) fn fetch_busybox(dir: &Path, version: &str) -> anyhow::Result<PathBuf> {
    let dest = busybox_dir(dir, version);
    let busybox = dest.join("bin/busybox");
    if !busybox.is_file() {
        println!("    busybox-static {version}: downloading");
        fetch_deb(dir, "busybox-static", version, "./bin/busybox", &dest)?;
    }
    Ok(busybox)
}

/// A kernel from its package's `boot/` directory.
pub(crate) struct Boot {
    pub vmlinuz: PathBuf,
    /// The uncompressed image, when it could be unpacked from `vmlinuz`: qemu enters it through
    /// its PVH note, and the guest skips decompressing itself (5 s for an xz kernel under TCG).
    pub vmlinux: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

impl Boot {
    /// The `lsm=` list for this kernel (see [`lsm_list`]).
    pub(crate) fn lsm(&self) -> String {
        let config = self
            .config
            .as_ref()
            .and_then(|c| fs::read_to_string(c).ok());
        lsm_list(config.as_deref())
    }
}

pub(crate) fn fetch_kernel(dir: &Path, image: &Image) -> anyhow::Result<Boot> {
    let dest = kernel_dir(dir, image);
    let boot = dest.join("boot");
    let find = |prefix: &str| -> Option<PathBuf> {
        fs::read_dir(&boot)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
    };
    if find("vmlinuz-").is_none() {
        println!(
            "    {}: downloading {} {}",
            image.kernel.name, image.package, image.version
        );
        fetch_deb(dir, &image.package, &image.version, "./boot/*", &dest)?;
    }
    let vmlinuz =
        find("vmlinuz-").with_context(|| format!("{} holds no boot/vmlinuz-*", image.package))?;
    let vmlinux = dest.join("vmlinux");
    if !vmlinux.is_file()
        && let Err(e) = unpack_vmlinux(&vmlinuz, &vmlinux)
    {
        println!(
            "    {}: booting the compressed image ({e:#})",
            image.kernel.name
        );
    }
    Ok(Boot {
        vmlinux: vmlinux.is_file().then_some(vmlinux),
        vmlinuz,
        config: find("config-"),
    })
}

/// Decompressors of a bzImage's payload, by its first bytes.
const DECOMPRESSORS: &[(&[u8], &str)] = &[
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x1f\x8b", "gzip"),
];

/// The compressed kernel inside a bzImage (x86 boot protocol >= 2.08: `payload_offset` and
/// `payload_length` at 0x248, counted from the protected-mode code after the setup sectors).
fn bzimage_payload(image: &[u8]) -> anyhow::Result<&[u8]> {
    let u32_at = |at: usize| {
        image
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if image.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        bail!("not a bzImage (no HdrS header)");
    }
    let protocol = image
        .get(0x206..0x208)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
    if protocol < 0x208 {
        bail!("boot protocol {protocol:#x} has no payload fields");
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let (offset, length) = u32_at(0x248)
        .zip(u32_at(0x24c))
        .context("truncated header")?;
    let start = (setup_sects + 1) * 512 + offset;
    image
        .get(start..start + length)
        .context("the payload lies outside the file")
}

/// Writes the uncompressed ELF image of `vmlinuz` to `dest`.
fn unpack_vmlinux(vmlinuz: &Path, dest: &Path) -> anyhow::Result<()> {
    let image = fs::read(vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    let payload = bzimage_payload(&image)?;
    let tool = DECOMPRESSORS
        .iter()
        .find(|(magic, _)| payload.starts_with(magic))
        .map(|(_, tool)| *tool)
        .context("unknown compression")?;
    // The build appends the uncompressed size to the compressed stream.
    let (stream, size) = payload.split_at(payload.len().saturating_sub(4));
    let size = size
        .try_into()
        .map(u32::from_le_bytes)
        .context("payload too short")?;
    let partial = dest.with_extension("partial");
    let out = fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut child = Command::new(tool)
        .args(["-d", "-c"])
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {tool}"))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let stream = stream.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&stream));
    let status = child.wait()?;
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let unpacked = fs::read(&partial).unwrap_or_default();
    if !status.success() || written.is_err() || !unpacked.starts_with(b"\x7fELF") {
        let _ = fs::remove_file(&partial);
        bail!("{tool} -d did not produce an ELF image ({status})");
    }
    if unpacked.len() != size as usize {
        let _ = fs::remove_file(&partial);
        bail!(
            "{tool} -d gave {} bytes, the image says {size}",
            unpacked.len()
        );
    }
    fs::rename(&partial, dest).with_context(|| format!("cannot write {}", dest.display()))
}

// ---------------------------------------------------------------------------------------------
// The initramfs

/// A `newc` cpio archive, the format the kernel unpacks into its root file system.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime
            body.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    /// Creates the parents of `path` (relative, without a leading slash) not yet created.
    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let name = prefix.clone();
                self.entry(&name, 0o040755, &[]);
            }
        }
    }

    fn dir(&mut self, path: &str) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        if self.dirs.insert(path.to_owned()) {
            self.entry(path, 0o040755, &[]);
        }
    }

    fn file(&mut self, path: &str, mode: u32, body: &[u8]) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, 0o100000 | mode, body);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, 0o120777, target.as_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

/// The shared objects `ldd` lists for `binary`, the dynamic loader included (absolute paths).
fn ldd_paths(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

/// A copy of this program in `dir` (`phi-load`: the benchmark workloads and `ring` for the
/// drivers), taken from `/proc/self/exe`, which stays readable when the build has replaced
/// the file this process was started from (as `cargo xtask test` does before it runs the
/// matrix).
pub(crate) fn own_copy(dir: &Path) -> anyhow::Result<PathBuf> {
    let copy = dir.join("phi-load");
    let _ = fs::remove_file(&copy);
    fs::copy("/proc/self/exe", &copy)
        .with_context(|| format!("cannot copy this program to {}", copy.display()))?;
    Ok(copy)
}

/// The guest's `/init`: mounts, loopback, the driver, power-off.
const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ip link set lo up
hostname phi-matrix
read up _ < /proc/uptime
echo "PHI-MATRIX-BOOTED $(uname -r) uptime=${up}s"
if [ -r /matrix/sensor-cost.sh ] && grep -q 'phi.sensor_cost=' /proc/cmdline; then
    AGENT=/usr/bin/phi-agent LOAD=/usr/bin/phi-load WORK=/tmp/phi-cost sh /matrix/sensor-cost.sh
else
    AGENT=/usr/bin/phi-agent BUSYBOX=/bin/busybox RING=/usr/bin/phi-load WORK=/tmp/phi-matrix \
        PORT=@PORT@ START_TIMEOUT=100 sh /matrix/driver.sh
fi
sync
poweroff -f
"#;

/// The test driver (busybox sh), shared by the guests and the host run. Environment: `AGENT`
/// (phi-agent), `BUSYBOX`, `WORK` (a scratch directory it owns), `PORT` (a free loopback TCP
/// port), `START_TIMEOUT` (seconds to wait for the start record).
const DRIVER: &str = r#"#!/bin/sh
set -u
EHR="$WORK/ehr"
OUTSIDE="$WORK/outside"

# Centiseconds since boot.
now() { read up _ < /proc/uptime; echo "${up%.*}${up#*.}"; }
alive() { [ -r "/proc/$1/stat" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat"; }
# The agent's error line (the verifier's log may follow it), else its last line.
agent_error() {
    e=$(grep -m 1 'phi-agent: error' "$ERR" 2>/dev/null)
    [ -n "$e" ] || e=$(tail -n 1 "$ERR" 2>/dev/null)
    printf '%s' "$e" | cut -c 1-700
}
# The agent's own log: all of it when short, else its start and its end.
agent_log() {
    if [ "$(wc -l < "$ERR")" -le 50 ]; then
        cat "$ERR"
    else
        head -n 10 "$ERR"
        echo "..."
        tail -n 40 "$ERR"
    fi 2> /dev/null | sed 's/^/PHI-MATRIX-AGENT-LOG /'
}
fail() {
    echo "PHI-MATRIX-RESULT FAIL [sensors=$MODE] $*"
    agent_log
    exit 1
}
# Is there a record line holding every one of the given strings?
has() {
    lines=$(grep -F -- "$1" "$OUT")
    shift
    for s in "$@"; do
        lines=$(printf '%s\n' "$lines" | grep -F -- "$s")
    done
    [ -n "$lines" ]
}
# Does the kernel command line ask for fexit sensors (kernels known to allow them)?
expect_fexit() {
    [ "${EXPECT_FEXIT:-}" = 1 ] || grep -q 'phi.expect_fexit=1' /proc/cmdline 2>/dev/null
}

# Two agents at once, one with the sensors it picks (`--sensors auto`) and one with
# tracepoints only: the same actions, observed by both, must give both the same records.
MODES="auto tracepoints"
use() { MODE=$1; OUT="$WORK/records-$MODE.jsonl"; ERR="$WORK/agent-$MODE.stderr"; }
# No agent outlives the driver, whatever ends it.
reap() {
    for m in $MODES; do
        eval "p=\${pid_$m:-}"
        [ -n "$p" ] && kill -9 "$p" 2> /dev/null
    done
    return 0
}
trap reap EXIT

echo "PHI-MATRIX-KERNEL $(uname -r)"
rm -rf "$WORK"
mkdir -p "$EHR" "$OUTSIDE"
echo '{"note":"chart"}' > "$EHR/chart.json"
echo '{"note":"moved"}' > "$OUTSIDE/moved.json"
mkdir -p "$OUTSIDE/ringdir"
echo '{"note":"ring"}' > "$EHR/ring.json"
echo '{"note":"ring-moved"}' > "$OUTSIDE/ringdir/chart.json"

t0=$(now)
for m in $MODES; do
    use "$m"
    "$AGENT" run --stdout --watch "$EHR" --state-dir "$WORK/state-$MODE" \
        --metrics-listen off --sensors "$MODE" --accept-port "$PORT" > "$OUT" 2> "$ERR" &
    eval "pid_$MODE=$!"
done
for m in $MODES; do
    use "$m"
    eval "agent=\$pid_$MODE"
    waited=0
    while ! grep -q '"PHASE_START"' "$OUT" 2>/dev/null; do
        if ! alive "$agent"; then
            wait "$agent"
            fail "agent exited (status $?) before its start record: $(agent_error)"
        fi
        if [ "$waited" -ge $((START_TIMEOUT * 10)) ]; then
            kill -9 "$agent"
            fail "no start record after ${START_TIMEOUT}s: $(agent_error)"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    eval "t1_$MODE=$(now)"
    if [ "$MODE" = auto ]; then
        start=$(grep -m 1 '"PHASE_START"' "$OUT")
        echo "PHI-MATRIX-SENSORS $(printf '%s' "$start" | sed -n 's/.*"sensors":\(\[[^]]*\]\).*/\1/p')"
        echo "PHI-MATRIX-LIMITATIONS $(printf '%s' "$start" | sed -n 's/.*"limitations":\(\[[^]]*\]\).*/\1/p')"
    fi
done

# One of each action the agent promises to record.
cat "$EHR/chart.json" > /dev/null
cat "$EHR/missing.json" > /dev/null 2>&1
"$BUSYBOX" true phi-matrix-exec-probe
nc -l -p "$PORT" < /dev/null > /dev/null 2>&1 &
listener=$!
sleep 0.3
nc -w 2 127.0.0.1 "$PORT" < /dev/null > /dev/null 2>&1
kill "$listener" 2> /dev/null
cat "$OUTSIDE/moved.json" > /dev/null
mv "$OUTSIDE/moved.json" "$EHR/moved.json"
cat "$EHR/moved.json" > /dev/null
# Through an io_uring (RING: a program with `ring open|open-missing|rename`): an open of a
# watched file, a failed open of a missing one, and a rename of a directory (judged unwatched a moment before) into the watched tree.
ring_error=""
if [ -n "${RING:-}" ]; then
    cat "$OUTSIDE/ringdir/chart.json" > /dev/null
    "$RING" ring open "$EHR/ring.json" > "$WORK/ring.err" 2>&1 \
        && "$RING" ring open-missing "$EHR/ring-missing.json" >> "$WORK/ring.err" 2>&1 \
        && "$RING" ring rename "$OUTSIDE/ringdir" "$EHR/ringdir" >> "$WORK/ring.err" 2>&1 \
        || ring_error=$(tail -n 1 "$WORK/ring.err" | cut -c 1-300)
    cat "$EHR/ringdir/chart.json" > /dev/null 2>&1
fi
sleep 0.5

for m in $MODES; do
    eval "kill -TERM \$pid_$m"
done
for m in $MODES; do
    eval "agent=\$pid_$m"
    waited=0
    while alive "$agent" && [ "$waited" -lt 600 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    alive "$agent" && kill -9 "$agent"
    wait "$agent"
    eval "status_$m=$? pid_$m="
done
t2=$(now)

summary=""
for m in $MODES; do
    use "$m"
    eval "status=\$status_$MODE t1=\$t1_$MODE"
    start=$(grep -m 1 '"PHASE_START"' "$OUT")
    sensors=$(printf '%s' "$start" | sed -n 's/.*"sensors":\(\[[^]]*\]\).*/\1/p')
    missing=""
    has '"open":{"path":"'"$EHR/chart.json"'"' '"success":true' || missing="$missing open"
    has '"open":{"path":"'"$EHR/missing.json"'"' '"errno":"ENOENT"' || missing="$missing open-failed"
    has '"exec":{' 'phi-matrix-exec-probe' || missing="$missing exec"
    has '"connect":{' '"address":"127.0.0.1","port":'"$PORT"',' || missing="$missing connect"
    # busybox listens on an IPv6 socket: an IPv4 peer is ::ffff:127.0.0.1 there.
    has '"accept":{' '127.0.0.1","localPort":'"$PORT"',' || missing="$missing accept"
    has '"open":{"path":"'"$EHR/moved.json"'"' '"success":true' || missing="$missing rename"
    if has '"path":"'"$OUTSIDE/moved.json"'"'; then missing="$missing outside-open-filtered"; fi
    ring=""
    if [ -n "${RING:-}" ]; then
        [ -z "$ring_error" ] || fail "the io_uring requests failed: $ring_error"
        has '"open":{"path":"'"$EHR/ring.json"'"' '"syscall":"OPEN_SYSCALL_IO_URING_OPENAT"' \
            || missing="$missing ring-open"
        has '"open":{"path":"'"$EHR/ringdir/chart.json"'"' '"success":true' \
            || missing="$missing ring-rename"
        ring=" ring-open ring-rename"
        # Failed opens through a ring, where the kernel lets the agent keep the names of
        # submitted requests (the start record's sensors say so).
        case "$sensors" in
            *io_uring_submit_*)
                has '"open":{"path":"'"$EHR/ring-missing.json"'"' '"errno":"ENOENT"' \
                    || missing="$missing ring-open-failed"
                ring="$ring ring-open-failed"
                ;;
        esac
    fi
    has '"phase":"PHASE_STOP"' '"drops":{' || missing="$missing stop-record"
    [ "$status" -eq 0 ] || missing="$missing exit-status-$status"

    connect=$(grep -F '"connect":{' "$OUT" | grep -F '"port":'"$PORT"',' | head -n 1 \
        | sed -n 's/.*"connect":{[^}]*"outcome":{"success":\([a-z]*\)[^}]*"errno":"\([A-Z]*\)".*/\1 \2/p')
    case "$connect" in
        "true "*) connect=ok ;;
        *) connect=${connect#false } ;;
    esac
    drops=$(grep -F '"PHASE_STOP"' "$OUT" | sed -n 's/.*"drops":{\([^}]*\)}.*/\1/p' \
        | tr ',' '\n' | grep -v ':"0"$' | tr -d '"' | tr '\n' ' ' | sed 's/ *$//; s/ /,/g')
    records=$(grep -c . "$OUT")
    start_s=$(( (t1 - t0) / 100 )).$(( (t1 - t0) % 100 / 10 ))
    run_s=$(( (t2 - t0) / 100 )).$(( (t2 - t0) % 100 / 10 ))
    agent_log
    if [ -n "$missing" ]; then
        fail "no record for:$missing (records=$records, agent start ${start_s}s)"
    fi
    # The sensors each mode must have picked.
    case "$MODE" in
        tracepoints)
            case "$sensors" in *'"fexit/'*) fail "fexit sensors in use although forced off: $sensors" ;; esac ;;
        auto)
            if expect_fexit; then
                for kind in open connect accept path-changes; do
                    case "$sensors" in
                        *'"kind":"'$kind'","hook":"fexit/'*) ;;
                        *) fail "$kind is not served by fexit on a kernel that allows it: $(grep -m 1 "served by the sys_exit tracepoint.*kind=$kind" "$ERR" | cut -c 1-400)" ;;
                    esac
                done
            fi ;;
    esac
    fexit=$(printf '%s' "$sensors" | grep -o '"kind":"[a-z-]*","hook":"fexit' | sed 's/"kind":"\([a-z-]*\)".*/\1/' | tr '\n' ',' | sed 's/,$//')
    summary="$summary [sensors=$MODE${fexit:+ fexit:$fexit}] open open-failed(ENOENT) exec connect(${connect:-?}) accept rename$ring stop drops=${drops:-none} records=$records agent-start=${start_s}s run=${run_s}s"
done
echo "PHI-MATRIX-RESULT PASS$summary"
"#;

/// The `lsm=` list: the kernel's own default (`CONFIG_LSM`) with `bpf` added if absent.
fn lsm_list(config: Option<&str>) -> String {
    let default = config.and_then(|c| {
        c.lines()
            .find_map(|l| l.strip_prefix("CONFIG_LSM="))
            .map(|v| v.trim_matches('"').to_owned())
    });
    match default {
        Some(list) if !list.is_empty() => {
            if list.split(',').any(|m| m == "bpf") {
                list
            } else {
                format!("{list},bpf")
            }
        }
        _ => FALLBACK_LSM.to_owned(),
    }
}

/// The initramfs of the matrix; with `load` (a copy of this program, for its benchmark
/// workloads) also the sensor-cost driver (`crate::sensor_cost`), in a file of its own.
pub(crate) fn build_initramfs(
    dir: &Path,
    agent: &Path,
    busybox: &Path,
    load: &Path,
    sensor_cost: Option<&str>,
) -> anyhow::Result<PathBuf> {
    // The guests need the code, not the debug information (a quarter of the size).
    let stripped = dir.join("phi-agent.stripped");
    exec(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(agent),
    )
    .context("strip comes with binutils")?;
    let ldd = output(Command::new("ldd").arg(agent))
        .with_context(|| format!("ldd {} failed", agent.display()))?;

    let mut cpio = Cpio::default();
    for d in [
        "dev", "proc", "sys", "tmp", "run", "etc", "usr/bin", "matrix",
    ] {
        cpio.dir(d);
    }
    let read = |p: &Path| fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    cpio.file("bin/busybox", 0o755, &read(busybox)?);
    cpio.symlink("bin/sh", "busybox");
    cpio.file("usr/bin/phi-agent", 0o755, &read(&stripped)?);
    let have = ldd_paths(&ldd);
    for lib in &have {
        cpio.file(lib, 0o755, &read(Path::new(lib))?);
    }
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    cpio.file("etc/group", 0o644, b"root:x:0:\n");
    cpio.file(
        "init",
        0o755,
        INIT.replace("@PORT@", &GUEST_PORT.to_string()).as_bytes(),
    );
    cpio.file("matrix/driver.sh", 0o755, DRIVER.as_bytes());
    // This program, for the benchmark workloads and the io_uring requests (`ring`).
    let stripped = dir.join("phi-load.stripped");
    exec(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(load),
    )?;
    cpio.file("usr/bin/phi-load", 0o755, &read(&stripped)?);
    let ldd = output(Command::new("ldd").arg(load))
        .with_context(|| format!("ldd {} failed", load.display()))?;
    for lib in ldd_paths(&ldd) {
        if !have.contains(&lib) {
            cpio.file(&lib, 0o755, &read(Path::new(&lib))?);
        }
    }
    if let Some(driver) = sensor_cost {
        cpio.file("matrix/sensor-cost.sh", 0o755, driver.as_bytes());
    }

    let plain = dir.join(if sensor_cost.is_some() {
        "initrd-sensor-cost"
    } else {
        "initrd"
    });
    fs::write(&plain, cpio.finish())
        .with_context(|| format!("cannot write {}", plain.display()))?;
    let packed = plain.with_extension("gz");
    let _ = fs::remove_file(&packed);
    exec(Command::new("gzip").args(["-f", "-n", "-1"]).arg(&plain))?;
    Ok(packed)
}

// ---------------------------------------------------------------------------------------------
// Running

/// What the console (or the host run's output) said.
#[derive(Default)]
struct Console {
    result: Option<(bool, String)>,
    release: String,
    sensors: String,
    limitations: String,
    booted: Option<Duration>,
    tail: Vec<String>,
}

impl Console {
    fn line(&mut self, line: &str, at: Duration) {
        let line = line.trim_end_matches(['\r', '\n']);
        let rest = |mark: &str| {
            line.find(mark)
                .map(|i| line[i + mark.len()..].trim().to_owned())
        };
        if let Some(r) = rest(RESULT_MARK) {
            let (verdict, reason) = r.split_once(' ').unwrap_or((r.as_str(), ""));
            self.result = Some((verdict == "PASS", reason.to_owned()));
        } else if let Some(r) = rest(BOOTED_MARK) {
            self.booted.get_or_insert(at);
            if self.release.is_empty() {
                self.release = r.split_whitespace().next().unwrap_or_default().to_owned();
            }
        } else if let Some(r) = rest(KERNEL_MARK) {
            self.release = r;
        } else if let Some(r) = rest(SENSORS_MARK) {
            self.sensors = summarize_sensors(&r);
        } else if let Some(r) = rest(LIMITATIONS_MARK) {
            self.limitations = summarize_limitations(&r);
        }
        if !line.trim().is_empty() {
            self.tail.push(line.to_owned());
            if self.tail.len() > 12 {
                self.tail.remove(0);
            }
        }
    }
}

/// `[{"kind":"open","hook":"tp_btf/sys_exit"},…]` as `open=tp_btf/sys_exit …`.
fn summarize_sensors(json: &str) -> String {
    match serde_json::from_str::<Vec<serde_json::Value>>(json) {
        Ok(list) => list
            .iter()
            .map(|s| {
                format!(
                    "{}={}",
                    s["kind"].as_str().unwrap_or("?"),
                    s["hook"].as_str().unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => json.to_owned(),
    }
}

fn summarize_limitations(json: &str) -> String {
    match serde_json::from_str::<Vec<serde_json::Value>>(json) {
        Ok(list) if list.is_empty() => "none".into(),
        Ok(list) => list
            .iter()
            .map(|l| l.as_str().map_or_else(|| l.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => json.to_owned(),
    }
}

fn outcome(
    name: &str,
    package: &str,
    console: Console,
    total: Duration,
    log: PathBuf,
    fallback: String,
) -> Outcome {
    let (pass, reason) = console.result.clone().unwrap_or((false, fallback));
    Outcome {
        name: name.to_owned(),
        package: package.to_owned(),
        release: console.release,
        pass,
        reason,
        boot: console.booted,
        total,
        sensors: console.sensors,
        limitations: console.limitations,
        log,
    }
}

/// A loopback TCP port nothing listens on right now.
fn free_port() -> u16 {
    crate::cmd::free_port().unwrap_or(GUEST_PORT)
}

/// The driver straight on the host, with the cached busybox for its tools.
fn run_on_host(dir: &Path, agent: &Path, busybox: &Path, ring: &Path) -> Outcome {
    let started = Instant::now();
    let log = dir.join("logs").join(format!("{HOST}.log"));
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let fail = |reason: String| {
        Outcome::failed(
            HOST,
            "running kernel",
            &release,
            reason,
            started.elapsed(),
            &log,
        )
    };
    if !cmd::is_root() {
        return fail("loading the probes into the host kernel needs root (or --no-host)".into());
    }
    let work = std::env::temp_dir().join(format!("phi-matrix-host-{}", std::process::id()));
    let tools = work.with_extension("bin");
    let _ = fs::remove_dir_all(&tools);
    if let Err(e) = fs::create_dir_all(&tools) {
        return fail(format!("cannot create {}: {e}", tools.display()));
    }
    let driver = tools.join("driver.sh");
    if let Err(e) = fs::write(&driver, DRIVER) {
        return fail(format!("cannot write {}: {e}", driver.display()));
    }
    if let Err(e) = exec(Command::new(busybox).arg("--install").arg("-s").arg(&tools)) {
        return fail(format!("{e:#}"));
    }
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(busybox)
        .arg("sh")
        .arg(&driver)
        .env("PATH", path)
        .env("AGENT", agent)
        .env("BUSYBOX", busybox)
        .env("RING", ring)
        .env("WORK", &work)
        .env("PORT", free_port().to_string())
        .env("START_TIMEOUT", "60")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output();
    let _ = fs::remove_dir_all(&tools);
    let out = match out {
        Ok(o) => o,
        Err(e) => return fail(format!("cannot run the driver: {e}")),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = fs::write(&log, &text);
    let mut console = Console {
        release: release.clone(),
        ..Console::default()
    };
    for line in text.lines() {
        console.line(line, started.elapsed());
    }
    if console.result.as_ref().is_some_and(|(pass, _)| *pass) {
        let _ = fs::remove_dir_all(&work);
    }
    let fallback = format!(
        "the driver printed no result ({}): {}",
        out.status,
        console.tail.join(" | ")
    );
    outcome(
        HOST,
        "running kernel",
        console,
        started.elapsed(),
        log,
        fallback,
    )
}

fn boot_all(
    dir: &Path,
    initrd: &Path,
    boots: &[(&Image, Boot)],
    args: &KernelMatrixArgs,
) -> Vec<Outcome> {
    let queue = Mutex::new(boots.iter().enumerate());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1).min(boots.len()) {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().map(|mut q| q.next()).ok().flatten();
                    let Some((i, (image, boot))) = next else {
                        break;
                    };
                    let mut o = boot_one(dir, initrd, image, boot, args);
                    if !o.pass && o.boot.is_none() {
                        // The kernel died before the initramfs ran (under TCG an early boot
                        // can trip over its own code patching): nothing of the agent was
                        // tested yet, so one more boot decides.
                        println!(
                            "    {}: the guest stopped before its init ran; booting it once more",
                            o.name
                        );
                        o = boot_one(dir, initrd, image, boot, args);
                    }
                    println!(
                        "    {}: {} in {:.1}s",
                        o.name,
                        if o.pass { "PASS" } else { "FAIL" },
                        o.total.as_secs_f64()
                    );
                    if let Ok(mut r) = results.lock() {
                        r.push((i, o));
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, o)| o).collect()
}

/// qemu booting `boot` with `initrd`, the serial console on its standard output.
pub(crate) fn qemu(accel: &str, smp: u32, boot: &Boot, initrd: &Path, append: &str) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", accel, "-cpu", "max", "-m", "1024", "-smp"])
        .arg(smp.max(1).to_string())
        .args([
            "-nodefaults",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(boot.vmlinux.as_ref().unwrap_or(&boot.vmlinuz))
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    qemu
}

fn boot_one(
    dir: &Path,
    initrd: &Path,
    image: &Image,
    boot: &Boot,
    args: &KernelMatrixArgs,
) -> Outcome {
    let name = image.kernel.name;
    let package = format!("{} {}", image.package, image.version);
    let log = dir.join("logs").join(format!("{name}.log"));
    let started = Instant::now();
    let append = format!(
        "console=ttyS0 panic=-1 quiet lsm={} oops=panic phi.expect_fexit={}",
        boot.lsm(),
        u8::from(image.kernel.fexit)
    );
    let spawned = qemu(&args.accel, args.smp, boot, initrd, &append).spawn();
    let fail =
        |reason: String| Outcome::failed(name, &package, "", reason, started.elapsed(), &log);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start qemu-system-x86_64: {e}")),
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return fail("qemu has no output pipes".into());
    };
    let (tx, rx) = mpsc::channel();
    let reader_log = log.clone();
    let reader = std::thread::spawn(move || {
        let mut console = Console::default();
        let mut file = fs::File::create(&reader_log).ok();
        if let Some(f) = file.as_mut() {
            let _ = writeln!(f, "# qemu -append {append:?}");
        }
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            if let Some(f) = file.as_mut() {
                let _ = writeln!(f, "{}", line.trim_end_matches('\r'));
            }
            console.line(&line, started.elapsed());
        }
        let _ = tx.send(());
        console
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });
    let timed_out = rx.recv_timeout(Duration::from_secs(args.timeout)).is_err();
    if timed_out {
        let _ = child.kill();
    }
    let status = child.wait();
    let console = reader.join().unwrap_or_default();
    let qemu_errors = errors.join().unwrap_or_default();
    let fallback = if timed_out {
        format!(
            "no result within {} s; last console lines: {}",
            args.timeout,
            console.tail.join(" | ")
        )
    } else {
        format!(
            "the guest stopped without a result (qemu {}{}); last console lines: {}",
            status.map_or_else(|e| e.to_string(), |s| s.to_string()),
            if qemu_errors.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", qemu_errors.trim())
            },
            console.tail.join(" | ")
        )
    };
    outcome(name, &package, console, started.elapsed(), log, fallback)
}

fn print_table(outcomes: &[Outcome]) {
    step("kernel-matrix: results");
    let secs = |d: Option<Duration>| {
        d.map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()))
    };
    let rows: Vec<[String; 6]> = outcomes
        .iter()
        .map(|o| {
            [
                o.name.clone(),
                if o.release.is_empty() {
                    "?".into()
                } else {
                    o.release.clone()
                },
                if o.pass { "PASS".into() } else { "FAIL".into() },
                secs(o.boot),
                secs(Some(o.total)),
                o.reason.clone(),
            ]
        })
        .collect();
    let header = ["KERNEL", "RELEASE", "RESULT", "BOOT", "TOTAL", "DETAILS"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let show = |cells: &[String]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    };
    show(&header.map(str::to_owned));
    for row in &rows {
        show(row);
    }
    println!();
    for o in outcomes {
        println!("{} ({}):", o.name, o.package);
        if !o.sensors.is_empty() {
            println!("    sensors: {}", o.sensors);
        }
        if !o.limitations.is_empty() {
            println!("    limitations: {}", o.limitations);
        }
        println!("    log: {}", o.log.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut cpio = Cpio::default();
        cpio.file("/usr/bin/x", 0o755, b"abc");
        cpio.symlink("bin/sh", "busybox");
        let data = cpio.finish();
        assert_eq!(data.len() % 4, 0);
        assert!(data.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&data);
        // Parents first, each once.
        let usr = text.find("usr\0").expect("usr");
        let usr_bin = text.find("usr/bin\0").expect("usr/bin");
        let file = text.find("usr/bin/x\0").expect("the file");
        assert!(usr < usr_bin && usr_bin < file);
        assert_eq!(text.matches("usr/bin\0").count(), 1);
        assert!(text.contains("TRAILER!!!\0"));
        // The file's header: mode 0100755, size 3, name size 10.
        let header = &text[file - 110..file];
        assert_eq!(&header[14..22], "000081ed");
        assert_eq!(&header[54..62], "00000003");
        assert_eq!(&header[94..102], "0000000a");
    }

    #[test]
    fn reads_ldd_output() {
        let ldd = "\tlinux-vdso.so.1 (0x00007f2b867c4000)\n\tlibgcc_s.so.1 => \
                   /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f2b86793000)\n\tlibc.so.6 => \
                   /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 \
                   (0x00007f2b867c6000)\n";
        assert_eq!(
            ldd_paths(ldd),
            vec![
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn splits_apt_cache_output() {
        let policy = "a:\n  Installed: (none)\n  Candidate: 1.0\nb-c:\n  Candidate: (none)\n";
        let found = sections(policy);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0, "a");
        assert_eq!(candidate(&found[0].1).as_deref(), Some("1.0"));
        assert_eq!(found[1].0, "b-c");
        assert_eq!(candidate(&found[1].1), None);
    }

    #[test]
    fn resolves_meta_packages() {
        let depends = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            image_of_meta(depends).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64-unsigned")
        );
        let policy = "x:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n";
        assert_eq!(candidate(policy).as_deref(), Some("6.1.192-2"));
        assert_eq!(candidate("x:\n  Candidate: (none)\n"), None);
        assert_eq!(dir_safe("1:1.35.0-4+deb12u1"), "1_1.35.0-4+deb12u1");
    }

    #[test]
    fn finds_the_payload_of_a_bzimage() {
        let mut image = vec![0u8; 0x2000];
        image[0x1f1] = 3; // setup sectors: the kernel proper starts at 0x800
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&6u32.to_le_bytes());
        image[0x900..0x906].copy_from_slice(b"\x28\xb5\x2f\xfdab");
        assert_eq!(
            bzimage_payload(&image).expect("payload"),
            b"\x28\xb5\x2f\xfdab"
        );
        image[0x24c..0x250].copy_from_slice(&0x2000u32.to_le_bytes());
        assert!(bzimage_payload(&image).is_err());
        image[0x202] = 0;
        assert!(bzimage_payload(&image).is_err());
    }

    #[test]
    fn lsm_list_adds_bpf() {
        assert_eq!(
            lsm_list(Some("CONFIG_X=y\nCONFIG_LSM=\"landlock,lockdown,yama\"\n")),
            "landlock,lockdown,yama,bpf"
        );
        assert_eq!(lsm_list(Some("CONFIG_LSM=\"yama,bpf\"\n")), "yama,bpf");
        assert_eq!(lsm_list(None), FALLBACK_LSM);
    }

    #[test]
    fn parses_console_lines() {
        let mut c = Console::default();
        let t = Duration::from_secs(3);
        c.line(
            "[    1.0] PHI-MATRIX-BOOTED 6.1.0-56-cloud-amd64 uptime=1.00s\r",
            t,
        );
        c.line(
            r#"PHI-MATRIX-SENSORS [{"kind":"open","hook":"tp_btf/sys_exit"},{"kind":"exec","hook":"tp_btf/sched_process_exec"}]"#,
            t,
        );
        c.line("PHI-MATRIX-LIMITATIONS []", t);
        c.line("PHI-MATRIX-RESULT FAIL no record for: exec", t);
        assert_eq!(c.release, "6.1.0-56-cloud-amd64");
        assert_eq!(c.booted, Some(t));
        assert_eq!(
            c.sensors,
            "open=tp_btf/sys_exit exec=tp_btf/sched_process_exec"
        );
        assert_eq!(c.limitations, "none");
        assert_eq!(c.result, Some((false, "no record for: exec".to_owned())));
    }

    #[test]
    fn every_kernel_has_a_distinct_name() {
        let names: BTreeSet<&str> = KERNELS.iter().map(|k| k.name).collect();
        assert_eq!(names.len(), KERNELS.len());
        assert!(!names.contains(HOST));
    }
}
