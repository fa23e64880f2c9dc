//! Alert rules on crafted scenarios, each next to its benign twin on another host: the
//! scenario raises exactly its alert (naming the rule, the evidence records and the
//! identity), the twin raises none. Alerts are stored (as `phictl alerts` shows them) and
//! forwarded to the sinks as OCSF Detection Findings.

use std::{path::Path, time::Duration};

use integration_tests::{
    collector::{Collector, Pki},
    siem::{check_ocsf, config_args, feed, seal, try_feed, wait_until},
    synthetic::Chain,
};
use phi_proto::{
    Timestamp,
    v1::{
        Accept, AddressFamily, Connect, Gap, GapReason, Heartbeat, Identity, Open, Outcome,
        Process, ProcessExit, Record, record::Event,
    },
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Who acts: account, uid, group, and the login user (None: login uid unset).
#[derive(Clone, Copy)]
struct Who {
    user: &'static str,
    uid: u32,
    group: &'static str,
    login: Option<(&'static str, u32)>,
}

const BOB: Who = Who {
    user: "bob",
    uid: 1002,
    group: "staff",
    login: Some(("bob", 1002)),
};
const ALICE: Who = Who {
    user: "alice",
    uid: 1001,
    group: "staff",
    login: Some(("alice", 1001)),
};
const NURSE: Who = Who {
    user: "dana",
    uid: 1004,
    group: "ehr",
    login: Some(("dana", 1004)),
};
const CAROL: Who = Who {
    user: "carol",
    uid: 1003,
    group: "staff",
    login: Some(("carol", 1003)),
};
const DAEMON: Who = Who {
    user: "ehrd",
    uid: 998,
    group: "ehrd",
    login: None,
};
const BACKUP: Who = Who {
    user: "backup",
    uid: 34,
    group: "backup",
    login: None,
};

fn process(who: Who, pid: u32) -> Process {
    Process {
        pid,
        tid: pid,
        comm: "python3".into(),
        identity: Some(Identity {
            uid: who.uid,
            euid: who.uid,
            user: who.user.into(),
            group: who.group.into(),
            login_uid: who.login.map(|(_, u)| u),
            login_user: who.login.map_or("unset".into(), |(n, _)| n.into()),
            audit_session: who.login.map(|_| 5),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn at(secs: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

fn open(who: Who, pid: u32, path: &str, t: i64) -> Record {
    Record {
        time: at(t),
        process: Some(process(who, pid)),
        event: Some(Event::Open(Open {
            path: path.into(),
            read: true,
            outcome: Some(Outcome {
                success: true,
                ret: 3,
                errno: String::new(),
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn connect(who: Who, pid: u32, address: &str, port: u32, t: i64) -> Record {
    Record {
        time: at(t),
        process: Some(process(who, pid)),
        event: Some(Event::Connect(Connect {
            family: AddressFamily::Inet as i32,
            address: address.into(),
            port,
            outcome: Some(Outcome {
                success: true,
                ..Default::default()
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn accept(who: Who, pid: u32, remote: &str, local_port: u32, t: i64) -> Record {
    Record {
        time: at(t),
        process: Some(process(who, pid)),
        event: Some(Event::Accept(Accept {
            family: if remote.contains(':') {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            } as i32,
            remote_address: remote.into(),
            remote_port: 50000,
            local_address: "10.0.0.5".into(),
            local_port,
            fd: 9,
            socket_type: "stream".into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn exit(who: Who, pid: u32, t: i64) -> Record {
    Record {
        time: at(t),
        process: Some(process(who, pid)),
        event: Some(Event::Exit(ProcessExit {
            status: Some(0),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn heartbeat(t: i64) -> Record {
    Record {
        time: at(t),
        event: Some(Event::Heartbeat(Heartbeat::default())),
        ..Default::default()
    }
}

fn gap(t: i64) -> Record {
    Record {
        time: at(t),
        event: Some(Event::Gap(Gap {
            reason: GapReason::RingBufferFull as i32,
            count: 12,
            total: 12,
            first_seq: 1,
            last_seq: 2,
            ..Default::default()
        })),
        ..Default::default()
    }
}

const RULES: &str = r#"
[[rules]]
type = "unauthorized_access"
name = "ehr-readers"
paths = ["/srv/ehr"]
users = ["alice"]
groups = ["ehr"]

[[rules]]
type = "bulk_access"
name = "bulk-export"
paths = ["/srv/bulk/"]
max_files = 5
window = "10m"

[[rules]]
type = "egress"
name = "phi-egress"
paths = ["/srv/egress"]
allow = ["10.0.0.0/8", "127.0.0.1"]

[[rules]]
type = "ingress"
name = "db-clients"
ports = [5432]
allow = ["10.0.0.0/8", "fd00::/8"]

[[rules]]
type = "unattributed_access"
name = "no-human"
paths = ["/srv/unattended"]
except_users = ["backup"]

[[rules]]
type = "gap"
name = "lost-events"

[[rules]]
type = "silent_host"
name = "heartbeat"
deadline = "1h"
interval = "200ms"
"#;

/// Each scenario's host and records, with its expected alert kind (None: the benign twin).
fn scenarios(t: i64) -> Vec<(&'static str, Option<&'static str>, Vec<Record>)> {
    let mut bulk_bad = Vec::new();
    for i in 0..6 {
        bulk_bad.push(open(
            CAROL,
            700,
            &format!("/srv/bulk/p{i}.json"),
            t + i * 60,
        ));
    }
    let mut bulk_ok = Vec::new();
    for round in 0..10 {
        for i in 0..5 {
            bulk_ok.push(open(CAROL, 701, &format!("/srv/bulk/p{i}.json"), t + round));
        }
    }
    // The sixth file comes after the window.
    bulk_ok.push(open(CAROL, 701, "/srv/bulk/p5.json", t + 20 * 60));
    vec![
        (
            "access-bad",
            Some("unauthorized-access"),
            vec![
                open(ALICE, 100, "/srv/ehr/p1.json", t),
                open(BOB, 101, "/srv/ehr/p1.json", t + 1),
            ],
        ),
        (
            "access-ok",
            None,
            vec![
                open(ALICE, 100, "/srv/ehr/p1.json", t),
                open(NURSE, 102, "/srv/ehr/labs/p2.csv", t + 1),
                open(BOB, 101, "/srv/ehr-archive/old.json", t + 2),
                open(BOB, 101, "/srv/other/x", t + 3),
            ],
        ),
        ("bulk-bad", Some("bulk-access"), bulk_bad),
        ("bulk-ok", None, bulk_ok),
        (
            "egress-bad",
            Some("egress"),
            vec![
                open(BOB, 500, "/srv/egress/p.json", t),
                connect(BOB, 500, "203.0.113.9", 443, t + 1),
            ],
        ),
        (
            "egress-ok",
            None,
            vec![
                open(BOB, 600, "/srv/egress/p.json", t),
                connect(BOB, 600, "10.1.2.3", 5432, t + 1),
                connect(BOB, 601, "203.0.113.9", 443, t + 2),
                open(BOB, 602, "/srv/egress/p.json", t + 3),
                exit(BOB, 602, t + 4),
                connect(BOB, 602, "203.0.113.9", 443, t + 5),
            ],
        ),
        (
            "ingress-bad",
            Some("ingress"),
            vec![
                accept(DAEMON, 800, "10.1.2.3", 5432, t),
                accept(DAEMON, 800, "198.51.100.7", 5432, t + 1),
            ],
        ),
        (
            "ingress-ok",
            None,
            vec![
                accept(DAEMON, 801, "10.1.2.3", 5432, t),
                accept(DAEMON, 801, "::ffff:10.4.4.4", 5432, t + 1),
                accept(DAEMON, 801, "fd00::9", 5432, t + 2),
                // Another port: outside the rule.
                accept(DAEMON, 801, "198.51.100.7", 22, t + 3),
            ],
        ),
        (
            "human-bad",
            Some("unattributed-access"),
            vec![open(DAEMON, 300, "/srv/unattended/a.json", t)],
        ),
        (
            "human-ok",
            None,
            vec![
                open(ALICE, 301, "/srv/unattended/a.json", t),
                open(BACKUP, 302, "/srv/unattended/a.json", t + 1),
                open(DAEMON, 303, "/srv/elsewhere/a.json", t + 2),
            ],
        ),
        ("gap-bad", Some("gap"), vec![heartbeat(t), gap(t + 1)]),
        ("gap-ok", None, vec![heartbeat(t), heartbeat(t + 1)]),
        (
            "silent-bad",
            Some("silent-host"),
            vec![heartbeat(t - 2 * 3600)],
        ),
        ("silent-ok", None, vec![heartbeat(t)]),
    ]
}

#[test]
fn each_rule_fires_on_its_scenario_and_stays_quiet_on_its_benign_twin() {
    let t = now();
    let plan = scenarios(t);
    let mut hosts: Vec<&str> = plan.iter().map(|(h, _, _)| *h).collect();
    hosts.push("break-bad");
    let pki = Pki::new(&hosts);
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("alerts.jsonl");
    let args = config_args(
        dir.path(),
        &format!(
            "{RULES}\n[[sinks]]\ntype = \"ocsf_file\"\nname = \"soc\"\npath = \"{}\"\n\
             delivery.events = \"alerts\"\n",
            out.display()
        ),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let collector = Collector::start_with(&pki, &args);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for (host, _, records) in &plan {
        let mut chain = Chain::new(host);
        let batch = seal(&mut chain, records.clone());
        rt.block_on(feed(&pki, &collector, &chain, vec![batch]));
    }
    // A chain break: record 4 of another chain after records 1..=3.
    let mut chain = Chain::new("break-bad");
    let batch = seal(
        &mut chain,
        vec![heartbeat(t), heartbeat(t + 1), heartbeat(t + 2)],
    );
    rt.block_on(feed(&pki, &collector, &chain, vec![batch]));
    let mut other = Chain::new("break-bad");
    let mut forged = seal(&mut other, (0..4).map(|i| heartbeat(t + 100 + i)).collect());
    forged.records.drain(..3);
    let refused = rt.block_on(try_feed(&pki, &collector, &chain, vec![forged]));
    assert!(refused.is_err(), "a break in the chain is refused");

    // Every record was judged: the rules' position is each host's head.
    wait_until(&collector, "the rules to judge every record", WAIT, || {
        let cursors = collector.store().cursors("rules").expect("cursors");
        plan.iter().all(|(h, _, r)| {
            cursors
                .iter()
                .any(|(s, p)| *s == format!("host:{h}") && *p == r.len() as u64)
        })
    });
    wait_until(&collector, "the silent host's alert", WAIT, || {
        collector
            .alerts()
            .iter()
            .any(|(kind, _)| kind == "silent-host")
    });
    let alerts = collector.store().alerts(None).expect("alerts");
    for (host, expected, records) in &plan {
        let mine: Vec<_> = alerts.iter().filter(|a| a.alert.host_id == *host).collect();
        match expected {
            None => assert!(mine.is_empty(), "{host} is benign but raised {mine:?}"),
            Some(kind) => {
                assert_eq!(mine.len(), 1, "{host}: {mine:?}");
                let a = &mine[0].alert;
                assert_eq!(a.kind, *kind);
                let ev: Value = serde_json::from_slice(&a.evidence).expect("evidence is JSON");
                assert!(
                    ev["rule"].as_str().is_some_and(|r| a.detail.contains(r)),
                    "{ev}"
                );
                assert_eq!(ev["type"], *kind);
                let seqs: Vec<u64> = ev["records"]
                    .as_array()
                    .expect("records")
                    .iter()
                    .map(|r| {
                        assert_eq!(r["host"], *host);
                        r["seq"].as_u64().expect("seq")
                    })
                    .collect();
                assert!(!seqs.is_empty() && seqs.iter().all(|s| *s as usize <= records.len()));
                assert_eq!(a.seq, seqs.last().copied(), "{host}");
            }
        }
    }
    let by_host = |h: &str| {
        let a = alerts.iter().find(|a| a.alert.host_id == h).expect("alert");
        serde_json::from_slice::<Value>(&a.alert.evidence).expect("json")
    };
    let e = by_host("access-bad");
    assert_eq!(e["identity"]["user"], "bob");
    assert_eq!(
        e["records"],
        serde_json::json!([{"host": "access-bad", "seq": 2}])
    );
    let e = by_host("bulk-bad");
    assert_eq!(e["identity"]["user"], "carol");
    assert_eq!(e["records"].as_array().map(Vec::len), Some(6));
    let e = by_host("egress-bad");
    assert_eq!(
        e["records"],
        serde_json::json!([{"host": "egress-bad", "seq": 1}, {"host": "egress-bad", "seq": 2}])
    );
    assert_eq!(e["address"], "203.0.113.9");
    let e = by_host("ingress-bad");
    assert_eq!(
        e["records"],
        serde_json::json!([{"host": "ingress-bad", "seq": 2}])
    );
    assert_eq!(e["remote_address"], "198.51.100.7");
    assert_eq!(e["local_port"], 5432);
    let e = by_host("human-bad");
    assert_eq!(e["identity"]["account"], "ehrd");
    assert_eq!(e["identity"]["login_uid"], Value::Null);
    assert!(
        alerts
            .iter()
            .any(|a| a.alert.host_id == "break-bad" && a.alert.kind == "chain-break"),
        "{alerts:?}"
    );

    // phictl alerts shows them.
    let listed = collector.phictl_db(&["alerts", "--format", "json"]);
    assert!(listed.ok(), "{}", listed.text());
    assert!(listed.stdout.contains("bulk-access"), "{}", listed.text());

    // Every alert reaches the sink as a Detection Finding naming its rule.
    wait_until(&collector, "every alert in the sink", WAIT, || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count()
            >= alerts.len()
    });
    let findings: Vec<Value> = std::fs::read_to_string(Path::new(&out))
        .expect("sink file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(findings.len(), alerts.len());
    for f in &findings {
        if let Err(p) = check_ocsf(f) {
            panic!("not a valid OCSF event: {p}");
        }
        assert_eq!(f["class_uid"], 2004);
    }
    let access = findings
        .iter()
        .find(|f| f["device"]["hostname"] == "access-bad")
        .expect("finding");
    assert_eq!(access["finding_info"]["title"], "ehr-readers");
    assert_eq!(access["actor"]["user"]["name"], "bob");
    assert_eq!(
        access["finding_info"]["related_events"][0]["uid"],
        "access-bad:2"
    );
}

/// A bulk access that straddles a collector restart is still seen: the rules rebuild their
/// windows from the records they judged before it.
#[test]
fn a_bulk_access_window_survives_a_collector_restart() {
    let t = now();
    let host = "bulk-restart";
    let pki = Pki::new(&[host]);
    let dir = tempfile::tempdir().expect("dir");
    let args = config_args(dir.path(), RULES);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut collector = Collector::start_with(&pki, &args);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let judged = |collector: &Collector, n: u64| {
        collector
            .store()
            .cursors("rules")
            .expect("cursors")
            .iter()
            .any(|(s, p)| *s == format!("host:{host}") && *p == n)
    };
    let bulk_alerts = |collector: &Collector| {
        collector
            .store()
            .alerts(Some(host))
            .expect("alerts")
            .into_iter()
            .filter(|a| a.alert.kind == "bulk-access")
            .collect::<Vec<_>>()
    };

    // Three distinct files before the restart, three after, all within the 10-minute
    // window of a rule that allows five.
    let mut chain = Chain::new(host);
    let before = (0..3)
        .map(|i| open(CAROL, 800, &format!("/srv/bulk/r{i}.json"), t + i))
        .collect();
    let batch = seal(&mut chain, before);
    rt.block_on(feed(&pki, &collector, &chain, vec![batch]));
    wait_until(
        &collector,
        "the rules to judge the first three",
        WAIT,
        || judged(&collector, 3),
    );
    assert!(
        bulk_alerts(&collector).is_empty(),
        "three files are not bulk"
    );

    collector.stop();
    collector.restart();
    let after = (3..6)
        .map(|i| open(CAROL, 800, &format!("/srv/bulk/r{i}.json"), t + i))
        .collect();
    let batch = seal(&mut chain, after);
    rt.block_on(feed(&pki, &collector, &chain, vec![batch]));
    wait_until(&collector, "the rules to judge all six", WAIT, || {
        judged(&collector, 6)
    });
    let alerts = bulk_alerts(&collector);
    assert_eq!(
        alerts.len(),
        1,
        "one bulk alert across the restart: {alerts:?}"
    );
    let evidence: Value = serde_json::from_slice(&alerts[0].alert.evidence).expect("json");
    let seqs: Vec<u64> = evidence["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6], "the evidence spans the restart");
}
