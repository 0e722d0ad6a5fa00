//! Call sites, for real: a client whose `fetch_orders_leaky()` opens a connection per call and
//! never closes it, while `fetch_orders_pooled()` reuses one, runs its own network namespace
//! (200 ports) out of ports. The trace summary, and the report of its record in text, JSON and
//! HTML, must name the leaky function as the call site of the holders and of the failures,
//! with the failures counted exactly, and must not blame the pooled one. Once with a C client
//! built with symbols and frame pointers, once with node and its perf map. Root; `cargo xtask
//! test` runs it. It panics rather than skips.
mod common;

use std::{
    io::{BufRead, BufReader},
    process::{ChildStdin, Command, Stdio},
};

use common::{
    Guard, Tracer, events_and_summary, repo, report, report_json, require_root, temp_dir,
};
use serde_json::Value;

const PORTS: u16 = 200;
const DPORT: &str = "5000";

/// A client in a fresh network namespace with a `PORTS`-port range, once it has printed its
/// report (it then holds its sockets until stdin closes). Killed on drop.
struct Client {
    _guard: Guard,
    _stdin: ChildStdin,
    report: Value,
}

fn client(argv: &[&str], cwd: &std::path::Path) -> Client {
    let hi = 40000 + PORTS - 1;
    // The range is set inside the namespace the shell has just entered, never on the host.
    let script = format!(
        "ip link set lo up && echo '40000 {hi}' > /proc/sys/net/ipv4/ip_local_port_range \
         && exec \"$@\""
    );
    let mut child = Command::new("unshare")
        .args(["--net", "sh", "-c", &script, "sh"])
        .args(argv)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the client under unshare --net");
    let stdin = child.stdin.take().expect("stdin");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let guard = Guard(child);
    let mut line = String::new();
    out.read_line(&mut line).expect("client report");
    let report: Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("client report {line:?}: {e}"));
    Client {
        _guard: guard,
        _stdin: stdin,
        report,
    }
}

fn sites(v: &Value) -> Vec<Value> {
    v["call_sites"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.get("item").cloned().unwrap_or(s))
        .collect()
}

