//! phictl: the phi-audit command line for auditors and operators. It asks a collector's API
//! (`--collector https://…:4434` with a token or client certificate) or works on a store
//! directly (`--db sqlite:PATH | postgres://…`, as a local operator; still recorded in the
//! store's access log). Exit status: 0 success, 1 a verification found a problem, 2 any
//! other error.

mod client;
mod format;

use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use client::{Client, Remote};
use phi_collector::api::timestamp;
use phi_proto::{
    Timestamp,
    v1::{
        AccessLogRequest, AddPrincipalRequest, AlertsRequest, DisablePrincipalRequest,
        ExportRequest, HoldRequest, HostSummary, PruneRequest, ReplayRequest, SessionsRequest,
        TimelineRequest, VerifyReport, VerifyRequest,
    },
};

#[derive(Parser)]
#[command(
    name = "phictl",
    version,
    about = "phi-audit: timelines, sessions, verification, evidence export, certificates"
)]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    /// Output: a readable table, or JSON (one object per line for record streams).
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Args, Clone)]
struct Conn {
    /// The collector's API, e.g. https://collector.example:4434.
    #[arg(long, global = true, env = "PHICTL_COLLECTOR", value_name = "URL")]
    collector: Option<String>,
    /// Work on a store directly instead (sqlite:PATH or postgres://…).
    #[arg(long, global = true, env = "PHICTL_DB", value_name = "URL")]
    db: Option<String>,
    /// Bearer token for the API.
    #[arg(
        long,
        global = true,
        env = "PHICTL_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// CA that signed the collector's certificate.
    #[arg(long, global = true, env = "PHICTL_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Client certificate and key (instead of, or with, a token).
    #[arg(long, global = true, env = "PHICTL_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    #[arg(long, global = true, env = "PHICTL_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// Name to expect in the collector's certificate [default: the URL's host].
    #[arg(long, global = true, value_name = "NAME")]
    server_name: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Certificates for mutual TLS between agents and the collector.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Who the collector takes you for.
    Whoami,
    /// The hosts in the store: keys, chain heads, checkpoints, holds, alerts.
    Hosts,
    /// The access timeline: who did what, from where, to which file, with what outcome.
    Timeline(TimelineArgs),
    /// Login sessions: who, from where, when, how many PHI accesses.
    Sessions(SessionsArgs),
    /// Everything one login session did, in order, as a transcript.
    Replay(ReplayArgs),
    /// Re-verify the stored chain and checkpoints; names the first bad seq.
    Verify(VerifyArgs),
    /// Write an evidence bundle that verifies offline.
    Export(ExportArgs),
    /// Verify an evidence bundle offline (no collector or database needed).
    VerifyBundle(VerifyBundleArgs),
    /// Who queried or exported what (the collector's own hash-chained log).
    AccessLog(AccessLogArgs),
    /// Tamper alerts raised at ingest.
    Alerts(HostOpt),
    /// Legal holds: a held host's records are never removed by retention.
    #[command(subcommand)]
    Hold(HoldCommand),
    /// Apply the retention period now (admins; the collector also does it hourly).
    Prune(PruneArgs),
    /// Who may query: tokens, client certificates, roles.
    #[command(subcommand)]
    Principals(PrincipalsCommand),
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
    /// host's records over a certificate that names it. Also usable for API clients.
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

/// A point in time: RFC 3339 (2026-11-01T08:00:00Z), a UTC date or date and time
/// (2026-11-01, "2026-11-01 08:00"), "now", or a duration meaning that long ago (24h, 7days).
fn parse_time(s: &str) -> Result<Timestamp, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(timestamp(now_ns()));
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(timestamp(t.timestamp_nanos_opt().unwrap_or(0)));
    }
    for f in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Ok(timestamp(t.and_utc().timestamp_nanos_opt().unwrap_or(0)));
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let t = d.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
        return Ok(timestamp(t.timestamp_nanos_opt().unwrap_or(0)));
    }
    if let Ok(d) = humantime::parse_duration(s.trim_start_matches('-').trim_end_matches(" ago")) {
        return Ok(timestamp(
            now_ns() - i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        ));
    }
    Err(format!(
        "{s:?} is not a time: use 2026-11-01T08:00:00Z, 2026-11-01, \"2026-11-01 08:00\" (UTC), \
         now, or a duration like 24h meaning that long ago"
    ))
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[derive(Args)]
struct TimelineArgs {
    /// The host (every host when omitted).
    #[arg(long)]
    host: Option<String>,
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    since: Option<Timestamp>,
    /// Exclusive.
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    until: Option<Timestamp>,
    /// Login user, user name or uid.
    #[arg(long)]
    user: Option<String>,
    /// Only files (and programs, unix sockets) whose path starts with this.
    #[arg(long, value_name = "PREFIX")]
    path_prefix: Option<String>,
    /// Record kinds: open, exec, connect, exit, gap, agent, heartbeat, config-change
    /// (repeatable).
    #[arg(long = "kind", value_name = "KIND")]
    kinds: Vec<String>,
    /// One login session (from phictl sessions).
    #[arg(long)]
    session: Option<String>,
    /// At most this many records.
    #[arg(long, default_value_t = 0)]
    limit: u64,
}

