//! `cargo xtask test`: setup, lints, build, the deployment checks (`check-deploy`), unit tests,
//! then the privileged tests that load the kernel probes into the running kernel (root, one test
//! thread), the demo's scripted part, the kernel matrix and a short fuzz run. With `CI=true`
//! nothing may be skipped: a missing privilege is a failure.

use std::ffi::OsString;

use anyhow::bail;
use clap::Args;

use crate::{
    cmd::{self, exec, step},
    deploy_check, setup,
};

/// Fuzz targets (in `fuzz/`) and how long each runs in the test command.
const FUZZ_TARGETS: &[&str] = &["record_decode", "kernel_event_decode", "spool_read"];
const FUZZ_SECONDS: u32 = 15;

#[derive(Args)]
pub struct TestArgs {
    /// Only run tests whose name contains this text (passed to the test harness).
    #[arg(long)]
    filter: Option<String>,
    /// Skip the lint step (formatting and clippy).
    #[arg(long)]
    no_lint: bool,
    /// Seconds of fuzzing per target (0 skips fuzzing).
    #[arg(long, default_value_t = FUZZ_SECONDS)]
    fuzz_seconds: u32,
}

/// Packages with unprivileged tests.
const UNIT_PACKAGES: &[&str] = &[
    "agent-common",
    "phi-proto",
    "phi-chain",
    "phi-agent",
    "phi-collector",
    "phi-telemetry",
    "phi-bench",
    "xtask",
];

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    setup::run()?;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !cmd::is_root() {
        bail!(
            "the privileged tests load kernel probes and need root{}: run `sudo -E cargo xtask \
             test`",
            if ci {
                " (CI=true: they may not be skipped)"
            } else {
                ""
            }
        );
    }

    if !args.no_lint {
        step("lint: rustfmt and clippy");
        exec(cmd::cargo().args(["fmt", "--all", "--", "--check"]))?;
        exec(cmd::cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "agent-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        // The kernel programs, for the bpf target with the nightly toolchain.
        exec(
            std::process::Command::new("cargo")
                .current_dir(cmd::workspace_root())
                .env(
                    "CARGO_TARGET_DIR",
                    cmd::workspace_root().join("target/ebpf-clippy"),
                )
                .env("RUSTFLAGS", "--cfg bpf_target_arch=\"x86_64\"")
                .args([
                    "+nightly",
                    "clippy",
                    "-p",
                    "agent-ebpf",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--release",
                    "--",
                    "-D",
                    "warnings",
                ]),
        )?;
    }

    step("build: agent (with its kernel programs) and test crates");
    exec(cmd::cargo().args([
        "build",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
    ]))?;

    // The units are verified against the binaries just built.
    deploy_check::check(&cmd::workspace_root().join("target/debug"))?;

    step("unit tests");
    let mut unit = cmd::cargo();
    unit.arg("test");
    for p in UNIT_PACKAGES {
        unit.args(["-p", p]);
    }
    if let Some(f) = &args.filter {
        unit.args(["--", f]);
    }
    exec(&mut unit)?;

    step("privileged tests against the running kernel (root, one thread)");
    let bins = cmd::workspace_root().join("target/debug");
    let mut privileged = cmd::cargo();
    privileged
        .env("PHI_AGENT_BIN", bins.join("phi-agent"))
        .env("PHI_COLLECTOR_BIN", bins.join("phi-collector"))
        .env("PHICTL_BIN", bins.join("phictl"))
        .env("PHI_REQUIRE_PRIVILEGED", "1")
        .args(["test", "-p", "integration-tests", "--", "--test-threads=1"]);
    if let Some(f) = &args.filter {
        privileged.arg(OsString::from(f));
    }
    exec(&mut privileged)?;
    if args.filter.is_none() {
        // The README's main command, scripted part only: it must work as documented.
        step("the main job: cargo xtask demo --no-live (in a scratch directory)");
        let root = std::env::temp_dir().join(format!("phi-audit-demo-{}", std::process::id()));
        let result = crate::demo::run(&crate::demo::DemoArgs::scripted(root.clone()));
        let _ = std::fs::remove_dir_all(&root);
        result?;
        // Every kernel of the matrix (Debian's under qemu, and the host's) must see the
        // same actions.
        step("kernel matrix: cargo xtask kernel-matrix");
        crate::kernel_matrix::run(&crate::kernel_matrix::KernelMatrixArgs::default())?;
    }
    fuzz(args.fuzz_seconds)?;
    step("all tests passed");
    Ok(())
}

/// A short run of every fuzz target (nightly, libFuzzer); a crash fails the test command.
fn fuzz(seconds: u32) -> anyhow::Result<()> {
    if seconds == 0 {
        return Ok(());
    }
    for target in FUZZ_TARGETS {
        step(format!("fuzz: {target} for {seconds} s"));
        exec(
            std::process::Command::new("cargo")
                .current_dir(cmd::workspace_root())
                .args(["+nightly", "fuzz", "run", target, "--"])
                .arg(format!("-max_total_time={seconds}"))
                .arg("-rss_limit_mb=2048"),
        )?;
    }
    Ok(())
}
