//! What operators rely on: the agent runs as an unprivileged user with only the capabilities
//! the DaemonSet and the systemd unit grant, and says what it lacks; agent and collector
//! answer /healthz, /readyz and /metrics with what they really did.

use std::{
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    Agent, IoUringSetting, TestDir,
    collector::{Collector, Pki, opened_by, verify_chain},
    http_get, is, metric,
    postgres::Postgres,
    set_mode,
};

/// The capabilities the packaging grants (deploy/kubernetes, deploy/systemd).
const GRANTED: [&str; 4] = ["bpf", "perfmon", "dac_read_search", "sys_ptrace"];
const NOBODY: u32 = 65534;

/// `setpriv` arguments that run the agent as uid/gid 65534 with exactly `caps` (names
/// without `cap_`), nothing else in the bounding set, and no way to gain more.
fn as_nobody_with(caps: &[&str]) -> Vec<String> {
    let plus: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    let list = plus.join(",");
    vec![
        "setpriv".into(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        format!("--inh-caps=-all,{list}"),
        format!("--ambient-caps=-all,{list}"),
        format!("--bounding-set=-all,{list}"),
        "--no-new-privs".into(),
        "--".into(),
    ]
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .expect("field")
        .trim()
        .to_owned()
}

#[test]
fn the_agent_runs_unprivileged_with_the_granted_capabilities_and_sees_everything() {
    // A watched tree only root can search, like a real EHR directory.
    let w = TestDir::new("caps");
    let chart = w.file("restricted/chart-1.json", "{}");
    set_mode(&w.path().join("restricted"), 0o700);
    let state = tempfile::tempdir().expect("state");
    std::os::unix::fs::chown(state.path(), Some(NOBODY), Some(NOBODY)).expect("chown state");

    // A login shell that exists before the agent starts: its working directory can only be
    // learned from /proc, which needs CAP_SYS_PTRACE for another user's process.
    let cwd = tempfile::tempdir().expect("cwd");
    let mut shell = Command::new("sh")
        .arg("-c")
        .arg(format!("read go; cat {} > /dev/null", chart.display()))
        .current_dir(cwd.path())
        .stdin(Stdio::piped())
        .spawn()
        .expect("shell");

    let wrapper = as_nobody_with(&GRANTED);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let watch = w.path().join("restricted");
    let mut agent = Agent::start_wrapped(
        &wrapper,
        [
            "--watch".as_ref(),
            watch.as_os_str(),
            "--state-dir".as_ref(),
            state.path().as_os_str(),
            "--log".as_ref(),
            "info".as_ref(),
        ],
    );
    let pid = agent.pid();
    assert_eq!(
        status_field(pid, "Uid:").split_whitespace().next(),
        Some("65534"),
        "the agent does not run as the unprivileged user"
    );
    let start = agent.history[0].clone();
    let caps: Vec<&str> = start["agent"]["capabilities"]
        .as_array()
        .expect("capabilities")
        .iter()
        .map(|c| c.as_str().expect("name"))
        .collect();
    assert_eq!(
        caps,
        [
            "CAP_BPF",
            "CAP_PERFMON",
            "CAP_DAC_READ_SEARCH",
            "CAP_SYS_PTRACE"
        ],
        "{start}"
    );
    let limitations = start["agent"]["limitations"].to_string();
    assert!(!limitations.contains("without CAP_"), "{limitations}");

    // Root opens a file in the tree the agent's own user cannot even search.
    let status = Command::new("cat")
        .arg(&chart)
        .stdout(Stdio::null())
        .status()
        .expect("cat");
    assert!(status.success());
    let rec = agent.wait_for("root's open of the restricted chart", is::open_of(&chart));
    assert_eq!(rec["process"]["identity"]["user"], "root", "{rec}");
    assert_eq!(rec["process"]["exe"], "/usr/bin/cat", "{rec}");

    // The shell from before the start reads it: the working directory is known.
    writeln!(shell.stdin.as_mut().expect("stdin"), "go").expect("go");
    assert!(shell.wait().expect("shell").success());
    let rec = agent.wait_for("the older shell's child opening the chart", |r| {
        // dash runs the last command of `-c` in place of itself: either the shell or its child.
        is::open_of(&chart)(r)
            && (r["process"]["pid"] == shell.id() || r["process"]["ppid"] == shell.id())
    });
    let want = std::fs::canonicalize(cwd.path()).expect("canonical cwd");
    assert_eq!(
        rec["process"]["cwd"],
        want.to_str().expect("utf-8"),
        "{rec}"
    );
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    // Everything the agent wrote belongs to its user.
    let key = state.path().join("host.key");
    assert_eq!(std::fs::metadata(&key).expect("host key").uid(), NOBODY);
}

#[test]
fn without_ptrace_the_agent_still_records_and_says_what_it_misses() {
    let w = TestDir::new("noptrace");
    let chart = w.file("chart-2.json", "{}");
    let state = tempfile::tempdir().expect("state");
    std::os::unix::fs::chown(state.path(), Some(NOBODY), Some(NOBODY)).expect("chown state");
    let wrapper = as_nobody_with(&["bpf", "perfmon", "dac_read_search"]);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut agent = Agent::start_wrapped(
        &wrapper,
        [
            "--watch".as_ref(),
            w.path().as_os_str(),
            "--state-dir".as_ref(),
            state.path().as_os_str(),
            "--log".as_ref(),
            "info".as_ref(),
        ],
    );
    let start = agent.history[0].clone();
    let limitations = start["agent"]["limitations"].to_string();
    assert!(
        limitations.contains("without CAP_SYS_PTRACE") && limitations.contains("ssh origin"),
        "the start record does not say what is missing: {start}"
    );
    std::fs::read(&chart).expect("read");
    agent.wait_for("an open without ptrace", is::open_of(&chart));
    let stopped = agent.stop();
    assert!(
        stopped.stderr.contains("lacking=CAP_SYS_PTRACE")
            && stopped.stderr.contains("without CAP_SYS_PTRACE"),
        "{}",
        stopped.stderr
    );
}

#[test]
fn without_bpf_the_agent_refuses_to_start_and_names_the_capabilities() {
    let state = tempfile::tempdir().expect("state");
    std::os::unix::fs::chown(state.path(), Some(NOBODY), Some(NOBODY)).expect("chown state");
    let mut args = as_nobody_with(&["dac_read_search"]);
    args.push(integration_tests::agent_bin().display().to_string());
    let out = Command::new(&args[0])
        .args(&args[1..])
        .args(["run", "--stdout", "--metrics-listen", "off", "--state-dir"])
        .arg(state.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CAP_BPF")
            && err.contains("CAP_PERFMON")
            && err.contains("has: CAP_DAC_READ_SEARCH"),
        "{err}"
    );
}

fn get(port: u16, path: &str) -> (u16, String) {
    http_get(port, path).unwrap_or_else(|| panic!("no answer on 127.0.0.1:{port}{path}"))
}

fn wait_metric(port: u16, series: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, page) = get(port, "/metrics");
        if let Some(v) = metric(&page, series)
            && done(v)
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} did not reach the expected value:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Stopping an agent whose collector is down is not held up waiting for acknowledgements
/// that cannot come (a service manager stopping it would otherwise wait for nothing): it says
/// what stays in the spool, and its next run sends all of it.
#[test]
fn an_agent_stopped_while_its_collector_is_down_is_not_held_up_and_sends_the_rest_next_run() {
    const HOST: &str = "down-at-stop";
    const OPENS: usize = 20;
    let pki = Pki::new(&[HOST]);
    let mut collector = Collector::start(&pki);
    let w = TestDir::new("down-at-stop");
    let file = w.file("chart.txt", "x");
    let state = tempfile::tempdir().expect("state");
    let mut args: Vec<std::ffi::OsString> = vec![
        "--watch".into(),
        w.path().into(),
        "--state-dir".into(),
        state.path().into(),
        "--no-connect".into(),
    ];
    args.extend(pki.agent_args(&collector.url(), HOST, HOST));
    // Down before the agent starts: its connects are refused.
    collector.stop();
    let mut agent = Agent::start(args.clone());
    let aport = agent.metrics_port.expect("metrics port");
    assert_eq!(
        metric(&get(aport, "/metrics").1, "phi_agent_collector_connected"),
        Some(0.0)
    );
    for _ in 0..OPENS {
        std::fs::read(&file).expect("read");
    }
    agent.wait_for("an open", is::open_of(&file));
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains(
            "not connected to the collector: the records it has not acknowledged stay in the \
             spool"
        ),
        "{}",
        stopped.stderr
    );
    assert!(
        !stopped.stderr.contains("has not acknowledged everything"),
        "the stop did not wait for the collector: {}",
        stopped.stderr
    );

    collector.restart();
    let again = Agent::start(args);
    let me = std::process::id();
    let stored = collector.wait_for(HOST, "every open", Duration::from_secs(60), |recs| {
        recs.iter()
            .filter(|s| opened_by(&s.record, &w.path(), me))
            .count()
            >= OPENS
    });
    let opens = stored
        .iter()
        .filter(|s| opened_by(&s.record, &w.path(), me))
        .count();
    assert_eq!(opens, OPENS, "every open of the first run, once");
    verify_chain(&stored).expect("one intact chain across both runs");
    assert!(again.stop().status.success());
}

