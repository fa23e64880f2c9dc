//! Reading processes from /proc (start-up seeding, and processes the events have not shown).

use std::os::unix::ffi::OsStrExt as _;

use super::ProcessInfo;

/// Nanoseconds per clock tick (`sysconf(_SC_CLK_TCK)`).
fn ns_per_tick() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        1_000_000_000 / hz as u64
    } else {
        10_000_000
    }
}

/// Parses `/proc/<pid>/stat`: (ppid, start time in ticks). The command name may contain
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... starttime is field 22 of the line, index 19 here.
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((ppid, start))
}

/// Real and effective uid from `/proc/<pid>/status`.
fn parse_uids(status: &str) -> Option<(u32, u32)> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|v| v.parse::<u32>().ok());
    Some((ids.next()??, ids.next()??))
}

/// An audit id file (`loginuid`, `sessionid`): `None` for unset (`(u32)-1`).
fn audit_id(path: &str) -> Option<u32> {
    let v: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    (v != u32::MAX).then_some(v)
}

fn split_nul(bytes: &[u8]) -> Vec<Vec<u8>> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes.split(|b| *b == 0).map(<[u8]>::to_vec).collect()
}

/// Reads one process; `None` when it is gone.
pub fn read(pid: u32) -> Option<ProcessInfo> {
    let base = format!("/proc/{pid}");
    let stat = std::fs::read_to_string(format!("{base}/stat")).ok()?;
    let (ppid, start_ticks) = parse_stat(&stat)?;
    let link = |name: &str| {
        std::fs::read_link(format!("{base}/{name}"))
            .ok()
            .map(|p| p.as_os_str().as_bytes().to_vec())
    };
    let (uid, euid) = std::fs::read_to_string(format!("{base}/status"))
        .ok()
        .and_then(|s| parse_uids(&s))
        .unwrap_or_default();
    let env = split_nul(&std::fs::read(format!("{base}/environ")).unwrap_or_default());
    let comm = std::fs::read(format!("{base}/comm")).unwrap_or_default();
    Some(ProcessInfo {
        ppid,
        start_ns: start_ticks * ns_per_tick(),
        exe: link("exe"),
        argv: split_nul(&std::fs::read(format!("{base}/cmdline")).unwrap_or_default()),
        argv_truncated: false,
        cwd: link("cwd"),
        comm: comm.strip_suffix(b"\n").unwrap_or(&comm).to_vec(),
        uid,
        euid,
        loginuid: audit_id(&format!("{base}/loginuid")),
        sessionid: audit_id(&format!("{base}/sessionid")),
        ssh_connection: super::env_value(&env, "SSH_CONNECTION"),
        ssh_tty: super::env_value(&env, "SSH_TTY"),
        exited: false,
    })
}

/// Every process visible now.
pub fn scan() -> Vec<(u32, ProcessInfo)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, read(pid)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let line = "42 (a (b) c) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 1 2 3";
        assert_eq!(parse_stat(line), Some((7, 12345)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn parses_uids() {
        assert_eq!(
            parse_uids("Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\n"),
            Some((1000, 0))
        );
    }
}
