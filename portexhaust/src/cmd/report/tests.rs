//! Reader and report tests on hand-made records (no root needed); the property tests are in
//! fuzz.rs.
use std::io::Cursor;

use serde_json::{Value, json};

use crate::{
    engine::{
        report::{self as model, CountSource, FileOut, Report},
        session::{Filter, Replay, Session},
    },
    output::{html, report_text as text},
    schema::{
        Level, Problem, Ts,
        read::{FileRead, read_file, read_from},
    },
};

pub(super) const T0: i128 = 1_764_069_600_000_000_000; // 2025-11-25T11:20:00Z

fn at(ms: i64) -> Ts {
    Ts(T0 + i128::from(ms) * 1_000_000)
}

pub(super) fn ts(ms: i64) -> String {
    at(ms).rfc3339()
}

pub(super) fn header(host: &str, pid: u32, start_ms: i64) -> Value {
    json!({"type":"header","version":1,"host":host,"kernel":"6.18.0","start_ts":ts(start_ms),
        "backend":"tracepoint","pid":pid,"netns":100,
        "sysctls":{"100":{"ip_local_port_range":[32768,60999],"ip_local_reserved_ports":"",
            "tcp_tw_reuse":2,"tcp_fin_timeout":60,"tcp_max_tw_buckets":262144,"tcp_timestamps":1}},
        "census":[]})
}

pub(super) fn failure(pid: u32, comm: &str, dst: &str, errno: u32, ms: i64) -> Value {
    json!({"type":"failure","ts":ts(ms),"pid":pid,"tid":pid,"uid":0,"comm":comm,"cgroup_id":1,
        "netns":200,"family":"ipv4","proto":"tcp","dst":dst,"src":"127.0.0.1","errno":errno,
        "errname":"EADDRNOTAVAIL","site":"__inet_hash_connect","backend":"tracepoint"})
}

