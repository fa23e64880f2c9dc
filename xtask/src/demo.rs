//! `cargo xtask demo`: from a fresh clone to a verified PHI access timeline in one command.
//!
//! Sets up and builds, fills a demo directory with synthetic patient records, creates
//! development certificates, starts `phi-collector` on embedded SQLite and `phi-agent` streaming
//! to it over mutual TLS, then performs a scripted set of accesses as two people: one reads
//! records through a real ssh login on loopback, the other is refused and then uses sudo.
//! It prints the per-host timeline, the login sessions and the result of `phictl verify`, and
//! keeps showing accesses live until Ctrl-C, which stops the agent first (its last records
//! reach the collector), then the collector and the ssh server.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::Value;

use crate::{
    cmd::{self, Running, exec, step},
    setup,
};

#[derive(Args)]
pub struct DemoArgs {
    /// Directory for the demo: synthetic records (`ehr/`), certificates (`pki/`), the
    /// collector's database, the agent's state, the ssh server's keys.
    #[arg(long, default_value = "/tmp/phi-audit-demo")]
    root: PathBuf,
    /// Port agents stream to on 127.0.0.1 (0 picks a free one; the query API, the metrics
    /// and the ssh server take free ports).
    #[arg(long, default_value_t = 4433)]
    port: u16,
    /// Stop after the scripted accesses, the timeline and the verification instead of staying
    /// live (what the test command runs).
    #[arg(long)]
    no_live: bool,
}

impl DemoArgs {
    /// The scripted part only, in `root`, on free ports (what the test command runs).
    pub fn scripted(root: PathBuf) -> DemoArgs {
        DemoArgs {
            root,
            port: 0,
            no_live: true,
        }
    }
}

/// The two people of the demo (local accounts created for it) and the group that may read
/// the records.
const ALICE: &str = "phi-demo-alice";
const BOB: &str = "phi-demo-bob";
const CLINIC: &str = "phi-demo-clinic";

/// Synthetic patients (invented names and numbers).
const PATIENTS: &[(&str, &str, &str)] = &[
    ("MRN-100234", "Avery Quinlan", "1961-03-14"),
    ("MRN-100871", "Jordan Ellery", "1984-11-02"),
    ("MRN-101442", "Morgan Tillsdale", "1992-07-29"),
];

