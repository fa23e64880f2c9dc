//! Harness for the privileged end-to-end tests: runs the real `phi-agent` binary against the
//! running kernel and reads its JSON records.
//!
//! These tests never skip: without root, or without `PHI_AGENT_BIN` (set by `cargo xtask test`),
//! they fail and say why.

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub mod collector;
pub mod postgres;
pub mod rsyslog;
pub mod siem;
pub mod sshd;
pub mod synthetic;

use serde_json::Value;

/// How long the agent may take to load its programs.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a test waits for an expected record.
pub const RECORD_TIMEOUT: Duration = Duration::from_secs(15);

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    match std::env::var_os("PHI_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "PHI_AGENT_BIN is not set: run the privileged tests with `cargo xtask test`, which \
             builds the agent and sets it"
        ),
    }
}

/// Fails the test unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test loads kernel probes and needs root: run `sudo -E cargo xtask test`");
    }
}

/// This thread's id.
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// A directory tree for one test, world-traversable (tests run probes as other users too),
/// removed at the end.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("phi-it-{tag}-"))
            .tempdir()
            .expect("create test directory");
        set_mode(dir.path(), 0o755);
        TestDir { dir }
    }

    /// The canonical path (what the kernel reports).
    pub fn path(&self) -> PathBuf {
        std::fs::canonicalize(self.dir.path()).expect("canonical test dir")
    }

    /// Creates a file with `contents` below the directory and returns its canonical path.
    pub fn file(&self, rel: &str, contents: &str) -> PathBuf {
        let p = self.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("create parent");
        }
        std::fs::write(&p, contents).expect("write test file");
        p
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A running agent.
pub struct Agent {
    child: Child,
    /// The agent's state directory (pseudonym key...), unless the test gave its own.
    _state: Option<tempfile::TempDir>,
    records: Receiver<Value>,
    stderr: Option<JoinHandle<String>>,
    /// Every record received so far, in order.
    pub history: Vec<Value>,
    /// Port of the health and metrics endpoints (a free one unless the test chose).
    pub metrics_port: Option<u16>,
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct free TCP ports on 127.0.0.1: every port stays bound until all are chosen
/// (the kernel may hand a port just released to the next request).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("free port"));
    held.map(|l| l.local_addr().expect("addr").port())
}

