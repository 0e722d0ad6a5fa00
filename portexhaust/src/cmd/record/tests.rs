use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

use portexhaust_common::{Backend, Site};

use super::*;
use crate::{
    engine::report::CountSource,
    schema::{DestCount, Family, Offender, VERSION},
};

fn opts(path: &Path) -> RecordOptions {
    RecordOptions {
        path: path.to_path_buf(),
        snapshot_interval: Duration::from_secs(10),
        events_per_s: 1000,
        rotate: None,
    }
}

fn header() -> Header {
    Header {
        version: VERSION,
        host: Some("h".into()),
        kernel: Some("6.18".into()),
        start_ts: Some(Ts(1_764_069_600_000_000_000)),
        backend: Some(Backend::TpBtf),
        pid: Some(std::process::id()),
        netns: Some(4026531840),
        sysctls: BTreeMap::new(),
        census: Vec::new(),
        filters: None,
        tool: None,
        run_id: None,
        part: None,
    }
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[test]
fn header_is_written_at_once_and_the_file_is_private() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rec.ndjson");
    let r = Recorder::create(&opts(&path), &header()).expect("create");
    let meta = std::fs::metadata(&path).expect("meta");
    assert_eq!(meta.mode() & 0o777, 0o600);
    let l = lines(&path);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["type"], "header");
    assert_eq!(l[0]["version"], VERSION);
    assert_eq!(l[0]["backend"], "tp-btf");
    drop(r);
}

#[test]
fn snapshot_and_summary_lines() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rec.ndjson");
    let mut r = Recorder::create(&opts(&path), &header()).expect("create");
    let totals = Totals {
        failures_total: 3,
        ts: Some(Ts(1_764_069_601_000_000_000)),
        ..Totals::default()
    };
    r.snapshot(&totals);
    r.finish(&totals);
    let l = lines(&path);
    let kinds: Vec<&str> = l.iter().filter_map(|v| v["type"].as_str()).collect();
    assert_eq!(kinds, ["header", "snapshot", "snapshot", "summary"]);
    assert_eq!(l[1]["failures_total"], 3);
    assert_eq!(l[1]["ts"], "2025-11-25T11:20:01.000000Z");
    assert_eq!(
        l[1]["uncounted_keys"], 0,
        "drift bug 1: the summary keeps it"
    );
}

#[test]
fn appending_terminates_a_cut_line_and_tightens_permissions() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rec.ndjson");
    std::fs::write(
        &path,
        "{\"type\":\"header\",\"version\":1}\n{\"type\":\"fail",
    )
    .expect("w");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let r = Recorder::create(&opts(&path), &header()).expect("create");
    drop(r);
    let text = std::fs::read_to_string(&path).expect("read");
    let l: Vec<&str> = text.lines().collect();
    assert_eq!(l[1], "{\"type\":\"fail");
    assert!(l[2].starts_with("{\"type\":\"header\""), "{text}");
    assert_eq!(std::fs::metadata(&path).expect("m").mode() & 0o777, 0o600);
}

#[test]
fn unwritable_path_is_a_clear_error() {
    let e = Recorder::create(&opts(Path::new("/nonexistent-dir/x.ndjson")), &header())
        .err()
        .expect("error");
    let s = e.to_string();
    assert!(s.contains("/nonexistent-dir/x.ndjson"), "{s}");
}

fn failure_at(pid: u32, us: i128) -> Failure {
    Failure {
        ts: Ts(1_764_069_600_000_000_000 + us * 1000 + 7),
        pid,
        tid: pid,
        uid: 0,
        comm: "app".into(),
        cgroup_id: 1,
        netns: None,
        family: Family::Ipv4,
        proto: Proto::Tcp,
        dst: "10.0.0.1:80".parse().expect("addr"),
        src: None,
        container: None,
        nat: None,
        errno: Errno::EADDRNOTAVAIL,
        cause: portexhaust_common::Cause::Exhausted,
        site: Site::InetHashConnect,
        backend: Backend::Tracepoint,
    }
}