fn run_quiet(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

/// The records, readable by the clinic group only.
fn fill(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("labs"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    for (mrn, name, dob) in PATIENTS {
        let chart = dir.join(format!("{mrn}.json"));
        std::fs::write(
            &chart,
            format!(
                "{{\"mrn\":\"{mrn}\",\"name\":\"{name}\",\"dob\":\"{dob}\",\"synthetic\":true}}\n"
            ),
        )?;
        let lab = dir.join("labs").join(format!("{mrn}-a1c.csv"));
        std::fs::write(&lab, "date,test,value\n2026-10-01,HbA1c,5.9\n")?;
        chmod(&chart, 0o640)?;
        chmod(&lab, 0o640)?;
    }
    run_quiet(
        Command::new("chown")
            .args(["-R", &format!("root:{CLINIC}")])
            .arg(dir),
    )?;
    chmod(dir, 0o750)?;
    chmod(&dir.join("labs"), 0o750)
}

fn exists(kind: &str, name: &str) -> bool {
    Command::new("getent")
        .args([kind, name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Creates the demo accounts once: alice in the clinic group, bob outside it with the right
/// to run `cat` through sudo.
fn ensure_people() -> anyhow::Result<()> {
    if !exists("group", CLINIC) {
        run_quiet(Command::new("groupadd").arg(CLINIC))?;
    }
    for (user, groups) in [(ALICE, CLINIC), (BOB, "")] {
        if !exists("passwd", user) {
            let mut c = Command::new("useradd");
            c.args(["--create-home", "--shell", "/bin/sh"]);
            if !groups.is_empty() {
                c.args(["--groups", groups]);
            }
            run_quiet(c.arg(user))?;
        }
        // A locked password still lets key logins through; "*" would not with UsePAM.
        run_quiet(Command::new("usermod").args(["-p", "!", user]))?;
    }
    let sudoers = Path::new("/etc/sudoers.d/phi-audit-demo");
    std::fs::write(
        sudoers,
        format!("{BOB} ALL=(root) NOPASSWD: /usr/bin/cat\n"),
    )
    .context("cannot write /etc/sudoers.d/phi-audit-demo")?;
    chmod(sudoers, 0o440)
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
    let port = cmd::free_port()?;
    if wanted != 0 {
        println!("    port {wanted} is taken; using {port}");
    }
    Ok(port)
}

fn wait_listening(child: &mut Child, what: &str, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited with {status}: see its messages above");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on 127.0.0.1:{port} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Children run in their own process group: Ctrl-C reaches only this command, which then
/// stops them in order.
fn spawn(cmd: &mut Command, what: &str) -> anyhow::Result<Running> {
    let child = cmd
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    Ok(Running::new(child))
}

/// A private sshd on a loopback port that accepts the demo people's keys.
fn start_sshd(dir: &Path) -> anyhow::Result<(Running, u16)> {
    std::fs::create_dir_all(dir)?;
    std::fs::create_dir_all("/run/sshd").context("cannot create /run/sshd")?;
    let keygen = |file: &Path| -> anyhow::Result<()> {
        if !file.exists() {
            run_quiet(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(file),
            )?;
        }
        Ok(())
    };
    keygen(&dir.join("host_key"))?;
    for user in [ALICE, BOB] {
        keygen(&dir.join(user))?;
        std::fs::copy(
            dir.join(format!("{user}.pub")),
            dir.join(format!("{user}.authorized")),
        )?;
        chmod(&dir.join(format!("{user}.authorized")), 0o644)?;
    }
    chmod(dir, 0o755)?;
    let port = free_port(0)?;
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nPidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/%u.authorized\nStrictModes no\nUsePAM yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\n\
             AllowUsers {ALICE} {BOB}\n",
            dir = dir.display()
        ),
    )?;
    let mut sshd = spawn(
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "sshd (cargo xtask setup installs openssh-server)",
    )?;
    wait_listening(sshd.child(), "sshd", port)?;
    Ok((sshd, port))
}

/// Runs `command` as `user` through a real ssh login; returns what it printed.
fn ssh(dir: &Path, port: u16, user: &str, command: &str) -> anyhow::Result<String> {
    let out = Command::new("ssh")
        .arg("-i")
        .arg(dir.join(user))
        .args(["-p", &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ssh")?;
    if out.status.code() == Some(255) {
        bail!(
            "the ssh login as {user} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
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

/// One line for a live record: opens (PHI accesses) and losses; everything else is counted.
fn live_line(r: &Value) -> Option<String> {
    let time = r["time"].as_str().unwrap_or("").get(11..19).unwrap_or("");
    if let Some(open) = r.get("open") {
        let id = &r["process"]["identity"];
        let user = id["user"].as_str().unwrap_or("?");
        let login = id["loginUser"].as_str().unwrap_or("unset");
        let who = if login != "unset" && login != user {
            format!("{login} as {user}")
        } else {
            user.to_owned()
        };
        let session = &id["session"];
        let from = match session["kind"].as_str() {
            Some("ssh") => format!(
                " from ssh {}",
                session["sourceAddress"].as_str().unwrap_or("?")
            ),
            _ => String::new(),
        };
        let errno = open["outcome"]["errno"].as_str().unwrap_or("");
        let outcome = if errno.is_empty() { "ok" } else { errno };
        return Some(format!(
            "    {time}  {who}{from}: {} {} -> {outcome}",
            r["process"]["comm"].as_str().unwrap_or("?"),
            open["path"].as_str().unwrap_or("?"),
        ));
    }
    r.get("gap").map(|g| {
        format!(
            "    {time}  LOSS: {} events ({})",
            g["count"],
            g["reason"].as_str().unwrap_or("?")
        )
    })
}

struct Phictl {
    bin: PathBuf,
    api: String,
    ca: PathBuf,
    token_file: PathBuf,
}

impl Phictl {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(["--collector", &self.api, "--ca"])
            .arg(&self.ca)
            .arg("--token-file")
            .arg(&self.token_file)
            .args(args);
        c
    }

    fn json(&self, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        let mut full = vec!["--format", "json"];
        full.extend_from_slice(args);
        let text = run_quiet(&mut self.command(&full))?;
        // One object per line for record streams, one pretty object otherwise.
        serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .map(|v| v.context("phictl printed something that is not JSON"))
            .collect()
    }

    /// Prints the command and runs it on the terminal.
    fn show(&self, args: &[&str]) -> anyhow::Result<bool> {
        println!("\n$ phictl {}", args.join(" "));
        let status = self
            .command(args)
            .stdin(Stdio::null())
            .status()
            .context("cannot run phictl")?;
        Ok(status.success())
    }
}

fn number(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    setup::run()?;
    if !cmd::is_root() {
        bail!(
            "the agent loads kernel probes and the demo creates two local accounts: run it as \
             root (`sudo -E cargo xtask demo`)"
        );
    }
    step("build: phi-agent with its kernel programs, phi-collector and phictl (release)");
    exec(cmd::cargo().args([
        "build",
        "--release",
        "-p",
        "phi-agent",
        "-p",
        "phi-collector",
    ]))?;
    let bin = cmd::workspace_root().join("target/release");
    let root = &args.root;
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    chmod(root, 0o755)?;

    step(format!(
        "people: local accounts {ALICE} (group {CLINIC}, may read the records) and {BOB} \
         (outside it; may run cat through sudo)"
    ));
    ensure_people()?;
    let ehr = root.join("ehr");
    step(format!(
        "demo data: synthetic patient records in {} (readable by {CLINIC} only)",
        ehr.display()
    ));
    fill(&ehr)?;

    let pki = root.join("pki");
    let host = host_id();
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
    let api_port = free_port(0)?;
    let metrics_port = free_port(0)?;
    let db = root.join("collector.db");
    let db_url = format!("sqlite:{}", db.display());
    step(format!(
        "start: phi-collector serve --listen 127.0.0.1:{port} --api-listen 127.0.0.1:{api_port} \
         --db {db_url}"
    ));
    let mut collector = spawn(
        Command::new(bin.join("phi-collector"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--db", &db_url, "--name", "demo-collector"])
            .arg("--tls-cert")
            .arg(pki.join("collector.pem"))
            .arg("--tls-key")
            .arg(pki.join("collector.key"))
            .arg("--client-ca")
            .arg(pki.join("ca.pem"))
            .args(["--log", "warn"]),
        "phi-collector",
    )?;
    wait_listening(collector.child(), "phi-collector", port)?;
    wait_listening(collector.child(), "phi-collector's API", api_port)?;

    // An auditor with a token, made on the store directly as the operator would.
    let token_file = root.join("auditor.token");
    step(format!(
        "auditor: phictl --db {db_url} principals add demo-auditor --role auditor --issue-token \
         (token in {})",
        token_file.display()
    ));
    let made = run_quiet(
        Command::new(bin.join("phictl"))
            .args(["--db", &db_url, "--format", "json", "principals", "add"])
            .args(["demo-auditor", "--role", "auditor", "--issue-token"]),
    )?;
    let token = serde_json::from_str::<Value>(&made)
        .ok()
        .and_then(|v| v["token"].as_str().map(str::to_owned))
        .with_context(|| format!("phictl did not print a token: {made}"))?;
    std::fs::write(&token_file, format!("{token}\n"))?;
    chmod(&token_file, 0o600)?;
    let phictl = Phictl {
        bin: bin.join("phictl"),
        api: format!("https://localhost:{api_port}"),
        ca: pki.join("ca.pem"),
        token_file,
    };

    let config = root.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "# Written by `cargo xtask demo`.\nhost_id = \"{host}\"\nwatch = [\"{ehr}\"]\n\
             stdout = true\nstate_dir = \"{state}\"\nmetrics_listen = \"127.0.0.1:{mport}\"\n\n\
             [chain]\ncheckpoint_seconds = 5\n\n[collector]\nurl = \"https://localhost:{port}\"\n\
             ca = \"{pki}/ca.pem\"\ncert = \"{pki}/{host}.pem\"\nkey = \"{pki}/{host}.key\"\n",
            ehr = ehr.display(),
            state = root.join("agent-state").display(),
            mport = free_port(0)?,
            pki = pki.display(),
        ),
    )?;
    step(format!(
        "start: phi-agent run --config {} (watching {}, streaming to the collector)",
        config.display(),
        ehr.display()
    ));
    let mut agent = spawn(
        Command::new(bin.join("phi-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .args(["--log", "warn"])
            .stdout(Stdio::piped()),
        "phi-agent",
    )?;
    let stdout = agent.child().stdout.take().context("agent stdout")?;
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (live_tx, live_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let Ok(r) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if r["agent"]["phase"] == "PHASE_START" {
                let _ = started_tx.send(());
            }
            if let Some(l) = live_line(&r) {
                let _ = live_tx.send(l);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while started_rx.recv_timeout(Duration::from_millis(100)).is_err() {
        if let Ok(Some(status)) = agent.child().try_wait() {
            bail!("phi-agent exited with {status}: see its messages above");
        }
        if Instant::now() > deadline {
            bail!("the agent did not start within 60 s");
        }
    }
    let print_live = |rx: &std::sync::mpsc::Receiver<String>| {
        while let Ok(l) = rx.try_recv() {
            println!("{l}");
        }
    };

    let ssh_dir = root.join("ssh");
    step("start: a private sshd on a loopback port for the scripted logins");
    let (mut sshd, ssh_port) = start_sshd(&ssh_dir)?;

    let chart = |i: usize| ehr.join(format!("{}.json", PATIENTS[i].0));
    let lab = ehr.join("labs").join(format!("{}-a1c.csv", PATIENTS[0].0));
    step(format!(
        "access 1: {ALICE} logs in over ssh and reads two records of patient {}",
        PATIENTS[0].0
    ));
    ssh(
        &ssh_dir,
        ssh_port,
        ALICE,
        &format!(
            "cat {} > /dev/null && head -n 2 {} > /dev/null",
            chart(0).display(),
            lab.display()
        ),
    )?;
    step(format!(
        "access 2: {BOB} logs in over ssh, is refused a record, then reads it through sudo"
    ));
    let said = ssh(
        &ssh_dir,
        ssh_port,
        BOB,
        &format!(
            "cat {c} > /dev/null; sudo -n cat {c} > /dev/null && echo read-through-sudo",
            c = chart(1).display()
        ),
    )?;
    if !said.contains("read-through-sudo") {
        bail!("{BOB}'s sudo read failed: {said}");
    }
    std::thread::sleep(Duration::from_millis(500));
    print_live(&live_rx);

    step("waiting until the collector holds the accesses under a signed checkpoint");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let bob = phictl.json(&["timeline", "--host", &host, "--kind", "open", "--user", BOB])?;
        let newest = bob.iter().map(|r| number(&r["seq"])).max().unwrap_or(0);
        let signed = phictl
            .json(&["hosts"])?
            .iter()
            .flat_map(|h| h["hosts"].as_array().cloned().unwrap_or_default())
            .find(|h| h["hostId"] == host.as_str())
            .map_or(0, |h| number(&h["checkpointSeq"]));
        if bob.len() >= 2 && signed >= newest {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "after 60 s the collector holds {} of {BOB}'s opens, signed through seq \
                 {signed}: see the messages above",
                bob.len()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    step("the per-host access timeline of the demo records, as an auditor sees it");
    phictl.show(&[
        "timeline",
        "--host",
        &host,
        "--path-prefix",
        ehr.to_str().context("utf-8 path")?,
    ])?;
    step("login sessions on the host");
    phictl.show(&["sessions", "--host", &host])?;
    step("integrity: every hash link and checkpoint signature of the host's chain");
    if !phictl.show(&["verify", "--host", &host])? {
        bail!("phictl verify found a problem in the demo chain");
    }

    if args.no_live {
        step("scripted part done (--no-live): stopping");
    } else {
        let signals = block_stop_signals();
        step(format!(
            "live: PHI accesses appear below as they happen; try `cat {}` or ssh in as {ALICE} \
             (key {}/{ALICE}, port {ssh_port}); metrics on http://127.0.0.1:{metrics_port}/metrics; \
             Ctrl-C stops everything",
            chart(2).display(),
            ssh_dir.display()
        ));
        loop {
            if stop_signal_within(&signals, Duration::from_millis(300)) {
                break;
            }
            print_live(&live_rx);
            if let Ok(Some(status)) = agent.child().try_wait() {
                bail!("phi-agent exited with {status}");
            }
            if let Ok(Some(status)) = collector.child().try_wait() {
                bail!("phi-collector exited with {status}");
            }
        }
    }
    step("stopping: the agent first (its last records go to the collector), then the collector");
    agent.stop(Duration::from_secs(15));
    let _ = reader.join();
    print_live(&live_rx);
    collector.stop(Duration::from_secs(10));
    sshd.stop(Duration::from_secs(5));
    println!(
        "    the store stays in {}: `{} --db {db_url} timeline --host {host}` reads it again",
        db.display(),
        bin.join("phictl").display()
    );
    Ok(())
}
