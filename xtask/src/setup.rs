//! `cargo xtask setup`: installs the eBPF toolchain, the Debian packages the tests use and the
//! Python linters of the deployment checks. Idempotent: every step first checks, and only acts
//! when something is missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::cmd::{self, exec, output, step};

/// bpf-linker release the build uses.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and tools use, with the reason (data in one place).
pub const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    (
        "util-linux",
        "setpriv/unshare for running probes as other users",
    ),
    ("iproute2", "network namespaces for network tests"),
    ("procps", "pkill and ps in scripts"),
    ("openssh-server", "real ssh logins in the identity tests"),
    ("openssh-client", "the ssh client of those tests"),
    ("sudo", "the sudo chain in the identity tests"),
    ("curl", "HTTP/JSON API tests"),
    (
        "postgresql",
        "the PostgreSQL store tests (a private server per test)",
    ),
    ("systemd", "systemd-analyze for checking the unit files"),
    ("rsyslog", "the syslog sink's test against a real receiver"),
    ("rsyslog-gnutls", "TLS for that receiver"),
    (
        "python3-venv",
        "the venv of the deployment linters (kubernetes-validate, checkov)",
    ),
    ("auditd", "the auditd side of the host-overhead benchmark"),
    (
        "bpftrace",
        "the bpftrace side of the host-overhead benchmark",
    ),
    (
        "qemu-system-x86",
        "booting Debian's kernels for the kernel matrix",
    ),
    (
        "xz-utils",
        "unpacking the kernel images of the kernel matrix",
    ),
    ("zstd", "unpacking the kernel images of the kernel matrix"),
    ("lz4", "unpacking the kernel images of the kernel matrix"),
];

/// The pinned Python packages of the deployment checks (`pip freeze` of a working venv).
const PYTHON_TOOLS_LOCK: &str = include_str!("../python-tools.txt");

/// The console scripts the deployment checks run from that venv.
const PYTHON_TOOLS: &[&str] = &["kubernetes-validate", "checkov"];

/// Debian's interpreter (python3-venv), not whatever `python3` the PATH finds first.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    step("setup: checking the build and test toolchain");
    ensure_nightly()?;
    let llvm_major = nightly_llvm_major()?;
    ensure_rust_src()?;
    ensure_bpf_linker(llvm_major)?;
    ensure_cargo_fuzz()?;
    ensure_debian_packages()?;
    ensure_python_tools()?;
    println!(
        "    setup complete in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn ensure_nightly() -> anyhow::Result<()> {
    let list = output(rustup().args(["toolchain", "list"]))
        .context("rustup is needed (https://rustup.rs) and was not found")?;
    if list.lines().any(|l| l.starts_with("nightly")) {
        println!("    nightly toolchain: present");
        return Ok(());
    }
    println!("    nightly toolchain: missing, installing");
    exec(rustup().args(["toolchain", "install", "nightly", "--profile", "minimal"]))
}