#[test]
fn failures_beyond_the_rate_are_tallied_exactly() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rec.ndjson");
    let mut o = opts(&path);
    o.events_per_s = 3;
    let mut r = Recorder::create(&o, &header()).expect("create");
    for us in 0..10 {
        r.failure(&failure_at(7, us));
    }
    // The kernel had counted up to us=11 (two it still held, us=10 and 11).
    let totals = Totals {
        failures_total: 12,
        offenders: vec![Offender {
            pid: 7,
            comm: "app".into(),
            netns: None,
            failures: 12,
            first_ts: Some(Ts(1_764_069_600_000_000_000)),
            last_ts: Some(Ts(1_764_069_600_000_011_000)),
            destinations: vec![DestCount {
                dst: "10.0.0.1:80".parse().expect("addr"),
                errno: Errno::EADDRNOTAVAIL,
                cause: portexhaust_common::Cause::Exhausted,
                failures: 12,
            }],
        }],
        ..Totals::default()
    };
    r.snapshot(&totals);
    for us in 10..15 {
        r.failure(&failure_at(7, us));
    }
    r.finish(&totals);
    let l = lines(&path);
    let kinds: Vec<&str> = l.iter().filter_map(|v| v["type"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "header", "failure", "failure", "failure", "tally", "snapshot", "tally", "tally",
            "snapshot", "summary"
        ]
    );
    assert_eq!(l[4]["count"], 7);
    assert_eq!(l[4]["first_ts"], "2025-11-25T11:20:00.000003Z");
    assert_eq!(l[4]["last_ts"], "2025-11-25T11:20:00.000009Z");
    assert!(l[4].get("counted_by_snapshot").is_none());
    let after: Vec<(u64, bool)> = [&l[6], &l[7]]
        .iter()
        .map(|e| {
            (
                e["count"].as_u64().expect("count"),
                e["counted_by_snapshot"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert!(
        after.contains(&(2, true)) && after.contains(&(3, false)),
        "{after:?}"
    );
}

#[test]
fn kernel_tallies_join_the_records_own() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rec.ndjson");
    let mut o = opts(&path);
    o.events_per_s = 0;
    let mut r = Recorder::create(&o, &header()).expect("create");
    r.failure(&failure_at(7, 1));
    r.tally(&Tally {
        ts: None,
        pid: 7,
        comm: "app".into(),
        netns: None,
        proto: Proto::Tcp,
        dst: "10.0.0.1:80".parse().expect("addr"),
        errno: Errno::EADDRNOTAVAIL,
        cause: Cause::Unknown,
        count: 40,
        first_ts: None,
        last_ts: Ts(1_764_069_600_000_002_000),
        counted_by_snapshot: false,
    });
    r.flush_if_due();
    r.finish(&Totals::default());
    let l = lines(&path);
    assert_eq!(l[1]["type"], "tally");
    assert_eq!(l[1]["count"], 41);
    assert_eq!(l[1]["errname"], "EADDRNOTAVAIL");
    assert_eq!(l[1]["cause"], "unknown");
}

// Rotation and a full disk: the recorder driven directly, then `report` over what it wrote.

fn rotating(path: &Path, max_size: u64, keep: u32) -> RecordOptions {
    RecordOptions {
        rotate: Some(Rotate { max_size, keep }),
        ..opts(path)
    }
}

/// Exact counts of `n` failures of pid 7, the last at `us` microseconds.
fn counted(n: u64, us: i128) -> Totals {
    let last = failure_at(7, us).ts;
    Totals {
        failures_total: n,
        ts: Some(last),
        offenders: vec![Offender {
            pid: 7,
            comm: "app".into(),
            netns: None,
            failures: n,
            first_ts: Some(failure_at(7, 0).ts),
            last_ts: Some(last),
            destinations: vec![DestCount {
                dst: "10.0.0.1:80".parse().expect("addr"),
                errno: Errno::EADDRNOTAVAIL,
                cause: portexhaust_common::Cause::Exhausted,
                failures: n,
            }],
        }],
        ..Totals::default()
    }
}

fn numbered(path: &Path, i: u32) -> PathBuf {
    PathBuf::from(format!("{}.{i}", path.display()))
}

/// `n` failures, one line each, a snapshot after every tenth; 1 ms apart.
fn storm(r: &mut Recorder, from: u64, to: u64) {
    for i in from..to {
        r.failure(&failure_at(7, i128::from(i) * 1000));
        if (i + 1) % 10 == 0 {
            r.snapshot(&counted(i + 1, i128::from(i) * 1000));
        }
    }
}

fn report_of(files: &[PathBuf]) -> crate::engine::report::Report {
    let args = crate::cli::ReportArgs {
        files: files.to_vec(),
        format: crate::cli::Format::Json,
        since: None,
        until: None,
        pid: Vec::new(),
        output: None,
    };
    crate::cmd::report::build(&args).expect("report").1
}

#[test]
fn rotation_keeps_n_files_each_starting_with_the_runs_header() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rec.ndjson");
    let mut r = Recorder::create(&rotating(&path, 4096, 2), &header()).expect("create");
    storm(&mut r, 0, 100);
    r.finish(&counted(100, 99_000));
    drop(r);
    assert!(path.exists() && numbered(&path, 1).exists() && numbered(&path, 2).exists());
    assert!(!numbered(&path, 3).exists(), "only --record-keep old files");
    let mut run = None;
    let mut parts = Vec::new();
    for p in [numbered(&path, 2), numbered(&path, 1), path.clone()] {
        let size = std::fs::metadata(&p).expect("meta").len();
        assert!(size <= 4096, "{}: {size} bytes", p.display());
        // Every line whole (rotation happens at line boundaries), the header first.
        let l = lines(&p);
        assert_eq!(l[0]["type"], "header", "{}", p.display());
        assert_eq!(l.iter().filter(|v| v["type"] == "header").count(), 1);
        let id = l[0]["run_id"].as_str().expect("run id").to_string();
        assert_eq!(id.len(), 32);
        assert_eq!(run.get_or_insert(id.clone()), &id, "one run");
        parts.push(l[0]["part"].as_u64().expect("part"));
        assert_eq!(std::fs::metadata(&p).expect("m").mode() & 0o777, 0o600);
    }
    assert!(parts[0] >= 2 && parts[1] == parts[0] + 1 && parts[2] == parts[1] + 1);
    let last = lines(&path);
    assert_eq!(last.last().expect("line")["type"], "summary");
}

#[test]
fn rotated_parts_report_as_one_run_in_any_order_without_double_counting() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rec.ndjson");
    let mut r = Recorder::create(&rotating(&path, 4096, 50), &header()).expect("create");
    storm(&mut r, 0, 100);
    r.finish(&counted(100, 99_000));
    drop(r);
    let mut files: Vec<PathBuf> = (1..50)
        .rev()
        .map(|i| numbered(&path, i))
        .filter(|p| p.exists())
        .collect();
    assert!(files.len() >= 5, "{} rotations", files.len());
    files.push(path.clone());
    // Given newest first (and shuffled): the same one run.
    let mut given = files.clone();
    given.reverse();
    given.swap(1, 3);
    let rep = report_of(&given);
    assert_eq!(rep.sessions.len(), 1, "{:?}", rep.problems);
    assert_eq!(
        rep.failures_total, 100,
        "the summary, not a sum of snapshots"
    );
    assert_eq!(rep.recorded_events, 100, "every part's lines, once");
    assert_eq!(rep.sessions[0].counts_from, CountSource::Summary);
    assert_eq!(rep.sessions[0].more_files.len(), files.len() - 1);
    assert_eq!(
        rep.sessions[0].file,
        files[0].display().to_string(),
        "oldest part first"
    );
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    // One part alone still reports the run's exact counts, and says what it is.
    let alone = report_of(std::slice::from_ref(&path));
    assert_eq!(alone.failures_total, 100);
    assert!(
        alone.problems[0]
            .message
            .contains("of a rotated record: the earlier parts were not given"),
        "{:?}",
        alone.problems
    );
}

