//! Which pod and container a traced process belongs to, from the node's own
//! cgroup tree: never the API server (the agent must work while it is away,
//! and asking it per connection would not scale).
//!
//! The kubelet puts every container in a cgroup whose path names the pod UID
//! and the container id. The shape depends on the cgroup driver and the
//! runtime:
//!
//! | driver | path (cgroup v2; v1 hierarchies look the same) |
//! | --- | --- |
//! | systemd, containerd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope` |
//! | systemd, cri-o | `.../kubepods-pod<uid with _>.slice/crio-<id>.scope` |
//! | systemd, docker | `.../kubepods-besteffort-pod<uid with _>.slice/docker-<id>.scope` |
//! | cgroupfs | `/kubepods/burstable/pod<uid>/<id>` |
//! | kind (kubelet in a container) | `/kubelet.slice/kubelet-kubepods.slice/.../kubelet-kubepods-pod<uid>.slice/cri-containerd-<id>.scope` |
//!
//! Seen from inside a cgroup namespace the path is relative and may start
//! with `/../..`; only its segments matter here.
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The pod and container a process runs in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodRef {
    /// The pod's UID with dashes (`1b2c3d4e-5f60-...`), or the 32-hex config
    /// hash a static pod's mirror carries.
    pub pod_uid: String,
    /// The runtime's container id (hex), empty when the path stops at the pod
    /// (a process in the pod's own cgroup, such as the pause process on v1).
    pub container_id: String,
}

/// The pod of a cgroup path, or `None` for paths outside `kubepods`.
pub fn parse_cgroup_path(path: &str) -> Option<PodRef> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if !segments.iter().any(|s| s.contains("kubepods")) {
        return None;
    }
    let (pod_index, pod_uid) = segments
        .iter()
        .enumerate()
        .find_map(|(i, s)| pod_uid_of(s).map(|uid| (i, uid)))?;
    let container_id = segments
        .get(pod_index + 1..)
        .and_then(|rest| rest.iter().find_map(|s| container_id_of(s)))
        .unwrap_or_default();
    Some(PodRef {
        pod_uid,
        container_id,
    })
}

/// `pod<uid>` (cgroupfs) or `...-pod<uid with _>.slice` (systemd).
fn pod_uid_of(segment: &str) -> Option<String> {
    if let Some(uid) = segment.strip_prefix("pod")
        && is_pod_uid(uid)
    {
        return Some(uid.to_owned());
    }
    let stem = segment.strip_suffix(".slice")?;
    let uid = stem
        .rsplit('-')
        .next()?
        .strip_prefix("pod")?
        .replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

/// A UID (8-4-4-4-12 hex) or a static pod's 32-hex hash.
fn is_pod_uid(uid: &str) -> bool {
    let lengths: Vec<usize> = uid.split('-').map(str::len).collect();
    let shaped = lengths == [32] || lengths == [8, 4, 4, 4, 12];
    shaped && uid.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
}

/// `<runtime>-<id>.scope` (systemd) or a bare `<id>` (cgroupfs); ids are hex,
/// 64 characters for every runtime in use. `crio-conmon-<id>` is cri-o's
/// monitor of that container: the same pod and container.
fn container_id_of(segment: &str) -> Option<String> {
    let stem = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = stem.rsplit('-').next()?;
    (id.len() >= 12 && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| id.to_ascii_lowercase())
}

/// The cgroup path of a process from `/proc/<pid>/cgroup` text: the unified
/// (v2) line `0::<path>` when it names a pod, else the first v1 hierarchy
/// that does (hybrid hosts keep pods in the v1 trees).
pub fn pod_cgroup_path(proc_cgroup: &str) -> Option<&str> {
    let mut paths = proc_cgroup.lines().filter_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, _, path) = (f.next()?, f.next()?, f.next()?);
        Some((l.starts_with("0::"), path))
    });
    let all: Vec<(bool, &str)> = paths.by_ref().collect();
    all.iter()
        .filter(|(unified, _)| *unified)
        .chain(all.iter().filter(|(unified, _)| !*unified))
        .map(|(_, p)| *p)
        .find(|p| parse_cgroup_path(p).is_some())
}

