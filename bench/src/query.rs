//! `phi-bench query`: how fast the store answers the compliance queries an auditor runs.
//!
//! The store is loaded with `--records` over `--hosts` hosts, spread evenly over `--days` days
//! from [`FIRST_DAY`], through `Store::append`: the same verified path as ingest (hash links,
//! checkpoint signatures, query columns, sessions), in large batches. The dataset is named in
//! the store's settings ([`MARKER`]), so a later run with the same parameters reuses it
//! instead of loading again (`--fresh` forces a reload). After loading PostgreSQL it runs
//! `ANALYZE`, as autovacuum soon would; SQLite gets none (the collector never runs it).
//!
//! Then, for `--repeat` host/day pairs (a fixed pseudo-random sequence), it times:
//!
//! - `timeline_host_day`: what `phictl timeline --host H --since DAY --until DAY+1` asks of the
//!   store, page by page (1000 rows, as the query API pages) with the API's cursor, every row
//!   decoded as the API does before sending it;
//! - `timeline_host_day_user`: the same with `--user PERSON`, a person with a login session on
//!   that host that day (as an auditor would pick from the sessions);
//! - `timeline_host_day_path_prefix`: the same with `--path-prefix /srv/ehr/DEPARTMENT/`
//!   (one of 8 departments);
//! - `sessions_host_day`: `phictl sessions --host H --since DAY --until DAY+1`.

use std::{hint::black_box, time::Instant};

use anyhow::bail;
use phi_collector::store::{Filter, SessionFilter, Store};
use serde::{Deserialize, Serialize};

use crate::{
    db::Db,
    report::{Counts, Latency, Machine, Quantity, Report, now_rfc3339},
    synth::{self, DEPARTMENTS, HostChain, PEOPLE, Rng},
};

/// Day 0 of every query dataset: 2026-10-01T00:00:00Z (ns).
pub const FIRST_DAY_NS: i64 = 1_790_812_800_000_000_000;
pub const FIRST_DAY: &str = "2026-10-01";
const DAY_NS: i64 = 86_400_000_000_000;
/// Rows per timeline page (the query API's page size).
pub const PAGE: usize = 1000;
/// The settings key that names the loaded dataset.
pub const MARKER: &str = "phi-bench.dataset";
/// The settings key that keeps how the dataset was loaded (JSON).
const LOAD_MARKER: &str = "phi-bench.load";

#[derive(Clone, Debug)]
pub struct Args {
    pub records: u64,
    pub hosts: usize,
    pub days: u32,
    pub repeat: usize,
    pub fresh: bool,
    pub load_batch: usize,
}

#[derive(Serialize)]
pub struct Parameters {
    pub backend: &'static str,
    pub db: String,
    pub records: u64,
    pub hosts: usize,
    pub days: u32,
    pub first_day: &'static str,
    /// Host/day pairs queried (each query kind runs once per pair).
    pub repeat: usize,
    pub fresh: bool,
    /// Entries per `Store::append` while loading.
    pub load_batch: usize,
    pub page_rows: usize,
}

/// How the dataset got into the store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Load {
    /// "Store::append": the verified ingest path.
    pub path: String,
    pub batch: usize,
    /// Wall time of the load (record generation runs alongside on another thread).
    pub seconds: f64,
    pub records_per_second: f64,
    /// Time spent inside `Store::append` alone.
    pub append_seconds: f64,
    pub append_records_per_second: f64,
    /// When it was loaded (RFC 3339).
    pub at: String,
}

#[derive(Serialize)]
pub struct DatasetInfo {
    pub generator: &'static str,
    pub description: String,
    pub records: u64,
    pub hosts: usize,
    pub days: u32,
    pub records_per_host_day: f64,
    /// True when the store already held this dataset and was not loaded again.
    pub reused: bool,
    pub load: Load,
    pub store_bytes: Quantity,
    pub store_bytes_per_record: Quantity,
}

#[derive(Serialize)]
pub struct QueryResult {
    /// The equivalent phictl command.
    pub query: String,
    pub latency: Latency,
    pub rows: Counts,
}

