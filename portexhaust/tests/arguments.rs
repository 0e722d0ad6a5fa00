//! `trace` checks its arguments before it loads anything: a record path it cannot write, a
//! metrics address already taken, a filter that can never match. Each fails in well under a
//! second with one line that says what to do and exit status 2, with no backend chosen, no
//! probe attached and no "ready" line, and an existing record is left as it was.
//!
//! No privileges needed: the checks come first, so without root these errors are still the
//! ones seen (not "not enough privileges"); as root they prove nothing was loaded.
mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{BIN, temp_dir};

/// `portexhaust trace ARGS`: (exit code, stderr, how long it took).
fn trace(args: &[&str]) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let out = Command::new(BIN)
        .arg("trace")
        .args(args)
        .output()
        .expect("run portexhaust");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

/// Refused before loading: exit 2, one error line containing each of `says`, and nothing of a
/// tracer that started.
fn refused(args: &[&str], says: &[&str]) -> String {
    let (code, err, took) = trace(args);
    assert_eq!(code, Some(2), "{args:?}: {err}");
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("portexhaust: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{args:?}: one error line:\n{err}");
    for s in says {
        assert!(errors[0].contains(s), "{args:?}: no {s:?} in {err}");
    }
    for started in [
        "ready:",
        "using backend",
        "watching",
        "not enough privileges",
    ] {
        assert!(
            !err.contains(started),
            "{args:?}: {started:?}: loaded before checking:\n{err}"
        );
    }
    assert!(
        took < Duration::from_secs(2),
        "{args:?}: took {took:?}: it loaded something first"
    );
    err
}

#[test]
fn a_record_in_a_missing_directory_fails_before_anything_is_attached() {
    refused(
        &["--record", "/nonexistent/dir/x"],
        &["--record /nonexistent/dir/x", "does not exist", "mkdir -p"],
    );
    refused(
        &["--record", "/nonexistent/dir/x", "--record-max-size", "64M"],
        &["does not exist"],
    );
}

#[test]
fn a_record_path_that_is_a_directory_or_cannot_rotate_is_refused() {
    let dir = temp_dir("args");
    let d = dir.path().display().to_string();
    refused(&["--record", &d], &["is a directory", "portexhaust.ndjson"]);
    refused(
        &["--record", "/dev/null", "--record-max-size", "64M"],
        &["cannot rotate"],
    );
}

#[test]
fn a_taken_metrics_address_fails_before_loading_and_the_record_is_untouched() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let dir = temp_dir("args");
    let rec = dir.path().join("old.ndjson");
    let old = "{\"type\":\"header\",\"version\":2}\n{\"type\":\"summary\",\"failures_total\":3}\n";
    std::fs::write(&rec, old).expect("an earlier record");
    let rec_s = rec.display().to_string();
    refused(
        &["--record", &rec_s, "--metrics-addr", &port],
        &[
            &format!("--metrics-addr 127.0.0.1:{port}"),
            "in use",
            "pick another port",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(&rec).expect("record"),
        old,
        "an existing record is appended to, never truncated or touched by a failed start"
    );
}

#[test]
fn filters_that_can_never_match_are_refused() {
    // The largest pid Linux can give (pid_max is at most 2^22): no such process.
    refused(
        &["--pid", "4194304"],
        &["--pid 4194304: no such process", "--comm"],
    );
    refused(&["--pid", "0"], &["idle task"]);
    // An empty command name is refused by the argument parser itself (exit 2 too).
    let (code, err, _) = trace(&["--comm", ""]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be empty"), "{err}");
}

#[test]
fn dport_0_is_a_warning_for_bind_failures_only() {
    // The missing record directory stops it right after the filters are checked.
    let err = refused(
        &["--dport", "0", "--record", "/nonexistent/dir/x"],
        &["does not exist"],
    );
    assert!(
        err.contains("--dport 0 matches only bind() failures"),
        "{err}"
    );
    let err = refused(
        &[
            "--dport",
            "0",
            "--catch",
            "bind",
            "--record",
            "/nonexistent/dir/x",
        ],
        &["does not exist"],
    );
    assert!(!err.contains("--dport 0 matches"), "{err}");
}
