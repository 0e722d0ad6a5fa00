//! `trace --cgroup PATH` and `--container ID`: the cgroup v2 subtrees whose tasks pass the
//! in-kernel filter (`FILTER_CGROUPS`, `FILTER_CGROUP` in emit.rs).
//!
//! A cgroup's id, as `bpf_get_current_cgroup_id()` reports it, is the inode number of its
//! directory on the cgroup2 mount (`kernfs_ino()`, fs/kernfs), and its level is its depth below
//! the root (the root is level 0). On 5.14+ the programs match the task's ancestor at each
//! filtered level (`bpf_get_current_ancestor_cgroup_id()`), so cgroups created under a filtered
//! one later (a new container in a pod, a worker's sub-cgroup) pass at once. Before 5.14 that
//! helper is not offered to tracing programs; the map then lists the whole subtree by id and
//! [`Subtrees::refresh`] adds the cgroups created since, once a second.
use std::{
    collections::HashSet,
    fs,
    os::unix::fs::{DirEntryExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use portexhaust_common::MAX_CGROUP_FILTER_LEVEL;

use super::container::{Runtime, parse_cgroup_path};

/// Size of `FILTER_CGROUPS`: the filtered cgroups, or (before 5.14) every cgroup below them.
pub const MAX_CGROUP_IDS: u32 = 16384;

/// One filtered subtree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupTarget {
    /// Its directory on the cgroup2 mount.
    pub dir: PathBuf,
    /// Its path relative to the hierarchy, as `/proc/PID/cgroup` prints it (`/` for the root).
    pub rel: String,
    /// Its cgroup id (the directory's inode).
    pub id: u64,
    /// Its depth below the root (the root is 0).
    pub level: u32,
}

/// Depth of a path relative to the cgroup root: `/` is 0, `/a/b` is 2.
pub fn level_of(rel: &str) -> u32 {
    rel.split('/').filter(|c| !c.is_empty()).count() as u32
}

/// Whether tracing programs may call `bpf_get_current_ancestor_cgroup_id()`: 5.14 and later.
pub fn ancestor_helper_allowed(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (5, 14)
}

/// `--cgroup PATH`: an absolute directory on the cgroup2 mount, or a path relative to the
/// hierarchy as `/proc/PID/cgroup` prints it (`/system.slice/nginx.service`).
pub fn resolve_path(root: &Path, arg: &str) -> Result<CgroupTarget, String> {
    let p = Path::new(arg);
    let dir = if p.starts_with(root) {
        p.to_path_buf()
    } else {
        root.join(arg.trim_start_matches('/'))
    };
    let meta = fs::metadata(&dir).map_err(|e| {
        format!(
            "--cgroup {arg}: {} is not a cgroup ({e}); give a directory under {} or a path as \
             /proc/PID/cgroup shows it",
            dir.display(),
            root.display()
        )
    })?;
    if !meta.is_dir() || !dir.join("cgroup.procs").exists() {
        return Err(format!(
            "--cgroup {arg}: {} is not a cgroup v2 directory (no cgroup.procs)",
            dir.display()
        ));
    }
    // Canonical, so that `..` and symlinks cannot give a level that is not the cgroup's.
    let dir = fs::canonicalize(&dir).unwrap_or(dir);
    let rel = match dir.strip_prefix(root) {
        Ok(r) if r.as_os_str().is_empty() => "/".to_string(),
        Ok(r) => format!("/{}", r.display()),
        Err(_) => {
            return Err(format!(
                "--cgroup {arg}: {} lies outside the cgroup v2 hierarchy at {}",
                dir.display(),
                root.display()
            ));
        }
    };
    let level = level_of(&rel);
    if level > MAX_CGROUP_FILTER_LEVEL {
        return Err(format!(
            "--cgroup {arg}: nested {level} levels deep; the filter reaches level \
             {MAX_CGROUP_FILTER_LEVEL} at most"
        ));
    }
    Ok(CgroupTarget {
        id: meta.ino(),
        dir,
        rel,
        level,
    })
}

/// A container id as users type it: hex, a docker-style short id (12) up to the full 64.
fn check_container_id(id: &str) -> Result<String, String> {
    let id = id.trim().to_ascii_lowercase();
    if id.len() < 12 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "--container {id}: give the container id (12 to 64 hex digits, as `docker ps` or \
             `crictl ps` print it)"
        ));
    }
    Ok(id)
}

