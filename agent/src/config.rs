//! Configuration: a TOML file, overridden by command-line flags. Unknown keys are errors, and
//! everything is validated before a probe is loaded.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use std::time::Duration;

use crate::{
    journal::{JournalConfig, WhenFull},
    probes,
    redact::rules::RedactionConfig,
};

/// The configuration file's contents.
#[derive(Debug, Default, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Identifier of this host in the records.
    pub host_id: Option<String>,
    /// Directory trees to watch.
    #[serde(default)]
    pub watch: Vec<PathBuf>,
    /// Write records as JSON lines to standard output.
    pub stdout: Option<bool>,
    /// Kernel ring buffer size in bytes.
    pub ring_buffer_bytes: Option<u64>,
    /// Record connect calls (default true).
    pub connect: Option<bool>,
    /// Local ports of services whose accepted inbound connections are recorded (default
    /// none: accept is not recorded).
    #[serde(default)]
    pub accept_ports: Vec<u32>,
    /// "auto" (default): fexit sensors where the kernel allows them; "tracepoints": never.
    pub sensors: Option<probes::sensors::SensorMode>,
    /// Where the agent keeps its state (keys, chain); default /var/lib/phi-audit.
    pub state_dir: Option<PathBuf>,
    /// Redaction rules and pseudonym key.
    #[serde(default)]
    pub redaction: RedactionConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub chain: ChainConfig,
    /// Where records are streamed (gRPC over mutual TLS).
    pub collector: Option<CollectorConfig>,
    /// Health and metrics over plain HTTP ("ADDR:PORT" or "off"; default 127.0.0.1:9464).
    pub metrics_listen: Option<String>,
}

/// `[spool]`: the durable on-disk log of records awaiting acknowledgement.
#[derive(Debug, Default, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Default `<state_dir>/spool`.
    pub dir: Option<PathBuf>,
    /// Size limit in bytes (default 1 GiB).
    pub max_bytes: Option<u64>,
    /// "drop-newest" (default) or "block".
    pub when_full: Option<WhenFull>,
}

/// `[chain]`: checkpoints and heartbeats.
#[derive(Debug, Default, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// A signed checkpoint after this many records (default 1000)...
    pub checkpoint_records: Option<u64>,
    /// ...or this many seconds (default 60), whichever comes first.
    pub checkpoint_seconds: Option<u64>,
    /// A heartbeat record after this many idle seconds (default 30).
    pub heartbeat_seconds: Option<u64>,
}

/// `[collector]`: where and how records are streamed.
#[derive(Debug, Default, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// `https://host:port`.
    pub url: Option<String>,
    /// CA certificate (PEM) that signed the collector's certificate.
    pub ca: Option<PathBuf>,
    /// This agent's certificate (PEM); its name must be the host id.
    pub cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    pub key: Option<PathBuf>,
    /// Name the collector's certificate must carry (default: the URL's host).
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }
}

/// Flags that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub watch: Vec<PathBuf>,
    pub stdout: bool,
    pub host_id: Option<String>,
    pub ring_buffer_bytes: Option<u64>,
    pub no_connect: bool,
    pub accept_ports: Vec<u32>,
    pub sensors: Option<probes::sensors::SensorMode>,
    pub state_dir: Option<PathBuf>,
    pub spool_dir: Option<PathBuf>,
    pub collector: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub metrics_listen: Option<String>,
}

/// Default address of the health and metrics endpoints.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/phi-audit";

/// The effective settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host_id: String,
    pub watch: Vec<PathBuf>,
    pub stdout: bool,
    pub ring_buffer_bytes: u32,
    pub connect: bool,
    /// Local ports whose accepted connections are recorded, sorted, without repeats.
    pub accept_ports: Vec<u16>,
    pub sensors: probes::sensors::SensorMode,
    pub state_dir: PathBuf,
    pub redaction: RedactionConfig,
    pub journal: JournalConfig,
    pub heartbeat: Duration,
    pub collector: Option<Collector>,
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// A collector to stream to, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collector {
    pub url: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server_name: String,
}

