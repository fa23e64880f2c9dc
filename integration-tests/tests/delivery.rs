//! Delivery to a real collector over real mutual TLS: exactly once and in order across
//! collector outages and agent crashes, torn spool entries, certificate checks, a full spool.

use std::{
    ffi::{CString, OsString},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use integration_tests::{
    Agent, TestDir, agent_bin,
    collector::{Collector, Pki, Stored, open_path, opened_by, verify_chain},
    require_root,
};
use phi_proto::v1::record::Event;

const HOST: &str = "it-host-a";

fn open_close(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("cstring");
    // SAFETY: open/close of a valid path.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
        assert!(fd >= 0, "open {}", path.display());
        libc::close(fd);
    }
}

fn agent_args(w: &TestDir, state: &Path, extra: Vec<OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--watch".into(),
        w.path().into(),
        "--state-dir".into(),
        state.into(),
        "--no-connect".into(),
    ];
    args.extend(extra);
    args
}

/// Starts an agent without reading its stdout (for runs that are killed).
fn spawn_agent(args: &[OsString]) -> Child {
    require_root();
    Command::new(agent_bin())
        .args(["run", "--log", "warn"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start phi-agent")
}

fn agents_stop(records: &[Stored]) -> usize {
    records
        .iter()
        .filter(|s| {
            matches!(&s.record.event, Some(Event::Agent(a)) if a.phase == phi_proto::v1::agent_lifecycle::Phase::Stop as i32)
        })
        .count()
}

#[test]
fn ten_thousand_opens_arrive_exactly_once_in_order_across_a_collector_outage() {
    const OPENS: usize = 10_000;
    let pki = Pki::new(&[HOST]);
    let mut collector = Collector::start(&pki);
    let w = TestDir::new("deliver");
    let files: Vec<PathBuf> = (0..100).map(|i| w.file(&format!("f{i:03}"), "x")).collect();
    let state = tempfile::tempdir().expect("state");
    let agent = Agent::start(agent_args(
        &w,
        state.path(),
        pki.agent_args(&collector.url(), HOST, HOST),
    ));
    let me = std::process::id();
    let mut expected = Vec::with_capacity(OPENS);
    for i in 0..OPENS {
        if i == OPENS / 4 {
            collector.stop();
        }
        if i == OPENS * 3 / 4 {
            collector.restart();
        }
        let f = &files[i % files.len()];
        open_close(f);
        expected.push(f.to_string_lossy().into_owned());
    }
    let stored = collector.wait_for(HOST, "all 10,000 opens", Duration::from_secs(120), |recs| {
        recs.iter()
            .filter(|s| opened_by(&s.record, &w.path(), me))
            .count()
            >= OPENS
    });
    let got: Vec<String> = stored
        .iter()
        .filter(|s| opened_by(&s.record, &w.path(), me))
        .filter_map(|s| open_path(&s.record).map(str::to_owned))
        .collect();
    assert_eq!(got.len(), OPENS, "every open exactly once");
    assert!(got == expected, "in the order they happened");
    verify_chain(&stored).expect("the stored chain is intact");
    assert!(collector.alerts().is_empty(), "{:?}", collector.alerts());
    let stopped = agent.stop();
    assert!(stopped.status.success());
    let all = collector.wait_for(HOST, "the stop record", Duration::from_secs(30), |recs| {
        agents_stop(recs) == 1
    });
    verify_chain(&all).expect("intact after the stop");
    assert!(
        collector.checkpoints(HOST) >= 1,
        "signed checkpoints were stored"
    );
    // A stopping agent closes its stream in order rather than dropping the connection.
    let log = collector.log();
    assert!(log.contains("agent stream ended"), "{log}");
    assert!(!log.contains("stream error"), "{log}");
}

#[test]
fn killing_the_agent_under_load_loses_nothing_acknowledged_and_duplicates_nothing() {
    let pki = Pki::new(&[HOST]);
    let collector = Collector::start(&pki);
    let w = TestDir::new("kill9");
    let file = w.file("chart.txt", "x");
    let state = tempfile::tempdir().expect("state");
    let args = agent_args(
        &w,
        state.path(),
        pki.agent_args(&collector.url(), HOST, HOST),
    );
    let mut first = spawn_agent(&args);
    collector.wait_for(
        HOST,
        "the first start record",
        Duration::from_secs(60),
        |r| !r.is_empty(),
    );
    let me = std::process::id();
    for _ in 0..3000 {
        open_close(&file);
    }
    let before_kill = collector.records(HOST);
    // SAFETY: killing our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    let _ = first.wait();
    let acknowledged = collector.records(HOST);
    assert!(acknowledged.len() >= before_kill.len());

    let second = Agent::start(args.clone());
    for _ in 0..1000 {
        open_close(&file);
    }
    let stopped = second.stop();
    assert!(
        stopped.status.success(),
        "{:?}: {}",
        stopped.status,
        stopped.stderr
    );
    let start = stopped
        .history
        .iter()
        .find(|r| r["agent"]["phase"] == "PHASE_START")
        .expect("start record");
    assert_eq!(
        start["agent"]["reason"], "unclean",
        "the crash is visible in the chain"
    );
    let all = collector.wait_for(
        HOST,
        "the second run's stop record",
        Duration::from_secs(60),
        |r| agents_stop(r) == 1,
    );
    verify_chain(&all).expect("one chain across the crash");
    for (a, b) in acknowledged.iter().zip(&all) {
        assert_eq!(
            a.sealed.hash, b.sealed.hash,
            "acknowledged records are unchanged"
        );
    }
    let ours = all
        .iter()
        .filter(|s| opened_by(&s.record, &w.path(), me))
        .count();
    assert!(ours >= 1000, "the second run's opens arrived ({ours})");
    assert!(ours <= 4000, "nothing counted twice ({ours})");
    assert!(collector.alerts().is_empty(), "{:?}", collector.alerts());
}

#[test]
fn a_torn_spool_entry_is_skipped_with_a_gap_record() {
    let pki = Pki::new(&[HOST]);
    let mut collector = Collector::start(&pki);
    collector.stop();
    let w = TestDir::new("torn");
    let file = w.file("chart.txt", "x");
    let state = tempfile::tempdir().expect("state");
    let args = agent_args(
        &w,
        state.path(),
        pki.agent_args(&collector.url(), HOST, HOST),
    );
    // Records pile up in the spool while the collector is down; then the agent dies.
    let mut agent = Agent::start(args.clone());
    for _ in 0..50 {
        open_close(&file);
    }
    agent.wait_for("an open", |r| r.get("open").is_some());
    std::thread::sleep(Duration::from_millis(300));
    agent.signal(libc::SIGKILL);
    drop(agent);
    // Tear the last entry of the newest segment.
    let spool = state.path().join("spool");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&spool)
        .expect("spool")
        .map(|e| e.expect("entry").path())
        .collect();
    segs.sort();
    let last = segs.last().expect("a segment");
    let len = std::fs::metadata(last).expect("stat").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .expect("open");
    f.set_len(len - 7).expect("tear the last entry");
    drop(f);

    collector.restart();
    let agent = Agent::start(args);
    let stopped = agent.stop();
    assert!(
        stopped.status.success(),
        "{:?}: {}",
        stopped.status,
        stopped.stderr
    );
    let all = collector.wait_for(
        HOST,
        "the restarted agent's records",
        Duration::from_secs(60),
        |r| agents_stop(r) == 1,
    );
    verify_chain(&all).expect("no garbage in the chain");
    let gaps: Vec<_> = all
        .iter()
        .filter_map(|s| match &s.record.event {
            Some(Event::Gap(g)) if g.reason == phi_proto::v1::GapReason::SpoolCorrupt as i32 => {
                Some(g.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(gaps.len(), 1, "one gap record for the torn entry");
    assert_eq!(gaps[0].count, 1);
    assert!(collector.alerts().is_empty(), "{:?}", collector.alerts());
}

#[test]
fn certificates_must_match_the_host_and_the_ca() {
    let pki = Pki::new(&[HOST, "it-host-b"]);
    let collector = Collector::start(&pki);
    let w = TestDir::new("certs");
    // A certificate for host B streaming as host A.
    let state = tempfile::tempdir().expect("state");
    let impostor = Agent::start(agent_args(
        &w,
        state.path(),
        pki.agent_args(&collector.url(), HOST, "it-host-b"),
    ));
    std::thread::sleep(Duration::from_secs(3));
    let stopped = impostor.stop();
    assert!(
        stopped.stderr.contains("certificate is for"),
        "the refusal names the reason: {}",
        stopped.stderr
    );
    assert!(collector.records(HOST).is_empty(), "nothing accepted for A");
    assert!(
        collector.records("it-host-b").is_empty(),
        "nothing accepted for B"
    );

    // A certificate from another CA.
    let other = Pki::new(&[HOST]);
    let state = tempfile::tempdir().expect("state");
    let mut args = agent_args(
        &w,
        state.path(),
        pki.agent_args(&collector.url(), HOST, HOST),
    );
    let pos = args
        .iter()
        .position(|a| a == "--tls-cert")
        .expect("cert flag");
    args[pos + 1] = other.path(&format!("{HOST}.pem")).into();
    args[pos + 3] = other.path(&format!("{HOST}.key")).into();
    let foreign = Agent::start(args);
    std::thread::sleep(Duration::from_secs(3));
    let stopped = foreign.stop();
    assert!(
        collector.records(HOST).is_empty(),
        "a foreign CA is refused: {}",
        stopped.stderr
    );

    // No client certificate at all.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let refused = runtime.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                std::fs::read(pki.path("ca.pem")).expect("ca"),
            ))
            .domain_name("localhost");
        let channel = tonic::transport::Endpoint::from_shared(collector.url())
            .expect("url")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await;
        let Ok(channel) = channel else {
            return true;
        };
        let mut client = phi_proto::v1::ingest_client::IngestClient::new(channel);
        let hello = phi_proto::v1::AgentMessage {
            msg: Some(phi_proto::v1::agent_message::Msg::Hello(
                phi_proto::v1::Hello {
                    host_id: HOST.into(),
                    public_key: vec![0; 32],
                    agent_version: "test".into(),
                    boot_id: String::new(),
                },
            )),
        };
        match client.stream(tokio_stream_once(hello)).await {
            Err(_) => true,
            Ok(resp) => resp.into_inner().message().await.is_err(),
        }
    });
    assert!(refused, "a client without a certificate is refused");
    assert!(collector.records(HOST).is_empty());
}

fn tokio_stream_once(
    m: phi_proto::v1::AgentMessage,
) -> impl tokio_stream::Stream<Item = phi_proto::v1::AgentMessage> {
    tokio_stream::iter(vec![m])
}

#[test]
fn a_full_spool_records_the_loss_with_the_right_count() {
    const OPENS: u64 = 20_000;
    let pki = Pki::new(&[HOST]);
    let mut collector = Collector::start(&pki);
    collector.stop();
    let w = TestDir::new("full");
    let file = w.file("chart.txt", "x");
    let state = tempfile::tempdir().expect("state");
    let conf = state.path().join("agent.toml");
    std::fs::write(&conf, "[spool]\nmax_bytes = 1048576\n").expect("config");
    let mut extra = pki.agent_args(&collector.url(), HOST, HOST);
    extra.extend(["--config".into(), conf.clone().into()]);
    let mut agent = Agent::start(agent_args(&w, state.path(), extra));
    let me = std::process::id();
    for _ in 0..OPENS {
        open_close(&file);
    }
    // Let the agent take in every event before the collector comes back.
    agent.wait_quiet(Duration::from_secs(2), Duration::from_secs(60));
    collector.restart();
    collector.wait_for(HOST, "the loss record", Duration::from_secs(120), |r| {
        r.iter().any(|s| matches!(&s.record.event, Some(Event::Gap(g)) if g.reason == phi_proto::v1::GapReason::SpoolFull as i32))
    });
    let stopped = agent.stop();
    assert!(
        stopped.status.success(),
        "{:?}: {}",
        stopped.status,
        stopped.stderr
    );
    let all = collector.wait_for(HOST, "the stop record", Duration::from_secs(120), |r| {
        agents_stop(r) == 1
    });
    verify_chain(&all).expect("intact chain");
    let delivered = all
        .iter()
        .filter(|s| opened_by(&s.record, &w.path(), me))
        .count() as u64;
    let gaps: Vec<_> = all
        .iter()
        .filter_map(|s| match &s.record.event {
            Some(Event::Gap(g)) if g.reason == phi_proto::v1::GapReason::SpoolFull as i32 => {
                Some((s.sealed.seq, g.clone()))
            }
            _ => None,
        })
        .collect();
    assert!(!gaps.is_empty(), "a full spool leaves a loss record");
    let lost_opens: u64 = gaps
        .iter()
        .map(|(_, g)| g.by_kind.get("open").copied().unwrap_or(0))
        .sum();
    assert!(
        delivered < OPENS,
        "the 1 MiB spool could not hold everything"
    );
    assert_eq!(
        delivered + lost_opens,
        OPENS,
        "every open is either delivered or counted in a loss record"
    );
    for (seq, g) in &gaps {
        assert!(
            g.first_seq < *seq && g.last_seq == *seq,
            "the loss sits between {} and {seq}",
            g.first_seq
        );
    }
    let counted: u64 = gaps.iter().map(|(_, g)| g.count).sum();
    assert_eq!(
        stopped.drops("spoolFull"),
        counted,
        "the stop record's total matches the loss records"
    );
}
