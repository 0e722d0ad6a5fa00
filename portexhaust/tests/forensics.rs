//! Incident forensics end to end: `trace --record` on real exhaustion in private network
//! namespaces, a tracer killed with SIGKILL, and `report` on what it left (the HTML report is
//! in report_html.rs, `doctor` in doctor.rs).
//!
//! The tests need root (eBPF, namespaces); `cargo xtask test` runs them one at a time. They
//! panic rather than skip when they cannot run.
mod common;

use std::{os::unix::fs::PermissionsExt, path::Path, thread, time::Duration};

use common::{Tracer, Workload, report, report_json, require_root, wait_for};
use serde_json::{Value, json};

/// The complete lines of a record so far, parsed (a line being written is ignored).
fn record_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn count_type(lines: &[Value], kind: &str) -> usize {
    lines.iter().filter(|v| v["type"] == kind).count()
}

/// Failures that reached the record: one line each, or tallied in `tally` lines once the
/// per-second cap was reached.
fn flushed_failures(lines: &[Value]) -> u64 {
    let tallied: u64 = lines
        .iter()
        .filter(|v| v["type"] == "tally")
        .filter_map(|v| v["count"].as_u64())
        .sum();
    count_type(lines, "failure") as u64 + tallied
}

fn offender<'a>(r: &'a Value, comm: &str) -> &'a Value {
    r["offenders"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["comm"] == comm))
        .unwrap_or_else(|| panic!("no offender {comm}: {r}"))
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_recording_killed_between_snapshots_still_reports_exact_counts() {
    require_root();
    let dir = tempfile::tempdir().expect("tmp");
    let rec = dir.path().join("incident.ndjson");
    let rec_s = rec.display().to_string();
    // Only these workloads: other tests and helpers may exhaust ports on this machine too.
    let t = Tracer::trace(&[
        "--record",
        &rec_s,
        "--snapshot-interval",
        "8",
        "--comm",
        "pxh-f-tw",
        "--comm",
        "pxh-f-v4",
    ]);
    assert_eq!(
        std::fs::metadata(&rec)
            .expect("record")
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "the record is private"
    );

    // Phase 1: TIME_WAIT exhaustion (tcp_tw_reuse=0 in its namespace), counted by a snapshot.
    // The namespace lingers until the tracer has read its settings from inside it (a loaded
    // machine may take longer than the failures do; a namespace gone first is not described).
    let mut w = Workload::lingering(&[
        "--scenario",
        "timewait",
        "--failures",
        "2000",
        "--comm",
        "pxh-f-tw",
        "--ports",
        "16",
    ]);
    w.go();
    let k1 = common::expected_failures(&w.report());
    assert_eq!(k1, 2000);
    wait_for("the namespace's settings", Duration::from_secs(10), || {
        record_lines(&rec).iter().any(|v| v["type"] == "sysctls")
    });
    w.release();
    // Snapshots are 8 s apart: phase 2 and the kill fit between two even on a loaded machine.
    wait_for(
        "a snapshot that counted phase 1",
        Duration::from_secs(20),
        || {
            record_lines(&rec)
                .iter()
                .any(|v| v["type"] == "snapshot" && v["failures_total"] == k1)
        },
    );
    // Phase 2 right after that snapshot: flushed as failure lines (within a second) long
    // before the next snapshot is due.
    let k2 = Workload::run("v4", 25, "pxh-f-v4", &[]);
    assert_eq!(k2, 25);
    wait_for("phase 2 flushed", Duration::from_secs(5), || {
        flushed_failures(&record_lines(&rec)) == k1 + k2
    });
    let (_, err, code) = t.signal(libc::SIGKILL);
    assert_eq!(code, -libc::SIGKILL, "{err}");

    let lines = record_lines(&rec);
    assert_eq!(lines[0]["type"], "header");
    assert_eq!(lines[0]["version"], 2);
    assert_eq!(count_type(&lines, "summary"), 0, "killed: no summary");
    let last_snap = lines
        .iter()
        .rev()
        .find(|v| v["type"] == "snapshot")
        .expect("snapshot");
    assert_eq!(
        last_snap["failures_total"], k1,
        "the kill must fall between snapshots for this test to mean anything"
    );
    // The workload's namespace was described from inside it.
    let sysctls = lines
        .iter()
        .find(|v| v["type"] == "sysctls")
        .expect("settings of the workload namespace");
    let ns = sysctls["netns"].as_u64().expect("netns").to_string();
    assert_eq!(sysctls["sysctls"][&ns]["tcp_tw_reuse"], 0);
    assert_eq!(
        sysctls["sysctls"][&ns]["ip_local_port_range"],
        json!([40000, 40015])
    );

    let (r, err) = report_json(&[&rec], &[]);
    assert_eq!(r["failures_total"], k1 + k2, "{r}\n{err}");
    assert_eq!(r["complete"], false);
    assert_eq!(r["sessions"][0]["counts_from"], "snapshot_and_events");
    assert_eq!(offender(&r, "pxh-f-tw")["failures"], k1);
    assert_eq!(offender(&r, "pxh-f-v4")["failures"], k2);
    assert_eq!(
        offender(&r, "pxh-f-v4")["destinations"][0],
        json!({"dst":"127.0.0.1:5000","errno":99,"errname":"EADDRNOTAVAIL","cause":"exhausted","failures":25})
    );
    assert_eq!(
        r["timeline"]["counts"]
            .as_array()
            .map(|c| c.iter().filter_map(Value::as_u64).sum::<u64>()),
        Some(k1 + k2)
    );
    // Settings and findings of the TIME_WAIT namespace: the range and tcp_tw_reuse=0.
    let ns_n: u64 = ns.parse().expect("ns");
    let ids: Vec<(&str, &str)> = r["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["netns"] == ns_n)
        .map(|f| {
            (
                f["id"].as_str().unwrap_or(""),
                f["severity"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(ids.contains(&("tcp_tw_reuse", "critical")), "{ids:?}");
    assert!(
        ids.contains(&("ip_local_port_range", "critical")),
        "{ids:?}"
    );
    assert!(
        ids.contains(&("connect_eaddrnotavail", "critical")),
        "{ids:?}"
    );
    // The census of that namespace saw every port in TIME_WAIT.
    let tw_row = r["destinations"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|d| d["netns"] == ns_n)
        .expect("row of the TIME_WAIT namespace");
    assert_eq!(tw_row["by_state"]["TIME_WAIT"], 16);

    // --pid and the text form.
    let pid = offender(&r, "pxh-f-v4")["pid"].to_string();
    let (by_pid, _) = report_json(&[&rec], &["--pid", &pid]);
    assert_eq!(by_pid["failures_total"], k2);
    let (text, _, code) = report(&[&rec_s]);
    assert_eq!(code, 0);
    assert!(text.contains("2025 exhaustion failures"), "{text}");
    assert!(text.contains("sysctl -w net.ipv4.tcp_tw_reuse=1"), "{text}");

    // A line cut by the kill is tolerated and named.
    let cut = dir.path().join("cut.ndjson");
    let mut data = std::fs::read(&rec).expect("read");
    data.extend_from_slice(br#"{"type":"failure","ts":"2026-11-25T11:"#);
    std::fs::write(&cut, &data).expect("write");
    let (r2, err2) = report_json(&[&cut], &[]);
    assert_eq!(r2["failures_total"], k1 + k2);
    assert!(
        err2.contains("cut.ndjson:") && err2.contains("the last line is cut off"),
        "{err2}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn killed_before_the_first_snapshot_counts_exactly_the_flushed_failures() {
    require_root();
    let dir = tempfile::tempdir().expect("tmp");
    let rec = dir.path().join("storm.ndjson");
    let rec_s = rec.display().to_string();
    let t = Tracer::trace(&[
        "--record",
        &rec_s,
        "--snapshot-interval",
        "3600",
        "--comm",
        "pxh-f-storm",
    ]);
    let n = Workload::run("storm", 20_000, "pxh-f-storm", &[]);
    assert_eq!(n, 20_000);
    // Wait until the record stops growing (everything drained and flushed), then kill.
    let mut last = u64::MAX;
    wait_for("the record to settle", Duration::from_secs(20), || {
        thread::sleep(Duration::from_millis(1200));
        let now = flushed_failures(&record_lines(&rec));
        let settled = now == last && now > 0;
        last = now;
        settled
    });
    let (_, err, code) = t.signal(libc::SIGKILL);
    assert_eq!(code, -libc::SIGKILL, "{err}");
    let lines = record_lines(&rec);
    assert_eq!(count_type(&lines, "snapshot"), 0);
    let flushed = flushed_failures(&lines);
    // The disk stays bounded in a storm: at most --record-events-per-s lines a second, the
    // rest tallied per process and destination.
    let one_by_one = count_type(&lines, "failure") as u64;
    assert!(
        one_by_one < n / 4,
        "{one_by_one} failure lines for a {n}-failure storm"
    );
    assert!(count_type(&lines, "tally") >= 1);
    let (r, err) = report_json(&[&rec], &[]);
    assert_eq!(r["failures_total"], flushed, "{err}");
    assert_eq!(r["sessions"][0]["counts_from"], "events");
    assert_eq!(offender(&r, "pxh-f-storm")["failures"], flushed);
    // The ring buffer may drop under a storm (counted only in the kernel); without a snapshot
    // those are unknowable, so the report can only be exact for what was flushed.
    assert!(flushed <= n && flushed > 0, "{flushed} of {n}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_clean_stop_appends_snapshot_and_summary_and_two_runs_merge() {
    require_root();
    let dir = tempfile::tempdir().expect("tmp");
    let rec = dir.path().join("clean.ndjson");
    let rec_s = rec.display().to_string();
    let mut totals = 0;
    for round in 0..2 {
        // The same file twice: the second run appends a new session.
        let t = Tracer::trace(&["--record", &rec_s, "--comm", "pxh-f-clean"]);
        totals += Workload::run("v4", 7 + round, "pxh-f-clean", &[]);
        let (_, err, code) = t.signal(libc::SIGTERM);
        assert_eq!(code, 0, "{err}");
    }
    let lines = record_lines(&rec);
    assert_eq!(count_type(&lines, "header"), 2);
    assert_eq!(count_type(&lines, "summary"), 2);
    assert_eq!(
        lines.last().map(|l| l["type"].clone()),
        Some(json!("summary"))
    );
    let (r, err) = report_json(&[&rec], &[]);
    assert_eq!(r["failures_total"], totals, "{err}");
    assert_eq!(r["complete"], true);
    assert_eq!(r["sessions"].as_array().map(Vec::len), Some(2));
    assert!(
        r["sessions"]
            .as_array()
            .expect("s")
            .iter()
            .all(|s| s["counts_from"] == "summary")
    );
    // Two workload processes, one per session, each with its own exact count.
    let per_run: Vec<u64> = r["offenders"]
        .as_array()
        .expect("offenders")
        .iter()
        .filter(|o| o["comm"] == "pxh-f-clean")
        .filter_map(|o| o["failures"].as_u64())
        .collect();
    assert_eq!(per_run, [8, 7]);
}
