//! Redaction end to end: every case of the shared corpus (and the project's own cases) runs
//! as a real exec; no secret may appear in anything the agent writes (records and its own log,
//! at debug level), and every string to keep must survive.

use std::{os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use integration_tests::{Agent, TestDir, is};
use serde_json::Value;

#[derive(Debug)]
struct Case {
    id: String,
    argv: Vec<String>,
    env: Option<Vec<String>>,
    secrets: Vec<String>,
    keep: Vec<String>,
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn load(path: &PathBuf) -> Vec<Case> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("corpus line is JSON");
            Case {
                id: v["id"].as_str().expect("id").to_owned(),
                argv: strings(&v, "argv"),
                env: v.get("env").map(|_| strings(&v, "env")),
                secrets: strings(&v, "secrets"),
                keep: strings(&v, "keep"),
            }
        })
        .collect()
}

fn corpus() -> Vec<Case> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut cases = load(&root.join("../../shared/corpus/redaction.jsonl"));
    assert!(cases.len() >= 20, "the shared corpus has its cases");
    cases.extend(load(&root.join("corpus/redaction-extra.jsonl")));
    cases
}

#[test]
fn no_secret_of_the_corpus_leaves_the_agent_and_every_keep_survives() {
    let cases = corpus();
    let w = TestDir::new("redact");
    let mut agent = Agent::start([
        "--watch".as_ref(),
        w.path().as_os_str(),
        "--log".as_ref(),
        "debug".as_ref(),
    ]);
    let mut pids = Vec::new();
    for case in &cases {
        // A real exec: /bin/true with the case's argv (argv[0] included) or environment.
        let mut cmd = Command::new("/bin/true");
        if case.argv.is_empty() {
            cmd.arg0("env-case");
        } else {
            cmd.arg0(&case.argv[0]).args(&case.argv[1..]);
        }
        // Only the case's own environment (argv cases: a fixed benign one), never the test
        // runner's: a variable of the machine running the tests whose name looks like a
        // secret (`TOX_TESTENV_PASSENV`) would be redacted, rightly, in an argv case.
        cmd.env_clear();
        if case.env.is_none() {
            cmd.env("PATH", "/usr/bin:/bin").env("LANG", "C.UTF-8");
        }
        if let Some(env) = &case.env {
            for kv in env {
                let (k, v) = kv.split_once('=').expect("NAME=value");
                cmd.env(k, v);
            }
        }
        let mut child = cmd.spawn().expect("spawn");
        pids.push(child.id());
        child.wait().expect("wait");
    }
    let mut execs = Vec::new();
    for (case, pid) in cases.iter().zip(&pids) {
        let rec = agent.wait_for(&format!("exec of case {}", case.id), |r| {
            r.get("exec").is_some() && is::from_pid(r, *pid)
        });
        execs.push(rec);
    }
    let stopped = agent.stop();
    let everything: String = stopped
        .history
        .iter()
        .map(Value::to_string)
        .chain(std::iter::once(stopped.stderr.clone()))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        stopped.stderr.contains("DEBUG"),
        "the agent logged at debug level"
    );
    for (case, rec) in cases.iter().zip(&execs) {
        for secret in &case.secrets {
            assert!(
                !everything.contains(secret.as_str()),
                "case {}: secret {secret:?} leaked",
                case.id
            );
        }
        let fields: Vec<String> = strings(&rec["exec"], "argv")
            .into_iter()
            .chain(strings(&rec["exec"], "env"))
            .collect();
        for keep in &case.keep {
            assert!(
                fields.iter().any(|f| f.contains(keep.as_str())),
                "case {}: {keep:?} did not survive: {fields:?}",
                case.id
            );
        }
        if !case.secrets.is_empty() {
            let listed = rec["redactions"].as_array().map_or(0, Vec::len);
            assert!(
                listed > 0,
                "case {}: the record lists its redactions",
                case.id
            );
        } else {
            assert_eq!(
                rec["redactions"].as_array().map_or(0, Vec::len),
                0,
                "case {}: nothing to redact: {}",
                case.id,
                rec["redactions"]
            );
        }
    }
}

#[test]
fn configured_rules_pseudonymize_paths_the_same_way_every_time() {
    let w = TestDir::new("redact-path");
    let chart = w.file("Jane_Roe/chart.txt", "synthetic\n");
    let conf_dir = TestDir::new("redact-conf");
    let conf = conf_dir.path().join("agent.toml");
    std::fs::write(
        &conf,
        format!(
            "watch = [{:?}]\n[redaction]\n[[redaction.rules]]\nname = \"patient-name\"\nfields = [\"path\", \"argv\"]\npattern = '[A-Z][a-z]+_[A-Z][a-z]+'\n",
            w.path().display().to_string()
        ),
    )
    .expect("config");
    let mut agent = Agent::start(["--config".as_ref(), conf.as_os_str()]);
    for _ in 0..2 {
        let out = Command::new("cat").arg(&chart).output().expect("cat");
        assert!(out.status.success());
    }
    let first = agent.wait_for("first open", |r| {
        r["open"]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("/chart.txt"))
    });
    let second = agent.wait_for("second open", |r| {
        r["open"]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("/chart.txt"))
            && r["seq"] != first["seq"]
    });
    let path = first["open"]["path"].as_str().expect("path");
    assert!(path.contains("[patient-name:"), "{path}");
    assert_eq!(
        first["open"]["path"], second["open"]["path"],
        "stable pseudonym"
    );
    let listed: Vec<(String, String)> = first["redactions"]
        .as_array()
        .expect("redactions")
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().unwrap_or("").to_owned(),
                r["field"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(
        listed.contains(&("patient-name".into(), "open.path".into())),
        "{listed:?}"
    );
    assert!(
        listed.contains(&("patient-name".into(), "process.argv[1]".into())),
        "{listed:?}"
    );
    let stopped = agent.stop();
    let all: String = stopped.history.iter().map(Value::to_string).collect();
    assert!(
        !all.contains("Jane_Roe"),
        "the patient name never leaves the agent"
    );
}

#[test]
fn bad_redaction_config_stops_the_agent_naming_the_rule() {
    integration_tests::require_root();
    let dir = TestDir::new("redact-bad");
    let conf = dir.path().join("agent.toml");
    let run = |text: &str| {
        std::fs::write(&conf, text).expect("write");
        let out = Command::new(integration_tests::agent_bin())
            .args(["run", "--stdout", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--config")
            .arg(&conf)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2));
        assert!(out.stdout.is_empty(), "nothing emitted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run("[[redaction.rules]]\nname = \"study\"\npattern = \"(\"\n");
    assert!(
        err.contains("\"study\"") && err.contains("invalid pattern"),
        "{err}"
    );
    let key = dir.path().join("open.key");
    std::fs::write(&key, [1u8; 32]).expect("key");
    integration_tests::set_mode(&key, 0o644);
    let err = run(&format!(
        "[redaction]\nkey_file = {:?}\n",
        key.display().to_string()
    ));
    assert!(err.contains("chmod 600"), "{err}");
}
