use std::os::unix::fs::MetadataExt;

use portexhaust_common::{Backend, Site};

use super::*;
use crate::schema::{DestCount, Family, Offender, VERSION};

fn opts(path: &Path) -> RecordOptions {
    RecordOptions {
        path: path.to_path_buf(),
        snapshot_interval: Duration::from_secs(10),
        events_per_s: 1000,
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
