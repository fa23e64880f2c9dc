//! Rule evaluation over stored records, host by host in seq order. The state of the rules
//! that look at more than one record (bulk access windows, which process read watched data)
//! lives in memory; after a restart it is rebuilt from the records judged last
//! (`rules::warm_up`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::IpAddr,
    time::Duration,
};

use phi_proto::v1::{AddressFamily, Record, record::Event as Kind};
use serde_json::{Value, json};

use super::{config::RuleConfig, net::Cidr};
use crate::{sinks::event::RecordEvent, store::Alert};

/// Most processes remembered per host by an egress rule.
const MAX_READERS: usize = 100_000;

/// Who acted: the account and the person behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who {
    pub account: String,
    pub uid: u32,
    pub group: String,
    /// The login user and uid, when the process has a login uid.
    pub login: Option<(String, u32)>,
}

impl Who {
    pub fn of(r: &Record) -> Who {
        let i = r
            .process
            .as_ref()
            .and_then(|p| p.identity.clone())
            .unwrap_or_default();
        Who {
            account: i.user.clone(),
            uid: i.uid,
            group: i.group.clone(),
            login: i
                .login_uid
                .filter(|u| *u != u32::MAX)
                .map(|u| (i.login_user.clone(), u)),
        }
    }

    /// The person: the login user, else the account.
    pub fn person(&self) -> &str {
        self.login.as_ref().map_or(&self.account, |(n, _)| n)
    }

    pub fn json(&self) -> Value {
        let (user, uid) = match &self.login {
            Some((n, u)) => (n.as_str(), *u),
            None => (self.account.as_str(), self.uid),
        };
        json!({
            "user": user,
            "uid": uid,
            "account": self.account,
            "account_uid": self.uid,
            "group": self.group,
            "login_user": self.login.as_ref().map(|(n, _)| n),
            "login_uid": self.login.as_ref().map(|(_, u)| u),
        })
    }

    fn describe(&self) -> String {
        match &self.login {
            Some((n, _)) if *n != self.account => {
                format!("{} (uid {}, logged in as {n})", self.account, self.uid)
            }
            Some(_) => format!("{} (uid {})", self.account, self.uid),
            None => format!("{} (uid {}, no login)", self.account, self.uid),
        }
    }
}

/// True when `path` is `prefix` or lies under it.
pub fn under(path: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| {
        let p = p.trim_end_matches('/');
        p.is_empty()
            || path == p
            || (path.len() > p.len() && path.starts_with(p) && path.as_bytes()[p.len()] == b'/')
    })
}

fn evidence(rule: &str, kind: &str, who: Option<&Who>, records: &[(&str, u64)]) -> Value {
    json!({
        "rule": rule,
        "type": kind,
        "identity": who.map(Who::json),
        "records": records.iter().map(|(h, s)| json!({"host": h, "seq": s})).collect::<Vec<_>>(),
    })
}

fn alert(host: &str, kind: &str, seq: u64, detail: String, evidence: Value) -> Alert {
    Alert {
        host_id: host.to_owned(),
        kind: kind.to_owned(),
        seq: Some(seq),
        detail,
        evidence: evidence.to_string().into_bytes(),
    }
}

/// One distinct-file window of the bulk rule.
#[derive(Default)]
struct Window {
    /// (time, path, seq), oldest first.
    opens: VecDeque<(i64, String, u64)>,
}

enum State {
    None,
    Bulk(HashMap<(String, String), Window>),
    /// (host, boot, pid) → watched files read: (seq, path).
    Egress(
        HashMap<(String, String, u32), Vec<(u64, String)>>,
        Vec<Cidr>,
    ),
    /// The networks an ingress rule allows.
    Ingress(Vec<Cidr>),
}

pub struct Engine {
    rules: Vec<(RuleConfig, State)>,
}

