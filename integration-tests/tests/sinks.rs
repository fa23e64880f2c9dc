//! SIEM sinks against real receivers on loopback: OCSF JSON lines in a rotated file, OCSF
//! over HTTPS and Splunk HEC (a receiver written here that checks what it gets), each fed by
//! a real collector over gRPC with mutual TLS. Receivers go down in the middle of a stream;
//! nothing is lost, and ingest is acknowledged all along.

use std::{collections::BTreeMap, path::Path, time::Duration};

use integration_tests::{
    collector::{Collector, Pki},
    http_get,
    postgres::Postgres,
    siem::{HEC_TOKEN, Receiver, check_ocsf, config_args, feed, wait_until},
    synthetic::Chain,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// (host, seq) of a record event, None for other events.
fn place(e: &Value) -> Option<(String, u64)> {
    let p = e.pointer("/unmapped/phi_audit")?;
    Some((
        p.get("host_id")?.as_str()?.to_owned(),
        p.get("seq")?.as_u64()?,
    ))
}

/// Every line of the sink's file and its rotated files, oldest first.
fn file_events(path: &Path) -> Vec<Value> {
    let mut files = Vec::new();
    for n in (1..100).rev() {
        let p = format!("{}.{n}", path.display());
        if Path::new(&p).exists() {
            files.push(p);
        }
    }
    files.push(path.display().to_string());
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for line in text.lines() {
            out.push(serde_json::from_str(line).unwrap_or_else(|e| panic!("{f}: {e}: {line}")));
        }
    }
    out
}

/// Checks that the record events hold each of `expected` (host → last seq) exactly once
/// (`exact`) or at least once, each host's in seq order of first arrival.
fn check_records(events: &[Value], expected: &[(&str, u64)], exact: bool) {
    let mut seen: BTreeMap<(String, u64), usize> = BTreeMap::new();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for e in events {
        if let Err(problem) = check_ocsf(e) {
            panic!("not a valid OCSF event: {problem}");
        }
        let Some((host, seq)) = place(e) else {
            continue;
        };
        let n = seen.entry((host.clone(), seq)).or_default();
        *n += 1;
        if *n == 1 {
            let prev = last.insert(host.clone(), seq).unwrap_or(0);
            assert_eq!(
                seq,
                prev + 1,
                "{host}: seq {seq} arrived first after {prev}"
            );
        }
    }
    for (host, n) in expected {
        for seq in 1..=*n {
            let count = seen.get(&((*host).to_owned(), seq)).copied().unwrap_or(0);
            assert!(count >= 1, "{host} seq {seq} never arrived");
            if exact {
                assert_eq!(count, 1, "{host} seq {seq} arrived {count} times");
            }
        }
    }
    let total: usize = expected.iter().map(|(_, n)| *n as usize).sum();
    assert_eq!(seen.len(), total, "records that were never stored arrived");
}

