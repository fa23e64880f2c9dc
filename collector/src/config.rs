//! `phi-collector serve` settings: a TOML file (`--config`), then flags, which override it.
//! Unknown keys are errors; everything is validated before a port is bound.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::ingest::Limits;

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address agents stream to.
    pub listen: Option<SocketAddr>,
    /// Address of the query API (gRPC and HTTP/JSON); "off" disables it.
    pub api_listen: Option<String>,
    /// Plain-HTTP health and metrics (`/healthz`, `/readyz`, `/metrics`); "off" disables it.
    pub metrics_listen: Option<String>,
    /// `sqlite:PATH` or `postgres://…`.
    pub db: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA that signs agent (and optional API client) certificates.
    pub client_ca: Option<PathBuf>,
    /// This collector's name in the access log (default: the host name).
    pub name: Option<String>,
    /// Retention period of the store ("6years").
    pub retention: Option<String>,
    pub log: Option<String>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// SIEM sinks, one `[[sinks]]` table each (see `crate::sinks`).
    #[serde(default)]
    pub sinks: Vec<crate::sinks::SinkConfig>,
    /// Alert rules, one `[[rules]]` table each (see `crate::rules`).
    #[serde(default)]
    pub rules: Vec<crate::rules::RuleConfig>,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub first_message_timeout: Option<u64>,
    pub idle_timeout: Option<u64>,
    pub max_batch: Option<usize>,
    pub max_message_bytes: Option<usize>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "config file {} is invalid: {}",
                path.display(),
                e.to_string().trim().replace('\n', " ")
            )
        })
    }
}

/// Flags (all optional: the file or the defaults fill in).
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub listen: Option<SocketAddr>,
    pub api_listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub db: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub name: Option<String>,
    pub retention: Option<String>,
    pub log: Option<String>,
    pub first_message_timeout: Option<u64>,
    pub idle_timeout: Option<u64>,
    pub max_batch: Option<usize>,
    pub max_message_bytes: Option<usize>,
}

/// Everything `serve` needs, resolved.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub api_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub db: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
    pub name: String,
    pub retention: Option<Duration>,
    pub log: String,
    pub limits: Limits,
    pub sinks: Vec<crate::sinks::SinkConfig>,
    pub rules: Vec<crate::rules::RuleConfig>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:4433";
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:4434";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9465";

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "collector".into())
}

