//! Container attribution: cgroup id -> cgroup v2 path -> container (docker, containerd, cri-o,
//! podman) or systemd unit.
//!
//! The eBPF side records `bpf_get_current_cgroup_id()`, which is the id of the task's cgroup in
//! the default (v2) hierarchy. Since 5.5 that id is the kernfs node id, and on 64-bit kernels
//! it is also the inode number of the cgroup's directory (`kernfs_ino()`, fs/kernfs), so a walk
//! of the cgroup2 mount that records each directory's inode turns ids back into paths.
//! Container runtimes name their cgroups after the container id, so the path says which
//! container (or systemd service) a process ran in.
//!
//! Parsing paths is pure and unit-tested with each runtime's real naming; the index and the
//! `/proc/PID/cgroup` fallback touch the file system and are tested for real as root.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use log::debug;

pub use crate::schema::{ContainerInfo, Runtime};

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A Kubernetes pod UID: 36 characters of hex and dashes (8-4-4-4-12).
fn is_pod_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// The pod UID named by one path component, if any. The systemd driver writes
/// `kubepods-burstable-pod<uid>.slice` with the UID's dashes turned into underscores (systemd
/// reserves `-` for slice nesting); the cgroupfs driver writes `pod<uid>`.
fn pod_of(component: &str) -> Option<String> {
    let uid = match component.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1.replace('_', "-"),
        None => component.strip_prefix("pod")?.to_string(),
    };
    is_pod_uid(&uid).then_some(uid)
}

/// A container named by one path component: (runtime, id).
fn container_of<'a>(
    component: &'a str,
    parent_is_pod: bool,
    parent: Option<&str>,
) -> Option<(Runtime, &'a str)> {
    // systemd cgroup driver: `<prefix>-<64hex>.scope`.
    if let Some(stem) = component.strip_suffix(".scope") {
        for (prefix, runtime) in [
            ("docker-", Runtime::Docker),
            ("cri-containerd-", Runtime::Containerd),
            ("nerdctl-", Runtime::Containerd),
            ("crio-", Runtime::CriO),
            ("libpod-", Runtime::Podman),
        ] {
            if let Some(id) = stem.strip_prefix(prefix)
                && is_container_id(id)
            {
                return Some((runtime, id));
            }
        }
        return None;
    }
    // cgroupfs driver: `/docker/<64hex>`, `/kubepods/<qos>/pod<uid>/<64hex>` or `crio-<64hex>`.
    if let Some(id) = component.strip_prefix("crio-")
        && is_container_id(id)
    {
        return Some((Runtime::CriO, id));
    }
    if is_container_id(component) {
        if parent == Some("docker") {
            return Some((Runtime::Docker, component));
        }
        if parent_is_pod {
            return Some((Runtime::Cri, component));
        }
    }
    None
}

/// Which container or systemd unit a cgroup v2 path belongs to.
///
/// The innermost component naming a container wins (a container may create sub-cgroups of
/// its own, such as `init.scope` under a systemd-in-docker container); without one, the
/// innermost `.service` or `.scope` unit is reported as a systemd unit. `None` for the root
/// cgroup, plain slices and unknown layouts.
pub fn parse_cgroup_path(path: &str) -> Option<ContainerInfo> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
        .collect();
    let mut found: Option<(Runtime, &str, Option<String>)> = None;
    let mut pod: Option<String> = None;
    for (i, c) in parts.iter().enumerate() {
        let parent = i.checked_sub(1).and_then(|p| parts.get(p)).copied();
        let parent_is_pod = parent.is_some_and(|p| pod_of(p).is_some());
        if let Some(uid) = pod_of(c) {
            pod = Some(uid);
        }
        if let Some((rt, id)) = container_of(c, parent_is_pod, parent) {
            found = Some((rt, id, pod.clone()));
        }
    }
    if let Some((runtime, id, pod)) = found {
        return Some(ContainerInfo {
            runtime,
            id: id.to_string(),
            pod,
        });
    }
    parts
        .iter()
        .rev()
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(|unit| ContainerInfo {
            runtime: Runtime::Systemd,
            id: (*unit).to_string(),
            pod: None,
        })
}