#[derive(Args)]
struct SessionsArgs {
    #[arg(long)]
    host: Option<String>,
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    since: Option<Timestamp>,
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    until: Option<Timestamp>,
    #[arg(long)]
    user: Option<String>,
}

#[derive(Args)]
struct ReplayArgs {
    /// The session id (host/boot/audit-session, from phictl sessions).
    #[arg(long)]
    session: String,
}

#[derive(Args)]
struct VerifyArgs {
    /// The host to verify.
    #[arg(long, required_unless_present = "all")]
    host: Option<String>,
    /// Verify every host in the store.
    #[arg(long, conflicts_with = "host")]
    all: bool,
}

#[derive(Args)]
struct ExportArgs {
    #[arg(long)]
    host: String,
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    since: Timestamp,
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    until: Timestamp,
    /// Where to write the bundle (.tar.gz).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: PathBuf,
}

#[derive(Args)]
struct VerifyBundleArgs {
    /// The bundle (.tar.gz) written by phictl export.
    file: PathBuf,
}

#[derive(Args)]
struct AccessLogArgs {
    /// Entries after this seq.
    #[arg(long, default_value_t = 0)]
    after: u64,
    #[arg(long, default_value_t = 1000)]
    limit: u64,
    /// Also re-verify the whole log's hash chain (exit status 1 when it does not hold).
    #[arg(long)]
    verify: bool,
}

#[derive(Args)]
struct HostOpt {
    #[arg(long)]
    host: Option<String>,
}

#[derive(Subcommand)]
enum HoldCommand {
    /// Put a host under legal hold.
    Set {
        #[arg(long)]
        host: String,
        /// Why (the matter, the request), for the record.
        #[arg(long)]
        reason: String,
    },
    /// Release a host's legal hold.
    Release {
        #[arg(long)]
        host: String,
    },
}

#[derive(Args)]
struct PruneArgs {
    /// Only report what retention would remove.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
enum PrincipalsCommand {
    /// List principals.
    List,
    /// Add (or update) a principal; with --issue-token, prints its new token once.
    Add {
        name: String,
        /// auditor (read and export) or admin (also holds, pruning, principals).
        #[arg(long)]
        role: String,
        /// Issue a bearer token (printed once).
        #[arg(long)]
        issue_token: bool,
        /// A client certificate name that signs in as this principal.
        #[arg(long, value_name = "NAME")]
        cert_name: Option<String>,
    },
    /// Disable a principal (its token stops working at once).
    Disable { name: String },
}

/// A failure to report: message and exit status.
struct Failure(u8, String);

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure(2, format!("{e:#}"))
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let hint = match s.code() {
            tonic::Code::Unavailable if s.message().contains("transport") => {
                " (is the collector running, and is --collector its API address?)"
            }
            _ => "",
        };
        Failure(2, format!("{}{hint}", s.message()))
    }
}

