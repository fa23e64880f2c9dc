//! phi-collector: receives hash-chained records from phi-agents over gRPC with mutual TLS,
//! verifies every link and checkpoint, stores them (SQLite or PostgreSQL), and answers
//! compliance queries over gRPC and HTTP/JSON.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use phi_collector::{
    api::{self, Api},
    config::{self, FileConfig, Flags},
    ingest::IngestService,
    retention, rules, sinks,
    store::{self, Pool},
    telemetry::{self, CollectorMetrics},
    tls,
};
use phi_proto::v1::ingest_server::IngestServer;

#[derive(Parser)]
#[command(
    name = "phi-collector",
    version,
    about = "phi-audit collector: verified ingest, storage and compliance queries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept agent streams and answer queries until SIGINT or SIGTERM.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration (the keys are the flag names with `_`; `[limits]` for the
    /// stream bounds); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address agents stream to [default: 127.0.0.1:4433].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Address of the query API, gRPC and HTTP/JSON on one port, or `off`
    /// [default: 127.0.0.1:4434].
    #[arg(long, value_name = "ADDR")]
    api_listen: Option<String>,
    /// Address for plain-HTTP health and metrics (GET /healthz, /readyz, /metrics), or `off`
    /// [default: 127.0.0.1:9465].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Storage: sqlite:PATH (embedded) or postgres://USER@HOST/DB (shared by collectors).
    #[arg(long, value_name = "URL")]
    db: Option<String>,
    /// The collector's certificate (PEM), for both listeners.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The collector's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA that signs agent certificates (required on the ingest port) and API client
    /// certificates (optional on the API port, where bearer tokens also work).
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// This collector's name in the access log [default: the host name].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Retention period of the store ("6years", "400days"); stored in the database so that
    /// every collector sharing it applies the same [default: 6years, or what the store has].
    #[arg(long, value_name = "DURATION")]
    retention: Option<String>,
    /// Log filter for the collector's own messages on standard error [default: info].
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Seconds an agent may take to send its Hello after connecting [default: 10].
    #[arg(long, value_name = "SECS")]
    first_message_timeout: Option<u64>,
    /// Seconds of silence after which a stream is closed [default: 300].
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Most records and checkpoints in one batch [default: 10000].
    #[arg(long, value_name = "N")]
    max_batch: Option<usize>,
    /// Largest message accepted, in bytes [default: 8388608].
    #[arg(long, value_name = "BYTES")]
    max_message_bytes: Option<usize>,
}

impl ServeArgs {
    fn settings(self) -> anyhow::Result<config::Settings> {
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        config::resolve(
            file,
            Flags {
                listen: self.listen,
                api_listen: self.api_listen,
                metrics_listen: self.metrics_listen,
                db: self.db,
                tls_cert: self.tls_cert,
                tls_key: self.tls_key,
                client_ca: self.client_ca,
                name: self.name,
                retention: self.retention,
                log: self.log,
                first_message_timeout: self.first_message_timeout,
                idle_timeout: self.idle_timeout,
                max_batch: self.max_batch,
                max_message_bytes: self.max_message_bytes,
            },
        )
    }
}

async fn serve(s: config::Settings) -> anyhow::Result<()> {
    let built_sinks = sinks::build_all(&s.sinks)?;
    let pool = Pool::open_async(&s.db, 8).await?;
    if let Some(period) = s.retention {
        let secs = period.as_secs().to_string();
        pool.run(move |st| st.set_setting(retention::SETTING, &secs))
            .await?;
    }
    let period = pool.run(|st| retention::period(st)).await?;
    let ingest_tls = tls::server_config(&s.tls_cert, &s.tls_key, &s.client_ca)?;
    let api_tls = match s.api_listen {
        Some(_) => Some(api::server::tls_config(
            &s.tls_cert,
            &s.tls_key,
            &s.client_ca,
        )?),
        None => None,
    };
    let metrics = CollectorMetrics::new(&s.name, pool.backend());
    let api = Api::new(pool.clone(), s.name.clone()).with_metrics(Arc::clone(&metrics));
    let api_listener = match s.api_listen {
        Some(addr) => Some(api::server::bind(addr).await?),
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tracing::info!(
        listen = %s.listen,
        api = %s.api_listen.map_or("off".into(), |a| a.to_string()),
        db = %store::display_url(&s.db),
        backend = pool.backend(),
        retention = %humantime::format_duration(period),
        "phi-collector serving"
    );

    if let Some(addr) = s.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "cannot serve health and metrics on {addr} (choose another port with \
                 --metrics-listen, or off)"
            )
        })?;
        tracing::info!(%addr, "health and metrics on http://{addr}/metrics, /healthz, /readyz");
        tokio::spawn(phi_telemetry::serve(
            listener,
            Arc::clone(&metrics.registry),
            Arc::clone(&metrics.health),
            stopped(stop_rx.clone()),
        ));
    }
    tokio::spawn(telemetry::watch_store(
        Arc::clone(&pool),
        Arc::clone(&metrics),
        stop_rx.clone(),
    ));

    let api_task = api_listener.zip(api_tls).map(|(listener, tls)| {
        let api = api.clone();
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move { api::server::serve(listener, tls, api, stop).await })
    });
    // Retention runs at start and then every hour.
    let retention_task = {
        let api = api.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                match api::retention_pass(&api).await {
                    Ok(r) => {
                        for h in r.hosts.iter().filter(|h| h.records > 0) {
                            tracing::info!(
                                host = %h.host_id,
                                through_seq = h.through_seq,
                                records = h.records,
                                "retention removed records older than the retention period"
                            );
                        }
                    }
                    Err(e) => tracing::warn!("retention pass failed: {}", e.message()),
                }
                tokio::select! {
                    () = tokio::time::sleep(api::RETENTION_INTERVAL) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        })
    };

    let wake = sinks::Wake::default();
    sinks::prepare(&built_sinks, &pool).await?;
    rules::prepare(&s.rules, &pool).await?;
    let mut sink_tasks = sinks::spawn(built_sinks, &pool, &metrics, &wake, &stop_rx);
    sink_tasks.extend(rules::spawn(&s.rules, &pool, &metrics, &wake, &stop_rx));

    let service = IngestService::new(pool, s.limits, metrics)
        .with_wake(wake)
        .with_stop(stop_rx.clone());
    let signals = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
    };
    tokio::spawn(signals);
    tonic::transport::Server::builder()
        .tls_config(ingest_tls)
        .context("TLS configuration")?
        .add_service(
            IngestServer::new(service).max_decoding_message_size(s.limits.max_message_bytes),
        )
        .serve_with_shutdown(s.listen, stopped(stop_rx.clone()))
        .await
        .with_context(|| format!("cannot serve on {}", s.listen))?;
    if let Some(t) = api_task {
        t.await.context("API task")??;
    }
    let _ = retention_task.await;
    for t in sink_tasks {
        let _ = t.await;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let settings = match args.settings() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("phi-collector: error: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            let filter = tracing_subscriber::EnvFilter::try_new(&settings.log)
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
            match runtime.block_on(serve(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("phi-collector: error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