fn names(site: &Value, function: &str) -> bool {
    site["frames"].as_array().is_some_and(|f| {
        f.iter().any(|fr| {
            fr["function"]
                .as_str()
                .is_some_and(|n| n.contains(function))
        })
    })
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The checks every output must pass: the leaky call site has every failure and nearly every
/// held socket, the pooled one neither.
fn check(what: &str, v: &Value, pid: u64, leaky: &str, pooled: &str, c: &Value) {
    let all: Vec<Value> = sites(v).into_iter().filter(|s| s["pid"] == pid).collect();
    assert!(!all.is_empty(), "{what}: no call site of pid {pid}: {v}");
    let leaked = n(&c["leaked"]);
    let failures = n(&c["failures"]);
    let leaky_rows: Vec<&Value> = all.iter().filter(|s| names(s, leaky)).collect();
    assert!(
        !leaky_rows.is_empty(),
        "{what}: no row names {leaky}: {all:#?}"
    );
    let lf: u64 = leaky_rows.iter().map(|s| n(&s["failures"])).sum();
    assert_eq!(
        lf, failures,
        "{what}: {leaky}'s failures, exactly: {all:#?}"
    );
    let total_failures: u64 = all.iter().map(|s| n(&s["failures"])).sum();
    assert_eq!(
        total_failures, failures,
        "{what}: failures of all sites: {all:#?}"
    );
    // Every connect that reached port selection is counted once, on some site.
    let connects: u64 = all.iter().map(|s| n(&s["connects"])).sum();
    assert_eq!(
        connects,
        leaked + failures + 1,
        "{what}: connects: {all:#?}"
    );
    let held = |s: &&Value| n(&s["holds_established"]) + n(&s["holds_time_wait"]);
    let lh: u64 = leaky_rows.iter().map(held).sum();
    assert!(
        lh * 100 >= leaked * 95,
        "{what}: {leaky} holds {lh} of its {leaked} sockets: {all:#?}"
    );
    for s in all.iter().filter(|s| names(s, pooled)) {
        assert_eq!(n(&s["failures"]), 0, "{what}: {pooled} blamed: {s}");
        assert!(held(&s) <= 1, "{what}: {pooled} holds one socket: {s}");
    }
}

/// Trace the client `argv` (its command name `comm`), then check the summary and the report.
fn run(tag: &str, backend: &str, comm: &str, argv: &[&str], leaky: &str, pooled: &str) {
    let dir = temp_dir(tag);
    let record = dir.path().join("incident.ndjson");
    let rec = record.to_str().expect("path");
    let t = Tracer::trace(&[
        "--json",
        "--record",
        rec,
        "--comm",
        comm,
        "--backend",
        backend,
    ]);
    let c = client(argv, dir.path());
    let pid = n(&c.report["pid"]);
    // A JIT's perf map outlives its process: removed with the test.
    let _map = Cleanup(std::path::PathBuf::from(format!("/tmp/perf-{pid}.map")));
    assert!(
        n(&c.report["failures"]) > 0,
        "{tag}: no failure: {}",
        c.report
    );
    assert_eq!(
        n(&c.report["leaked"]),
        u64::from(PORTS) - 1,
        "{tag}: the leaky function fills the range less the pooled connection"
    );
    // Stopped while the client still holds its sockets: the summary's census sees them.
    let (out, err, code) = t.stop();
    drop(c._stdin);
    assert_eq!(code, 0, "{tag}: {err}");
    let (_, summary) = events_and_summary(&out);
    check(
        &format!("{tag} summary"),
        &summary,
        pid,
        leaky,
        pooled,
        &c.report,
    );

    let (r, err) = report_json(&[&record], &[]);
    check(
        &format!("{tag} report --format json"),
        &r,
        pid,
        leaky,
        pooled,
        &c.report,
    );
    assert!(err.is_empty() || !err.contains("error"), "{tag}: {err}");
    let (text, err, code) = report(&[rec]);
    assert_eq!(code, 0, "{tag}: {err}");
    let section = text
        .split("Call sites")
        .nth(1)
        .unwrap_or_else(|| panic!("{tag}: no call-site section:\n{text}"));
    let first = section.lines().nth(2).unwrap_or_default();
    assert!(
        first.contains(leaky),
        "{tag}: first call site {first:?}:\n{section}"
    );
    let (html, err, code) = report(&["--format", "html", rec]);
    assert_eq!(code, 0, "{tag}: {err}");
    assert!(
        html.contains("id=\"call-sites\"") && html.contains(leaky),
        "{tag}: html"
    );
}

/// Removes a file when the test ends, passed or failed.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn fixture(name: &str) -> String {
    repo()
        .join("portexhaust/tests/fixtures/callsites")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_c_client_names_its_leaky_function() {
    require_root();
    let dir = temp_dir("callsites-cc");
    // Frame pointers: the kernel walks user stacks by them.
    let bin = dir.path().join("pxh-cs-client");
    let status = Command::new("cc")
        .args(["-g", "-O1", "-fno-omit-frame-pointer", "-o"])
        .arg(&bin)
        .arg(fixture("client.c"))
        .status()
        .expect("cc");
    assert!(status.success(), "compiling the client");
    let bin = bin.to_str().expect("path");
    // Every backend here: each has its own program for the stack walk, and the verifier
    // judges each on its own.
    for backend in common::backends_here() {
        run(
            &format!("callsites-c-{backend}"),
            &backend,
            "pxh-cs-client",
            &[bin, DPORT, "40"],
            "fetch_orders_leaky",
            "fetch_orders_pooled",
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_node_client_names_its_leaky_function_from_the_perf_map() {
    require_root();
    let script = fixture("client.js");
    run(
        "callsites-node",
        "auto",
        "node",
        &[
            "node",
            "--perf-basic-prof",
            "--interpreted-frames-native-stack",
            "--no-deprecation",
            // --perf-basic-prof also opens a V8 log per isolate; nothing is logged to it.
            "--logfile=/dev/null",
            &script,
            DPORT,
            "30",
        ],
        "fetchOrdersLeaky",
        "fetchOrdersPooled",
    );
}
