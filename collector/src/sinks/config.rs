//! Sink configuration: one `[[sinks]]` table per sink, chosen by `type = "…"`. Unknown keys
//! are refused; [`SinkConfig::validate`] checks everything else before a port is bound.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer};

/// A duration written as text: "500ms", "30s", "5m".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a duration ({e}); write it like \"500ms\", \"30s\" or \"5m\""
                ))
            })
    }
}

/// One sink.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkConfig {
    /// OCSF JSON lines in a local file, rotated by size.
    OcsfFile(OcsfFileConfig),
    /// OCSF JSON lines POSTed over HTTPS.
    OcsfHttp(OcsfHttpConfig),
    /// RFC 5424 syslog over TLS with octet-counting framing (RFC 5425).
    Syslog(SyslogConfig),
    /// Splunk HTTP Event Collector.
    SplunkHec(HecConfig),
}

/// How a sink follows the store (every sink has these, all optional).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Most events in one delivery [default: 500].
    pub batch: Option<usize>,
    /// First wait after a failed delivery; doubled after each failure [default: 500ms].
    pub retry_min: Option<HumanDuration>,
    /// Longest wait between attempts [default: 60s].
    pub retry_max: Option<HumanDuration>,
    /// How often the store is checked when nothing announces new records (other
    /// collectors sharing a PostgreSQL store) [default: 2s].
    pub poll: Option<HumanDuration>,
    /// Where a new sink starts: "beginning" (everything stored) or "end" (what arrives
    /// from now on) [default: beginning].
    pub start_at: Option<String>,
    /// Forward records and alerts ("all"), or alerts only ("alerts") [default: all].
    pub events: Option<String>,
}

/// Client TLS of a sink: the CA that signs the receiver's certificate (the system's roots
/// are not consulted) and an optional client certificate.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The name the receiver's certificate must carry [default: the host of the address].
    pub server_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OcsfFileConfig {
    pub name: String,
    /// The file events are appended to; rotated files get `.1`, `.2`, … (`.1` the newest).
    pub path: PathBuf,
    /// Rotate when the file would grow past this many bytes [default: 104857600].
    pub max_bytes: Option<u64>,
    /// Rotated files kept [default: 10].
    pub max_files: Option<u32>,
    #[serde(default)]
    pub delivery: DeliveryConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OcsfHttpConfig {
    pub name: String,
    /// `https://HOST:PORT/PATH`; each delivery is one POST of JSON lines.
    pub url: String,
    /// Extra request headers (authorization for the receiver).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Longest wait for an answer [default: 30s].
    pub timeout: Option<HumanDuration>,
    #[serde(default)]
    pub tls: ClientTlsConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    pub name: String,
    /// `HOST:PORT` of the syslog receiver's TLS port (usually 6514).
    pub address: String,
    /// Facility: "auth", "authpriv", "daemon", "local0" … "local7" [default: authpriv].
    pub facility: Option<String>,
    /// APP-NAME field [default: phi-audit].
    pub app_name: Option<String>,
    /// SD-ID of the structured data [default: phiaudit@32473, with the documentation
    /// enterprise number of RFC 5612: use your own].
    pub sd_id: Option<String>,
    /// Longest wait to connect or write [default: 30s].
    pub timeout: Option<HumanDuration>,
    #[serde(default)]
    pub tls: ClientTlsConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HecConfig {
    pub name: String,
    /// The collector's base URL, `https://HOST:8088`.
    pub url: String,
    /// The HEC token, or `token_file` with it.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub index: Option<String>,
    /// [default: phi-audit]
    pub source: Option<String>,
    /// [default: ocsf]
    pub sourcetype: Option<String>,
    /// Wait for indexer acknowledgement of every batch and resend what is not
    /// acknowledged in `ack_timeout` [default: true].
    pub ack: Option<bool>,
    /// [default: 60s]
    pub ack_timeout: Option<HumanDuration>,
    /// The request channel (a GUID) [default: derived from the sink's name].
    pub channel: Option<String>,
    /// Longest wait for an answer [default: 30s].
    pub timeout: Option<HumanDuration>,
    #[serde(default)]
    pub tls: ClientTlsConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
}

/// Which events a sink forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Events {
    All,
    AlertsOnly,
    /// Records only (the alert rules, which must not judge their own alerts).
    Records,
}

/// Resolved delivery settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub batch: usize,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub poll: Duration,
    pub start_at_end: bool,
    pub events: Events,
}