#[test]
fn a_killed_rotated_run_counts_its_last_snapshot_and_the_lines_after_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rec.ndjson");
    let mut r = Recorder::create(&rotating(&path, 4096, 50), &header()).expect("create");
    storm(&mut r, 0, 95);
    r.flush();
    // Killed: no final snapshot, no summary. 5 lines after the snapshot at 90.
    drop(r);
    let mut files: Vec<PathBuf> = (1..50)
        .rev()
        .map(|i| numbered(&path, i))
        .filter(|p| p.exists())
        .collect();
    files.push(path.clone());
    let rep = report_of(&files);
    assert_eq!(rep.sessions.len(), 1);
    assert_eq!(rep.sessions[0].counts_from, CountSource::SnapshotAndEvents);
    assert_eq!(rep.failures_total, 95);
}

#[test]
fn an_existing_record_past_the_limit_rotates_before_the_new_header() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rec.ndjson");
    let old = format!("{}\n", header().line()).repeat(4096 / header().line().len() + 1);
    std::fs::write(&path, &old).expect("w");
    let r = Recorder::create(&rotating(&path, 4096, 2), &header()).expect("create");
    drop(r);
    assert_eq!(
        std::fs::read_to_string(numbered(&path, 1)).expect("old"),
        old,
        "kept whole"
    );
    let l = lines(&path);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["part"], 0, "a new run starts at part 0");
}