#[derive(Serialize)]
pub struct Results {
    pub timeline_host_day: QueryResult,
    pub timeline_host_day_user: QueryResult,
    pub timeline_host_day_path_prefix: QueryResult,
    pub sessions_host_day: QueryResult,
}

pub type QueryReport = Report<Parameters, DatasetInfo, Results>;

/// Host `i`'s record count and spacing.
fn layout(args: &Args) -> Vec<(u64, i64)> {
    let span = i64::from(args.days) * DAY_NS;
    synth::split(args.records, args.hosts)
        .into_iter()
        .map(|n| (n, span / n.max(1) as i64))
        .collect()
}

fn description(args: &Args) -> String {
    format!(
        "{} records={} hosts={} days={} first_day={FIRST_DAY}",
        synth::GENERATOR,
        args.records,
        args.hosts,
        args.days
    )
}

pub fn run(db: &Db, args: &Args) -> anyhow::Result<QueryReport> {
    if args.records == 0 || args.hosts == 0 || args.days == 0 || args.repeat == 0 {
        bail!("--records, --hosts, --days and --repeat must be at least 1");
    }
    if (args.hosts as u64) > args.records {
        bail!("--hosts may not exceed --records");
    }
    let started_at = now_rfc3339();
    let wanted = description(args);
    let existing = if args.fresh {
        None
    } else {
        loaded(db, args, &wanted)?
    };
    let reused = existing.is_some();
    let load = match existing {
        Some(l) => {
            eprintln!("query: the store already holds {wanted}: reusing it");
            l
        }
        None => load(db, args, &wanted)?,
    };
    let store_bytes = db.size_bytes()?;
    let results = measure(db, args)?;
    let machine = Machine::probe(db.backend(), db.engine_version());
    Ok(Report::new(
        "query",
        started_at,
        Parameters {
            backend: db.backend(),
            db: db.shown(),
            records: args.records,
            hosts: args.hosts,
            days: args.days,
            first_day: FIRST_DAY,
            repeat: args.repeat,
            fresh: args.fresh,
            load_batch: args.load_batch,
            page_rows: PAGE,
        },
        DatasetInfo {
            generator: synth::GENERATOR,
            description: wanted,
            records: args.records,
            hosts: args.hosts,
            days: args.days,
            records_per_host_day: args.records as f64 / (args.hosts as f64 * f64::from(args.days)),
            reused,
            load,
            store_bytes: Quantity::new("bytes", store_bytes as f64),
            store_bytes_per_record: Quantity::new(
                "bytes/record",
                store_bytes as f64 / args.records as f64,
            ),
        },
        results,
        machine,
    ))
}

/// The load of a store that already holds exactly this dataset, complete.
fn loaded(db: &Db, args: &Args, wanted: &str) -> anyhow::Result<Option<Load>> {
    let mut store = match db.open() {
        Ok(s) => s,
        // A file that is no store: load() empties it, or says why it will not.
        Err(_) => return Ok(None),
    };
    if store.setting(MARKER)?.as_deref() != Some(wanted) {
        return Ok(None);
    }
    let hosts = store.hosts()?;
    let layout = layout(args);
    let complete = hosts.len() == args.hosts
        && hosts
            .iter()
            .zip(&layout)
            .enumerate()
            .all(|(i, (h, (n, _)))| h.host_id == synth::host_name(i) && h.head_seq == *n);
    if !complete {
        return Ok(None);
    }
    Ok(store
        .setting(LOAD_MARKER)?
        .and_then(|s| serde_json::from_str(&s).ok()))
}

