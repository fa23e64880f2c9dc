//! Redaction: every text field of a record passes through here before the record can be
//! written anywhere. Matches are replaced by a keyed pseudonym (`[ssn:4f2a…]`, HMAC-SHA256,
//! so the same value always gives the same token) or a mask (`[redacted:rule]`), and the
//! record lists which rule changed which field how often.
//!
//! Matching is linear in the input: the regex engine has no backtracking, the rule set is
//! fixed at start, and the inputs are bounded by the kernel programs.

pub mod key;
pub mod rules;

use std::collections::BTreeMap;

use hmac::{Hmac, Mac as _};
use phi_proto::v1::{self as pb, record::Event};
use sha2::Sha256;

use self::rules::{Action, Check, FieldClass, RuleSet, luhn, plausible_ssn};

/// Hex digits of the keyed hash kept in a token (64 bits).
const TOKEN_HEX: usize = 16;

/// The configured redaction engine.
pub struct Redactor {
    rules: RuleSet,
    key: [u8; key::KEY_BYTES],
}

/// Counts per (field, rule, action) while one record is redacted.
type Hits = BTreeMap<(String, String, &'static str), u32>;

fn program_of(argv: &[String]) -> &str {
    argv.first()
        .map(|a| a.rsplit('/').next().unwrap_or(a))
        .unwrap_or("")
}

impl Redactor {
    pub fn new(rules: RuleSet, key: [u8; key::KEY_BYTES]) -> Self {
        Redactor { rules, key }
    }

    /// The replacement for `value` matched by `rule`.
    fn token(&self, rule: &str, action: Action, value: &str, digits_only: bool) -> String {
        match action {
            Action::Mask => format!("[redacted:{rule}]"),
            Action::Pseudonymize => {
                let canonical: String = if digits_only {
                    value.chars().filter(char::is_ascii_digit).collect()
                } else {
                    value.to_owned()
                };
                #[expect(clippy::expect_used, reason = "HMAC takes keys of any length")]
                let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
                mac.update(canonical.as_bytes());
                let digest = hex::encode(mac.finalize().into_bytes());
                format!("[{rule}:{}]", &digest[..TOKEN_HEX])
            }
        }
    }

    /// Applies the pattern rules of `class` to `text`; `None` when nothing matched.
    fn text(&self, class: FieldClass, text: &str, field: &str, hits: &mut Hits) -> Option<String> {
        // (start, end, rule index): earlier rules win where matches overlap.
        let mut spans: Vec<(usize, usize, usize)> = Vec::new();
        for (i, rule) in self.rules.patterns.iter().enumerate() {
            if !rule.classes.contains(&class) {
                continue;
            }
            for caps in rule.regex.captures_iter(text) {
                let Some(m) = caps.name("value").or_else(|| caps.get(0)) else {
                    continue;
                };
                if m.is_empty() {
                    continue;
                }
                let ok = match rule.check {
                    Check::None => true,
                    Check::Ssn => plausible_ssn(m.as_str()),
                    Check::Luhn => luhn(m.as_str()),
                };
                if ok && !spans.iter().any(|(s, e, _)| m.start() < *e && *s < m.end()) {
                    spans.push((m.start(), m.end(), i));
                }
            }
        }
        if spans.is_empty() {
            return None;
        }
        spans.sort_unstable();
        let mut out = String::with_capacity(text.len() + 16 * spans.len());
        let mut at = 0;
        for (start, end, i) in spans {
            let rule = &self.rules.patterns[i];
            out.push_str(&text[at..start]);
            out.push_str(&self.token(&rule.name, rule.action, &text[start..end], rule.digits_only));
            at = end;
            *hits
                .entry((field.to_owned(), rule.name.clone(), rule.action.name()))
                .or_insert(0) += 1;
        }
        out.push_str(&text[at..]);
        Some(out)
    }

    fn field(&self, class: FieldClass, value: &mut String, field: &str, hits: &mut Hits) {
        if let Some(new) = self.text(class, value, field, hits) {
            *value = new;
        }
    }

    /// Command-line arguments: flag rules (the value after `--password`), then patterns.
    fn argv(&self, argv: &mut [String], field: &str, hits: &mut Hits) {
        let program = program_of(argv).to_owned();
        let mut done = vec![false; argv.len()];
        for i in 0..argv.len() {
            for rule in &self.rules.flags {
                if !rule.programs.is_empty() && !rule.programs.contains(&program) {
                    continue;
                }
                for flag in &rule.flags {
                    let name = format!("{field}[{}]", i + 1);
                    if argv[i] == *flag && i + 1 < argv.len() && !done[i + 1] {
                        argv[i + 1] = self.token(&rule.name, rule.action, &argv[i + 1], false);
                        done[i + 1] = true;
                        *hits
                            .entry((name, rule.name.clone(), rule.action.name()))
                            .or_insert(0) += 1;
                        continue;
                    }
                    let inline = argv[i]
                        .strip_prefix(flag.as_str())
                        .and_then(|rest| rest.strip_prefix('='))
                        .or_else(|| {
                            (rule.attached && argv[i].len() > flag.len())
                                .then(|| argv[i].strip_prefix(flag.as_str()))
                                .flatten()
                        })
                        .filter(|v| !v.is_empty() && !done[i])
                        .map(str::to_owned);
                    if let Some(value) = inline {
                        let sep = if argv[i][flag.len()..].starts_with('=') {
                            "="
                        } else {
                            ""
                        };
                        argv[i] = format!(
                            "{flag}{sep}{}",
                            self.token(&rule.name, rule.action, &value, false)
                        );
                        done[i] = true;
                        *hits
                            .entry((
                                format!("{field}[{i}]"),
                                rule.name.clone(),
                                rule.action.name(),
                            ))
                            .or_insert(0) += 1;
                    }
                }
            }
        }
        for (i, arg) in argv.iter_mut().enumerate() {
            if !done[i] {
                self.field(FieldClass::Argv, arg, &format!("{field}[{i}]"), hits);
            }
        }
    }

    /// Environment variables: by name (`PGPASSWORD`), then patterns over the value.
    fn env(&self, env: &mut [String], field: &str, hits: &mut Hits) {
        for (i, var) in env.iter_mut().enumerate() {
            let name = format!("{field}[{i}]");
            let Some((key, value)) = var.split_once('=') else {
                self.field(FieldClass::Env, var, &name, hits);
                continue;
            };
            if value.is_empty() {
                continue;
            }
            if let Some(rule) = self.rules.env_names.iter().find(|r| r.names.is_match(key)) {
                *var = format!(
                    "{key}={}",
                    self.token(&rule.name, rule.action, value, false)
                );
                *hits
                    .entry((name, rule.name.clone(), rule.action.name()))
                    .or_insert(0) += 1;
                continue;
            }
            if let Some(new) = self.text(FieldClass::Env, value, &name, hits) {
                *var = format!("{key}={new}");
            }
        }
    }

    fn paths(&self, paths: &mut [String], field: &str, hits: &mut Hits) {
        for (i, p) in paths.iter_mut().enumerate() {
            self.field(FieldClass::Path, p, &format!("{field}[{i}]"), hits);
        }
    }

    /// Redacts every text field of `rec` and lists what was changed in `rec.redactions`.
    pub fn record(&self, rec: &mut pb::Record) {
        let mut hits = Hits::new();
        let h = &mut hits;
        if let Some(p) = rec.process.as_mut() {
            self.argv(&mut p.argv, "process.argv", h);
            self.field(FieldClass::Path, &mut p.exe, "process.exe", h);
            self.field(FieldClass::Path, &mut p.cwd, "process.cwd", h);
            self.field(FieldClass::Comm, &mut p.comm, "process.comm", h);
            for (i, a) in p.ancestors.iter_mut().enumerate() {
                self.field(
                    FieldClass::Path,
                    &mut a.exe,
                    &format!("process.ancestors[{i}].exe"),
                    h,
                );
                self.field(
                    FieldClass::Comm,
                    &mut a.comm,
                    &format!("process.ancestors[{i}].comm"),
                    h,
                );
            }
            if let Some(s) = p.identity.as_mut().and_then(|i| i.session.as_mut()) {
                self.field(
                    FieldClass::Path,
                    &mut s.leader_exe,
                    "process.identity.session.leader_exe",
                    h,
                );
            }
        }
        match rec.event.as_mut() {
            Some(Event::Exec(e)) => {
                self.argv(&mut e.argv, "exec.argv", h);
                self.env(&mut e.env, "exec.env", h);
                self.field(FieldClass::Path, &mut e.exe, "exec.exe", h);
                self.field(FieldClass::Path, &mut e.filename, "exec.filename", h);
            }
            Some(Event::Open(o)) => {
                self.field(FieldClass::Path, &mut o.path, "open.path", h);
                self.field(FieldClass::Path, &mut o.requested, "open.requested", h);
            }
            Some(Event::Connect(c)) => {
                self.field(FieldClass::Path, &mut c.unix_path, "connect.unix_path", h);
            }
            Some(Event::Agent(a)) => self.paths(&mut a.watch, "agent.watch", h),
            Some(Event::ConfigChange(c)) => {
                self.paths(&mut c.watch, "config_change.watch", h);
                self.paths(&mut c.watch_added, "config_change.watch_added", h);
                self.paths(&mut c.watch_removed, "config_change.watch_removed", h);
            }
            _ => {}
        }
        rec.redactions = hits
            .into_iter()
            .map(|((field, rule, action), count)| pb::Redaction {
                rule,
                field,
                count,
                action: action.into(),
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::{rules::RedactionConfig, *};

    fn engine(cfg: &RedactionConfig) -> Redactor {
        Redactor::new(rules::build(cfg).expect("valid rules"), [9u8; 32])
    }

    fn redact_argv(r: &Redactor, args: &[&str]) -> (Vec<String>, Hits) {
        let mut v: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let mut hits = Hits::new();
        r.argv(&mut v, "argv", &mut hits);
        (v, hits)
    }

    #[test]
    fn pseudonyms_are_keyed_stable_and_canonical() {
        let r = engine(&RedactionConfig::default());
        let (a, _) = redact_argv(&r, &["x", "219-09-9999"]);
        let (b, _) = redact_argv(&r, &["x", "ssn 219099999 here"]);
        assert!(a[1].starts_with("[ssn:"), "{a:?}");
        assert!(b[1].contains(&a[1]), "same SSN, same token: {a:?} {b:?}");
        let other = Redactor::new(
            rules::build(&RedactionConfig::default()).expect("rules"),
            [1; 32],
        );
        let (c, _) = redact_argv(&other, &["x", "219-09-9999"]);
        assert_ne!(a[1], c[1], "another key gives another token");
    }

    #[test]
    fn flags_programs_and_attached_values() {
        let r = engine(&RedactionConfig::default());
        let (v, hits) = redact_argv(
            &r,
            &["mysql", "-u", "ehr", "-pHunter2x", "--password=S3cret&1"],
        );
        assert_eq!(v[1], "-u");
        assert!(v[3].starts_with("-p[password-flag:"), "{v:?}");
        assert!(v[4].starts_with("--password=[password-flag:"), "{v:?}");
        assert_eq!(hits.len(), 2);
        let (v, _) = redact_argv(&r, &["psql", "-p", "5432"]);
        assert_eq!(v[2], "5432", "-p is a port for psql");
        let (v, _) = redact_argv(&r, &["sshpass", "-p", "pw123456", "ssh", "db1"]);
        assert!(v[2].starts_with("[password-flag:"));
        assert_eq!(v[3..], ["ssh", "db1"]);
    }

    #[test]
    fn overlapping_detectors_keep_the_host_of_a_url() {
        let r = engine(&RedactionConfig::default());
        let (v, _) = redact_argv(
            &r,
            &["psql", "postgres://app:S3cretPass@db.internal:5432/ehr"],
        );
        assert!(v[1].contains("db.internal"), "{v:?}");
        assert!(!v[1].contains("S3cretPass"));
    }

    #[test]
    fn benign_numbers_survive() {
        let r = engine(&RedactionConfig::default());
        for args in [
            &["kill", "-TERM", "123456"][..],
            &["nc", "-z", "10.0.0.5", "5432"],
            &["apt-get", "install", "libssl3=3.0.15-1~deb12u1"],
            &["git", "checkout", "3f2c9a1b7d4e"],
            &["date", "+%s", "1700000000"],
        ] {
            let (v, hits) = redact_argv(&r, args);
            assert_eq!(v, args, "changed: {hits:?}");
        }
    }

    #[test]
    fn env_by_name_and_mask_action() {
        let cfg = RedactionConfig {
            default_action: Some(Action::Mask),
            ..Default::default()
        };
        let r = engine(&cfg);
        let mut env = vec![
            "PGPASSWORD=S3cretPass".to_owned(),
            "HOME=/root".to_owned(),
            "NOTE=call (555) 010-4477".to_owned(),
        ];
        let mut hits = Hits::new();
        r.env(&mut env, "env", &mut hits);
        assert_eq!(env[0], "PGPASSWORD=[redacted:env-secret]");
        assert_eq!(env[1], "HOME=/root");
        assert_eq!(env[2], "NOTE=call [redacted:phone]");
    }

    #[test]
    fn configured_rules_pseudonymize_path_components() {
        let cfg: RedactionConfig = toml::from_str(
            r#"
            [[rules]]
            name = "patient-names"
            fields = ["path"]
            pattern = '[A-Z][a-z]+_[A-Z][a-z]+'
            "#,
        )
        .expect("config");
        let r = engine(&cfg);
        let mut rec = pb::Record {
            event: Some(Event::Open(pb::Open {
                path: "/srv/ehr/Jane_Roe/chart.pdf".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        r.record(&mut rec);
        let Some(Event::Open(o)) = &rec.event else {
            panic!("open")
        };
        assert!(o.path.starts_with("/srv/ehr/[patient-names:"), "{}", o.path);
        assert!(o.path.ends_with("]/chart.pdf"));
        assert_eq!(rec.redactions.len(), 1);
        assert_eq!(rec.redactions[0].field, "open.path");
        assert_eq!(rec.redactions[0].rule, "patient-names");
        assert_eq!(rec.redactions[0].count, 1);
    }

    #[test]
    fn bad_rules_name_the_rule_and_the_problem() {
        let bad = |toml_text: &str| {
            let cfg: RedactionConfig = toml::from_str(toml_text).expect("parses");
            rules::build(&cfg).expect_err("invalid").to_string()
        };
        let e = bad("[[rules]]\nname = \"x\"\npattern = \"(unclosed\"\n");
        assert!(e.contains("\"x\"") && e.contains("invalid pattern"), "{e}");
        let e = bad("[[rules]]\nname = \"y\"\npattern = \"a*\"\n");
        assert!(e.contains("empty string"), "{e}");
        let e = bad("[[rules]]\nname = \"z\"\n");
        assert!(e.contains("exactly one"), "{e}");
        let e = bad("[[rules]]\nname = \"ssn\"\nflags = [\"--x\"]\n");
        assert!(e.contains("already taken"), "{e}");
        let e = bad("disable = [\"nope\"]\n");
        assert!(e.contains("nope"), "{e}");
        let e = bad("mrn_patterns = [\"[\"]\n");
        assert!(e.contains("MRN pattern"), "{e}");
        assert!(
            toml::from_str::<RedactionConfig>(
                "[[rules]]\nname = \"q\"\nfields = [\"bogus\"]\npattern = \"q\"\n"
            )
            .is_err()
        );
    }

    #[test]
    fn large_inputs_are_linear() {
        // 4 KiB of near-misses must not blow up (no backtracking engine).
        let r = engine(&RedactionConfig::default());
        let text = "1-".repeat(2048);
        let mut hits = Hits::new();
        assert!(r.text(FieldClass::Argv, &text, "f", &mut hits).is_none());
    }
}