impl Settings {
    /// The pseudonym key file: configured, or `<state_dir>/redaction.key`.
    pub fn redaction_key_file(&self) -> PathBuf {
        self.redaction
            .key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("redaction.key"))
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Combines file and flags: flags win; watch lists are joined.
pub fn merge(file: &FileConfig, flags: &Overrides) -> Result<Settings, ConfigError> {
    let mut watch = flags.watch.clone();
    for w in &file.watch {
        if !watch.contains(w) {
            watch.push(w.clone());
        }
    }
    let ring = flags
        .ring_buffer_bytes
        .or(file.ring_buffer_bytes)
        .map_or(Ok(probes::default_ring_buffer_bytes()), |b| {
            probes::validate_ring_buffer_bytes(b).map_err(ConfigError::Invalid)
        })?;
    let host_id = flags
        .host_id
        .clone()
        .or_else(|| file.host_id.clone())
        .unwrap_or_else(hostname);
    if host_id.is_empty() || host_id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ConfigError::Invalid(format!(
            "host id {host_id:?} must be non-empty without spaces or control characters"
        )));
    }
    let state_dir = flags
        .state_dir
        .clone()
        .or_else(|| file.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let collector = collector(file.collector.as_ref(), flags)?;
    let chain = &file.chain;
    let positive = |v: Option<u64>, name: &str, default: u64| match v {
        Some(0) => Err(ConfigError::Invalid(format!(
            "[chain] {name} must be at least 1"
        ))),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let journal = JournalConfig {
        spool_dir: flags
            .spool_dir
            .clone()
            .or_else(|| file.spool.dir.clone())
            .unwrap_or_else(|| state_dir.join("spool")),
        max_bytes: match file.spool.max_bytes {
            Some(b) if b < 1 << 20 => {
                return Err(ConfigError::Invalid(format!(
                    "[spool] max_bytes {b} is below the 1 MiB minimum"
                )));
            }
            Some(b) => b,
            None => 1 << 30,
        },
        when_full: file.spool.when_full.unwrap_or_default(),
        checkpoint_records: positive(chain.checkpoint_records, "checkpoint_records", 1000)?,
        checkpoint_interval: Duration::from_secs(positive(
            chain.checkpoint_seconds,
            "checkpoint_seconds",
            60,
        )?),
        local_only: collector.is_none(),
    };
    let heartbeat =
        Duration::from_secs(positive(chain.heartbeat_seconds, "heartbeat_seconds", 30)?);
    let metrics_listen = phi_telemetry::parse_listen(
        flags
            .metrics_listen
            .as_deref()
            .or(file.metrics_listen.as_deref())
            .unwrap_or(DEFAULT_METRICS_LISTEN),
        "metrics_listen",
    )
    .map_err(ConfigError::Invalid)?;
    let accept_ports = accept_ports(&flags.accept_ports, &file.accept_ports)?;
    let settings = Settings {
        host_id,
        watch,
        stdout: flags.stdout || file.stdout.unwrap_or(false),
        ring_buffer_bytes: ring,
        connect: !flags.no_connect && file.connect.unwrap_or(true),
        accept_ports,
        sensors: flags.sensors.or(file.sensors).unwrap_or_default(),
        state_dir,
        redaction: file.redaction.clone(),
        journal,
        heartbeat,
        collector,
        metrics_listen,
    };
    if !settings.stdout && settings.collector.is_none() {
        return Err(ConfigError::Invalid(
            "records have nowhere to go: give --collector URL (with --tls-ca, --tls-cert and \
             --tls-key) and/or --stdout"
                .into(),
        ));
    }
    Ok(settings)
}

/// The accept ports of the flags and the file together, checked: each a TCP port (1-65535),
/// at most `MAX_ACCEPT_PORTS` of them.
fn accept_ports(flags: &[u32], file: &[u32]) -> Result<Vec<u16>, ConfigError> {
    let mut ports = Vec::new();
    for &p in flags.iter().chain(file) {
        let port = u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "accept port {p} is not a TCP port: give ports from 1 to 65535 (accept_ports \
                 in the config file, or --accept-port)"
            ))
        })?;
        ports.push(port);
    }
    ports.sort_unstable();
    ports.dedup();
    let max = agent_common::limits::MAX_ACCEPT_PORTS as usize;
    if ports.len() > max {
        return Err(ConfigError::Invalid(format!(
            "{} accept ports given; at most {max} can be watched",
            ports.len()
        )));
    }
    Ok(ports)
}

