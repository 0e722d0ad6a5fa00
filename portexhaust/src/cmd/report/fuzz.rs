//! Property tests: truncated, mutated and random bytes thrown at the reader and the report.
use std::io::Cursor;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::tests::{
    T0, failure, header, one, problem_texts, replayed, snapshot, summary, suppressed,
};
use crate::{
    engine::{report as model, session::Filter},
    output::{html, report_text as text},
    schema::{Level, Ts, read::MAX_LINE},
};

/// A simulated tracer: events with strictly increasing microsecond times; the kernel counts
/// each at once, the ring buffer hands them to the recorder later; snapshots are taken while
/// some events are still pending.
fn simulate(pids: &[u32], snaps: &[(usize, usize)]) -> (String, usize) {
    // snaps: (counted_up_to, written_before): written_before <= counted_up_to.
    let mut lines = vec![header("h", 1, 0).to_string()];
    let mut written = 0usize;
    let ev = |i: usize| failure(pids[i], "app", "10.0.0.1:80", 99, 0);
    let at = |i: usize| T0 + 1_000_000_000 + i as i128 * 1000; // 1 µs apart
    let line = |i: usize| {
        let mut v = ev(i);
        v["ts"] = Ts(at(i)).rfc3339().into();
        v.to_string()
    };
    for &(counted, before) in snaps {
        while written < before {
            lines.push(line(written));
            written += 1;
        }
        // Offenders as the kernel saw them: events 0..counted.
        let mut per: std::collections::BTreeMap<u32, (u64, usize, usize)> = Default::default();
        for (i, pid) in pids.iter().enumerate().take(counted) {
            let e = per.entry(*pid).or_insert((0, i, i));
            e.0 += 1;
            e.2 = i;
        }
        let offs: Vec<Value> = per
            .iter()
            .map(|(pid, (n, first, last))| {
                json!({"pid":pid,"comm":"app","failures":n,"first_ts":Ts(at(*first)).rfc3339(),
                    "last_ts":Ts(at(*last)).rfc3339(),
                    "destinations":[{"dst":"10.0.0.1:80","errno":99,"failures":n}]})
            })
            .collect();
        lines.push(
            json!({"type":"snapshot","ts":Ts(at(counted)).rfc3339(),"failures_total":counted,
                "dropped_events":0,"offenders":offs})
            .to_string(),
        );
    }
    while written < pids.len() {
        lines.push(line(written));
        written += 1;
    }
    (lines.join("\n") + "\n", pids.len())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let (_, sessions, problems) = replayed("fuzz", Cursor::new(data));
        let _ = model::build(vec![], sessions, &Filter::default(), problems);
    }

    #[test]
    fn random_json_lines_never_panic(lines in proptest::collection::vec(
        prop_oneof![
            Just(header("h", 1, 0).to_string()),
            Just(failure(1, "a", "1.2.3.4:5", 99, 3).to_string()),
            Just(snapshot(5, 3, 1, &[(1, "a", vec![("1.2.3.4:5", 99, 3)], 0, 3)]).to_string()),
            Just(summary(3, 1, 1.0, &[(1, "a", vec![("1.2.3.4:5", 99, 3)], 0, 3)]).to_string()),
            Just(suppressed(&[(1, "1.2.3.4:5", 4, 3, 9, false), (1, "1.2.3.4:5", 1, 1, 2, true)]).to_string()),
            "\\PC{0,60}",
            "\\{\"type\":\"(header|failure|snapshot|summary|sysctls)\"(,\"[a-z_]{1,12}\":(-?[0-9]{1,25}|\"\\PC{0,10}\"|null|\\[\\]|\\{\\}|true|1e400)){0,6}\\}",
        ], 0..40)) {
        let data = lines.join("\n");
        let (_, sessions, problems) = replayed("fuzz", Cursor::new(data.into_bytes()));
        let r = model::build(vec![], sessions, &Filter::default(), problems);
        let _ = text::render(&r);
        let _ = html::render(&r);
        let _ = serde_json::to_string(&r);
    }

    /// A record cut anywhere (SIGKILL during write) reports exactly the failure lines that
    /// reached the file whole.
    #[test]
    fn truncation_anywhere_counts_exactly_the_whole_lines(n in 1usize..60, cut_frac in 0.0f64..1.0) {
        let mut lines = vec![header("h", 1, 0).to_string()];
        for i in 0..n {
            lines.push(failure(7, "app", "10.0.0.1:80", 99, i as i64).to_string());
        }
        let data = lines.join("\n") + "\n";
        let header_len = lines[0].len() + 1;
        let cut = header_len + ((data.len() - header_len) as f64 * cut_frac) as usize;
        let prefix = &data[..cut];
        // Whole lines = those whose text is complete (the newline itself may be missing).
        let mut whole = 0;
        let mut pos = header_len;
        for l in &lines[1..] {
            if pos + l.len() <= cut { whole += 1; }
            pos += l.len() + 1;
        }
        let r = one(prefix);
        prop_assert_eq!(r.failures_total, whole as u64);
        prop_assert!(r.problems.iter().all(|p| p.level == Level::Note));
    }

    /// Killed at any point after any snapshots: the last snapshot plus the lines it had not
    /// counted equals every failure known at the end (no double counting of pending lines).
    #[test]
    fn snapshots_with_pending_events_are_never_double_counted(
        pids in proptest::collection::vec(1u32..4, 1..80),
        raw in proptest::collection::vec((0.0f64..1.0, 0.0f64..1.0), 0..4),
    ) {
        let n = pids.len();
        let mut snaps: Vec<(usize, usize)> = Vec::new();
        let mut last_counted = 0;
        let mut last_written = 0;
        for (a, b) in raw {
            let counted = (last_counted + ((n - last_counted) as f64 * a) as usize).max(last_written);
            let before = (last_written + ((counted - last_written) as f64 * b) as usize).min(counted);
            snaps.push((counted, before));
            last_counted = counted;
            last_written = before;
        }
        let (data, total) = simulate(&pids, &snaps);
        let r = one(&data);
        prop_assert_eq!(r.failures_total, total as u64);
        let per_pid: u64 = r.offenders.iter().map(|o| o.item.failures).sum();
        prop_assert_eq!(per_pid, total as u64);
    }
}

#[test]
fn line_longer_than_the_limit_is_skipped() {
    let mut data = header("h", 1, 0).to_string() + "\n";
    data.push_str(&"x".repeat(MAX_LINE + 10));
    data.push('\n');
    data.push_str(&failure(7, "a", "1.2.3.4:5", 99, 1).to_string());
    data.push('\n');
    let r = one(&data);
    assert_eq!(r.failures_total, 1);
    assert_eq!(
        problem_texts(&r),
        ["rec.ndjson:2: line longer than 4 MiB (skipped)"]
    );
}