/// Progress on a terminal (nothing otherwise), at most ten updates a second.
struct Progress {
    what: String,
    on: bool,
    last: Option<Instant>,
}

impl Progress {
    fn new(what: impl Into<String>) -> Progress {
        Progress {
            what: what.into(),
            on: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.on
            || self
                .last
                .is_some_and(|l| l.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        eprint!("\r{}: {done}/{total} records ({pct}%)   ", self.what);
        let _ = std::io::stderr().flush();
    }

    fn finish(&self) {
        if self.on && self.last.is_some() {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    }
}

fn json_line<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    let s = serde_json::to_string(v).map_err(|e| Failure(2, e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn json_pretty<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Failure(2, e.to_string()))?;
    println!("{s}");
    Ok(())
}

async fn connect(conn: &Conn) -> Result<Client, Failure> {
    match (&conn.collector, &conn.db) {
        (Some(_), Some(_)) => Err(Failure(
            2,
            "give either --collector (the API) or --db (the store), not both".into(),
        )),
        (None, Some(db)) => Ok(Client::local(db).await?),
        (Some(url), None) => {
            let token = match (&conn.token, &conn.token_file) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(f)) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("cannot read the token file {}", f.display()))?
                        .trim()
                        .to_owned(),
                ),
                (None, None) => None,
            }
            .filter(|t| !t.trim().is_empty());
            Ok(Client::remote(&Remote {
                url: url.clone(),
                token,
                ca: conn.ca.clone(),
                cert: conn.cert.clone(),
                key: conn.key.clone(),
                server_name: conn.server_name.clone(),
            })
            .await?)
        }
        (None, None) => Err(Failure(
            2,
            "where from? give --collector https://HOST:4434 (with --token and --ca) or \
             --db sqlite:PATH (or set PHICTL_COLLECTOR / PHICTL_DB)"
                .into(),
        )),
    }
}

fn hosts_table(hosts: &[HostSummary]) -> String {
    let mut t = format::Table::new(&[
        "HOST",
        "KEY ID",
        "AGENT",
        "FIRST SEEN",
        "LAST SEEN",
        "LAST RECORD",
        "HEAD",
        "SIGNED",
        "PRUNED",
        "ALERTS",
        "LEGAL HOLD",
    ]);
    for h in hosts {
        t.row(vec![
            h.host_id.clone(),
            hex::encode(&h.key_id[..h.key_id.len().min(8)]),
            h.agent_version.clone(),
            format::short_time(h.first_seen.as_ref()),
            format::short_time(h.last_seen.as_ref()),
            format::short_time(h.last_record_time.as_ref()),
            h.head_seq.to_string(),
            h.checkpoint_seq.to_string(),
            h.pruned_through.to_string(),
            h.alerts.to_string(),
            h.hold
                .as_ref()
                .map_or_else(|| "-".into(), |d| format!("{} (by {})", d.reason, d.set_by)),
        ]);
    }
    t.render()
}

