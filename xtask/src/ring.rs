//! `cargo xtask ring`: one open or rename through an io_uring, for the kernel matrix's driver
//! (busybox has no io_uring client). Prints nothing on success; the error names the request.

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use io_uring::{IoUring, opcode, squeue, types};

#[derive(Args)]
pub struct RingArgs {
    #[command(subcommand)]
    request: Request,
}

#[derive(Subcommand)]
enum Request {
    /// IORING_OP_OPENAT of a file for reading (closed again at once).
    Open { path: PathBuf },
    /// IORING_OP_OPENAT of a file that does not exist: fails unless the ring reports ENOENT.
    OpenMissing { path: PathBuf },
    /// IORING_OP_RENAMEAT.
    Rename { from: PathBuf, to: PathBuf },
}

fn cstr(p: &std::path::Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("NUL in {}", p.display()))
}

/// Submits `entry` and waits for its result.
fn complete(entry: squeue::Entry) -> anyhow::Result<i32> {
    let mut ring = IoUring::new(4).context(
        "io_uring_setup failed (kernel without io_uring, or kernel.io_uring_disabled set)",
    )?;
    // SAFETY: the pointers in `entry` belong to the caller, which outlives this wait.
    unsafe { ring.submission().push(&entry) }.context("submission queue full")?;
    ring.submit_and_wait(1).context("io_uring_enter")?;
    Ok(ring
        .completion()
        .next()
        .context("no completion after waiting for one")?
        .result())
}

/// IORING_OP_OPENAT of `path` for reading: the new descriptor, or `-errno`.
fn open(path: &std::path::Path) -> anyhow::Result<i32> {
    let name = cstr(path)?;
    complete(
        opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), name.as_ptr())
            .flags(libc::O_RDONLY | libc::O_CLOEXEC)
            .build(),
    )
}

pub fn run(args: &RingArgs) -> anyhow::Result<()> {
    match &args.request {
        Request::Open { path } => {
            let fd = open(path)?;
            if fd < 0 {
                bail!(
                    "open of {} through an io_uring: {}",
                    path.display(),
                    std::io::Error::from_raw_os_error(-fd)
                );
            }
            // SAFETY: the descriptor the ring just opened, closed once.
            unsafe { libc::close(fd) };
        }
        Request::OpenMissing { path } => {
            let res = open(path)?;
            if res >= 0 {
                // SAFETY: the descriptor the ring just opened, closed once.
                unsafe { libc::close(res) };
                bail!("{} exists: the failed open was not made", path.display());
            }
            if res != -libc::ENOENT {
                bail!(
                    "open of missing {} through an io_uring: {} (not ENOENT)",
                    path.display(),
                    std::io::Error::from_raw_os_error(-res)
                );
            }
        }
        Request::Rename { from, to } => {
            let (old, new) = (cstr(from)?, cstr(to)?);
            let res = complete(
                opcode::RenameAt::new(
                    types::Fd(libc::AT_FDCWD),
                    old.as_ptr(),
                    types::Fd(libc::AT_FDCWD),
                    new.as_ptr(),
                )
                .build(),
            )?;
            if res < 0 {
                bail!(
                    "rename of {} to {} through an io_uring: {}",
                    from.display(),
                    to.display(),
                    std::io::Error::from_raw_os_error(-res)
                );
            }
        }
    }
    Ok(())
}
