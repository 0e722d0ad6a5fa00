//! Two tracers at once, as when a service runs and an engineer starts an ad-hoc `trace`: each
//! loads its own object (its own maps, nothing pinned), so both count every failure exactly,
//! and either can stop first without the other losing a count. Root; `cargo xtask test` runs
//! it. It panics rather than skips.
mod common;

use common::{Tracer, Workload, events_and_summary, require_root, temp_dir};
use serde_json::Value;

/// The failures of one comm in a summary.
fn failures_of(summary: &Value, comm: &str) -> u64 {
    summary["offenders"]
        .as_array()
        .map(|o| {
            o.iter()
                .filter(|o| o["comm"] == comm)
                .map(|o| o["failures"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// The summary a record ends with.
fn record_summary(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).expect("record");
    let last = text.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(last).expect("summary line");
    assert_eq!(v["type"], "summary", "the record ends with its summary");
    v
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn two_tracers_count_exactly_and_either_stops_first() {
    require_root();
    let dir = temp_dir("two-tracers");
    for service_stops_first in [true, false] {
        let record = dir
            .path()
            .join(format!("service-{service_stops_first}.ndjson"));
        let rec = record.to_str().expect("path");
        // The service: record and metrics, as the unit runs it. The engineer: plain --json.
        let service = Tracer::trace(&["--record", rec, "--metrics-addr", "127.0.0.1:0"]);
        let adhoc = Tracer::trace(&["--json", "--events-per-s", "0"]);
        let both = Workload::run("storm", 20_000, "pxh-f-two", &[]);
        assert!(both > 0, "the storm failed nothing");
        let (first, second) = if service_stops_first {
            (service, adhoc)
        } else {
            (adhoc, service)
        };
        let (out1, err1, code1) = first.stop();
        assert_eq!(code1, 0, "{err1}");
        // Only the tracer still running sees this one.
        let after = Workload::run("v4", 25, "pxh-f-after", &[]);
        let (out2, err2, code2) = second.stop();
        assert_eq!(code2, 0, "{err2}");
        let (service_sum, adhoc_sum) = if service_stops_first {
            (record_summary(&record), events_and_summary(&out2).1)
        } else {
            (record_summary(&record), events_and_summary(&out1).1)
        };
        let order = if service_stops_first {
            "service stopped first"
        } else {
            "ad-hoc stopped first"
        };
        assert_eq!(
            failures_of(&service_sum, "pxh-f-two"),
            both,
            "{order}: the service's count"
        );
        assert_eq!(
            failures_of(&adhoc_sum, "pxh-f-two"),
            both,
            "{order}: the ad-hoc tracer's count"
        );
        // The one still running kept counting after the other detached.
        let (still, gone) = if service_stops_first {
            (&adhoc_sum, &service_sum)
        } else {
            (&service_sum, &adhoc_sum)
        };
        assert_eq!(failures_of(still, "pxh-f-after"), after, "{order}");
        assert_eq!(failures_of(gone, "pxh-f-after"), 0, "{order}");
        let _ = (out1, out2);
    }
}