#[test]
fn a_collector_stopped_with_an_idle_agent_connected_ends_its_stream_and_the_agent_resends_later() {
    const HOST: &str = "idle-at-stop";
    const BEFORE: usize = 10;
    const WHILE_DOWN: usize = 15;
    let pki = Pki::new(&[HOST]);
    let mut collector = Collector::start(&pki);
    let w = TestDir::new("idle-at-stop");
    let file = w.file("chart.txt", "x");
    let mut args: Vec<std::ffi::OsString> =
        vec!["--watch".into(), w.path().into(), "--no-connect".into()];
    args.extend(pki.agent_args(&collector.url(), HOST, HOST));
    let mut agent = Agent::start(args);
    let aport = agent.metrics_port.expect("metrics port");
    let me = std::process::id();
    let opens = |recs: &[integration_tests::collector::Stored]| {
        recs.iter()
            .filter(|s| opened_by(&s.record, &w.path(), me))
            .count()
    };
    for _ in 0..BEFORE {
        std::fs::read(&file).expect("read");
    }
    collector.wait_for(HOST, "the first opens", Duration::from_secs(60), |r| {
        opens(r) >= BEFORE
    });
    // Everything sent is acknowledged: the agent's stream is open and idle.
    wait_metric(aport, "phi_agent_collector_connected", |v| v == 1.0);

    // Fails (after a minute) if the open stream holds the collector up.
    collector.stop();
    let log = collector.log();
    assert!(
        log.contains("ending the stream: the collector is stopping"),
        "{log}"
    );
    wait_metric(aport, "phi_agent_collector_connected", |v| v == 0.0);

    for _ in 0..WHILE_DOWN {
        std::fs::read(&file).expect("read");
    }
    agent.wait_for("an open while the collector is down", is::open_of(&file));
    // The stream's end and two refused connects: the agent's wait between tries has grown.
    wait_metric(aport, "phi_agent_collector_disconnects_total", |v| v >= 3.0);
    collector.restart();
    let stored = collector.wait_for(HOST, "every open", Duration::from_secs(90), |r| {
        opens(r) >= BEFORE + WHILE_DOWN
    });
    assert_eq!(opens(&stored), BEFORE + WHILE_DOWN, "every open, once");
    verify_chain(&stored).expect("one intact chain across the collector's stop");

    // A second stop: a stream that was up is retried after the shortest wait again, not
    // after the wait the failures of the first outage grew to.
    wait_metric(aport, "phi_agent_collector_connected", |v| v == 1.0);
    collector.stop();
    wait_metric(aport, "phi_agent_collector_connected", |v| v == 0.0);
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let ended: Vec<&str> = stopped
        .stderr
        .lines()
        .filter(|l| l.contains("the collector is stopping"))
        .collect();
    assert_eq!(
        ended.len(),
        2,
        "the agent says why each stream ended: {}",
        stopped.stderr
    );
    assert!(
        ended.iter().all(|l| l.contains("retrying in 250ms")),
        "{ended:#?}"
    );
}

