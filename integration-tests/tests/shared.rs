//! Several collectors sharing one PostgreSQL store: any collector continues any host's
//! chain, two collectors ingesting the same chain at once never fork it, and the access
//! log stays one chain.

use std::{
    ffi::{CString, OsString},
    os::unix::ffi::OsStrExt as _,
    path::Path,
    time::Duration,
};

use integration_tests::{
    Agent, TestDir,
    collector::{Collector, Pki, open_path, raw_client, verify_chain},
    is,
    postgres::Postgres,
    synthetic::Chain,
};
use phi_proto::v1::{AgentMessage, Batch, Hello, agent_message, collector_message, record::Event};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const HOST: &str = "shared-host";
const RACE: &str = "race-host";

fn open_close(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("cstring");
    // SAFETY: open/close of a valid path.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
        assert!(fd >= 0, "open {}", path.display());
        libc::close(fd);
    }
}

/// Streams `batches` of the race host through `collector`, each batch acknowledged before
/// the next; returns the last acknowledged seq.
async fn stream_all(pki: &Pki, collector: &Collector, key: [u8; 32], batches: Vec<Batch>) -> u64 {
    let mut client = raw_client(pki, collector, RACE).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            host_id: RACE.into(),
            public_key: key.to_vec(),
            agent_version: "test".into(),
            boot_id: String::new(),
        })),
    })
    .await
    .expect("hello");
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let welcome = inbound
        .message()
        .await
        .expect("welcome")
        .expect("a message");
    assert!(matches!(
        welcome.msg,
        Some(collector_message::Msg::Welcome(_))
    ));
    let mut acked = 0;
    for b in batches {
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Batch(b)),
        })
        .await
        .expect("send");
        match inbound.message().await {
            Ok(Some(m)) => match m.msg {
                Some(collector_message::Msg::Ack(a)) => acked = a.durable_seq,
                other => panic!("expected an ack, got {other:?}"),
            },
            other => panic!("the stream failed: {other:?}\n{}", collector.log()),
        }
    }
    acked
}

#[test]
fn two_collectors_share_one_postgres_store() {
    let pg = Postgres::start();
    let url = pg.database("shared");
    let pki = Pki::new(&[HOST, RACE]);
    // The server asks for a password: without PGPASSWORD the store is refused with the
    // reason, and the password never shows in the message.
    let (bare, _) = integration_tests::postgres::split_password(&url);
    let refused = integration_tests::collector::Phictl::run(
        std::process::Command::new(integration_tests::collector::phictl_bin())
            .env_remove("PGPASSWORD")
            .args(["--db", &bare, "hosts"]),
    );
    assert!(!refused.ok(), "a store without its password was opened");
    let text = refused.text();
    assert!(
        text.contains("cannot connect to postgres://") && text.contains("password"),
        "{text}"
    );
    assert!(
        !text.contains(integration_tests::postgres::PASSWORD),
        "{text}"
    );
    let one = Collector::start_on(&pki, Some(&url), &["--name", "collector-one"]);
    let two = Collector::start_on(&pki, Some(&url), &["--name", "collector-two"]);

    // A real agent streams to the first collector, then (restarted) to the second: the
    // second continues the chain the first stored.
    let w = TestDir::new("shared");
    let state = tempfile::tempdir().expect("state");
    let files: Vec<_> = (0..20)
        .map(|i| w.file(&format!("chart-{i}.txt"), "x"))
        .collect();
    let run_agent = |collector: &Collector, files: &[std::path::PathBuf]| {
        let mut args: Vec<OsString> = vec![
            "--watch".into(),
            w.path().into(),
            "--no-connect".into(),
            "--state-dir".into(),
            state.path().into(),
        ];
        args.extend(pki.agent_args(&collector.url(), HOST, HOST));
        let mut agent = Agent::start(args);
        for f in files {
            open_close(f);
        }
        agent.wait_for("the last open", is::open_of(files.last().expect("files")));
        let stopped = agent.stop();
        assert!(stopped.status.success());
    };
    run_agent(&one, &files[..10]);
    let stops = |r: &[integration_tests::collector::Stored]| {
        r.iter()
            .filter(|s| matches!(&s.record.event, Some(Event::Agent(a)) if a.phase == 2))
            .count()
    };
    one.wait_for(HOST, "the first run", Duration::from_secs(30), |r| {
        stops(r) == 1
    });
    run_agent(&two, &files[10..]);
    let records = two.wait_for(HOST, "the second run", Duration::from_secs(30), |r| {
        stops(r) == 2
    });
    verify_chain(&records).expect("one chain across both collectors");
    let opened: Vec<&str> = records
        .iter()
        .filter_map(|s| open_path(&s.record))
        .filter(|p| p.contains("chart-"))
        .collect();
    assert_eq!(opened.len(), 20, "every open once: {opened:?}");

    // The same chain, offered at once through both collectors, is stored exactly once.
    let mut chain = Chain::new(RACE);
    let batches: Vec<Batch> = (0..40).map(|_| chain.grow(25)).collect();
    let key = chain.key.public_key();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (a, b) = runtime.block_on(async {
        tokio::join!(
            stream_all(&pki, &one, key, batches.clone()),
            stream_all(&pki, &two, key, batches.clone())
        )
    });
    assert_eq!((a, b), (1000, 1000), "both streams end at the same head");
    let raced = one.records(RACE);
    assert_eq!(raced.len(), 1000, "every record exactly once");
    verify_chain(&raced).expect("no fork");
    assert!(one.alerts().is_empty(), "{:?}", one.alerts());

    // Queries through either collector land in one access log, which verifies.
    let t1 = one.token_for("alice", "auditor");
    for c in [&one, &two, &one, &two] {
        let v = c.phictl_api(&pki, &t1, &["verify", "--all"]);
        assert!(v.ok(), "{}", v.text());
        assert!(
            v.stdout.contains(&format!("{RACE}: OK: 1000 records")),
            "{}",
            v.text()
        );
    }
    let log = one.phictl_api(&pki, &t1, &["--format", "json", "access-log", "--verify"]);
    assert!(log.ok(), "{}", log.text());
    let log: serde_json::Value = serde_json::from_str(&log.stdout).expect("json");
    assert_eq!(log["verified"], true);
    let collectors: std::collections::BTreeSet<String> = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "Verify")
        .map(|e| e["collector"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        collectors.into_iter().collect::<Vec<_>>(),
        vec!["collector-one".to_owned(), "collector-two".to_owned()]
    );
    let verifies = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "Verify")
        .count();
    assert_eq!(verifies, 8, "four runs over two hosts");
    for c in [&one, &two] {
        assert!(!c.log().contains("panicked"), "{}", c.log());
    }
}
