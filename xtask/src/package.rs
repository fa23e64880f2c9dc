//! `cargo xtask package`: release binaries, then under `target/package/` a Debian package made
//! with `dpkg-deb --build --root-owner-group` and a `.tar.gz` with the same file layout plus
//! `install.sh`.
//!
//! Layout (both): `/usr/bin/{phi-agent,phi-collector,phictl}`, the units in
//! `/lib/systemd/system`, documentation and example configurations in
//! `/usr/share/doc/phi-audit`. Nothing is installed under `/etc`: the configuration files there
//! belong to the administrator, so the package has no conffiles and an upgrade never touches
//! them. The maintainer scripts create the system users `phi-audit` and `phi-collector`, reload
//! systemd, restart running services on upgrade, and never enable or start a service (each host
//! needs its configuration first). Purging keeps `/var/lib/phi-audit` and
//! `/var/lib/phi-collector`: they hold audit evidence.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use clap::Args;

use crate::{
    cmd::{self, exec, output, step},
    setup,
};

const PACKAGE: &str = "phi-audit";

/// Binaries, as cargo names them in `target/release`.
const BINARIES: &[&str] = &["phi-agent", "phi-collector", "phictl"];

const UNITS: &[&str] = &["phi-agent.service", "phi-collector.service"];

const MAINTAINER: &str = "phi-audit maintainers <maintainers@phi-audit.invalid>";

const SUMMARY: &str = "audit trail of access to protected health information (eBPF)";

/// The long description, lines under 80 columns as Debian wants them.
const DESCRIPTION: &str = "\
phi-audit proves who opened protected health information on a server,
when, how and from where. phi-agent watches file opens under the
directory trees that hold ePHI, program executions and outbound
connections with eBPF, seals every record into a signed per-host hash
chain and streams it over mutual TLS to phi-collector, which verifies
and stores it. phictl queries, verifies and exports evidence bundles.";

#[derive(Args)]
pub struct PackageArgs {
    /// Package the release binaries already in target/release instead of building them.
    #[arg(long)]
    no_build: bool,
}

