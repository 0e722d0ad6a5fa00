//! A reader that goes away early (`| head`) is a normal end for every command: no panic, no
//! backtrace, exit status 0 (the convention README.md states). Each command's stdout is a pipe
//! whose read end is closed, either at once (every write then fails with EPIPE) or after the
//! first line, as `head -1` does; and the same through a real `bash -o pipefail` pipeline.
//! `trace` and `top` load eBPF programs: those tests need root and are `#[ignore]`d like the
//! other privileged tests.
mod common;

use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{BIN, Workload, require_root, temp_dir};
use serde_json::Value;

fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/records/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// How the reader leaves.
#[derive(Clone, Copy, Debug)]
enum Reader {
    /// Closes the pipe before the command writes anything.
    Gone,
    /// Reads one line, then closes it (`head -1`).
    OneLine,
}

/// Run `portexhaust ARGS` with its stdout read as `reader` says; (exit code, stderr, the
/// first line if one was read). Stderr is read to its end by a thread, so it cannot block.
fn run(args: &[&str], reader: Reader, timeout: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start portexhaust");
    let mut err = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let out = child.stdout.take().expect("stdout");
    let mut first = String::new();
    match reader {
        Reader::Gone => drop(out),
        Reader::OneLine => {
            let mut r = BufReader::new(out);
            r.read_line(&mut first).expect("first line");
            drop(r);
        }
    }
    let guard = common::Guard(child);
    let start = Instant::now();
    let mut guard = guard;
    let status = loop {
        if let Some(s) = guard.0.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(guard);
    let stderr = stderr.join().expect("stderr");
    (status.and_then(|s| s.code()), stderr, first)
}

fn ends_quietly(args: &[&str], reader: Reader) -> String {
    let (code, stderr, first) = run(args, reader, Duration::from_secs(60));
    assert_eq!(
        code,
        Some(0),
        "{args:?} ({reader:?}) did not exit 0; stderr:\n{stderr}"
    );
    for bad in ["panicked", "Broken pipe", "backtrace", "RUST_BACKTRACE"] {
        assert!(
            !stderr.contains(bad),
            "{args:?} ({reader:?}): {bad:?} on stderr:\n{stderr}"
        );
    }
    first
}

/// `bash -o pipefail -c 'portexhaust ARGS | head ...'`: the pipeline's status is portexhaust's.
fn pipeline(args: &str, head: &str) {
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c"])
        .arg(format!("{BIN} {args} | {head} >/dev/null"))
        .output()
        .expect("bash");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`portexhaust {args} | {head}`: {}; stderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn doctor_ends_quietly_when_its_reader_goes() {
    ends_quietly(&["doctor"], Reader::Gone);
    ends_quietly(&["doctor"], Reader::OneLine);
    ends_quietly(&["doctor", "--json"], Reader::Gone);
    ends_quietly(&["doctor", "--explain", "tcp_tw_recycle"], Reader::Gone);
    pipeline("doctor", "head -1");
    pipeline("doctor --json", "head -c 600");
}

#[test]
fn report_ends_quietly_when_its_reader_goes() {
    let rec = fixture("v1-mixed-storm.ndjson");
    for format in ["text", "json", "html"] {
        ends_quietly(&["report", &rec, "--format", format], Reader::Gone);
    }
    let first = ends_quietly(&["report", &rec], Reader::OneLine);
    assert!(first.starts_with("portexhaust report"), "{first:?}");
    pipeline(&format!("report {rec}"), "head -3");
    pipeline(&format!("report {rec} --format html"), "head -c 100");
}

#[test]
fn completions_end_quietly_when_their_reader_goes() {
    for shell in ["bash", "zsh", "fish"] {
        ends_quietly(&["completions", shell], Reader::Gone);
    }
    ends_quietly(&["completions", "bash"], Reader::OneLine);
    pipeline("completions bash", "head -2");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn top_json_ends_quietly_when_its_reader_goes() {
    require_root();
    let args = ["top", "--json", "--count", "5", "--interval", "0.2"];
    ends_quietly(&args, Reader::Gone);
    let first = ends_quietly(&args, Reader::OneLine);
    let v: Value = serde_json::from_str(first.trim()).expect("a top snapshot");
    assert_eq!(v["type"], "top");
    pipeline("top --json --count 5 --interval 0.2", "head -1");
}

/// With nothing to print after the header, `trace --json | head -1` still ends when `head`
/// does (the tracer looks for its reader at each drain, 20 times a second).
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn trace_with_nothing_to_print_ends_when_its_reader_goes() {
    require_root();
    let start = Instant::now();
    let first = ends_quietly(
        &[
            "trace",
            "--json",
            "--comm",
            "pxh-pipe-none",
            "--duration",
            "60",
        ],
        Reader::OneLine,
    );
    assert!(first.contains("\"type\":\"header\""), "{first}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "ran for {:?}: it waited for its --duration",
        start.elapsed()
    );
    pipeline("trace --json --comm pxh-pipe-none --duration 60", "head -1");
}

/// `trace --json | head -1`: the header is read, failures happen, the reader goes, and tracing
/// ends within a second, without waiting for another failure to write: the probes are
/// detached (the process exits by itself) and the record still gets its final snapshot and
/// summary, with the exact count.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn trace_ends_quietly_and_finishes_its_record_when_its_reader_goes() {
    require_root();
    let dir = temp_dir("pipes");
    let rec = dir.path().join("rec.ndjson");
    let rec_s = rec.display().to_string();
    let mut child = Command::new(BIN)
        .args(["trace", "--json", "--record", &rec_s, "--comm", "pxh-pipe"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("trace");
    let err = child.stderr.take().expect("stderr");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut guard = common::Guard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("ready:") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("ready");
    let mut header = String::new();
    out.read_line(&mut header).expect("header");
    assert!(header.contains("\"type\":\"header\""), "{header}");
    // Unread, they wait in the pipe.
    let n = Workload::run("v4", 25, "pxh-pipe", &[]);
    std::thread::sleep(Duration::from_millis(500));
    drop(out);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = guard.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "trace kept running after its reader went"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = stderr.join().expect("stderr");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<Value> = std::fs::read_to_string(&rec)
        .expect("record")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let summary = lines.last().expect("lines");
    assert_eq!(summary["type"], "summary", "the record is finished");
    assert_eq!(summary["failures_total"], n);
}
