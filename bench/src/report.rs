//! The JSON a subcommand prints: the common envelope, summaries of repeated measurements,
//! and the machine it ran on. See the crate documentation for the schema.

use serde::Serialize;

/// Identifies the JSON layout; bumped when a field changes meaning or disappears.
pub const SCHEMA: &str = "phi-bench/1";

/// One benchmark's result.
#[derive(Serialize)]
pub struct Report<P: Serialize, D: Serialize, R: Serialize> {
    pub schema: &'static str,
    /// "ingest" or "query".
    pub benchmark: &'static str,
    /// The phi-bench (and workspace) version.
    pub version: &'static str,
    /// When the run started (RFC 3339, UTC).
    pub started_at: String,
    /// What was asked for.
    pub parameters: P,
    /// What was measured on: machine-independent (a function of the parameters).
    pub dataset: D,
    /// Timings (machine-dependent) and row counts (machine-independent).
    pub results: R,
    pub machine: Machine,
}

impl<P: Serialize, D: Serialize, R: Serialize> Report<P, D, R> {
    pub fn new(
        benchmark: &'static str,
        started_at: String,
        parameters: P,
        dataset: D,
        results: R,
        machine: Machine,
    ) -> Self {
        Report {
            schema: SCHEMA,
            benchmark,
            version: env!("CARGO_PKG_VERSION"),
            started_at,
            parameters,
            dataset,
            results,
            machine,
        }
    }
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Where the numbers come from.
#[derive(Serialize)]
pub struct Machine {
    /// CPUs this process may use.
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_bytes: u64,
    pub kernel: String,
    pub arch: &'static str,
    /// The store's engine: "sqlite" or "postgres", and its version.
    pub engine: String,
    pub engine_version: String,
    /// Build profile of phi-bench ("release" or "debug"): debug numbers are not benchmarks.
    pub profile: &'static str,
}

impl Machine {
    pub fn probe(engine: &str, engine_version: String) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_default();
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory_bytes,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            arch: std::env::consts::ARCH,
            engine: engine.to_owned(),
            engine_version,
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        }
    }
}

/// A value with its unit.
#[derive(Clone, Debug, Serialize)]
pub struct Quantity {
    pub unit: &'static str,
    pub value: f64,
}

impl Quantity {
    pub fn new(unit: &'static str, value: f64) -> Quantity {
        Quantity { unit, value }
    }
}

/// A measurement repeated a few times: every run, and their median, minimum and maximum.
#[derive(Clone, Debug, Serialize)]
pub struct Runs {
    pub unit: &'static str,
    pub runs: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Runs {
    pub fn new(unit: &'static str, runs: Vec<f64>) -> Runs {
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        Runs {
            unit,
            median: median(&sorted),
            min: sorted.first().copied().unwrap_or(0.0),
            max: sorted.last().copied().unwrap_or(0.0),
            runs,
        }
    }
}

/// Latencies of many queries (milliseconds): nearest-rank percentiles.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub unit: &'static str,
    pub samples: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub min: f64,
    pub mean: f64,
}

impl Latency {
    pub fn from_ms(samples: &[f64]) -> Latency {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        Latency {
            unit: "ms",
            samples: s.len(),
            p50: percentile(&s, 50.0),
            p90: percentile(&s, 90.0),
            p99: percentile(&s, 99.0),
            max: s.last().copied().unwrap_or(0.0),
            min: s.first().copied().unwrap_or(0.0),
            mean: if s.is_empty() {
                0.0
            } else {
                s.iter().sum::<f64>() / s.len() as f64
            },
        }
    }
}

/// Rows (or sessions) returned per query: a machine-independent property of the dataset.
#[derive(Clone, Debug, Serialize)]
pub struct Counts {
    pub unit: &'static str,
    pub min: u64,
    pub median: f64,
    pub max: u64,
    pub mean: f64,
    pub total: u64,
}

impl Counts {
    pub fn new(unit: &'static str, counts: &[u64]) -> Counts {
        let mut s = counts.to_vec();
        s.sort_unstable();
        let as_f: Vec<f64> = s.iter().map(|&c| c as f64).collect();
        let total: u64 = s.iter().sum();
        Counts {
            unit,
            min: s.first().copied().unwrap_or(0),
            median: median(&as_f),
            max: s.last().copied().unwrap_or(0),
            mean: if s.is_empty() {
                0.0
            } else {
                total as f64 / s.len() as f64
            },
            total,
        }
    }
}

/// The median of sorted values (the mean of the middle two for an even count).
pub fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The nearest-rank percentile `p` (0 < p <= 100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 25.0);
        assert_eq!(percentile(&v, 99.0), 50.0);
        assert_eq!(percentile(&v, 90.0), 45.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        let r = Runs::new("records/s", vec![3.0, 1.0, 2.0]);
        assert_eq!((r.median, r.min, r.max), (2.0, 1.0, 3.0));
    }
}