pub fn run(args: &PackageArgs) -> anyhow::Result<()> {
    let root = cmd::workspace_root();
    if !args.no_build {
        setup::run()?;
        step("build: release binaries (phi-agent with its kernel programs, phi-collector, phictl)");
        exec(cmd::cargo().args([
            "build",
            "--release",
            "-p",
            "phi-agent",
            "-p",
            "phi-collector",
        ]))?;
    }
    let release = root.join("target/release");
    for bin in BINARIES {
        ensure!(
            release.join(bin).is_file(),
            "{} is missing: build it (cargo build --release -p phi-agent -p phi-collector)",
            release.join(bin).display()
        );
    }
    let meta = Meta::read()?;
    let out = root.join("target/package");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;

    step(format!(
        "package: {PACKAGE} {} for {}",
        meta.version, meta.arch
    ));
    let deb = debian_package(&root, &release, &meta, &out)?;
    let tarball = tarball(&root, &release, &meta, &out)?;
    for stage in ["deb-root", "tar-root"] {
        std::fs::remove_dir_all(out.join(stage)).ok();
    }

    let sums = out.join("SHA256SUMS");
    let names = [file_name(&deb), file_name(&tarball)];
    let listing = output(Command::new("sha256sum").current_dir(&out).args(&names))
        .context("sha256sum failed")?;
    std::fs::write(&sums, &listing).with_context(|| format!("cannot write {}", sums.display()))?;

    step("package: written");
    for path in [&deb, &tarball, &sums] {
        let size = std::fs::metadata(path)?.len();
        if size >= 1 << 20 {
            println!(
                "    {} ({:.1} MiB)",
                path.display(),
                size as f64 / 1048576.0
            );
        } else {
            println!("    {} ({size} bytes)", path.display());
        }
    }
    print!("{listing}");
    println!("    contents of {}:", file_name(&deb));
    let contents = output(Command::new("dpkg-deb").arg("--contents").arg(&deb))
        .context("dpkg-deb --contents failed")?;
    for line in contents.lines() {
        // "-rwxr-xr-x root/root 123 2026-11-22 10:00 ./usr/bin/phi-agent"
        let mut fields = line.split_whitespace();
        let mode = fields.next().unwrap_or("");
        let owner = fields.next().unwrap_or("");
        let path = fields.last().unwrap_or("");
        if !mode.starts_with('d') {
            println!("      {mode} {owner} {}", path.trim_start_matches('.'));
        }
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Version, architecture and links, from cargo and dpkg.
struct Meta {
    version: String,
    arch: String,
    homepage: String,
}

impl Meta {
    fn read() -> anyhow::Result<Self> {
        let json = output(cmd::cargo().args(["metadata", "--format-version", "1", "--no-deps"]))
            .context("cargo metadata failed")?;
        let meta: serde_json::Value =
            serde_json::from_str(&json).context("cargo metadata printed no JSON")?;
        let agent = meta["packages"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "phi-agent"))
            .context("cargo metadata lists no phi-agent package")?;
        let version = agent["version"]
            .as_str()
            .context("phi-agent has no version")?
            .to_owned();
        let homepage = agent["repository"]
            .as_str()
            .map(str::to_owned)
            .or_else(workspace_repository)
            .unwrap_or_default();
        let arch = output(Command::new("dpkg").arg("--print-architecture"))
            .context("`dpkg --print-architecture` failed")?
            .trim()
            .to_owned();
        Ok(Self {
            version,
            arch,
            homepage,
        })
    }
}

/// `repository` of `[workspace.package]` in the root Cargo.toml (the members inherit it only
/// when they say so).
fn workspace_repository() -> Option<String> {
    let manifest = std::fs::read_to_string(cmd::workspace_root().join("Cargo.toml")).ok()?;
    let section = manifest.split("[workspace.package]").nth(1)?;
    section
        .lines()
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| {
            let value = l
                .trim()
                .strip_prefix("repository")?
                .trim()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
}

fn write_file(path: &Path, contents: impl AsRef<[u8]>, mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        create_dirs(dir)?;
    }
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

/// Creates `dir` and its parents with mode 0755 whatever the umask.
fn create_dirs(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs(parent)?;
    }
    std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", dir.display()))
}

fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    create_dirs(dir)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The example collector configuration, pointed at the directory the unit lets it write.
fn collector_example(root: &Path) -> anyhow::Result<String> {
    let text = read(&root.join("deploy/collector.example.toml"))?;
    let from = "sqlite:/var/lib/phi-audit/collector.db";
    ensure!(
        text.contains(from),
        "deploy/collector.example.toml no longer says db = {from:?}: update the packaged example \
         in xtask/src/package.rs"
    );
    Ok(text.replace(from, "sqlite:/var/lib/phi-collector/collector.db"))
}

/// The installed files, below `dest` (the same for the .deb and the tarball).
fn install_tree(root: &Path, release: &Path, dest: &Path) -> anyhow::Result<()> {
    for bin in BINARIES {
        let target = dest.join("usr/bin").join(bin);
        create_dirs(target.parent().expect("has a parent"))?;
        // Release builds keep line tables for development; the package ships stripped
        // binaries, as Debian packages do.
        exec(
            Command::new("objcopy")
                .arg("--strip-unneeded")
                .arg(release.join(bin))
                .arg(&target),
        )
        .context("objcopy (binutils) strips the binaries")?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    }
    for unit in UNITS {
        write_file(
            &dest.join("lib/systemd/system").join(unit),
            read(&root.join("deploy/systemd").join(unit))?,
            0o644,
        )?;
    }
    let doc = dest.join("usr/share/doc").join(PACKAGE);
    write_file(
        &doc.join("README.md"),
        read(&root.join("README.md"))?,
        0o644,
    )?;
    write_file(
        &doc.join("systemd.md"),
        read(&root.join("deploy/systemd/README.md"))?,
        0o644,
    )?;
    for name in ["api.md", "chain.md", "identity-and-redaction.md"] {
        let path = root.join("docs").join(name);
        if path.is_file() {
            write_file(&doc.join("docs").join(name), read(&path)?, 0o644)?;
        }
    }
    write_file(
        &doc.join("examples/agent.toml"),
        read(&root.join("deploy/agent.example.toml"))?,
        0o644,
    )?;
    write_file(
        &doc.join("examples/collector.toml"),
        collector_example(root)?,
        0o644,
    )?;
    write_file(
        &doc.join("examples/collector.env"),
        "# /etc/phi-audit/collector.env (mode 0640, owner root, group phi-collector), read by\n\
         # phi-collector.service: the PostgreSQL password, never in collector.toml or a URL.\n\
         #PGPASSWORD=\n",
        0o644,
    )?;
    write_file(&doc.join("copyright"), copyright(), 0o644)?;
    Ok(())
}

/// `changelog.gz`, which every Debian package carries: one entry for this version, dated by
/// the last commit so that the same tree gives the same package.
fn changelog(meta: &Meta, doc: &Path) -> anyhow::Result<()> {
    let date = output(
        Command::new("git")
            .current_dir(cmd::workspace_root())
            .args(["log", "-1", "--format=%cD"]),
    )
    .or_else(|| output(Command::new("date").arg("-R")))
    .context("neither git nor date gave a date for the changelog")?;
    let path = doc.join("changelog");
    write_file(
        &path,
        format!(
            "{PACKAGE} ({version}) unstable; urgency=medium\n\n  * Release {version}.\n\n \
             -- {MAINTAINER}  {date}\n",
            version = meta.version,
            date = date.trim()
        ),
        0o644,
    )?;
    exec(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&path))?;
    std::fs::set_permissions(
        doc.join("changelog.gz"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    Ok(())
}

fn copyright() -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: {PACKAGE}\n\n\
         Files: *\n\
         Copyright: the {PACKAGE} authors\n\
         License: Apache-2.0\n \
         On Debian systems the full text of the Apache License 2.0 is in\n \
         /usr/share/common-licenses/Apache-2.0.\n"
    )
}

