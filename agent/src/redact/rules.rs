//! Redaction rules: the built-in detectors and the rules an operator configures, compiled and
//! validated before the agent loads anything.

use regex::Regex;
use serde::Deserialize;

/// Kinds of text a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldClass {
    /// Command-line arguments.
    Argv,
    /// Environment variables (`NAME=value`).
    Env,
    /// File system paths (opened files, executables, working directories, unix sockets).
    Path,
    /// Process names (`comm`).
    Comm,
    /// Payload snippets (SQL text and the like) captured with an event.
    Payload,
}

/// What happens to a matched value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// `[redacted:rule]`.
    Mask,
    /// `[rule:<keyed hash>]`: the same value always gives the same token.
    #[default]
    Pseudonymize,
}

impl Action {
    pub const fn name(self) -> &'static str {
        match self {
            Action::Mask => "mask",
            Action::Pseudonymize => "pseudonymize",
        }
    }
}

/// How a matched value is checked and made canonical before hashing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    None,
    /// A plausible SSN (area not 000/666/9xx, group not 00, serial not 0000).
    Ssn,
    /// Passes the Luhn check (card numbers).
    Luhn,
}

/// A rule that matches inside text.
#[derive(Clone, Debug)]
pub struct PatternRule {
    pub name: String,
    pub classes: Vec<FieldClass>,
    pub regex: Regex,
    pub check: Check,
    /// Digits only before hashing, so `219-09-9999` and `219099999` give one token.
    pub digits_only: bool,
    pub action: Action,
}

/// A rule that redacts the value of command-line flags (`--password X`, `--password=X`).
#[derive(Clone, Debug)]
pub struct FlagRule {
    pub name: String,
    pub flags: Vec<String>,
    /// Programs (argv[0] base names) the rule applies to; empty for all.
    pub programs: Vec<String>,
    /// Also values glued to a short flag (`-pSECRET`), for the listed programs.
    pub attached: bool,
    pub action: Action,
}

/// A rule that redacts environment variables by name.
#[derive(Clone, Debug)]
pub struct EnvNameRule {
    pub name: String,
    pub names: Regex,
    pub action: Action,
}

/// All rules, in the order they take precedence.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    pub flags: Vec<FlagRule>,
    pub env_names: Vec<EnvNameRule>,
    /// Earlier rules win where matches overlap.
    pub patterns: Vec<PatternRule>,
}

/// The `[redaction]` section of the configuration.
#[derive(Debug, Default, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedactionConfig {
    /// Key for pseudonyms (default: `<state_dir>/redaction.key`), created 0600 if missing.
    pub key_file: Option<std::path::PathBuf>,
    /// Built-in detectors to turn off, by name.
    #[serde(default)]
    pub disable: Vec<String>,
    /// Extra medical record number patterns (the value is the match, or its `value` group).
    #[serde(default)]
    pub mrn_patterns: Vec<String>,
    /// Action of the built-in detectors (default: pseudonymize).
    pub default_action: Option<Action>,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// One configured rule: exactly one of `pattern`, `flags` or `env_names`.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// Field classes: "argv", "env", "path", "comm", "payload" (default: argv and env).
    #[serde(default)]
    pub fields: Vec<FieldClass>,
    /// Regular expression; the value is the whole match or its named group `value`.
    pub pattern: Option<String>,
    /// Flags whose values are redacted.
    #[serde(default)]
    pub flags: Vec<String>,
    /// Programs the flags apply to (default: all).
    #[serde(default)]
    pub programs: Vec<String>,
    /// Regular expression over environment variable names whose values are redacted.
    pub env_names: Option<String>,
    pub action: Option<Action>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("redaction rule {rule:?}: {problem}")]
    Rule { rule: String, problem: String },
    #[error("redaction: unknown built-in detector {0:?} in `disable` (known: {1})")]
    UnknownDetector(String, String),
    #[error("redaction: MRN pattern {pattern:?} is invalid: {problem}")]
    MrnPattern { pattern: String, problem: String },
}

/// Names of the built-in detectors.
pub const BUILTIN: &[&str] = &[
    "password-flag",
    "mrn-flag",
    "dob-flag",
    "env-secret",
    "url-credentials",
    "bearer-token",
    "jwt",
    "password-assignment",
    "ssn",
    "card",
    "phone",
    "email",
    "dob",
    "mrn",
];