impl SinkConfig {
    pub fn name(&self) -> &str {
        match self {
            SinkConfig::OcsfFile(c) => &c.name,
            SinkConfig::OcsfHttp(c) => &c.name,
            SinkConfig::Syslog(c) => &c.name,
            SinkConfig::SplunkHec(c) => &c.name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::OcsfFile(_) => "ocsf_file",
            SinkConfig::OcsfHttp(_) => "ocsf_http",
            SinkConfig::Syslog(_) => "syslog",
            SinkConfig::SplunkHec(_) => "splunk_hec",
        }
    }

    fn delivery_config(&self) -> &DeliveryConfig {
        match self {
            SinkConfig::OcsfFile(c) => &c.delivery,
            SinkConfig::OcsfHttp(c) => &c.delivery,
            SinkConfig::Syslog(c) => &c.delivery,
            SinkConfig::SplunkHec(c) => &c.delivery,
        }
    }

    /// The delivery settings, with defaults.
    pub fn delivery(&self) -> Result<Delivery, String> {
        let d = self.delivery_config();
        let key = |k: &str| format!("sink {:?}: `delivery.{k}`", self.name());
        let retry_min = d.retry_min.map_or(Duration::from_millis(500), |h| h.0);
        let retry_max = d.retry_max.map_or(Duration::from_secs(60), |h| h.0);
        if retry_min.is_zero() || retry_max < retry_min {
            return Err(format!(
                "{} must be above zero and at most {}",
                key("retry_min"),
                key("retry_max")
            ));
        }
        let batch = d.batch.unwrap_or(500);
        if !(1..=10_000).contains(&batch) {
            return Err(format!("{} must be between 1 and 10000", key("batch")));
        }
        let start_at_end = match d.start_at.as_deref().unwrap_or("beginning") {
            "beginning" => false,
            "end" => true,
            other => {
                return Err(format!(
                    "{} is {other:?}: use \"beginning\" or \"end\"",
                    key("start_at")
                ));
            }
        };
        let events = match d.events.as_deref().unwrap_or("all") {
            "all" => Events::All,
            "alerts" => Events::AlertsOnly,
            other => {
                return Err(format!(
                    "{} is {other:?}: use \"all\" or \"alerts\"",
                    key("events")
                ));
            }
        };
        Ok(Delivery {
            batch,
            retry_min,
            retry_max,
            poll: d
                .poll
                .map_or(Duration::from_secs(2), |h| h.0)
                .max(Duration::from_millis(50)),
            start_at_end,
            events,
        })
    }
}