/// The newest glibc symbol version the binaries need (for `Depends: libc6 (>= …)`).
fn glibc_requirement(bins: &[PathBuf]) -> anyhow::Result<String> {
    let mut newest = (2u32, 17u32);
    for bin in bins {
        let symbols = output(Command::new("objdump").arg("-T").arg(bin))
            .with_context(|| format!("objdump -T {} failed", bin.display()))?;
        for word in symbols.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
            if let Some(v) = word.strip_prefix("GLIBC_")
                && let Some((major, minor)) = v.split_once('.')
                && let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>())
            {
                newest = newest.max((major, minor));
            }
        }
    }
    Ok(format!("{}.{}", newest.0, newest.1))
}

/// Installed size in KiB, as dpkg counts it (each file rounded up).
fn installed_kib(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            installed_kib(&entry.path())? + 1
        } else {
            meta.len().div_ceil(1024)
        };
    }
    Ok(total)
}

const POSTINST: &str = r#"#!/bin/sh
# phi-audit: the services' system users, then systemd. Nothing is enabled or started: every
# host needs its configuration first (/usr/share/doc/phi-audit/systemd.md).
set -e

case "$1" in
configure)
    for user in phi-audit phi-collector; do
        if ! getent passwd "$user" >/dev/null; then
            adduser --system --group --no-create-home --home /nonexistent \
                --gecos "phi-audit service account" --quiet "$user"
        fi
    done
    install -d -m 0755 /etc/phi-audit
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        if [ -n "$2" ]; then
            # An upgrade: running services continue on the new binaries.
            deb-systemd-invoke try-restart phi-agent.service phi-collector.service >/dev/null || true
        fi
    fi
    if [ -z "$2" ]; then
        echo "phi-audit: put agent.toml (or collector.toml) into /etc/phi-audit, from the examples in"
        echo "  /usr/share/doc/phi-audit/examples, then: systemctl enable --now phi-agent (or phi-collector)"
    fi
    ;;
