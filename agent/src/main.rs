//! phi-agent: the phi-audit host agent.
//!
//! Data flow, one module per stage: `probes` (kernel programs, ring buffer) → `pipeline`
//! (decode) → `process` (process table) → `identity` → `record` → `redact` → `output`.

mod cli;
mod clock;
mod config;
mod identity;
mod journal;
mod output;
mod pipeline;
mod probes;
mod process;
mod record;
mod redact;
mod run;
mod telemetry;
mod text;
mod transport;
mod watch;

use std::process::ExitCode;

use clap::Parser as _;

use crate::{
    cli::{Cli, Command, RunArgs},
    config::{FileConfig, Overrides},
};

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Prints an error as one line (with its causes) and picks the exit code.
fn fail(err: &anyhow::Error) -> ExitCode {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    eprintln!("phi-agent: error: {line}");
    ExitCode::from(1)
}

fn prepare(args: RunArgs) -> anyhow::Result<run::RunInput> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let overrides = Overrides {
        watch: args.watch,
        stdout: args.stdout,
        host_id: args.host_id,
        ring_buffer_bytes: args.ring_buffer_bytes,
        no_connect: args.no_connect,
        accept_ports: args.accept_ports,
        sensors: args.sensors,
        state_dir: args.state_dir,
        spool_dir: args.spool_dir,
        collector: args.collector,
        tls_ca: args.tls_ca,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        metrics_listen: args.metrics_listen,
    };
    let settings = config::merge(&file, &overrides)?;
    for dir in &settings.watch {
        watch::check(dir)?;
    }
    let rules = redact::rules::build(&settings.redaction)?;
    // Host checks before any state is created.
    probes::preflight::check(std::path::Path::new(probes::BTF_PATH))?;
    let key = redact::key::load_or_create(&settings.redaction_key_file())?;
    let journal = journal::Journal::open(
        settings.journal.clone(),
        &settings.state_dir,
        &settings.host_id,
        &clock::boot_id(),
    )?;
    Ok(run::RunInput {
        config_path: args.config,
        overrides,
        settings,
        redactor: redact::Redactor::new(rules, key),
        journal,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_logging(&args.log);
            let input = match prepare(*args) {
                Ok(i) => i,
                Err(e) => {
                    fail(&e);
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => return fail(&e.into()),
            };
            match runtime.block_on(run::run(input)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Floor => {
            init_logging("info");
            match floor() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

/// `phi-agent floor`: the empty hooks, attached until a stop signal.
fn floor() -> anyhow::Result<()> {
    let ebpf = probes::attach_floor()?;
    tracing::info!("empty programs attached to the agent's hooks; waiting for SIGINT or SIGTERM");
    // SAFETY: signal-set manipulation on a local set, then a blocking wait for it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
    drop(ebpf);
    Ok(())
}
