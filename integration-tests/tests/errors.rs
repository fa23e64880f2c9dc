//! Bad input and missing privileges give one clear line that names the fix.

use std::{os::unix::process::CommandExt as _, process::Command};

use integration_tests::{TestDir, agent_bin, require_root};

fn run_agent(args: &[&str], as_nobody: bool) -> (i32, String) {
    let mut cmd = Command::new(agent_bin());
    cmd.args(["run", "--stdout"]).args(args);
    if as_nobody {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().expect("run agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_privileges_name_the_capabilities() {
    require_root();
    let dir = TestDir::new("noperm");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    integration_tests::set_mode(&state, 0o777);
    let (code, err) = run_agent(
        &[
            "--watch",
            dir.path().to_str().expect("utf8"),
            "--state-dir",
            state.to_str().expect("utf8"),
        ],
        true,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("CAP_BPF") && err.contains("CAP_PERFMON"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        !state.join("redaction.key").exists(),
        "nothing is created before the host checks pass"
    );
}

#[test]
fn a_missing_watch_directory_is_refused_before_loading() {
    require_root();
    let (code, err) = run_agent(&["--watch", "/nonexistent/phi"], false);
    assert_eq!(code, 2);
    assert!(
        err.contains("/nonexistent/phi") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn unknown_config_keys_are_errors() {
    require_root();
    let dir = TestDir::new("badconf");
    let conf = dir.path().join("agent.toml");
    std::fs::write(&conf, "wach = [\"/tmp\"]\n").expect("write");
    let (code, err) = run_agent(&["--config", conf.to_str().expect("utf8")], false);
    assert_eq!(code, 2);
    assert!(err.contains("wach"), "{err}");
}

#[test]
fn help_documents_every_flag() {
    let out = Command::new(agent_bin())
        .args(["run", "--help"])
        .output()
        .expect("help");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--watch",
        "--stdout",
        "--host-id",
        "--ring-buffer-bytes",
        "--no-connect",
        "--log",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}");
    }
}