impl Engine {
    pub fn new(rules: &[RuleConfig]) -> Engine {
        Engine {
            rules: rules
                .iter()
                .filter(|r| !matches!(r, RuleConfig::SilentHost(_)))
                .map(|r| {
                    let state = match r {
                        RuleConfig::BulkAccess(_) => State::Bulk(HashMap::new()),
                        RuleConfig::Egress(e) => State::Egress(
                            HashMap::new(),
                            e.allow.iter().filter_map(|a| Cidr::parse(a).ok()).collect(),
                        ),
                        RuleConfig::Ingress(i) => State::Ingress(
                            i.allow.iter().filter_map(|a| Cidr::parse(a).ok()).collect(),
                        ),
                        _ => State::None,
                    };
                    (r.clone(), state)
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// True when a rule keeps state across records (worth rebuilding after a restart).
    pub fn is_stateful(&self) -> bool {
        self.rules
            .iter()
            .any(|(r, _)| matches!(r, RuleConfig::BulkAccess(_) | RuleConfig::Egress(_)))
    }

    /// The alerts one record raises.
    pub fn evaluate(&mut self, ev: &RecordEvent) -> Vec<Alert> {
        let mut out = Vec::new();
        let r = &*ev.record;
        let host = ev.host_id.as_str();
        let seq = ev.seq;
        for (rule, state) in &mut self.rules {
            let kind = rule.kind();
            match (rule, &r.event) {
                (RuleConfig::UnauthorizedAccess(u), Some(Kind::Open(o)))
                    if under(&o.path, &u.paths) =>
                {
                    let who = Who::of(r);
                    if u.users.contains(&who.account) || u.groups.contains(&who.group) {
                        continue;
                    }
                    let outcome = if o.outcome.as_ref().is_some_and(|x| x.success) {
                        "it succeeded"
                    } else {
                        "it was denied"
                    };
                    out.push(alert(
                        host,
                        kind,
                        seq,
                        format!(
                            "rule {:?}: {} opened {}, outside the allowed users and groups \
                             ({outcome})",
                            u.name,
                            who.describe(),
                            o.path
                        ),
                        evidence(&u.name, kind, Some(&who), &[(host, seq)]),
                    ));
                }
                (RuleConfig::UnattributedAccess(u), Some(Kind::Open(o)))
                    if under(&o.path, &u.paths) =>
                {
                    let who = Who::of(r);
                    if who.login.is_some() || u.except_users.contains(&who.account) {
                        continue;
                    }
                    out.push(alert(
                        host,
                        kind,
                        seq,
                        format!(
                            "rule {:?}: {} opened {} with no person behind it (login uid unset)",
                            u.name,
                            who.describe(),
                            o.path
                        ),
                        evidence(&u.name, kind, Some(&who), &[(host, seq)]),
                    ));
                }
                (RuleConfig::BulkAccess(b), Some(Kind::Open(o)))
                    if under(&o.path, &b.paths)
                        && o.outcome.as_ref().is_some_and(|x| x.success) =>
                {
                    let State::Bulk(windows) = state else {
                        continue;
                    };
                    let who = Who::of(r);
                    let now = crate::store::index::time_ns(r);
                    let window = windows
                        .entry((host.to_owned(), who.person().to_owned()))
                        .or_default();
                    let span = i64::try_from(b.window.0.as_nanos()).unwrap_or(i64::MAX);
                    window.opens.push_back((now, o.path.clone(), seq));
                    while window
                        .opens
                        .front()
                        .is_some_and(|(t, _, _)| now.saturating_sub(*t) > span)
                    {
                        window.opens.pop_front();
                    }
                    let mut first: BTreeMap<&str, u64> = BTreeMap::new();
                    for (_, p, s) in &window.opens {
                        first.entry(p.as_str()).or_insert(*s);
                    }
                    if first.len() > b.max_files {
                        let mut seqs: Vec<u64> = first.values().copied().collect();
                        seqs.sort_unstable();
                        let records: Vec<(&str, u64)> = seqs.iter().map(|s| (host, *s)).collect();
                        out.push(alert(
                            host,
                            kind,
                            seq,
                            format!(
                                "rule {:?}: {} opened {} distinct watched files within {}, more \
                                 than {}",
                                b.name,
                                who.describe(),
                                first.len(),
                                humantime::format_duration(b.window.0),
                                b.max_files
                            ),
                            evidence(&b.name, kind, Some(&who), &records),
                        ));
                        window.opens.clear();
                    }
                }
                (RuleConfig::Egress(e), Some(Kind::Open(o)))
                    if o.read
                        && under(&o.path, &e.paths)
                        && o.outcome.as_ref().is_some_and(|x| x.success) =>
                {
                    let State::Egress(readers, _) = state else {
                        continue;
                    };
                    let Some(pid) = r.process.as_ref().map(|p| p.pid) else {
                        continue;
                    };
                    if readers.len() >= MAX_READERS {
                        tracing::warn!(rule = %e.name, "too many processes to follow; starting over");
                        readers.clear();
                    }
                    let reads = readers
                        .entry((host.to_owned(), r.boot_id.clone(), pid))
                        .or_default();
                    if reads.len() < 16 {
                        reads.push((seq, o.path.clone()));
                    }
                }
                (RuleConfig::Egress(_), Some(Kind::Exit(_))) => {
                    let State::Egress(readers, _) = state else {
                        continue;
                    };
                    if let Some(pid) = r.process.as_ref().map(|p| p.pid) {
                        readers.remove(&(host.to_owned(), r.boot_id.clone(), pid));
                    }
                }
                (RuleConfig::Egress(e), Some(Kind::Connect(c)))
                    if c.family == AddressFamily::Inet as i32
                        || c.family == AddressFamily::Inet6 as i32 =>
                {
                    let State::Egress(readers, allow) = state else {
                        continue;
                    };
                    let Some(p) = r.process.as_ref() else {
                        continue;
                    };
                    let Some(reads) = readers.get(&(host.to_owned(), r.boot_id.clone(), p.pid))
                    else {
                        continue;
                    };
                    let Ok(ip) = c.address.parse::<IpAddr>() else {
                        continue;
                    };
                    if allow.iter().any(|n| n.contains(ip)) {
                        continue;
                    }
                    let who = Who::of(r);
                    let mut records: Vec<(&str, u64)> =
                        reads.iter().map(|(s, _)| (host, *s)).collect();
                    records.push((host, seq));
                    let mut ev = evidence(&e.name, kind, Some(&who), &records);
                    ev["address"] = json!(c.address);
                    ev["port"] = json!(c.port);
                    ev["files"] = json!(reads.iter().map(|(_, p)| p).collect::<BTreeSet<_>>());
                    out.push(alert(
                        host,
                        kind,
                        seq,
                        format!(
                            "rule {:?}: {} (pid {}) of {} read {} and connected to {}:{}, \
                             outside the allowed networks",
                            e.name,
                            p.comm,
                            p.pid,
                            who.describe(),
                            reads.first().map_or("", |(_, p)| p.as_str()),
                            c.address,
                            c.port
                        ),
                        ev,
                    ));
                }
                (RuleConfig::Ingress(i), Some(Kind::Accept(a)))
                    if i.ports.is_empty()
                        || u16::try_from(a.local_port).is_ok_and(|p| i.ports.contains(&p)) =>
                {
                    let State::Ingress(allow) = state else {
                        continue;
                    };
                    let Ok(ip) = a.remote_address.parse::<IpAddr>() else {
                        continue;
                    };
                    if allow.iter().any(|n| n.contains(ip)) {
                        continue;
                    }
                    let who = Who::of(r);
                    let (comm, pid) = r
                        .process
                        .as_ref()
                        .map_or((String::new(), 0), |p| (p.comm.clone(), p.pid));
                    let mut ev = evidence(&i.name, kind, Some(&who), &[(host, seq)]);
                    ev["remote_address"] = json!(a.remote_address);
                    ev["remote_port"] = json!(a.remote_port);
                    ev["local_port"] = json!(a.local_port);
                    out.push(alert(
                        host,
                        kind,
                        seq,
                        format!(
                            "rule {:?}: {comm} (pid {pid}) of {} accepted a connection from \
                             {}:{} on port {}, outside the allowed networks",
                            i.name,
                            who.describe(),
                            a.remote_address,
                            a.remote_port,
                            a.local_port
                        ),
                        ev,
                    ));
                }
                (RuleConfig::Gap(g), Some(Kind::Gap(gap))) => {
                    out.push(alert(
                        host,
                        kind,
                        seq,
                        format!(
                            "rule {:?}: {} events lost or cut on {host} ({:?}) after record {}",
                            g.name,
                            gap.count,
                            gap.reason(),
                            gap.first_seq
                        ),
                        evidence(&g.name, kind, None, &[(host, seq)]),
                    ));
                }
                _ => {}
            }
        }
        out
    }
}

/// The alert of a silent host (`last_record_ns` old by more than `deadline`).
pub fn silent_host(
    rule: &str,
    host: &str,
    head_seq: u64,
    last_record_ns: i64,
    deadline: Duration,
) -> Alert {
    let last = chrono::DateTime::from_timestamp_nanos(last_record_ns)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    alert(
        host,
        "silent-host",
        head_seq,
        format!(
            "rule {rule:?}: nothing from {host} since its record {head_seq} of {last} (deadline \
             {}): the agent stopped, the host is down or its records do not get through",
            humantime::format_duration(deadline)
        ),
        evidence(rule, "silent-host", None, &[(host, head_seq)]),
    )
}
