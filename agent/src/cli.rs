//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "phi-agent",
    version,
    about = "phi-audit host agent: records who opened protected health information on this host, \
             what they ran and where they connected",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load the kernel probes and record until SIGINT or SIGTERM.
    ///
    /// SIGHUP re-reads the configuration file and applies watch-list changes at once. On stop
    /// the probes are detached and the drop counters are printed. Needs root, or CAP_BPF and
    /// CAP_PERFMON.
    Run(Box<RunArgs>),
    /// Attach empty programs to the agent's hooks and wait for SIGINT or SIGTERM: the cost
    /// of the hooks alone, which the benchmarks compare the agent against.
    #[command(hide = true)]
    Floor,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Configuration file (TOML); flags given here override it.
    #[arg(long, short = 'c', env = "PHI_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Directory tree to watch; repeat for several. Opens of anything below it are recorded
    /// (joined with the `watch` list of the configuration file).
    #[arg(long = "watch", short = 'w', value_name = "DIR")]
    pub watch: Vec<PathBuf>,

    /// Write every record to standard output as one JSON object per line (the proto3 JSON
    /// form of phiaudit.v1.Record).
    #[arg(long)]
    pub stdout: bool,

    /// Identifier of this host in the records [default: the host name].
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,

    /// Size of the kernel ring buffer in bytes: a power of two of at least one page
    /// [default: 8388608]. Larger absorbs longer bursts before events are lost (and counted).
    #[arg(long, value_name = "BYTES")]
    pub ring_buffer_bytes: Option<u64>,

    /// Do not record connect calls.
    #[arg(long)]
    pub no_connect: bool,

    /// Record the inbound connections accepted on this local TCP port (a service holding
    /// ePHI: a database, an SSH or web server); repeat for several ports.
    #[arg(long = "accept-port", value_name = "PORT")]
    pub accept_ports: Vec<u32>,

    /// How kernel sensors are picked: "auto" uses fexit programs on the system call
    /// functions where the kernel allows them and they fire, tracepoints otherwise;
    /// "tracepoints" uses tracepoints only [default: auto].
    #[arg(long, value_name = "MODE")]
    pub sensors: Option<crate::probes::sensors::SensorMode>,

    /// Directory for the agent's state (host key, pseudonym key, checkpoints)
    /// [default: /var/lib/phi-audit].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Directory of the spool, the on-disk log of records not yet acknowledged by the
    /// collector [default: <state-dir>/spool].
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,

    /// Collector to stream records to over gRPC with mutual TLS (https://host:port).
    #[arg(long, value_name = "URL")]
    pub collector: Option<String>,

    /// CA certificate (PEM) that signed the collector's certificate.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// This agent's certificate (PEM); it must name the host id.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// This agent's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Address for plain-HTTP health and metrics: GET /healthz, /readyz and /metrics
    /// (Prometheus), or "off" [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,

    /// Level of the agent's own log on standard error: error, warn, info, debug or trace (or a
    /// tracing filter such as "phi_agent=debug").
    #[arg(
        long,
        env = "PHI_AGENT_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,
}
