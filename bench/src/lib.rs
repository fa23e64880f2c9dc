//! phi-audit's collector benchmarks (`phi-bench`).
//!
//! Every subcommand prints exactly **one JSON object on one line on standard output** (the
//! results) and its progress on standard error. It exits 0 with the object, or 1 with the
//! reason on standard error and nothing on standard output.
//!
//! ```sh
//! phi-bench ingest --db sqlite:/tmp/b.db --records 100000 [--hosts 4] [--batch 512] \
//!     [--mode store|wire] [--repeat 3]
//! phi-bench query --db sqlite:/tmp/q.db --records 1000000 [--hosts 10] [--days 30] \
//!     [--repeat 50] [--fresh] [--load-batch 10000]
//! phi-bench spool-count --spool DIR [--pid P]... [--ppid P]...
//! ```
//!
//! `--db` is `sqlite:PATH`, `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (or the password in
//! `PGPASSWORD`), or `postgres:temp`: a throwaway PostgreSQL cluster on a free loopback port
//! for this run (needs root; installs the Debian package `postgresql` when missing; reported
//! as `postgres:temp`). The benchmarks empty the store they are given before loading it, and
//! refuse to when it holds any host they did not make (their hosts are `bench-000`,
//! `bench-001`, …) or is something other than a phi-audit store.
//!
//! `wire` mode runs the real programs: `phi-collector` from `PHI_COLLECTOR_BIN`, else next to
//! the `phi-bench` executable, and `phictl` (for `phictl certs init`) from `PHICTL_BIN`, else
//! next to it. Build them with the same profile: `cargo build --release -p phi-collector -p
//! phi-bench`.
//!
//! # What is measured
//!
//! The records are synthetic but shaped and sized like a real agent's (see [`synth`]): sealed
//! into per-host hash chains, signed with an Ed25519 host key every 1000 records and at the
//! end of each chain, and batched like the agent's spool reader. They are generated before
//! any clock starts.
//!
//! - `ingest --mode store`: `Store::append` on a fresh store per repeat, in batches of
//!   `--batch` entries, the hosts' batches interleaved: verification (every hash link and
//!   record, every checkpoint signature), query columns, session aggregates, one durable
//!   transaction per batch (SQLite `synchronous=FULL`, as the collector always runs it).
//! - `ingest --mode wire`: a real `phi-collector serve` on a fresh store per repeat, with
//!   certificates from `phictl certs init`; one gRPC stream with mutual TLS per host, all at
//!   once, at most 4 batches queued per stream (as the agent). Connecting and the
//!   Hello/Welcome exchange happen before the clock starts; it stops at the acknowledgement
//!   of each stream's last record (the collector acknowledges only what is durable).
//! - `query`: see [`query`]. Loading goes through `Store::append` too (the verified path).
//!
//! # JSON schema (`"schema": "phi-bench/1"`)
//!
//! Common to both subcommands:
//!
//! | field | meaning |
//! | --- | --- |
//! | `schema` | `"phi-bench/1"`; changes when a field changes meaning or goes away |
//! | `benchmark` | `"ingest"` or `"query"` |
//! | `version` | phi-bench's version (the workspace's) |
//! | `started_at` | RFC 3339, UTC |
//! | `parameters` | the arguments, with defaults filled in; `backend` is `"sqlite"` or `"postgres"`, `db` the store without credentials |
//! | `dataset` | machine-independent description of the data (a function of the parameters) |
//! | `results` | the measurements |
//! | `machine` | `cpus`, `cpu_model`, `memory_bytes`, `kernel`, `arch`, `engine` and `engine_version` (SQLite library or PostgreSQL server), `profile` (`"release"` or `"debug"`: debug numbers are no benchmark) |
//!
//! Value objects carry their unit: a **quantity** is `{"unit", "value"}`; **runs** (a repeated
//! measurement) are `{"unit", "runs": [...], "median", "min", "max"}`; a **latency** is
//! `{"unit": "ms", "samples", "p50", "p90", "p99", "max", "min", "mean"}` with nearest-rank
//! percentiles (with 50 samples p99 is the largest); **counts** are `{"unit", "min", "median",
//! "max", "mean", "total"}`.
//!
//! `ingest`:
//!
//! | field | meaning |
//! | --- | --- |
//! | `parameters` | `backend`, `db`, `mode` (`"store"`/`"wire"`), `records`, `hosts`, `batch` (entries per batch), `repeat`, `checkpoint_every` (1000), `streams` (concurrent streams: hosts in wire mode, 1 in store mode) |
//! | `dataset` | `generator`, `records`, `checkpoints`, `batches`, `record_body_bytes_mean` and `record_body_bytes_total` (quantities, bytes of the hashed record encodings) |
//! | `results.records_per_second` | runs, `records/s` |
//! | `results.seconds` | runs, `s`: the timed section |
//! | `results.store_bytes` | quantity, `bytes`: the store after the last repeat (SQLite: file plus WAL; PostgreSQL: tables with indexes and TOAST) |
//! | `results.store_bytes_per_record` | quantity, `bytes/record` |
//!
//! `query`:
//!
//! | field | meaning |
//! | --- | --- |
//! | `parameters` | `backend`, `db`, `records`, `hosts`, `days`, `first_day` (`"2026-10-01"`), `repeat` (host/day pairs), `fresh`, `load_batch`, `page_rows` (1000) |
//! | `dataset` | `generator`, `description` (what the store's marker says), `records`, `hosts`, `days`, `records_per_host_day`, `reused` (the store already held it), `load`, `store_bytes`, `store_bytes_per_record` |
//! | `dataset.load` | `path` (`"Store::append"`), `batch`, `seconds`, `records_per_second`, `append_seconds` and `append_records_per_second` (inside `Store::append` only), `at`; for a reused store, the numbers of the run that loaded it |
//! | `results.timeline_host_day` | `query` (the phictl command it stands for), `latency`, `rows` (counts of rows returned per query) |
//! | `results.timeline_host_day_user` | the same with `--user` |
//! | `results.timeline_host_day_path_prefix` | the same with `--path-prefix` |
//! | `results.sessions_host_day` | the same for `sessions`; `rows` counts sessions |
//!
//! `spool-count` (a helper of the host benchmarks, see [`spool_count`]; no `parameters`,
//! `machine` or `results`): `records` and `gaps` in the spool, `first_seq` (1 when it holds
//! the whole chain), `by_pid` (for each `--pid`, its records by kind) and `by_ppid` (for each
//! `--ppid`, its children's records by kind).

pub mod db;
pub mod ingest;
pub mod query;
pub mod report;
pub mod spool_count;
pub mod synth;
pub mod wire;
