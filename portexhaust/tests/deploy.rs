//! The deployment files, for real: the systemd unit's capabilities (each needed, together
//! enough) and hardening (`systemd-analyze verify`), and the Kubernetes manifests against the
//! Kubernetes schemas (PyPI's `kubernetes-validate`, installed by `cargo xtask setup --tests`).
//!
//! Root, one at a time, by `cargo xtask test`; they panic rather than skip when they cannot
//! run. Every process they start is killed on drop.
mod common;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use common::{BIN, Tracer, Workload, events_and_summary, finished, repo, require_root, temp_dir};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// The systemd unit.

fn unit_text() -> String {
    fs::read_to_string(repo().join("deploy/portexhaust.service")).expect("unit file")
}

/// The capability names of one `Key=CAP_A CAP_B` line of the unit.
fn unit_caps(unit: &str, key: &str) -> BTreeSet<String> {
    let lines: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .collect();
    assert_eq!(lines.len(), 1, "one {key}= line expected");
    lines[0].split_whitespace().map(str::to_string).collect()
}

/// `trace` as an unprivileged user holding exactly `caps` (as the unit's DynamicUser with
/// AmbientCapabilities and NoNewPrivileges would), in a copy of the binary any user can run.
fn trace_with_caps(caps: &BTreeSet<String>, bin: &Path, args: &[&str]) -> Command {
    let list = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--no-new-privs",
    ])
    .arg(format!("--inh-caps=-all,{list}"))
    .arg(format!("--ambient-caps=-all,{list}"))
    .arg(format!("--bounding-set=-all,{list}"))
    .arg(bin)
    .arg("trace")
    .args(args);
    cmd
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_units_capabilities_are_enough_and_each_is_needed() {
    require_root();
    let unit = unit_text();
    let caps = unit_caps(&unit, "CapabilityBoundingSet");
    assert_eq!(caps, unit_caps(&unit, "AmbientCapabilities"));
    assert!(unit.contains("\nDynamicUser=yes\n") && unit.contains("\nNoNewPrivileges=yes\n"));
    let dir = temp_dir("caps");
    let bin = dir.path().join("portexhaust");
    fs::copy(BIN, &bin).expect("copy binary");
    fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");

    let run = |caps: &BTreeSet<String>| -> Result<(Vec<Value>, u64), String> {
        // Enough failures (tens of milliseconds) that the tracer reads the first events while
        // the process is still alive: its namespace is looked up in /proc/PID then, and cached.
        let mut w = Workload::start("v4", 2000, "pxh-caps", &[]);
        let pid = w.pid.to_string();
        let t = Tracer::spawn(trace_with_caps(
            caps,
            &bin,
            &["--json", "--events-per-s", "0", "--pid", &pid],
        ))
        .map_err(|(err, code)| format!("exit {code:?}: {err}"))?;
        w.go();
        let (_, n) = finished(w);
        let (out, err, code) = t.stop();
        assert_eq!(code, 0, "{err}");
        let (events, summary) = events_and_summary(&out);
        assert_eq!(summary["failures_total"], n, "{summary}");
        Ok((events, n))
    };

    // Exactly the unit's capabilities: every failure, with the failing process's namespace.
    let (events, n) = run(&caps).unwrap_or_else(|e| panic!("with {caps:?}: {e}"));
    assert_eq!(events.len() as u64, n);
    assert!(events.iter().all(|e| e["netns"].is_u64()), "{events:?}");

    // Without CAP_DAC_READ_SEARCH, tracefs (mode 0700) is out of reach. The default backends
    // (tp_btf, raw_tp, fentry) need no tracefs, so the unit still starts; what needs it is
    // the perf-tracepoint fallback of kernels without BTF, and syscall tracepoints (--catch
    // where no function hook exists), which is why the unit keeps the capability.
    let mut fewer = caps.clone();
    assert!(fewer.remove("CAP_DAC_READ_SEARCH"));
    let (events, n) =
        run(&fewer).unwrap_or_else(|e| panic!("default backend without tracefs access: {e}"));
    assert_eq!(events.len() as u64, n);
    let mut cmd = trace_with_caps(
        &fewer,
        &bin,
        &["--json", "--backend", "tracepoint", "--duration", "1"],
    );
    let out = cmd.output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("tracefs"),
        "the tracepoint backend needs tracefs, out of reach without CAP_DAC_READ_SEARCH: {err}"
    );
    // Without CAP_SYS_PTRACE the failures are still caught with their namespace, which the
    // kernel side reads itself through BTF offsets; what is lost is /proc of root's processes
    // (the census's fd owners), which the unit keeps CAP_SYS_PTRACE for.
    let mut fewer = caps.clone();
    assert!(fewer.remove("CAP_SYS_PTRACE"));
    let (events, n) = run(&fewer).unwrap_or_else(|e| panic!("without CAP_SYS_PTRACE: {e}"));
    assert_eq!(events.len() as u64, n);
    assert!(events.iter().all(|e| e["netns"].is_u64()), "{events:?}");
}