/// Resolves a traced record's (pid, cgroup id) to its pod. The pid is tried
/// first (`<proc>/<pid>/cgroup`); a process that already exited is found by
/// its cgroup id, the inode of its cgroup v2 directory, in an index of the
/// kubepods directories under the cgroup v2 mount. Results are cached by
/// cgroup id, bounded.
#[derive(Debug)]
pub struct PodResolver {
    proc_root: PathBuf,
    cgroup2_root: Option<PathBuf>,
    by_cgroup_id: HashMap<u64, Option<PodRef>>,
    inode_index: HashMap<u64, PodRef>,
    index_built_ms: Option<u64>,
}

/// Entries the cgroup-id cache keeps before it starts over.
const CACHE_LIMIT: usize = 16_384;
/// How often a cgroup-id miss may rebuild the inode index.
const INDEX_REBUILD_MS: u64 = 10_000;
/// Directories the index walk visits at most (a node runs a few hundred pods).
const INDEX_WALK_LIMIT: usize = 50_000;

impl PodResolver {
    /// `proc_root` is the host's `/proc`; `cgroup2_root` the cgroup v2 mount
    /// (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
    pub fn new(proc_root: impl Into<PathBuf>, cgroup2_root: Option<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            cgroup2_root,
            by_cgroup_id: HashMap::new(),
            inode_index: HashMap::new(),
            index_built_ms: None,
        }
    }

    /// Processes under `proc_root` (the host's `/proc`), cgroups under the
    /// cgroup v2 mount found in `/proc/self/mounts`.
    pub fn host_with_proc(proc_root: &Path) -> Self {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        Self::new(proc_root, cgroup2_mount(&mounts))
    }

    /// The pod of the process, `None` outside pods (or when nothing says).
    pub fn resolve(&mut self, pid: u32, cgroup_id: u64, now_ms: u64) -> Option<PodRef> {
        if cgroup_id != 0
            && let Some(known) = self.by_cgroup_id.get(&cgroup_id)
        {
            return known.clone();
        }
        let from_pid = fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
            .ok()
            .and_then(|text| pod_cgroup_path(&text).and_then(parse_cgroup_path));
        let found = match from_pid {
            Some(pod) => Some(pod),
            None if cgroup_id != 0 => self.by_inode(cgroup_id, now_ms),
            None => None,
        };
        if cgroup_id != 0 {
            if self.by_cgroup_id.len() >= CACHE_LIMIT {
                self.by_cgroup_id.clear();
            }
            self.by_cgroup_id.insert(cgroup_id, found.clone());
        }
        found
    }

    fn by_inode(&mut self, inode: u64, now_ms: u64) -> Option<PodRef> {
        if let Some(pod) = self.inode_index.get(&inode) {
            return Some(pod.clone());
        }
        let stale = self
            .index_built_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= INDEX_REBUILD_MS);
        if stale && let Some(root) = &self.cgroup2_root {
            self.inode_index = index_pod_cgroups(root);
            self.index_built_ms = Some(now_ms);
        }
        self.inode_index.get(&inode).cloned()
    }
}