fn metric(collector: &Collector, name: &str, sink: &str) -> f64 {
    let (_, text) = http_get(collector.metrics_port, "/metrics").expect("metrics");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("sink=\"{sink}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn ocsf_file_sink_rotates_resumes_after_restart_and_carries_alerts() {
    ocsf_file_case(None);
}

/// The same with the sink's positions in a PostgreSQL store.
#[test]
fn ocsf_file_sink_keeps_its_position_in_postgres() {
    let pg = Postgres::start();
    let url = pg.database("sinks");
    ocsf_file_case(Some(&url));
}

fn ocsf_file_case(db: Option<&str>) {
    let pki = Pki::new(&["lake-a", "lake-b"]);
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("ocsf.jsonl");
    let args = config_args(
        dir.path(),
        &format!(
            "[[sinks]]\ntype = \"ocsf_file\"\nname = \"lake\"\npath = \"{}\"\n\
             max_bytes = 30000\nmax_files = 100\n[sinks.delivery]\nbatch = 7\n",
            out.display()
        ),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut collector = Collector::start_on(&pki, db, &args);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut a = Chain::new("lake-a");
    let mut b = Chain::new("lake-b");
    let batches = vec![a.grow(20), a.grow(20), a.grow(20)];
    rt.block_on(feed(&pki, &collector, &a, batches));
    let batch = b.grow(25);
    rt.block_on(feed(&pki, &collector, &b, vec![batch]));
    wait_until(&collector, "85 records in the OCSF file", WAIT, || {
        file_events(&out).iter().filter_map(place).count() >= 85
    });
    check_records(&file_events(&out), &[("lake-a", 60), ("lake-b", 25)], true);
    assert!(
        Path::new(&format!("{}.1", out.display())).exists(),
        "the file was rotated at 30000 bytes"
    );
    for f in std::fs::read_dir(dir.path()).expect("dir").flatten() {
        let len = f.metadata().expect("meta").len();
        assert!(len <= 30000, "{:?} is {len} bytes", f.path());
    }
    // Classes: opens are File System Activity with the path, execs Process Activity.
    let events = file_events(&out);
    let by_seq = |seq: u64| {
        events
            .iter()
            .find(|e| place(e) == Some(("lake-a".into(), seq)))
            .expect("event")
            .clone()
    };
    let open = by_seq(1);
    assert_eq!(open["class_uid"], 1001);
    assert_eq!(open["file"]["path"], "/srv/ehr/p1.json");
    assert_eq!(open["actor"]["user"]["name"], "alice");
    assert_eq!(open["device"]["hostname"], "lake-a");
    assert_eq!(open["status_id"], 1);
    let hash = hex::encode(&a.records[0].hash);
    assert_eq!(open["unmapped"]["phi_audit"]["hash"], Value::String(hash));
    let denied = by_seq(7);
    assert_eq!(
        (denied["status_id"].clone(), denied["status_detail"].clone()),
        (2.into(), "EACCES".into())
    );
    let exec = by_seq(5);
    assert_eq!(exec["class_uid"], 1007);
    assert_eq!(exec["process"]["file"]["path"], "/usr/bin/cat");
    assert_eq!(
        metric(&collector, "phi_collector_sink_lag_records", "lake"),
        0.0
    );
    assert_eq!(
        metric(&collector, "phi_collector_sink_events_total", "lake"),
        85.0
    );

    // Restart: the sink continues where it was, without sending anything twice.
    collector.stop();
    collector.restart();
    let batch = a.grow(15);
    rt.block_on(feed(&pki, &collector, &a, vec![batch]));
    // A host that presents another key raises an alert, forwarded as a Detection Finding.
    let mut impostor = Chain::new("lake-b");
    impostor.key = phi_chain::checkpoint::HostKey::from_secret([9; 32]);
    let batch = impostor.grow(1);
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(feed(&pki, &collector, &impostor, vec![batch]))
    }));
    assert!(refused.is_err(), "the collector refuses another key");
    wait_until(&collector, "75 records and the alert", WAIT, || {
        let ev = file_events(&out);
        ev.iter().filter_map(place).count() >= 100 && ev.iter().any(|e| e["class_uid"] == 2004)
    });
    let events = file_events(&out);
    check_records(&events, &[("lake-a", 75), ("lake-b", 25)], true);
    let finding = events
        .iter()
        .find(|e| e["class_uid"] == 2004)
        .expect("finding");
    assert_eq!(finding["finding_info"]["types"][0], "key-change");
    assert_eq!(finding["device"]["hostname"], "lake-b");
    // The positions reach the store: a sink saves its position after the events are written
    // (at least once), so the file can show the finding a moment before the store does.
    let alert_id = finding["unmapped"]["phi_audit"]["alert_id"]
        .as_u64()
        .expect("alert id");
    let want = vec![
        ("alerts".to_owned(), alert_id),
        ("host:lake-a".to_owned(), 75),
        ("host:lake-b".to_owned(), 25),
    ];
    let saved = || collector.store().cursors("sink:lake").expect("cursors");
    wait_until(&collector, "the last positions in the store", WAIT, || {
        let now = saved();
        now.iter().any(|(stream, _)| stream == "alerts") && now.contains(&want[1])
    });
    assert_eq!(saved(), want);
}

