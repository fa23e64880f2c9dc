//! Login sessions, keyed by audit session id: who logged in, how (ssh, console, cron), from
//! which address and port, on which tty, when.
//!
//! The session's leader is the topmost process of the parent chain that still carries the
//! session id (for ssh, the sshd process that ran `pam_loginuid`). For ssh the client address
//! comes from that sshd's TCP connection (`/proc/<pid>/net/tcp*` matched by socket inode),
//! which the logged-in user cannot change; `SSH_CONNECTION` from the session's environment is
//! the fallback when the socket cannot be read.

use std::{
    collections::{HashMap, VecDeque},
    net::{Ipv4Addr, Ipv6Addr},
};

use phi_proto::v1 as pb;

use super::names::NameCache;
use crate::{
    clock::Clock,
    process::{ProcessInfo, ProcessTable},
};

/// Sessions remembered at once.
const KEPT: usize = 4096;
/// Discovery attempts for a session whose source could not be found yet.
const ATTEMPTS: u8 = 5;

/// A TCP connection from /proc/<pid>/net/tcp*.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConn {
    pub local: (String, u16),
    pub remote: (String, u16),
}

struct Known {
    session: pb::LoginSession,
    complete: bool,
    attempts: u8,
}

#[derive(Default)]
pub struct Sessions {
    known: HashMap<u32, Known>,
    order: VecDeque<u32>,
}

fn basename(path: &[u8]) -> String {
    let name = path.rsplit(|b| *b == b'/').next().unwrap_or(path);
    String::from_utf8_lossy(name).into_owned()
}

/// The program name of a process: its executable's file name, else its comm.
pub fn program(p: &ProcessInfo) -> String {
    match &p.exe {
        Some(exe) => basename(exe),
        None => String::from_utf8_lossy(&p.comm).into_owned(),
    }
}

fn kind_of(leader: &ProcessInfo) -> &'static str {
    let prog = program(leader);
    let comm = String::from_utf8_lossy(&leader.comm);
    match prog.as_str() {
        "sshd" | "sshd-session" => "ssh",
        _ if comm.starts_with("sshd") => "ssh",
        "login" | "agetty" | "getty" => "console",
        "cron" | "crond" | "atd" | "anacron" => "cron",
        _ => "other",
    }
}

/// Parses one address of /proc/net/tcp (`0100007F:0016`) or tcp6 (32 hex digits).
fn parse_addr(field: &str) -> Option<(String, u16)> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => Ipv4Addr::from(u32::from_str_radix(addr, 16).ok()?.swap_bytes()).to_string(),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in addr.as_bytes().chunks(8).enumerate() {
                let word = u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
            }
            let v6 = Ipv6Addr::from(bytes);
            match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => v6.to_string(),
            }
        }
        _ => return None,
    };
    Some((ip, port))
}

/// Established TCP connections in a /proc/net/tcp-format table, by socket inode.
pub fn parse_tcp_table(text: &str) -> HashMap<u64, TcpConn> {
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "01" {
            continue;
        }
        let (Some(local), Some(remote), Ok(inode)) =
            (parse_addr(f[1]), parse_addr(f[2]), f[9].parse::<u64>())
        else {
            continue;
        };
        out.insert(inode, TcpConn { local, remote });
    }
    out
}

/// The established TCP connection a process holds, if any.
pub fn tcp_connection_of(pid: u32) -> Option<TcpConn> {
    let inodes: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        let conns = parse_tcp_table(&text);
        if let Some(c) = inodes.iter().find_map(|i| conns.get(i)) {
            return Some(c.clone());
        }
    }
    None
}

/// `SSH_CONNECTION` ("client port server port") as (client, client port, server port).
fn parse_ssh_connection(v: &str) -> Option<(String, u32, u32)> {
    let f: Vec<&str> = v.split_whitespace().collect();
    if f.len() != 4 {
        return None;
    }
    Some((f[0].to_owned(), f[1].parse().ok()?, f[3].parse().ok()?))
}

/// The terminal of a process from /proc/<pid>/stat (`tty_nr`).
fn tty_of(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let tty_nr: u32 = rest.split_whitespace().nth(4)?.parse().ok()?;
    if tty_nr == 0 {
        return None;
    }
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    Some(match major {
        136..=143 => format!("pts/{}", (major - 136) * 256 + minor),
        4 if minor < 64 => format!("tty{minor}"),
        4 => format!("ttyS{}", minor - 64),
        _ => format!("{major}:{minor}"),
    })
}

