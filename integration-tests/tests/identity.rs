//! Identity on records: names, working directory, parent chain, containers and pods.

use std::{
    io::Write as _,
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::{Agent, TestDir, as_u64, is};

/// The cgroup v2 mount point.
fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).expect("mount point")))
        })
        .expect("a cgroup2 hierarchy is mounted")
}

/// Removes the created cgroup directories (deepest first) and pod log directory.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir(p);
        }
    }
}

#[test]
fn a_process_in_a_kubernetes_container_cgroup_carries_container_and_pod() {
    const CONTAINER: &str = "5e1f0c2d3b4a59687766554433221100ffeeddccbbaa99887766554433221100";
    const POD: &str = "9c1d2e3f-4a5b-4c6d-8e7f-0a1b2c3d4e5f";
    let root = cgroup2_root();
    let pod_slice = format!("kubepods-burstable-pod{}.slice", POD.replace('-', "_"));
    let rel = format!(
        "kubepods.slice/kubepods-burstable.slice/{pod_slice}/cri-containerd-{CONTAINER}.scope"
    );
    let scope = root.join(&rel);
    std::fs::create_dir_all(&scope).expect("create the container's cgroup");
    let log_dir = Path::new("/var/log/pods").join(format!("clinical_ehr-api-7d9f_{POD}"));
    std::fs::create_dir_all(&log_dir).expect("pod log directory");
    let mut dirs: Vec<PathBuf> = scope
        .ancestors()
        .take_while(|p| p.starts_with(&root) && *p != root)
        .map(Path::to_path_buf)
        .collect();
    dirs.push(log_dir.clone());
    let _cleanup = Cleanup(dirs);

    let w = TestDir::new("container");
    let file = w.file("chart.txt", "x\n");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);
    let procs = scope.join("cgroup.procs");
    let mut cmd = Command::new("cat");
    cmd.arg(&file);
    // SAFETY: open/write/close only.
    unsafe {
        cmd.pre_exec(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&procs)?
                .write_all(b"0")
        });
    }
    let out = cmd.output().expect("run cat in the container cgroup");
    assert!(out.status.success());
    let r = agent.wait_for("the open from inside the container", |r| {
        is::open_of(&file)(r) && r["process"]["comm"] == "cat"
    });
    let c = &r["process"]["container"];
    assert_eq!(c["id"], CONTAINER, "{r}");
    assert_eq!(c["runtime"], "containerd");
    assert_eq!(c["podUid"], POD);
    assert_eq!(c["podName"], "ehr-api-7d9f");
    assert_eq!(c["podNamespace"], "clinical");
    assert_eq!(c["cgroup"].as_str(), Some(format!("/{rel}").as_str()));
    // The kernel's cgroup id of the process is its cgroup directory's inode number.
    let id = std::fs::metadata(&scope).expect("the scope").ino();
    assert_eq!(as_u64(&r["process"]["cgroupId"]), id, "{r}");
    agent.stop();
}

#[test]
fn records_carry_names_cwd_and_the_parent_chain() {
    let w = TestDir::new("context");
    let file = w.file("chart.txt", "x\n");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);
    // sh changes directory (a chdir event), then runs cat relative to it.
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "cd {} && cat chart.txt && true",
            w.path().display()
        ))
        .current_dir("/")
        .output()
        .expect("run sh");
    assert!(out.status.success());
    let r = agent.wait_for("cat's open", |r| {
        is::open_of(&file)(r) && r["process"]["comm"] == "cat"
    });
    let p = &r["process"];
    assert_eq!(p["cwd"].as_str(), w.path().to_str(), "cwd after chdir");
    assert_eq!(p["identity"]["user"], "root");
    assert_eq!(p["identity"]["group"], "root");
    let ancestors = p["ancestors"].as_array().expect("ancestors");
    assert_eq!(
        ancestors[0]["comm"], "sh",
        "nearest parent first: {ancestors:?}"
    );
    assert_eq!(as_u64(&ancestors[1]["pid"]), u64::from(std::process::id()));
    assert_eq!(ancestors[0]["user"], "root");
    assert!(ancestors.len() <= 8);
    agent.stop();
}