#[test]
fn ocsf_over_https_survives_a_receiver_outage() {
    let pki = Pki::new(&["web-a"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut receiver = rt.block_on(Receiver::start(&pki));
    let dir = tempfile::tempdir().expect("dir");
    let args = config_args(
        dir.path(),
        &format!(
            "[[sinks]]\ntype = \"ocsf_http\"\nname = \"lake-http\"\nurl = \"{}\"\n\
             headers = {{ authorization = \"Bearer lake-secret\" }}\n\
             tls.ca = \"{}\"\n[sinks.delivery]\nbatch = 5\nretry_min = \"50ms\"\n\
             retry_max = \"300ms\"\n",
            receiver.url("/ocsf"),
            pki.path("ca.pem").display()
        ),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let collector = Collector::start_with(&pki, &args);
    let mut a = Chain::new("web-a");
    let batch = a.grow(30);
    rt.block_on(feed(&pki, &collector, &a, vec![batch]));
    let count = |r: &Receiver| {
        r.state
            .lock()
            .expect("state")
            .ocsf
            .iter()
            .filter_map(place)
            .count()
    };
    wait_until(&collector, "30 records at the receiver", WAIT, || {
        count(&receiver) >= 30
    });

    // The receiver goes away; ingest goes on, the sink counts errors and falls behind.
    rt.block_on(receiver.stop());
    let batches = vec![a.grow(20), a.grow(20)];
    rt.block_on(feed(&pki, &collector, &a, batches));
    wait_until(&collector, "delivery errors", WAIT, || {
        metric(&collector, "phi_collector_sink_errors_total", "lake-http") > 0.0
    });
    wait_until(&collector, "a lag of 40 records", WAIT, || {
        metric(&collector, "phi_collector_sink_lag_records", "lake-http") == 40.0
    });
    assert_eq!(collector.records("web-a").len(), 70, "ingest went on");
    // It answers 503 for a while after it comes back.
    receiver.state.lock().expect("state").refuse = 3;
    rt.block_on(receiver.restart());
    wait_until(&collector, "70 records at the receiver", WAIT, || {
        count(&receiver) >= 70
    });
    let st = receiver.state.lock().expect("state");
    assert!(st.problems.is_empty(), "{:?}", st.problems);
    check_records(&st.ocsf, &[("web-a", 70)], false);
    drop(st);
    wait_until(&collector, "the lag back to 0", WAIT, || {
        metric(&collector, "phi_collector_sink_lag_records", "lake-http") == 0.0
    });
}

#[test]
fn splunk_hec_batches_waits_for_acknowledgement_and_resends_what_was_lost() {
    let pki = Pki::new(&["hec-a", "hec-b"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let receiver = rt.block_on(Receiver::start(&pki));
    {
        let mut st = receiver.state.lock().expect("state");
        // The first two batches are lost by the indexers (never acknowledged), and the
        // collector is busy for the first requests.
        st.lose_acks = 2;
        st.refuse = 2;
    }
    let dir = tempfile::tempdir().expect("dir");
    let args = config_args(
        dir.path(),
        &format!(
            "[[sinks]]\ntype = \"splunk_hec\"\nname = \"splunk\"\nurl = \"{}\"\n\
             token = \"{HEC_TOKEN}\"\nindex = \"phi\"\nack_timeout = \"2s\"\n\
             tls.ca = \"{}\"\n[sinks.delivery]\nbatch = 10\nretry_min = \"50ms\"\n\
             retry_max = \"300ms\"\n",
            receiver.url(""),
            pki.path("ca.pem").display()
        ),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let collector = Collector::start_with(&pki, &args);
    let mut a = Chain::new("hec-a");
    let mut b = Chain::new("hec-b");
    let batches = vec![a.grow(25), a.grow(20)];
    rt.block_on(feed(&pki, &collector, &a, batches));
    let batch = b.grow(12);
    rt.block_on(feed(&pki, &collector, &b, vec![batch]));
    let indexed = |r: &Receiver| {
        r.state
            .lock()
            .expect("state")
            .hec
            .iter()
            .filter_map(|e| place(&e["event"]))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    wait_until(&collector, "57 records indexed", WAIT, || {
        indexed(&receiver) >= 57
    });
    let st = receiver.state.lock().expect("state");
    assert!(st.problems.is_empty(), "{:?}", st.problems);
    assert_eq!(st.lose_acks, 0, "two batches were lost and sent again");
    let events: Vec<Value> = st.hec.iter().map(|e| e["event"].clone()).collect();
    check_records(&events, &[("hec-a", 45), ("hec-b", 12)], false);
    for e in &st.hec {
        let host = e["event"]["device"]["hostname"].clone();
        assert_eq!(e["host"], host, "the HEC host is the audited host");
        assert_eq!(e["index"], "phi");
        assert_eq!(e["sourcetype"], "ocsf");
        assert!(e["time"].as_f64().is_some_and(|t| t > 1.7e9), "{e}");
    }
    drop(st);
    assert!(metric(&collector, "phi_collector_sink_errors_total", "splunk") >= 2.0);
}
