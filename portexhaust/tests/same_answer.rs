//! One model of the data, for real: what `trace --json` says when it stops is what `report`
//! says afterwards, from the record `trace --record` wrote at the same time and from the
//! `--json` output itself. Root, real exhaustion in a private namespace; `cargo xtask test`
//! runs it. It panics rather than skips.
mod common;

use common::{Tracer, Workload, events_and_summary, require_root};
use serde_json::Value;

fn report_of(path: &std::path::Path) -> Value {
    let out = std::process::Command::new(common::BIN)
        .arg("report")
        .arg(path)
        .args(["--format", "json"])
        .output()
        .expect("run report");
    assert!(
        out.status.success(),
        "report {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("report JSON")
}

/// A report's per-host list without the host: the trace summary's list.
fn without_host(v: &Value) -> Value {
    let mut v = v.clone();
    for e in v.as_array_mut().expect("a list").iter_mut() {
        e.as_object_mut().expect("an object").remove("host");
    }
    v
}

fn same_answer(summary: &Value, report: &Value, what: &str) {
    for key in [
        "failures_total",
        "dropped_events",
        "uncounted_keys",
        "lru_evictions",
    ] {
        assert_eq!(report[key], summary[key], "{what}: {key}");
    }
    assert_eq!(
        without_host(&report["offenders"]),
        summary["offenders"],
        "{what}: offenders"
    );
    assert_eq!(
        without_host(&report["blame"]),
        summary["blame"],
        "{what}: blame"
    );
    assert_eq!(report["complete"], true, "{what}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn trace_summary_and_report_of_its_record_say_the_same() {
    require_root();
    let dir = common::temp_dir("same");
    let rec = dir.path().join("rec.ndjson");
    // A churner leaves 12 TIME_WAIT sockets, then 8 connects fail; the namespace lingers so
    // the summary still sees who holds the ports.
    let mut w = Workload::lingering(&[
        "--scenario",
        "churn-then-fail",
        "--ports",
        "12",
        "--failures",
        "8",
        "--comm",
        "pxh-t-same",
    ]);
    let pid = w.pid.to_string();
    let rec_s = rec.display().to_string();
    let t = Tracer::trace(&["--json", "--record", &rec_s, "--pid", &pid]);
    w.go();
    let report = w.report();
    let (out, err, code) = t.stop();
    w.release();
    assert_eq!(code, 0, "{err}");
    let (_, summary) = events_and_summary(&out);

    // The summary is not empty, or the comparison would prove nothing.
    assert_eq!(summary["failures_total"], 8, "{summary}");
    assert_eq!(summary["offenders"][0]["pid"], report["pid"], "{summary}");
    let holders = &summary["blame"][0]["holders"];
    assert_eq!(holders[0]["pid"], report["churner_pid"], "{summary}");
    assert_eq!(
        summary["uncounted_keys"], 0,
        "drift bug 1: the summary keeps it"
    );

    same_answer(&summary, &report_of(&rec), "the record");
    let json = dir.path().join("trace.ndjson");
    std::fs::write(&json, &out).expect("write the --json output");
    same_answer(&summary, &report_of(&json), "the --json output");
}
