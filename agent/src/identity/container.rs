//! Containers and Kubernetes pods from the cgroup (v2) of a process: containerd, CRI-O, Docker
//! and Podman layouts, cgroupfs and systemd drivers. Pod name and namespace come from the
//! kubelet's log directories (`/var/log/pods/<namespace>_<name>_<uid>`) when they exist.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use phi_proto::v1 as pb;

/// Minimum time between rescans of the pod log directory.
const POD_RESCAN: Duration = Duration::from_secs(5);
/// Minimum time between walks of the whole cgroup tree (for ids of exited processes).
const TREE_RESCAN: Duration = Duration::from_secs(1);
/// Most cgroup directories a walk visits.
const TREE_LIMIT: usize = 200_000;

pub struct Containers {
    /// Mount point of the cgroup v2 hierarchy.
    root: Option<PathBuf>,
    pod_dir: PathBuf,
    /// cgroup id → path (relative to the root), `None` for ids that could not be resolved.
    paths: HashMap<u64, String>,
    /// pod uid → (namespace, name)
    pods: HashMap<String, (String, String)>,
    pods_scanned: Option<Instant>,
    tree_scanned: Option<Instant>,
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container id, runtime and pod uid a cgroup path names.
pub fn parse_cgroup_path(path: &str) -> Option<(String, String, String)> {
    let mut id = None;
    let mut pod = String::new();
    for seg in path.split('/') {
        let seg_core = seg.strip_suffix(".scope").unwrap_or(seg);
        for (prefix, runtime) in [
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("docker-", "docker"),
            ("libpod-", "podman"),
        ] {
            if let Some(rest) = seg_core.strip_prefix(prefix)
                && is_container_id(rest)
            {
                id = Some((rest.to_owned(), runtime.to_owned()));
            }
        }
        if is_container_id(seg_core) {
            let runtime = if path.contains("/docker/") {
                "docker"
            } else if path.contains("kubepods") {
                "cri"
            } else {
                "unknown"
            };
            id = Some((seg_core.to_owned(), runtime.to_owned()));
        }
        // cgroupfs driver: "pod<uid>"; systemd driver: "kubepods-<qos>-pod<uid_>.slice".
        let slice = seg.strip_suffix(".slice").unwrap_or(seg);
        if let Some(p) = slice.rsplit_once("pod")
            && (p.0.is_empty() || p.0.ends_with('-'))
            && p.1.len() >= 32
            && p.1
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_')
        {
            pod = p.1.replace('_', "-");
        }
    }
    let (id, runtime) = id?;
    Some((id, runtime, pod))
}

impl Containers {
    pub fn new() -> Self {
        Self::with_dirs(cgroup2_root(), PathBuf::from("/var/log/pods"))
    }

    pub fn with_dirs(root: Option<PathBuf>, pod_dir: PathBuf) -> Self {
        Containers {
            root,
            pod_dir,
            paths: HashMap::new(),
            pods: HashMap::new(),
            pods_scanned: None,
            tree_scanned: None,
        }
    }

    /// The cgroup path of `cgroup_id` (the inode number of its directory): from
    /// /proc/<tgid>/cgroup while the process lives, else by walking the cgroup tree.
    fn path_of(&mut self, cgroup_id: u64, tgid: u32) -> Option<String> {
        if let Some(p) = self.paths.get(&cgroup_id) {
            return Some(p.clone());
        }
        let root = self.root.clone()?;
        if self.paths.len() > TREE_LIMIT {
            self.paths.clear();
        }
        let from_proc = std::fs::read_to_string(format!("/proc/{tgid}/cgroup"))
            .ok()
            .and_then(|text| {
                let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
                let ino = std::fs::metadata(root.join(rel.trim_start_matches('/')))
                    .ok()?
                    .ino();
                (ino == cgroup_id).then_some(rel)
            });
        if let Some(rel) = from_proc {
            self.paths.insert(cgroup_id, rel.clone());
            return Some(rel);
        }
        if self.tree_scanned.is_none_or(|t| t.elapsed() > TREE_RESCAN) {
            self.tree_scanned = Some(Instant::now());
            walk_tree(&root, &mut self.paths);
        }
        self.paths.get(&cgroup_id).cloned()
    }