#[test]
fn health_readiness_and_metrics_of_agent_and_collector() {
    let pg = Postgres::start();
    let url = pg.database("metrics");
    let pki = Pki::new(&["metrics-host"]);
    let collector = Collector::start_on(&pki, Some(&url), &[]);
    let cport = collector.metrics_port;
    assert_eq!(get(cport, "/healthz").0, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(cport, "/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the collector never became ready"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let w = TestDir::new("metrics");
    let files: Vec<_> = (0..12)
        .map(|i| w.file(&format!("chart-{i}.json"), "{}"))
        .collect();
    let mut args: Vec<std::ffi::OsString> = vec!["--watch".into(), w.path().into()];
    args.extend(pki.agent_args(&collector.url(), "metrics-host", "metrics-host"));
    let mut agent = Agent::start(args);
    let aport = agent.metrics_port.expect("metrics port");
    assert_eq!(get(aport, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(aport, "/readyz"), (200, "ok\n".into()));
    for f in &files {
        std::fs::read(f).expect("read");
    }
    let last = files.last().expect("files");
    agent.wait_for("the last open", is::open_of(last));

    // The agent counts what it sealed, by kind, and what the collector acknowledged.
    let opens = wait_metric(aport, "phi_agent_records_total{kind=\"open\"}", |v| {
        v >= 12.0
    });
    assert!(opens >= 12.0);
    let (_, page) = get(aport, "/metrics");
    for series in [
        "phi_agent_sensor_info{kind=\"open\",hook=\"tp_btf/sys_exit\"}",
        "phi_agent_capability{capability=\"CAP_BPF\"}",
        "phi_agent_events_lost_total{reason=\"ring_buffer_full\"}",
        "phi_agent_watched_directories",
        "phi_agent_spool_bytes",
        "process_resident_memory_bytes",
    ] {
        assert!(metric(&page, series).is_some(), "{series} missing:\n{page}");
    }
    assert_eq!(metric(&page, "phi_agent_watched_directories"), Some(1.0));
    wait_metric(aport, "phi_agent_collector_connected", |v| v == 1.0);
    let head = wait_metric(aport, "phi_agent_chain_head_seq", |v| v >= 13.0);
    let acked = wait_metric(aport, "phi_agent_acknowledged_seq", |v| v >= head);

    // The collector stored exactly what the agent says was acknowledged (or more, later).
    let stored = wait_metric(cport, "phi_collector_records_stored_total", |v| v >= acked);
    assert!(stored >= acked, "stored {stored}, acknowledged {acked}");
    let (_, cpage) = get(cport, "/metrics");
    assert_eq!(
        metric(&cpage, "phi_collector_streams_active"),
        Some(1.0),
        "{cpage}"
    );
    assert_eq!(
        metric(&cpage, "phi_collector_store_up"),
        Some(1.0),
        "{cpage}"
    );
    assert!(
        metric(&cpage, "phi_collector_batches_total").is_some_and(|b| b >= 1.0),
        "{cpage}"
    );
    assert!(cpage.contains("phi_collector_info{"), "{cpage}");

    // An API call is counted by method and outcome.
    let denied = collector.phictl_api(&pki, "phi_not-a-token", &["hosts"]);
    assert!(!denied.ok());
    wait_metric(
        cport,
        "phi_collector_api_calls_total{method=\"Authenticate\",outcome=\"denied\"}",
        |v| v == 1.0,
    );

    // The agent stops: the stream ends and the collector's gauge follows.
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    wait_metric(cport, "phi_collector_streams_active", |v| v == 0.0);

    // The store goes away: the collector stays alive but is no longer ready, and says why.
    drop(pg);
    let deadline = Instant::now() + Duration::from_secs(30);
    let why = loop {
        let (code, body) = get(cport, "/readyz");
        if code == 503 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the collector stayed ready without its store"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(why.contains("store"), "{why}");
    assert_eq!(get(cport, "/healthz").0, 200);
    assert_eq!(
        metric(&get(cport, "/metrics").1, "phi_collector_store_up"),
        Some(0.0)
    );
}

/// The start record names the sensor of every kind; forcing tracepoints uses no `fexit`
/// program, and the automatic choice falls back to the tracepoint only for a reason it logs.
/// (Kernels that allow `fexit` are proven by `cargo xtask kernel-matrix`, which runs the same
/// actions in both modes.)
#[test]
fn the_start_record_names_the_sensor_of_each_kind_and_tracepoints_can_be_forced() {
    integration_tests::require_root();
    let w = TestDir::new("sensors");
    let chart = w.file("chart.json", "{}");
    let sensors_of = |start: &serde_json::Value| -> Vec<(String, String)> {
        start["agent"]["sensors"]
            .as_array()
            .expect("sensors")
            .iter()
            .map(|s| {
                (
                    s["kind"].as_str().expect("kind").to_owned(),
                    s["hook"].as_str().expect("hook").to_owned(),
                )
            })
            .collect()
    };
    for mode in ["tracepoints", "auto"] {
        let mut agent = Agent::start([
            "--watch".as_ref(),
            w.path().as_os_str(),
            "--sensors".as_ref(),
            mode.as_ref(),
            "--log".as_ref(),
            "info".as_ref(),
            // Accept has a sensor only when a port is watched (`off` otherwise).
            "--accept-port".as_ref(),
            "5432".as_ref(),
        ]);
        let sensors = sensors_of(&agent.history[0]);
        let kinds: Vec<&str> = sensors.iter().map(|(k, _)| k.as_str()).collect();
        // This kernel has io_uring: its completions are read in both modes.
        assert_eq!(
            kinds,
            [
                "open",
                "connect",
                "accept",
                "path-changes",
                "exec",
                "fork",
                "exit",
                "io-uring"
            ],
            "{mode}: every kind is named once"
        );
        for (kind, hook) in &sensors {
            match kind.as_str() {
                "exec" | "fork" | "exit" => {
                    assert_eq!(hook, &format!("tp_btf/sched_process_{kind}"))
                }
                "io-uring" => {
                    assert_eq!(hook, "tp_btf/io_uring_complete, tp_btf/io_uring_submit_req")
                }
                _ if mode == "tracepoints" => {
                    assert_eq!(hook, "tp_btf/sys_exit", "{mode}: {kind}")
                }
                _ => assert!(
                    hook == "tp_btf/sys_exit" || hook.starts_with("fexit/"),
                    "{mode}: {kind} served by {hook}"
                ),
            }
        }
        // Whatever was picked, the records are there.
        std::fs::read(&chart).expect("read chart");
        agent.wait_for("open of the chart", |r| {
            r["open"]["path"].as_str() == chart.to_str()
        });
        let log = agent.stop().stderr;
        for (kind, hook) in &sensors {
            if hook == "tp_btf/sys_exit" {
                assert!(
                    log.contains(&format!("kind={kind}"))
                        && log.contains("served by the sys_exit tracepoint"),
                    "{mode}: the log does not say why {kind} is on sys_exit:\n{log}"
                );
            }
        }
    }
}

/// The limitations of the start record (and so of the chain) as one text.
fn start_limitations(watch: &TestDir) -> String {
    let state = tempfile::tempdir().expect("state");
    let agent = Agent::start([
        "--watch".as_ref(),
        watch.path().as_os_str(),
        "--state-dir".as_ref(),
        state.path().as_os_str(),
    ]);
    let limitations = agent.history[0]["agent"]["limitations"].to_string();
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    limitations
}

#[test]
fn the_start_record_names_no_io_uring_limitation_when_every_ring_open_is_recorded() {
    integration_tests::require_root();
    let w = TestDir::new("iouring");
    let restore = IoUringSetting::set("0");
    // This kernel lets the agent read io_uring submissions and completions: every open
    // through a ring, failed or not, is recorded, so whoever may use io_uring, nothing is
    // missed. (What the start record says where less is recorded is checked against each
    // kernel setting by the agent's own tests.)
    for setting in ["0", "1", "2"] {
        std::fs::write(IoUringSetting::PATH, setting).expect("set kernel.io_uring_disabled");
        let limitations = start_limitations(&w);
        assert!(
            !limitations.contains("io_uring"),
            "kernel.io_uring_disabled={setting}: {limitations}"
        );
    }
    drop(restore);
}