fn full_disk() -> File {
    OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full")
}

#[test]
fn a_full_disk_loses_lines_never_counts_and_writes_a_gap_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rec.ndjson");
    let mut r = Recorder::create(&opts(&path), &header()).expect("create");
    for us in 0..3 {
        r.failure(&failure_at(7, us * 1000));
    }
    r.flush();
    // The disk fills with 5 lines still buffered: they are kept, not lost.
    r.file.file = Some(full_disk());
    for us in 3..8 {
        r.failure(&failure_at(7, us * 1000));
    }
    r.flush();
    assert_eq!(r.in_gap(), Some((0, 0)));
    // In the gap: failures are tallied, a snapshot is not written.
    for us in 8..12 {
        r.failure(&failure_at(7, us * 1000));
    }
    r.snapshot(&counted(12, 11_000));
    r.flush_if_due();
    assert_eq!(r.in_gap(), Some((5, 4)));
    // Space returns: the next snapshot writes everything that waited, then itself.
    r.file.file = Some(OpenOptions::new().append(true).open(&path).expect("reopen"));
    r.snapshot(&counted(12, 11_000));
    assert_eq!(r.in_gap(), None);
    for us in 12..14 {
        r.failure(&failure_at(7, us * 1000));
    }
    r.finish(&counted(14, 13_000));
    let l = lines(&path);
    let kinds: Vec<&str> = l.iter().filter_map(|v| v["type"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "header", "failure", "failure", "failure", "failure", "failure", "failure", "failure",
            "failure", "gap", "tally", "snapshot", "failure", "failure", "snapshot", "summary"
        ]
    );
    let gap = &l[9];
    assert_eq!(gap["lines"], 5);
    assert_eq!(gap["failures"], 4);
    assert_eq!(gap["snapshots"], 1);
    assert!(
        gap["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "{gap}"
    );
    assert_eq!(l[10]["count"], 4);
    let rep = report_of(std::slice::from_ref(&path));
    assert_eq!(rep.failures_total, 14);
    assert_eq!(
        rep.recorded_events, 14,
        "every failure in a line or a tally"
    );
    assert_eq!(rep.gaps.len(), 1);
    assert!(
        rep.problems
            .iter()
            .any(|p| p.message.starts_with("a gap in the record from")),
        "{:?}",
        rep.problems
    );
}

#[test]
fn other_write_errors_stop_recording_but_not_tracing() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rec.ndjson");
    let mut r = Recorder::create(&opts(&path), &header()).expect("create");
    // Read-only: EBADF, which no retry fixes.
    r.file.file = Some(File::open(&path).expect("ro"));
    r.failure(&failure_at(7, 1));
    r.flush();
    assert!(r.file.stopped());
    assert!(!r.snapshot_due());
    r.finish(&counted(1, 1));
}