fn print_report(r: &VerifyReport) {
    let key = hex::encode(&r.key_id[..r.key_id.len().min(8)]);
    if r.ok {
        println!(
            "{}: OK: {} records (seq {} to {}), {} checkpoints, signed through seq {}; key {key}",
            r.host_id, r.records, r.first_seq, r.last_seq, r.checkpoints, r.signed_through
        );
    } else {
        let first = &r.problems[0];
        println!(
            "{}: FAILED: first bad seq {}: {}",
            r.host_id, first.seq, first.detail
        );
        for p in &r.problems[1..] {
            println!("  seq {}: {} ({})", p.seq, p.detail, p.kind);
        }
        println!(
            "  checked {} records, {} checkpoints; key {key}",
            r.records, r.checkpoints
        );
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.format == Format::Json;
    match cli.command {
        Command::Certs(CertsCommand::Init(a)) => {
            let w = phi_collector::certs::init(&a.dir, &a.hosts, &a.collector_names)?;
            println!("CA: {}", w.ca.display());
            for f in w.kept {
                println!("kept {} (already present)", f.display());
            }
            for f in w.files {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
        Command::VerifyBundle(a) => {
            let file = std::fs::File::open(&a.file)
                .with_context(|| format!("cannot open {}", a.file.display()))?;
            let mut progress = Progress::new("verifying the bundle");
            let report = phi_collector::export::verify_bundle(file, &mut |d, t| {
                progress.update(d, t);
            })
            .map_err(|e| Failure(2, format!("{}: {e}", a.file.display())))?;
            progress.finish();
            let m = &report.manifest;
            if json {
                json_pretty(&serde_json::json!({
                    "ok": report.ok,
                    "problems": report.problems,
                    "notes": report.notes,
                    "records": report.records,
                    "checkpoints": report.checkpoints,
                    "signedThrough": report.signed_through,
                    "manifest": m,
                }))?;
            } else {
                if report.ok {
                    println!(
                        "{}: OK: host {}, {} records (seq {} to {}), {} checkpoints, signed \
                         through seq {}",
                        a.file.display(),
                        m.host_id,
                        report.records,
                        m.first_seq,
                        m.last_seq,
                        report.checkpoints,
                        report.signed_through
                    );
                } else {
                    println!("{}: FAILED: {}", a.file.display(), report.problems[0]);
                    for p in &report.problems[1..] {
                        println!("  {p}");
                    }
                }
                println!(
                    "  window {} to {} (records {} to {}); exported {} by {} from {}",
                    m.since,
                    m.until,
                    m.window_first_seq,
                    m.window_last_seq,
                    m.created,
                    m.created_by,
                    m.collector
                );
                println!("  host key id {} (compare with a trusted source)", m.key_id);
                for n in &report.notes {
                    println!("  note: {n}");
                }
            }
            if report.ok {
                Ok(())
            } else {
                Err(Failure(1, String::new()))
            }
        }
        command => {
            let mut c = connect(&cli.conn).await?;
            remote_command(&mut c, command, json).await
        }
    }
}

async fn remote_command(c: &mut Client, command: Command, json: bool) -> Result<(), Failure> {
    match command {
        Command::Certs(_) | Command::VerifyBundle(_) => unreachable!("handled without a client"),
        Command::Whoami => {
            let w = c.whoami().await?;
            if json {
                json_pretty(&w)?;
            } else {
                println!("{} ({}, signed in by {})", w.principal, w.role, w.method);
            }
        }
        Command::Hosts => {
            let h = c.hosts().await?;
            if json {
                json_pretty(&h)?;
            } else if h.hosts.is_empty() {
                println!("no hosts yet");
            } else {
                print!("{}", hosts_table(&h.hosts));
            }
        }
        Command::Timeline(a) => {
            let with_host = a.host.is_none();
            let mut rx = c
                .timeline(TimelineRequest {
                    host: a.host.unwrap_or_default(),
                    since: a.since,
                    until: a.until,
                    user: a.user.unwrap_or_default(),
                    path_prefix: a.path_prefix.unwrap_or_default(),
                    kinds: a.kinds,
                    session: a.session.unwrap_or_default(),
                    limit: a.limit,
                })
                .await?;
            let mut page = Vec::new();
            let mut any = false;
            while let Some(item) = rx.recv().await {
                let item = item?;
                if json {
                    json_line(&item)?;
                    continue;
                }
                page.push(item);
                // Print in blocks so a long timeline starts showing at once.
                if page.len() == 500 {
                    let text = format::timeline(&page, with_host);
                    print!("{}", if any { skip_header(&text) } else { &text });
                    any = true;
                    page.clear();
                }
            }
            if !json {
                if !page.is_empty() {
                    let text = format::timeline(&page, with_host);
                    print!("{}", if any { skip_header(&text) } else { &text });
                } else if !any {
                    println!("no records match");
                }
            }
        }
        Command::Sessions(a) => {
            let s = c
                .sessions(SessionsRequest {
                    host: a.host.unwrap_or_default(),
                    since: a.since,
                    until: a.until,
                    user: a.user.unwrap_or_default(),
                })
                .await?;
            if json {
                json_pretty(&s)?;
            } else if s.sessions.is_empty() {
                println!("no login sessions match");
            } else {
                let mut t = format::Table::new(&[
                    "SESSION",
                    "USER",
                    "KIND",
                    "FROM",
                    "TTY",
                    "FIRST (UTC)",
                    "LAST (UTC)",
                    "RECORDS",
                    "PHI ACCESSES",
                    "DENIED",
                    "EXECS",
                ]);
                for x in &s.sessions {
                    let from = if x.source_address.is_empty() {
                        "-".into()
                    } else {
                        format!("{}:{}", x.source_address, x.source_port)
                    };
                    t.row(vec![
                        x.session.clone(),
                        x.user.clone(),
                        x.kind.clone(),
                        from,
                        if x.tty.is_empty() {
                            "-".into()
                        } else {
                            x.tty.clone()
                        },
                        format::time(x.first.as_ref()),
                        format::time(x.last.as_ref()),
                        x.records.to_string(),
                        x.phi_accesses.to_string(),
                        x.denied.to_string(),
                        x.execs.to_string(),
                    ]);
                }
                print!("{}", t.render());
            }
        }
        Command::Replay(a) => {
            let mut rx = c.replay(ReplayRequest { session: a.session }).await?;
            let mut n = 0u64;
            while let Some(item) = rx.recv().await {
                let item = item?;
                if json {
                    json_line(&item)?;
                    continue;
                }
                if let Some(s) = item.session {
                    let from = if s.source_address.is_empty() {
                        String::new()
                    } else {
                        format!(" from {}:{}", s.source_address, s.source_port)
                    };
                    println!(
                        "Session {}: {} ({}{}{}), host {}, {} to {} UTC",
                        s.session,
                        s.user,
                        if s.kind.is_empty() { "login" } else { &s.kind },
                        from,
                        if s.tty.is_empty() {
                            String::new()
                        } else {
                            format!(" on {}", s.tty)
                        },
                        s.host_id,
                        format::time(s.first.as_ref()),
                        format::time(s.last.as_ref()),
                    );
                    println!(
                        "{} records: {} PHI accesses ({} denied), {} programs run",
                        s.records, s.phi_accesses, s.denied, s.execs
                    );
                    println!();
                }
                if let Some(r) = item.record {
                    println!("{}", format::transcript_line(&r));
                    n += 1;
                }
            }
            if !json && n == 0 {
                println!("(no records)");
            }
        }
        Command::Verify(a) => {
            let hosts = if a.all {
                c.hosts()
                    .await?
                    .hosts
                    .into_iter()
                    .map(|h| h.host_id)
                    .collect()
            } else {
                vec![a.host.unwrap_or_default()]
            };
            let mut failed = false;
            for host in hosts {
                let mut rx = c.verify(VerifyRequest { host: host.clone() }).await?;
                let mut progress = Progress::new(format!("verifying {host}"));
                let mut report = None;
                while let Some(p) = rx.recv().await {
                    let p = p?;
                    progress.update(p.done, p.total);
                    if p.report.is_some() {
                        report = p.report;
                    }
                }
                progress.finish();
                let report = report
                    .ok_or_else(|| Failure(2, "verification ended without a report".into()))?;
                failed |= !report.ok;
                if json {
                    json_line(&report)?;
                } else {
                    print_report(&report);
                }
            }
            if failed {
                return Err(Failure(1, String::new()));
            }
        }
        Command::Export(a) => {
            let mut rx = c
                .export(ExportRequest {
                    host: a.host.clone(),
                    since: Some(a.since),
                    until: Some(a.until),
                })
                .await?;
            let dir = a
                .output
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let mut tmp = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("cannot write in {}", dir.display()))?;
            let mut progress = Progress::new(format!("exporting {}", a.host));
            let mut bytes = 0u64;
            while let Some(chunk) = rx.recv().await {
                let chunk = chunk?;
                if chunk.data.is_empty() {
                    progress.update(chunk.done, chunk.total);
                } else {
                    tmp.write_all(&chunk.data).context("writing the bundle")?;
                    bytes += chunk.data.len() as u64;
                }
            }
            progress.finish();
            if bytes == 0 {
                return Err(Failure(2, "the collector sent no bundle".into()));
            }
            tmp.as_file().sync_all().context("writing the bundle")?;
            tmp.persist(&a.output)
                .map_err(|e| Failure(2, format!("cannot write {}: {e}", a.output.display())))?;
            // Check what was written, so a bad bundle is noticed now rather than in court.
            let file = std::fs::File::open(&a.output)
                .with_context(|| format!("cannot reopen {}", a.output.display()))?;
            let report = phi_collector::export::verify_bundle(file, &mut |_, _| {})
                .map_err(|e| Failure(2, e.to_string()))?;
            let mut file = std::fs::File::open(&a.output)
                .with_context(|| format!("cannot reopen {}", a.output.display()))?;
            let (_, sha256) = phi_collector::export::file_digest(&mut file)
                .with_context(|| format!("cannot read {}", a.output.display()))?;
            let m = &report.manifest;
            if json {
                json_pretty(&serde_json::json!({
                    "file": a.output,
                    "bytes": bytes,
                    "sha256": sha256,
                    "ok": report.ok,
                    "manifest": m,
                }))?;
            } else {
                println!(
                    "wrote {} ({bytes} bytes): host {}, {} records (seq {} to {}), {} in the \
                     window; verifies: {}",
                    a.output.display(),
                    m.host_id,
                    m.records,
                    m.first_seq,
                    m.last_seq,
                    if m.window_first_seq == 0 {
                        0
                    } else {
                        m.window_last_seq - m.window_first_seq + 1
                    },
                    if report.ok { "yes" } else { "NO" }
                );
                println!("  SHA-256 {sha256} (also in the collector's access log)");
                for n in &report.notes {
                    println!("  note: {n}");
                }
            }
            if !report.ok {
                return Err(Failure(
                    1,
                    format!(
                        "the exported bundle does not verify: {}",
                        report.problems[0]
                    ),
                ));
            }
        }
        Command::AccessLog(a) => {
            let r = c
                .access_log(AccessLogRequest {
                    after: a.after,
                    limit: a.limit,
                    verify: a.verify,
                })
                .await?;
            if json {
                json_pretty(&r)?;
            } else {
                let mut t = format::Table::new(&[
                    "SEQ",
                    "TIME (UTC)",
                    "WHO",
                    "ROLE",
                    "HOW",
                    "ACTION",
                    "OUTCOME",
                    "REQUEST",
                    "DETAIL",
                ]);
                for e in &r.entries {
                    t.row(vec![
                        e.seq.to_string(),
                        format::time(e.time.as_ref()),
                        e.principal.clone(),
                        e.role.clone(),
                        e.method.clone(),
                        e.action.clone(),
                        e.outcome.clone(),
                        e.request.clone(),
                        e.detail.clone(),
                    ]);
                }
                print!("{}", t.render());
                if a.verify {
                    if r.verified {
                        println!("access log: hash chain verified");
                    } else {
                        println!(
                            "access log: FAILED at entry {}: {}",
                            r.first_bad_seq, r.problem
                        );
                    }
                }
            }
            if a.verify && !r.verified {
                return Err(Failure(1, String::new()));
            }
        }
        Command::Alerts(a) => {
            let r = c
                .alerts(AlertsRequest {
                    host: a.host.unwrap_or_default(),
                })
                .await?;
            if json {
                json_pretty(&r)?;
            } else if r.alerts.is_empty() {
                println!("no tamper alerts");
            } else {
                let mut t =
                    format::Table::new(&["ID", "TIME (UTC)", "HOST", "KIND", "SEQ", "DETAIL"]);
                for x in &r.alerts {
                    t.row(vec![
                        x.id.to_string(),
                        format::time(x.time.as_ref()),
                        x.host_id.clone(),
                        x.kind.clone(),
                        x.seq.to_string(),
                        x.detail.clone(),
                    ]);
                }
                print!("{}", t.render());
            }
        }
        Command::Hold(h) => {
            let req = match h {
                HoldCommand::Set { host, reason } => HoldRequest {
                    host,
                    hold: true,
                    reason,
                },
                HoldCommand::Release { host } => HoldRequest {
                    host,
                    hold: false,
                    reason: String::new(),
                },
            };
            let r = c.hold(req).await?;
            if json {
                json_pretty(&r)?;
            } else if let Some(h) = r.host {
                match h.hold {
                    Some(d) => println!(
                        "{}: under legal hold ({}, by {})",
                        h.host_id, d.reason, d.set_by
                    ),
                    None => println!("{}: no legal hold", h.host_id),
                }
            }
        }
        Command::Prune(a) => {
            let r = c.prune(PruneRequest { dry_run: a.dry_run }).await?;
            if json {
                json_pretty(&r)?;
            } else {
                println!(
                    "retention {} (records before {} UTC){}",
                    humantime::format_duration(Duration::from_secs(r.retention_seconds)),
                    format::time(r.cutoff.as_ref()),
                    if a.dry_run { ": dry run" } else { "" }
                );
                let mut t = format::Table::new(&["HOST", "THROUGH SEQ", "RECORDS", "SKIPPED"]);
                for h in &r.hosts {
                    t.row(vec![
                        h.host_id.clone(),
                        h.through_seq.to_string(),
                        h.records.to_string(),
                        if h.skipped.is_empty() {
                            "-".into()
                        } else {
                            h.skipped.clone()
                        },
                    ]);
                }
                print!("{}", t.render());
            }
        }
        Command::Principals(p) => match p {
            PrincipalsCommand::List => {
                let r = c.principals().await?;
                if json {
                    json_pretty(&r)?;
                } else {
                    let mut t = format::Table::new(&[
                        "NAME",
                        "ROLE",
                        "TOKEN",
                        "CERTIFICATE",
                        "DISABLED",
                        "CREATED (UTC)",
                    ]);
                    for x in &r.principals {
                        t.row(vec![
                            x.name.clone(),
                            x.role.clone(),
                            if x.has_token { "yes" } else { "-" }.into(),
                            if x.cert_name.is_empty() {
                                "-".into()
                            } else {
                                x.cert_name.clone()
                            },
                            if x.disabled { "yes" } else { "-" }.into(),
                            format::time(x.created.as_ref()),
                        ]);
                    }
                    print!("{}", t.render());
                }
            }
            PrincipalsCommand::Add {
                name,
                role,
                issue_token,
                cert_name,
            } => {
                let r = c
                    .add_principal(AddPrincipalRequest {
                        name,
                        role,
                        cert_name: cert_name.unwrap_or_default(),
                        token: issue_token,
                    })
                    .await?;
                if json {
                    json_pretty(&r)?;
                } else if let Some(p) = r.principal {
                    println!("{} ({})", p.name, p.role);
                    if !r.token.is_empty() {
                        println!("token (shown once; keep it secret): {}", r.token);
                    }
                }
            }
            PrincipalsCommand::Disable { name } => {
                let p = c
                    .disable_principal(DisablePrincipalRequest { name })
                    .await?;
                if json {
                    json_pretty(&p)?;
                } else {
                    println!("{}: disabled", p.name);
                }
            }
        },
    }
    Ok(())
}

fn skip_header(text: &str) -> &str {
    text.split_once('\n').map_or("", |(_, rest)| rest)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("phictl: error: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            if !msg.is_empty() {
                eprintln!("phictl: error: {msg}");
            }
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use phi_collector::api::ns;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn times_parse_in_every_documented_form() {
        let day = parse_time("2026-11-01").expect("date");
        assert_eq!(ns(&day), 1_793_491_200 * 1_000_000_000);
        assert_eq!(parse_time("2026-11-01T00:00:00Z").expect("rfc3339"), day);
        assert_eq!(
            ns(&parse_time("2026-11-01 01:30").expect("date time")),
            (1_793_491_200 + 5400) * 1_000_000_000
        );
        let ago = ns(&parse_time("2h").expect("duration"));
        assert!((now_ns() - ago - 7_200_000_000_000).abs() < 5_000_000_000);
        assert!(parse_time("yesterday-ish").is_err());
    }
}
