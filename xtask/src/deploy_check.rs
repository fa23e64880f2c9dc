//! `cargo xtask check-deploy`: the deployment material under `deploy/` is checked by the tools
//! that consume it. systemd verifies the units and rates their hardening; the Kubernetes
//! manifests are validated against the API schemas and linted for security. Every tool is
//! first shown a copy with a planted mistake and must catch it, so that a check that silently
//! stopped checking fails instead of passing.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use clap::Args;

use crate::{
    cmd::{self, exec, step},
    setup,
};

/// Kubernetes releases whose API schemas the manifests must satisfy: the oldest release the
/// manifests support and the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// The units, and the highest overall exposure `systemd-analyze security` may rate each
/// (0 = locked down, 100 = unconfined; it prints a tenth of this). Today the agent rates 24 and
/// the collector 11: hardening removed from a unit fails the check.
const UNITS: &[(&str, u32)] = &[("phi-agent.service", 26), ("phi-collector.service", 13)];

/// Installed path of each binary a unit starts, and the binary's name in a cargo target dir.
const UNIT_BINARIES: &[(&str, &str)] = &[
    ("/usr/bin/phi-agent", "phi-agent"),
    ("/usr/bin/phi-collector", "phi-collector"),
];

#[derive(Args)]
pub struct CheckDeployArgs {
    /// Directory holding the built phi-agent and phi-collector that the units are verified
    /// against [default: target/debug, built when missing].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

/// The standalone command: setup, the binaries, then [`check`].
pub fn run(args: &CheckDeployArgs) -> anyhow::Result<()> {
    setup::run()?;
    let bins = match &args.bin_dir {
        Some(dir) => {
            std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))?
        }
        None => {
            let dir = cmd::workspace_root().join("target/debug");
            if UNIT_BINARIES
                .iter()
                .any(|(_, name)| !dir.join(name).is_file())
            {
                step("build: phi-agent and phi-collector (the units start them)");
                exec(cmd::cargo().args(["build", "-p", "phi-agent", "-p", "phi-collector"]))?;
            }
            dir
        }
    };
    check(&bins)?;
    step("deployment checks passed");
    Ok(())
}

/// Every deployment check; `bins` holds the built binaries the units are verified against.
pub fn check(bins: &Path) -> anyhow::Result<()> {
    let root = cmd::workspace_root();
    let scratch = root.join("target/check-deploy");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)
            .with_context(|| format!("cannot clear {}", scratch.display()))?;
    }
    let systemd_dir = root.join("deploy/systemd");
    let kube_dir = root.join("deploy/kubernetes");

    step("deploy: systemd units (systemd-analyze verify and security)");
    systemd_units(&systemd_dir, bins, &scratch.join("systemd"))?;

    step("deploy: Kubernetes manifests against the API schemas (kubernetes-validate)");
    let manifests = kustomization_resources(&kube_dir)?;
    kubernetes_schemas(&kube_dir, &manifests, &scratch.join("kubernetes-validate"))?;

    step("deploy: security lint of the Kubernetes manifests (checkov)");
    checkov(&kube_dir, &scratch.join("checkov"))?;

    step("deploy: the agent's capabilities agree between the systemd unit and the DaemonSet");
    capabilities_agree(&systemd_dir, &kube_dir)
}

// ---------------------------------------------------------------------------------------------
// systemd

/// Output and success of a command, both streams together.
fn run_capture(cmd: &mut Command) -> anyhow::Result<(bool, String)> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

fn systemd_analyze() -> Command {
    let mut c = Command::new("systemd-analyze");
    // Plain text whatever the terminal; no pager.
    c.env("SYSTEMD_COLORS", "0").env("SYSTEMD_PAGER", "");
    c
}