    fn pod_names(&mut self, uid: &str) -> Option<(String, String)> {
        if !self.pods.contains_key(uid)
            && self.pods_scanned.is_none_or(|t| t.elapsed() > POD_RESCAN)
        {
            self.pods_scanned = Some(Instant::now());
            self.pods = scan_pod_dir(&self.pod_dir);
        }
        self.pods.get(uid).cloned()
    }

    /// The container of a process, if its cgroup is one.
    pub fn resolve(&mut self, cgroup_id: u64, tgid: u32) -> Option<pb::Container> {
        if cgroup_id <= 1 {
            return None;
        }
        let path = self.path_of(cgroup_id, tgid)?;
        let (id, runtime, pod_uid) = parse_cgroup_path(&path)?;
        let (pod_namespace, pod_name) = if pod_uid.is_empty() {
            Default::default()
        } else {
            self.pod_names(&pod_uid).unwrap_or_default()
        };
        Some(pb::Container {
            id,
            runtime,
            pod_uid,
            pod_name,
            pod_namespace,
            cgroup: path,
        })
    }
}

/// Records every cgroup directory below `root` as inode → path.
fn walk_tree(root: &Path, out: &mut HashMap<u64, String>) {
    let mut stack = vec![PathBuf::from("/")];
    let mut seen = 0;
    while let Some(rel) = stack.pop() {
        seen += 1;
        if seen > TREE_LIMIT {
            break;
        }
        let dir = root.join(rel.strip_prefix("/").unwrap_or(&rel));
        if let Ok(meta) = std::fs::metadata(&dir) {
            out.insert(meta.ino(), rel.to_string_lossy().into_owned());
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(rel.join(e.file_name()));
            }
        }
    }
}

/// `<namespace>_<name>_<uid>` directories of the kubelet's pod logs.
fn scan_pod_dir(dir: &Path) -> HashMap<String, (String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return HashMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (ns, rest) = name.split_once('_')?;
            let (pod, uid) = rest.rsplit_once('_')?;
            Some((uid.to_owned(), (ns.to_owned(), pod.to_owned())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_runtime_layouts() {
        let uid = "3f2c1a7e-9b1d-4c55-8e2a-0c6b7d8e9f10";
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            uid.replace('-', "_")
        );
        assert_eq!(
            parse_cgroup_path(&systemd),
            Some((ID.into(), "containerd".into(), uid.into()))
        );
        let cgroupfs = format!("/kubepods/besteffort/pod{uid}/{ID}");
        assert_eq!(
            parse_cgroup_path(&cgroupfs),
            Some((ID.into(), "cri".into(), uid.into()))
        );
        let crio = format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope",
            uid.replace('-', "_")
        );
        assert_eq!(parse_cgroup_path(&crio).map(|c| c.1), Some("cri-o".into()));
        assert_eq!(
            parse_cgroup_path(&format!("/system.slice/docker-{ID}.scope")),
            Some((ID.into(), "docker".into(), String::new()))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/docker/{ID}")).map(|c| c.1),
            Some("docker".into())
        );
        assert_eq!(
            parse_cgroup_path("/user.slice/user-1000.slice/session-3.scope"),
            None
        );
        assert_eq!(parse_cgroup_path("/"), None);
    }

    #[test]
    fn pod_names_come_from_the_log_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(
            dir.path()
                .join("clinical_ehr-api-7d9f_3f2c1a7e-9b1d-4c55-8e2a-0c6b7d8e9f10"),
        )
        .expect("mkdir");
        let pods = scan_pod_dir(dir.path());
        assert_eq!(
            pods["3f2c1a7e-9b1d-4c55-8e2a-0c6b7d8e9f10"],
            ("clinical".into(), "ehr-api-7d9f".into())
        );
    }
}