/// Directories below a cgroup walked at most (a busy Kubernetes node has a few thousand).
pub const MAX_WALK: usize = 100_000;

/// Every directory below `root` (itself excluded), depth first, bounded by [`MAX_WALK`]: its
/// path, its path relative to `root` (`/a/b`) and its inode, which on the cgroup2 mount is the
/// cgroup id (readdir's d_ino is `kernfs_ino()`, fs/kernfs). A visit returning true does not
/// descend. Returns false when the bound stopped it.
pub fn walk(root: &Path, mut visit: impl FnMut(&Path, &str, u64) -> bool) -> bool {
    let mut seen = 0;
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            seen += 1;
            if seen > MAX_WALK {
                return false;
            }
            let child = format!("{rel}/{}", e.file_name().to_string_lossy());
            if !visit(&e.path(), &child, e.ino()) {
                stack.push((e.path(), child));
            }
        }
    }
    true
}

/// `--container ID`: the outermost cgroups that name the container (runtimes name them after
/// the id: `docker-<id>.scope`, `cri-containerd-<id>.scope`, `/docker/<id>`, ...).
pub fn resolve_container(root: &Path, arg: &str) -> Result<Vec<CgroupTarget>, String> {
    let want = check_container_id(arg)?;
    let mut found = Vec::new();
    let mut ids = HashSet::new();
    walk(root, |dir, rel, ino| {
        let Some(info) = parse_cgroup_path(rel) else {
            return false;
        };
        if info.runtime == Runtime::Systemd || !info.id.starts_with(&want) {
            return false;
        }
        ids.insert(info.id.clone());
        found.push(CgroupTarget {
            dir: dir.to_path_buf(),
            rel: rel.to_string(),
            id: ino,
            level: level_of(rel),
        });
        true
    });
    match ids.len() {
        0 => Err(format!(
            "--container {arg}: no cgroup under {} names that container; is it running on \
             this host? (`docker ps`, `crictl ps`)",
            root.display()
        )),
        1 => {
            if let Some(t) = found.iter().find(|t| t.level > MAX_CGROUP_FILTER_LEVEL) {
                return Err(format!(
                    "--container {arg}: its cgroup {} is nested deeper than level \
                     {MAX_CGROUP_FILTER_LEVEL}",
                    t.rel
                ));
            }
            Ok(found)
        }
        n => Err(format!(
            "--container {arg}: the prefix matches {n} containers; give more of the id"
        )),
    }
}

/// Ids of every cgroup in `target`'s subtree, itself included.
pub fn subtree_ids(target: &CgroupTarget) -> Vec<u64> {
    let mut ids = vec![target.id];
    walk(&target.dir, |_, _, ino| {
        ids.push(ino);
        false
    });
    ids
}

/// How the kernel matches the filtered subtrees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subtrees {
    pub targets: Vec<CgroupTarget>,
    /// 5.14+: match ancestors at these levels; the map holds only the targets' ids.
    pub ancestors: bool,
}

impl Subtrees {
    /// The `CGROUP_LEVELS` global: a bit per filtered level, 0 without the ancestor helper.
    pub fn levels(&self) -> u32 {
        if !self.ancestors {
            return 0;
        }
        self.targets.iter().fold(0, |a, t| a | (1 << t.level))
    }

    /// The ids `FILTER_CGROUPS` must hold now.
    pub fn ids(&self) -> Vec<u64> {
        if self.ancestors {
            self.targets.iter().map(|t| t.id).collect()
        } else {
            self.targets.iter().flat_map(subtree_ids).collect()
        }
    }

