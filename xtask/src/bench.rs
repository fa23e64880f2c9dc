//! `cargo xtask bench [--quick]`: measures what phi-audit costs and what it delivers, side by
//! side with auditd, and writes `BENCHMARKS.md`. Benchmarks report numbers and ratios; they
//! never pass or fail anything.
//!
//! - Host overhead: the same workloads (open/close outside and inside the watched tree, an
//!   exec storm, a connect storm) with no auditing, the empty hooks alone, phi-agent, an empty
//!   syscall tracepoint pair, auditd with equivalent rules and bpftrace with equivalent probes.
//!   Modes alternate within each round (in a rotating order) and ratios are taken against the
//!   unaudited run of the same round; medians over the rounds are reported. A pass of its own
//!   then times the agent's kernel programs per operation (`bench_progtime`).
//! - Completeness under load: PHI opens at increasing rates, produced vs recorded vs counted
//!   as lost, with the agent's CPU and memory.
//! - Collector: ingest and query benchmarks from `phi-bench`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::Value;

use crate::{
    bench_load::Workload,
    bench_progtime,
    cmd::{self, Running, exec, free_port, step},
    setup,
};

#[derive(Args)]
pub struct BenchArgs {
    /// A short run (well under two minutes after the build): fewer rounds and operations,
    /// smaller collector datasets.
    #[arg(long)]
    quick: bool,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Rounds of the host-overhead comparison [default: 3 quick, 7 full].
    #[arg(long)]
    rounds: Option<usize>,
    /// Only the host side (overhead, completeness), not the collector.
    #[arg(long)]
    host_only: bool,
}

/// How the host is audited while a workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    None,
    Compute,
    Floor,
    Agent,
    AgentPaused,
    SyscallPair,
    Auditd,
    Bpftrace,
}

impl Mode {
    const ALL: [Mode; 8] = [
        Mode::None,
        Mode::Compute,
        Mode::Floor,
        Mode::Agent,
        Mode::AgentPaused,
        Mode::SyscallPair,
        Mode::Auditd,
        Mode::Bpftrace,
    ];

    fn label(self) -> &'static str {
        match self {
            Mode::None => "(a) no auditing",
            Mode::Compute => {
                "(a′) no auditing, SHA-256 on the other CPU (no system calls, no shared data)"
            }
            Mode::Floor => "empty hooks alone (the agent's 4 tp_btf hooks, empty programs)",
            Mode::Agent => "(b) phi-agent",
            Mode::AgentPaused => {
                "(b′) phi-agent stopped (SIGSTOP) while each workload runs: its kernel side alone"
            }
            Mode::SyscallPair => "empty syscall tracepoint pair (raw_syscalls enter+exit)",
            Mode::Auditd => "(c) auditd, equivalent rules",
            Mode::Bpftrace => "(d) bpftrace, equivalent probes",
        }
    }
}

struct Paths {
    bin: PathBuf,
    dir: PathBuf,
    /// A private copy of this program, which runs the workloads (a rebuild of xtask while
    /// the benchmarks run must not pull it away).
    worker: PathBuf,
}

impl Paths {
    fn watched(&self) -> PathBuf {
        self.dir.join("watched")
    }

    /// The agent's state directory (its spool is `spool` in it).
    fn agent_state(&self) -> PathBuf {
        self.dir.join("agent-state")
    }
}

/// Host id of the benchmark's agent.
const BENCH_HOST: &str = "bench-host";

/// Arguments that give the agent a collector that is not listening (certificates made once in
/// the benchmark's directory): its spool then keeps every record, which the benchmark counts
/// once the agent has stopped. Without a collector the agent keeps only the newest segment.
fn unreachable_collector(p: &Paths) -> anyhow::Result<Vec<String>> {
    let pki = p.dir.join("pki");
    if !pki.join("ca.pem").exists() {
        exec(
            Command::new(p.bin.join("phictl"))
                .args(["certs", "init", "--host", BENCH_HOST, "--dir"])
                .arg(&pki)
                .stdout(Stdio::null()),
        )
        .context("making certificates for the agent")?;
    }
    // Free now and not listened on later: the agent's connects are refused.
    let port = free_port()?;
    let file = |name: &str| pki.join(name).display().to_string();
    Ok(vec![
        "--collector".into(),
        format!("https://127.0.0.1:{port}"),
        "--tls-ca".into(),
        file("ca.pem"),
        "--tls-cert".into(),
        file(&format!("{BENCH_HOST}.pem")),
        "--tls-key".into(),
        file(&format!("{BENCH_HOST}.key")),
        "--host-id".into(),
        BENCH_HOST.into(),
    ])
}

/// GET a path from 127.0.0.1:port; (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits for a line containing `marker` on the child's stderr (or stdout), then keeps
/// draining that stream in the background.
fn wait_for_line(stream: impl std::io::Read + Send + 'static, marker: &str) -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_owned();
    std::thread::spawn(move || {
        let mut seen = false;
        let mut log = String::new();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if !seen {
                log.push_str(&line);
                log.push('\n');
                if line.contains(&marker) {
                    seen = true;
                    let _ = tx.send(Ok(()));
                }
            }
        }
        if !seen {
            let _ = tx.send(Err(log));
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(log)) => bail!("it ended before it was ready:\n{log}"),
        Err(_) => bail!("not ready within 60 s"),
    }
}

struct AgentHandle {
    guard: Running,
    pid: u32,
    metrics: u16,
}

/// Starts phi-agent watching the benchmark's tree, with a fresh state directory, writing
/// its records as JSON to /dev/null.
fn start_agent(p: &Paths, extra: &[&str]) -> anyhow::Result<AgentHandle> {
    let state = p.agent_state();
    let _ = std::fs::remove_dir_all(&state);
    let port = free_port()?;
    let child = Command::new(p.bin.join("phi-agent"))
        .args(["run", "--stdout", "--log", "warn", "--watch"])
        .arg(p.watched())
        .arg("--state-dir")
        .arg(&state)
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start phi-agent")?;
    let pid = child.id();
    let mut guard = Running::new(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if http_get(port, "/readyz").is_some_and(|(c, _)| c == 200) {
            break;
        }
        if let Ok(Some(status)) = guard.child().try_wait() {
            bail!("phi-agent exited with {status}");
        }
        if Instant::now() > deadline {
            bail!("phi-agent was not ready within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(AgentHandle {
        guard,
        pid,
        metrics: port,
    })
}

fn bpftrace_script(p: &Paths) -> String {
    let prefix = format!("{}/", p.watched().display());
    format!(
        "tracepoint:syscalls:sys_enter_openat {{ @f[tid] = args->filename; }}\n\
         tracepoint:syscalls:sys_exit_openat /@f[tid]/ {{\n\
           if (strncmp(str(@f[tid]), \"{prefix}\", {len}) == 0) {{\n\
             printf(\"open %d %d %s %d\\n\", pid, uid, str(@f[tid]), args->ret);\n\
           }}\n\
           delete(@f[tid]);\n\
         }}\n\
         tracepoint:syscalls:sys_enter_execve {{ printf(\"exec %d %d %s\\n\", pid, uid, str(args->filename)); }}\n\
         tracepoint:syscalls:sys_exit_connect {{ printf(\"connect %d %d %d\\n\", pid, uid, args->ret); }}\n",
        len = prefix.len()
    )
}

fn ensure_tracefs() {
    if !Path::new("/sys/kernel/tracing/events").exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status();
    }
}

