//! Alert rules: one `[[rules]]` table per rule, chosen by `type = "…"`, unknown keys refused.

use serde::Deserialize;

use super::net::Cidr;
use crate::sinks::config::HumanDuration;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RuleConfig {
    /// A watched path opened by an account outside `users` and `groups`.
    UnauthorizedAccess(UnauthorizedAccess),
    /// More than `max_files` distinct watched files opened by one person within `window`.
    BulkAccess(BulkAccess),
    /// A process that read watched data connects to an address outside `allow`.
    Egress(Egress),
    /// A watched service accepts a connection from an address outside `allow`.
    Ingress(Ingress),
    /// A watched path opened by a process with no login uid (no person behind it).
    UnattributedAccess(UnattributedAccess),
    /// A gap record: events were lost on the host.
    Gap(GapRule),
    /// A host whose newest record is older than `deadline`.
    SilentHost(SilentHost),
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UnauthorizedAccess {
    pub name: String,
    /// Watched path prefixes the rule covers ("/srv/ehr").
    pub paths: Vec<String>,
    /// Accounts (user names) allowed to open them.
    #[serde(default)]
    pub users: Vec<String>,
    /// Groups (primary group names) allowed to open them.
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BulkAccess {
    pub name: String,
    pub paths: Vec<String>,
    /// Alert when one person opens more than this many distinct files.
    pub max_files: usize,
    /// … within this time ("10m").
    pub window: HumanDuration,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    pub name: String,
    pub paths: Vec<String>,
    /// Networks a process that read watched data may connect to ("10.0.0.0/8",
    /// "127.0.0.1", "::1/128").
    #[serde(default)]
    pub allow: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Ingress {
    pub name: String,
    /// Local ports the rule covers (of the agents' `accept_ports`); empty: every accept.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Networks the services may accept connections from ("10.0.0.0/8", "::1/128").
    #[serde(default)]
    pub allow: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UnattributedAccess {
    pub name: String,
    pub paths: Vec<String>,
    /// Accounts whose unattended access is expected (backup jobs, the EHR service).
    #[serde(default)]
    pub except_users: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GapRule {
    pub name: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SilentHost {
    pub name: String,
    /// Alert when a host's newest record (agents send heartbeats when idle) is older than
    /// this ("5m").
    pub deadline: HumanDuration,
    /// How often hosts are checked [default: a quarter of the deadline, 100ms to 30s].
    pub interval: Option<HumanDuration>,
}

impl RuleConfig {
    pub fn name(&self) -> &str {
        match self {
            RuleConfig::UnauthorizedAccess(r) => &r.name,
            RuleConfig::BulkAccess(r) => &r.name,
            RuleConfig::Egress(r) => &r.name,
            RuleConfig::Ingress(r) => &r.name,
            RuleConfig::UnattributedAccess(r) => &r.name,
            RuleConfig::Gap(r) => &r.name,
            RuleConfig::SilentHost(r) => &r.name,
        }
    }

    /// The alert kind of the rule's alerts.
    pub fn kind(&self) -> &'static str {
        match self {
            RuleConfig::UnauthorizedAccess(_) => "unauthorized-access",
            RuleConfig::BulkAccess(_) => "bulk-access",
            RuleConfig::Egress(_) => "egress",
            RuleConfig::Ingress(_) => "ingress",
            RuleConfig::UnattributedAccess(_) => "unattributed-access",
            RuleConfig::Gap(_) => "gap",
            RuleConfig::SilentHost(_) => "silent-host",
        }
    }

    fn paths(&self) -> Option<&[String]> {
        match self {
            RuleConfig::UnauthorizedAccess(r) => Some(&r.paths),
            RuleConfig::BulkAccess(r) => Some(&r.paths),
            RuleConfig::Egress(r) => Some(&r.paths),
            RuleConfig::UnattributedAccess(r) => Some(&r.paths),
            RuleConfig::Ingress(_) | RuleConfig::Gap(_) | RuleConfig::SilentHost(_) => None,
        }
    }
}

/// Checks every rule: names unique, paths absolute, sizes and networks valid.
pub fn validate(rules: &[RuleConfig]) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
        let name = r.name();
        if !crate::sinks::config::valid_name(name) {
            return Err(format!(
                "rules[{i}]: `name` {name:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
            ));
        }
        if !names.insert(name) {
            return Err(format!("rules[{i}]: the name {name:?} is used twice"));
        }
        if let Some(paths) = r.paths() {
            if paths.is_empty() {
                return Err(format!(
                    "rule {name:?}: `paths` is empty: list the watched trees it covers"
                ));
            }
            if let Some(p) = paths.iter().find(|p| !p.starts_with('/')) {
                return Err(format!(
                    "rule {name:?}: `paths` entry {p:?} is not absolute"
                ));
            }
        }
        match r {
            RuleConfig::UnauthorizedAccess(u) if u.users.is_empty() && u.groups.is_empty() => {
                return Err(format!(
                    "rule {name:?}: give `users` or `groups` (who may open the paths)"
                ));
            }
            RuleConfig::BulkAccess(b) if b.max_files == 0 || b.window.0.is_zero() => {
                return Err(format!(
                    "rule {name:?}: `max_files` and `window` must be above zero"
                ));
            }
            RuleConfig::Egress(Egress { allow, .. }) => check_networks(name, allow)?,
            RuleConfig::Ingress(i) => {
                check_networks(name, &i.allow)?;
                if i.ports.contains(&0) {
                    return Err(format!(
                        "rule {name:?}: `ports` entry 0 is not a TCP port (1 to 65535)"
                    ));
                }
            }
            RuleConfig::SilentHost(s)
                if s.deadline.0.is_zero() || s.interval.is_some_and(|i| i.0.is_zero()) =>
            {
                return Err(format!(
                    "rule {name:?}: `deadline` and `interval` must be above zero"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks the `allow` networks of rule `name`.
fn check_networks(name: &str, allow: &[String]) -> Result<(), String> {
    for a in allow {
        Cidr::parse(a).map_err(|err| format!("rule {name:?}: `allow`: {err}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        rules: Vec<RuleConfig>,
    }

    fn parse(text: &str) -> Result<Vec<RuleConfig>, String> {
        toml::from_str::<File>(text)
            .map(|f| f.rules)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn rules_are_checked_and_errors_name_the_key() {
        let rules = parse(
            "[[rules]]\ntype = \"bulk_access\"\nname = \"b\"\npaths = [\"/srv/ehr\"]\n\
             max_files = 50\nwindow = \"10m\"\n",
        )
        .expect("parse");
        validate(&rules).expect("valid");
        assert_eq!(rules[0].kind(), "bulk-access");
        let err = parse("[[rules]]\ntype = \"gap\"\nname = \"g\"\npath = \"/x\"\n")
            .expect_err("unknown key");
        assert!(err.contains("path"), "{err}");
        let rules = parse(
            "[[rules]]\ntype = \"egress\"\nname = \"e\"\npaths = [\"/srv\"]\n\
             allow = [\"10.0.0.0/40\"]\n",
        )
        .expect("parse");
        let err = validate(&rules).expect_err("bad network");
        assert!(
            err.contains("`allow`") && err.contains("10.0.0.0/40"),
            "{err}"
        );
        let rules = parse(
            "[[rules]]\ntype = \"ingress\"\nname = \"i\"\nports = [5432]\n\
             allow = [\"10.0.0.0/8\"]\n",
        )
        .expect("parse");
        validate(&rules).expect("valid");
        assert_eq!(rules[0].kind(), "ingress");
        let rules =
            parse("[[rules]]\ntype = \"ingress\"\nname = \"i\"\nports = [0]\n").expect("parse");
        let err = validate(&rules).expect_err("port 0");
        assert!(err.contains("`ports` entry 0"), "{err}");
        let rules = parse(
            "[[rules]]\ntype = \"unauthorized_access\"\nname = \"u\"\npaths = [\"srv\"]\n\
             users = [\"alice\"]\n",
        )
        .expect("parse");
        let err = validate(&rules).expect_err("relative path");
        assert!(err.contains("`paths`"), "{err}");
    }
}