impl Sessions {
    /// The login session `sessionid` that process `pid` belongs to.
    pub fn lookup(
        &mut self,
        sessionid: u32,
        pid: u32,
        processes: &mut ProcessTable,
        names: &mut NameCache,
        clock: &Clock,
    ) -> Option<pb::LoginSession> {
        if let Some(k) = self.known.get(&sessionid)
            && (k.complete || k.attempts >= ATTEMPTS)
        {
            return Some(k.session.clone());
        }
        let (session, complete) = discover(sessionid, pid, processes, names, clock)?;
        let attempts = self.known.get(&sessionid).map_or(0, |k| k.attempts) + 1;
        if !self.known.contains_key(&sessionid) {
            self.order.push_back(sessionid);
            if self.order.len() > KEPT
                && let Some(old) = self.order.pop_front()
            {
                self.known.remove(&old);
            }
        }
        self.known.insert(
            sessionid,
            Known {
                session: session.clone(),
                complete,
                attempts,
            },
        );
        Some(session)
    }
}

/// Finds the session's leader and what can be learned about it; the bool says whether the
/// answer is final.
fn discover(
    sessionid: u32,
    pid: u32,
    processes: &mut ProcessTable,
    names: &mut NameCache,
    clock: &Clock,
) -> Option<(pb::LoginSession, bool)> {
    let me = processes.get(pid)?.clone();
    let (ancestors, _) = processes.ancestors(pid, 64);
    // The run of processes, from `pid` upward, that carry the session id.
    let mut run: Vec<(u32, ProcessInfo)> = vec![(pid, me)];
    for (apid, a) in ancestors {
        if a.sessionid != Some(sessionid) {
            break;
        }
        run.push((apid, a));
    }
    let (leader_pid, leader) = run.last()?.clone();
    let login_uid = run.iter().find_map(|(_, p)| p.loginuid);
    let kind = kind_of(&leader);
    let mut session = pb::LoginSession {
        id: sessionid,
        kind: kind.into(),
        user: login_uid.map_or_else(|| "unset".into(), |u| names.user(u)),
        login_uid: login_uid.unwrap_or(u32::MAX),
        leader_pid,
        leader_exe: leader
            .exe
            .as_deref()
            .map(crate::text::escape_bytes)
            .unwrap_or_default(),
        login_time: (leader.start_ns != 0).then(|| clock.timestamp(leader.start_ns)),
        ..Default::default()
    };
    session.tty = run
        .iter()
        .find_map(|(_, p)| p.ssh_tty.clone())
        .map(|t| t.trim_start_matches("/dev/").to_owned())
        .or_else(|| run.iter().find_map(|(p, _)| tty_of(*p)))
        .unwrap_or_default();
    if kind != "ssh" {
        return Some((session, true));
    }
    // The connection: from the sshd processes of the session (the leader, or the sshd child
    // that serves the user), top down.
    let sshd_pids: Vec<u32> = run
        .iter()
        .rev()
        .filter(|(_, p)| kind_of(p) == "ssh")
        .map(|(p, _)| *p)
        .collect();
    if let Some(conn) = sshd_pids.iter().find_map(|p| tcp_connection_of(*p)) {
        session.source_address = conn.remote.0;
        session.source_port = u32::from(conn.remote.1);
        session.local_port = u32::from(conn.local.1);
        session.source_from = "socket".into();
        return Some((session, true));
    }
    if let Some((addr, port, local)) = run
        .iter()
        .rev()
        .find_map(|(_, p)| p.ssh_connection.as_deref().and_then(parse_ssh_connection))
    {
        session.source_address = addr;
        session.source_port = port;
        session.local_port = local;
        session.source_from = "environment".into();
    }
    Some((session, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:0016 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4243 1\n";
        let t = parse_tcp_table(v4);
        assert_eq!(t.len(), 1, "only established connections");
        let c = &t[&4242];
        assert_eq!(c.local, ("127.0.0.1".to_owned(), 22));
        assert_eq!(c.remote, ("127.0.0.1".to_owned(), 50000));
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:0016 00000000000000000000000001000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 99 1\n";
        let c = &parse_tcp_table(v6)[&99];
        assert_eq!(c.remote, ("::1".to_owned(), 54321));
        let mapped = "h\n 0: 0000000000000000FFFF00000100007F:0016 0000000000000000FFFF00000100007F:D431 01 0 0 0 0 0 7 1\n";
        assert_eq!(parse_tcp_table(mapped)[&7].remote.0, "127.0.0.1");
    }

    #[test]
    fn reads_ssh_connection() {
        assert_eq!(
            parse_ssh_connection("127.0.0.1 50000 127.0.0.1 2222"),
            Some(("127.0.0.1".into(), 50000, 2222))
        );
        assert_eq!(parse_ssh_connection("garbage"), None);
    }
}
