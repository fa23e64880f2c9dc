//! The syslog sink against a real rsyslog (imtcp with TLS, octet-counting framing): every
//! record arrives with its host, seq and hash in the structured data and its OCSF event as
//! the message; rsyslog stops in the middle of the stream and comes back, and nothing is
//! lost.

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{
    collector::{Collector, Pki},
    http_get,
    rsyslog::{Line, Rsyslog},
    siem::{check_ocsf, config_args, feed, wait_until},
    synthetic::Chain,
};

const WAIT: Duration = Duration::from_secs(60);

fn records(lines: &[Line]) -> Vec<(String, u64, String)> {
    lines
        .iter()
        .filter(|l| l.msgid != "alert")
        .map(|l| {
            (
                l.param("host").expect("host in the structured data"),
                l.param("seq")
                    .and_then(|s| s.parse().ok())
                    .expect("seq in the structured data"),
                l.param("hash").expect("hash in the structured data"),
            )
        })
        .collect()
}

fn errors(collector: &Collector) -> f64 {
    let (_, text) = http_get(collector.metrics_port, "/metrics").expect("metrics");
    text.lines()
        .filter(|l| l.starts_with("phi_collector_sink_errors_total{") && l.contains("siem"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn syslog_over_tls_reaches_rsyslog_and_survives_its_restart() {
    let pki = Pki::new(&["sys-a", "sys-b"]);
    let mut rsyslog = Rsyslog::start(&pki);
    let dir = tempfile::tempdir().expect("dir");
    let args = config_args(
        dir.path(),
        &format!(
            "[[sinks]]\ntype = \"syslog\"\nname = \"siem\"\naddress = \"127.0.0.1:{}\"\n\
             facility = \"local3\"\ntls.ca = \"{}\"\ntls.server_name = \"localhost\"\n\
             [sinks.delivery]\nbatch = 5\nretry_min = \"50ms\"\nretry_max = \"300ms\"\n",
            rsyslog.port,
            pki.path("ca.pem").display()
        ),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let collector = Collector::start_with(&pki, &args);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut a = Chain::new("sys-a");
    let mut b = Chain::new("sys-b");
    let batches = vec![a.grow(50), a.grow(50)];
    rt.block_on(feed(&pki, &collector, &a, batches));
    let batch = b.grow(20);
    rt.block_on(feed(&pki, &collector, &b, vec![batch]));

    // rsyslog stops while the sink is delivering.
    wait_until(&collector, "30 messages at rsyslog", WAIT, || {
        rsyslog.lines().len() >= 30
    });
    rsyslog.stop();
    let batches = vec![a.grow(40), a.grow(40)];
    rt.block_on(feed(&pki, &collector, &a, batches));
    assert_eq!(collector.records("sys-a").len(), 180, "ingest goes on");
    wait_until(&collector, "a delivery error", WAIT, || {
        errors(&collector) > 0.0
    });
    rsyslog.restart();
    wait_until(&collector, "200 records at rsyslog", WAIT, || {
        let mut seen = std::collections::BTreeSet::new();
        for (h, s, _) in records(&rsyslog.lines()) {
            seen.insert((h, s));
        }
        seen.len() >= 200
    });

    let lines = rsyslog.lines();
    let stored: BTreeMap<(String, u64), String> = ["sys-a", "sys-b"]
        .iter()
        .flat_map(|h| {
            collector
                .records(h)
                .into_iter()
                .map(move |s| (((*h).to_owned(), s.sealed.seq), hex::encode(&s.sealed.hash)))
        })
        .collect();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for (line, (host, seq, hash)) in lines
        .iter()
        .filter(|l| l.msgid != "alert")
        .zip(records(&lines))
    {
        assert_eq!(line.hostname, host, "HOSTNAME is the audited host");
        assert_eq!(
            stored.get(&(host.clone(), seq)),
            Some(&hash),
            "{host} seq {seq}: the hash in the structured data is the stored one"
        );
        let event: serde_json::Value =
            serde_json::from_str(&line.msg).unwrap_or_else(|e| panic!("{e}: {}", line.msg));
        if let Err(p) = check_ocsf(&event) {
            panic!("not a valid OCSF event: {p}");
        }
        assert_eq!(line.param("kind").as_deref(), Some(line.msgid.as_str()));
        if seen.insert((host.clone(), seq)) {
            let prev = last.insert(host.clone(), seq).unwrap_or(0);
            assert_eq!(
                seq,
                prev + 1,
                "{host}: seq {seq} arrived first after {prev}"
            );
        }
    }
    assert_eq!(seen.len(), 200, "every record arrived");
    assert_eq!(last.get("sys-a"), Some(&180));
    assert_eq!(last.get("sys-b"), Some(&20));
}