esac

exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e

if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    deb-systemd-invoke stop phi-agent.service phi-collector.service >/dev/null 2>&1 || true
fi

exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
# Purging keeps /var/lib/phi-audit and /var/lib/phi-collector (host keys, unsent records, the
# store: audit evidence) and the users owning them. Remove them by hand once the evidence is
# kept elsewhere.
set -e

case "$1" in
purge)
    rm -f /etc/systemd/system/multi-user.target.wants/phi-agent.service \
        /etc/systemd/system/multi-user.target.wants/phi-collector.service
    ;;
esac
if [ "$1" = remove ] || [ "$1" = purge ]; then
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
    fi
fi

exit 0
"#;

fn debian_package(root: &Path, release: &Path, meta: &Meta, out: &Path) -> anyhow::Result<PathBuf> {
    let stage = out.join("deb-root");
    fresh_dir(&stage)?;
    install_tree(root, release, &stage)?;
    changelog(meta, &stage.join("usr/share/doc").join(PACKAGE))?;

    let bins: Vec<PathBuf> = BINARIES
        .iter()
        .map(|b| stage.join("usr/bin").join(b))
        .collect();
    let glibc = glibc_requirement(&bins)?;
    let description: String = DESCRIPTION.lines().map(|l| format!(" {l}\n")).collect();
    let mut control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {size}\n\
         Depends: adduser, libc6 (>= {glibc}), libgcc-s1\n\
         Section: admin\n\
         Priority: optional\n",
        version = meta.version,
        arch = meta.arch,
        size = installed_kib(&stage)?,
    );
    if !meta.homepage.is_empty() {
        control.push_str(&format!("Homepage: {}\n", meta.homepage));
    }
    control.push_str(&format!("Description: {SUMMARY}\n{description}"));

    let debian = stage.join("DEBIAN");
    write_file(&debian.join("control"), control, 0o644)?;
    write_file(&debian.join("postinst"), POSTINST, 0o755)?;
    write_file(&debian.join("prerm"), PRERM, 0o755)?;
    write_file(&debian.join("postrm"), POSTRM, 0o755)?;
    for script in ["postinst", "prerm", "postrm"] {
        exec(Command::new("sh").arg("-n").arg(debian.join(script)))
            .with_context(|| format!("the maintainer script {script} does not parse"))?;
    }
    let md5sums = output(
        Command::new("sh")
            .current_dir(&stage)
            .args(["-c", "find usr lib -type f | LC_ALL=C sort | xargs md5sum"]),
    )
    .context("md5sum failed")?;
    write_file(&debian.join("md5sums"), md5sums, 0o644)?;

    let deb = out.join(format!("{PACKAGE}_{}_{}.deb", meta.version, meta.arch));
    exec(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group", "-Zxz"])
            .arg(&stage)
            .arg(&deb),
    )?;

    // What was built is what was meant.
    let fields = output(Command::new("dpkg-deb").arg("--field").arg(&deb).args([
        "Package",
        "Version",
        "Architecture",
    ]))
    .context("dpkg-deb --field failed")?;
    ensure!(
        fields.contains(&format!("Package: {PACKAGE}"))
            && fields.contains(&format!("Version: {}", meta.version)),
        "{} has unexpected fields:\n{fields}",
        deb.display()
    );
    let contents = output(Command::new("dpkg-deb").arg("--contents").arg(&deb))
        .context("dpkg-deb --contents failed")?;
    let mut expected: Vec<String> = BINARIES.iter().map(|b| format!("./usr/bin/{b}")).collect();
    expected.extend(UNITS.iter().map(|u| format!("./lib/systemd/system/{u}")));
    for path in &expected {
        let line = contents
            .lines()
            .find(|l| l.ends_with(path.as_str()))
            .with_context(|| format!("{} lacks {path}", deb.display()))?;
        ensure!(
            line.contains("root/root"),
            "{path} in {} is not owned by root: {line}",
            deb.display()
        );
    }
    ensure!(
        !contents.contains(" ./etc/"),
        "{} installs files under /etc; configuration there belongs to the administrator",
        deb.display()
    );
    Ok(deb)
}