/// Empties the store and loads the dataset through `Store::append`.
fn load(db: &Db, args: &Args, wanted: &str) -> anyhow::Result<Load> {
    db.wipe()?;
    let mut store = db.open()?;
    let chains: Vec<HostChain> = layout(args)
        .into_iter()
        .enumerate()
        .map(|(i, (n, step))| HostChain::new(i, n, FIRST_DAY_NS, step))
        .collect();
    let hosts: Vec<String> = chains.iter().map(|c| c.host.clone()).collect();
    for c in &chains {
        store.pin_host(&c.host, &c.public_key())?;
    }
    eprintln!(
        "query: loading {} records over {} hosts and {} days through Store::append \
         (batches of {})",
        args.records, args.hosts, args.days, args.load_batch
    );
    let (tx, rx) = std::sync::mpsc::sync_channel(8);
    let batch = args.load_batch;
    let generator = std::thread::spawn(move || {
        let mut chains = chains;
        // Round-robin over the hosts: their records arrive interleaved in time.
        loop {
            let mut any = false;
            for (i, c) in chains.iter_mut().enumerate() {
                if let Some(b) = c.next_batch(batch) {
                    any = true;
                    if tx.send((i, b)).is_err() {
                        return;
                    }
                }
            }
            if !any {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut in_append = 0.0;
    let mut done = 0u64;
    let mut next_report = args.records / 20;
    for (i, b) in rx {
        let want = b.records.len();
        let t = Instant::now();
        let appended = store.append(&hosts[i], b)?;
        in_append += t.elapsed().as_secs_f64();
        if let Some(p) = appended.problem {
            bail!("{}: the store refused a batch: {}", hosts[i], p.detail);
        }
        if appended.records != want {
            bail!(
                "{}: {} of {want} records stored",
                hosts[i],
                appended.records
            );
        }
        done += want as u64;
        if done >= next_report {
            next_report += args.records / 20;
            let s = started.elapsed().as_secs_f64();
            eprintln!(
                "query: loaded {done} of {} records in {s:.0} s ({:.0} records/s)",
                args.records,
                done as f64 / s
            );
        }
    }
    generator
        .join()
        .map_err(|_| anyhow::anyhow!("the record generator panicked"))?;
    let seconds = started.elapsed().as_secs_f64();
    if done != args.records {
        bail!("loaded {done} records, not {}", args.records);
    }
    let load = Load {
        path: "Store::append".into(),
        batch: args.load_batch,
        seconds,
        records_per_second: done as f64 / seconds,
        append_seconds: in_append,
        append_records_per_second: done as f64 / in_append,
        at: now_rfc3339(),
    };
    store.set_setting(LOAD_MARKER, &serde_json::to_string(&load)?)?;
    store.set_setting(MARKER, wanted)?;
    drop(store);
    db.analyze()?;
    eprintln!(
        "query: loaded in {seconds:.1} s ({:.0} records/s; {:.0} records/s inside Store::append)",
        load.records_per_second, load.append_records_per_second
    );
    Ok(load)
}

/// Records of a host with `n` records spaced `step` ns apart that fall in `since..until`.
fn expected_rows(n: u64, step: i64, since: i64, until: i64) -> u64 {
    // Record seq s (1-based) is at FIRST_DAY_NS + (s - 1) * step.
    let first = |t: i64| -> u64 {
        let off = t - FIRST_DAY_NS;
        if off <= 0 {
            0
        } else {
            (off as u64).div_ceil(step as u64)
        }
    };
    first(until).min(n).saturating_sub(first(since).min(n))
}

/// Reads a whole timeline the way the query API streams it: pages of [`PAGE`] rows after the
/// previous page's cursor, each row decoded.
fn timeline(store: &mut dyn Store, filter: &Filter) -> anyhow::Result<u64> {
    let mut cursor = None;
    let mut rows = 0u64;
    loop {
        let page = store.timeline(filter, cursor.as_ref(), PAGE)?;
        let n = page.len();
        if let Some(last) = page.last() {
            cursor = Some(last.cursor());
        }
        for row in page {
            let record = phi_collector::api::stored_record(row)
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            black_box(record);
            rows += 1;
        }
        if n < PAGE {
            return Ok(rows);
        }
    }
}

struct Samples {
    ms: Vec<f64>,
    rows: Vec<u64>,
}

impl Samples {
    fn new() -> Samples {
        Samples {
            ms: Vec::new(),
            rows: Vec::new(),
        }
    }

    fn time(&mut self, f: impl FnOnce() -> anyhow::Result<u64>) -> anyhow::Result<u64> {
        let t = Instant::now();
        let rows = f()?;
        self.ms.push(t.elapsed().as_secs_f64() * 1e3);
        self.rows.push(rows);
        Ok(rows)
    }

    fn result(&self, query: &str, unit: &'static str) -> QueryResult {
        QueryResult {
            query: query.to_owned(),
            latency: Latency::from_ms(&self.ms),
            rows: Counts::new(unit, &self.rows),
        }
    }
}

fn measure(db: &Db, args: &Args) -> anyhow::Result<Results> {
    let mut store = db.open()?;
    let layout = layout(args);
    let mut rng = Rng::new(0x5155_4552_5953);
    let mut plain = Samples::new();
    let mut user = Samples::new();
    let mut path = Samples::new();
    let mut sessions = Samples::new();
    eprintln!("query: {} host/day pairs, four queries each", args.repeat);
    for _ in 0..args.repeat {
        let h = rng.below(args.hosts as u64) as usize;
        let day = rng.below(u64::from(args.days)) as i64;
        let fallback = *rng.pick(PEOPLE);
        let department = *rng.pick(DEPARTMENTS);
        let host = synth::host_name(h);
        let since = FIRST_DAY_NS + day * DAY_NS;
        let until = since + DAY_NS;
        let filter = Filter {
            host: Some(host.clone()),
            since_ns: Some(since),
            until_ns: Some(until),
            ..Default::default()
        };
        let rows = plain.time(|| timeline(store.as_mut(), &filter))?;
        let (n, step) = layout[h];
        let want = expected_rows(n, step, since, until);
        if rows != want {
            bail!("{host} day {day}: the timeline returned {rows} rows, the dataset has {want}");
        }
        let by_path = Filter {
            path_prefix: Some(format!("/srv/ehr/{department}/")),
            ..filter.clone()
        };
        path.time(|| timeline(store.as_mut(), &by_path))?;
        // An auditor asks about someone who was there: a person with a login session that
        // day (any of the 20 when there was none).
        let sf = SessionFilter {
            host: Some(host.clone()),
            since_ns: Some(since),
            until_ns: Some(until),
            user: None,
        };
        let mut found = Vec::new();
        sessions.time(|| {
            found = store.sessions(&sf)?;
            Ok(found.len() as u64)
        })?;
        let person = if found.is_empty() {
            fallback.to_owned()
        } else {
            found[rng.below(found.len() as u64) as usize].user.clone()
        };
        let by_user = Filter {
            user: Some(person),
            ..filter.clone()
        };
        user.time(|| timeline(store.as_mut(), &by_user))?;
    }
    let l = Latency::from_ms(&plain.ms);
    eprintln!(
        "query: one host, one day: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        l.p50, l.p99, l.max
    );
    if plain.rows.iter().sum::<u64>() == 0 {
        bail!("every timeline was empty: the dataset does not cover the queried days");
    }
    Ok(Results {
        timeline_host_day: plain
            .result("phictl timeline --host H --since DAY --until DAY+1", "rows"),
        timeline_host_day_user: user.result(
            "phictl timeline --host H --since DAY --until DAY+1 --user PERSON (logged in that day)",
            "rows",
        ),
        timeline_host_day_path_prefix: path.result(
            "phictl timeline --host H --since DAY --until DAY+1 --path-prefix /srv/ehr/DEPT/",
            "rows",
        ),
        sessions_host_day: sessions.result(
            "phictl sessions --host H --since DAY --until DAY+1",
            "sessions",
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_rows_partition_the_chain() {
        let n = 1000;
        let step = 30 * DAY_NS / n as i64;
        let total: u64 = (0..30)
            .map(|d| {
                let since = FIRST_DAY_NS + d * DAY_NS;
                expected_rows(n, step, since, since + DAY_NS)
            })
            .sum();
        assert_eq!(total, n);
        assert_eq!(expected_rows(n, step, 0, FIRST_DAY_NS), 0);
    }
}