/// `systemd-analyze verify` of a unit text, with ExecStart pointed at `exec`: verify checks
/// that the program exists, and the unit names the installed path, which a test machine lacks.
/// Any output is a failure: verify exits 0 on settings it ignores (misspelt keys, bad values),
/// and an ignored hardening setting is a silent hole.
fn verify_unit(unit: &str, exec: &str) -> Result<(), String> {
    let dir = temp_dir("unit");
    let path = dir.path().join("portexhaust.service");
    let text = unit.replace(
        "ExecStart=/usr/local/bin/portexhaust ",
        &format!("ExecStart={exec} "),
    );
    assert_ne!(text, unit, "ExecStart=/usr/local/bin/portexhaust not found");
    fs::write(&path, text).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is missing");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        return Err(format!("{}: {said}", out.status));
    }
    // The exposure score systemd computes from the hardening settings (0-10, lower is
    // better; 2.4 when written). --threshold is in tenths.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=30", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze security");
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        return Err(format!(
            "exposure above 3.0: {}",
            text.lines().last().unwrap_or("")
        ));
    }
    Ok(())
}

#[test]
#[ignore = "needs systemd-analyze (cargo xtask setup --tests): run with cargo xtask test"]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = unit_text();
    verify_unit(&unit, BIN).unwrap_or_else(|e| panic!("deploy/portexhaust.service: {e}"));
    // The checker catches what verify only warns about, and what it refuses.
    for (bad, why) in [
        (
            unit.replace("ProtectSystem=strict", "ProtectSystem=bogus"),
            "bad value",
        ),
        (
            unit.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"),
            "misspelt key",
        ),
        (
            unit.replace("ProtectHome=yes", "ProtectHome=no")
                .replace("PrivateDevices=yes", "PrivateDevices=no")
                .replace("ProtectKernelTunables=yes", "ProtectKernelTunables=no")
                .replace("DynamicUser=yes", "DynamicUser=no")
                .replace("SystemCallFilter=", "#SystemCallFilter="),
            "weak hardening",
        ),
    ] {
        assert!(verify_unit(&bad, BIN).is_err(), "{why} passed");
    }
    assert!(
        verify_unit(&unit, "/nonexistent/portexhaust").is_err(),
        "missing program passed"
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests.

/// `kubernetes-validate`: on PATH, or in the virtualenv `cargo xtask setup --tests` makes.
fn kubernetes_validate() -> PathBuf {
    let venv = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/portexhaust/venv/bin/kubernetes-validate");
    let on_path = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        PathBuf::from("kubernetes-validate")
    } else {
        assert!(
            venv.exists(),
            "kubernetes-validate (PyPI) is missing: run `cargo xtask setup --tests`"
        );
        venv
    }
}

/// Validate against the Kubernetes JSON schemas (strict: unknown fields are errors).
fn validate(manifest: &Path, version: &str) -> Result<(), String> {
    let out = Command::new(kubernetes_validate())
        .args(["--strict", "--quiet", "-k", version])
        .arg(manifest)
        .output()
        .expect("run kubernetes-validate");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !said.contains("ERROR") {
        Ok(())
    } else {
        Err(said)
    }
}

#[test]
#[ignore = "needs kubernetes-validate (cargo xtask setup --tests): run with cargo xtask test"]
fn kubernetes_manifests_match_the_schemas() {
    let manifest = repo().join("deploy/kubernetes/daemonset.yaml");
    let text = fs::read_to_string(&manifest).expect("manifest");
    for kind in ["kind: Namespace", "kind: ServiceAccount", "kind: DaemonSet"] {
        assert!(text.contains(kind), "{kind} missing");
    }
    // The oldest and newest Kubernetes the validator carries schemas for.
    for version in ["1.25.0", "1.37.0"] {
        validate(&manifest, version).unwrap_or_else(|e| panic!("Kubernetes {version}: {e}"));
    }
    // Broken copies must be refused: a wrong type, an unknown field, a missing required one.
    let dir = temp_dir("k8s");
    for (from, to) in [
        ("hostPID: true", "hostPID: \"yes\""),
        ("hostPID: true", "hostPid: true"),
        ("containerPort: 9977", "containerPort: \"9977\""),
        ("      containers:", "      container:"),
    ] {
        assert!(text.contains(from), "{from}");
        let bad = dir.path().join("bad.yaml");
        fs::write(&bad, text.replacen(from, to, 1)).expect("write");
        assert!(
            validate(&bad, "1.37.0").is_err(),
            "{from:?} -> {to:?} validated"
        );
    }
    // The pod gets the same capabilities as the systemd unit, no more.
    let mut added = BTreeSet::new();
    let mut in_add = false;
    for l in text.lines() {
        let t = l.split('#').next().unwrap_or("").trim();
        if t == "add:" {
            in_add = true;
        } else if in_add && let Some(cap) = t.strip_prefix("- ") {
            added.insert(format!("CAP_{cap}"));
        } else if in_add && !t.is_empty() {
            in_add = false;
        }
    }
    assert_eq!(added, unit_caps(&unit_text(), "CapabilityBoundingSet"));
    assert!(text.contains("- ALL"), "capabilities are not dropped first");

    // The PrometheusRule is a custom resource (monitoring.coreos.com/v1): the validator has no
    // schema for it and only warns, exit 0, which would pass anything. tests/alerts.rs checks it
    // instead (read as YAML, the same groups as deploy/alerts.yaml, which promtool checks and
    // tests). Should the validator learn the kind, this says to validate it here.
    let rule = repo().join("deploy/kubernetes/prometheusrule.yaml");
    let out = Command::new(kubernetes_validate())
        .args(["--strict", "-k", "1.37.0"])
        .arg(&rule)
        .output()
        .expect("run kubernetes-validate");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("Couldn't find schema for kind PrometheusRule"),
        "kubernetes-validate now knows PrometheusRule: validate {} with it: {said}",
        rule.display()
    );
}
