//! The compliance API of a real collector, through phictl (gRPC) and curl (HTTP/JSON):
//! timelines, login sessions and replays of a real ssh login, roles and the access log,
//! evidence bundles that verify offline, and retention with legal holds.

use std::{
    io::{Read as _, Write as _},
    path::Path,
    process::Command,
    time::Duration,
};

use integration_tests::{
    Agent, TestDir,
    collector::{Collector, Phictl, Pki, open_path, phictl_bin},
    set_mode, sshd,
    synthetic::{Chain, T0},
};
use serde_json::Value;

const HOST: &str = "ehr-db-1";

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn json(p: &Phictl) -> Value {
    assert!(p.ok(), "{}", p.text());
    serde_json::from_str(&p.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", p.text()))
}

/// An HTTP/JSON call with curl over HTTP/1.1: (status, body).
fn curl(c: &Collector, pki: &Pki, token: Option<&str>, method: &str, body: &str) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "--cacert"])
        .arg(pki.path("ca.pem"))
        .args(["-o", "-", "-w", "\n%{http_code}", "-X", "POST"])
        .args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    let out = cmd
        .arg(format!("{}/v1/{method}", c.api_url()))
        .output()
        .expect("run curl (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), body.to_owned())
}

#[test]
fn a_real_ssh_login_is_a_session_with_a_timeline_and_a_replay() {
    sshd::ensure_user();
    let pki = Pki::new(&[HOST]);
    let collector = Collector::start(&pki);
    let w = TestDir::new("query-login");
    // Names without identifiers (an MRN in a path would be pseudonymized).
    let a = w.file("chart-a.json", "{}\n");
    let b = w.file("chart-b.json", "{}\n");
    let secret = w.file("chart-c.json", "{}\n");
    set_mode(&a, 0o644);
    set_mode(&b, 0o644);
    set_mode(&secret, 0o600);
    let server = sshd::Sshd::start();
    let mut args: Vec<std::ffi::OsString> =
        vec!["--watch".into(), w.path().into(), "--no-connect".into()];
    args.extend(pki.agent_args(&collector.url(), HOST, HOST));
    let mut agent = Agent::start(args);

    server.ssh(&format!(
        "cat {} {} > /dev/null; cat {} 2>/dev/null; sudo -n cat {} > /dev/null; \
         cat {}/no-such-patient.json 2>/dev/null; true",
        a.display(),
        b.display(),
        secret.display(),
        secret.display(),
        w.path().display()
    ));
    agent.wait_for("the failed open", |r| {
        r["open"]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("no-such-patient.json"))
    });
    let stopped = agent.stop();
    assert!(stopped.status.success());
    collector.wait_for(HOST, "the login's opens", Duration::from_secs(30), |r| {
        r.iter()
            .filter(|s| open_path(&s.record).is_some_and(|p| p.contains("no-such-patient")))
            .count()
            == 1
    });
    let token = collector.token_for("auditor1", "auditor");

    // Sessions: the ssh login, from loopback, with its PHI accesses and the denial.
    let sessions = json(&collector.phictl_api(
        &pki,
        &token,
        &["--format", "json", "sessions", "--host", HOST],
    ));
    let list = sessions["sessions"].as_array().expect("sessions");
    let s = list
        .iter()
        .find(|s| s["user"] == sshd::USER && s["kind"] == "ssh")
        .unwrap_or_else(|| panic!("the ssh session is listed: {sessions:#}"));
    assert_eq!(s["sourceAddress"], "127.0.0.1");
    let phi = s["phiAccesses"]
        .as_str()
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(
        phi,
        Some(5),
        "a, b, secret (denied), secret via sudo, missing: {s:#}"
    );
    assert_eq!(
        s["denied"], "2",
        "the unreadable and the missing file: {s:#}"
    );
    let session = s["session"].as_str().expect("id").to_owned();
    let table = collector.phictl_api(&pki, &token, &["sessions", "--host", HOST]);
    assert!(table.ok(), "{}", table.text());
    assert!(
        table.stdout.contains(&session) && table.stdout.contains("127.0.0.1:"),
        "{}",
        table.stdout
    );

    // The replay: a readable transcript of what the session did, in order.
    let replay = collector.phictl_api(&pki, &token, &["replay", "--session", &session]);
    assert!(replay.ok(), "{}", replay.text());
    let t = &replay.stdout;
    assert!(
        t.contains(&format!(
            "Session {session}: {} (ssh from 127.0.0.1:",
            sshd::USER
        )),
        "{t}"
    );
    let pos = |needle: &str| {
        t.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} in\n{t}"))
    };
    assert!(pos("chart-a.json [r]") < pos("chart-c.json [r]  (denied/failed EACCES)"));
    assert!(
        t.contains(&format!("{} as root (sudo)", sshd::USER)),
        "sudo is named:\n{t}"
    );
    assert!(t.contains("exec "), "programs run are in it:\n{t}");
    assert!(
        t.contains("no-such-patient.json [r]  (denied/failed ENOENT)"),
        "{t}"
    );

    // The timeline for this person and these files.
    let prefix = format!("{}/", w.path().display());
    let timeline = collector.phictl_api(
        &pki,
        &token,
        &[
            "timeline",
            "--host",
            HOST,
            "--user",
            sshd::USER,
            "--path-prefix",
            &prefix,
            "--kind",
            "open",
        ],
    );
    assert!(timeline.ok(), "{}", timeline.text());
    let lines: Vec<&str> = timeline.stdout.lines().collect();
    assert!(
        lines[0].starts_with("TIME (UTC)") && lines[0].contains("OUTCOME"),
        "{lines:?}"
    );
    assert_eq!(
        lines.len(),
        1 + 5,
        "five opens under the tree:\n{}",
        timeline.stdout
    );
    assert!(
        timeline.stdout.contains("ssh 127.0.0.1:"),
        "{}",
        timeline.stdout
    );

    // The same timeline over HTTP/JSON (HTTP/1.1), as JSON lines.
    let (code, body) = curl(
        &collector,
        &pki,
        Some(&token),
        "timeline",
        &format!(
            r#"{{"host":"{HOST}","user":"{}","pathPrefix":"{prefix}","kinds":["open"]}}"#,
            sshd::USER
        ),
    );
    assert_eq!(code, 200, "{body}");
    let rows = json_lines(&body);
    assert_eq!(rows.len(), 5, "{body}");
    assert!(rows.iter().all(|r| {
        r["record"]["open"]["path"]
            .as_str()
            .is_some_and(|p| p.starts_with(&prefix))
    }));
    assert!(rows.iter().all(|r| r["session"] == session.as_str()));
}

