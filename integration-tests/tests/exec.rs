//! Exec records: argv (bounded, truncation flagged), executable, parent; login uid and audit
//! session id; exit status.

use std::{io::Write as _, os::unix::process::CommandExt as _, process::Command};

use integration_tests::{Agent, TestDir, as_u64, is};
use serde_json::Value;

fn exec_of(pid: u32) -> impl Fn(&Value) -> bool {
    move |r| r.get("exec").is_some() && is::from_pid(r, pid)
}

#[test]
fn exec_records_argv_executable_and_parent() {
    let mut agent = Agent::start(["--no-connect"]);
    let args: Vec<String> = (0..20).map(|i| format!("arg-{i}")).collect();
    let mut child = Command::new("/bin/true")
        .args(&args)
        .spawn()
        .expect("spawn");
    let pid = child.id();
    child.wait().expect("wait");
    let r = agent.wait_for("exec of /bin/true", exec_of(pid));
    let e = &r["exec"];
    assert_eq!(e["filename"], "/bin/true");
    let exe = e["exe"].as_str().expect("exe");
    assert!(exe.ends_with("/true") && exe.starts_with('/'), "exe {exe}");
    assert_eq!(
        std::fs::canonicalize("/bin/true")
            .expect("canonical")
            .to_str(),
        Some(exe),
        "exe is the resolved path"
    );
    let argv: Vec<&str> = e["argv"]
        .as_array()
        .expect("argv")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    assert_eq!(argv.len(), 21, "all 20 arguments and argv[0]: {argv:?}");
    assert_eq!(argv[0], "/bin/true");
    assert_eq!(argv[20], "arg-19");
    assert_eq!(e["argvTruncated"], false);
    assert_eq!(as_u64(&r["process"]["ppid"]), u64::from(std::process::id()));
    assert_eq!(r["process"]["comm"], "true");
    assert_eq!(r["process"]["exe"].as_str(), Some(exe));
    let exit = agent.wait_for("exit of /bin/true", |r| {
        r.get("exit").is_some() && is::from_pid(r, pid)
    });
    assert_eq!(exit["exit"]["status"], 0);
    let stopped = agent.stop_with(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_eq!(stopped.stop_record()["agent"]["reason"], "SIGTERM");
    assert!(
        stopped.stderr.contains("probes detached"),
        "{}",
        stopped.stderr
    );
}

#[test]
fn over_long_argv_is_truncated_and_flagged() {
    let mut agent = Agent::start(["--no-connect"]);
    let long: Vec<String> = (0..100)
        .map(|i| format!("{i:03}-{}", "x".repeat(96)))
        .collect();
    let mut child = Command::new("/bin/true")
        .args(&long)
        .spawn()
        .expect("spawn");
    let pid = child.id();
    child.wait().expect("wait");
    let r = agent.wait_for("exec with a 10 KB argv", exec_of(pid));
    let e = &r["exec"];
    assert_eq!(e["argvTruncated"], true);
    assert!(as_u64(&e["argvBytes"]) > 10_000);
    let argv = e["argv"].as_array().expect("argv");
    assert!(
        argv.len() > 16 && argv.len() < 101,
        "kept {} arguments",
        argv.len()
    );
    assert_eq!(
        argv[1].as_str(),
        Some(long[0].as_str()),
        "leading arguments intact"
    );
    let stopped = agent.stop();
    assert!(stopped.drops("truncated") >= 1, "truncation counted");
    assert!(
        stopped
            .history
            .iter()
            .any(|r| r["gap"]["reason"] == "GAP_REASON_TRUNCATED"),
        "truncation is a record in the output"
    );
}

#[test]
fn login_uid_and_session_written_before_exec_are_on_the_records() {
    let w = TestDir::new("login");
    let file = w.file("chart.txt", "x\n");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(format!(
        "cat /proc/self/sessionid; echo; cat {}",
        file.display()
    ));
    // SAFETY: the closure only uses open/write/close, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open("/proc/self/loginuid")?;
            f.write_all(b"1234")?;
            Ok(())
        });
    }
    let out = cmd.output().expect("run sh with a login uid");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    let session: u64 = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("session id printed");
    assert_ne!(
        session,
        u64::from(u32::MAX),
        "writing loginuid starts a session"
    );
    let r = agent.wait_for("the open by the logged-in child", |r| {
        is::open_of(&file)(r) && r["process"]["comm"] == "cat"
    });
    let id = &r["process"]["identity"];
    assert_eq!(id["loginUid"], 1234);
    assert_eq!(as_u64(&id["auditSession"]), session);
    agent.stop();
}

#[test]
fn unset_login_uid_is_absent_not_a_number() {
    let w = TestDir::new("nologin");
    let file = w.file("chart.txt", "x\n");
    let own = std::fs::read_to_string("/proc/self/loginuid").expect("loginuid");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);
    std::fs::read(&file).expect("read");
    let r = agent.wait_for("our own open", |r| {
        is::open_of(&file)(r) && is::from_pid(r, std::process::id())
    });
    let id = &r["process"]["identity"];
    if own.trim() == "4294967295" {
        assert!(
            id.get("loginUid").is_none(),
            "unset login uid shown as {id}"
        );
    } else {
        assert_eq!(id["loginUid"].to_string(), own.trim());
    }
    agent.stop();
}
