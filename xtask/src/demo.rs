//! `cargo xtask demo`: set up, build, fill a demo directory with synthetic patient records,
//! create development certificates, start a collector with its embedded SQLite store and an
//! agent streaming to it over mutual TLS, touch a few records, and keep printing live records
//! until Ctrl-C. Ctrl-C stops the agent first (its last records reach the collector), then
//! the collector.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{
    cmd::{self, exec, step},
    setup,
};

#[derive(Args)]
pub struct DemoArgs {
    /// Directory for the demo: synthetic records (`ehr/`), certificates (`pki/`), the
    /// collector's database and the agent's state.
    #[arg(long, default_value = "/tmp/phi-audit-demo")]
    root: PathBuf,
    /// Port for the collector on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 4433)]
    port: u16,
}

/// Synthetic patients (invented names and numbers).
const PATIENTS: &[(&str, &str, &str)] = &[
    ("MRN-100234", "Avery Quinlan", "1961-03-14"),
    ("MRN-100871", "Jordan Ellery", "1984-11-02"),
    ("MRN-101442", "Morgan Tillsdale", "1992-07-29"),
];

fn fill(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("labs"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    for (mrn, name, dob) in PATIENTS {
        std::fs::write(
            dir.join(format!("{mrn}.json")),
            format!(
                "{{\"mrn\":\"{mrn}\",\"name\":\"{name}\",\"dob\":\"{dob}\",\"synthetic\":true}}\n"
            ),
        )?;
        std::fs::write(
            dir.join("labs").join(format!("{mrn}-a1c.csv")),
            "date,test,value\n2026-10-01,HbA1c,5.9\n",
        )?;
    }
    Ok(())
}

/// A few accesses so the first records appear without anyone typing.
fn scripted_accesses(dir: &Path) {
    let first = dir.join(format!("{}.json", PATIENTS[0].0));
    let _ = Command::new("cat")
        .arg(&first)
        .stdout(Stdio::null())
        .status();
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && head -n1 labs/*.csv > /dev/null; cat no-such-patient.json 2>/dev/null",
            dir.display()
        ))
        .status();
}

/// The host id: this machine's name when it suits a certificate, else `demo-host`.
fn host_id() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    let usable = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && !matches!(name, "ca" | "collector");
    if usable {
        name.to_owned()
    } else {
        "demo-host".to_owned()
    }
}

fn free_port(wanted: u16) -> anyhow::Result<u16> {
    if wanted != 0 && TcpListener::bind(("127.0.0.1", wanted)).is_ok() {
        return Ok(wanted);
    }
    let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
    if wanted != 0 {
        println!("    port {wanted} is taken; using {port}");
    }
    Ok(port)
}

/// Children run in their own process group: Ctrl-C reaches only this command, which then
/// stops them in order.
fn spawn(cmd: &mut Command, what: &str) -> anyhow::Result<Child> {
    cmd.process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {what}"))
}

fn terminate(child: &mut Child, wait: Duration) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Blocks SIGINT and SIGTERM in this thread (and threads started after), so they can be
/// waited for with `sigtimedwait`. Call after the children are started: they must not
/// inherit the mask.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn stop_signal_within(set: &libc::sigset_t, wait: Duration) -> bool {
    let timeout = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(wait.subsec_nanos() as i32),
    };
    // SAFETY: `set` is a valid signal set; a null info pointer is allowed.
    unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) > 0 }
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    setup::run()?;
    if !cmd::is_root() {
        bail!("the agent loads kernel probes and needs root: run `sudo -E cargo xtask demo`");
    }
    step("build: phi-agent with its kernel programs, phi-collector and phictl");
    exec(cmd::cargo().args([
        "build",
        "--release",
        "-p",
        "phi-agent",
        "-p",
        "phi-collector",
    ]))?;
    let bin = cmd::workspace_root().join("target/release");

    let ehr = args.root.join("ehr");
    let pki = args.root.join("pki");
    let host = host_id();
    step(format!(
        "demo data: synthetic patient records in {}",
        ehr.display()
    ));
    fill(&ehr)?;

    step(format!(
        "certificates: phictl certs init --dir {} --host {host}",
        pki.display()
    ));
    exec(
        Command::new(bin.join("phictl"))
            .args(["certs", "init", "--dir"])
            .arg(&pki)
            .args(["--host", &host]),
    )?;

    let port = free_port(args.port)?;
    let db = args.root.join("collector.db");
    step(format!(
        "start: phi-collector serve --listen 127.0.0.1:{port} --db sqlite:{}",
        db.display()
    ));
    let mut collector = spawn(
        Command::new(bin.join("phi-collector"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--db")
            .arg(format!("sqlite:{}", db.display()))
            .arg("--tls-cert")
            .arg(pki.join("collector.pem"))
            .arg("--tls-key")
            .arg(pki.join("collector.key"))
            .arg("--client-ca")
            .arg(pki.join("ca.pem"))
            // Batch receipts are shown so the demo makes the delivery visible.
            .args(["--log", "info,phi_collector::ingest=debug"]),
        "phi-collector",
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = collector.try_wait() {
            bail!("phi-collector exited with {status}: see its messages above");
        }
        if Instant::now() > deadline {
            terminate(&mut collector, Duration::from_secs(2));
            bail!("phi-collector did not listen on 127.0.0.1:{port} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let url = format!("https://localhost:{port}");
    step(format!(
        "start: phi-agent run --watch {} --collector {url} --stdout",
        ehr.display()
    ));
    let agent = spawn(
        Command::new(bin.join("phi-agent"))
            .args(["run", "--stdout", "--watch"])
            .arg(&ehr)
            .args(["--host-id", &host, "--collector", &url])
            .arg("--tls-ca")
            .arg(pki.join("ca.pem"))
            .arg("--tls-cert")
            .arg(pki.join(format!("{host}.pem")))
            .arg("--tls-key")
            .arg(pki.join(format!("{host}.key")))
            .arg("--state-dir")
            .arg(args.root.join("agent-state"))
            .stdout(Stdio::piped()),
        "phi-agent",
    );
    let mut agent = match agent {
        Ok(a) => a,
        Err(e) => {
            terminate(&mut collector, Duration::from_secs(5));
            return Err(e);
        }
    };
    let signals = block_stop_signals();
    let stdout = agent.stdout.take().context("agent stdout")?;
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let printer = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            println!("{line}");
            if line.contains("PHASE_START") {
                let _ = started_tx.send(());
            }
        }
    });

    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if started_rx.try_recv().is_ok() {
                break;
            }
            if let Ok(Some(status)) = agent.try_wait() {
                bail!("phi-agent exited with {status}: see its messages above");
            }
            if Instant::now() > deadline {
                bail!("the agent did not start within 60 s");
            }
            if stop_signal_within(&signals, Duration::from_millis(100)) {
                return Ok(());
            }
        }
        step("accessing some records (cat, head, a failed open); watch the open records appear");
        scripted_accesses(&ehr);
        step(format!(
            "live: the agent prints each record and streams it to the collector, which stores \
             it in {}; open files under {} in another shell to see more; Ctrl-C stops both",
            db.display(),
            ehr.display()
        ));
        loop {
            if stop_signal_within(&signals, Duration::from_millis(500)) {
                return Ok(());
            }
            if let Ok(Some(status)) = agent.try_wait() {
                bail!("phi-agent exited with {status}");
            }
            if let Ok(Some(status)) = collector.try_wait() {
                bail!("phi-collector exited with {status}");
            }
        }
    })();

    step("stopping: the agent first (its last records go to the collector), then the collector");
    terminate(&mut agent, Duration::from_secs(15));
    let _ = printer.join();
    terminate(&mut collector, Duration::from_secs(10));
    result
}
