//! Records and alerts as OCSF 1.3 events (<https://schema.ocsf.io/1.3.0>):
//!
//! | phi-audit | OCSF class | activity |
//! | --- | --- | --- |
//! | `exec`, `exit` | Process Activity (1007) | Launch (1), Terminate (2) |
//! | `open` | File System Activity (1001) | Open (14) |
//! | `connect`, `accept` | Network Activity (4001) | Open (1), or Fail (4) when it failed |
//! | `gap`, `heartbeat`, `agent`, `config_change` | Base Event (0) | Other (99) |
//! | alerts | Detection Finding (2004) | Create (1) |
//!
//! `actor.user` is the person behind the access (the login user) when the record knows it,
//! else the account the process ran as; `actor.process.user` is always that account.
//! What OCSF has no place for (the chain position and hash, the redactions, the audit login
//! uid and session, the privilege chain, the container) is under `unmapped.phi_audit`.

use phi_proto::v1::{
    AddressFamily, Identity, Process, Record, agent_lifecycle::Phase, record::Event as Kind,
};
use serde_json::{Map, Value, json};

use super::event::{Event, RecordEvent};
use crate::store::StoredAlert;

/// The OCSF schema version the events follow.
pub const OCSF_VERSION: &str = "1.3.0";

pub const PROCESS_ACTIVITY: u32 = 1007;
pub const FILE_SYSTEM_ACTIVITY: u32 = 1001;
pub const NETWORK_ACTIVITY: u32 = 4001;
pub const DETECTION_FINDING: u32 = 2004;
pub const BASE_EVENT: u32 = 0;

/// The event as one OCSF object.
pub fn to_ocsf(e: &Event) -> Value {
    match e {
        Event::Record(r) => record(r),
        Event::Alert(a) => alert(a),
    }
}