    /// Whether the map must be refreshed as cgroups come and go (no ancestor helper).
    pub fn needs_refresh(&self) -> bool {
        !self.ancestors && !self.targets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_count_components() {
        assert_eq!(level_of("/"), 0);
        assert_eq!(level_of(""), 0);
        assert_eq!(level_of("/system.slice"), 1);
        assert_eq!(
            level_of("/kubepods.slice/kubepods-pod1.slice/cri-containerd-x.scope"),
            3
        );
    }

    #[test]
    fn ancestor_helper_from_5_14() {
        assert!(!ancestor_helper_allowed("5.10.0-35-amd64"));
        assert!(!ancestor_helper_allowed("5.13.19"));
        assert!(ancestor_helper_allowed("5.14.0-rc1"));
        assert!(ancestor_helper_allowed("6.1.0-42-cloud-amd64"));
        assert!(ancestor_helper_allowed("6.18.44-fc-v1098"));
        assert!(!ancestor_helper_allowed("garbage"));
    }

    #[test]
    fn container_ids_are_checked() {
        assert!(check_container_id("0123456789ab").is_ok());
        assert_eq!(
            check_container_id(" 0123456789AB ").as_deref(),
            Ok("0123456789ab")
        );
        assert!(check_container_id("0123").is_err());
        assert!(check_container_id("checkout-7f9c").is_err());
        assert!(check_container_id(&"a".repeat(65)).is_err());
    }

    /// A directory tree standing in for the cgroup2 mount: resolution only reads names,
    /// inodes and `cgroup.procs`, which a plain directory has too.
    fn tree(dirs: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        for d in dirs {
            let mut p = t.path().to_path_buf();
            for part in Path::new(d).components() {
                p.push(part);
                fs::create_dir_all(&p).expect("mkdir");
                fs::write(p.join("cgroup.procs"), "").expect("cgroup.procs");
            }
        }
        t
    }

    #[test]
    fn paths_resolve_absolute_or_relative() {
        let t = tree(&["system.slice/app.service/worker"]);
        let root = fs::canonicalize(t.path()).expect("canonical");
        let abs = root.join("system.slice/app.service");
        let a = resolve_path(&root, abs.to_str().expect("utf-8")).expect("absolute");
        let b = resolve_path(&root, "/system.slice/app.service").expect("relative");
        assert_eq!(a, b);
        assert_eq!(a.rel, "/system.slice/app.service");
        assert_eq!(a.level, 2);
        assert_eq!(a.id, fs::metadata(&abs).expect("meta").ino());
        assert_eq!(subtree_ids(&a).len(), 2);
        let err = resolve_path(&root, "/system.slice/nope").expect_err("missing");
        assert!(err.contains("is not a cgroup"), "{err}");
        let err = resolve_path(&root, "/system.slice/../../..").expect_err("outside");
        assert!(
            err.contains("outside") || err.contains("not a cgroup"),
            "{err}"
        );
    }

    #[test]
    fn containers_resolve_by_prefix() {
        let a = "0123456789abcdef".repeat(4);
        let b = "0123456789abffff".repeat(4);
        let t = tree(&[
            &format!("system.slice/docker-{a}.scope/inner"),
            &format!("system.slice/docker-{b}.scope"),
        ]);
        let root = fs::canonicalize(t.path()).expect("canonical");
        let found = resolve_container(&root, &a[..16]).expect("one container");
        assert_eq!(found.len(), 1, "the outermost cgroup only: {found:?}");
        assert_eq!(found[0].rel, format!("/system.slice/docker-{a}.scope"));
        assert_eq!(found[0].level, 2);
        let err = resolve_container(&root, &a[..12]).expect_err("ambiguous");
        assert!(err.contains("matches 2 containers"), "{err}");
        let err = resolve_container(&root, "ffffffffffff").expect_err("absent");
        assert!(err.contains("no cgroup"), "{err}");
    }

    #[test]
    fn levels_and_ids_follow_the_mode() {
        let t = tree(&["a/b", "c"]);
        let root = fs::canonicalize(t.path()).expect("canonical");
        let targets = vec![
            resolve_path(&root, "/a").expect("a"),
            resolve_path(&root, "/c").expect("c"),
        ];
        let anc = Subtrees {
            targets: targets.clone(),
            ancestors: true,
        };
        assert_eq!(anc.levels(), 1 << 1);
        assert_eq!(anc.ids().len(), 2);
        assert!(!anc.needs_refresh());
        let exact = Subtrees {
            targets,
            ancestors: false,
        };
        assert_eq!(exact.levels(), 0);
        assert_eq!(exact.ids().len(), 3, "a, a/b and c");
        assert!(exact.needs_refresh());
    }
}
