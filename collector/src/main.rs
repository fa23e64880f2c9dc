//! phi-collector: receives hash-chained records from phi-agents over gRPC with mutual TLS,
//! verifies every link and checkpoint, and stores them.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use phi_collector::{
    ingest::{IngestService, Limits},
    store::Pool,
    tls,
};
use phi_proto::v1::ingest_server::IngestServer;

#[derive(Parser)]
#[command(
    name = "phi-collector",
    version,
    about = "phi-audit collector: verified ingest and storage of audit records"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept agent streams until SIGINT or SIGTERM.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4433", value_name = "ADDR")]
    listen: SocketAddr,
    /// Storage: sqlite:PATH.
    #[arg(long, value_name = "URL")]
    db: String,
    /// The collector's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// The collector's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// CA that agent certificates must be signed by (PEM).
    #[arg(long, value_name = "FILE")]
    client_ca: PathBuf,
    /// Log filter for the collector's own messages on standard error.
    #[arg(long, default_value = "info", value_name = "FILTER")]
    log: String,
    /// Seconds an agent may take to send its Hello after connecting.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    first_message_timeout: u64,
    /// Seconds of silence after which a stream is closed.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    idle_timeout: u64,
    /// Most records and checkpoints in one batch.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    max_batch: usize,
    /// Largest message accepted, in bytes.
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    max_message_bytes: usize,
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let pool = Pool::open(&args.db, 8)?;
    let tls = tls::server_config(&args.tls_cert, &args.tls_key, &args.client_ca)?;
    let limits = Limits {
        first_message: std::time::Duration::from_secs(args.first_message_timeout.max(1)),
        idle: std::time::Duration::from_secs(args.idle_timeout.max(1)),
        max_batch: args.max_batch.max(1),
        max_message_bytes: args.max_message_bytes.max(1024),
        ..Limits::default()
    };
    let service = IngestService::new(pool, limits);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
    };
    tracing::info!(listen = %args.listen, db = %args.db, "phi-collector serving");
    tonic::transport::Server::builder()
        .tls_config(tls)
        .context("TLS configuration")?
        .add_service(IngestServer::new(service).max_decoding_message_size(limits.max_message_bytes))
        .serve_with_shutdown(args.listen, shutdown)
        .await
        .with_context(|| format!("cannot serve on {}", args.listen))?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false)
                .init();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("phi-collector: error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("phi-collector: error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
