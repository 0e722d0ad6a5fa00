//! Bad input: missing, empty, binary and foreign files, hand-edited and cut lines, records
//! without a header. Each is one clear problem, never a panic, and the rest still counts.
use std::io::Cursor;

use super::tests::{failure, header, ndjson, one, problem_texts, replayed, ts};
use crate::{
    engine::session::{Filter, Replay},
    schema::{Level, Problem, read::read_file},
};

fn unusable(name: &str, data: &[u8]) -> String {
    let (f, _, problems) = replayed(name, Cursor::new(data));
    assert!(!f.usable, "{name}");
    problems
        .iter()
        .filter(|p| p.level == Level::Error)
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn empty_binary_foreign_and_missing_files_are_clear_errors() {
    assert_eq!(
        unusable("e.ndjson", b""),
        "e.ndjson: is empty: no header, nothing to report"
    );
    assert!(
        unusable("b.bin", b"\x7fELF\x02\x01\x01\x00\x00\x00").starts_with("b.bin: binary data")
    );
    assert!(unusable("p.pcap", &[0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0]).contains("binary data"));
    assert!(unusable("c.csv", b"time,pid\n1,2\n").starts_with("c.csv: line 1 is not JSON"));
    assert!(unusable("w.ndjson", b"\n\n  \n").contains("no portexhaust records"));
    assert!(unusable("j.ndjson", b"{\"a\":1}\n[1,2]\n").contains("no portexhaust records"));
    let mut problems = Vec::new();
    let f = read_file(
        std::path::Path::new("/nonexistent/rec.ndjson"),
        &mut Replay::new(Filter::default()),
        &mut problems,
    );
    assert!(!f.usable);
    assert!(
        problems[0]
            .to_string()
            .starts_with("/nonexistent/rec.ndjson: cannot open: No such file"),
        "{:?}",
        problems
    );
}

#[test]
fn hand_edited_lines_are_reported_by_line_and_the_rest_is_used() {
    let data = [
        header("h1", 10, 0).to_string(),
        failure(7, "app", "10.0.0.1:80", 99, 1).to_string(),
        "{\"type\":\"failure\",\"pid\":7}".into(),
        "not json at all".into(),
        "[1,2,3]".into(),
        "{\"type\":\"telemetry\"}".into(),
        "{\"pid\":1}".into(),
        failure(7, "app", "10.0.0.1:80", 99, 2)
            .to_string()
            .replace(&ts(2), "yesterday"),
        "{\"type\":\"snapshot\",\"ts\":\"x\"}".into(),
        "\u{0}\u{1}binary".into(),
        failure(7, "app", "10.0.0.1:80", 99, 3).to_string(),
        String::new(),
    ]
    .join("\n");
    let r = one(&data);
    assert_eq!(r.failures_total, 2);
    let p = problem_texts(&r);
    let want = [
        "rec.ndjson:3: failure record: missing field `ts` (skipped)",
        "rec.ndjson:4: not valid JSON: expected ident (skipped)",
        "rec.ndjson:5: not a JSON object (skipped)",
        "rec.ndjson:6: unknown record type \"telemetry\" (skipped)",
        "rec.ndjson:7: record without a \"type\" (skipped)",
        "rec.ndjson:8: failure record: bad timestamp \"yesterday\" (skipped)",
        "rec.ndjson:9: snapshot record: bad timestamp \"x\" (skipped)",
        "rec.ndjson:10: binary data, not a JSON line (skipped)",
    ];
    assert_eq!(p, want);
}

#[test]
fn a_tail_of_nuls_after_a_crash_is_tolerated() {
    let mut data =
        ndjson(&[header("h1", 10, 0), failure(7, "app", "10.0.0.1:80", 99, 1)]).into_bytes();
    data.extend_from_slice(&[0u8; 4096]);
    let (f, sessions, problems) = replayed("crash", Cursor::new(data));
    assert!(f.usable);
    assert_eq!(sessions[0].recorded, 1);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].level, Level::Note);
    assert!(
        problems[0]
            .to_string()
            .starts_with("crash:3: the file ends in binary data")
    );
}

#[test]
fn bad_lines_beyond_twenty_are_counted_not_listed() {
    let mut data = header("h1", 10, 0).to_string() + "\n";
    for _ in 0..50 {
        data.push_str("garbage\n");
    }
    let r = one(&data);
    assert_eq!(r.problems.len(), 21);
    assert_eq!(
        r.problems[20].to_string(),
        "rec.ndjson: 30 more bad lines not shown"
    );
}

#[test]
fn records_without_a_header_are_still_reported() {
    let data = ndjson(&[
        failure(7, "app", "10.0.0.1:80", 99, 1),
        failure(7, "app", "10.0.0.1:80", 99, 2),
    ]);
    let r = one(&data);
    assert_eq!(r.failures_total, 2);
    assert_eq!(
        problem_texts(&r),
        ["rec.ndjson:1: records before any header: reported without host and settings"]
    );
    assert_eq!(r.sessions[0].host, "?");
}

#[test]
fn a_broken_header_keeps_its_events() {
    let data = format!(
        "{}\n{}\n",
        r#"{"type":"header","version":1,"host":42,"sysctls":"x"}"#,
        failure(7, "app", "10.0.0.1:80", 99, 2)
    );
    let r = one(&data);
    assert_eq!(r.failures_total, 1);
    assert!(problem_texts(&r)[0].starts_with("rec.ndjson:1: header: invalid type"));
}
