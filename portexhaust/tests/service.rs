//! Records that can run for weeks, end to end: rotation under a real storm, and a disk that
//! fills and empties again under the record. Root needed (`cargo xtask test`): each test
//! traces failures of workloads in their own network namespaces; the full disk is a small
//! tmpfs mounted in a private mount namespace (`unshare --mount --propagation private`), so
//! the host's mounts never see it, and it is gone when the test's processes are.
mod common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use common::{BIN, Tracer, Workload, events_and_summary, report_json, require_root, temp_dir};
use serde_json::Value;

fn record_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn numbered(path: &Path, i: u32) -> PathBuf {
    PathBuf::from(format!("{}.{i}", path.display()))
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_rotating_record_keeps_n_files_and_reports_exactly_as_one_run() {
    require_root();
    let dir = temp_dir("rotate");
    let rec = dir.path().join("rec.ndjson");
    let rec_s = rec.display().to_string();
    let t = Tracer::trace(&[
        "--record",
        &rec_s,
        "--record-max-size",
        "64K",
        "--record-keep",
        "2",
        "--snapshot-interval",
        "1",
        "--comm",
        "pxh-rot",
    ]);
    // Storms until part 0 was rotated away (three rotations: FILE.2 is part 1 or later), at
    // most 200 of them.
    let rotated_away = || {
        record_lines(&numbered(&rec, 2))
            .first()
            .and_then(|h| h["part"].as_u64())
            .is_some_and(|p| p >= 1)
    };
    let mut n = 0;
    let mut rounds = 0;
    while !rotated_away() {
        n += Workload::run("storm", 3000, "pxh-rot", &[]);
        rounds += 1;
        assert!(rounds < 200, "the record did not rotate three times");
    }
    thread::sleep(Duration::from_millis(1500));
    let (_, err, code) = t.stop();
    assert_eq!(code, 0, "{err}");
    assert!(!numbered(&rec, 3).exists(), "--record-keep 2");
    let files = [numbered(&rec, 2), numbered(&rec, 1), rec.clone()];
    let mut run_id = None;
    let mut parts = Vec::new();
    for f in &files {
        let size = std::fs::metadata(f).expect("part").len();
        assert!(size <= 64 << 10, "{}: {size} bytes", f.display());
        let text = std::fs::read_to_string(f).expect("part");
        assert!(text.ends_with('\n'), "rotated at a line boundary");
        let lines = record_lines(f);
        assert_eq!(lines.len(), text.lines().count(), "every line whole");
        assert_eq!(lines[0]["type"], "header");
        let id = lines[0]["run_id"].clone();
        assert_eq!(run_id.get_or_insert(id.clone()), &id, "one run");
        parts.push(lines[0]["part"].as_u64().expect("part"));
    }
    assert!(parts[0] >= 1, "part 0 was rotated away: {parts:?}");
    assert_eq!(parts[1], parts[0] + 1);
    assert_eq!(parts[2], parts[1] + 1);
    // The kept parts, given in any order: one run, the summary's exact count (the failures of
    // the deleted parts included: snapshots are cumulative).
    let (r, err) = report_json(&[&files[1], &rec, &files[0]], &[]);
    assert_eq!(r["sessions"].as_array().map(Vec::len), Some(1), "{err}");
    assert_eq!(r["failures_total"], n, "{err}");
    assert_eq!(r["sessions"][0]["counts_from"], "summary");
    // The newest part alone says the same.
    let (alone, _) = report_json(&[&rec], &[]);
    assert_eq!(alone["failures_total"], n);
}

/// Pids of the children of `pid` (its main thread's).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Write zeros to `path` until the file system is full.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = [0u8; 4096];
    let mut n = 0;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
    }
    n
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_full_disk_loses_lines_never_counts() {
    require_root();
    let dir = temp_dir("diskfull");
    let mnt = dir.path().join("mnt");
    let out = dir.path().join("out");
    std::fs::create_dir(&mnt).expect("mnt");
    std::fs::create_dir(&out).expect("out");
    // In a private mount namespace: a 512 KiB tmpfs under the record, the tracer's stdout
    // outside it, and the record copied out when it stops (the tmpfs goes with the namespace).
    let script = r#"
        mount -t tmpfs -o size=512k,mode=0700 pxh-diskfull "$1" || exit 90
        "$2" trace --json --record "$1/rec.ndjson" --comm pxh-dfull --snapshot-interval 1 \
            --record-events-per-s 20 --duration 120 > "$3/stdout"
        rc=$?
        cp "$1/rec.ndjson" "$3/" || exit 91
        exit $rc
    "#;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .arg(&mnt)
    .arg(BIN)
    .arg(&out);
    let t = Tracer::start(cmd);
    let sh = t.pid();
    let trace = children(sh);
    assert_eq!(trace.len(), 1, "the shell runs the tracer: {trace:?}");
    // The tmpfs as the namespace sees it.
    let inside =
        PathBuf::from(format!("/proc/{sh}/root")).join(mnt.strip_prefix("/").expect("abs"));
    let rec = inside.join("rec.ndjson");
    let mut n = Workload::run("storm", 2000, "pxh-dfull", &[]);
    thread::sleep(Duration::from_millis(1500));
    let before = std::fs::metadata(&rec).expect("record").len();
    assert!(before > 0);
    // Full: the storms go on, the record cannot grow.
    let filler = inside.join("filler");
    let filled = fill(&filler);
    assert!(filled > 0, "the tmpfs had room before");
    for _ in 0..4 {
        n += Workload::run("storm", 2000, "pxh-dfull", &[]);
        thread::sleep(Duration::from_millis(700));
    }
    assert!(
        !record_lines(&rec).iter().any(|l| l["type"] == "gap"),
        "no gap line while the disk is full"
    );
    // Space returns: within a few seconds the gap line is written.
    std::fs::remove_file(&filler).expect("free");
    common::wait_for("the gap line", Duration::from_secs(10), || {
        record_lines(&rec).iter().any(|l| l["type"] == "gap")
    });
    n += Workload::run("storm", 2000, "pxh-dfull", &[]);
    thread::sleep(Duration::from_millis(1500));
    // SIGTERM to the tracer (the shell's child, started by this test): it stops cleanly.
    // SAFETY: signalling a process this test started, still running.
    unsafe { libc::kill(trace[0] as i32, libc::SIGTERM) };
    let (_, err, code) = t.wait();
    assert_eq!(code, 0, "{err}");
    let warned = err
        .lines()
        .filter(|l| l.contains("No space left on device"))
        .count();
    assert_eq!(warned, 1, "warned once:\n{err}");
    // The kernel's counts, as the tracer printed them.
    let stdout = std::fs::read_to_string(out.join("stdout")).expect("stdout");
    let (_, summary) = events_and_summary(&stdout);
    assert_eq!(
        summary["failures_total"], n,
        "the kernel counted every failure"
    );
    let copied = out.join("rec.ndjson");
    let lines = record_lines(&copied);
    let gaps: Vec<&Value> = lines.iter().filter(|l| l["type"] == "gap").collect();
    assert_eq!(gaps.len(), 1, "one gap");
    let gap = gaps[0];
    // What the record holds around the gap, for a failing assertion.
    let story: Vec<String> = lines
        .iter()
        .map(|l| format!("{} {}", l["type"], l["ts"]))
        .collect();
    eprintln!("gap: {gap}\nrecord: {story:?}\nstderr:\n{err}");
    assert!(gap["lines"].as_u64() > Some(0), "{gap}");
    assert!(gap["failures"].as_u64() > Some(0), "{gap}");
    // Snapshots due while it was full are among the lines (how many depends on when the
    // tracer's last page filled).
    let (lines_lost, failures_lost, snapshots_lost) = (
        gap["lines"].as_u64().expect("lines"),
        gap["failures"].as_u64().expect("failures"),
        gap["snapshots"].as_u64().expect("snapshots"),
    );
    assert!(lines_lost >= failures_lost + snapshots_lost, "{gap}");
    assert!(
        gap["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "{gap}"
    );
    assert_eq!(
        lines.last().map(|l| l["type"].clone()),
        Some("summary".into())
    );
    let (r, err) = report_json(&[&copied], &[]);
    assert_eq!(r["failures_total"], n, "{err}");
    assert_eq!(r["sessions"][0]["counts_from"], "summary");
    assert_eq!(r["gaps"].as_array().map(Vec::len), Some(1));
    // Every failure is in a line or a tally: the record's own lines add up to the counts too.
    assert_eq!(r["recorded_events"], n, "{err}");
    assert!(err.contains("a gap in the record from"), "{err}");
}
