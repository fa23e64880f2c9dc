//! What the store indexes of a record (time, kind, who, which path, which login session), and
//! the per-session aggregates, both derived from the decoded record at ingest.

use std::collections::BTreeMap;

use phi_proto::v1::{Record, record::Event};

use super::Session;

/// The indexed columns of one record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Columns {
    pub time_ns: i64,
    pub kind: &'static str,
    pub uid: Option<i64>,
    pub user: Option<String>,
    pub login_user: Option<String>,
    pub session: Option<String>,
    pub path: Option<String>,
}

pub fn time_ns(r: &Record) -> i64 {
    r.time.as_ref().map_or(0, |t| {
        t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos)
    })
}

/// The id of a login session: `<host>/<first 8 characters of the boot id>/<audit session>`.
/// Audit session ids restart with each boot; the boot makes the id unique.
pub fn session_key(host_id: &str, boot_id: &str, audit_session: u32) -> String {
    let boot: String = boot_id.chars().filter(|c| *c != '-').take(8).collect();
    format!("{host_id}/{boot}/{audit_session}")
}

/// The session a record belongs to, if it has an audit session.
pub fn record_session(r: &Record) -> Option<(String, u32)> {
    let id = r.process.as_ref()?.identity.as_ref()?.audit_session?;
    (id != u32::MAX).then(|| (session_key(&r.host_id, &r.boot_id, id), id))
}

pub fn columns(r: &Record) -> Columns {
    let identity = r.process.as_ref().and_then(|p| p.identity.as_ref());
    let path = match &r.event {
        Some(Event::Open(o)) => Some(o.path.clone()),
        Some(Event::Exec(e)) => Some(e.exe.clone()),
        Some(Event::Connect(c)) if !c.unix_path.is_empty() => Some(c.unix_path.clone()),
        _ => None,
    }
    .filter(|p| !p.is_empty());
    Columns {
        time_ns: time_ns(r),
        kind: r.kind(),
        uid: identity.map(|i| i64::from(i.uid)),
        user: identity.map(|i| i.user.clone()).filter(|u| !u.is_empty()),
        login_user: identity
            .map(|i| i.login_user.clone())
            .filter(|u| !u.is_empty() && u != "unset"),
        session: record_session(r).map(|(k, _)| k),
        path,
    }
}

/// Session aggregates of a batch, to be merged into the stored ones.
#[derive(Default)]
pub struct SessionDeltas {
    pub sessions: BTreeMap<String, Session>,
}

impl SessionDeltas {
    /// Counts record `r` (with its columns `c`) into its session.
    pub fn add(&mut self, seq: u64, r: &Record, c: &Columns) {
        // The session column is the record's session key (see `columns`).
        let Some(key) = &c.session else {
            return;
        };
        let identity = r.process.as_ref().and_then(|p| p.identity.as_ref());
        if !self.sessions.contains_key(key) {
            self.sessions.insert(
                key.clone(),
                Session {
                    session: key.clone(),
                    host_id: r.host_id.clone(),
                    boot_id: r.boot_id.clone(),
                    audit_session: identity.and_then(|i| i.audit_session).unwrap_or_default(),
                    first_ns: c.time_ns,
                    last_ns: c.time_ns,
                    first_seq: seq,
                    last_seq: seq,
                    ..Default::default()
                },
            );
        }
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.user.is_empty()
            && let Some(i) = identity
        {
            s.user = match i.session.as_ref() {
                Some(ls) if !ls.user.is_empty() => ls.user.clone(),
                _ if i.login_user != "unset" => i.login_user.clone(),
                _ => String::new(),
            };
        }
        if let Some(ls) = identity.and_then(|i| i.session.as_ref())
            && s.kind.is_empty()
        {
            s.kind.clone_from(&ls.kind);
            s.source_address.clone_from(&ls.source_address);
            s.source_port = ls.source_port;
            s.tty.clone_from(&ls.tty);
            s.login_ns = ls.login_time.as_ref().map_or(0, |t| {
                t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos)
            });
        }
        s.first_ns = s.first_ns.min(c.time_ns);
        s.last_ns = s.last_ns.max(c.time_ns);
        s.first_seq = s.first_seq.min(seq);
        s.last_seq = s.last_seq.max(seq);
        s.records += 1;
        match &r.event {
            Some(Event::Open(o)) => {
                s.phi_accesses += 1;
                if !o.outcome.as_ref().is_some_and(|x| x.success) {
                    s.denied += 1;
                }
            }
            Some(Event::Exec(_)) => s.execs += 1,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use phi_proto::v1::{Identity, LoginSession, Open, Outcome, Process};

    use super::*;

    #[test]
    fn columns_and_sessions_come_from_the_record() {
        let r = Record {
            host_id: "db1".into(),
            boot_id: "a1a5aa6d-45cb-40bb-83c3-ed08790ebf8d".into(),
            process: Some(Process {
                identity: Some(Identity {
                    uid: 0,
                    user: "root".into(),
                    login_user: "alice".into(),
                    audit_session: Some(11),
                    session: Some(LoginSession {
                        kind: "ssh".into(),
                        user: "alice".into(),
                        source_address: "10.1.4.20".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            event: Some(Event::Open(Open {
                path: "/srv/ehr/a".into(),
                outcome: Some(Outcome {
                    success: false,
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let c = columns(&r);
        assert_eq!(c.kind, "open");
        assert_eq!(c.session.as_deref(), Some("db1/a1a5aa6d/11"));
        assert_eq!(c.login_user.as_deref(), Some("alice"));
        assert_eq!(c.path.as_deref(), Some("/srv/ehr/a"));
        let mut d = SessionDeltas::default();
        d.add(5, &r, &c);
        d.add(6, &r, &c);
        let s = &d.sessions["db1/a1a5aa6d/11"];
        assert_eq!((s.records, s.phi_accesses, s.denied), (2, 2, 2));
        assert_eq!((s.first_seq, s.last_seq), (5, 6));
        assert_eq!(s.source_address, "10.1.4.20");
    }
}
