//! phi-bench: benchmarks of the phi-audit collector. Prints one JSON object on standard
//! output; see the `phi_bench` library documentation for what is measured and the schema.

use std::{io::Write as _, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use phi_bench::{db::Db, ingest, query, spool_count};

#[derive(Parser)]
#[command(
    name = "phi-bench",
    version,
    about = "phi-audit collector benchmarks: one JSON object on stdout, progress on stderr"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verified ingest throughput: Store::append (store) or a real collector over gRPC/mTLS
    /// (wire).
    Ingest(IngestArgs),
    /// Compliance query latency (one host, one day) on a store loaded with N records.
    Query(QueryArgs),
    /// Counts an agent's records by kind for given processes and their children, read from
    /// its spool (the agent stopped).
    SpoolCount(SpoolCountArgs),
}

#[derive(Args)]
struct SpoolCountArgs {
    /// The agent's spool directory (`<state dir>/spool`).
    #[arg(long, value_name = "DIR")]
    spool: std::path::PathBuf,
    /// Count the records of this process (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Count the records of this process's children (repeatable).
    #[arg(long = "ppid", value_name = "PID")]
    ppids: Vec<u32>,
}

#[derive(Args)]
struct IngestArgs {
    /// The store: sqlite:PATH, postgres://USER@HOST:PORT/DB, or postgres:temp. It is emptied
    /// first (refused if it holds hosts other than the benchmark's).
    #[arg(long, value_name = "URL")]
    db: String,
    /// Records in all, split evenly over the hosts.
    #[arg(long, value_name = "N")]
    records: u64,
    /// Host chains (one stream each in wire mode).
    #[arg(long, value_name = "H", default_value_t = 4)]
    hosts: usize,
    /// Entries (records and checkpoints) per batch; the agent sends 512.
    #[arg(long, value_name = "B", default_value_t = 512)]
    batch: usize,
    #[arg(long, value_enum, default_value_t = ingest::Mode::Store)]
    mode: ingest::Mode,
    /// Timed runs, each on a fresh store.
    #[arg(long, value_name = "R", default_value_t = 3)]
    repeat: usize,
}

#[derive(Args)]
struct QueryArgs {
    /// The store: sqlite:PATH, postgres://USER@HOST:PORT/DB, or postgres:temp. Reused when it
    /// holds exactly this dataset, else emptied and loaded (refused if it holds hosts other
    /// than the benchmark's).
    #[arg(long, value_name = "URL")]
    db: String,
    /// Records in the store.
    #[arg(long, value_name = "N")]
    records: u64,
    #[arg(long, value_name = "H", default_value_t = 10)]
    hosts: usize,
    /// Days the records spread over, evenly, from 2026-10-01.
    #[arg(long, value_name = "D", default_value_t = 30)]
    days: u32,
    /// Host/day pairs to query.
    #[arg(long, value_name = "R", default_value_t = 50)]
    repeat: usize,
    /// Load the dataset again even if the store holds it.
    #[arg(long)]
    fresh: bool,
    /// Entries per Store::append while loading.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    load_batch: usize,
}

fn run(cli: Cli) -> anyhow::Result<String> {
    Ok(match cli.command {
        Command::Ingest(a) => {
            let db = Db::parse(&a.db)?;
            let report = ingest::run(
                &db,
                &ingest::Args {
                    records: a.records,
                    hosts: a.hosts,
                    batch: a.batch,
                    mode: a.mode,
                    repeat: a.repeat,
                },
            )?;
            serde_json::to_string(&report)?
        }
        Command::Query(a) => {
            let db = Db::parse(&a.db)?;
            let report = query::run(
                &db,
                &query::Args {
                    records: a.records,
                    hosts: a.hosts,
                    days: a.days,
                    repeat: a.repeat,
                    fresh: a.fresh,
                    load_batch: a.load_batch,
                },
            )?;
            serde_json::to_string(&report)?
        }
        Command::SpoolCount(a) => {
            serde_json::to_string(&spool_count::count(&a.spool, &a.pids, &a.ppids)?)?
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(json) => {
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{json}").and_then(|()| out.flush()).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("phi-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