/// A unit as systemd-analyze can check it on a build machine: the installed binary paths
/// replaced by the built binaries (verify insists that ExecStart= is executable).
fn stage_unit(name: &str, text: &str, bins: &Path) -> anyhow::Result<String> {
    let mut staged = text.to_owned();
    let mut found = false;
    for (installed, built) in UNIT_BINARIES {
        if staged.contains(installed) {
            let path = bins.join(built);
            ensure!(
                path.is_file(),
                "{} is missing: build it first (cargo build -p {built})",
                path.display()
            );
            staged = staged.replace(installed, &path.display().to_string());
            found = true;
        }
    }
    ensure!(
        found,
        "{name} starts none of {}",
        UNIT_BINARIES
            .iter()
            .map(|(p, _)| *p)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(staged)
}

/// `systemd-analyze verify`: a clean unit produces no output at all. Unknown keys and bad values
/// are only warnings (exit status 0), so any output is a finding.
fn verify_units(paths: &[PathBuf]) -> anyhow::Result<Result<(), String>> {
    let (ok, text) = run_capture(systemd_analyze().args(["verify", "--man=no"]).args(paths))?;
    let text = text.trim();
    Ok(if ok && text.is_empty() {
        Ok(())
    } else {
        Err(if text.is_empty() {
            "systemd-analyze verify failed without a message".into()
        } else {
            text.to_owned()
        })
    })
}

/// `systemd-analyze security --offline`: the exposure line, and whether it is within `limit`.
fn unit_exposure(path: &Path, limit: u32) -> anyhow::Result<(bool, String)> {
    let (ok, text) = run_capture(
        systemd_analyze()
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--threshold={limit}"))
            .arg(path),
    )?;
    let level = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .map(|l| {
            l.chars()
                .filter(|c| c.is_ascii() && !c.is_ascii_control())
                .collect::<String>()
                .trim()
                .to_owned()
        })
        .with_context(|| {
            format!(
                "systemd-analyze security printed no exposure level for {}:\n{text}",
                path.display()
            )
        })?;
    Ok((ok, level))
}

fn systemd_units(dir: &Path, bins: &Path, work: &Path) -> anyhow::Result<()> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service"))
        .collect();
    found.sort();
    let expected: Vec<String> = UNITS.iter().map(|(n, _)| (*n).to_owned()).collect();
    ensure!(
        found == expected,
        "{} holds {found:?}; the checks know {expected:?} (add a new unit to UNITS in \
         xtask/src/deploy_check.rs)",
        dir.display()
    );
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;

    let mut staged = Vec::new();
    for (name, _) in UNITS {
        let text = std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("cannot read {}", dir.join(name).display()))?;
        let path = work.join(name);
        std::fs::write(&path, stage_unit(name, &text, bins)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        staged.push((path, text));
    }

    // The checks must catch planted mistakes before their silence means anything.
    let (agent_path, agent_text) = &staged[0];
    let mutations = [
        ("ProtectSystem=strict", "ProtectSystem=strictly", "strictly"),
        (
            "NoNewPrivileges=yes",
            "NoNewPrivilegs=yes",
            "NoNewPrivilegs",
        ),
    ];
    for (i, (from, to, named)) in mutations.iter().enumerate() {
        ensure!(
            agent_text.contains(from),
            "self-test: phi-agent.service no longer contains {from:?}; update the planted mistakes \
             in xtask/src/deploy_check.rs"
        );
        let dir = work.join(format!("self-test-{i}"));
        std::fs::create_dir_all(&dir)?;
        let bad = dir.join("phi-agent.service");
        let text = std::fs::read_to_string(agent_path)?.replacen(from, to, 1);
        std::fs::write(&bad, text)?;
        match verify_units(std::slice::from_ref(&bad))? {
            Err(msg) if msg.contains(named) => {}
            Err(msg) => bail!(
                "self-test: systemd-analyze verify complained about {to:?} without naming it: \
                 {msg}"
            ),
            Ok(()) => bail!(
                "self-test: systemd-analyze verify accepted a unit with {to:?}: the unit check \
                 does not check"
            ),
        }
    }
    let loose_dir = work.join("self-test-exposure");
    std::fs::create_dir_all(&loose_dir)?;
    let loose = loose_dir.join("phi-agent.service");
    let stripped: String = std::fs::read_to_string(agent_path)?
        .lines()
        .filter(|l| {
            ![
                "Protect",
                "Private",
                "Restrict",
                "SystemCall",
                "NoNewPrivileges",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&loose, stripped)?;
    let (within, level) = unit_exposure(&loose, UNITS[0].1)?;
    ensure!(
        !within,
        "self-test: the exposure limit accepted phi-agent.service without its sandboxing ({level})"
    );
    println!(
        "    self-test: verify named 2 planted mistakes; the exposure limit refused an unsandboxed copy"
    );

    let paths: Vec<PathBuf> = staged.iter().map(|(p, _)| p.clone()).collect();
    if let Err(msg) = verify_units(&paths)? {
        // Name the files the reader edits, not the staged copies (the lines are the same).
        let msg = msg.replace(&work.display().to_string(), &dir.display().to_string());
        bail!("systemd-analyze verify found problems in deploy/systemd:\n{msg}");
    }
    println!("    systemd-analyze verify: {} units clean", paths.len());
    for ((name, limit), path) in UNITS.iter().zip(&paths) {
        let (within, level) = unit_exposure(path, *limit)?;
        ensure!(
            within,
            "{name}: {level}, above the limit of {limit}/100 (xtask/src/deploy_check.rs): \
             restore its hardening, or raise the limit with a reason"
        );
        println!("    {level} (limit {:.1})", f64::from(*limit) / 10.0);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// The `resources:` of kustomization.yaml, which must be exactly the other YAML files of the
/// folder (a manifest that is checked but not applied, or applied but not checked, fails).
fn kustomization_resources(dir: &Path) -> anyhow::Result<Vec<String>> {
    let path = dir.join("kustomization.yaml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut listed = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("resources:") {
            inside = true;
            continue;
        }
        let trimmed = line.trim();
        if !inside || trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match trimmed.strip_prefix("- ") {
            Some(item) if line.starts_with(' ') || line.starts_with('-') => {
                listed.push(item.trim().trim_matches(['"', '\'']).to_owned());
            }
            _ => inside = false,
        }
    }
    ensure!(!listed.is_empty(), "{} lists no resources", path.display());
    let mut present: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| (n.ends_with(".yaml") || n.ends_with(".yml")) && n != "kustomization.yaml")
        .collect();
    present.sort();
    let listed_set: BTreeSet<&String> = listed.iter().collect();
    let present_set: BTreeSet<&String> = present.iter().collect();
    let unlisted: Vec<&&String> = present_set.difference(&listed_set).collect();
    let missing: Vec<&&String> = listed_set.difference(&present_set).collect();
    ensure!(
        unlisted.is_empty() && missing.is_empty(),
        "kustomization.yaml and {} disagree: not listed {unlisted:?}, listed but missing \
         {missing:?}",
        dir.display()
    );
    Ok(listed)
}

/// Runs kubernetes-validate on `files` in `dir`; `Err` carries its complaints. Success means
/// every line of its report is a pass: a kind without a schema is only a warning to the tool,
/// and a failure here.
fn validate_manifests(
    dir: &Path,
    files: &[String],
    version: &str,
) -> anyhow::Result<Result<usize, String>> {
    let (ok, text) = run_capture(
        Command::new(setup::python_tool("kubernetes-validate"))
            .current_dir(dir)
            .args(["--strict", "--kubernetes-version", version])
            .args(files),
    )?;
    let mut passed = 0;
    let mut problems = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if line.contains(" passed for resource ") {
            passed += 1;
        } else {
            problems.push(line.to_owned());
        }
    }
    Ok(if ok && problems.is_empty() && passed >= files.len() {
        Ok(passed)
    } else if problems.is_empty() {
        Err(format!(
            "kubernetes-validate exited {} after {passed} passes for {} files:\n{text}",
            if ok { "0" } else { "non-zero" },
            files.len()
        ))
    } else {
        Err(problems.join("\n"))
    })
}

fn kubernetes_schemas(dir: &Path, files: &[String], work: &Path) -> anyhow::Result<()> {
    // Self-test: a misspelt field must be refused.
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    let original = std::fs::read_to_string(dir.join("agent-daemonset.yaml"))
        .context("cannot read agent-daemonset.yaml")?;
    ensure!(
        original.contains("hostPID: true"),
        "self-test: agent-daemonset.yaml no longer contains `hostPID: true`; update the planted \
         mistake in xtask/src/deploy_check.rs"
    );
    std::fs::write(
        work.join("agent-daemonset.yaml"),
        original.replacen("hostPID: true", "hostPid: true", 1),
    )?;
    match validate_manifests(
        work,
        &["agent-daemonset.yaml".to_owned()],
        KUBERNETES_VERSIONS[0],
    )? {
        Err(msg) if msg.contains("hostPid") => {
            println!("    self-test: kubernetes-validate refused a misspelt field");
        }
        Err(msg) => bail!("self-test: kubernetes-validate failed without naming hostPid: {msg}"),
        Ok(_) => bail!(
            "self-test: kubernetes-validate accepted `hostPid`: the schema check does not check"
        ),
    }

    for version in KUBERNETES_VERSIONS {
        match validate_manifests(dir, files, version)? {
            Ok(n) => println!(
                "    Kubernetes {version}: {n} objects in {} files valid (strict)",
                files.len()
            ),
            Err(msg) => bail!("the manifests do not validate against Kubernetes {version}:\n{msg}"),
        }
    }
    Ok(())
}

/// What checkov found in a folder.
struct CheckovReport {
    passed: u64,
    failed: Vec<String>,
    /// (check id, one line: check, resource and the stated reason)
    skipped: Vec<(String, String)>,
    parsing_errors: u64,
}

fn checkov_scan(dir: &Path) -> anyhow::Result<CheckovReport> {
    let out = Command::new(setup::python_tool("checkov"))
        .args(["--directory"])
        .arg(dir)
        .args([
            "--framework",
            "kubernetes",
            "--output",
            "json",
            // Offline: no policy or guideline downloads, no platform.
            "--skip-download",
        ])
        .env("LOG_LEVEL", "ERROR")
        .env_remove("BC_API_KEY")
        .output()
        .context("cannot start checkov (run `cargo xtask setup`)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&stdout).with_context(|| {
        format!(
            "checkov printed no JSON report ({}):\n{}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    // One framework gives one object; several give a list.
    let report = match &json {
        serde_json::Value::Array(list) => list
            .iter()
            .find(|r| r["check_type"] == "kubernetes")
            .cloned()
            .unwrap_or(serde_json::Value::Null),
        other => other.clone(),
    };
    // No resource at all: checkov prints only a summary.
    let summary = if report["summary"].is_object() {
        &report["summary"]
    } else {
        &report
    };
    let count = |key: &str| summary[key].as_u64().unwrap_or(0);
    let checks = |key: &str| -> Vec<serde_json::Value> {
        report["results"][key]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let text = |v: &serde_json::Value, key: &str| v[key].as_str().unwrap_or("?").to_owned();
    Ok(CheckovReport {
        passed: count("passed"),
        failed: checks("failed_checks")
            .iter()
            .map(|c| {
                format!(
                    "{} {} ({}, {}) {}",
                    text(c, "check_id"),
                    text(c, "check_name"),
                    text(c, "resource"),
                    text(c, "file_path"),
                    c["guideline"].as_str().unwrap_or("")
                )
            })
            .collect(),
        skipped: checks("skipped_checks")
            .iter()
            .map(|c| {
                (
                    text(c, "check_id"),
                    format!(
                        "{} {} ({}): {}",
                        text(c, "check_id"),
                        text(c, "check_name"),
                        text(c, "resource"),
                        c["check_result"]["suppress_comment"]
                            .as_str()
                            .unwrap_or("no reason given")
                    ),
                )
            })
            .collect(),
        parsing_errors: count("parsing_errors"),
    })
}

fn checkov(dir: &Path, work: &Path) -> anyhow::Result<()> {
    // Self-test: a writable root file system must be reported.
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    let original = std::fs::read_to_string(dir.join("collector-statefulset.yaml"))
        .context("cannot read collector-statefulset.yaml")?;
    ensure!(
        original.contains("readOnlyRootFilesystem: true"),
        "self-test: collector-statefulset.yaml no longer contains `readOnlyRootFilesystem: true`; \
         update the planted mistake in xtask/src/deploy_check.rs"
    );
    std::fs::write(
        work.join("collector-statefulset.yaml"),
        original.replacen(
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: false",
            1,
        ),
    )?;
    let planted = checkov_scan(work)?;
    ensure!(
        planted.failed.iter().any(|f| f.starts_with("CKV_K8S_22 ")),
        "self-test: checkov did not report a writable root file system (CKV_K8S_22); it \
         reported: {:?}",
        planted.failed
    );
    println!("    self-test: checkov reported a planted writable root file system");

    let report = checkov_scan(dir)?;
    ensure!(
        report.parsing_errors == 0,
        "checkov could not parse {} file(s) in {}",
        report.parsing_errors,
        dir.display()
    );
    ensure!(
        report.failed.is_empty(),
        "checkov found {} problem(s) in {}:\n  {}\nfix them, or, where the finding is inherent to \
         the agent, skip that check on the object with a `checkov.io/skip<N>: <ID>=<reason>` \
         annotation and list it in deploy/kubernetes/README.md",
        report.failed.len(),
        dir.display(),
        report.failed.join("\n  ")
    );
    ensure!(
        report.passed > 0,
        "checkov ran no check on {}: the lint does not lint",
        dir.display()
    );
    let readme_path = dir.join("README.md");
    let readme = std::fs::read_to_string(&readme_path)
        .with_context(|| format!("cannot read {}", readme_path.display()))?;
    let undocumented: BTreeSet<&str> = report
        .skipped
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| !readme.contains(&format!("`{id}`")))
        .collect();
    ensure!(
        undocumented.is_empty(),
        "checkov checks skipped in the manifests but not explained in {}: {undocumented:?}",
        readme_path.display()
    );
    println!(
        "    checkov: {} passed, 0 failed, {} skipped (each with its reason, all listed in \
         deploy/kubernetes/README.md):",
        report.passed,
        report.skipped.len()
    );
    for (_, line) in &report.skipped {
        println!("      {line}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Consistency

/// Capability names of a systemd assignment such as `AmbientCapabilities=CAP_BPF CAP_PERFMON`,
/// without the `CAP_` prefix.
fn unit_capabilities(unit: &str, key: &str) -> Option<BTreeSet<String>> {
    unit.lines().find_map(|l| {
        l.strip_prefix(key)?.strip_prefix('=').map(|v| {
            v.split_whitespace()
                .map(|c| c.trim_start_matches("CAP_").to_owned())
                .collect()
        })
    })
}

/// The names of a flow-style YAML list after `key:`, e.g. `add: ["BPF", "PERFMON"]`.
fn yaml_flow_list(text: &str, key: &str) -> Option<BTreeSet<String>> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(key)?.strip_prefix(':')?.trim();
        let inner = rest.strip_prefix('[')?.strip_suffix(']')?;
        Some(
            inner
                .split(',')
                .map(|s| s.trim().trim_matches(['"', '\'']).to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    })
}

fn capabilities_agree(systemd_dir: &Path, kube_dir: &Path) -> anyhow::Result<()> {
    let unit = std::fs::read_to_string(systemd_dir.join("phi-agent.service"))?;
    let daemonset = std::fs::read_to_string(kube_dir.join("agent-daemonset.yaml"))?;
    let ambient = unit_capabilities(&unit, "AmbientCapabilities")
        .context("phi-agent.service has no AmbientCapabilities=")?;
    let bounding = unit_capabilities(&unit, "CapabilityBoundingSet")
        .context("phi-agent.service has no CapabilityBoundingSet=")?;
    let added = yaml_flow_list(&daemonset, "add")
        .context("agent-daemonset.yaml has no `add: [...]` capability list")?;
    let dropped = yaml_flow_list(&daemonset, "drop")
        .context("agent-daemonset.yaml has no `drop: [...]` capability list")?;
    ensure!(
        ambient == bounding,
        "phi-agent.service: AmbientCapabilities= {ambient:?} differs from CapabilityBoundingSet= \
         {bounding:?}"
    );
    ensure!(
        ambient == added,
        "the agent's capabilities differ: systemd unit {ambient:?}, DaemonSet {added:?}"
    );
    ensure!(
        dropped == BTreeSet::from(["ALL".to_owned()]),
        "agent-daemonset.yaml must drop ALL capabilities before adding, drops {dropped:?}"
    );
    ensure!(
        !ambient.contains("SYS_ADMIN"),
        "the agent must not hold CAP_SYS_ADMIN"
    );
    let collector = std::fs::read_to_string(systemd_dir.join("phi-collector.service"))?;
    ensure!(
        unit_capabilities(&collector, "CapabilityBoundingSet").is_some_and(|c| c.is_empty()),
        "phi-collector.service must have an empty CapabilityBoundingSet="
    );
    println!(
        "    agent: {} in both; collector: none",
        ambient.into_iter().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_capabilities_strip_the_prefix() {
        let unit = "[Service]\nAmbientCapabilities=CAP_BPF CAP_PERFMON\nCapabilityBoundingSet=\n";
        assert_eq!(
            unit_capabilities(unit, "AmbientCapabilities"),
            Some(BTreeSet::from(["BPF".to_owned(), "PERFMON".to_owned()]))
        );
        assert_eq!(
            unit_capabilities(unit, "CapabilityBoundingSet"),
            Some(BTreeSet::new())
        );
        assert_eq!(unit_capabilities(unit, "Ambient"), None);
    }

    #[test]
    fn flow_lists_are_read() {
        let yaml = "  capabilities:\n    drop: [\"ALL\"]\n    add: [BPF, 'PERFMON']\n";
        assert_eq!(
            yaml_flow_list(yaml, "add"),
            Some(BTreeSet::from(["BPF".to_owned(), "PERFMON".to_owned()]))
        );
        assert_eq!(
            yaml_flow_list(yaml, "drop"),
            Some(BTreeSet::from(["ALL".to_owned()]))
        );
    }

    #[test]
    fn the_repository_manifests_are_all_listed() {
        let dir = cmd::workspace_root().join("deploy/kubernetes");
        let listed = kustomization_resources(&dir).expect("kustomization matches the folder");
        assert!(listed.contains(&"agent-daemonset.yaml".to_owned()));
    }

    #[test]
    fn the_repository_capabilities_agree() {
        let root = cmd::workspace_root();
        capabilities_agree(
            &root.join("deploy/systemd"),
            &root.join("deploy/kubernetes"),
        )
        .expect("capabilities agree");
    }
}
