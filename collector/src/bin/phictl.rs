//! phictl: the phi-audit command line for operators and auditors.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "phictl",
    version,
    about = "phi-audit: certificates, queries, verification and evidence export"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Certificates for mutual TLS between agents and the collector.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a development CA, the collector's certificate and one certificate per host.
    /// Existing files are kept, so a later run with a new --host adds that host's certificate
    /// from the same CA.
    Init(InitArgs),
}

#[derive(Args)]
struct InitArgs {
    /// Directory to write the PEM files to (keys get mode 0600).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Host id to issue an agent certificate for (repeatable); the collector only accepts a
    /// host's records over a certificate that names it.
    #[arg(long = "host", value_name = "HOST", required = true)]
    hosts: Vec<String>,
    /// Names the collector is reached by (localhost, 127.0.0.1 and ::1 are always included).
    #[arg(
        long = "collector-name",
        value_name = "NAME",
        default_value = "localhost"
    )]
    collector_names: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs(CertsCommand::Init(a)) => {
            phi_collector::certs::init(&a.dir, &a.hosts, &a.collector_names).map(|w| {
                println!("CA: {}", w.ca.display());
                for f in w.kept {
                    println!("kept {} (already present)", f.display());
                }
                for f in w.files {
                    println!("wrote {}", f.display());
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("phictl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
