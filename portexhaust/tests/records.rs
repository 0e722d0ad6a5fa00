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

/// `then` is kept in `now`: every field `then` has, `now` has with the same value (objects
/// recursively, arrays element by element and of the same length, numbers as numbers, and a
/// `null` may be left out). `now` may add fields: later versions say more.
fn kept(then: &Value, now: &Value, path: &str) -> Result<(), String> {
    match (then, now) {
        (Value::Null, Value::Null) => Ok(()),
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => kept(v, w, &format!("{path}.{k}"))?,
                    None if v.is_null() => {}
                    None => return Err(format!("{path}.{k}: missing (was {v})")),
                }
            }
            Ok(())
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return Err(format!("{path}: {} entries, was {}", b.len(), a.len()));
            }
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                kept(v, w, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => Ok(()),
        (a, b) if a == b => Ok(()),
        (a, b) => Err(format!("{path}: {b}, was {a}")),
    }
}

fn same(files: &[&str], golden_name: &str) {
    let now = report(files);
    let then = golden(golden_name);
    for key in KEPT {
        if let Err(e) = kept(&then[key], &now[key], key) {
            panic!("{files:?} against {golden_name}: {e}");
        }
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
