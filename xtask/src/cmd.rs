//! Running commands with clear failure messages.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The workspace root (parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Runs a command, inheriting stdio; fails with the command line on a non-zero exit.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its standard output; `None` when it cannot run or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo` as invoked by the user (respects `$CARGO`).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Prints one step line.
pub fn step(msg: impl AsRef<str>) {
    println!("==> {}", msg.as_ref());
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process stopped (SIGTERM, then SIGKILL after a grace period) when dropped, so that
/// an error on the way leaves nothing running; then an optional clean-up runs.
pub struct Running {
    child: Option<std::process::Child>,
    on_stop: Option<Box<dyn FnOnce()>>,
}

impl Running {
    pub fn new(child: std::process::Child) -> Running {
        Running {
            child: Some(child),
            on_stop: None,
        }
    }

    /// Nothing running (a mode without a process).
    pub fn none() -> Running {
        Running {
            child: None,
            on_stop: None,
        }
    }

    /// Runs `f` after the child has stopped.
    pub fn on_stop(mut self, f: impl FnOnce() + 'static) -> Running {
        self.on_stop = Some(Box::new(f));
        self
    }

    pub fn child(&mut self) -> &mut std::process::Child {
        self.child.as_mut().expect("running")
    }

    pub fn stop(&mut self, wait: std::time::Duration) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + wait;
            let mut exited = false;
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(f) = self.on_stop.take() {
            f();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop(std::time::Duration::from_secs(15));
    }
}