const INSTALL_SH: &str = r#"#!/bin/sh
# Installs phi-audit from this archive: the binaries into /usr/bin, the systemd units into
# /lib/systemd/system, documentation and example configurations into /usr/share/doc/phi-audit,
# and the system users phi-audit and phi-collector. Nothing is enabled or started: every host
# needs its configuration first (/usr/share/doc/phi-audit/systemd.md).
#
#   sudo ./install.sh              install on this machine
#   DESTDIR=/tmp/root ./install.sh into another root (an image build), without creating users
set -eu

here=$(cd "$(dirname "$0")" && pwd)
dest=${DESTDIR:-}
if [ -z "$dest" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or set DESTDIR)" >&2
    exit 1
fi

cd "$here"
find usr lib -type d | while read -r dir; do
    install -d -m 0755 "$dest/$dir"
done
find usr lib -type f | while read -r file; do
    case "$file" in
    usr/bin/*) mode=0755 ;;
    *) mode=0644 ;;
    esac
    install -m "$mode" "$file" "$dest/$file"
done
install -d -m 0755 "$dest/etc/phi-audit"

if [ -z "$dest" ]; then
    for user in phi-audit phi-collector; do
        if ! getent passwd "$user" >/dev/null; then
            useradd --system --user-group --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin --comment "phi-audit service account" "$user"
        fi
    done
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload
    fi
fi

echo "phi-audit installed${dest:+ under $dest}. Next: put agent.toml (or collector.toml) into"
echo "/etc/phi-audit from /usr/share/doc/phi-audit/examples, then"
echo "systemctl enable --now phi-agent (or phi-collector)."
"#;

fn tarball(root: &Path, release: &Path, meta: &Meta, out: &Path) -> anyhow::Result<PathBuf> {
    let name = format!("{PACKAGE}-{}", meta.version);
    let stage = out.join("tar-root");
    fresh_dir(&stage)?;
    let top = stage.join(&name);
    install_tree(root, release, &top)?;
    write_file(&top.join("install.sh"), INSTALL_SH, 0o755)?;
    exec(Command::new("sh").arg("-n").arg(top.join("install.sh")))
        .context("install.sh does not parse")?;
    let tarball = out.join(format!("{name}-linux-{}.tar.gz", meta.arch));
    exec(
        Command::new("tar")
            .args([
                "--create",
                "--gzip",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--sort=name",
                "--file",
            ])
            .arg(&tarball)
            .arg("-C")
            .arg(&stage)
            .arg(&name),
    )?;

    // The archive installs: into a scratch root, as an image build would.
    let check = out.join("tar-check");
    fresh_dir(&check)?;
    exec(
        Command::new("tar")
            .arg("--extract")
            .arg("--file")
            .arg(&tarball)
            .arg("-C")
            .arg(&check),
    )?;
    let dest = check.join("root");
    let status = Command::new("sh")
        .arg(check.join(&name).join("install.sh"))
        .env("DESTDIR", &dest)
        .stdout(std::process::Stdio::null())
        .status()
        .context("cannot run install.sh")?;
    if !status.success() {
        bail!("install.sh from {} failed ({status})", tarball.display());
    }
    for bin in BINARIES {
        let path = dest.join("usr/bin").join(bin);
        let mode = std::fs::metadata(&path)
            .with_context(|| format!("install.sh did not install {}", path.display()))?
            .permissions()
            .mode();
        ensure!(
            mode & 0o777 == 0o755,
            "{} has mode {:o}",
            path.display(),
            mode & 0o777
        );
    }
    for unit in UNITS {
        ensure!(
            dest.join("lib/systemd/system").join(unit).is_file(),
            "install.sh did not install {unit}"
        );
    }
    std::fs::remove_dir_all(&check).ok();
    Ok(tarball)
}
