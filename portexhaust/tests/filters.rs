//! Privileged tests of `trace --cgroup` and `--container`: real cgroup v2 directories, named
//! as a container runtime names them, with real exhausting processes moved into them. Run by
//! `cargo xtask test` as root, one at a time; they panic rather than skip.
mod common;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use common::{BIN, Tracer, Workload, backends_here, events_and_summary, require_root};

/// The cgroup v2 mount: only cgroup2 directories hold `cgroup.controllers`.
fn cgroup2_root() -> PathBuf {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
        .expect("a cgroup v2 hierarchy (the filters need one; this kernel test cannot run)")
}

/// Cgroups the test made, removed deepest first when it ends, passed or failed (after the
/// workloads, which are dropped first, have left them).
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    fn make(&mut self, dir: PathBuf) -> PathBuf {
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        self.0.push(dir.clone());
        dir
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            // A killed workload may take a moment to leave its cgroup.
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Move a (paused) workload into `cgroup`: its whole thread group, and so the connects it
/// makes once it goes.
fn enter(w: &Workload, cgroup: &Path) {
    fs::write(cgroup.join("cgroup.procs"), w.pid.to_string())
        .unwrap_or_else(|e| panic!("moving {} into {}: {e}", w.pid, cgroup.display()));
}

/// Failures per command in a `trace --json` stream; the summary's exact total must equal
/// what the events add up to (no storm here: every failure is streamed).
fn failures_by_comm(out: &str) -> (BTreeMap<String, u64>, u64) {
    let (events, summary) = events_and_summary(out);
    let mut by = BTreeMap::new();
    for e in &events {
        *by.entry(e["comm"].as_str().expect("comm").to_string())
            .or_default() += 1;
    }
    let total = summary["failures_total"].as_u64().expect("failures_total");
    assert_eq!(
        total,
        events.len() as u64,
        "every failure streamed: {summary}"
    );
    (by, total)
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn container_and_cgroup_filters_are_applied_in_the_kernel() {
    require_root();
    let root = cgroup2_root();
    let id = format!(
        "{:016x}",
        0x5eed_0000_0000_0000u64 | u64::from(std::process::id())
    )
    .repeat(4);
    let mut cg = Cgroups(Vec::new());
    let slice = cg.make(root.join(format!("pxh-test-{}.slice", std::process::id())));
    // As docker's systemd cgroup driver names a container's cgroup.
    let container = cg.make(slice.join(format!("docker-{id}.scope")));
    let other = cg.make(slice.join("pxh-other.scope"));
    let other_rel = format!(
        "/{}",
        other.strip_prefix(&root).expect("under the root").display()
    );

    // Every backend with the 5.14+ ancestor match, and tp-btf with the subtree list older
    // kernels get (refreshed every second: the nested cgroup must wait for it).
    let mut runs: Vec<(String, &str)> = backends_here()
        .into_iter()
        .map(|b| (b, "ancestor"))
        .collect();
    runs.push(("tp-btf".to_string(), "subtree"));
    for (backend, mode) in runs {
        let backend = backend.as_str();
        // In the container (7), beside it (5), and in a cgroup created inside the container
        // after the tracer started (4): the filter follows the subtree, not a list taken at
        // start.
        let mut a = Workload::start("v4", 7, "pxh-cg-in", &[]);
        let mut b = Workload::start("v4", 5, "pxh-cg-beside", &[]);
        let mut c = Workload::start("v4", 4, "pxh-cg-nested", &[]);
        enter(&a, &container);
        enter(&b, &other);
        let mut cmd = Command::new(BIN);
        cmd.args([
            "trace",
            "-j",
            "--backend",
            backend,
            "--container",
            &id[..12],
        ])
        .env("PORTEXHAUST_CGROUP_MATCH", mode);
        let t = Tracer::start(cmd);
        let nested = cg.make(container.join(format!("worker-{backend}-{mode}")));
        enter(&c, &nested);
        if mode == "subtree" {
            thread::sleep(Duration::from_millis(2500));
        }
        for w in [&mut a, &mut b, &mut c] {
            w.go();
        }
        let caused: Vec<u64> = [a, b, c]
            .into_iter()
            .map(|w| common::expected_failures(&w.finish()))
            .collect();
        assert_eq!(
            caused,
            [7, 5, 4],
            "{backend} {mode}: the workloads' own counts"
        );
        thread::sleep(Duration::from_millis(300));
        let (out, err, code) = t.stop();
        assert_eq!(code, 0, "{backend}: exit {code}:\n{err}");
        let (by, total) = failures_by_comm(&out);
        assert_eq!(
            by,
            BTreeMap::from([
                ("pxh-cg-in".to_string(), 7),
                ("pxh-cg-nested".to_string(), 4)
            ]),
            "{backend} {mode}: --container counts its subtree's failures and nothing else"
        );
        assert_eq!(total, 11, "{backend}");
        let header: serde_json::Value =
            serde_json::from_str(out.lines().next().expect("header")).expect("header json");
        assert_eq!(
            header["filters"]["cgroups"][0],
            format!(
                "/{}",
                container.strip_prefix(&root).expect("under").display()
            ),
            "{backend}: the record says what it was filtered to"
        );

        // --cgroup, as /proc/PID/cgroup prints the path, with -o json: only the one beside.
        let mut a = Workload::start("v4", 3, "pxh-cg-in", &[]);
        let mut b = Workload::start("v4", 6, "pxh-cg-beside", &[]);
        enter(&a, &container);
        enter(&b, &other);
        let mut cmd = Command::new(BIN);
        cmd.args([
            "trace",
            "-o",
            "json",
            "--backend",
            backend,
            "--cgroup",
            &other_rel,
        ])
        .env("PORTEXHAUST_CGROUP_MATCH", mode);
        let t = Tracer::start(cmd);
        a.go();
        b.go();
        let caused = [a, b].map(|w| common::expected_failures(&w.finish()));
        assert_eq!(
            caused,
            [3, 6],
            "{backend} {mode}: the workloads' own counts"
        );
        thread::sleep(Duration::from_millis(300));
        let (out, err, code) = t.stop();
        assert_eq!(code, 0, "{backend}: exit {code}:\n{err}");
        let (by, _) = failures_by_comm(&out);
        assert_eq!(
            by,
            BTreeMap::from([("pxh-cg-beside".to_string(), 6)]),
            "{backend} {mode}: --cgroup {other_rel}"
        );
        let _ = fs::remove_dir(&nested);
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn unknown_cgroups_and_containers_fail_before_loading() {
    require_root();
    for (args, says) in [
        (&["--container", "ffffffffffff0000"][..], "no cgroup under"),
        (&["--container", "checkout-7f9c"], "12 to 64 hex digits"),
        (&["--cgroup", "/no/such/pxh-cgroup"], "is not a cgroup"),
        (&["-o", "text", "--json"], "-o text"),
    ] {
        let out = Command::new(BIN)
            .arg("trace")
            .args(args)
            .output()
            .expect("run portexhaust");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            !err.contains("ready:"),
            "{args:?}: nothing was loaded: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
