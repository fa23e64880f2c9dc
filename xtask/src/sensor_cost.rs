//! `cargo xtask kernel-matrix --sensor-cost` (and a section of `cargo xtask bench`): what the
//! agent's sensors cost a workload on a kernel that allows `fexit`, where the agent can pick
//! either kind.
//!
//! The host's kernel may refuse `fexit`, so the measurement runs in the newest kernel of the
//! matrix that allows it ([`KERNELS`] with `fexit: true`), under qemu with instruction counting
//! (`-icount shift=0`, one vCPU): the guest's clock advances one nanosecond per instruction,
//! so a run's time counts the instructions the whole guest executed, independent of the load
//! of the machine running qemu. The guest runs a one-byte `pread` loop (a system call the
//! agent does not watch) and the open/close loops of `cargo xtask bench` (outside and inside
//! the watched tree) with no agent, with the agent on tracepoints (`--sensors tracepoints`)
//! and with its automatic choice (`--sensors auto`, which must pick `fexit` for every group
//! there), a fresh agent per mode and round, the modes in a rotating order.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    bench::median,
    bench_load::Workload,
    cmd,
    kernel_matrix::{
        KERNELS, build_initramfs, fetch_busybox, fetch_kernel, own_copy, qemu, resolve,
    },
};

/// The agent modes compared, in the order of the report.
pub const MODES: [(&str, &str); 3] = [
    ("none", "no agent"),
    (
        "tracepoints",
        "phi-agent, tracepoints (`--sensors tracepoints`)",
    ),
    ("auto", "phi-agent, fexit (`--sensors auto`)"),
];

/// The workloads measured.
pub const WORKLOADS: [Workload; 3] = [Workload::Pread, Workload::OpenOutside, Workload::OpenInside];

/// The guest's driver (busybox sh). Environment: `AGENT`, `LOAD` (this program, for its
/// `bench-worker`), `WORK`; rounds and operations come from `phi.sensor_cost=R,N` on the
/// kernel command line.
const DRIVER: &str = r#"#!/bin/sh
set -u
set -- $(sed -n 's/.*phi\.sensor_cost=\([0-9]*\),\([0-9]*\).*/\1 \2/p' /proc/cmdline)
ROUNDS=$1
OPS=$2
W="$WORK"
mkdir -p "$W/watched" "$W/outside"
echo '{"synthetic":true}' > "$W/watched/record.json"
echo '{"synthetic":true}' > "$W/outside/record.json"
fail() { echo "PHI-SENSOR-COST-ERROR $*"; exit 0; }
# The inside workload last: the agent shares the guest's one CPU and seals that workload's
# records partly after it ended, which must not be counted into the next run.
WORKLOADS="pread open-outside open-inside"
# The guest settles first (the kernel finishes deferred work in the first seconds after
# boot, which would be counted into the first runs), then one unmeasured run of each.
sleep 10
for wl in $WORKLOADS; do
    "$LOAD" bench-worker --workload "$wl" --ops "$OPS" --dir "$W" --cpu 0 > /dev/null \
        || fail "the $wl workload failed"
done
start() {
    ERR="$W/err-$1"
    "$AGENT" run --stdout --watch "$W/watched" --state-dir "$W/state-$1" \
        --metrics-listen off --sensors "$1" > /dev/null 2> "$ERR" &
    PID=$!
    i=0
    while ! grep -q 'INFO recording' "$ERR" 2>/dev/null; do
        kill -0 "$PID" 2>/dev/null \
            || fail "the agent (--sensors $1) stopped: $(tail -n 3 "$ERR" | tr '\n' ' ' | cut -c 1-600)"
        i=$((i + 1))
        [ "$i" -le 1200 ] || fail "the agent (--sensors $1) did not start within 120 s"
        sleep 0.1
    done
    # The agent finishes its start (the process table, its first checkpoint) on the same
    # vCPU after it says it is recording: not the workload's cost.
    sleep 3
}
stop() {
    kill -TERM "$PID"
    wait "$PID"
    # The inside workload fills the spool: keep the guest's memory for the next run.
    rm -rf "$W/state-$1"
}
r=1
while [ "$r" -le "$ROUNDS" ]; do
    case $((r % 3)) in
        1) order="none tracepoints auto" ;;
        2) order="tracepoints auto none" ;;
        *) order="auto none tracepoints" ;;
    esac
    for m in $order; do
        [ "$m" = none ] || start "$m"
        for wl in $WORKLOADS; do
            j=$("$LOAD" bench-worker --workload "$wl" --ops "$OPS" --dir "$W" --cpu 0) \
                || fail "the $wl workload failed"
            echo "PHI-SENSOR-COST $m $wl $r $j"
        done
        [ "$m" = none ] || stop "$m"
    done
    r=$((r + 1))