/// Starts `cmd` with `stream` piped and waits for `marker` in it.
fn start_until(
    cmd: &mut Command,
    what: &str,
    stream: Stream,
    marker: &str,
) -> anyhow::Result<Running> {
    match stream {
        Stream::Stdout => cmd.stdout(Stdio::piped()).stderr(Stdio::null()),
        Stream::Stderr => cmd.stdout(Stdio::null()).stderr(Stdio::piped()),
    };
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let piped: Box<dyn std::io::Read + Send> = match stream {
        Stream::Stdout => Box::new(child.stdout.take().context("stdout")?),
        Stream::Stderr => Box::new(child.stderr.take().context("stderr")?),
    };
    let guard = Running::new(child);
    wait_for_line(piped, marker).with_context(|| what.to_owned())?;
    Ok(guard)
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

fn start_bpftrace(script: &str) -> anyhow::Result<Running> {
    ensure_tracefs();
    let guard = start_until(
        Command::new("bpftrace").args(["-e", script]),
        "bpftrace (cargo xtask setup installs it)",
        Stream::Stdout,
        "Attaching",
    )?;
    // bpftrace prints "Attaching" before the last probe is in place.
    std::thread::sleep(Duration::from_millis(500));
    Ok(guard)
}

fn auditctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("auditctl")
        .args(args)
        .output()
        .context("cannot run auditctl (cargo xtask setup installs auditd)")?;
    if !out.status.success() {
        bail!(
            "auditctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Keeps the kernel's per-system-call audit bookkeeping off for new processes while it is
/// alive, and removes the audit rules when dropped. Once audit has been enabled on a host
/// (auditd ran once since boot), the kernel gives every new process an audit context, and
/// every system call of that process then takes the slow path that fills and resets it, even
/// after auditd has stopped and audit is disabled: the "no auditing" runs would pay part of
/// auditd's cost, and every ratio to them would look better than on a host where audit never
/// ran. A `never,task` rule leaves new processes without a context; mode (c) replaces it with
/// its own rules and puts it back when it stops.
struct AuditQuiet;

impl AuditQuiet {
    fn new() -> anyhow::Result<Self> {
        quiet_audit().context(
            "cannot keep audit's per-system-call bookkeeping off for the benchmark's \
             processes (is the audit configuration locked, `auditctl -s` showing enabled 2?)",
        )?;
        Ok(Self)
    }
}

impl Drop for AuditQuiet {
    fn drop(&mut self) {
        let _ = auditctl(&["-D"]);
    }
}

/// Deletes every audit rule and adds `never,task`: processes started from now on get no
/// audit context.
fn quiet_audit() -> anyhow::Result<()> {
    auditctl(&["-D"])?;
    auditctl(&["-a", "never,task"])
}

fn start_auditd(p: &Paths) -> anyhow::Result<Running> {
    let child = Command::new("auditd")
        .arg("-n")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start auditd (cargo xtask setup installs it)")?;
    let guard = Running::new(child).on_stop(|| {
        let _ = auditctl(&["-e", "0"]);
        let _ = quiet_audit();
    });
    std::thread::sleep(Duration::from_millis(500));
    let dir = format!("dir={}", p.watched().display());
    auditctl(&["-D"])?;
    auditctl(&["-b", "8192"])?;
    auditctl(&[
        "-a",
        "always,exit",
        "-F",
        "arch=b64",
        "-S",
        "open,openat,openat2,creat",
        "-F",
        &dir,
        "-k",
        "phi-open",
    ])?;
    auditctl(&[
        "-a",
        "always,exit",
        "-F",
        "arch=b64",
        "-S",
        "execve",
        "-k",
        "phi-exec",
    ])?;
    auditctl(&[
        "-a",
        "always,exit",
        "-F",
        "arch=b64",
        "-S",
        "connect",
        "-k",
        "phi-connect",
    ])?;
    auditctl(&["-e", "1"])?;
    Ok(guard)
}

fn start_floor(p: &Paths) -> anyhow::Result<Running> {
    start_until(
        Command::new(p.bin.join("phi-agent")).arg("floor"),
        "phi-agent floor",
        Stream::Stderr,
        "empty programs attached",
    )
}

/// Ring buffer of the stopped agent.
const PAUSED_RING_BYTES: u64 = 256 << 20;

/// SHA-256 on every CPU but the workloads' CPU 0.
fn start_compute(p: &Paths) -> anyhow::Result<Running> {
    start_until(
        Command::new(&p.worker)
            .args(["bench-worker", "--workload", Workload::Compute.arg()])
            .args(["--ops", "0", "--cpu", "0", "--dir"])
            .arg(&p.dir),
        "SHA-256 on the other CPUs",
        Stream::Stdout,
        "computing",
    )
}

fn start_mode(mode: Mode, p: &Paths) -> anyhow::Result<(Running, Option<(u32, u16)>)> {
    Ok(match mode {
        Mode::None => (Running::none(), None),
        Mode::Compute => (start_compute(p)?, None),
        Mode::Floor => (start_floor(p)?, None),
        Mode::Agent => {
            let collector = unreachable_collector(p)?;
            let args: Vec<&str> = collector.iter().map(String::as_str).collect();
            let a = start_agent(p, &args)?;
            (a.guard, Some((a.pid, a.metrics)))
        }
        Mode::AgentPaused => {
            // Room for every record of the longest run while nobody reads them.
            let ring = PAUSED_RING_BYTES.to_string();
            let a = start_agent(p, &["--ring-buffer-bytes", &ring])?;
            (a.guard, Some((a.pid, a.metrics)))
        }
        Mode::SyscallPair => (
            start_bpftrace(
                "tracepoint:raw_syscalls:sys_enter { } tracepoint:raw_syscalls:sys_exit { }",
            )?,
            None,
        ),
        Mode::Auditd => (start_auditd(p)?, None),
        Mode::Bpftrace => (start_bpftrace(&bpftrace_script(p))?, None),
    })
}

/// A process stopped with SIGSTOP until dropped (SIGCONT).
struct Paused(i32);

impl Paused {
    fn new(pid: u32) -> anyhow::Result<Paused> {
        let pid = i32::try_from(pid)?;
        // SAFETY: signalling a child this program started.
        if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
            bail!("cannot stop {pid}: {}", std::io::Error::last_os_error());
        }
        Ok(Paused(pid))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Runs one workload in a fresh worker process pinned to CPU 0.
fn worker(p: &Paths, w: Workload, ops: u64, rate: u64) -> anyhow::Result<Value> {
    worker_with_pid(p, w, ops, rate).map(|(report, _)| report)
}

/// [`worker`], also returning the worker's process id.
fn worker_with_pid(p: &Paths, w: Workload, ops: u64, rate: u64) -> anyhow::Result<(Value, u32)> {
    let child = spawn_worker(p, w, ops, rate, 0)?;
    let pid = child.id();
    let out = child
        .wait_with_output()
        .context("cannot run the workload")?;
    Ok((worker_report(w, &out)?, pid))
}

fn spawn_worker(
    p: &Paths,
    w: Workload,
    ops: u64,
    rate: u64,
    cpu: usize,
) -> anyhow::Result<std::process::Child> {
    Command::new(&p.worker)
        .args([
            "bench-worker",
            "--workload",
            w.arg(),
            "--ops",
            &ops.to_string(),
        ])
        .args([
            "--rate",
            &rate.to_string(),
            "--cpu",
            &cpu.to_string(),
            "--dir",
        ])
        .arg(&p.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot run the workload")
}

fn worker_report(w: Workload, out: &std::process::Output) -> anyhow::Result<Value> {
    if !out.status.success() {
        bail!("the {} workload failed", w.arg());
    }
    serde_json::from_slice(&out.stdout).context("the workload's report")
}

/// `w` unpaced in one process per CPU at once, `ops` each; the reports in CPU order.
fn workers_on_every_cpu(p: &Paths, w: Workload, ops: u64) -> anyhow::Result<Vec<Value>> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let children = (0..cpus)
        .map(|cpu| spawn_worker(p, w, ops, 0, cpu))
        .collect::<anyhow::Result<Vec<_>>>()?;
    children
        .into_iter()
        .map(|c| worker_report(w, &c.wait_with_output().context("cannot run the workload")?))
        .collect()
}

/// The median (NaN for none).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Sizes {
    rounds: usize,
    opens: u64,
    execs: u64,
    connects: u64,
    rates: Vec<u64>,
    rate_seconds: f64,
}

impl Sizes {
    fn ops(&self, w: Workload) -> u64 {
        match w {
            Workload::OpenOutside | Workload::OpenInside | Workload::Pread => self.opens,
            Workload::Exec => self.execs,
            Workload::Connect => self.connects,
            Workload::Compute => 0,
        }
    }
}

/// ns/op per mode, workload and round.
type Overhead = Vec<Vec<Vec<f64>>>;

/// What phi-agent delivered in its overhead runs, over all rounds.
#[derive(Clone, Copy, Default)]
struct Delivery {
    /// Per workload (`Workload::ALL`): operations performed, and the records of the kind it
    /// produces (see [`recorded_kind`]) that the agent sealed for the workload's own process
    /// (for the exec storm, its children), counted in the agent's spool.
    performed: [u64; Workload::ALL.len()],
    recorded: [u64; Workload::ALL.len()],
    /// Events the agent counted as lost, in all workloads.
    lost: u64,
    /// Events the stopped agent (b′) counted as lost: its ring buffer was too small to hold
    /// a workload's records, and its kernel-side cost is understated.
    paused_lost: u64,
}

/// The record kind a workload's operations produce, and whether they are its process's own
/// (`false`: its children's, as the exec storm's).
fn recorded_kind(w: Workload) -> (&'static str, bool) {
    match w {
        Workload::Exec => ("exec", false),
        Workload::Connect => ("connect", true),
        _ => ("open", true),
    }
}

/// Counts, in the spool of the stopped agent, the records of each workload's kind for the
/// workload processes `pids` (in `Workload::ALL` order).
fn spool_counts(p: &Paths, pids: &[u32]) -> anyhow::Result<Vec<u64>> {
    let spool = p.agent_state().join("spool");
    let mut args = vec![
        "spool-count".to_owned(),
        "--spool".to_owned(),
        spool.display().to_string(),
    ];
    for (w, pid) in Workload::ALL.iter().zip(pids) {
        let own = recorded_kind(*w).1;
        args.push(if own { "--pid" } else { "--ppid" }.to_owned());
        args.push(pid.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let counts = phi_bench(p, &args)?;
    if counts["first_seq"].as_u64() != Some(1) {
        bail!(
            "the spool {} does not begin with the chain's first record: it cannot be counted",
            spool.display()
        );
    }
    Ok(Workload::ALL
        .iter()
        .zip(pids)
        .map(|(w, pid)| {
            let (kind, own) = recorded_kind(*w);
            let by = if own { "by_pid" } else { "by_ppid" };
            counts[by][pid.to_string()][kind].as_u64().unwrap_or(0)
        })
        .collect())
}

/// The host-overhead runs: costs, and what phi-agent delivered meanwhile.
struct HostRuns {
    ns: Overhead,
    delivered: Delivery,
    /// The section on time inside the agent's kernel programs (markdown).
    program_time: String,
}

fn host_overhead(p: &Paths, s: &Sizes) -> anyhow::Result<HostRuns> {
    let mut ns = vec![vec![Vec::new(); Workload::ALL.len()]; Mode::ALL.len()];
    let mut delivered = Delivery::default();
    for round in 0..s.rounds {
        step(format!(
            "host overhead: round {} of {}",
            round + 1,
            s.rounds
        ));
        // Rotate the order of the audited modes so that none always follows another.
        let mut order: Vec<usize> = (1..Mode::ALL.len()).collect();
        let n = order.len();
        order.rotate_left(round % n);
        for mi in std::iter::once(0).chain(order) {
            let mode = Mode::ALL[mi];
            let (guard, agent) =
                start_mode(mode, p).with_context(|| format!("starting {}", mode.label()))?;
            let before = match agent {
                Some((_, port)) => Some(settled_counts(port)?),
                None => None,
            };
            let mut pids = Vec::new();
            for (wi, w) in Workload::ALL.iter().enumerate() {
                let paused = match (mode, agent) {
                    (Mode::AgentPaused, Some((pid, _))) => Some(Paused::new(pid)?),
                    _ => None,
                };
                let (r, pid) = worker_with_pid(p, *w, s.ops(*w), 0)?;
                drop(paused);
                pids.push(pid);
                ns[mi][wi].push(r["ns_per_op"].as_f64().unwrap_or(f64::NAN));
            }
            let mut lost = 0;
            if let (Some((_, port)), Some(before)) = (agent, before) {
                let after = settled_counts(port)?;
                lost = (after.lost - before.lost) as u64;
            }
            // Stopped before its spool is read: what it holds then is all it will hold.
            drop(guard);
            match mode {
                Mode::AgentPaused => delivered.paused_lost += lost,
                Mode::Agent => {
                    let recorded = spool_counts(p, &pids)
                        .context("counting the agent's records of each workload")?;
                    for (wi, w) in Workload::ALL.iter().enumerate() {
                        delivered.performed[wi] += s.ops(*w);
                        delivered.recorded[wi] += recorded[wi];
                    }
                    delivered.lost += lost;
                }
                _ => {}
            }
        }
    }
    Ok(HostRuns {
        ns,
        delivered,
        program_time: String::new(),
    })
}

/// Time inside the agent's kernel programs per operation of each workload, with the kernel's
/// run-time accounting on (a pass of its own: see `bench_progtime`); and the time the
/// accounting itself adds to each run, as it times an empty program (the empty hooks) on a
/// workload of unwatched system calls.
fn program_times(p: &Paths, s: &Sizes) -> anyhow::Result<(Vec<bench_progtime::ProgramTime>, f64)> {
    step("time inside the agent's kernel programs (BPF_ENABLE_STATS)");
    let timed = |start: &dyn Fn() -> anyhow::Result<Running>, work: &[Workload]| {
        // The programs of the process started here: the ones not loaded before it.
        let before = bench_progtime::loaded_ids()?;
        let guard = start()?;
        let ours: Vec<u32> = bench_progtime::loaded_ids()?
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect();
        if ours.is_empty() {
            bail!("the probes are attached, yet no BPF program was loaded since they started");
        }
        let stats = bench_progtime::StatsOn::new()?;
        let mut times = Vec::new();
        for w in work {
            let ops = s.ops(*w);
            times.push(bench_progtime::measure(*w, &ours, ops, 3, || {
                worker(p, *w, ops, 0).map(drop)
            })?);
        }
        drop(stats);
        drop(guard);
        anyhow::Ok(times)
    };
    let empty = timed(&|| start_floor(p), &[Workload::Pread])?;
    let per_run = empty
        .first()
        .filter(|t| t.runs_per_op > 0.0)
        .map_or(0.0, |t| t.ns_per_op / t.runs_per_op);
    let times = timed(&|| start_agent(p, &[]).map(|a| a.guard), &Workload::ALL)?;
    Ok((times, per_run))
}

/// What (b) adds per operation over (a), per workload: the difference of the medians.
fn added_by_agent(ns: &Overhead) -> Vec<(Workload, f64)> {
    let at = |m: Mode| Mode::ALL.iter().position(|x| *x == m).unwrap_or(0);
    Workload::ALL
        .iter()
        .enumerate()
        .map(|(wi, w)| {
            (
                *w,
                median(ns[at(Mode::Agent)][wi].clone()) - median(ns[at(Mode::None)][wi].clone()),
            )
        })
        .collect()
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

struct LoadRow {
    /// Operations per second each worker is paced at (0: unpaced).
    target: u64,
    /// Workload processes at once, one per CPU.
    workers: usize,
    achieved: f64,
    produced: u64,
    recorded: u64,
    lost: u64,
    /// Gap records the agent sealed meanwhile (each accounts for some of `lost`).
    gaps: u64,
    drain_seconds: f64,
    /// From the workload's start to the last record sealed.
    seconds: f64,
    cpu_per_10k: f64,
    rss_kib: u64,
}

/// What the agent's metrics say it has done so far.
#[derive(Clone, Copy, Debug, PartialEq)]
struct AgentCounts {
    /// Open records sealed.
    opens: f64,
    /// Events counted as lost (truncated and depth-exceeded events are still delivered).
    lost: f64,
    /// Gap records sealed.
    gaps: f64,
}

fn agent_counts(port: u16) -> anyhow::Result<AgentCounts> {
    let (_, page) = http_get(port, "/metrics").context("agent metrics")?;
    let records = |kind: &str| {
        metric_sum(
            &page,
            &format!("phi_agent_records_total{{kind=\"{kind}\"}}"),
        )
    };
    Ok(AgentCounts {
        opens: records("open"),
        lost: [
            "ring_buffer_full",
            "read_failure",
            "program_busy",
            "decode_error",
            "spool_full",
        ]
        .iter()
        .map(|r| {
            metric_sum(
                &page,
                &format!("phi_agent_events_lost_total{{reason=\"{r}\"}}"),
            )
        })
        .sum(),
        gaps: records("gap"),
    })
}

/// [`agent_counts`] once they have stopped changing (the agent has drained its ring buffer
/// and reported its losses; it publishes its metrics once a second), waiting at most 6 s.
fn settled_counts(port: u16) -> anyhow::Result<AgentCounts> {
    let mut last = agent_counts(port)?;
    let started = Instant::now();
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_millis(1300)
        && started.elapsed() < Duration::from_secs(6)
    {
        std::thread::sleep(Duration::from_millis(100));
        let now = agent_counts(port)?;
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    Ok(last)
}

fn completeness(p: &Paths, s: &Sizes) -> anyhow::Result<(Vec<LoadRow>, u64)> {
    step("completeness under load: PHI opens at increasing rates through phi-agent");
    let agent = start_agent(p, &[])?;
    let (pid, port) = (agent.pid, agent.metrics);
    std::thread::sleep(Duration::from_secs(2));
    let idle_rss = vm_rss_kib(pid);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Paced rates and one unpaced worker, then (above what one worker can produce) one
    // unpaced worker on every CPU, which also takes the agent's CPU from it.
    let mut runs: Vec<(u64, usize)> = s.rates.iter().map(|&r| (r, 1)).collect();
    if cpus > 1 {
        runs.push((0, cpus));
    }
    let mut rows = Vec::new();
    for (rate, workers) in runs {
        let ops = if rate == 0 {
            (s.rate_seconds * 150_000.0) as u64
        } else {
            (s.rate_seconds * rate as f64) as u64
        };
        let produced = ops * workers as u64;
        let before = agent_counts(port)?;
        let cpu0 = cpu_seconds(pid);
        let started = Instant::now();
        let reports = if workers == 1 {
            vec![worker(p, Workload::OpenInside, ops, rate)?]
        } else {
            workers_on_every_cpu(p, Workload::OpenInside, ops)?
        };
        let ran = started.elapsed();
        // Wait until the agent has handled everything it will handle.
        let mut last = before;
        let mut stable_since = Instant::now();
        let mut rss = vm_rss_kib(pid);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            rss = rss.max(vm_rss_kib(pid));
            let now = agent_counts(port)?;
            if now != last {
                last = now;
                stable_since = Instant::now();
            }
            let done = now.opens - before.opens + now.lost - before.lost >= produced as f64;
            if (done && stable_since.elapsed() > Duration::from_millis(300))
                || stable_since.elapsed() > Duration::from_secs(3)
            {
                break;
            }
        }
        // The last change seen (polled every 100 ms), not the end of the quiet wait.
        let drained = stable_since.duration_since(started);
        let recorded = (last.opens - before.opens) as u64;
        let cpu = cpu_seconds(pid) - cpu0;
        rows.push(LoadRow {
            target: rate,
            workers,
            achieved: reports
                .iter()
                .map(|w| w["rate"].as_f64().unwrap_or(0.0))
                .sum(),
            produced,
            recorded,
            lost: (last.lost - before.lost) as u64,
            gaps: (last.gaps - before.gaps) as u64,
            drain_seconds: (drained.saturating_sub(ran)).as_secs_f64(),
            seconds: drained.as_secs_f64(),
            cpu_per_10k: if recorded > 0 {
                cpu * 10_000.0 / recorded as f64
            } else {
                f64::NAN
            },
            rss_kib: rss,
        });
    }
    drop(agent);
    Ok((rows, idle_rss))
}

/// Runs `phi-bench` (the collector benchmarks); each call prints one JSON object.
fn phi_bench(p: &Paths, args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new(p.bin.join("phi-bench"))
        .args(args)
        .env("PHI_COLLECTOR_BIN", p.bin.join("phi-collector"))
        .env("PHICTL_BIN", p.bin.join("phictl"))
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run phi-bench")?;
    if !out.status.success() {
        bail!("phi-bench {} failed", args.join(" "));
    }
    serde_json::from_slice(&out.stdout).context("phi-bench's report")
}

fn machine() -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1_048_576.0))
        .unwrap_or_default();
    vec![
        (
            "kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().to_owned(),
        ),
        (
            "CPU".into(),
            format!(
                "{cpu}, {} online",
                std::thread::available_parallelism().map_or(0, |n| n.get())
            ),
        ),
        ("memory".into(), mem),
        (
            "rustc".into(),
            cmd::output(Command::new("rustc").arg("-V"))
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
    ]
}

fn fmt_ns(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} µs", v / 1000.0)
    } else {
        format!("{v:.0} ns")
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run()?;
    if !cmd::is_root() {
        bail!("the benchmarks load kernel probes and start auditd: run them as root");
    }
    step("build: release binaries (agent, collector, phi-bench)");
    let mut build = cmd::cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "phi-agent",
        "-p",
        "phi-collector",
    ]);
    // phi-bench also counts the agent's records in the host benchmarks (in its spool).
    build.args(["-p", "phi-bench"]);
    exec(&mut build)?;
    let root = cmd::workspace_root();
    let dir = tempfile_dir()?;
    let worker = dir.join("xtask-worker");
    std::fs::copy(std::env::current_exe().context("own path")?, &worker)
        .context("cannot copy the workload runner")?;
    let p = Paths {
        bin: root.join("target/release"),
        dir: dir.clone(),
        worker,
    };
    for sub in ["watched", "outside"] {
        std::fs::create_dir_all(p.dir.join(sub))?;
        std::fs::write(
            p.dir.join(sub).join("record.json"),
            "{\"synthetic\":true}\n",
        )?;
    }
    let sizes = if args.quick {
        Sizes {
            rounds: args.rounds.unwrap_or(3),
            opens: 100_000,
            execs: 400,
            connects: 5_000,
            rates: vec![10_000, 25_000, 50_000, 0],
            rate_seconds: 1.0,
        }
    } else {
        Sizes {
            rounds: args.rounds.unwrap_or(7),
            opens: 500_000,
            execs: 1_000,
            connects: 20_000,
            rates: vec![10_000, 25_000, 50_000, 75_000, 100_000, 0],
            rate_seconds: 4.0,
        }
    };
    let host_started = Instant::now();
    let quiet = AuditQuiet::new()?;
    let mut overhead = host_overhead(&p, &sizes)?;
    overhead.program_time = match program_times(&p, &sizes) {
        Ok((times, per_run)) => {
            bench_progtime::render(&times, per_run, &added_by_agent(&overhead.ns))
        }
        Err(e) => format!("\n### Time inside the agent's kernel programs\n\nNot measured: {e:#}\n"),
    };
    let (load, idle_rss) = completeness(&p, &sizes)?;
    drop(quiet);
    let host_seconds = host_started.elapsed().as_secs_f64();

    // Booting guests under instruction counting takes about a minute even for one round,
    // more than the quick run's whole budget.
    let sensor_cost = if args.quick {
        "Not measured in a quick run (it boots guest kernels under instruction counting, about \
         a minute even for one round): see the full `cargo xtask bench`, or run \
         `cargo xtask kernel-matrix --sensor-cost`.\n"
            .to_owned()
    } else {
        step("sensor cost in a guest kernel that allows fexit (qemu)");
        crate::sensor_cost::measure(&p.bin.join("phi-agent"), 3, 20_000)
            .map(|r| r.markdown())
            .unwrap_or_else(|e| format!("Not measured: {e:#}\n"))
    };

    let mut collector = Vec::new();
    if !args.host_only {
        collector = collector_benchmarks(&p, &root, args.quick)?;
    }

    let report = render(
        args,
        &sizes,
        &overhead,
        &load,
        idle_rss,
        &Guest {
            sensor_cost,
            host_seconds,
        },
        &collector,
    );
    std::fs::write(root.join(&args.out), report)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    step(format!(
        "wrote {} in {:.0} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("phi-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(std::fs::canonicalize(&dir)?)
}

/// One collector benchmark: its kind ("ingest", "query"), a label, and `phi-bench`'s report
/// (or why it could not run).
type CollectorRun = (&'static str, String, Result<Value, String>);

/// Ingest into SQLite and PostgreSQL (in-process store calls and a real collector over
/// gRPC/mTLS), then timeline queries among 1 and 10 million records (SQLite).
fn collector_benchmarks(p: &Paths, root: &Path, quick: bool) -> anyhow::Result<Vec<CollectorRun>> {
    let (records, queries): (&str, &[&str]) = if quick {
        ("100000", &["200000"])
    } else {
        ("1000000", &["1000000", "10000000"])
    };
    let db_dir = p.dir.join("collector");
    std::fs::create_dir_all(&db_dir)?;
    let mut out = Vec::new();
    // Four hosts streaming at once, and (SQLite, wire) one host alone: how fast a single
    // agent's backlog drains.
    let runs: [(&str, &str, &str, Option<&str>); 5] = [
        ("sqlite", "SQLite", "store", None),
        ("sqlite", "SQLite", "wire", None),
        ("sqlite", "SQLite", "wire", Some("1")),
        ("postgres", "PostgreSQL", "store", None),
        ("postgres", "PostgreSQL", "wire", None),
    ];
    for (backend, label, mode, hosts) in runs {
        let one = if hosts.is_some() { ", one stream" } else { "" };
        step(format!("collector ingest into {label} ({mode}{one})"));
        let db = if backend == "sqlite" {
            let name = format!("ingest-{mode}{}.db", hosts.map_or("", |_| "-1"));
            format!("sqlite:{}", db_dir.join(name).display())
        } else {
            // A throwaway local cluster per run (started by phi-bench; needs the Debian
            // package `postgresql`, installed when missing).
            "postgres:temp".to_owned()
        };
        let mut a = vec!["ingest", "--db", &db, "--records", records, "--mode", mode];
        if let Some(h) = hosts {
            a.extend(["--hosts", h]);
        }
        if quick {
            a.extend(["--repeat", "1"]);
        }
        // PostgreSQL may be impossible here (no package source): the report says so and the
        // other measurements stand.
        let r = phi_bench(p, &a).map_err(|e| format!("{e:#}"));
        if backend == "sqlite"
            && let Err(e) = &r
        {
            bail!("{e}");
        }
        out.push(("ingest", format!("{label}, {mode}"), r));
    }
    // The query datasets are kept between runs (they take a while to load).
    let keep = root.join("target/bench-data");
    std::fs::create_dir_all(&keep)?;
    for query in queries {
        step(format!("collector queries among {query} records (SQLite)"));
        let db = format!(
            "sqlite:{}",
            keep.join(format!("query-{query}.db")).display()
        );
        let r = phi_bench(p, &["query", "--db", &db, "--records", query])?;
        out.push(("query", format!("SQLite, {query} records"), Ok(r)));
    }
    Ok(out)
}

/// The sensor-cost section (measured in a guest) and how long the host measurements took.
struct Guest {
    sensor_cost: String,
    host_seconds: f64,
}

fn render(
    args: &BenchArgs,
    s: &Sizes,
    host: &HostRuns,
    load: &[LoadRow],
    idle_rss: u64,
    guest: &Guest,
    collector: &[CollectorRun],
) -> String {
    let Guest {
        sensor_cost,
        host_seconds,
    } = guest;
    let HostRuns {
        ns,
        delivered,
        program_time,
    } = host;
    let mut o = String::new();
    let w = |o: &mut String, line: &str| {
        o.push_str(line);
        o.push('\n');
    };
    w(&mut o, "# Benchmarks\n");
    w(
        &mut o,
        &format!(
            "Written by `cargo xtask bench{}` (as root) on {} UTC. Reproduce with the same \
             command; numbers on a shared virtual machine are noisy, so every figure below is a \
             median over repeated runs and every ratio compares runs of the same round.\n",
            if args.quick { " --quick" } else { "" },
            chrono_now()
        ),
    );
    w(&mut o, "| machine | |\n| --- | --- |");
    for (k, v) in machine() {
        w(&mut o, &format!("| {k} | {v} |"));
    }
    w(&mut o, "");

    w(&mut o, "## Host overhead\n");
    w(
        &mut o,
        &format!(
            "Each workload runs in a fresh process pinned to CPU 0 ({} open/close pairs, {} \
             execs, {} connects per run; each connect is closed with a reset, so no TIME_WAIT \
             entries pile up between runs), {} rounds; in each round every mode runs once, the \
             audited modes in a rotating order. Cost per operation is the median over rounds; \
             the ratio is the median of each round's ratio to (a). phi-agent runs with its \
             default settings, writing every record to its spool and as JSON to /dev/null; \
             its collector is configured but not listening, so the spool keeps every record \
             and each workload's are counted there once the agent has stopped. \
             auditd: `-a always,exit -S open,openat,openat2,creat -F dir=<watched>`, `-S \
             execve`, `-S connect` (arch b64), backlog 8192. bpftrace: the same three probes \
             printing to /dev/null. Outside mode (c) an audit rule `-a never,task` is in \
             place, so that no workload process carries an audit context: once auditd has run \
             on a host, the kernel otherwise gives every new process one until reboot, and \
             every system call then pays audit's bookkeeping even with auditd stopped (the \
             bench deletes its audit rules when it ends). Two control rows locate the agent's \
             cost: (a′) runs SHA-256 in a loop on every other CPU and audits nothing; (b′) is \
             phi-agent stopped with SIGSTOP for the length of each workload, so only its kernel \
             side runs.\n",
            s.opens, s.execs, s.connects, s.rounds
        ),
    );
    let mut header = "| mode |".to_owned();
    let mut rule = "| --- |".to_owned();
    for wl in Workload::ALL {
        header.push_str(&format!(" {} |", wl.name()));
        rule.push_str(" ---: |");
    }
    w(&mut o, &header);
    w(&mut o, &rule);
    for (mi, mode) in Mode::ALL.iter().enumerate() {
        let mut line = format!("| {} |", mode.label());
        for (runs, base) in ns[mi].iter().zip(&ns[0]) {
            let cost = median(runs.clone());
            if mi == 0 {
                line.push_str(&format!(" {} |", fmt_ns(cost)));
            } else {
                let ratios: Vec<f64> = runs.iter().zip(base).map(|(m, b)| m / b).collect();
                line.push_str(&format!(" {} ({:.2}×) |", fmt_ns(cost), median(ratios)));
            }
        }
        w(&mut o, &line);
    }
    w(&mut o, &delivery_summary(delivered));
    w(&mut o, &inside_breakdown(ns, delivered.paused_lost));
    w(&mut o, program_time);
    w(
        &mut o,
        "\nTargets: outside the watched tree ≤ 1.10× of (a); inside it ≤ 1.25× with every event \
         delivered; exec and connect storms ≤ 1.10×. The empty-hooks row is the floor any \
         tracing design on these hooks pays.\n",
    );

    w(&mut o, "## Completeness under load\n");
    w(
        &mut o,
        &format!(
            "Opens of a file inside the watched tree at a paced rate for {:.0} s (\"max\": \
             unpaced, one process on CPU 0; \"max on all CPUs\": one unpaced process on every \
             CPU at once, which produces more than the agent can take, the more so as the \
             workload then also takes the agent's CPU), through one running phi-agent. \
             Produced: opens performed. Recorded: open records the agent sealed. Lost: events \
             the agent counted as lost. Gap records: records the agent sealed into its chain \
             saying how many events were lost and why (one per reason, each second losses \
             occur). Drain: how long after the workload the last record was sealed. Agent \
             resident memory at idle: {:.1} MiB.\n",
            s.rate_seconds,
            idle_rss as f64 / 1024.0
        ),
    );
    w(
        &mut o,
        "| target rate /s | achieved /s | produced | recorded | lost | gap records | unaccounted | drain | agent CPU per 10,000 records | agent RSS (max) |",
    );
    w(
        &mut o,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    );
    let mut best_zero_loss = 0.0f64;
    for r in load {
        let unaccounted = r.produced as i64 - r.recorded as i64 - r.lost as i64;
        if r.lost == 0 && unaccounted == 0 {
            best_zero_loss = best_zero_loss.max(r.achieved);
        }
        w(
            &mut o,
            &format!(
                "| {} | {:.0} | {} | {} | {} | {} | {} | {:.2} s | {:.0} ms | {:.1} MiB |",
                match (r.target, r.workers) {
                    (0, 1) => "max".to_owned(),
                    (0, n) => format!("max on all {n} CPUs"),
                    (rate, _) => rate.to_string(),
                },
                r.achieved,
                r.produced,
                r.recorded,
                r.lost,
                r.gaps,
                unaccounted,
                r.drain_seconds,
                r.cpu_per_10k * 1000.0,
                r.rss_kib as f64 / 1024.0
            ),
        );
    }
    w(
        &mut o,
        &format!(
            "\nHighest rate measured with nothing lost: **{best_zero_loss:.0} opens/s** (target \
             ≥ 50,000/s on this machine). Above it, losses are counted and written as gap \
             records, never silent: \"unaccounted\" (produced minus recorded minus lost) must never be \
             positive; it can be slightly negative because the loss counters also count other \
             processes' events lost while the ring buffer was full. Agent memory target ≤ 64 MiB.\n"
        ),
    );
    w(&mut o, &overload_summary(load));
    w(&mut o, &pipeline_summary(load));

    w(&mut o, "## Sensor cost where the kernel allows fexit\n");
    w(&mut o, sensor_cost);
    w(
        &mut o,
        "The guest runs under qemu's instruction counting (`-icount shift=0`, one vCPU): its \
         clock advances one nanosecond per guest instruction, so the figures count \
         instructions the whole guest executed per operation, agent included, and do not \
         depend on the load of the machine running qemu. With tracepoints every system call \
         pays the `sys_exit` hook (the pread row); with fexit only the functions of the calls \
         the agent records do.\n",
    );

    if !collector.is_empty() {
        w(&mut o, "## Collector\n");
        w(&mut o, &collector_summary(collector));
        w(
            &mut o,
            "Measured by `phi-bench` (see `bench/`); raw results:\n",
        );
        for (kind, label, v) in collector {
            w(&mut o, &format!("### {kind}: {label}\n"));
            match v {
                Ok(v) => {
                    w(&mut o, "```json");
                    w(&mut o, &serde_json::to_string_pretty(v).unwrap_or_default());
                    w(&mut o, "```\n");
                }
                Err(e) => w(&mut o, &format!("Not measured: {e}\n")),
            }
        }
    }
    w(
        &mut o,
        &format!("Host measurements took {host_seconds:.0} s.\n"),
    );
    o
}

/// Where the agent's cost on the inside workload comes from, by the control rows: its kernel
/// side alone (b′) and the price of any busy other CPU (a′), round by round.
fn inside_breakdown(ns: &[Vec<Vec<f64>>], paused_lost: u64) -> String {
    let at = |m: Mode| Mode::ALL.iter().position(|x| *x == m).unwrap_or(0);
    let Some(inside) = Workload::ALL
        .iter()
        .position(|w| *w == Workload::OpenInside)
    else {
        return String::new();
    };
    let ratio = |a: Mode| {
        median(
            ns[at(a)][inside]
                .iter()
                .zip(&ns[at(Mode::None)][inside])
                .map(|(x, y)| x / y)
                .collect(),
        )
    };
    let (compute, kernel, agent) = (
        ratio(Mode::Compute),
        ratio(Mode::AgentPaused),
        ratio(Mode::Agent),
    );
    if ![compute, kernel, agent].iter().all(|r| r.is_finite()) {
        return String::new();
    }
    let other_cpu = if agent - kernel < 0.02 {
        format!(
            "So the kernel side is all of it: the agent's own work on the other CPU adds \
             nothing measurable (SHA-256 there alone (a′): {compute:.2}×)."
        )
    } else if compute >= 1.02 {
        format!(
            "The rest is the agent working on the other CPU, which slows CPU 0 on this machine \
             even when it shares nothing with the workload: SHA-256 there (a′), the agent's \
             heaviest step per record, costs {compute:.2}× (the two virtual CPUs evidently \
             share one core's execution units, as hyperthreads do)."
        )
    } else {
        format!(
            "The rest is the agent's work on the other CPU reaching CPU 0 through what they \
             share (caches, memory, kernel state): SHA-256 there alone (a′) costs {compute:.2}×."
        )
    };
    let overflowed = if paused_lost > 0 {
        format!(
            " **The stopped agent's ring buffer overflowed ({paused_lost} events lost), so (b′) \
             understates the kernel side.**"
        )
    } else {
        String::new()
    };
    format!(
        "\nInside the watched tree, phi-agent costs {agent:.2}×; with its process stopped while \
         the workload runs (b′; the records wait in a {} MiB ring buffer and are taken when it \
         resumes), {kernel:.2}×: the kernel programs, the hooks and the ring buffer.{overflowed} \
         {other_cpu}\n",
        PAUSED_RING_BYTES >> 20
    )
}

/// What phi-agent recorded of each workload during the (b) runs.
fn delivery_summary(d: &Delivery) -> String {
    let parts: Vec<String> = Workload::ALL
        .iter()
        .enumerate()
        .map(|(wi, w)| {
            let (kind, _) = recorded_kind(*w);
            let (performed, recorded) = (d.performed[wi], d.recorded[wi]);
            let verdict = match w {
                // Not watched: nothing should be recorded.
                Workload::OpenOutside if recorded == 0 => " (not watched: none, as it should be)",
                Workload::OpenOutside => " (**recorded although not watched**)",
                _ if recorded == performed => "",
                _ if recorded < performed => " (**records missing**)",
                _ => " (more records than operations: a count is wrong)",
            };
            format!(
                "{}: {recorded} {kind} records for {performed} operations{verdict}",
                w.name()
            )
        })
        .collect();
    format!(
        "\nDelivery during the (b) runs, all rounds, counted in the agent's spool by the \
         workload's own process (the exec storm's by its children): {}; {} events counted as \
         lost in all workloads.",
        parts.join("; "),
        d.lost
    )
}

/// What the run above the agent's capacity showed: losses counted and written, or silence.
fn overload_summary(load: &[LoadRow]) -> String {
    let Some(r) = load.iter().find(|r| r.workers > 1) else {
        return String::new();
    };
    let unaccounted = r.produced as i64 - r.recorded as i64 - r.lost as i64;
    let verdict = if unaccounted > 0 {
        format!("**{unaccounted} opens are unaccounted for: events were lost silently.**")
    } else if r.lost > 0 && r.gaps == 0 {
        "**Losses were counted but no gap record was sealed.**".to_owned()
    } else if r.lost == 0 {
        "Nothing was lost even then.".to_owned()
    } else {
        "Every open is either recorded or counted as lost in the chain.".to_owned()
    };
    format!(
        "Above the agent's capacity (one unpaced worker on each of the {} CPUs, {:.0} opens/s \
         in all): {} of {} opens recorded, {} events counted as lost and reported in {} gap \
         record{}. {verdict}\n",
        r.workers,
        r.achieved,
        r.recorded,
        r.produced,
        r.lost,
        r.gaps,
        if r.gaps == 1 { "" } else { "s" }
    )
}

/// The agent's pipeline throughput, from the completeness runs: how many records it carried
/// per second while saturated (the unpaced run: more events than it can take, the rest
/// counted as lost), and per second of its own CPU time at every rate.
fn pipeline_summary(load: &[LoadRow]) -> String {
    let per_cpu: Vec<f64> = load
        .iter()
        .filter(|r| r.cpu_per_10k > 0.0 && r.recorded > 0)
        .map(|r| 10_000.0 / r.cpu_per_10k)
        .collect();
    let Some(saturated) = load
        .iter()
        .find(|r| r.target == 0 && r.workers == 1 && r.seconds > 0.0)
        .map(|r| r.recorded as f64 / r.seconds)
    else {
        return String::new();
    };
    let lo = per_cpu.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = per_cpu.iter().copied().fold(0.0, f64::max);
    format!(
        "Agent pipeline throughput (ring buffer read, decode, process table and identity, \
         redaction, hash chain, spool and JSON output, all in the agent's one event thread): \
         **{saturated:.0} records/s** while saturated (the unpaced run: records sealed over the \
         time from the workload's start to the last record), and {lo:.0}-{hi:.0} records per \
         second of the agent's CPU time across the rates above (10,000 over the CPU per \
         10,000 records).\n"
    )
}

/// The collector's numbers in two tables (ingest rate; query latency), from `phi-bench`'s
/// reports.
fn collector_summary(runs: &[CollectorRun]) -> String {
    let num = |v: &Value, path: &[&str]| -> Option<f64> {
        path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
    };
    // A whole number from a report, or "?" when it lacks it.
    let whole = |v: &Value, path: &[&str]| num(v, path).map_or("?".into(), |x| format!("{x:.0}"));
    let mut o = String::new();
    o.push_str(
        "Ingest: records verified (hash links, checkpoint signatures) and durably stored per \
         second, median over repeats on a fresh store each (min-max in brackets). `store`: \
         the store's append called in this process, batch after batch (one stream); `wire`: \
         a real `phi-collector` over gRPC with mutual TLS, one stream per host, all at once. \
         Target: at least 100,000 records/s into SQLite.\n\n\
         | store | mode | records | hosts (streams) | records/s | store bytes per record |\n\
         | --- | --- | ---: | ---: | ---: | ---: |\n",
    );
    for (_, label, r) in runs.iter().filter(|r| r.0 == "ingest") {
        let (store, mode) = label.split_once(", ").unwrap_or((label, ""));
        match r {
            Ok(v) => {
                let rate = |k: &str| whole(v, &["results", "records_per_second", k]);
                o.push_str(&format!(
                    "| {store} | {mode} | {} | {} ({}) | {} [{}-{}] | {} |\n",
                    whole(v, &["parameters", "records"]),
                    whole(v, &["parameters", "hosts"]),
                    whole(v, &["parameters", "streams"]),
                    rate("median"),
                    rate("min"),
                    rate("max"),
                    whole(v, &["results", "store_bytes_per_record", "value"]),
                ));
            }
            Err(_) => o.push_str(&format!(
                "| {store} | {mode} | not measured (see below) | | | |\n"
            )),
        }
    }
    o.push_str(
        "\nQueries: latency of the compliance queries for one host and one day, as `phictl` \
         asks them (the whole day, page by page with the API's cursor, every row decoded), \
         over host/day pairs drawn from the whole store; p50 / p99 in milliseconds.\n\n\
         | store | records in store | timeline | timeline, one user | timeline, path prefix | sessions |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (_, label, r) in runs.iter().filter(|r| r.0 == "query") {
        let Ok(v) = r else { continue };
        let lat = |q: &str| match (
            num(v, &["results", q, "latency", "p50"]),
            num(v, &["results", q, "latency", "p99"]),
        ) {
            (Some(a), Some(b)) => format!("{a:.1} / {b:.1}"),
            _ => "?".into(),
        };
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            label.split_once(", ").map_or(label.as_str(), |x| x.0),
            whole(v, &["dataset", "records"]),
            lat("timeline_host_day"),
            lat("timeline_host_day_user"),
            lat("timeline_host_day_path_prefix"),
            lat("sessions_host_day"),
        ));
    }
    o.push('\n');
    o
}

fn chrono_now() -> String {
    cmd::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M"]))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_throughput_comes_from_the_unpaced_run_and_the_cpu_per_record() {
        let row = |target, recorded, seconds, cpu_per_10k| LoadRow {
            target,
            workers: 1,
            achieved: 0.0,
            produced: recorded,
            recorded,
            lost: 0,
            gaps: 0,
            drain_seconds: 1.0,
            seconds,
            cpu_per_10k,
            rss_kib: 0,
        };
        let overload = LoadRow {
            workers: 2,
            ..row(0, 100_000, 1.0, 0.1)
        };
        let load = [
            row(10_000, 40_000, 5.0, 0.2),
            row(0, 300_000, 5.0, 0.125),
            overload,
        ];
        let t = pipeline_summary(&load);
        assert!(t.contains("**60000 records/s** while saturated"), "{t}");
        assert!(
            t.contains("50000-100000 records per second of the agent's CPU"),
            "{t}"
        );
        assert_eq!(pipeline_summary(&load[..1]), "", "no unpaced run, no claim");
    }

    #[test]
    fn the_delivery_line_names_each_workload_and_flags_what_does_not_add_up() {
        let mut d = Delivery {
            performed: [1000, 1000, 10, 200],
            recorded: [0, 1000, 10, 200],
            lost: 0,
            paused_lost: 0,
        };
        let t = delivery_summary(&d);
        assert!(
            t.contains(
                "open/close outside the watched tree: 0 open records for 1000 operations (not \
                 watched: none, as it should be)"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "open/close inside the watched tree: 1000 open records for 1000 operations;"
            ),
            "{t}"
        );
        assert!(t.contains("10 exec records for 10 operations;"), "{t}");
        assert!(t.contains("200 connect records for 200 operations;"), "{t}");
        assert!(!t.contains("**"), "{t}");
        d.recorded = [3, 999, 10, 201];
        let t = delivery_summary(&d);
        assert!(t.contains("**recorded although not watched**"), "{t}");
        assert!(
            t.contains("999 open records for 1000 operations (**records missing**)"),
            "{t}"
        );
        assert!(t.contains("a count is wrong"), "{t}");
    }

    #[test]
    fn the_inside_breakdown_compares_each_control_with_no_auditing_round_by_round() {
        let inside = Workload::ALL
            .iter()
            .position(|w| *w == Workload::OpenInside)
            .expect("an inside workload");
        let rows = |compute: f64| {
            let mut ns = vec![vec![vec![1.0; 2]; Workload::ALL.len()]; Mode::ALL.len()];
            let mut set = |m: Mode, v: [f64; 2]| {
                let mi = Mode::ALL.iter().position(|x| *x == m).expect("a mode");
                ns[mi][inside] = v.to_vec();
            };
            set(Mode::None, [1000.0, 2000.0]);
            set(Mode::Compute, [1000.0 * compute, 2000.0 * compute]);
            set(Mode::AgentPaused, [1200.0, 2500.0]);
            set(Mode::Agent, [1400.0, 2800.0]);
            ns
        };
        let t = inside_breakdown(&rows(1.1), 0);
        assert!(t.contains("phi-agent costs 1.40×"), "{t}");
        assert!(t.contains("(b′; the records wait in a 256 MiB"), "{t}");
        assert!(t.contains("1.23×: the kernel programs"), "{t}");
        assert!(
            t.contains("costs 1.10× (the two virtual CPUs evidently share"),
            "{t}"
        );
        let t = inside_breakdown(&rows(1.0), 0);
        assert!(t.contains("SHA-256 there alone (a′) costs 1.00×."), "{t}");
        assert!(!t.contains("hyperthreads"), "{t}");
        // The agent stopped costs as much as the agent running: nothing is the other CPU's.
        let mut ns = rows(1.0);
        let paused = Mode::ALL
            .iter()
            .position(|x| *x == Mode::AgentPaused)
            .expect("a mode");
        ns[paused][inside] = vec![1400.0, 2800.0];
        let t = inside_breakdown(&ns, 0);
        assert!(t.contains("1.40×: the kernel programs"), "{t}");
        assert!(t.contains("So the kernel side is all of it"), "{t}");
        assert!(!t.contains("overflowed"), "{t}");
        let t = inside_breakdown(&ns, 12);
        assert!(t.contains("overflowed (12 events lost)"), "{t}");
    }

    #[test]
    fn the_overload_run_is_judged_by_what_it_accounts_for() {
        let run = |produced, recorded, lost, gaps| LoadRow {
            target: 0,
            workers: 2,
            achieved: 600_000.0,
            produced,
            recorded,
            lost,
            gaps,
            drain_seconds: 0.2,
            seconds: 1.0,
            cpu_per_10k: 0.02,
            rss_kib: 0,
        };
        let t = overload_summary(&[run(300_000, 160_000, 140_000, 2)]);
        assert!(
            t.contains("160000 of 300000 opens recorded, 140000 events counted as lost and reported in 2 gap records."),
            "{t}"
        );
        assert!(
            t.contains("Every open is either recorded or counted as lost"),
            "{t}"
        );
        let t = overload_summary(&[run(300_000, 160_000, 139_000, 1)]);
        assert!(t.contains("in 1 gap record."), "{t}");
        assert!(t.contains("**1000 opens are unaccounted for"), "{t}");
        let t = overload_summary(&[run(300_000, 160_000, 140_000, 0)]);
        assert!(t.contains("no gap record was sealed"), "{t}");
        let t = overload_summary(&[run(300_000, 300_000, 0, 0)]);
        assert!(t.contains("Nothing was lost even then."), "{t}");
        assert_eq!(overload_summary(&[]), "", "no overload run, no claim");
    }

    #[test]
    fn collector_summary_tabulates_reports_and_names_what_was_not_measured() {
        let ingest = serde_json::json!({
            "parameters": {"records": 1000000, "hosts": 4, "streams": 4},
            "results": {
                "records_per_second": {"median": 21034.6, "min": 20010.2, "max": 22500.9},
                "store_bytes_per_record": {"value": 1200.4}
            }
        });
        let query = serde_json::json!({
            "dataset": {"records": 10000000},
            "results": {
                "timeline_host_day": {"latency": {"p50": 232.86, "p99": 340.91}},
                "timeline_host_day_user": {"latency": {"p50": 44.46, "p99": 60.0}},
                "timeline_host_day_path_prefix": {"latency": {"p50": 52.4, "p99": 70.1}},
                "sessions_host_day": {"latency": {"p50": 1.38, "p99": 13.9}}
            }
        });
        let runs: Vec<CollectorRun> = vec![
            ("ingest", "SQLite, wire".into(), Ok(ingest)),
            (
                "ingest",
                "PostgreSQL, store".into(),
                Err("cannot start PostgreSQL".into()),
            ),
            ("query", "SQLite, 10000000 records".into(), Ok(query)),
        ];
        let t = collector_summary(&runs);
        assert!(
            t.contains("| SQLite | wire | 1000000 | 4 (4) | 21035 [20010-22501] | 1200 |"),
            "{t}"
        );
        assert!(t.contains("| PostgreSQL | store | not measured"), "{t}");
        assert!(
            t.contains(
                "| SQLite | 10000000 | 232.9 / 340.9 | 44.5 / 60.0 | 52.4 / 70.1 | 1.4 / 13.9 |"
            ),
            "{t}"
        );
    }
}
