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

/// Entries of the result cache before it is cleared.
const CACHE_MAX: usize = 8192;

/// Pattern rules of one field class, with a set that finds in one pass which of them match.
struct ClassRules {
    set: regex::RegexSet,
    /// Index into `RuleSet::patterns` of each member of `set`.
    rules: Vec<usize>,
}

/// What the patterns did to one text: the new text and the hits per rule.
type Cached = Option<(String, Vec<(usize, u32)>)>;

type TextCache = std::collections::HashMap<String, Cached, foldhash::fast::RandomState>;

/// The configured redaction engine.
pub struct Redactor {
    rules: RuleSet,
    key: [u8; key::KEY_BYTES],
    classes: Vec<(FieldClass, ClassRules)>,
    /// Results per class and text: paths in a watched tree repeat on many records. Tokens
    /// depend only on the key, so a cached result stays right. The hasher is seeded at
    /// random per process (texts come from users, who must not be able to force collisions).
    cache: std::collections::HashMap<FieldClass, TextCache>,
}

/// Counts per (field, rule, action) while one record is redacted.
type Hits = BTreeMap<(String, String, &'static str), u32>;

/// A field's name in the redaction list, formatted only when something in it was redacted.
#[derive(Clone, Copy)]
enum Name<'a> {
    Plain(&'a str),
    /// `field[i]`
    Item(&'a str, usize),
    /// `field[i].member`
    Member(&'a str, usize, &'a str),
}

impl Name<'_> {
    fn render(self) -> String {
        match self {
            Name::Plain(f) => f.to_owned(),
            Name::Item(f, i) => format!("{f}[{i}]"),
            Name::Member(f, i, m) => format!("{f}[{i}].{m}"),
        }
    }
}

fn hit(hits: &mut Hits, name: Name<'_>, rule: &str, action: Action, count: u32) {
    *hits
        .entry((name.render(), rule.to_owned(), action.name()))
        .or_insert(0) += count;
}

fn program_of(argv: &[String]) -> &str {
    argv.first()
        .map(|a| a.rsplit('/').next().unwrap_or(a))
        .unwrap_or("")
}

impl Redactor {
    pub fn new(rules: RuleSet, key: [u8; key::KEY_BYTES]) -> Self {
        use FieldClass::{Argv, Comm, Env, Path, Payload};
        let classes = [Argv, Env, Path, Comm, Payload]
            .into_iter()
            .map(|class| {
                let members: Vec<usize> = (0..rules.patterns.len())
                    .filter(|i| rules.patterns[*i].classes.contains(&class))
                    .collect();
                #[expect(
                    clippy::expect_used,
                    reason = "each pattern compiled on its own already"
                )]
                let set =
                    regex::RegexSet::new(members.iter().map(|i| rules.patterns[*i].regex.as_str()))
                        .expect("patterns that compile alone compile as a set");
                (
                    class,
                    ClassRules {
                        set,
                        rules: members,
                    },
                )
            })
            .collect();
        Redactor {
            rules,
            key,
            classes,
            cache: std::collections::HashMap::new(),
        }
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
    fn text(
        &mut self,
        class: FieldClass,
        text: &str,
        field: Name<'_>,
        hits: &mut Hits,
    ) -> Option<String> {
        // Nothing to mask in an empty text (empty matches are skipped). Looked up, it would
        // also cost a comparison with the cached empty key, whose dangling pointer sends the
        // vector compare of a short memcmp into a slow fault-suppressing load.
        if text.is_empty() {
            return None;
        }
        let cached = self.cache.get(&class).and_then(|c| c.get(text)).cloned();
        let result = match cached {
            Some(cached) => cached,
            None => {
                let computed = self.compute(class, text);
                let cache = self.cache.entry(class).or_default();
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(text.to_owned(), computed.clone());
                computed
            }
        };
        let (new, counts) = result?;
        for (i, count) in counts {
            let rule = &self.rules.patterns[i];
            hit(hits, field, &rule.name, rule.action, count);
        }
        Some(new)
    }

    fn compute(&self, class: FieldClass, text: &str) -> Cached {
        let (_, class_rules) = self.classes.iter().find(|(c, _)| *c == class)?;
        // One pass finds which rules match at all; most texts match none.
        let matching: Vec<usize> = class_rules
            .set
            .matches(text)
            .iter()
            .map(|m| class_rules.rules[m])
            .collect();
        if matching.is_empty() {
            return None;
        }
        // (start, end, rule index): earlier rules win where matches overlap.
        let mut spans: Vec<(usize, usize, usize)> = Vec::new();
        for i in matching {
            let rule = &self.rules.patterns[i];
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
        let mut counts: Vec<(usize, u32)> = Vec::new();
        let mut at = 0;
        for (start, end, i) in spans {
            let rule = &self.rules.patterns[i];
            out.push_str(&text[at..start]);
            out.push_str(&self.token(&rule.name, rule.action, &text[start..end], rule.digits_only));
            at = end;
            match counts.iter_mut().find(|(r, _)| *r == i) {
                Some((_, c)) => *c += 1,
                None => counts.push((i, 1)),
            }
        }
        out.push_str(&text[at..]);
        Some((out, counts))
    }

    fn field(&mut self, class: FieldClass, value: &mut String, field: Name<'_>, hits: &mut Hits) {
        if let Some(new) = self.text(class, value, field, hits) {
            *value = new;
        }
    }

    /// Command-line arguments: flag rules (the value after `--password`), then patterns.
    fn argv(&mut self, argv: &mut [String], field: &str, hits: &mut Hits) {
        let program = program_of(argv).to_owned();
        let mut done = vec![false; argv.len()];
        for i in 0..argv.len() {
            for rule in &self.rules.flags {
                if !rule.programs.is_empty() && !rule.programs.contains(&program) {
                    continue;
                }
                for flag in &rule.flags {
                    if argv[i] == *flag && i + 1 < argv.len() && !done[i + 1] {
                        argv[i + 1] = self.token(&rule.name, rule.action, &argv[i + 1], false);
                        done[i + 1] = true;
                        hit(hits, Name::Item(field, i + 1), &rule.name, rule.action, 1);
                        continue;
                    }
                    if done[i] || !argv[i].starts_with(flag.as_str()) {
                        continue;
                    }
                    let rest = &argv[i][flag.len()..];
                    let (sep, value) = match rest.strip_prefix('=') {
                        Some(v) => ("=", v),
                        None if rule.attached => ("", rest),
                        None => continue,
                    };
                    if value.is_empty() {
                        continue;
                    }
                    let token = self.token(&rule.name, rule.action, value, false);
                    argv[i] = format!("{flag}{sep}{token}");
                    done[i] = true;
                    hit(hits, Name::Item(field, i), &rule.name, rule.action, 1);
                }
            }
        }
        for (i, arg) in argv.iter_mut().enumerate() {
            if !done[i] {
                self.field(FieldClass::Argv, arg, Name::Item(field, i), hits);
            }
        }
    }

    /// Environment variables: by name (`PGPASSWORD`), then patterns over the value.
    fn env(&mut self, env: &mut [String], field: &str, hits: &mut Hits) {
        for (i, var) in env.iter_mut().enumerate() {
            let name = Name::Item(field, i);
            let Some((key, value)) = var.split_once('=') else {
                self.field(FieldClass::Env, var, name, hits);
                continue;
            };
            if value.is_empty() {
                continue;
            }
            if let Some(rule) = self.rules.env_names.iter().find(|r| r.names.is_match(key)) {
                let token = self.token(&rule.name, rule.action, value, false);
                hit(hits, name, &rule.name, rule.action, 1);
                *var = format!("{key}={token}");
                continue;
            }
            if let Some(new) = self.text(FieldClass::Env, value, name, hits) {
                *var = format!("{key}={new}");
            }
        }
    }

    fn paths(&mut self, paths: &mut [String], field: &str, hits: &mut Hits) {
        for (i, p) in paths.iter_mut().enumerate() {
            self.field(FieldClass::Path, p, Name::Item(field, i), hits);
        }
    }

    /// Redacts every text field of `rec` and lists what was changed in `rec.redactions`.
    pub fn record(&mut self, rec: &mut pb::Record) {
        let mut hits = Hits::new();
        if let Some(p) = rec.process.as_mut() {
            self.process_fields(p, &mut hits);
        }
        self.event_fields(rec, &mut hits);
        rec.redactions = listed(hits);
    }

    /// Redacts the text fields of a process context on its own and returns what was changed.
    /// A context built once and attached to many records is redacted here once; its records
    /// then go through [`Redactor::record_with_redacted_process`].
    pub fn process(&mut self, p: &mut pb::Process) -> Vec<pb::Redaction> {
        let mut hits = Hits::new();
        self.process_fields(p, &mut hits);
        listed(hits)
    }

    /// [`Redactor::record`] for a record whose process context [`Redactor::process`] has
    /// redacted already and whose `redactions` hold what that call returned: redacts the
    /// other fields and adds their redactions, in the order `record` lists them.
    pub fn record_with_redacted_process(&mut self, rec: &mut pb::Record) {
        let mut hits = Hits::new();
        self.event_fields(rec, &mut hits);
        if hits.is_empty() {
            return;
        }
        rec.redactions.extend(listed(hits));
        // Process and event fields have different names, so nothing needs merging; the
        // order is that of `Hits`: field, rule, action.
        rec.redactions
            .sort_by(|a, b| (&a.field, &a.rule, &a.action).cmp(&(&b.field, &b.rule, &b.action)));
    }

    fn process_fields(&mut self, p: &mut pb::Process, h: &mut Hits) {
        self.argv(&mut p.argv, "process.argv", h);
        self.field(FieldClass::Path, &mut p.exe, Name::Plain("process.exe"), h);
        self.field(FieldClass::Path, &mut p.cwd, Name::Plain("process.cwd"), h);
        self.field(
            FieldClass::Comm,
            &mut p.comm,
            Name::Plain("process.comm"),
            h,
        );
        for (i, a) in p.ancestors.iter_mut().enumerate() {
            self.field(
                FieldClass::Path,
                &mut a.exe,
                Name::Member("process.ancestors", i, "exe"),
                h,
            );
            self.field(
                FieldClass::Comm,
                &mut a.comm,
                Name::Member("process.ancestors", i, "comm"),
                h,
            );
        }
        if let Some(s) = p.identity.as_mut().and_then(|i| i.session.as_mut()) {
            self.field(
                FieldClass::Path,
                &mut s.leader_exe,
                Name::Plain("process.identity.session.leader_exe"),
                h,
            );
        }
    }

    /// Every text field outside the process context.
    fn event_fields(&mut self, rec: &mut pb::Record, h: &mut Hits) {
        match rec.event.as_mut() {
            Some(Event::Exec(e)) => {
                self.argv(&mut e.argv, "exec.argv", h);
                self.env(&mut e.env, "exec.env", h);
                self.field(FieldClass::Path, &mut e.exe, Name::Plain("exec.exe"), h);
                self.field(
                    FieldClass::Path,
                    &mut e.filename,
                    Name::Plain("exec.filename"),
                    h,
                );
            }
            Some(Event::Open(o)) => {
                self.field(FieldClass::Path, &mut o.path, Name::Plain("open.path"), h);
                self.field(
                    FieldClass::Path,
                    &mut o.requested,
                    Name::Plain("open.requested"),
                    h,
                );
            }
            Some(Event::Connect(c)) => {
                self.field(
                    FieldClass::Path,
                    &mut c.unix_path,
                    Name::Plain("connect.unix_path"),
                    h,
                );
            }
            Some(Event::Agent(a)) => self.paths(&mut a.watch, "agent.watch", h),
            Some(Event::ConfigChange(c)) => {
                self.paths(&mut c.watch, "config_change.watch", h);
                self.paths(&mut c.watch_added, "config_change.watch_added", h);
                self.paths(&mut c.watch_removed, "config_change.watch_removed", h);
            }
            _ => {}
        }
    }
}

/// The redaction list of a record from the counts.
fn listed(hits: Hits) -> Vec<pb::Redaction> {
    hits.into_iter()
        .map(|((field, rule, action), count)| pb::Redaction {
            rule,
            field,
            count,
            action: action.into(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{rules::RedactionConfig, *};

    fn engine(cfg: &RedactionConfig) -> Redactor {
        Redactor::new(rules::build(cfg).expect("valid rules"), [9u8; 32])
    }

    fn redact_argv(r: &mut Redactor, args: &[&str]) -> (Vec<String>, Hits) {
        let mut v: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let mut hits = Hits::new();
        r.argv(&mut v, "argv", &mut hits);
        (v, hits)
    }

    #[test]
    fn pseudonyms_are_keyed_stable_and_canonical() {
        let mut r = engine(&RedactionConfig::default());
        let (a, _) = redact_argv(&mut r, &["x", "219-09-9999"]);
        let (b, _) = redact_argv(&mut r, &["x", "ssn 219099999 here"]);
        assert!(a[1].starts_with("[ssn:"), "{a:?}");
        assert!(b[1].contains(&a[1]), "same SSN, same token: {a:?} {b:?}");
        let mut other = Redactor::new(
            rules::build(&RedactionConfig::default()).expect("rules"),
            [1; 32],
        );
        let (c, _) = redact_argv(&mut other, &["x", "219-09-9999"]);
        assert_ne!(a[1], c[1], "another key gives another token");
    }

    #[test]
    fn flags_programs_and_attached_values() {
        let mut r = engine(&RedactionConfig::default());
        let (v, hits) = redact_argv(
            &mut r,
            &["mysql", "-u", "ehr", "-pHunter2x", "--password=S3cret&1"],
        );
        assert_eq!(v[1], "-u");
        assert!(v[3].starts_with("-p[password-flag:"), "{v:?}");
        assert!(v[4].starts_with("--password=[password-flag:"), "{v:?}");
        assert_eq!(hits.len(), 2);
        let (v, _) = redact_argv(&mut r, &["psql", "-p", "5432"]);
        assert_eq!(v[2], "5432", "-p is a port for psql");
        let (v, _) = redact_argv(&mut r, &["sshpass", "-p", "pw123456", "ssh", "db1"]);
        assert!(v[2].starts_with("[password-flag:"));
        assert_eq!(v[3..], ["ssh", "db1"]);
    }

    #[test]
    fn overlapping_detectors_keep_the_host_of_a_url() {
        let mut r = engine(&RedactionConfig::default());
        let (v, _) = redact_argv(
            &mut r,
            &["psql", "postgres://app:S3cretPass@db.internal:5432/ehr"],
        );
        assert!(v[1].contains("db.internal"), "{v:?}");
        assert!(!v[1].contains("S3cretPass"));
    }

    #[test]
    fn benign_numbers_survive() {
        let mut r = engine(&RedactionConfig::default());
        for args in [
            &["kill", "-TERM", "123456"][..],
            &["nc", "-z", "10.0.0.5", "5432"],
            &["apt-get", "install", "libssl3=3.0.15-1~deb12u1"],
            &["git", "checkout", "3f2c9a1b7d4e"],
            &["date", "+%s", "1700000000"],
        ] {
            let (v, hits) = redact_argv(&mut r, args);
            assert_eq!(v, args, "changed: {hits:?}");
        }
    }

    #[test]
    fn env_by_name_and_mask_action() {
        let cfg = RedactionConfig {
            default_action: Some(Action::Mask),
            ..Default::default()
        };
        let mut r = engine(&cfg);
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
        let mut r = engine(&cfg);
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

    /// A process context redacted once on its own, then attached to records whose other
    /// fields are redacted later, gives exactly the records that redacting each whole record
    /// gives: same texts, same redaction list in the same order.
    #[test]
    fn a_context_redacted_once_gives_what_whole_records_give() {
        let cfg: RedactionConfig = toml::from_str(
            r#"
            [[rules]]
            name = "patient-names"
            fields = ["path"]
            pattern = '[A-Z][a-z]+_[A-Z][a-z]+'
            "#,
        )
        .expect("config");
        let context = pb::Process {
            comm: "mysql".into(),
            exe: "/usr/bin/mysql".into(),
            cwd: "/srv/ehr/Jane_Roe".into(),
            argv: vec!["mysql".into(), "-pHunter2x".into(), "219-09-9999".into()],
            ancestors: vec![pb::Ancestor {
                pid: 7,
                comm: "bash".into(),
                exe: "/home/John_Doe/bin/bash".into(),
                ..Default::default()
            }],
            identity: Some(pb::Identity {
                session: Some(pb::LoginSession {
                    leader_exe: "/srv/ehr/Jane_Roe/sshd".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let events = [
            Event::Open(pb::Open {
                path: "/srv/ehr/Mary_Major/chart.pdf".into(),
                requested: "Mary_Major/chart.pdf".into(),
                ..Default::default()
            }),
            Event::Exec(pb::Exec {
                argv: vec!["mysql".into(), "--password=S3cret&1".into()],
                env: vec!["PGPASSWORD=x1".into(), "HOME=/root".into()],
                exe: "/srv/ehr/Jane_Roe/run".into(),
                ..Default::default()
            }),
            Event::Open(pb::Open {
                path: "/srv/ehr/plain.txt".into(),
                ..Default::default()
            }),
        ];
        let mut once = engine(&cfg);
        let mut shared = context.clone();
        let context_hits = once.process(&mut shared);
        assert!(context_hits.len() >= 4, "{context_hits:?}");
        let mut whole = engine(&cfg);
        for event in events {
            let record = pb::Record {
                process: Some(context.clone()),
                event: Some(event),
                ..Default::default()
            };
            let mut want = record.clone();
            whole.record(&mut want);
            let mut got = pb::Record {
                process: Some(shared.clone()),
                redactions: context_hits.clone(),
                ..record
            };
            once.record_with_redacted_process(&mut got);
            assert_eq!(got, want);
        }
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
        let mut r = engine(&RedactionConfig::default());
        let text = "1-".repeat(2048);
        let mut hits = Hits::new();
        assert!(
            r.text(FieldClass::Argv, &text, Name::Plain("f"), &mut hits)
                .is_none()
        );
    }
}