done
fell=$(grep 'served by the sys_exit tracepoint' "$W/err-auto" | head -n 1 | cut -c 1-400)
[ -z "$fell" ] || fail "--sensors auto did not use fexit for every group: $fell"
echo "PHI-SENSOR-COST-DONE"
"#;

/// One run: mode, workload, round, nanoseconds per operation.
pub struct Sample {
    pub mode: String,
    pub workload: String,
    pub round: u32,
    pub ns_per_op: f64,
}

pub struct Report {
    pub kernel: &'static str,
    pub package: String,
    pub release: String,
    pub rounds: u32,
    pub ops: u64,
    pub samples: Vec<Sample>,
}

/// Boots the newest `fexit` kernel of the matrix with the sensor-cost driver and collects its
/// samples. `agent` is the release agent.
pub fn measure(agent: &Path, rounds: u32, ops: u64) -> anyhow::Result<Report> {
    let kernel = KERNELS
        .iter()
        .rev()
        .find(|k| k.fexit)
        .context("the kernel list has no kernel that allows fexit")?;
    let dir = cmd::workspace_root().join("target/kernel-matrix");
    fs::create_dir_all(dir.join("logs"))?;
    let (images, busybox_version) = resolve(&[kernel])?;
    let image = images.first().context("no image resolved")?;
    let busybox = fetch_busybox(&dir, &busybox_version)?;
    let boot = fetch_kernel(&dir, image)?;
    let me = own_copy(&dir)?;
    let initrd = build_initramfs(&dir, agent, &busybox, &me, Some(DRIVER))?;
    let append = format!(
        "console=ttyS0 panic=-1 quiet lsm={} phi.sensor_cost={rounds},{ops}",
        boot.lsm()
    );
    let log = dir.join("logs").join("sensor-cost.log");
    let mut child = qemu("tcg", 1, &boot, &initrd, &append)
        .args(["-icount", "shift=0"])
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu has no output pipe")?;
    let (tx, rx) = mpsc::channel();
    let log_path = log.clone();
    let reader = std::thread::spawn(move || {
        let mut file = fs::File::create(&log_path).ok();
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_owned();
            if let Some(f) = file.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            lines.push(line);
        }
        let _ = tx.send(());
        lines
    });
    // A run of the slowest mode takes about a second per 10,000 operations under TCG, and an
    // agent start a few seconds.
    let limit = Duration::from_secs(120 + u64::from(rounds) * (30 + ops / 1_000));
    let started = Instant::now();
    if rx.recv_timeout(limit).is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let lines = reader.join().unwrap_or_default();
    let mut report = Report {
        kernel: kernel.name,
        package: format!("{} {}", image.package, image.version),
        release: String::new(),
        rounds,
        ops,
        samples: Vec::new(),
    };
    let mut done = false;
    for line in &lines {
        if let Some(rest) = line.split("PHI-MATRIX-BOOTED ").nth(1) {
            report.release = rest.split_whitespace().next().unwrap_or("").to_owned();
        } else if let Some(err) = line.strip_prefix("PHI-SENSOR-COST-ERROR ") {
            bail!(
                "sensor cost on {}: {err} (log: {})",
                kernel.name,
                log.display()
            );
        } else if line.starts_with("PHI-SENSOR-COST-DONE") {
            done = true;
        } else if let Some(rest) = line.strip_prefix("PHI-SENSOR-COST ") {
            report.samples.push(
                parse_sample(rest).with_context(|| {
                    format!("unreadable sample {rest:?} (log: {})", log.display())
                })?,
            );
        }
    }
    if !done {
        bail!(
            "sensor cost on {}: the guest stopped after {:.0} s without finishing (limit {} s; \
             log: {})",
            kernel.name,
            started.elapsed().as_secs_f64(),
            limit.as_secs(),
            log.display()
        );
    }
    Ok(report)
}