/// Reads the LLVM major version from `rustc +nightly -vV`.
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))
        .context("`rustc +nightly -vV` failed")?;
    let release = vv
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .unwrap_or("?")
        .to_owned();
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` does not report an LLVM version")?;
    let major = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot parse LLVM version {llvm:?}"))?;
    println!("    rustc nightly {release}, LLVM {llvm}");
    Ok(major)
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed =
        output(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))
            .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("    rust-src (nightly): present");
        return Ok(());
    }
    println!("    rust-src (nightly): missing, installing");
    exec(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// `bpf-linker --version` when it runs (its libLLVM resolves) and is the wanted release.
fn bpf_linker_ok() -> Option<String> {
    let v = output(Command::new("bpf-linker").arg("--version"))
        .or_else(|| output(Command::new(cargo_home().join("bin/bpf-linker")).arg("--version")))?;
    let v = v.trim().to_owned();
    v.ends_with(BPF_LINKER_VERSION).then_some(v)
}

/// A folder whose `lib/` holds `libLLVM.so` and the versioned soname, both links to the
/// nightly toolchain's own LLVM, for bpf-linker to build and run against.
fn llvm_prefix(major: u32) -> anyhow::Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("`rustc +nightly --print sysroot` failed")?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let wanted = format!("libLLVM.so.{major}.");
    let soname = std::fs::read_dir(&libdir)
        .with_context(|| format!("cannot list {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&wanted))
        .with_context(|| {
            format!(
                "the nightly toolchain has no {wanted}* in {}: reinstall it with `rustup toolchain \
                 install nightly`",
                libdir.display()
            )
        })?;
    let prefix = cargo_home().join(format!("phi-audit-llvm-{major}"));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&soname), &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    Ok(prefix)
}

fn ensure_bpf_linker(major: u32) -> anyhow::Result<()> {
    if let Some(v) = bpf_linker_ok() {
        println!("    {v}: present");
        return Ok(());
    }
    println!(
        "    bpf-linker {BPF_LINKER_VERSION}: missing or not runnable, building it against LLVM \
         {major} (takes a few minutes)"
    );
    let prefix = llvm_prefix(major)?;
    exec(
        cmd::cargo()
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}")),
    )?;
    match bpf_linker_ok() {
        Some(v) => {
            println!("    {v}: installed");
            Ok(())
        }
        None => bail!(
            "bpf-linker was built but does not run; check that {} resolves",
            prefix.join("lib/libLLVM.so").display()
        ),
    }
}

/// cargo-fuzz, for the short fuzz runs of the test command.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if let Some(v) = output(cmd::cargo().args(["fuzz", "--version"])) {
        println!("    {}: present", v.trim());
        return Ok(());
    }
    println!("    cargo-fuzz: missing, installing");
    exec(cmd::cargo().args(["install", "cargo-fuzz", "--locked"]))
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn ensure_debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        println!(
            "    Debian packages: present ({})",
            DEBIAN_PACKAGES
                .iter()
                .map(|(p, _)| *p)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    if !cmd::is_root() {
        bail!(
            "Debian packages {} are missing and installing them needs root: run `sudo apt-get \
             install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    println!("    Debian packages: installing {}", missing.join(", "));
    exec(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["update", "-q"]),
    )?;
    exec(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// The venv holding the deployment linters; outside `target/` so that `cargo clean` keeps it.
fn python_tools_venv() -> PathBuf {
    cargo_home().join("phi-audit-pytools")
}

/// A console script of the deployment linters' venv (`kubernetes-validate`, `checkov`).
pub fn python_tool(name: &str) -> PathBuf {
    python_tools_venv().join("bin").join(name)
}

/// Records, inside the venv, the lock file it was installed from.
fn python_tools_stamp() -> PathBuf {
    python_tools_venv().join("phi-audit-python-tools.txt")
}

/// The venv is complete when it was installed from exactly this lock file, its interpreter
/// still resolves, and the tools are there. A file comparison: no interpreter is started.
fn python_tools_ok() -> bool {
    let venv = python_tools_venv();
    std::fs::read_to_string(python_tools_stamp()).is_ok_and(|s| s == PYTHON_TOOLS_LOCK)
        && std::fs::metadata(venv.join("bin/python3")).is_ok()
        && PYTHON_TOOLS.iter().all(|t| python_tool(t).is_file())
}

/// Pinned versions of the tools, from the lock file (for the report line).
fn python_tool_versions() -> String {
    PYTHON_TOOLS
        .iter()
        .map(|t| {
            PYTHON_TOOLS_LOCK
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{t}==")))
                .map_or_else(|| (*t).to_owned(), |v| format!("{t} {v}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// kubernetes-validate and checkov in their own venv, every package pinned by
/// `xtask/python-tools.txt`. A venv from another lock file (or a broken one) is rebuilt whole.
fn ensure_python_tools() -> anyhow::Result<()> {
    let versions = python_tool_versions();
    if python_tools_ok() {
        println!("    {versions}: present");
        return Ok(());
    }
    let venv = python_tools_venv();
    println!(
        "    {versions}: missing or from another lock file, installing into {} (about a minute)",
        venv.display()
    );
    if venv.exists() {
        std::fs::remove_dir_all(&venv)
            .with_context(|| format!("cannot remove the old venv {}", venv.display()))?;
    }
    exec(Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(&venv))
        .context("creating the venv needs Debian's python3-venv")?;
    let lock = venv.join("requirements.txt");
    std::fs::write(&lock, PYTHON_TOOLS_LOCK)
        .with_context(|| format!("cannot write {}", lock.display()))?;
    exec(
        Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--no-input",
                "--disable-pip-version-check",
                "--require-virtualenv",
                "-r",
            ])
            .arg(&lock),
    )?;
    std::fs::write(python_tools_stamp(), PYTHON_TOOLS_LOCK)
        .with_context(|| format!("cannot write {}", python_tools_stamp().display()))?;
    if !python_tools_ok() {
        bail!(
            "pip installed {} but {} still lacks {}",
            lock.display(),
            venv.display(),
            PYTHON_TOOLS.join(" or ")
        );
    }
    println!("    {versions}: installed");
    Ok(())
}
