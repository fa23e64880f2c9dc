//! The standard process metrics, read from `/proc/self` at scrape time.

use std::fmt::Write as _;

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn page_size() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as f64 } else { 4096.0 }
}

/// Fields of /proc/self/stat after the command name (field 3 onwards).
fn stat_fields() -> Option<Vec<String>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

pub fn render() -> String {
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    if let Some(f) = stat_fields() {
        // utime, stime: fields 14, 15; starttime: 22; vsize: 23; rss: 24 (1-based).
        let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (field(14), field(15)) {
            put(
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                (u + s) / ticks_per_second(),
            );
        }
        if let Some(rss) = field(24) {
            put(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                rss * page_size(),
            );
        }
        if let Some(vsize) = field(23) {
            put(
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                vsize,
            );
        }
        if let (Some(start), Some(btime)) = (field(22), boot_time()) {
            put(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                btime + start / ticks_per_second(),
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        put(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    out
}
