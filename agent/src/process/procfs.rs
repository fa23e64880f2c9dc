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

/// Reads one process; `None` when it is gone.
pub fn read(pid: u32) -> Option<ProcessInfo> {
    let base = format!("/proc/{pid}");
    let stat = std::fs::read_to_string(format!("{base}/stat")).ok()?;
    let (ppid, start_ticks) = parse_stat(&stat)?;
    let exe = std::fs::read_link(format!("{base}/exe"))
        .ok()
        .map(|p| p.as_os_str().as_bytes().to_vec());
    let cmdline = std::fs::read(format!("{base}/cmdline")).unwrap_or_default();
    let cmdline = cmdline.strip_suffix(&[0]).unwrap_or(&cmdline);
    let argv = if cmdline.is_empty() {
        Vec::new()
    } else {
        cmdline.split(|b| *b == 0).map(<[u8]>::to_vec).collect()
    };
    Some(ProcessInfo {
        ppid,
        start_ns: start_ticks * ns_per_tick(),
        exe,
        argv,
        argv_truncated: false,
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
}