/// Installs Debian `packages` (for a test that needs a server `cargo xtask setup` may not
/// have installed yet); panics with apt-get's output when that fails.
pub fn apt_install(packages: &[&str]) {
    let out = Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .output()
        .expect("run apt-get");
    assert!(
        out.status.success(),
        "apt-get install {} failed: {}{}",
        packages.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until something accepts connections on every one of `ports` on 127.0.0.1; after
/// `limit` panics naming `what`, with `detail()` (its log, say).
pub fn wait_listening(what: &str, ports: &[u16], limit: Duration, detail: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !ports
        .iter()
        .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
    {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {ports:?} within {limit:?}: {}",
            detail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path` from a plain-HTTP endpoint on 127.0.0.1: (status code, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// The value of one series in a Prometheus text page (`name{labels}` exactly as written).
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// What a stopped agent left behind.
pub struct Stopped {
    pub status: ExitStatus,
    /// Records received after the last wait (including the stop record).
    pub records: Vec<Value>,
    pub history: Vec<Value>,
    pub stderr: String,
}

impl Stopped {
    /// The agent's stop record.
    pub fn stop_record(&self) -> &Value {
        self.history
            .iter()
            .find(|r| r["agent"]["phase"] == "PHASE_STOP")
            .unwrap_or_else(|| panic!("no stop record; stderr:\n{}", self.stderr))
    }

    /// A drop counter from the stop record (64-bit values are strings in proto3 JSON, and a
    /// zero counter is left out). `name` is the proto3 JSON name (`readFailure`): a field
    /// name (`read_failure`) would never be found and always read as 0.
    pub fn drops(&self, name: &str) -> u64 {
        assert!(
            !name.contains('_'),
            "drop counter {name:?}: use its proto3 JSON (lowerCamelCase) name"
        );
        as_u64(&self.stop_record()["agent"]["drops"][name])
    }
}

/// Reads a proto3-JSON integer (a number or a decimal string).
pub fn as_u64(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap_or_else(|| panic!("not a u64: {v}")),
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not a u64: {v}")),
        Value::Null => 0,
        _ => panic!("not an integer: {v}"),
    }
}

pub fn as_i64(v: &Value) -> i64 {
    match v {
        Value::Number(n) => n.as_i64().unwrap_or_else(|| panic!("not an i64: {v}")),
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not an i64: {v}")),
        _ => panic!("not an integer: {v}"),
    }
}

/// A short description of a record for failure messages.
pub fn summary(r: &Value) -> String {
    let kind = [
        "open",
        "exec",
        "connect",
        "exit",
        "gap",
        "agent",
        "configChange",
    ]
    .into_iter()
    .find(|k| r.get(*k).is_some())
    .unwrap_or("?");
    let detail = match kind {
        "open" => format!(
            "{} {}",
            r["open"]["path"],
            r["open"]["outcome"]["errno"].as_str().unwrap_or("")
        ),
        "exec" => format!("{}", r["exec"]["argv"]),
        "connect" => format!(
            "{}:{} {}",
            r["connect"]["address"], r["connect"]["port"], r["connect"]["unixPath"]
        ),
        other => format!("{}", r[other]),
    };
    format!(
        "#{} {kind} pid={} comm={} {detail}",
        r["seq"].as_str().unwrap_or("?"),
        r["process"]["pid"],
        r["process"]["comm"]
    )
}

/// Summaries of the open records among `records` whose path satisfies `path` (for asserting
/// that none were recorded where none should be).
pub fn opens_where(records: &[Value], path: impl Fn(&str) -> bool) -> Vec<String> {
    records
        .iter()
        .filter(|r| r["open"]["path"].as_str().is_some_and(&path))
        .map(summary)
        .collect()
}

impl Agent {
    /// Starts `phi-agent run --stdout <args>` and waits for its start record.
    pub fn start<I, S>(args: I) -> Agent
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::start_wrapped(&[], args)
    }

    /// Starts the agent under a wrapper command (e.g. `setpriv … --`), which gets the agent's
    /// path and arguments after its own.
    pub fn start_wrapped<I, S>(wrapper: &[&str], args: I) -> Agent
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        require_root();
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let state = (!args.iter().any(|a| a == "--state-dir"))
            .then(|| tempfile::tempdir().expect("state dir"));
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        cmd.args(["run", "--stdout"]);
        if !args.iter().any(|a| a == "--log") {
            cmd.args(["--log", "warn"]);
        }
        cmd.args(&args);
        if let Some(dir) = &state {
            cmd.arg("--state-dir").arg(dir.path());
        }
        let metrics_port = if args.iter().any(|a| a == "--metrics-listen") {
            None
        } else {
            let port = free_port();
            cmd.arg("--metrics-listen").arg(format!("127.0.0.1:{port}"));
            Some(port)
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start phi-agent");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("agent wrote a line that is not JSON ({e}): {line}")
                });
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut agent = Agent {
            child,
            _state: state,
            records: rx,
            stderr: Some(stderr),
            history: Vec::new(),
            metrics_port,
        };
        agent.wait_for_within("the agent's start record", START_TIMEOUT, |r| {
            r["agent"]["phase"] == "PHASE_START"
        });
        agent
    }

    fn fail(&mut self, what: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let recent: Vec<String> = self
            .history
            .iter()
            .rev()
            .take(25)
            .rev()
            .map(summary)
            .collect();
        panic!(
            "{what}\n--- last records ---\n{}\n--- agent stderr ---\n{stderr}",
            recent.join("\n")
        );
    }

    /// Waits for the first record (after those already seen) that satisfies `pred`.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_within(what, RECORD_TIMEOUT, pred)
    }

    pub fn wait_for_within(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.records.recv_timeout(left) {
                Ok(rec) => {
                    self.history.push(rec.clone());
                    if pred(&rec) {
                        return rec;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("timed out after {timeout:?} waiting for {what}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail(&format!("the agent exited while waiting for {what}"))
                }
            }
        }
    }

    /// Like `wait_for`, but returns `None` when nothing matched within `timeout`.
    pub fn try_wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.records.recv_timeout(left) {
                Ok(rec) => {
                    self.history.push(rec.clone());
                    if pred(&rec) {
                        return Some(rec);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => self.fail("the agent exited"),
            }
        }
    }

    /// Waits until the agent has written nothing for `quiet` (everything pending is out).
    pub fn wait_quiet(&mut self, quiet: Duration, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let before = self.history.len();
            let _ = self.try_wait_for(quiet, |_| false);
            if self.history.len() == before {
                return;
            }
        }
    }

    /// Collects records until one satisfies `marker`; returns those before it.
    pub fn records_until(&mut self, what: &str, marker: impl Fn(&Value) -> bool) -> Vec<Value> {
        let start = self.history.len();
        self.wait_for(what, marker);
        let end = self.history.len() - 1;
        self.history[start..end].to_vec()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(r, 0, "kill({}, {sig})", self.child.id());
    }

    /// Stops the agent with SIGINT and collects everything it wrote.
    pub fn stop(self) -> Stopped {
        self.stop_with(libc::SIGINT)
    }

    /// Stops the agent with `sig` and collects everything it wrote.
    pub fn stop_with(mut self, sig: libc::c_int) -> Stopped {
        self.signal(sig);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for agent") {
                break status;
            }
            if Instant::now() > deadline {
                self.fail("the agent did not stop within 30 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut records = Vec::new();
        while let Ok(r) = self.records.recv_timeout(Duration::from_secs(5)) {
            records.push(r);
        }
        self.history.extend(records.iter().cloned());
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Stopped {
            status,
            records,
            history: std::mem::take(&mut self.history),
            stderr,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Predicates over records.
pub mod is {
    use serde_json::Value;

    use super::as_u64;

    pub fn open_of(path: &std::path::Path) -> impl Fn(&Value) -> bool + '_ {
        move |r| r["open"]["path"].as_str() == path.to_str()
    }

    pub fn from_pid(r: &Value, pid: u32) -> bool {
        as_u64(&r["process"]["pid"]) == u64::from(pid)
    }
}

/// Sets `kernel.io_uring_disabled` and restores it when dropped.
pub struct IoUringSetting(String);

impl IoUringSetting {
    pub const PATH: &str = "/proc/sys/kernel/io_uring_disabled";

    pub fn set(value: &str) -> IoUringSetting {
        let old =
            std::fs::read_to_string(Self::PATH).expect("kernel.io_uring_disabled (Linux 6.6+)");
        std::fs::write(Self::PATH, value).expect("set kernel.io_uring_disabled");
        IoUringSetting(old.trim().to_owned())
    }
}

impl Drop for IoUringSetting {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}