/// offenders: (pid, comm, [(dst, errno, n)], first_ms, last_ms)
type Off<'a> = (u32, &'a str, Vec<(&'a str, u32, u64)>, i64, i64);

fn offenders(offs: &[Off<'_>]) -> Value {
    Value::Array(
        offs.iter()
            .map(|(pid, comm, dests, first, last)| {
                let total: u64 = dests.iter().map(|d| d.2).sum();
                json!({"pid":pid,"comm":comm,"failures":total,"first_ts":ts(*first),
                    "last_ts":ts(*last),
                    "destinations":dests.iter().map(|(d,e,n)| json!({"dst":d,"errno":e,"failures":n})).collect::<Vec<_>>()})
            })
            .collect(),
    )
}

pub(super) fn snapshot(ms: i64, total: u64, dropped: u64, offs: &[Off<'_>]) -> Value {
    json!({"type":"snapshot","ts":ts(ms),"backend":"tracepoint","duration_s":1.0,
        "failures_total":total,"dropped_events":dropped,"offenders":offenders(offs)})
}

pub(super) fn summary(total: u64, dropped: u64, duration_s: f64, offs: &[Off<'_>]) -> Value {
    json!({"type":"summary","backend":"tracepoint","duration_s":duration_s,
        "failures_total":total,"dropped_events":dropped,"offenders":offenders(offs)})
}

pub(super) fn ndjson(lines: &[Value]) -> String {
    lines.iter().map(|v| format!("{v}\n")).collect()
}

fn report_of(files: &[(&str, &str)], filter: &Filter) -> Report {
    let mut problems = Vec::new();
    let mut outs = Vec::new();
    let mut replay = Replay::new(filter.clone());
    for (name, data) in files {
        let before = replay.sessions.len();
        let f = read_from(
            name,
            Cursor::new(data.as_bytes()),
            &mut replay,
            &mut problems,
        );
        outs.push(FileOut {
            path: f.path.clone(),
            usable: f.usable,
            lines: f.lines,
            sessions: replay.sessions.len() - before,
        });
    }
    model::build(outs, replay.finish(), filter, problems)
}

/// One input replayed: what the reader said of it, its sessions, and the problems.
pub(super) fn replayed(
    name: &str,
    data: impl std::io::Read,
) -> (FileRead, Vec<Session>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut replay = Replay::new(Filter::default());
    let f = read_from(name, data, &mut replay, &mut problems);
    (f, replay.finish(), problems)
}

pub(super) fn one(data: &str) -> Report {
    report_of(&[("rec.ndjson", data)], &Filter::default())
}

pub(super) fn problem_texts(r: &Report) -> Vec<String> {
    r.problems.iter().map(Problem::to_string).collect()
}

#[test]
fn a_clean_session_uses_the_summary_even_when_events_were_dropped() {
    let mut lines = vec![header("h1", 10, 0)];
    for i in 0..5 {
        lines.push(failure(7, "app", "10.0.0.1:80", 99, 100 + i));
    }
    // The kernel counted 8 (3 were dropped from the ring buffer).
    lines.push(snapshot(
        900,
        8,
        3,
        &[(7, "app", vec![("10.0.0.1:80", 99, 8)], 100, 104)],
    ));
    lines.push(summary(
        8,
        3,
        1.0,
        &[(7, "app", vec![("10.0.0.1:80", 99, 8)], 100, 104)],
    ));
    let r = one(&ndjson(&lines));
    assert!(r.problems.is_empty(), "{:?}", problem_texts(&r));
    assert_eq!(r.failures_total, 8);
    assert!(r.complete);
    assert_eq!(r.dropped_events, 3);
    assert_eq!(r.recorded_events, 5);
    assert_eq!(r.sessions[0].counts_from, CountSource::Summary);
    assert_eq!(r.offenders[0].item.failures, 8);
    assert_eq!(
        r.offenders[0].item.destinations[0].errno.name(),
        "EADDRNOTAVAIL"
    );
    // The recording lasted from 0 s to 1 s (duration_s of the summary).
    assert_eq!(r.timeline.counts, vec![5, 0]);
    assert_eq!(r.first_failure_ts, Some(at(100)));
}

#[test]
fn a_killed_tracer_is_counted_from_its_last_snapshot_plus_the_lines_it_had_not_counted() {
    let mut lines = vec![header("h1", 10, 0)];
    for i in 0..8 {
        lines.push(failure(7, "app", "10.0.0.1:80", 99, 100 + i));
    }
    // Counted 10 (pid 7 up to t=109) while lines for t=108,109 were still in the ring buffer.
    lines.push(snapshot(
        200,
        10,
        0,
        &[(7, "app", vec![("10.0.0.1:80", 99, 10)], 100, 109)],
    ));
    lines.push(failure(7, "app", "10.0.0.1:80", 99, 108)); // already counted
    lines.push(failure(7, "app", "10.0.0.1:80", 99, 109)); // already counted
    lines.push(failure(7, "app", "10.0.0.1:80", 99, 300)); // new
    lines.push(failure(7, "app", "10.0.0.1:81", 99, 301)); // new, new destination
    lines.push(failure(9, "other", "10.0.0.2:80", 99, 302)); // new pid
    let mut data = ndjson(&lines);
    data.push_str(r#"{"type":"failure","ts":"2025-11-25T11:2"#); // cut by SIGKILL
    let r = one(&data);
    assert_eq!(r.failures_total, 13);
    assert!(!r.complete);
    assert_eq!(r.sessions[0].counts_from, CountSource::SnapshotAndEvents);
    let app = &r
        .offenders
        .iter()
        .find(|o| o.item.pid == 7)
        .expect("pid 7")
        .item;
    assert_eq!(app.failures, 12);
    assert_eq!(app.destinations[0].failures, 11);
    assert_eq!(app.destinations[1].dst.to_string(), "10.0.0.1:81");
    assert_eq!(
        r.offenders
            .iter()
            .find(|o| o.item.pid == 9)
            .map(|o| o.item.failures),
        Some(1)
    );
    assert_eq!(r.recorded_events, 13);
    let p = problem_texts(&r);
    assert_eq!(
        p,
        vec!["rec.ndjson:16: the last line is cut off (the tracer stopped mid-write); ignored"]
    );
    assert_eq!(r.problems[0].level, Level::Note);
    assert!(
        r.sessions[0]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("plus 3 failure line(s)"))
    );
}

pub(super) fn suppressed(entries: &[(u32, &str, u64, i64, i64, bool)]) -> Value {
    json!({"type":"suppressed","ts":ts(0),"events":entries.iter().map(|(pid, dst, n, a, b, counted)| {
        let mut e = json!({"pid":pid,"comm":"app","netns":200,"dst":dst,"errno":99,"count":n,
            "first_ts":ts(*a),"last_ts":ts(*b)});
        if *counted { e["counted_by_snapshot"] = true.into(); }
        e
    }).collect::<Vec<_>>()})
}

#[test]
fn tallied_failures_count_like_lines_and_respect_the_snapshot() {
    let mut lines = vec![header("h1", 10, 0)];
    for i in 0..3 {
        lines.push(failure(7, "app", "10.0.0.1:80", 99, 100 + i));
    }
    lines.push(suppressed(&[(7, "10.0.0.1:80", 7, 103, 109, false)]));
    // Events-only so far: 3 lines + 7 tallied.
    assert_eq!(one(&ndjson(&lines)).failures_total, 10);
    lines.push(snapshot(
        1500,
        12,
        0,
        &[(7, "app", vec![("10.0.0.1:80", 99, 12)], 100, 111)],
    ));
    lines.push(suppressed(&[
        (7, "10.0.0.1:80", 2, 110, 111, true),
        (7, "10.0.0.1:80", 3, 2000, 2400, false),
        (7, "10.0.0.1:81", 4, 2100, 2200, false),
    ]));
    let r = one(&ndjson(&lines));
    assert!(r.problems.is_empty(), "{:?}", problem_texts(&r));
    assert_eq!(r.failures_total, 12 + 3 + 4);
    assert_eq!(r.recorded_events, 3 + 7 + 2 + 3 + 4);
    assert_eq!(r.offenders[0].item.destinations[1].failures, 4);
    // Timeline: 12 events in second 0, 7 in second 2.
    assert_eq!(r.timeline.counts, vec![12, 0, 7]);
    // Bad entries are named and skipped.
    let bad = ndjson(&[
        header("h1", 10, 0),
        json!({"type":"suppressed","events":[{"pid":1}, {"pid":1,"dst":"1.2.3.4:80","errno":99,"count":2,"first_ts":"no","last_ts":"no"}]}),
        json!({"type":"suppressed"}),
    ]);
    let r = one(&bad);
    assert_eq!(
        problem_texts(&r),
        [
            "rec.ndjson:2: suppressed entry 0: missing field `dst` (skipped)",
            "rec.ndjson:2: suppressed entry 1: bad timestamp \"no\" (skipped)",
            "rec.ndjson:3: suppressed record without an \"events\" array (skipped)",
        ]
    );
}

#[test]
fn killed_before_the_first_snapshot_counts_every_flushed_line() {
    let mut lines = vec![header("h1", 10, 0)];
    for i in 0..40 {
        lines.push(failure(7, "app", "10.0.0.1:80", 99, 100 + i * 30));
    }
    let r = one(&ndjson(&lines));
    assert_eq!(r.failures_total, 40);
    assert_eq!(r.sessions[0].counts_from, CountSource::Events);
    assert!(r.problems.is_empty());
    // 100 ms .. 1270 ms: seconds 0 and 1.
    assert_eq!(r.timeline.counts.iter().sum::<u64>(), 40);
    assert_eq!(r.timeline.counts.len(), 2);
    assert_eq!(r.peak_per_s, Some(30.0));
}

#[test]
fn an_unknown_version_is_refused_by_name_and_later_sessions_still_count() {
    let mut data = ndjson(&[
        json!({"type":"header","version":9,"host":"h","pid":1}),
        failure(7, "app", "10.0.0.1:80", 99, 1),
    ]);
    data.push_str(&ndjson(&[
        header("h", 2, 10),
        failure(7, "app", "10.0.0.1:80", 99, 20),
    ]));
    let r = one(&data);
    assert_eq!(r.failures_total, 1);
    let p = problem_texts(&r);
    assert!(
        p[0].starts_with("rec.ndjson:1: record version 9 is not supported"),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|x| x.contains("1 lines of unsupported sessions skipped"))
    );
}

#[test]
fn a_file_of_only_an_unknown_version_is_unusable() {
    let (f, _, problems) = replayed(
        "v9.ndjson",
        Cursor::new(b"{\"type\":\"header\",\"version\":9}\n".as_slice()),
    );
    assert!(!f.usable);
    assert_eq!(
        problems[0].to_string(),
        "v9.ndjson:1: record version 9 is not supported (this portexhaust reads versions 1 and 2); \
         this session is skipped"
    );
}

#[test]
fn several_files_are_merged_and_the_same_session_twice_is_counted_once() {
    let a = ndjson(&[
        header("h1", 10, 0),
        failure(7, "app", "10.0.0.1:80", 99, 1),
        summary(1, 0, 1.0, &[(7, "app", vec![("10.0.0.1:80", 99, 1)], 1, 1)]),
    ]);
    let b = ndjson(&[
        header("h2", 20, 0),
        failure(7, "other", "10.0.0.9:80", 99, 5),
        failure(7, "other", "10.0.0.9:80", 99, 6),
        summary(
            2,
            0,
            1.0,
            &[(7, "other", vec![("10.0.0.9:80", 99, 2)], 5, 6)],
        ),
    ]);
    let r = report_of(&[("a", &a), ("b", &b), ("a-copy", &a)], &Filter::default());
    assert_eq!(r.failures_total, 3);
    assert_eq!(r.sessions.len(), 2);
    // Same pid on two hosts: two offenders.
    assert_eq!(r.offenders.len(), 2);
    assert_eq!(r.offenders[0].host, "h2");
    assert_eq!(
        problem_texts(&r),
        ["a-copy:1: the same session as in a (host h1, tracer pid 10): counted once"]
    );
    assert_eq!(r.timeline.counts.iter().sum::<u64>(), 3);
}

#[test]
fn overlapping_sessions_of_one_host_are_flagged() {
    let a = ndjson(&[
        header("h1", 10, 0),
        failure(7, "app", "10.0.0.1:80", 99, 500),
    ]);
    let b = ndjson(&[
        header("h1", 11, 100),
        failure(7, "app", "10.0.0.1:80", 99, 500),
    ]);
    let r = report_of(&[("a", &a), ("b", &b)], &Filter::default());
    assert_eq!(r.failures_total, 2);
    assert!(problem_texts(&r)[0].starts_with("b:1: overlaps in time with the session of a"));
}

#[test]
fn pid_and_time_filters() {
    let mut lines = vec![header("h1", 10, 0)];
    for i in 0..10 {
        lines.push(failure(7, "app", "10.0.0.1:80", 99, i * 1000));
        lines.push(failure(8, "other", "10.0.0.1:80", 99, i * 1000 + 1));
    }
    lines.push(summary(
        25,
        0,
        10.0,
        &[
            (7, "app", vec![("10.0.0.1:80", 99, 12)], 0, 9000),
            (8, "other", vec![("10.0.0.1:80", 99, 13)], 1, 9001),
        ],
    ));
    let data = ndjson(&lines);
    let by_pid = report_of(
        &[("r", &data)],
        &Filter {
            pids: vec![8],
            ..Default::default()
        },
    );
    assert_eq!(by_pid.failures_total, 13, "summary counts of pid 8");
    assert_eq!(by_pid.offenders.len(), 1);
    assert_eq!(by_pid.timeline.counts.iter().sum::<u64>(), 10);
    // A window that cuts the session: failure lines inside it.
    let window = report_of(
        &[("r", &data)],
        &Filter {
            since: Some(Ts(T0 + 2_000_000_000)),
            until: Some(Ts(T0 + 4_500_000_000)),
            pids: vec![],
        },
    );
    assert_eq!(window.failures_total, 6);
    assert_eq!(window.sessions[0].counts_from, CountSource::Events);
    // A window around the whole session keeps the exact counts.
    let all = report_of(
        &[("r", &data)],
        &Filter {
            since: Some(Ts(T0 - 1)),
            until: Some(Ts(T0 + 60_000_000_000)),
            pids: vec![],
        },
    );
    assert_eq!(all.failures_total, 25);
}

#[test]
fn blame_and_destination_rows_become_holders_and_findings() {
    let mut h = header("h1", 10, 0);
    h["sysctls"] = json!({"200":{"ip_local_port_range":[40000,40009],"ip_local_reserved_ports":"",
        "tcp_tw_reuse":0,"tcp_fin_timeout":60,"tcp_max_tw_buckets":262144,"tcp_timestamps":1}});
    let mut snap = snapshot(
        200,
        3,
        0,
        &[(7, "app", vec![("127.0.0.1:5000", 99, 3)], 1, 3)],
    );
    snap["blame"] = json!([{"dst":"127.0.0.1:5000","netns":200,"range_size":10,"in_use":10,
        "by_state":{"TIME_WAIT":10},"failers":[{"pid":7,"comm":"app","failures":3}],
        "holders":[{"pid":5,"comm":"<b>churn</b>","alive":false,"sockets":10,"time_wait":10}]},
        {"dst": 5}]);
    let data = ndjson(&[
        h,
        failure(7, "app", "127.0.0.1:5000", 99, 1),
        failure(7, "app", "127.0.0.1:5000", 99, 2),
        failure(7, "app", "127.0.0.1:5000", 99, 3),
        snap,
    ]);
    let r = one(&data);
    assert_eq!(r.failures_total, 3);
    assert_eq!(r.holders.len(), 1);
    assert_eq!(r.holders[0].holder.comm, "<b>churn</b>");
    assert_eq!(r.holders[0].holder.time_wait, 10);
    assert!(problem_texts(&r)[0].starts_with("rec.ndjson:5: snapshot blame entry 1: invalid type"));
    assert_eq!(r.destinations[0].row.dst.to_string(), "127.0.0.1:5000");
    assert_eq!(r.destinations[0].row.utilisation, Some(1.0));
    let ids: Vec<&str> = r
        .findings
        .iter()
        .filter(|f| f.netns == Some(200))
        .map(|f| f.finding.id.as_str())
        .collect();
    for want in [
        "connect_eaddrnotavail",
        "destination",
        "ip_local_port_range",
        "tcp_tw_reuse",
    ] {
        assert!(ids.contains(&want), "{want} in {ids:?}");
    }
    // Renderings.
    let t = text::render(&r);
    assert!(t.contains("3 exhaustion failures"), "{t}");
    assert!(t.contains("<b>churn</b>"));
    assert!(t.contains("sysctl -w net.ipv4.tcp_tw_reuse=1"));
    let page = html::render(&r);
    assert!(page.contains("&lt;b&gt;churn&lt;/b&gt;") && !page.contains("<b>churn"));
    assert!(page.contains("<svg id=\"timeline-chart\""));
    assert_eq!(page.matches("<rect class=\"bar\"").count(), 1);
    let j: Value = serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parse");
    assert_eq!(j["type"], "report");
    assert_eq!(j["failures_total"], 3);
    assert_eq!(j["holders"][0]["pid"], 5);
    assert_eq!(j["destinations"][0]["dst"], "127.0.0.1:5000");
    assert!(j["findings"][0]["severity"].is_string());
}

#[test]
fn html_has_no_external_references() {
    let data = ndjson(&[header("h1", 10, 0), failure(7, "app", "10.0.0.1:80", 99, 1)]);
    let page = html::render(&one(&data));
    for bad in ["<script", "src=", "@import", "url(", "https://"] {
        assert!(!page.contains(bad), "{bad}");
    }
    // The only URL is the SVG namespace name, which is never fetched.
    assert_eq!(page.matches("http://").count(), 1);
}

#[test]
fn fixture_records_read_as_documented() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/records");
    let mut problems = Vec::new();
    let mut replay = Replay::new(Filter::default());
    let f = read_file(&dir.join("killed.ndjson"), &mut replay, &mut problems);
    assert!(f.usable);
    let sessions = replay.finish();
    let r = model::build(
        vec![FileOut {
            path: f.path.clone(),
            usable: true,
            lines: f.lines,
            sessions: sessions.len(),
        }],
        sessions,
        &Filter::default(),
        problems,
    );
    assert_eq!(r.failures_total, 12, "{:?}", problem_texts(&r));
    assert!(!r.complete);
}

// ---------------------------------------------------------------------------------------------
// Property tests.

/// The header of part `part` of run "r1" (a rotated record repeats the run's header).
fn part_header(part: u32) -> Value {
    let mut h = header("h1", 10, 0);
    h["version"] = json!(2);
    h["run_id"] = json!("r1");
    h["part"] = json!(part);
    h
}

#[test]
fn the_parts_of_a_rotated_run_are_one_session_whose_last_counts_win() {
    let off = |n: u64, last: i64| vec![(7u32, "app", vec![("10.0.0.1:80", 99u32, n)], 100, last)];
    let p0 = ndjson(&[
        part_header(0),
        failure(7, "app", "10.0.0.1:80", 99, 100),
        failure(7, "app", "10.0.0.1:80", 99, 101),
        snapshot(500, 2, 0, &off(2, 101)),
        failure(7, "app", "10.0.0.1:80", 99, 600),
    ]);
    let p1 = ndjson(&[
        part_header(1),
        failure(7, "app", "10.0.0.1:80", 99, 700),
        snapshot(900, 4, 0, &off(4, 700)),
        json!({"type":"gap","ts":ts(1500),"from_ts":ts(1000),"until_ts":ts(1500),
            "error":"No space left on device (os error 28)","lines":3,"failures":2,"snapshots":1}),
        json!({"type":"tally","ts":ts(1500),"pid":7,"comm":"app","proto":"tcp",
            "dst":"10.0.0.1:80","errno":99,"errname":"EADDRNOTAVAIL","cause":"exhausted",
            "count":2,"first_ts":ts(1100),"last_ts":ts(1200)}),
    ]);
    // Killed during part 1: its last snapshot (4, cumulative) plus the 2 tallied after it;
    // summing the snapshots of the parts would say 6 + 2.
    let r = report_of(
        &[("x.1", p0.as_str()), ("x", p1.as_str())],
        &Filter::default(),
    );
    assert_eq!(r.sessions.len(), 1, "{:?}", problem_texts(&r));
    assert_eq!(r.failures_total, 6);
    assert_eq!(r.recorded_events, 6);
    assert_eq!(r.sessions[0].counts_from, CountSource::SnapshotAndEvents);
    assert_eq!(r.sessions[0].more_files, ["x"]);
    assert_eq!(r.gaps.len(), 1);
    assert_eq!(r.gaps[0].file, "x");
    assert_eq!(r.gaps[0].line, Some(4));
    assert_eq!(
        problem_texts(&r),
        [format!(
            "x:4: a gap in the record from {} to {} (No space left on device (os error 28)): \
             3 line(s) not written, 1 snapshot(s) among them; the 2 failure(s) of those lines \
             are in the tally lines after it, and the counts stay exact",
            at(1000),
            at(1500)
        )]
    );
    let shown = text::render(&r);
    assert!(shown.contains("x.1:1 + x: h1"), "{shown}");
    // The same part twice is counted once; part 1 alone still has the run's counts.
    let twice = report_of(
        &[
            ("x.1", p0.as_str()),
            ("x.1 copy", p0.as_str()),
            ("x", p1.as_str()),
        ],
        &Filter::default(),
    );
    assert_eq!(twice.failures_total, 6);
    let alone = one(&p1);
    assert_eq!(alone.failures_total, 6);
    assert!(problem_texts(&alone)[0].contains("starts at part 1 of a rotated record"));
}