#[test]
fn roles_tokens_certificates_and_the_access_log() {
    let pki = Pki::new(&[HOST, "auditor-laptop"]);
    let collector = Collector::start(&pki);
    let mut chain = Chain::new(HOST);
    {
        let mut store = collector.store();
        store.pin_host(HOST, &chain.key.public_key()).expect("pin");
        store.append(HOST, chain.grow(30)).expect("append");
    }
    let auditor = collector.token_for("alice", "auditor");
    let admin = collector.token_for("ops", "admin");

    // An auditor reads; managing needs an admin.
    let hosts = collector.phictl_api(&pki, &auditor, &["hosts"]);
    assert!(
        hosts.ok() && hosts.stdout.contains(HOST),
        "{}",
        hosts.text()
    );
    let denied = collector.phictl_api(&pki, &auditor, &["prune", "--dry-run"]);
    assert_eq!(denied.code, 2, "{}", denied.text());
    assert!(
        denied.stderr.contains("needs the admin role"),
        "{}",
        denied.text()
    );
    let hold = collector.phictl_api(
        &pki,
        &admin,
        &["hold", "set", "--host", HOST, "--reason", "matter 2026-17"],
    );
    assert!(
        hold.ok() && hold.stdout.contains("under legal hold"),
        "{}",
        hold.text()
    );

    // Certificates sign in once an admin registers them.
    let with_cert = |args: &[&str]| {
        Phictl::run(
            Command::new(phictl_bin())
                .args(["--collector", &collector.api_url(), "--ca"])
                .arg(pki.path("ca.pem"))
                .arg("--cert")
                .arg(pki.path("auditor-laptop.pem"))
                .arg("--key")
                .arg(pki.path("auditor-laptop.key"))
                .args(args),
        )
    };
    let unknown = with_cert(&["whoami"]);
    assert_eq!(unknown.code, 2);
    assert!(
        unknown.stderr.contains("not registered"),
        "{}",
        unknown.text()
    );
    let add = collector.phictl_api(
        &pki,
        &admin,
        &[
            "principals",
            "add",
            "bob",
            "--role",
            "auditor",
            "--cert-name",
            "auditor-laptop",
        ],
    );
    assert!(add.ok(), "{}", add.text());
    let me = with_cert(&["whoami"]);
    assert!(me.ok(), "{}", me.text());
    assert_eq!(me.stdout.trim(), "bob (auditor, signed in by certificate)");

    // A disabled principal's token stops working at once; unknown tokens never work.
    let off = collector.phictl_api(&pki, &admin, &["principals", "disable", "alice"]);
    assert!(off.ok(), "{}", off.text());
    let gone = collector.phictl_api(&pki, &auditor, &["hosts"]);
    assert_eq!(gone.code, 2);
    assert!(
        gone.stderr.contains("unknown or was revoked"),
        "{}",
        gone.text()
    );
    let (code, body) = curl(&collector, &pki, Some("phi_not_a_token"), "hosts", "");
    assert_eq!(code, 401, "{body}");
    let (code, body) = curl(&collector, &pki, None, "hosts", "");
    assert_eq!(code, 401, "{body}");
    let (code, body) = curl(
        &collector,
        &pki,
        Some(&admin),
        "prune",
        r#"{"dryRun":true}"#,
    );
    assert_eq!(code, 200, "{body}");
    let (code, _) = curl(&collector, &pki, Some(&admin), "no-such-method", "");
    assert_eq!(code, 404);
    let (code, body) = curl(&collector, &pki, Some(&admin), "timeline", "{not json");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not valid JSON"), "{body}");

    // Every call is in the access log, allowed or not, and the log verifies.
    let log = collector.phictl_api(
        &pki,
        &admin,
        &["--format", "json", "access-log", "--verify"],
    );
    let log = json(&log);
    assert_eq!(log["verified"], true, "{log:#}");
    let entries = log["entries"].as_array().expect("entries");
    let has = |who: &str, action: &str, outcome: &str| {
        entries
            .iter()
            .any(|e| e["principal"] == who && e["action"] == action && e["outcome"] == outcome)
    };
    assert!(has("alice", "Hosts", "ok"), "{log:#}");
    assert!(has("alice", "Prune", "denied"), "{log:#}");
    assert!(has("ops", "Hold", "ok"), "{log:#}");
    assert!(has("bob", "WhoAmI", "ok"), "{log:#}");
    assert!(has("anonymous", "Authenticate", "denied"), "{log:#}");
    assert!(
        entries
            .iter()
            .any(|e| e["method"] == "local" && e["action"] == "AddPrincipal")
    );
    let hold_entry = entries
        .iter()
        .find(|e| e["action"] == "Hold")
        .expect("the hold");
    assert!(
        hold_entry["request"]
            .as_str()
            .is_some_and(|r| r.contains("matter 2026-17"))
    );

    // Editing the access log is found.
    let db = collector.db.strip_prefix("sqlite:").expect("sqlite");
    let conn = rusqlite::Connection::open(db).expect("open");
    let body: Vec<u8> = conn
        .query_row("SELECT body FROM access_log WHERE seq = 3", [], |r| {
            r.get(0)
        })
        .expect("entry 3");
    let mut edited = body.clone();
    let last = edited.len() - 1;
    edited[last] ^= 0x01;
    conn.execute("UPDATE access_log SET body = ?1 WHERE seq = 3", [edited])
        .expect("edit");
    let broken = collector.phictl_api(&pki, &admin, &["access-log", "--verify", "--limit", "1"]);
    assert_eq!(broken.code, 1, "{}", broken.text());
    assert!(
        broken.stdout.contains("FAILED at entry 3"),
        "{}",
        broken.text()
    );
}

