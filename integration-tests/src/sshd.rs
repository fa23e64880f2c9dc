//! A real OpenSSH server on a loopback port, a test user with a key, and sudo rights for it.
//! The packages come from `cargo xtask setup` (openssh-server, openssh-client, sudo).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

/// The test user (created once, kept: creating users is slow and harmless to keep).
pub const USER: &str = "phi-audit-it";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The uid of the test user, creating the user (and its sudo rule) when missing.
pub fn ensure_user() -> u32 {
    let id = Command::new("id").args(["-u", USER]).output().expect("id");
    if !id.status.success() {
        run(Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", USER]));
    }
    let sudoers = Path::new("/etc/sudoers.d/phi-audit-it");
    if !sudoers.exists() {
        std::fs::write(sudoers, format!("{USER} ALL=(ALL) NOPASSWD: ALL\n")).expect("sudoers");
        crate::set_mode(sudoers, 0o440);
    }
    let out = run(Command::new("id").args(["-u", USER]));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric uid")
}

/// A running sshd that accepts the test user's key.
pub struct Sshd {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Sshd {
    pub fn start() -> Sshd {
        let dir = tempfile::tempdir().expect("sshd dir");
        let d = dir.path();
        std::fs::create_dir_all("/run/sshd").expect("privilege separation directory");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("host_key")));
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("client_key")));
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys"))
            .expect("authorized keys");
        crate::set_mode(d, 0o755);
        crate::set_mode(&d.join("authorized_keys"), 0o644);
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let config = d.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {pid}\n\
                 AuthorizedKeysFile {keys}\nStrictModes no\nUsePAM yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin no\nLogLevel VERBOSE\n",
                host = d.join("host_key").display(),
                pid = d.join("sshd.pid").display(),
                keys = d.join("authorized_keys").display(),
            ),
        )
        .expect("sshd_config");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd (cargo xtask setup installs openssh-server)");
        crate::wait_listening("sshd", &[port], Duration::from_secs(15), String::new);
        Sshd { child, port, dir }
    }

    fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// Runs `command` as the test user over ssh; returns its standard output.
    pub fn ssh(&self, command: &str) -> String {
        let out = run(Command::new("ssh").arg("-i").arg(self.client_key()).args([
            "-p",
            &self.port.to_string(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            &format!("{USER}@127.0.0.1"),
            command,
        ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