/// The cgroup v2 path of a process from `/proc/PID/cgroup` (the `0::` line). Under a cgroup
/// namespace the path is relative to the reader's namespace root and may start with `/..`;
/// [`parse_cgroup_path`] ignores those components.
pub fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` (unified mode) or
/// `/sys/fs/cgroup/unified` (systemd's hybrid mode, cgroup v1 controllers beside it).
/// `bpf_get_current_cgroup_id()` always reports the v2 (default hierarchy) cgroup.
pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| is_cgroup2(p))
}

/// Resolves cgroup ids (and pids) to containers, with a bounded, lazily refreshed index.
pub struct Resolver {
    root: Option<PathBuf>,
    /// cgroup id (directory inode) -> path relative to the hierarchy root, from the last walk.
    paths: HashMap<u64, String>,
    /// Resolved ids. Cleared when it grows past `MAX_CACHE`.
    cache: HashMap<u64, Option<Arc<ContainerInfo>>>,
    last_walk: Option<Instant>,
}

impl Resolver {
    const MAX_CACHE: usize = 16_384;
    /// A miss walks the tree again, at most this often: a failure storm from a cgroup that
    /// has since been removed must not turn into a walk per event.
    const MIN_REWALK: Duration = Duration::from_millis(250);

    /// Use the system's cgroup v2 mount (none found: every lookup answers `None`).
    pub fn new() -> Self {
        let root = cgroup2_root();
        if root.is_none() {
            debug!("no cgroup v2 hierarchy found: container attribution is off");
        }
        Self::with_root(root)
    }

    pub fn with_root(root: Option<PathBuf>) -> Self {
        Self {
            root,
            paths: HashMap::new(),
            cache: HashMap::new(),
            last_walk: None,
        }
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// Path of a cgroup id relative to the hierarchy root (`/` for the root itself).
    pub fn path_of(&mut self, cgroup_id: u64) -> Option<String> {
        if let Some(p) = self.paths.get(&cgroup_id) {
            return Some(p.clone());
        }
        if self
            .last_walk
            .is_some_and(|t| t.elapsed() < Self::MIN_REWALK)
        {
            return None;
        }
        self.walk();
        self.paths.get(&cgroup_id).cloned()
    }

    /// The container a cgroup id belongs to.
    pub fn by_cgroup_id(&mut self, cgroup_id: u64) -> Option<Arc<ContainerInfo>> {
        if let Some(c) = self.cache.get(&cgroup_id) {
            return c.clone();
        }
        // Unknown ids are not cached: the cgroup may be created after the last walk.
        let path = self.path_of(cgroup_id)?;
        let info = parse_cgroup_path(&path).map(Arc::new);
        if self.cache.len() >= Self::MAX_CACHE {
            self.cache.clear();
        }
        self.cache.insert(cgroup_id, info.clone());
        info
    }

    /// The container a live process is in, from `/proc/PID/cgroup`.
    pub fn by_pid(&self, pid: u32) -> Option<ContainerInfo> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        parse_cgroup_path(parse_proc_cgroup(&text)?)
    }

    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        let mut paths = HashMap::new();
        let root_ino = fs::metadata(&root).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        if let Ok(ino) = root_ino {
            paths.insert(ino, "/".to_string());
        }
        let complete = super::cgroups::walk(&root, |_, rel, ino| {
            paths.insert(ino, rel.to_string());
            false
        });
        if !complete {
            debug!(
                "cgroup walk stopped at {} directories",
                super::cgroups::MAX_WALK
            );
        }
        self.paths = paths;
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "4b8a3f3e5d1c2b0a99887766554433221100ffeeddccbbaa0123456789abcdef";
    const UID: &str = "7c9a4e2b-1f3d-4a5b-9c8d-0e1f2a3b4c5d";

    fn c(runtime: Runtime, id: &str, pod: Option<&str>) -> Option<ContainerInfo> {
        Some(ContainerInfo {
            runtime,
            id: id.to_string(),
            pod: pod.map(str::to_string),
        })
    }

    #[test]
    fn docker_with_systemd_and_cgroupfs_drivers() {
        assert_eq!(
            parse_cgroup_path(&format!("/system.slice/docker-{HEX}.scope")),
            c(Runtime::Docker, HEX, None)
        );
        assert_eq!(
            parse_cgroup_path(&format!("/docker/{HEX}")),
            c(Runtime::Docker, HEX, None)
        );
        // systemd inside the container makes sub-cgroups: the container still wins.
        assert_eq!(
            parse_cgroup_path(&format!("/system.slice/docker-{HEX}.scope/init.scope")),
            c(Runtime::Docker, HEX, None)
        );
        // Rootless docker under the user's manager.
        assert_eq!(
            parse_cgroup_path(&format!(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{HEX}.scope"
            )),
            c(Runtime::Docker, HEX, None)
        );
    }

    #[test]
    fn kubernetes_containerd_and_crio() {
        let slice_uid = UID.replace('-', "_");
        assert_eq!(
            parse_cgroup_path(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice_uid}.slice/cri-containerd-{HEX}.scope"
            )),
            c(Runtime::Containerd, HEX, Some(UID))
        );
        // Guaranteed QoS pods sit directly under kubepods.slice.
        assert_eq!(
            parse_cgroup_path(&format!(
                "/kubepods.slice/kubepods-pod{slice_uid}.slice/crio-{HEX}.scope"
            )),
            c(Runtime::CriO, HEX, Some(UID))
        );
        // cgroupfs driver.
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/crio-{HEX}")),
            c(Runtime::CriO, HEX, Some(UID))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}/{HEX}")),
            c(Runtime::Cri, HEX, Some(UID))
        );
        // Seen from inside a cgroup namespace: /proc/PID/cgroup paths climb with `..`.
        assert_eq!(
            parse_cgroup_path(&format!(
                "/../../kubepods-besteffort-pod{slice_uid}.slice/cri-containerd-{HEX}.scope"
            )),
            c(Runtime::Containerd, HEX, Some(UID))
        );
        // The pod's own slice holds no container.
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods.slice/kubepods-pod{slice_uid}.slice")),
            None
        );
    }

    #[test]
    fn podman_and_nerdctl() {
        assert_eq!(
            parse_cgroup_path(&format!("/machine.slice/libpod-{HEX}.scope/container")),
            c(Runtime::Podman, HEX, None)
        );
        assert_eq!(
            parse_cgroup_path(&format!("/system.slice/nerdctl-{HEX}.scope")),
            c(Runtime::Containerd, HEX, None)
        );
    }

    #[test]
    fn systemd_services_and_sessions() {
        assert_eq!(
            parse_cgroup_path("/system.slice/nginx.service"),
            c(Runtime::Systemd, "nginx.service", None)
        );
        assert_eq!(
            parse_cgroup_path("/system.slice/system-getty.slice/getty@tty1.service"),
            c(Runtime::Systemd, "getty@tty1.service", None)
        );
        assert_eq!(
            parse_cgroup_path("/user.slice/user-1000.slice/session-3.scope"),
            c(Runtime::Systemd, "session-3.scope", None)
        );
        assert_eq!(
            parse_cgroup_path(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1234.scope"
            ),
            c(Runtime::Systemd, "app-firefox-1234.scope", None)
        );
        assert_eq!(
            parse_cgroup_path("/init.scope"),
            c(Runtime::Systemd, "init.scope", None)
        );
    }

    #[test]
    fn no_container_for_root_slices_and_look_alikes() {
        for p in [
            "/",
            "",
            "/user.slice/user-1000.slice",
            "/kubepods.slice",
            // Not 64 hex digits, or upper case: not a container id.
            "/docker/abc123",
            &format!("/docker/{}", HEX.to_uppercase()),
            &format!("/something/{HEX}"),
            "/portexhaust-test",
        ] {
            assert_eq!(parse_cgroup_path(p), None, "{p}");
        }
        // A docker-looking scope with a bad id is still a scope unit.
        assert_eq!(
            parse_cgroup_path("/system.slice/docker-xyz.scope"),
            c(Runtime::Systemd, "docker-xyz.scope", None)
        );
    }

    #[test]
    fn proc_cgroup_picks_the_v2_line() {
        let text = "9:name=systemd:/\n4:memory:/x\n0::/system.slice/nginx.service\n";
        assert_eq!(parse_proc_cgroup(text), Some("/system.slice/nginx.service"));
        assert_eq!(parse_proc_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn short_names() {
        let d = ContainerInfo {
            runtime: Runtime::CriO,
            id: HEX.into(),
            pod: None,
        };
        assert_eq!(d.short(), "cri-o:4b8a3f3e5d1c");
        let s = ContainerInfo {
            runtime: Runtime::Systemd,
            id: "nginx.service".into(),
            pod: None,
        };
        assert_eq!(s.short(), "nginx.service");
    }

    #[test]
    fn serialises_as_runtime_id_pod() {
        let v = serde_json::to_value(ContainerInfo {
            runtime: Runtime::CriO,
            id: HEX.into(),
            pod: Some(UID.into()),
        })
        .expect("json");
        assert_eq!(v["runtime"], "cri-o");
        assert_eq!(v["id"], HEX);
        assert_eq!(v["pod"], UID);
    }

    #[test]
    fn index_of_a_directory_tree() {
        // Any directory tree works for the walk itself; inodes of a tmp tree stand in for ids.
        let dir = std::env::temp_dir().join(format!("pxh-cgroup-index-{}", std::process::id()));
        let leaf = dir.join(format!("system.slice/docker-{HEX}.scope"));
        fs::create_dir_all(&leaf).expect("mkdir");
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).expect("stat"));
        let mut r = Resolver::with_root(Some(dir.clone()));
        let got = r.by_cgroup_id(ino(&leaf));
        let root_path = r.path_of(ino(&dir));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(got.as_deref(), c(Runtime::Docker, HEX, None).as_ref());
        assert_eq!(root_path.as_deref(), Some("/"));
        // Unknown ids answer None without a second walk inside MIN_REWALK.
        assert_eq!(r.by_cgroup_id(u64::MAX), None);
    }

    #[test]
    fn own_process_has_a_readable_cgroup() {
        // Whatever this process runs in, /proc/self/cgroup has the v2 line on any 4.5+ kernel.
        let text = fs::read_to_string("/proc/self/cgroup").expect("read");
        assert!(parse_proc_cgroup(&text).is_some(), "{text}");
    }
}