/// Rewrites one file inside a bundle (keeping every other byte and the manifest).
fn edit_bundle(src: &Path, dst: &Path, name: &str, edit: impl Fn(&mut Vec<u8>)) {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(src).expect("bundle"),
    ));
    let out = flate2::write::GzEncoder::new(
        std::fs::File::create(dst).expect("create"),
        flate2::Compression::default(),
    );
    let mut builder = tar::Builder::new(out);
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        let path = entry.path().expect("path").to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).expect("read");
        if path == name {
            edit(&mut bytes);
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, &path, bytes.as_slice())
            .expect("append");
    }
    builder
        .into_inner()
        .expect("tar")
        .finish()
        .expect("gzip")
        .flush()
        .expect("flush");
}

#[test]
fn evidence_bundles_verify_offline_and_reveal_any_edit() {
    let pki = Pki::new(&[HOST]);
    let collector = Collector::start(&pki);
    let mut chain = Chain::new(HOST);
    {
        let mut store = collector.store();
        store.pin_host(HOST, &chain.key.public_key()).expect("pin");
        store.append(HOST, chain.grow(45)).expect("append");
    }
    let token = collector.token_for("alice", "auditor");
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("evidence.tar.gz");
    let at = |minutes: i64| rfc3339(T0 + minutes * 60);
    // phictl export of minutes [from, to) into `file`, as alice.
    let export = |from: i64, to: i64, file: &std::path::Path| {
        collector.phictl_api(
            &pki,
            &token,
            &[
                "export",
                "--host",
                HOST,
                "--since",
                &at(from),
                "--until",
                &at(to),
                "-o",
                file.to_str().expect("utf-8"),
            ],
        )
    };

    // Records 15..=26 are in the window; the bundle widens to the checkpoints 10 and 30.
    let out = export(15, 27, &bundle);
    assert!(out.ok(), "{}", out.text());
    assert!(
        out.stdout.contains("12 in the window; verifies: yes"),
        "{}",
        out.text()
    );
    let check = Phictl::run(Command::new(phictl_bin()).arg("verify-bundle").arg(&bundle));
    assert!(check.ok(), "{}", check.text());
    assert!(
        check
            .stdout
            .contains("20 records (seq 11 to 30), 3 checkpoints, signed through seq 30"),
        "{}",
        check.text()
    );
    assert!(
        check.stdout.contains("(records 15 to 26)"),
        "{}",
        check.text()
    );

    // Any edit is found: the readable copy, a record's bytes, or a dropped record.
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, &str, Edit, &str)> = vec![
        (
            "readable copy",
            "records.jsonl",
            Box::new(|b: &mut Vec<u8>| {
                let t = String::from_utf8(b.clone()).expect("utf-8");
                *b = t
                    .replacen("/srv/ehr/p13.json", "/srv/ehr/p99.json", 1)
                    .into_bytes();
            }),
            "records.jsonl",
        ),
        (
            "record bytes",
            "records.pb",
            Box::new(|b: &mut Vec<u8>| {
                let at = b.len() / 2;
                b[at] ^= 0x20;
            }),
            "records.pb was changed",
        ),
        (
            "manifest-consistent removal",
            "README.txt",
            Box::new(|b: &mut Vec<u8>| b.truncate(10)),
            "README.txt was changed",
        ),
    ];
    for (case, file, edit, words) in cases {
        let bad = dir.path().join(format!("bad-{file}.tar.gz"));
        edit_bundle(&bundle, &bad, file, edit);
        let out = Phictl::run(Command::new(phictl_bin()).arg("verify-bundle").arg(&bad));
        assert_eq!(out.code, 1, "{case}: {}", out.text());
        assert!(out.stdout.contains(words), "{case}: {}", out.text());
    }

    // The newest records, not yet under a checkpoint, are exported with a note.
    let tail = dir.path().join("tail.tar.gz");
    let out = export(41, 60, &tail);
    assert!(out.ok(), "{}", out.text());
    assert!(
        out.stdout
            .contains("not covered by a checkpoint signature yet"),
        "{}",
        out.text()
    );

    // Over HTTP/JSON the export is the bundle itself.
    let via_http = dir.path().join("http.tar.gz");
    let status = Command::new("curl")
        .args(["-sS", "--fail", "--http1.1", "--cacert"])
        .arg(pki.path("ca.pem"))
        .args(["-H", &format!("authorization: Bearer {token}"), "-o"])
        .arg(&via_http)
        .args([
            "--data-binary",
            &format!(
                r#"{{"host":"{HOST}","since":"{}","until":"{}"}}"#,
                at(15),
                at(27)
            ),
        ])
        .arg(format!("{}/v1/export", collector.api_url()))
        .status()
        .expect("curl");
    assert!(status.success());
    let check = Phictl::run(
        Command::new(phictl_bin())
            .arg("verify-bundle")
            .arg(&via_http),
    );
    assert!(check.ok(), "{}", check.text());

    // Exports are recorded with who asked for what, and what was handed out: the SHA-256
    // of each bundle, the same as the file's.
    let admin = collector.token_for("ops", "admin");
    let log = json(&collector.phictl_api(&pki, &admin, &["--format", "json", "access-log"]));
    let exports: Vec<&serde_json::Value> = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "Export" && e["principal"] == "alice")
        .collect();
    assert_eq!(
        exports.len(),
        6,
        "a request and a result per export: {log:#}"
    );
    for file in [&bundle, &tail, &via_http] {
        let sha = sha256_hex(file);
        let hit = exports
            .iter()
            .filter(|e| {
                e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(&format!("SHA-256 {sha}")))
            })
            .count();
        assert_eq!(
            hit,
            1,
            "{} ({sha}) is not in the access log: {log:#}",
            file.display()
        );
    }
    // phictl's own summary carries the file's SHA-256 too.
    let again = dir.path().join("again.tar.gz");
    let out = export(15, 27, &again);
    assert!(out.ok(), "{}", out.text());
    assert!(
        out.stdout
            .contains(&format!("SHA-256 {}", sha256_hex(&again))),
        "{}",
        out.text()
    );
}

