//! `cargo xtask demo`: set up, build, fill a demo directory with synthetic patient records,
//! start the agent on it, touch a few records, and keep printing live records until Ctrl-C.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{
    cmd::{self, exec, step},
    setup,
};

#[derive(Args)]
pub struct DemoArgs {
    /// Directory to create the synthetic records in.
    #[arg(long, default_value = "/tmp/phi-audit-demo/ehr")]
    dir: PathBuf,
}

/// Synthetic patients (invented names and numbers).
const PATIENTS: &[(&str, &str, &str)] = &[
    ("MRN-100234", "Avery Quinlan", "1961-03-14"),
    ("MRN-100871", "Jordan Ellery", "1984-11-02"),
    ("MRN-101442", "Morgan Tillsdale", "1992-07-29"),
];

fn fill(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("labs"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    for (mrn, name, dob) in PATIENTS {
        std::fs::write(
            dir.join(format!("{mrn}.json")),
            format!(
                "{{\"mrn\":\"{mrn}\",\"name\":\"{name}\",\"dob\":\"{dob}\",\"synthetic\":true}}\n"
            ),
        )?;
        std::fs::write(
            dir.join("labs").join(format!("{mrn}-a1c.csv")),
            "date,test,value\n2026-10-01,HbA1c,5.9\n",
        )?;
    }
    Ok(())
}

/// A few accesses so the first records appear without anyone typing.
fn scripted_accesses(dir: &Path) {
    let first = dir.join(format!("{}.json", PATIENTS[0].0));
    let _ = Command::new("cat")
        .arg(&first)
        .stdout(Stdio::null())
        .status();
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && head -n1 labs/*.csv > /dev/null; cat no-such-patient.json 2>/dev/null",
            dir.display()
        ))
        .status();
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    setup::run()?;
    if !cmd::is_root() {
        bail!("the agent loads kernel probes and needs root: run `sudo -E cargo xtask demo`");
    }
    step("build: phi-agent with its kernel programs");
    exec(cmd::cargo().args(["build", "--release", "-p", "phi-agent"]))?;
    let agent = cmd::workspace_root().join("target/release/phi-agent");

    step(format!(
        "demo data: synthetic patient records in {}",
        args.dir.display()
    ));
    fill(&args.dir)?;

    step(format!(
        "start: phi-agent run --watch {} --stdout",
        args.dir.display()
    ));
    let mut child = Command::new(&agent)
        .args(["run", "--stdout", "--watch"])
        .arg(&args.dir)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", agent.display()))?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let mut lines = BufReader::new(stdout).lines();

    // Wait for the agent's start record, then touch some records.
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in lines.by_ref() {
        let line = line?;
        println!("{line}");
        if line.contains("PHASE_START") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent did not start within 60 s");
        }
    }
    step("accessing some records (cat, head, a failed open); watch the open records appear");
    scripted_accesses(&args.dir);
    step(format!(
        "live: open files under {} in another shell to see more; Ctrl-C stops the agent",
        args.dir.display()
    ));
    for line in lines {
        println!("{}", line?);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("phi-agent exited with {status}");
    }
    Ok(())
}