fn metadata(uid: String, extra: &[(&str, Value)]) -> Value {
    let mut m = json!({
        "version": OCSF_VERSION,
        "uid": uid,
        "product": {
            "name": "phi-audit",
            "vendor_name": "phi-audit",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "log_name": "phi-audit",
    });
    if let Some(o) = m.as_object_mut() {
        for (k, v) in extra {
            o.insert((*k).to_owned(), v.clone());
        }
    }
    m
}

fn ms(ns: i64) -> i64 {
    ns.div_euclid(1_000_000)
}

fn ts_ms(t: Option<&phi_proto::Timestamp>) -> Option<i64> {
    t.map(|t| t.seconds.saturating_mul(1000) + i64::from(t.nanos) / 1_000_000)
        .filter(|v| *v > 0)
}

fn user(name: &str, uid: u32) -> Value {
    json!({
        "name": name,
        "uid": uid.to_string(),
        "type_id": if uid == 0 { 2 } else { 1 },
    })
}

fn process(p: &Process) -> Value {
    let mut o = Map::new();
    o.insert("pid".into(), json!(p.pid));
    o.insert("tid".into(), json!(p.tid));
    o.insert("name".into(), json!(p.comm));
    if !p.exe.is_empty() {
        let name = p.exe.rsplit('/').next().unwrap_or(&p.exe);
        o.insert(
            "file".into(),
            json!({"path": p.exe, "name": name, "type_id": 1}),
        );
    }
    if !p.argv.is_empty() {
        o.insert("cmd_line".into(), json!(p.argv.join(" ")));
    }
    if !p.cwd.is_empty() {
        o.insert("working_directory".into(), json!(p.cwd));
    }
    if let Some(t) = ts_ms(p.start_time.as_ref()) {
        o.insert("created_time".into(), json!(t));
    }
    if let Some(i) = &p.identity {
        o.insert("user".into(), user(&i.user, i.uid));
        if let Some(s) = i.audit_session.filter(|s| *s != u32::MAX) {
            o.insert("session".into(), json!({"uid": s.to_string()}));
        }
    }
    if p.ppid != 0 || !p.ancestors.is_empty() {
        let mut parent = Map::new();
        parent.insert("pid".into(), json!(p.ppid));
        if let Some(a) = p.ancestors.first() {
            parent.insert("name".into(), json!(a.comm));
            if !a.exe.is_empty() {
                parent.insert("file".into(), json!({"path": a.exe, "type_id": 1}));
            }
        }
        o.insert("parent_process".into(), Value::Object(parent));
    }
    if let Some(c) = &p.container
        && !c.id.is_empty()
    {
        o.insert(
            "container".into(),
            json!({"uid": c.id, "runtime": c.runtime}),
        );
    }
    Value::Object(o)
}

/// The person behind the access, else the account.
fn actor(p: Option<&Process>) -> Value {
    let Some(p) = p else {
        return json!({"user": {"name": "unknown", "type_id": 0}});
    };
    let identity = p.identity.clone().unwrap_or_default();
    let person = match identity.login_uid {
        Some(uid) if uid != u32::MAX && identity.login_user != "unset" => {
            user(&identity.login_user, uid)
        }
        _ => user(&identity.user, identity.uid),
    };
    let mut a = json!({"user": person, "process": process(p)});
    if let (Some(o), Some(ls)) = (a.as_object_mut(), identity.session.as_ref()) {
        let mut s = json!({
            "uid": ls.id.to_string(),
            "is_remote": ls.kind == "ssh",
            "terminal": ls.tty,
        });
        if let Some(t) = ts_ms(ls.login_time.as_ref()) {
            s["created_time"] = json!(t);
        }
        o.insert("session".into(), s);
    }
    a
}

fn identity_extra(i: &Identity) -> Value {
    json!({
        "login_uid": i.login_uid,
        "login_user": i.login_user,
        "audit_session": i.audit_session,
        "euid": i.euid,
        "euser": i.euser,
        "gid": i.gid,
        "group": i.group,
        "chain": i.chain.iter().map(|l| json!({
            "uid": l.uid, "user": l.user, "pid": l.pid, "via": l.via,
        })).collect::<Vec<_>>(),
        "login_session": i.session.as_ref().map(|s| json!({
            "kind": s.kind,
            "user": s.user,
            "source_address": s.source_address,
            "source_port": s.source_port,
            "tty": s.tty,
        })),
    })
}

fn unmapped(r: &RecordEvent) -> Value {
    let rec = &r.record;
    let identity = rec.process.as_ref().and_then(|p| p.identity.as_ref());
    json!({
        "phi_audit": {
            "host_id": r.host_id,
            "seq": r.seq,
            "hash": hex::encode(&r.hash),
            "prev_hash": hex::encode(&rec.prev_hash),
            "boot_id": rec.boot_id,
            "kind": rec.kind(),
            "redactions": rec.redactions.iter().map(|x| json!({
                "rule": x.rule, "field": x.field, "count": x.count, "action": x.action,
            })).collect::<Vec<_>>(),
            "identity": identity.map(identity_extra),
            "container": rec.process.as_ref().and_then(|p| p.container.as_ref()).map(|c| json!({
                "id": c.id, "runtime": c.runtime, "pod_uid": c.pod_uid,
                "pod_name": c.pod_name, "pod_namespace": c.pod_namespace,
            })),
        }
    })
}

fn status(success: bool, errno: &str) -> (u32, &'static str, Option<String>) {
    if success {
        (1, "Success", None)
    } else {
        (
            2,
            "Failure",
            Some(errno.to_owned()).filter(|e| !e.is_empty()),
        )
    }
}

fn endpoint(family: i32, address: &str, port: u32, unix_path: &str) -> Value {
    if family == AddressFamily::Unix as i32 {
        json!({"name": unix_path, "type": "unix"})
    } else {
        json!({"ip": address, "port": port})
    }
}

fn record(r: &RecordEvent) -> Value {
    let rec: &Record = &r.record;
    let time = ms(crate::store::index::time_ns(rec));
    let uid = format!("{}:{}", r.host_id, r.seq);
    let (class_uid, category_uid, activity_id, activity_name, class_name, category_name) =
        match &rec.event {
            Some(Kind::Exec(_)) => (
                PROCESS_ACTIVITY,
                1,
                1,
                "Launch",
                "Process Activity",
                "System Activity",
            ),
            Some(Kind::Exit(_)) => (
                PROCESS_ACTIVITY,
                1,
                2,
                "Terminate",
                "Process Activity",
                "System Activity",
            ),
            Some(Kind::Open(_)) => (
                FILE_SYSTEM_ACTIVITY,
                1,
                14,
                "Open",
                "File System Activity",
                "System Activity",
            ),
            Some(Kind::Connect(c)) => {
                let ok = c.outcome.as_ref().is_some_and(|o| o.success) || c.in_progress;
                (
                    NETWORK_ACTIVITY,
                    4,
                    if ok { 1 } else { 4 },
                    if ok { "Open" } else { "Fail" },
                    "Network Activity",
                    "Network Activity",
                )
            }
            Some(Kind::Accept(_)) => (
                NETWORK_ACTIVITY,
                4,
                1,
                "Open",
                "Network Activity",
                "Network Activity",
            ),
            _ => (BASE_EVENT, 0, 99, "Other", "Base Event", "Uncategorized"),
        };
    let mut o = Map::new();
    o.insert("class_uid".into(), json!(class_uid));
    o.insert("class_name".into(), json!(class_name));
    o.insert("category_uid".into(), json!(category_uid));
    o.insert("category_name".into(), json!(category_name));
    o.insert("activity_id".into(), json!(activity_id));
    o.insert("activity_name".into(), json!(activity_name));
    o.insert(
        "type_uid".into(),
        json!(u64::from(class_uid) * 100 + activity_id),
    );
    o.insert("time".into(), json!(time));
    o.insert("severity_id".into(), json!(1));
    o.insert("severity".into(), json!("Informational"));
    o.insert(
        "metadata".into(),
        metadata(uid, &[("sequence", json!(r.seq))]),
    );
    o.insert(
        "device".into(),
        json!({"hostname": r.host_id, "uid": r.host_id, "type_id": 0}),
    );
    if rec.process.is_some() {
        o.insert("actor".into(), actor(rec.process.as_ref()));
    }
    let set_status = |o: &mut Map<String, Value>, success: bool, errno: &str| {
        let (id, name, detail) = status(success, errno);
        o.insert("status_id".into(), json!(id));
        o.insert("status".into(), json!(name));
        if let Some(d) = detail {
            o.insert("status_detail".into(), json!(d));
        }
    };
    match &rec.event {
        Some(Kind::Exec(e)) => {
            let mut p = rec.process.as_ref().map_or_else(|| json!({}), process);
            p["file"] = json!({"path": e.exe, "name": e.exe.rsplit('/').next().unwrap_or(""), "type_id": 1});
            p["cmd_line"] = json!(e.argv.join(" "));
            o.insert("process".into(), p);
            set_status(&mut o, true, "");
        }
        Some(Kind::Exit(x)) => {
            let mut p = rec.process.as_ref().map_or_else(|| json!({}), process);
            if let Some(s) = x.status {
                p["exit_code"] = json!(s);
            }
            o.insert("process".into(), p);
        }
        Some(Kind::Open(f)) => {
            let name = f.path.rsplit('/').next().unwrap_or("");
            o.insert(
                "file".into(),
                json!({"path": f.path, "name": name, "type_id": 1}),
            );
            let success = f.outcome.as_ref().is_some_and(|x| x.success);
            let errno = f.outcome.as_ref().map_or("", |x| x.errno.as_str());
            set_status(&mut o, success, errno);
            let mut access = Vec::new();
            if f.read {
                access.push("Read");
            }
            if f.write {
                access.push("Write");
            }
            if f.create {
                access.push("Create");
            }
            if f.truncate {
                access.push("Truncate");
            }
            o.insert("access_list".into(), json!(access));
        }
        Some(Kind::Connect(c)) => {
            o.insert(
                "dst_endpoint".into(),
                endpoint(c.family, &c.address, c.port, &c.unix_path),
            );
            o.insert(
                "src_endpoint".into(),
                json!({"ip": c.local_address, "port": c.local_port, "hostname": r.host_id}),
            );
            o.insert(
                "connection_info".into(),
                json!({"direction_id": 2, "direction": "Outbound", "protocol_name": c.socket_type}),
            );
            let success = c.outcome.as_ref().is_some_and(|x| x.success) || c.in_progress;
            let errno = c.outcome.as_ref().map_or("", |x| x.errno.as_str());
            set_status(&mut o, success, errno);
        }
        Some(Kind::Accept(a)) => {
            o.insert(
                "src_endpoint".into(),
                endpoint(a.family, &a.remote_address, a.remote_port, ""),
            );
            o.insert(
                "dst_endpoint".into(),
                json!({"ip": a.local_address, "port": a.local_port, "hostname": r.host_id}),
            );
            o.insert(
                "connection_info".into(),
                json!({"direction_id": 1, "direction": "Inbound"}),
            );
            set_status(&mut o, true, "");
        }
        Some(Kind::Gap(g)) => {
            o.insert(
                "message".into(),
                json!(format!(
                    "{} events lost or shortened on the host ({:?})",
                    g.count,
                    g.reason()
                )),
            );
            o.insert("severity_id".into(), json!(3));
            o.insert("severity".into(), json!("Medium"));
        }
        Some(Kind::Heartbeat(_)) => {
            o.insert("message".into(), json!("agent heartbeat"));
        }
        Some(Kind::Agent(a)) => {
            let phase = if a.phase() == Phase::Stop {
                "stopped"
            } else {
                "started"
            };
            o.insert(
                "message".into(),
                json!(format!("phi-agent {} {phase} ({})", a.version, a.reason)),
            );
        }
        Some(Kind::ConfigChange(c)) => {
            o.insert(
                "message".into(),
                json!(format!("watch list changed: {}", c.watch.join(", "))),
            );
        }
        None => {
            o.insert(
                "message".into(),
                json!("stored record without content (see phictl verify)"),
            );
        }
    }
    o.insert("unmapped".into(), unmapped(r));
    Value::Object(o)
}

fn alert(a: &StoredAlert) -> Value {
    let evidence = serde_json::from_slice::<Value>(&a.alert.evidence)
        .ok()
        .filter(Value::is_object);
    let rule = evidence
        .as_ref()
        .and_then(|e| e.get("rule"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let title = rule.clone().unwrap_or_else(|| a.alert.kind.clone());
    let mut related = Vec::new();
    if let Some(records) = evidence
        .as_ref()
        .and_then(|e| e.get("records"))
        .and_then(Value::as_array)
    {
        for r in records {
            if let (Some(h), Some(s)) = (
                r.get("host").and_then(Value::as_str),
                r.get("seq").and_then(Value::as_u64),
            ) {
                related.push(json!({"uid": format!("{h}:{s}"), "type": "phi-audit record"}));
            }
        }
    } else if let Some(seq) = a.alert.seq {
        related
            .push(json!({"uid": format!("{}:{seq}", a.alert.host_id), "type": "phi-audit record"}));
    }
    let mut o = json!({
        "class_uid": DETECTION_FINDING,
        "class_name": "Detection Finding",
        "category_uid": 2,
        "category_name": "Findings",
        "activity_id": 1,
        "activity_name": "Create",
        "type_uid": u64::from(DETECTION_FINDING) * 100 + 1,
        "time": ms(a.time_ns),
        "severity_id": 4,
        "severity": "High",
        "status_id": 1,
        "status": "New",
        "message": a.alert.detail,
        "metadata": metadata(format!("alert:{}", a.id), &[]),
        "device": {"hostname": a.alert.host_id, "uid": a.alert.host_id, "type_id": 0},
        "finding_info": {
            "uid": format!("alert:{}", a.id),
            "title": title,
            "desc": a.alert.detail,
            "types": [a.alert.kind],
            "related_events": related,
        },
        "unmapped": {"phi_audit": {
            "alert_id": a.id,
            "kind": a.alert.kind,
            "host_id": a.alert.host_id,
            "seq": a.alert.seq,
            "rule": rule,
        }},
    });
    if let Some(e) = evidence {
        if let Some(identity) = e.get("identity").filter(|v| v.is_object()) {
            let name = identity
                .get("user")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            let uid = identity.get("uid").and_then(Value::as_u64);
            o["actor"] = json!({"user": {
                "name": name,
                "uid": uid.map(|u| u.to_string()),
                "type_id": if uid == Some(0) { 2 } else { 1 },
            }});
        }
        o["unmapped"]["phi_audit"]["evidence"] = e;
    } else if !a.alert.evidence.is_empty() {
        o["unmapped"]["phi_audit"]["evidence_hex"] = json!(hex::encode(&a.alert.evidence));
    }
    o
}

/// One line of JSON (what the file and HTTP sinks write).
pub fn line(e: &Event) -> String {
    to_ocsf(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Alert;
    use phi_proto::v1::{Accept, Connect, LoginSession, Outcome, Redaction};

    fn event(kind: Kind) -> Event {
        Event::Record(RecordEvent {
            host_id: "ehr-1".into(),
            seq: 9,
            hash: vec![0xcd; 32],
            record: Box::new(Record {
                seq: 9,
                host_id: "ehr-1".into(),
                time: Some(phi_proto::Timestamp {
                    seconds: 1_793_491_200,
                    nanos: 7_000_000,
                }),
                process: Some(Process {
                    pid: 42,
                    comm: "curl".into(),
                    identity: Some(Identity {
                        uid: 0,
                        user: "root".into(),
                        login_uid: Some(1001),
                        login_user: "alice".into(),
                        session: Some(LoginSession {
                            id: 3,
                            kind: "ssh".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                redactions: vec![Redaction {
                    rule: "ssn".into(),
                    field: "process.argv[1]".into(),
                    count: 1,
                    action: "mask".into(),
                }],
                event: Some(kind),
                ..Default::default()
            }),
        })
    }

    #[test]
    fn records_map_to_their_classes() {
        let failed = to_ocsf(&event(Kind::Connect(Connect {
            family: AddressFamily::Inet as i32,
            address: "203.0.113.9".into(),
            port: 443,
            outcome: Some(Outcome {
                success: false,
                ret: -111,
                errno: "ECONNREFUSED".into(),
            }),
            ..Default::default()
        })));
        assert_eq!(failed["class_uid"], NETWORK_ACTIVITY);
        assert_eq!(failed["type_uid"], 400_104);
        assert_eq!(failed["dst_endpoint"]["ip"], "203.0.113.9");
        assert_eq!(failed["status_detail"], "ECONNREFUSED");
        assert_eq!(failed["time"], 1_793_491_200_007_i64);
        // The person, and the account the process ran as.
        assert_eq!(failed["actor"]["user"]["name"], "alice");
        assert_eq!(failed["actor"]["process"]["user"]["name"], "root");
        assert_eq!(failed["actor"]["session"]["is_remote"], true);
        let p = &failed["unmapped"]["phi_audit"];
        assert_eq!(p["seq"], 9);
        assert_eq!(p["hash"], "cd".repeat(32));
        assert_eq!(p["redactions"][0]["rule"], "ssn");
        assert_eq!(failed["metadata"]["uid"], "ehr-1:9");

        let inbound = to_ocsf(&event(Kind::Accept(Accept {
            family: AddressFamily::Inet as i32,
            remote_address: "10.1.4.20".into(),
            remote_port: 51514,
            ..Default::default()
        })));
        assert_eq!(inbound["connection_info"]["direction_id"], 1);
        assert_eq!(inbound["src_endpoint"]["ip"], "10.1.4.20");
    }

    #[test]
    fn rule_alerts_are_detection_findings() {
        let evidence = json!({
            "rule": "ehr-readers",
            "type": "unauthorized-access",
            "identity": {"user": "bob", "uid": 1002},
            "records": [{"host": "ehr-1", "seq": 5}],
        });
        let f = to_ocsf(&Event::Alert(StoredAlert {
            id: 3,
            time_ns: 1_793_491_200_000_000_000,
            alert: Alert {
                host_id: "ehr-1".into(),
                kind: "unauthorized-access".into(),
                seq: Some(5),
                detail: "rule \"ehr-readers\": …".into(),
                evidence: evidence.to_string().into_bytes(),
            },
        }));
        assert_eq!(f["class_uid"], DETECTION_FINDING);
        assert_eq!(f["type_uid"], 200_401);
        assert_eq!(f["finding_info"]["title"], "ehr-readers");
        assert_eq!(f["finding_info"]["related_events"][0]["uid"], "ehr-1:5");
        assert_eq!(f["actor"]["user"]["name"], "bob");
        assert_eq!(f["unmapped"]["phi_audit"]["evidence"], evidence);
    }
}