/// A sink name: it keys the sink's positions in the store and labels its metrics.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Checks every sink (names unique and valid, addresses, files, TLS material).
pub fn validate(sinks: &[SinkConfig]) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for (i, s) in sinks.iter().enumerate() {
        let name = s.name();
        if !valid_name(name) {
            return Err(format!(
                "sinks[{i}]: `name` {name:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
            ));
        }
        if !names.insert(name) {
            return Err(format!(
                "sinks[{i}]: the name {name:?} is used twice; every sink needs its own (it keys \
                 the sink's delivery position in the store)"
            ));
        }
        s.delivery()?;
        let tls = match s {
            SinkConfig::OcsfFile(c) => {
                let parent = c.path.parent().filter(|p| !p.as_os_str().is_empty());
                if let Some(dir) = parent
                    && !dir.is_dir()
                {
                    return Err(format!(
                        "sink {name:?}: the directory of `path` {} does not exist",
                        c.path.display()
                    ));
                }
                if c.max_bytes == Some(0) || c.max_files == Some(0) {
                    return Err(format!(
                        "sink {name:?}: `max_bytes` and `max_files` must be above zero"
                    ));
                }
                None
            }
            SinkConfig::OcsfHttp(c) => {
                super::http::HttpsUrl::parse(&c.url)
                    .map_err(|e| format!("sink {name:?}: `url`: {e}"))?;
                for h in c.headers.keys() {
                    if h.is_empty() || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                        return Err(format!(
                            "sink {name:?}: `headers` has an invalid header name {h:?}"
                        ));
                    }
                }
                Some(&c.tls)
            }
            SinkConfig::Syslog(c) => {
                super::syslog::split_address(&c.address)
                    .map_err(|e| format!("sink {name:?}: `address`: {e}"))?;
                super::syslog::facility(c.facility.as_deref())
                    .map_err(|e| format!("sink {name:?}: `facility`: {e}"))?;
                if let Some(id) = &c.sd_id
                    && !super::syslog::valid_sd_name(id)
                {
                    return Err(format!(
                        "sink {name:?}: `sd_id` {id:?} is not an RFC 5424 SD-ID (NAME@NUMBER, \
                         printable ASCII without space, '=', ']' or '\"')"
                    ));
                }
                Some(&c.tls)
            }
            SinkConfig::SplunkHec(c) => {
                super::http::HttpsUrl::parse(&c.url)
                    .map_err(|e| format!("sink {name:?}: `url`: {e}"))?;
                match (&c.token, &c.token_file) {
                    (Some(_), None) | (None, Some(_)) => {}
                    _ => {
                        return Err(format!(
                            "sink {name:?}: give exactly one of `token` and `token_file`"
                        ));
                    }
                }
                if let Some(f) = &c.token_file
                    && !f.exists()
                {
                    return Err(format!(
                        "sink {name:?}: `token_file` {} does not exist",
                        f.display()
                    ));
                }
                Some(&c.tls)
            }
        };
        if let Some(t) = tls {
            if t.client_cert.is_some() != t.client_key.is_some() {
                return Err(format!(
                    "sink {name:?}: `tls.client_cert` and `tls.client_key` go together"
                ));
            }
            for (key, p) in [
                ("tls.ca", &t.ca),
                ("tls.client_cert", &t.client_cert),
                ("tls.client_key", &t.client_key),
            ] {
                if let Some(p) = p
                    && !p.exists()
                {
                    return Err(format!(
                        "sink {name:?}: `{key}` {} does not exist",
                        p.display()
                    ));
                }
            }
            if t.ca.is_none() {
                return Err(format!(
                    "sink {name:?}: `tls.ca` is missing: give the CA certificate (PEM) that \
                     signs the receiver's certificate"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        sinks: Vec<SinkConfig>,
    }

    fn parse(text: &str) -> Result<Vec<SinkConfig>, String> {
        toml::from_str::<File>(text)
            .map(|f| f.sinks)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sinks_are_chosen_by_type_and_unknown_keys_are_refused() {
        let sinks = parse(
            "[[sinks]]\ntype = \"ocsf_file\"\nname = \"lake\"\npath = \"/tmp/x.jsonl\"\n\
             [sinks.delivery]\nbatch = 10\nretry_max = \"5s\"\n\
             [[sinks]]\ntype = \"syslog\"\nname = \"siem\"\naddress = \"127.0.0.1:6514\"\n\
             tls.ca = \"/ca.pem\"\n",
        )
        .expect("parse");
        assert_eq!(sinks.len(), 2);
        assert_eq!(sinks[0].kind(), "ocsf_file");
        let d = sinks[0].delivery().expect("delivery");
        assert_eq!((d.batch, d.retry_max), (10, Duration::from_secs(5)));
        assert_eq!(sinks[1].name(), "siem");

        let err = parse("[[sinks]]\ntype = \"syslog\"\nname = \"s\"\nadress = \"x:1\"\n")
            .expect_err("typo");
        assert!(err.contains("adress"), "{err}");
        let err = parse("[[sinks]]\ntype = \"kafka\"\nname = \"s\"\n").expect_err("type");
        assert!(err.contains("kafka") && err.contains("ocsf_file"), "{err}");
        let err = parse(
            "[[sinks]]\ntype = \"ocsf_file\"\nname = \"s\"\npath = \"/x\"\n\
             delivery.retry_min = \"soon\"\n",
        )
        .expect_err("duration");
        assert!(err.contains("soon") && err.contains("30s"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let sinks = parse(
            "[[sinks]]\ntype = \"ocsf_file\"\nname = \"a\"\npath = \"/tmp/a\"\n\
             [[sinks]]\ntype = \"ocsf_file\"\nname = \"a\"\npath = \"/tmp/b\"\n",
        )
        .expect("parse");
        let err = validate(&sinks).expect_err("twice");
        assert!(err.contains("used twice"), "{err}");
        let sinks = parse(
            "[[sinks]]\ntype = \"splunk_hec\"\nname = \"h\"\nurl = \"http://splunk:8088\"\n\
             token = \"t\"\n",
        )
        .expect("parse");
        let err = validate(&sinks).expect_err("http");
        assert!(err.contains("`url`") && err.contains("https"), "{err}");
        let sinks = parse(
            "[[sinks]]\ntype = \"syslog\"\nname = \"s\"\naddress = \"siem:6514\"\n\
             facility = \"kernel\"\n",
        )
        .expect("parse");
        let err = validate(&sinks).expect_err("facility");
        assert!(err.contains("`facility`"), "{err}");
        let sinks = parse(
            "[[sinks]]\ntype = \"syslog\"\nname = \"s\"\naddress = \"siem:6514\"\n\
             delivery.start_at = \"middle\"\n",
        )
        .expect("parse");
        let err = validate(&sinks).expect_err("start_at");
        assert!(err.contains("delivery.start_at"), "{err}");
    }
}
