//! Readable output: tables a compliance officer can read (times in UTC), and the words that
//! go in them (who, from where, what, which target, outcome).

use phi_proto::{
    Timestamp,
    v1::{AddressFamily, GapReason, Record, StoredRecord, agent_lifecycle::Phase, record::Event},
};

/// A plain text table: a header and rows, columns padded to their widest cell.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |cells: &[String], out: &mut String| {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate().take(n) {
                if i + 1 == n {
                    l.push_str(c);
                } else {
                    l.push_str(c);
                    l.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&self.header, &mut out);
        for r in &self.rows {
            line(r, &mut out);
        }
        out
    }
}

pub fn time(t: Option<&Timestamp>) -> String {
    match t {
        Some(t) if t.seconds != 0 || t.nanos != 0 => {
            chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
                .map(|d| d.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
                .unwrap_or_else(|| "?".into())
        }
        _ => "-".into(),
    }
}

pub fn short_time(t: Option<&Timestamp>) -> String {
    match t {
        Some(t) if t.seconds != 0 => chrono::DateTime::from_timestamp(t.seconds, 0)
            .map(|d| d.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_else(|| "?".into()),
        _ => "-".into(),
    }
}

/// The person, and the account they acted as: "alice", "alice as root", "root (no login)".
pub fn who(r: &Record) -> String {
    let Some(i) = r.process.as_ref().and_then(|p| p.identity.as_ref()) else {
        return "-".into();
    };
    let user = if i.user.is_empty() {
        format!("#{}", i.uid)
    } else {
        i.user.clone()
    };
    let login = (!i.login_user.is_empty() && i.login_user != "unset").then_some(&i.login_user);
    match login {
        Some(l) if *l == user => user,
        Some(l) => {
            let via = i
                .chain
                .iter()
                .skip(1)
                .map(|c| c.via.as_str())
                .filter(|v| !v.is_empty())
                .collect::<Vec<_>>()
                .join(",");
            if via.is_empty() {
                format!("{l} as {user}")
            } else {
                format!("{l} as {user} ({via})")
            }
        }
        None => format!("{user} (no login)"),
    }
}

/// Where the actor came from: the ssh client, the terminal, or the container.
pub fn from(r: &Record) -> String {
    let Some(p) = r.process.as_ref() else {
        return "-".into();
    };
    if let Some(s) = p.identity.as_ref().and_then(|i| i.session.as_ref()) {
        if !s.source_address.is_empty() {
            return if s.source_port > 0 {
                if s.source_address.contains(':') {
                    format!("ssh [{}]:{}", s.source_address, s.source_port)
                } else {
                    format!("ssh {}:{}", s.source_address, s.source_port)
                }
            } else {
                format!("ssh {}", s.source_address)
            };
        }
        if !s.tty.is_empty() {
            return format!(
                "{} {}",
                if s.kind.is_empty() { "tty" } else { &s.kind },
                s.tty
            );
        }
        if !s.kind.is_empty() {
            return s.kind.clone();
        }
    }
    if let Some(c) = p.container.as_ref() {
        if !c.pod_name.is_empty() {
            return format!("pod {}/{}", c.pod_namespace, c.pod_name);
        }
        if !c.id.is_empty() {
            return format!("container {}", &c.id[..c.id.len().min(12)]);
        }
    }
    "-".into()
}

fn program(r: &Record) -> String {
    r.process.as_ref().map_or_else(String::new, |p| {
        if p.comm.is_empty() {
            p.exe.rsplit('/').next().unwrap_or_default().to_owned()
        } else {
            p.comm.clone()
        }
    })
}

/// "open by cat", "exec", "connect by curl", "gap", ...
pub fn what(r: &Record) -> String {
    let kind = r.kind();
    match &r.event {
        Some(Event::Exec(_) | Event::Gap(_) | Event::Heartbeat(_) | Event::Agent(_)) => {
            kind.to_owned()
        }
        Some(Event::ConfigChange(_)) => "config".into(),
        _ => {
            let p = program(r);
            if p.is_empty() {
                kind.to_owned()
            } else {
                format!("{kind} by {p}")
            }
        }
    }
}

fn clip(s: String, max: usize) -> String {
    if s.chars().count() <= max {
        s
    } else {
        let mut c: String = s.chars().take(max.saturating_sub(1)).collect();
        c.push('…');
        c
    }
}

/// The file, program or address the record is about.
pub fn target(r: &Record) -> String {
    match &r.event {
        Some(Event::Open(o)) => {
            let mode = match (o.read, o.write) {
                (true, true) => "rw",
                (false, true) => "w",
                _ => "r",
            };
            let mut flags = vec![mode];
            if o.create {
                flags.push("create");
            }
            if o.truncate {
                flags.push("trunc");
            }
            format!("{} [{}]", o.path, flags.join(","))
        }
        Some(Event::Exec(e)) => {
            let args = if e.argv.is_empty() {
                e.exe.clone()
            } else {
                e.argv.join(" ")
            };
            clip(format!("{} : {}", e.exe, args), 120)
        }
        Some(Event::Connect(c)) => {
            if !c.unix_path.is_empty() {
                format!("unix {}", c.unix_path)
            } else if c.family == AddressFamily::Inet6 as i32 {
                format!("[{}]:{}", c.address, c.port)
            } else {
                format!("{}:{}", c.address, c.port)
            }
        }
        Some(Event::Accept(a)) if a.family == AddressFamily::Inet6 as i32 => format!(
            "from [{}]:{} on port {}",
            a.remote_address, a.remote_port, a.local_port
        ),
        Some(Event::Accept(a)) => format!(
            "from {}:{} on port {}",
            a.remote_address, a.remote_port, a.local_port
        ),
        Some(Event::Gap(g)) => {
            let reason = GapReason::try_from(g.reason)
                .map(|r| {
                    r.as_str_name()
                        .trim_start_matches("GAP_REASON_")
                        .to_lowercase()
                        .replace('_', " ")
                })
                .unwrap_or_else(|_| "unknown".into());
            format!("{} lost or shortened: {reason}", g.count)
        }
        Some(Event::Agent(a)) => {
            let phase = match Phase::try_from(a.phase) {
                Ok(Phase::Start) => "agent started",
                Ok(Phase::Stop) => "agent stopped",
                _ => "agent",
            };
            if a.reason.is_empty() {
                phase.to_owned()
            } else {
                format!("{phase} ({})", a.reason)
            }
        }
        Some(Event::ConfigChange(c)) => {
            let mut parts = Vec::new();
            if !c.watch_added.is_empty() {
                parts.push(format!("watch + {}", c.watch_added.join(", ")));
            }
            if !c.watch_removed.is_empty() {
                parts.push(format!("watch - {}", c.watch_removed.join(", ")));
            }
            if parts.is_empty() {
                "configuration reloaded".into()
            } else {
                parts.join("; ")
            }
        }
        Some(Event::Heartbeat(_)) => "alive".into(),
        Some(Event::Exit(x)) => match (x.status, x.signal) {
            (_, Some(sig)) => format!("killed by signal {sig}"),
            (Some(st), None) => format!("status {st}"),
            _ => String::new(),
        },
        None => String::new(),
    }
}

pub fn outcome(r: &Record) -> String {
    let o = match &r.event {
        Some(Event::Open(o)) => o.outcome.as_ref(),
        Some(Event::Connect(c)) => {
            if c.in_progress {
                return "in progress".into();
            }
            c.outcome.as_ref()
        }
        Some(Event::Exec(_)) => return "ok".into(),
        _ => return String::new(),
    };
    match o {
        Some(o) if o.success => "ok".into(),
        Some(o) if !o.errno.is_empty() => format!("denied/failed {}", o.errno),
        Some(o) => format!("failed {}", o.ret),
        None => String::new(),
    }
}

/// The timeline table.
pub fn timeline(rows: &[StoredRecord], with_host: bool) -> String {
    let mut header = vec!["TIME (UTC)"];
    if with_host {
        header.push("HOST");
    }
    header.extend(["SEQ", "WHO", "FROM", "WHAT", "TARGET", "OUTCOME"]);
    let mut t = Table::new(&header);
    for s in rows {
        let Some(r) = s.record.as_ref() else { continue };
        let mut cells = vec![time(r.time.as_ref())];
        if with_host {
            cells.push(s.host_id.clone());
        }
        cells.extend([
            s.seq.to_string(),
            who(r),
            from(r),
            what(r),
            target(r),
            outcome(r),
        ]);
        t.row(cells);
    }
    t.render()
}

/// One line of a session transcript.
pub fn transcript_line(s: &StoredRecord) -> String {
    let Some(r) = s.record.as_ref() else {
        return String::new();
    };
    let mut line = format!(
        "{}  #{:<6} {:<22} {:<18} {}",
        time(r.time.as_ref()),
        s.seq,
        who(r),
        what(r),
        target(r)
    );
    let o = outcome(r);
    if !o.is_empty() && o != "ok" {
        line.push_str(&format!("  ({o})"));
    }
    line
}

#[cfg(test)]
mod tests {
    use phi_proto::v1::{ChainLink, Identity, LoginSession, Open, Outcome, Process};

    use super::*;

    #[test]
    fn says_who_from_where_what_and_how_it_ended() {
        let r = Record {
            process: Some(Process {
                comm: "cat".into(),
                identity: Some(Identity {
                    user: "root".into(),
                    login_user: "alice".into(),
                    chain: vec![
                        ChainLink {
                            user: "alice".into(),
                            via: "login".into(),
                            ..Default::default()
                        },
                        ChainLink {
                            user: "root".into(),
                            via: "sudo".into(),
                            ..Default::default()
                        },
                    ],
                    session: Some(LoginSession {
                        kind: "ssh".into(),
                        source_address: "10.1.4.20".into(),
                        source_port: 51514,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            event: Some(Event::Open(Open {
                path: "/srv/ehr/a.json".into(),
                read: true,
                outcome: Some(Outcome {
                    success: false,
                    ret: -13,
                    errno: "EACCES".into(),
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(who(&r), "alice as root (sudo)");
        assert_eq!(from(&r), "ssh 10.1.4.20:51514");
        assert_eq!(what(&r), "open by cat");
        assert_eq!(target(&r), "/srv/ehr/a.json [r]");
        assert_eq!(outcome(&r), "denied/failed EACCES");
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["xx".into(), "y".into()]);
        assert_eq!(t.render(), "A   B\nxx  y\n");
    }

    #[test]
    fn an_accept_names_the_remote_end_and_the_local_port() {
        let accept = |family: AddressFamily, remote: &str| Record {
            event: Some(Event::Accept(phi_proto::v1::Accept {
                family: family as i32,
                remote_address: remote.into(),
                remote_port: 51514,
                local_port: 5432,
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(
            target(&accept(AddressFamily::Inet, "10.1.4.20")),
            "from 10.1.4.20:51514 on port 5432"
        );
        assert_eq!(
            target(&accept(AddressFamily::Inet6, "fd00::7")),
            "from [fd00::7]:51514 on port 5432"
        );
    }
}