/// Resolves the collector from the `[collector]` section and the flags.
fn collector(
    file: Option<&CollectorConfig>,
    flags: &Overrides,
) -> Result<Option<Collector>, ConfigError> {
    let empty = CollectorConfig::default();
    let file = file.unwrap_or(&empty);
    let Some(url) = flags.collector.clone().or_else(|| file.url.clone()) else {
        return Ok(None);
    };
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(ConfigError::Invalid(format!(
            "collector URL {url:?} must start with https:// (records travel only over TLS)"
        )));
    };
    let host = rest
        .split(['/', ':'])
        .next()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| ConfigError::Invalid(format!("collector URL {url:?} has no host")))?;
    let need = |flag: Option<&PathBuf>, file: Option<&PathBuf>, what: &str, name: &str| {
        flag.or(file).cloned().ok_or_else(|| {
            ConfigError::Invalid(format!(
                "streaming to {url} needs {what}: give --{name} or `{key}` in [collector]",
                key = name.trim_start_matches("tls-")
            ))
        })
    };
    let ca = need(
        flags.tls_ca.as_ref(),
        file.ca.as_ref(),
        "the CA certificate",
        "tls-ca",
    )?;
    let cert = need(
        flags.tls_cert.as_ref(),
        file.cert.as_ref(),
        "this agent's certificate",
        "tls-cert",
    )?;
    let key = need(
        flags.tls_key.as_ref(),
        file.key.as_ref(),
        "this agent's private key",
        "tls-key",
    )?;
    for (path, what) in [
        (&ca, "CA certificate"),
        (&cert, "certificate"),
        (&key, "private key"),
    ] {
        if let Err(e) = std::fs::metadata(path) {
            return Err(ConfigError::Invalid(format!(
                "cannot read the {what} {}: {e}",
                path.display()
            )));
        }
    }
    Ok(Some(Collector {
        server_name: file.server_name.clone().unwrap_or_else(|| host.to_owned()),
        url,
        ca,
        cert,
        key,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_keys_with_the_key_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "watch = [\"/tmp\"]\nwatsh = 1\n").expect("write");
        let err = FileConfig::load(&p).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("watsh"), "{msg}");
        assert!(msg.contains(&p.display().to_string()), "{msg}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.example.toml");
        // The example names certificates under /etc/phi-audit/pki: put them somewhere real.
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["ca.pem", "ehr-db-01.pem", "ehr-db-01.key"] {
            std::fs::write(dir.path().join(f), "PEM").expect("write");
        }
        let text = std::fs::read_to_string(&example)
            .expect("example")
            .replace("/etc/phi-audit/pki", &dir.path().display().to_string());
        assert!(text.contains("[collector]"));
        let copy = dir.path().join("agent.toml");
        std::fs::write(&copy, text).expect("write");
        let file = FileConfig::load(&copy).expect("example config parses");
        assert_eq!(file.watch.len(), 2);
        let s = merge(&file, &Overrides::default()).expect("example config is valid");
        assert_eq!(s.host_id, "ehr-db-01");
        crate::redact::rules::build(&s.redaction).expect("example redaction rules are valid");
        assert_eq!(s.redaction.rules.len(), 1);
        assert_eq!(s.journal.max_bytes, 1 << 30);
        assert_eq!(s.journal.checkpoint_records, 1000);
        assert_eq!(
            s.metrics_listen,
            Some("127.0.0.1:9464".parse().expect("addr"))
        );
        let off = Overrides {
            metrics_listen: Some("off".into()),
            ..Overrides::default()
        };
        assert_eq!(merge(&file, &off).expect("valid").metrics_listen, None);
        let bad = Overrides {
            metrics_listen: Some("9464".into()),
            ..Overrides::default()
        };
        let err = merge(&file, &bad).expect_err("not an address");
        assert!(err.to_string().contains("ADDR:PORT"), "{err}");
        let c = s.collector.expect("the example streams to a collector");
        assert_eq!(c.url, "https://collector.example:4433");
        assert_eq!(c.server_name, "collector.example");
    }

    #[test]
    fn flags_override_file_and_watch_lists_join() {
        let file = FileConfig {
            host_id: Some("file-host".into()),
            watch: vec!["/a".into(), "/b".into()],
            stdout: Some(true),
            ring_buffer_bytes: Some(1 << 20),
            connect: Some(true),
            ..Default::default()
        };
        let flags = Overrides {
            watch: vec!["/b".into(), "/c".into()],
            host_id: Some("flag-host".into()),
            no_connect: true,
            ..Default::default()
        };
        let s = merge(&file, &flags).expect("valid");
        assert_eq!(s.host_id, "flag-host");
        assert_eq!(s.watch, vec![PathBuf::from("/b"), "/c".into(), "/a".into()]);
        assert_eq!(s.ring_buffer_bytes, 1 << 20);
        assert!(!s.connect);
        assert!(s.stdout);
    }

    #[test]
    fn validates_before_anything_runs() {
        let file = FileConfig::default();
        let no_sink = merge(&file, &Overrides::default()).expect_err("no sink");
        assert!(no_sink.to_string().contains("--stdout"));
        let plain = Overrides {
            collector: Some("http://c:1".into()),
            ..Default::default()
        };
        assert!(
            merge(&file, &plain)
                .expect_err("plain http")
                .to_string()
                .contains("https://")
        );
        let no_certs = Overrides {
            collector: Some("https://c:1".into()),
            ..Default::default()
        };
        let err = merge(&file, &no_certs)
            .expect_err("no certificates")
            .to_string();
        assert!(err.contains("--tls-ca"), "{err}");
        let bad_ring = Overrides {
            stdout: true,
            ring_buffer_bytes: Some(5000),
            ..Default::default()
        };
        let err = merge(&file, &bad_ring).expect_err("not a power of two");
        assert!(err.to_string().contains("power of two"), "{err}");
        let bad_host = Overrides {
            stdout: true,
            host_id: Some("a b".into()),
            ..Default::default()
        };
        assert!(merge(&file, &bad_host).is_err());
    }

    #[test]
    fn the_kubernetes_config_map_holds_a_valid_config() {
        let yaml = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/agent-configmap.yaml"),
        )
        .expect("read the config map");
        let (_, block) = yaml
            .split_once("agent.toml: |\n")
            .expect("an agent.toml entry");
        let text: String = block
            .lines()
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        let file: FileConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(file.watch, vec![PathBuf::from("/srv/ehr")]);
        assert!(
            file.collector.is_some(),
            "the DaemonSet streams to the collector"
        );
    }

    #[test]
    fn accept_ports_join_and_are_checked() {
        let file = FileConfig {
            stdout: Some(true),
            accept_ports: vec![5432, 22],
            ..Default::default()
        };
        let flags = Overrides {
            accept_ports: vec![443, 22],
            ..Default::default()
        };
        let s = merge(&file, &flags).expect("valid");
        assert_eq!(s.accept_ports, vec![22, 443, 5432]);
        assert!(
            merge(
                &FileConfig::default(),
                &Overrides {
                    stdout: true,
                    ..Default::default()
                }
            )
            .expect("valid")
            .accept_ports
            .is_empty(),
            "off unless ports are given"
        );
        for bad in [0, 65536] {
            let flags = Overrides {
                stdout: true,
                accept_ports: vec![bad],
                ..Default::default()
            };
            let err = merge(&FileConfig::default(), &flags).expect_err("not a port");
            assert!(
                err.to_string()
                    .contains(&format!("accept port {bad} is not a TCP port")),
                "{err}"
            );
        }
        let text = "stdout = true\naccept_ports = [5432]\n";
        let parsed: FileConfig = toml::from_str(text).expect("parses");
        assert_eq!(parsed.accept_ports, vec![5432]);
    }
}
