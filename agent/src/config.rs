//! Configuration: a TOML file, overridden by command-line flags. Unknown keys are errors, and
//! everything is validated before a probe is loaded.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{probes, redact::rules::RedactionConfig};

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
    /// Where the agent keeps its state (keys, chain); default /var/lib/phi-audit.
    pub state_dir: Option<PathBuf>,
    /// Redaction rules and pseudonym key.
    #[serde(default)]
    pub redaction: RedactionConfig,
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
    pub state_dir: Option<PathBuf>,
}

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/phi-audit";

/// The effective settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub host_id: String,
    pub watch: Vec<PathBuf>,
    pub stdout: bool,
    pub ring_buffer_bytes: u32,
    pub connect: bool,
    pub state_dir: PathBuf,
    pub redaction: RedactionConfig,
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
    let settings = Settings {
        host_id,
        watch,
        stdout: flags.stdout || file.stdout.unwrap_or(false),
        ring_buffer_bytes: ring,
        connect: !flags.no_connect && file.connect.unwrap_or(true),
        state_dir: flags
            .state_dir
            .clone()
            .or_else(|| file.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        redaction: file.redaction.clone(),
    };
    if !settings.stdout {
        return Err(ConfigError::Invalid(
            "records have nowhere to go: give --stdout (or `stdout = true` in the config file)"
                .into(),
        ));
    }
    Ok(settings)
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
        let file = FileConfig::load(&example).expect("example config parses");
        assert_eq!(file.watch.len(), 2);
        let s = merge(&file, &Overrides::default()).expect("example config is valid");
        assert_eq!(s.host_id, "ehr-db-01");
        crate::redact::rules::build(&s.redaction).expect("example redaction rules are valid");
        assert_eq!(s.redaction.rules.len(), 1);
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
}