/// The cgroup2 mount point in `/proc/self/mounts` text.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// Inode -> pod of every directory under `root` whose path names a pod.
fn index_pod_cgroups(root: &Path) -> HashMap<u64, PodRef> {
    let mut index = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    let mut visited = 0;
    while let Some(dir) = stack.pop() {
        visited += 1;
        if visited > INDEX_WALK_LIMIT {
            break;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            let relative = path.strip_prefix(root).unwrap_or(&path);
            if let Some(pod) = parse_cgroup_path(&relative.to_string_lossy())
                && let Ok(meta) = entry.metadata()
            {
                index.insert(meta.ino(), pod);
            }
            stack.push(path);
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901";
    const CID: &str = "4f1d0c7e9a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5";

    #[allow(clippy::unnecessary_wraps)] // compared with parse results
    fn pod(container: &str) -> Option<PodRef> {
        Some(PodRef {
            pod_uid: UID.to_owned(),
            container_id: container.to_owned(),
        })
    }

    #[test]
    fn systemd_driver_paths_of_every_runtime_name_the_pod_and_container() {
        let uid_ = UID.replace('-', "_");
        for path in [
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{CID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-{CID}.scope"),
            format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{CID}.scope"),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/docker-{CID}.scope"
            ),
            format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{CID}.scope"
            ),
            // Seen from inside a cgroup namespace.
            format!("/../../kubepods-besteffort-pod{uid_}.slice/cri-containerd-{CID}.scope"),
        ] {
            assert_eq!(parse_cgroup_path(&path), pod(CID), "{path}");
        }
    }

    #[test]
    fn cgroupfs_driver_paths_name_the_pod_and_container() {
        for path in [
            format!("/kubepods/burstable/pod{UID}/{CID}"),
            format!("/kubepods/pod{UID}/{CID}"),
            format!("/kubepods/besteffort/pod{UID}/{}", CID.to_uppercase()),
        ] {
            assert_eq!(parse_cgroup_path(&path), pod(CID), "{path}");
        }
        // The pod's own cgroup: pod known, no container.
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}")),
            pod("")
        );
    }

    #[test]
    fn static_pods_carry_a_hash_instead_of_a_uid() {
        let hash = "6e1f0bd5e9d3e2c0d9e0f0c1a2b3c4d5";
        let got = parse_cgroup_path(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{CID}.scope"
        ));
        assert_eq!(got.map(|p| p.pod_uid), Some(hash.to_owned()));
    }

    #[test]
    fn paths_outside_pods_or_malformed_name_no_pod() {
        for path in [
            "/",
            "",
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable/podnot-a-uid/abc",
            "/kubepods/burstable/pod1b2c3d4e-5f60-7182-93a4/abc",
            "/docker/4f1d0c7e9a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5",
            "/kubepods/pod\u{fffd}\u{fffd}/x",
        ] {
            assert_eq!(parse_cgroup_path(path), None, "{path:?}");
        }
        // A pod segment followed by something that is no container id.
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{UID}/not-hex.scope")),
            pod("")
        );
    }

    #[test]
    fn proc_cgroup_prefers_the_unified_line_and_falls_back_to_v1() {
        let v2 = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CID}.scope\n",
            UID.replace('-', "_")
        );
        assert!(pod_cgroup_path(&v2).is_some());
        // Hybrid host: the unified line is the root, the v1 trees hold the pod.
        let hybrid = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n0::/\n"
        );
        assert_eq!(
            pod_cgroup_path(&hybrid),
            Some(format!("/kubepods/burstable/pod{UID}/{CID}").as_str())
        );
        assert_eq!(pod_cgroup_path("0::/user.slice\n"), None);
        assert_eq!(pod_cgroup_path("garbage"), None);
    }

    #[test]
    fn a_process_is_resolved_by_pid_and_an_exited_one_by_cgroup_inode() {
        let tmp = tempfile::tempdir().unwrap();
        let proc_root = tmp.path().join("proc");
        let cg = tmp.path().join("cgroup");
        let uid_ = UID.replace('-', "_");
        let rel = format!("kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{CID}.scope");
        fs::create_dir_all(cg.join(&rel)).unwrap();
        fs::create_dir_all(proc_root.join("42")).unwrap();
        fs::write(proc_root.join("42/cgroup"), format!("0::/{rel}\n")).unwrap();
        let inode = fs::metadata(cg.join(&rel)).unwrap().ino();

        let mut by_pid = PodResolver::new(&proc_root, Some(cg.clone()));
        assert_eq!(by_pid.resolve(42, 0, 0), pod(CID));
        // Gone from /proc: found by the cgroup directory's inode.
        let mut by_inode = PodResolver::new(&proc_root, Some(cg.clone()));
        assert_eq!(by_inode.resolve(999, inode, 0), pod(CID));
        // Unknown everywhere: nothing, and no panic.
        assert_eq!(by_inode.resolve(999, 12_345_678, 1), None);
        // The pod directory itself (no container) is indexed as well.
        let pod_dir = fs::metadata(cg.join(format!("kubepods.slice/kubepods-pod{uid_}.slice")))
            .unwrap()
            .ino();
        assert_eq!(by_inode.resolve(999, pod_dir, 20_000), pod(""));
    }

    #[test]
    fn the_cgroup2_mount_is_found_in_mounts() {
        let mounts = "cgroup /sys/fs/cgroup/memory cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount(""), None);
    }
}