/// Compiles a pattern with a size bound (the regex engine is linear-time).
fn compile(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| e.to_string().replace('\n', " "))
}

fn builtin_pattern(
    name: &str,
    pattern: &str,
    classes: &[FieldClass],
    check: Check,
    digits_only: bool,
    action: Action,
) -> PatternRule {
    PatternRule {
        name: name.to_owned(),
        classes: classes.to_vec(),
        #[expect(clippy::expect_used, reason = "built-in patterns are tested constants")]
        regex: compile(pattern).expect("built-in pattern compiles"),
        check,
        digits_only,
        action,
    }
}

/// Builds the rule set from the configuration: built-ins (minus `disable`), then configured
/// rules. Every problem names the rule.
pub fn build(cfg: &RedactionConfig) -> Result<RuleSet, RuleError> {
    for d in &cfg.disable {
        if !BUILTIN.contains(&d.as_str()) {
            return Err(RuleError::UnknownDetector(d.clone(), BUILTIN.join(", ")));
        }
    }
    let on = |name: &str| !cfg.disable.iter().any(|d| d == name);
    let act = cfg.default_action.unwrap_or_default();
    use FieldClass::{Argv, Comm, Env, Path, Payload};
    let text = [Argv, Env, Comm, Payload];
    let all = [Argv, Env, Path, Comm, Payload];
    let mut set = RuleSet::default();

    if on("password-flag") {
        set.flags.push(FlagRule {
            name: "password-flag".into(),
            flags: [
                "--password",
                "--passwd",
                "--pass",
                "--pwd",
                "--secret",
                "--token",
                "--api-key",
                "--apikey",
                "--access-key",
                "--secret-key",
                "--client-secret",
                "--auth-token",
            ]
            .map(String::from)
            .to_vec(),
            programs: Vec::new(),
            attached: false,
            action: act,
        });
        // `-p` is a password only for some programs (for psql or nc it is a port).
        set.flags.push(FlagRule {
            name: "password-flag".into(),
            flags: vec!["-p".into()],
            programs: [
                "sshpass",
                "mysql",
                "mysqladmin",
                "mysqldump",
                "mariadb",
                "mariadb-dump",
            ]
            .map(String::from)
            .to_vec(),
            attached: true,
            action: act,
        });
    }
    if on("mrn-flag") {
        set.flags.push(FlagRule {
            name: "mrn".into(),
            flags: ["--mrn", "--medical-record-number", "--patient-id"]
                .map(String::from)
                .to_vec(),
            programs: Vec::new(),
            attached: false,
            action: act,
        });
    }
    if on("dob-flag") {
        set.flags.push(FlagRule {
            name: "dob".into(),
            flags: ["--dob", "--birth-date", "--birthdate", "--date-of-birth"]
                .map(String::from)
                .to_vec(),
            programs: Vec::new(),
            attached: false,
            action: act,
        });
    }
    if on("env-secret") {
        set.env_names.push(EnvNameRule {
            name: "env-secret".into(),
            #[expect(clippy::expect_used, reason = "built-in pattern is a tested constant")]
            names: compile(
                r"(?i)(pass(word|wd)?|secret|token|api_?key|private_?key|credential|auth)",
            )
            .expect("built-in pattern compiles"),
            action: act,
        });
    }
    let mut add = |name: &str, pat: &str, classes: &[FieldClass], check, digits| {
        if on(name) {
            set.patterns
                .push(builtin_pattern(name, pat, classes, check, digits, act));
        }
    };
    add(
        "url-credentials",
        r"(?i)\b[a-z][a-z0-9+.-]*://[^/\s:@]+:(?P<value>[^@\s/]+)@",
        &text,
        Check::None,
        false,
    );
    add(
        "bearer-token",
        r"(?i)\b(?:bearer|token)\s+(?P<value>[A-Za-z0-9\-._~+/]{8,}=*)",
        &text,
        Check::None,
        false,
    );
    add(
        "jwt",
        r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+",
        &text,
        Check::None,
        false,
    );
    add(
        "password-assignment",
        r#"(?i)\b(?:password|passwd|pwd|secret|api[_-]?key)\s*[=:]\s*(?P<value>[^\s&;'",]+)"#,
        &text,
        Check::None,
        false,
    );
    add(
        "ssn",
        r"\b\d{3}-\d{2}-\d{4}\b|\b\d{3} \d{2} \d{4}\b|\b\d{9}\b",
        &all,
        Check::Ssn,
        true,
    );
    add("card", r"\b\d(?:[ -]?\d){12,18}\b", &all, Check::Luhn, true);
    add(
        "phone",
        r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\b\d{3}[\s.-])\d{3}[\s.-]\d{4}\b",
        &all,
        Check::None,
        true,
    );
    add(
        "email",
        r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b",
        &all,
        Check::None,
        false,
    );
    add(
        "dob",
        r"(?i)\b(?:dob|d\.o\.b\.?|date[ _-]?of[ _-]?birth|birth[ _-]?date|born)\s*[:=]?\s*(?P<value>\d{4}-\d{2}-\d{2}|\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4})",
        &all,
        Check::None,
        false,
    );
    add(
        "mrn",
        r"(?i)\bMRN\s*[:#=-]?\s*(?P<value>[A-Z0-9][A-Z0-9-]{3,19})",
        &all,
        Check::None,
        false,
    );
    if on("mrn") {
        for p in &cfg.mrn_patterns {
            let regex = compile(p).map_err(|problem| RuleError::MrnPattern {
                pattern: p.clone(),
                problem,
            })?;
            set.patterns.push(PatternRule {
                name: "mrn".into(),
                classes: all.to_vec(),
                regex,
                check: Check::None,
                digits_only: false,
                action: act,
            });
        }
    }

    let mut seen: Vec<&str> = Vec::new();
    for r in &cfg.rules {
        let fail = |problem: String| RuleError::Rule {
            rule: r.name.clone(),
            problem,
        };
        if r.name.trim().is_empty() {
            return Err(fail("the rule has no name".into()));
        }
        if BUILTIN.contains(&r.name.as_str()) || seen.contains(&r.name.as_str()) {
            return Err(fail("the name is already taken".into()));
        }
        seen.push(&r.name);
        let kinds = [
            r.pattern.is_some(),
            !r.flags.is_empty(),
            r.env_names.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(fail(
                "give exactly one of `pattern`, `flags` or `env_names`".into(),
            ));
        }
        let action = r.action.unwrap_or_default();
        let classes = if r.fields.is_empty() {
            vec![Argv, Env]
        } else {
            r.fields.clone()
        };
        if let Some(p) = &r.pattern {
            let regex = compile(p).map_err(|e| fail(format!("invalid pattern: {e}")))?;
            if regex.is_match("") {
                return Err(fail("the pattern matches the empty string".into()));
            }
            set.patterns.push(PatternRule {
                name: r.name.clone(),
                classes,
                regex,
                check: Check::None,
                digits_only: false,
                action,
            });
        } else if let Some(p) = &r.env_names {
            let names = compile(p).map_err(|e| fail(format!("invalid env_names: {e}")))?;
            set.env_names.push(EnvNameRule {
                name: r.name.clone(),
                names,
                action,
            });
        } else {
            if let Some(bad) = r.flags.iter().find(|f| !f.starts_with('-') || f.len() < 2) {
                return Err(fail(format!(
                    "{bad:?} is not a flag (flags start with '-')"
                )));
            }
            set.flags.push(FlagRule {
                name: r.name.clone(),
                flags: r.flags.clone(),
                programs: r.programs.clone(),
                attached: false,
                action,
            });
        }
    }
    // Configured pattern rules take precedence over built-in detectors where they overlap.
    let builtin_count = set
        .patterns
        .iter()
        .filter(|p| BUILTIN.contains(&p.name.as_str()))
        .count();
    set.patterns.rotate_left(builtin_count);
    Ok(set)
}

/// Luhn checksum over the digits of `s`.
pub fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if digits.len() < 13 {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                *d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether a 9-digit value is a plausible SSN.
pub fn plausible_ssn(s: &str) -> bool {
    let d: String = s.chars().filter(char::is_ascii_digit).collect();
    if d.len() != 9 {
        return false;
    }
    let (area, group, serial) = (&d[..3], &d[3..5], &d[5..]);
    area != "000" && area != "666" && !area.starts_with('9') && group != "00" && serial != "0000"
}