fn sha256_hex(file: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("hash")
        .to_owned()
}

/// RFC 3339 in UTC for seconds since the epoch.
fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .expect("time")
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[test]
fn retention_prunes_whole_checkpoint_intervals_except_under_legal_hold() {
    let pki = Pki::new(&[HOST, "ehr-db-2"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let mut collector = Collector::start(&pki);
    // Two hosts, each: 30 records ten days ago, then 15 in the last hour.
    for host in [HOST, "ehr-db-2"] {
        let mut old = Chain::at(host, now - 10 * 86_400);
        let mut store = collector.store();
        store.pin_host(host, &old.key.public_key()).expect("pin");
        store.append(host, old.grow(30)).expect("old records");
        old.base = now - 3600 - 31 * 60;
        store.append(host, old.grow(15)).expect("new records");
    }
    let admin = collector.token_for("ops", "admin");
    let hold = collector.phictl_api(
        &pki,
        &admin,
        &[
            "hold",
            "set",
            "--host",
            "ehr-db-2",
            "--reason",
            "subpoena 44",
        ],
    );
    assert!(hold.ok(), "{}", hold.text());

    // A five-day retention period: applied when the collector starts.
    collector.stop();
    collector.set_extra(&["--retention", "5days"]);
    collector.restart();
    collector.wait_until("retention to run", Duration::from_secs(30), |c| {
        c.store()
            .host_info(HOST)
            .expect("host")
            .is_some_and(|h| h.anchor_seq > 0)
    });
    let info = collector.store().host_info(HOST).expect("q").expect("host");
    assert_eq!(
        info.anchor_seq, 30,
        "pruned through the last checkpoint older than 5 days"
    );
    let held = collector
        .store()
        .host_info("ehr-db-2")
        .expect("q")
        .expect("host");
    assert_eq!(held.anchor_seq, 0, "a held host keeps everything");
    assert_eq!(
        collector.records(HOST).first().map(|s| s.sealed.seq),
        Some(31)
    );

    // What remains still verifies, anchored by the kept checkpoint.
    let verify = collector.phictl_api(&pki, &admin, &["verify", "--all"]);
    assert!(verify.ok(), "{}", verify.text());
    assert!(
        verify.stdout.contains("were removed by retention"),
        "{}",
        verify.text()
    );

    // The prune is in the access log, by the retention job.
    let log = json(&collector.phictl_api(&pki, &admin, &["--format", "json", "access-log"]));
    assert!(
        log["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["principal"] == "retention"
                && e["action"] == "Prune"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(&format!("{HOST} through seq 30")))),
        "{log:#}"
    );

    // Released, the second host is pruned on request; a dry run then finds nothing.
    let release = collector.phictl_api(&pki, &admin, &["hold", "release", "--host", "ehr-db-2"]);
    assert!(release.ok(), "{}", release.text());
    let prune = collector.phictl_api(&pki, &admin, &["--format", "json", "prune"]);
    let prune = json(&prune);
    let second = prune["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["hostId"] == "ehr-db-2")
        .expect("listed")
        .clone();
    assert_eq!(second["throughSeq"], "30", "{prune:#}");
    let dry =
        json(&collector.phictl_api(&pki, &admin, &["--format", "json", "prune", "--dry-run"]));
    assert!(
        dry["hosts"]
            .as_array()
            .expect("hosts")
            .iter()
            .all(|h| h["records"] == "0"),
        "{dry:#}"
    );
}
