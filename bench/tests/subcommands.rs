//! Every subcommand on a tiny dataset: one JSON object on stdout, of the documented shape,
//! with positive numbers. Wire mode needs `phi-collector` and `phictl`: from
//! `PHI_COLLECTOR_BIN` / `PHICTL_BIN`, else those next to phi-bench (a workspace build makes
//! them), else built here with the test's profile.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use serde_json::Value;

fn bench_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_phi-bench"))
}

/// (phi-collector, phictl), built once.
fn collector_bins() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        if let (Some(c), Some(p)) = (
            std::env::var_os("PHI_COLLECTOR_BIN"),
            std::env::var_os("PHICTL_BIN"),
        ) {
            return (PathBuf::from(c), PathBuf::from(p));
        }
        let dir = bench_bin().parent().expect("target directory");
        let bins = (dir.join("phi-collector"), dir.join("phictl"));
        if bins.0.is_file() && bins.1.is_file() {
            return bins;
        }
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "-p", "phi-collector", "--bins"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p phi-collector failed");
        assert!(
            bins.0.is_file() && bins.1.is_file(),
            "the collector's binaries are not next to {}",
            bench_bin().display()
        );
        bins
    })
}

/// Runs phi-bench; its stdout must be exactly one JSON object on one line.
fn run(args: &[&str], wire: bool) -> Value {
    let mut cmd = Command::new(bench_bin());
    cmd.args(args);
    if wire {
        let (collector, phictl) = collector_bins();
        cmd.env("PHI_COLLECTOR_BIN", collector)
            .env("PHICTL_BIN", phictl);
    }
    let out = cmd.output().expect("run phi-bench");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "phi-bench {args:?} failed\n--- stderr ---\n{stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stdout: {stdout}");
    let v: Value = serde_json::from_str(lines[0]).expect("stdout is JSON");
    assert!(v.is_object(), "{v}");
    assert_eq!(v["schema"], "phi-bench/1");
    assert!(v["started_at"].as_str().is_some_and(|s| s.ends_with('Z')));
    for key in ["cpus", "memory_bytes"] {
        assert!(v["machine"][key].as_u64().is_some_and(|n| n > 0), "{key}");
    }
    assert!(v["machine"]["engine_version"].as_str().is_some());
    v
}

fn positive(v: &Value, pointer: &str) -> f64 {
    let x = v
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} is missing or no number in {v}"));
    assert!(x > 0.0, "{pointer} = {x}");
    x
}

fn unit(v: &Value, pointer: &str, want: &str) {
    assert_eq!(
        v.pointer(&format!("{pointer}/unit"))
            .and_then(Value::as_str),
        Some(want),
        "{pointer}"
    );
}

fn check_ingest(v: &Value, mode: &str, records: u64, repeat: usize) {
    assert_eq!(v["benchmark"], "ingest");
    assert_eq!(v["parameters"]["mode"], mode);
    assert_eq!(v["parameters"]["backend"], "sqlite");
    assert_eq!(v["parameters"]["records"], records);
    assert_eq!(v["parameters"]["checkpoint_every"], 1000);
    assert_eq!(v["dataset"]["records"], records);
    positive(v, "/dataset/checkpoints");
    positive(v, "/dataset/batches");
    let bytes = positive(v, "/dataset/record_body_bytes_mean/value");
    assert!((300.0..3000.0).contains(&bytes), "{bytes} bytes per record");
    unit(v, "/results/records_per_second", "records/s");
    unit(v, "/results/seconds", "s");
    unit(v, "/results/store_bytes", "bytes");
    let runs = v["results"]["records_per_second"]["runs"]
        .as_array()
        .expect("runs");
    assert_eq!(runs.len(), repeat);
    for r in runs {
        assert!(r.as_f64().is_some_and(|x| x > 0.0), "{r}");
    }
    for p in ["median", "min", "max"] {
        positive(v, &format!("/results/records_per_second/{p}"));
        positive(v, &format!("/results/seconds/{p}"));
    }
    positive(v, "/results/store_bytes/value");
    positive(v, "/results/store_bytes_per_record/value");
}

#[test]
fn ingest_store_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite:{}", dir.path().join("store.db").display());
    let v = run(
        &[
            "ingest",
            "--db",
            &db,
            "--records",
            "2500",
            "--hosts",
            "2",
            "--repeat",
            "2",
        ],
        false,
    );
    check_ingest(&v, "store", 2500, 2);
    // 1250 per host: a checkpoint at 1000 and one at the end of each chain.
    assert_eq!(v["dataset"]["checkpoints"], 4);
    assert_eq!(v["parameters"]["streams"], 1);
}

#[test]
fn ingest_wire_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite:{}", dir.path().join("wire.db").display());
    let v = run(
        &[
            "ingest",
            "--db",
            &db,
            "--records",
            "2000",
            "--hosts",
            "2",
            "--batch",
            "300",
            "--mode",
            "wire",
            "--repeat",
            "1",
        ],
        true,
    );
    check_ingest(&v, "wire", 2000, 1);
    assert_eq!(v["parameters"]["streams"], 2);
    assert_eq!(v["parameters"]["batch"], 300);
}

#[test]
fn query_loads_once_and_reports_latencies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite:{}", dir.path().join("query.db").display());
    let args = [
        "query",
        "--db",
        &db,
        "--records",
        "3000",
        "--hosts",
        "2",
        "--days",
        "3",
        "--repeat",
        "6",
    ];
    let first = run(&args, false);
    let second = run(&args, false);
    for (v, reused) in [(&first, false), (&second, true)] {
        assert_eq!(v["benchmark"], "query");
        assert_eq!(v["dataset"]["reused"], reused);
        assert_eq!(v["dataset"]["records"], 3000);
        assert_eq!(v["dataset"]["records_per_host_day"], 500.0);
        assert_eq!(v["dataset"]["load"]["path"], "Store::append");
        positive(v, "/dataset/load/seconds");
        positive(v, "/dataset/load/records_per_second");
        positive(v, "/dataset/store_bytes/value");
        for q in [
            "timeline_host_day",
            "timeline_host_day_user",
            "timeline_host_day_path_prefix",
            "sessions_host_day",
        ] {
            let base = format!("/results/{q}");
            assert!(v.pointer(&format!("{base}/query")).is_some(), "{q}");
            unit(v, &format!("{base}/latency"), "ms");
            assert_eq!(
                v.pointer(&format!("{base}/latency/samples")),
                Some(&6.into())
            );
            for p in ["p50", "p90", "p99", "max", "min", "mean"] {
                positive(v, &format!("{base}/latency/{p}"));
            }
        }
        // Every host-day holds 500 records: the timeline returns all of them.
        assert_eq!(v["results"]["timeline_host_day"]["rows"]["min"], 500);
        assert_eq!(v["results"]["timeline_host_day"]["rows"]["max"], 500);
        unit(v, "/results/timeline_host_day/rows", "rows");
        positive(v, "/results/timeline_host_day_path_prefix/rows/total");
        positive(v, "/results/timeline_host_day_user/rows/total");
        positive(v, "/results/sessions_host_day/rows/min");
        unit(v, "/results/sessions_host_day/rows", "sessions");
    }
    // The reused store reports the load of the run that made it.
    assert_eq!(first["dataset"]["load"], second["dataset"]["load"]);
}

#[test]
fn refuses_bad_arguments_without_output() {
    let out = Command::new(bench_bin())
        .args(["ingest", "--db", "mysql://x", "--records", "10"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sqlite:PATH"));
}