fn parse_sample(rest: &str) -> anyhow::Result<Sample> {
    let mut parts = rest.splitn(4, ' ');
    let (Some(mode), Some(workload), Some(round), Some(json)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("expected: mode workload round json");
    };
    let v: Value = serde_json::from_str(json)?;
    Ok(Sample {
        mode: mode.to_owned(),
        workload: workload.to_owned(),
        round: round.parse()?,
        ns_per_op: v["ns_per_op"].as_f64().context("no ns_per_op")?,
    })
}

impl Report {
    /// Costs of `mode` on `workload`, by round.
    fn runs(&self, mode: &str, workload: &str) -> Vec<(u32, f64)> {
        self.samples
            .iter()
            .filter(|s| s.mode == mode && s.workload == workload)
            .map(|s| (s.round, s.ns_per_op))
            .collect()
    }

    /// Median over rounds of `mode`'s cost divided by `base`'s in the same round.
    pub fn ratio(&self, mode: &str, base: &str, workload: &str) -> f64 {
        let base = self.runs(base, workload);
        median(
            self.runs(mode, workload)
                .iter()
                .filter_map(|(r, ns)| base.iter().find(|(b, _)| b == r).map(|(_, b)| ns / b))
                .collect(),
        )
    }

    /// The Markdown section (table and how it was measured).
    pub fn markdown(&self) -> String {
        let mut o = format!(
            "Measured in the {} kernel ({}, release {}) booted under qemu with software \
             emulation and instruction counting (TCG, `-icount shift=0`, one vCPU), because \
             this machine's kernel refuses `fexit`: {} round(s) of {} operations per run after \
             one unmeasured run of each workload, a fresh agent per mode and round, the modes \
             in a rotating order; medians over rounds, ratios to no agent in the same round. \
             The guest clock advances one nanosecond per guest instruction, so \"ns\" here \
             counts instructions of the whole guest (agent included), not a host's time. The \
             agent writes every record to its spool and as JSON to /dev/null.\n\n",
            self.kernel, self.package, self.release, self.rounds, self.ops
        );
        o.push_str("| workload |");
        for (_, label) in MODES {
            o.push_str(&format!(" {label} |"));
        }
        o.push_str(" fexit ÷ tracepoints |\n| --- |");
        for _ in 0..=MODES.len() {
            o.push_str(" ---: |");
        }
        o.push('\n');
        for wl in WORKLOADS {
            o.push_str(&format!("| {} |", wl.name()));
            for (mode, _) in MODES {
                let ns = median(
                    self.runs(mode, wl.arg())
                        .into_iter()
                        .map(|(_, ns)| ns)
                        .collect(),
                );
                if mode == "none" {
                    o.push_str(&format!(" {ns:.0} ns |"));
                } else {
                    o.push_str(&format!(
                        " {ns:.0} ns ({:.2}×) |",
                        self.ratio(mode, "none", wl.arg())
                    ));
                }
            }
            o.push_str(&format!(
                " {:.2} |\n",
                self.ratio("auto", "tracepoints", wl.arg())
            ));
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_pair_runs_of_the_same_round() {
        let json = |ns: f64| format!("{{\"ops\":10,\"seconds\":1.0,\"ns_per_op\":{ns}}}");
        let mut samples = Vec::new();
        for (round, none, tp, auto) in [(1, 100.0, 150.0, 120.0), (2, 200.0, 300.0, 220.0)] {
            for (mode, ns) in [("none", none), ("tracepoints", tp), ("auto", auto)] {
                samples.push(
                    parse_sample(&format!("{mode} open-outside {round} {}", json(ns)))
                        .expect("a well-formed sample"),
                );
            }
        }
        let report = Report {
            kernel: "k",
            package: "p".into(),
            release: "r".into(),
            rounds: 2,
            ops: 10,
            samples,
        };
        // Round ratios 1.5 and 1.5; 1.2 and 1.1.
        assert!((report.ratio("tracepoints", "none", "open-outside") - 1.5).abs() < 1e-9);
        assert!((report.ratio("auto", "none", "open-outside") - 1.15).abs() < 1e-9);
        let md = report.markdown();
        assert!(md.contains("| open/close outside the watched tree | 150 ns | 225 ns (1.50×) |"));
        assert!(parse_sample("auto open-outside x {}").is_err());
    }
}
