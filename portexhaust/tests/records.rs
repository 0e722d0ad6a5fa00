//! Old records still report: records written by an earlier `trace --record` (checked in with
//! what `report --format json` said about them then) must give the same offenders, holders,
//! destinations and totals now. No privileges needed.
use std::{path::Path, process::Command};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_portexhaust");

fn fixtures() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/records"
    ))
}

fn report(files: &[&str]) -> Value {
    let out = Command::new(BIN)
        .current_dir(fixtures())
        .arg("report")
        .args(files)
        .args(["--format", "json"])
        .output()
        .expect("run portexhaust report");
    assert!(
        out.status.success(),
        "report {files:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("report JSON")
}

fn golden(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("golden report");
    serde_json::from_str(&text).expect("golden JSON")
}

/// The parts of a report that must not change: who failed, who holds, how full, how many.
const KEPT: &[&str] = &[
    "offenders",
    "holders",
    "destinations",
    "failures_total",
    "dropped_events",
    "recorded_events",
    "complete",
    "first_failure_ts",
    "last_failure_ts",
    "peak_per_s",
    "peak_ts",
];

fn same(files: &[&str], golden_name: &str) {
    let now = report(files);
    let then = golden(golden_name);
    for key in KEPT {
        assert_eq!(
            now[key], then[key],
            "{files:?}: `{key}` differs from {golden_name}"
        );
    }
    let counts = |r: &Value| r["timeline"]["counts"].clone();
    assert_eq!(counts(&now), counts(&then), "{files:?}: timeline");
}

#[test]
fn a_churn_then_fail_record_reports_as_it_did() {
    same(
        &["v1-churn-then-fail.ndjson"],
        "v1-churn-then-fail.report.json",
    );
}

#[test]
fn a_storm_record_with_every_kind_reports_as_it_did() {
    same(&["v1-mixed-storm.ndjson"], "v1-mixed-storm.report.json");
}

#[test]
fn a_killed_record_reports_as_it_did() {
    same(&["v1-killed.ndjson"], "v1-killed.report.json");
}

#[test]
fn two_records_merge_as_they_did() {
    same(
        &["v1-churn-then-fail.ndjson", "v1-mixed-storm.ndjson"],
        "v1-churn+mixed.report.json",
    );
}