pub fn resolve(file: FileConfig, flags: Flags) -> anyhow::Result<Settings> {
    let need = |flag: Option<PathBuf>, file: Option<PathBuf>, name: &str, key: &str| {
        flag.or(file).ok_or_else(|| {
            anyhow::anyhow!(
                "missing {name}: give --{key} or `{}` in the config file",
                key.replace('-', "_")
            )
        })
    };
    let api = flags.api_listen.or(file.api_listen);
    let api_listen = match api.as_deref().map(str::trim) {
        Some("off") => None,
        Some(a) => Some(a.parse().map_err(|_| {
            anyhow::anyhow!("--api-listen {a:?} is not an address (ADDR:PORT, or off)")
        })?),
        None => Some(DEFAULT_API_LISTEN.parse()?),
    };
    let retention = match flags.retention.or(file.retention) {
        Some(r) => Some(crate::retention::parse_period(&r).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let defaults = Limits::default();
    let l = file.limits;
    let limits = Limits {
        first_message: Duration::from_secs(
            flags
                .first_message_timeout
                .or(l.first_message_timeout)
                .unwrap_or(defaults.first_message.as_secs())
                .max(1),
        ),
        idle: Duration::from_secs(
            flags
                .idle_timeout
                .or(l.idle_timeout)
                .unwrap_or(defaults.idle.as_secs())
                .max(1),
        ),
        max_batch: flags
            .max_batch
            .or(l.max_batch)
            .unwrap_or(defaults.max_batch)
            .max(1),
        max_message_bytes: flags
            .max_message_bytes
            .or(l.max_message_bytes)
            .unwrap_or(defaults.max_message_bytes)
            .max(1024),
        ..defaults
    };
    let listen = flags
        .listen
        .or(file.listen)
        .unwrap_or(DEFAULT_LISTEN.parse()?);
    if Some(listen) == api_listen {
        anyhow::bail!("--listen and --api-listen are both {listen}: give them different ports");
    }
    let metrics_listen = phi_telemetry::parse_listen(
        flags
            .metrics_listen
            .as_deref()
            .or(file.metrics_listen.as_deref())
            .unwrap_or(DEFAULT_METRICS_LISTEN),
        "--metrics-listen",
    )
    .map_err(anyhow::Error::msg)?;
    if let Some(m) = metrics_listen
        && (m == listen || Some(m) == api_listen)
    {
        anyhow::bail!("--metrics-listen {m} is already the agents' or the API's port");
    }
    let settings = Settings {
        listen,
        api_listen,
        metrics_listen,
        db: flags.db.or(file.db).ok_or_else(|| {
            anyhow::anyhow!("missing the store: give --db sqlite:PATH or postgres://…")
        })?,
        tls_cert: need(
            flags.tls_cert,
            file.tls_cert,
            "the collector certificate",
            "tls-cert",
        )?,
        tls_key: need(flags.tls_key, file.tls_key, "the collector key", "tls-key")?,
        client_ca: need(
            flags.client_ca,
            file.client_ca,
            "the client CA",
            "client-ca",
        )?,
        name: flags.name.or(file.name).unwrap_or_else(host_name),
        retention,
        log: flags.log.or(file.log).unwrap_or_else(|| "info".into()),
        limits,
        sinks: file.sinks,
        rules: file.rules,
    };
    crate::sinks::config::validate(&settings.sinks).map_err(anyhow::Error::msg)?;
    crate::rules::config::validate(&settings.rules).map_err(anyhow::Error::msg)?;
    for (what, p) in [
        ("certificate", &settings.tls_cert),
        ("key", &settings.tls_key),
        ("client CA", &settings.client_ca),
    ] {
        if !p.exists() {
            anyhow::bail!(
                "the {what} {} does not exist (phictl certs init makes development ones)",
                p.display()
            );
        }
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["c.pem", "c.key", "ca.pem"] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let p = dir.path().join("collector.toml");
        std::fs::write(
            &p,
            format!(
                "db = \"sqlite:/x.db\"\ntls_cert = \"{0}/c.pem\"\ntls_key = \"{0}/c.key\"\n\
                 client_ca = \"{0}/ca.pem\"\nretention = \"7years\"\n[limits]\nmax_batch = 50\n",
                dir.path().display()
            ),
        )
        .expect("write");
        let file = FileConfig::load(&p).expect("load");
        let s = resolve(
            file,
            Flags {
                db: Some("postgres://u@h/db".into()),
                api_listen: Some("off".into()),
                ..Default::default()
            },
        )
        .expect("resolve");
        assert_eq!(s.db, "postgres://u@h/db");
        assert_eq!(s.api_listen, None);
        assert_eq!(s.limits.max_batch, 50);
        assert_eq!(s.retention.map(|d| d.as_secs()), Some(7 * 31_557_600));

        std::fs::write(&p, "dbb = 1\n").expect("write");
        let err = FileConfig::load(&p).expect_err("unknown key");
        assert!(err.to_string().contains("dbb"), "{err}");
        let err = resolve(FileConfig::default(), Flags::default()).expect_err("no db");
        assert!(err.to_string().contains("--db"), "{err}");
    }

    #[test]
    fn the_example_config_loads() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/collector.example.toml");
        let file = FileConfig::load(&example).expect("deploy/collector.example.toml loads");
        assert_eq!(file.listen, Some("0.0.0.0:4433".parse().expect("addr")));
        assert_eq!(file.api_listen.as_deref(), Some("127.0.0.1:4434"));
        assert_eq!(file.metrics_listen.as_deref(), Some("127.0.0.1:9465"));
        assert_eq!(
            file.db.as_deref(),
            Some("sqlite:/var/lib/phi-audit/collector.db")
        );
        assert_eq!(file.limits.max_batch, Some(10_000));
        let retention = file.retention.as_deref().expect("retention");
        assert_eq!(
            crate::retention::parse_period(retention).map(|d| d.as_secs()),
            Ok(6 * 31_557_600)
        );
        assert!(file.sinks.is_empty() && file.rules.is_empty());
    }

    #[test]
    fn the_siem_example_config_loads() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/collector.siem.example.toml");
        let file = FileConfig::load(&example).expect("deploy/collector.siem.example.toml loads");
        let kinds: Vec<&str> = file.sinks.iter().map(|s| s.kind()).collect();
        assert_eq!(kinds, ["splunk_hec", "ocsf_http", "ocsf_file", "syslog"]);
        for s in &file.sinks {
            s.delivery().expect("delivery settings");
        }
        crate::rules::config::validate(&file.rules).expect("rules");
        let kinds: Vec<&str> = file.rules.iter().map(|r| r.kind()).collect();
        assert_eq!(
            kinds,
            [
                "unauthorized-access",
                "bulk-access",
                "egress",
                "ingress",
                "unattributed-access",
                "gap",
                "silent-host"
            ]
        );
    }
}
