//! Why each failure happened, for real: every cause the tracer names is produced by a real
//! workload in its own network namespace, and the failure lines, the summary's offenders and
//! the report of the `--json` output all carry it, with exact counts. Root; `cargo xtask test`
//! runs it, one at a time. It panics rather than skips.
mod common;

use common::{Tracer, Workload, events_and_summary, expected_failures, require_root, temp_dir};
use serde_json::Value;

/// Run `scenario` under `trace --json --catch all --pid P` on one backend: (its failure
/// lines, the summary, the whole output, the failures the workload saw).
fn traced(backend: &str, scenario: &str, comm: &str) -> (Vec<Value>, Value, String, u64) {
    let mut w = Workload::start(scenario, 6, comm, &[]);
    let pid = w.pid.to_string();
    let t = Tracer::trace(&[
        "--json",
        "--catch",
        "all",
        "--backend",
        backend,
        "--pid",
        &pid,
        "--events-per-s",
        "0",
    ]);
    w.go();
    let n = expected_failures(&w.finish());
    let (out, err, code) = t.stop();
    assert_eq!(code, 0, "{err}");
    let (events, summary) = events_and_summary(&out);
    (events, summary, out, n)
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn every_cause_is_produced_and_named() {
    require_root();
    let dir = temp_dir("causes");
    for backend in common::backends_here() {
        for (scenario, cause, errname) in [
            ("v4", "exhausted", "EADDRNOTAVAIL"),
            ("collision", "tuple_collision", "EADDRNOTAVAIL"),
            ("bind", "bind_exhausted", "EADDRINUSE"),
            ("udp", "autobind_exhausted", "EAGAIN"),
        ] {
            let what = format!("{backend} {scenario}");
            let (events, summary, out, n) = traced(&backend, scenario, "pxh-t-cause");
            assert!(n > 0, "{what}: the workload caused no failure");
            assert_eq!(
                events.len() as u64,
                n,
                "{what}: one line per failure\n{out}"
            );
            for e in &events {
                assert_eq!(e["cause"], cause, "{what}: {e}");
                assert_eq!(e["errname"], errname, "{what}: {e}");
            }
            let dests = &summary["offenders"][0]["destinations"];
            assert_eq!(dests.as_array().map(Vec::len), Some(1), "{what}: {summary}");
            assert_eq!(dests[0]["cause"], cause, "{what}: {summary}");
            assert_eq!(dests[0]["failures"], n, "{what}: {summary}");
            // The report of the stream says the same.
            let file = dir.path().join(format!("{backend}-{scenario}.ndjson"));
            std::fs::write(&file, &out).expect("write the --json output");
            let (r, err) = common::report_json(&[&file], &[]);
            assert_eq!(
                r["offenders"][0]["destinations"][0]["cause"], cause,
                "{what}: {err}"
            );
            if cause == "tuple_collision" {
                // Its own finding, with its own fix: widening the range would not help.
                let ids: Vec<&str> = r["findings"]
                    .as_array()
                    .expect("findings")
                    .iter()
                    .filter_map(|f| f["id"].as_str())
                    .collect();
                assert!(ids.contains(&"connect_tuple_collision"), "{what}: {ids:?}");
                assert!(!ids.contains(&"connect_eaddrnotavail"), "{what}: {ids:?}");
            }
        }
    }
}
