//! Incident forensics end to end: `trace --record` on real exhaustion in private network
//! namespaces, a tracer killed with SIGKILL, `report` on what it left, the HTML report in
//! headless Chromium, and `doctor` inside a namespace with a tiny range.
//!
//! The tests marked `ignore` need root (eBPF, namespaces); `cargo xtask test` runs them one at
//! a time. They panic rather than skip when they cannot run. The others check `report`'s
//! handling of bad files through the real binary and need no privileges.
mod common;

use std::{
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{fs::PermissionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use base64::Engine as _;
use common::{BIN, Guard, Tracer, Workload, require_root};
use serde_json::{Value, json};

/// The complete lines of a record so far, parsed (a line being written is ignored).
fn record_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn count_type(lines: &[Value], kind: &str) -> usize {
    lines.iter().filter(|v| v["type"] == kind).count()
}

/// Failures that reached the record: one line each, or tallied in `suppressed` lines once the
/// per-second cap was reached.
fn flushed_failures(lines: &[Value]) -> u64 {
    let tallied: u64 = lines
        .iter()
        .filter(|v| v["type"] == "suppressed")
        .flat_map(|v| v["events"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["count"].as_u64())
        .sum();
    count_type(lines, "failure") as u64 + tallied
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// `portexhaust report ...`: (stdout, stderr, exit code).
fn report(args: &[&str]) -> (String, String, i32) {
    let out = Command::new(BIN)
        .arg("report")
        .args(args)
        .output()
        .expect("run report");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn report_json(files: &[&Path], extra: &[&str]) -> (Value, String) {
    let mut args: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    args.extend(["--format".into(), "json".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, err, code) = report(&args);
    assert_eq!(code, 0, "report failed:\n{err}");
    (
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("report json: {e}\n{out}")),
        err,
    )
}

fn offender<'a>(r: &'a Value, comm: &str) -> &'a Value {
    r["offenders"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["comm"] == comm))
        .unwrap_or_else(|| panic!("no offender {comm}: {r}"))
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_recording_killed_between_snapshots_still_reports_exact_counts() {
    require_root();
    let dir = tempfile::tempdir().expect("tmp");
    let rec = dir.path().join("incident.ndjson");
    let rec_s = rec.display().to_string();
    // Only these workloads: other tests and helpers may exhaust ports on this machine too.
    let t = Tracer::trace(&[
        "--record",
        &rec_s,
        "--snapshot-interval",
        "3",
        "--comm",
        "pxh-f-tw",
        "--comm",
        "pxh-f-v4",
    ]);
    assert_eq!(
        std::fs::metadata(&rec)
            .expect("record")
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "the record is private"
    );

    // Phase 1: TIME_WAIT exhaustion (tcp_tw_reuse=0 in its namespace), counted by a snapshot.
    // Enough failures that the tracer reads the namespace's settings while the process lives.
    let k1 = Workload::run("timewait", 2000, "pxh-f-tw", &["--ports", "16"]);
    assert_eq!(k1, 2000);
    wait_for(
        "a snapshot that counted phase 1",
        Duration::from_secs(10),
        || {
            record_lines(&rec)
                .iter()
                .any(|v| v["type"] == "snapshot" && v["failures_total"] == k1)
        },
    );
    // Phase 2 right after that snapshot: flushed as failure lines (within a second) long
    // before the next snapshot is due.
    let k2 = Workload::run("v4", 25, "pxh-f-v4", &[]);
    assert_eq!(k2, 25);
    wait_for("phase 2 flushed", Duration::from_secs(3), || {
        flushed_failures(&record_lines(&rec)) == k1 + k2
    });
    let (_, err, code) = t.signal(libc::SIGKILL);
    assert_eq!(code, -libc::SIGKILL, "{err}");

    let lines = record_lines(&rec);
    assert_eq!(lines[0]["type"], "header");
    assert_eq!(lines[0]["version"], 1);
    assert_eq!(count_type(&lines, "summary"), 0, "killed: no summary");
    let last_snap = lines
        .iter()
        .rev()
        .find(|v| v["type"] == "snapshot")
        .expect("snapshot");
    assert_eq!(
        last_snap["failures_total"], k1,
        "the kill must fall between snapshots for this test to mean anything"
    );
    // The workload's namespace was described from inside it.
    let sysctls = lines
        .iter()
        .find(|v| v["type"] == "sysctls")
        .expect("settings of the workload namespace");
    let ns = sysctls["netns"].as_u64().expect("netns").to_string();
    assert_eq!(sysctls["sysctls"][&ns]["tcp_tw_reuse"], 0);
    assert_eq!(
        sysctls["sysctls"][&ns]["ip_local_port_range"],
        json!([40000, 40015])
    );

    let (r, err) = report_json(&[&rec], &[]);
    assert_eq!(r["failures_total"], k1 + k2, "{r}\n{err}");
    assert_eq!(r["complete"], false);
    assert_eq!(r["sessions"][0]["counts_from"], "snapshot_and_events");
    assert_eq!(offender(&r, "pxh-f-tw")["failures"], k1);
    assert_eq!(offender(&r, "pxh-f-v4")["failures"], k2);
    assert_eq!(
        offender(&r, "pxh-f-v4")["destinations"][0],
        json!({"dst":"127.0.0.1:5000","errno":99,"errname":"EADDRNOTAVAIL","failures":25})
    );
    assert_eq!(
        r["timeline"]["counts"]
            .as_array()
            .map(|c| c.iter().filter_map(Value::as_u64).sum::<u64>()),
        Some(k1 + k2)
    );
    // Settings and findings of the TIME_WAIT namespace: the range and tcp_tw_reuse=0.
    let ns_n: u64 = ns.parse().expect("ns");
    let ids: Vec<(&str, &str)> = r["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["netns"] == ns_n)
        .map(|f| {
            (
                f["id"].as_str().unwrap_or(""),
                f["severity"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(ids.contains(&("tcp_tw_reuse", "critical")), "{ids:?}");
    assert!(
        ids.contains(&("ip_local_port_range", "critical")),
        "{ids:?}"
    );
    assert!(
        ids.contains(&("connect_eaddrnotavail", "critical")),
        "{ids:?}"
    );
    // The census of that namespace saw every port in TIME_WAIT.
    let tw_row = r["destinations"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|d| d["netns"] == ns_n)
        .expect("row of the TIME_WAIT namespace");
    assert_eq!(tw_row["by_state"]["TIME_WAIT"], 16);

    // --pid and the text form.
    let pid = offender(&r, "pxh-f-v4")["pid"].to_string();
    let (by_pid, _) = report_json(&[&rec], &["--pid", &pid]);
    assert_eq!(by_pid["failures_total"], k2);
    let (text, _, code) = report(&[&rec_s]);
    assert_eq!(code, 0);
    assert!(text.contains("2025 exhaustion failures"), "{text}");
    assert!(text.contains("sysctl -w net.ipv4.tcp_tw_reuse=1"), "{text}");

    // A line cut by the kill is tolerated and named.
    let cut = dir.path().join("cut.ndjson");
    let mut data = std::fs::read(&rec).expect("read");
    data.extend_from_slice(br#"{"type":"failure","ts":"2026-11-25T11:"#);
    std::fs::write(&cut, &data).expect("write");
    let (r2, err2) = report_json(&[&cut], &[]);
    assert_eq!(r2["failures_total"], k1 + k2);
    assert!(
        err2.contains("cut.ndjson:") && err2.contains("the last line is cut off"),
        "{err2}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn killed_before_the_first_snapshot_counts_exactly_the_flushed_failures() {
    require_root();
    let dir = tempfile::tempdir().expect("tmp");
    let rec = dir.path().join("storm.ndjson");
    let rec_s = rec.display().to_string();
    let t = Tracer::trace(&[
        "--record",
        &rec_s,
        "--snapshot-interval",
        "3600",
        "--comm",
        "pxh-f-storm",
    ]);
    let n = Workload::run("storm", 20_000, "pxh-f-storm", &[]);
    assert_eq!(n, 20_000);
    // Wait until the record stops growing (everything drained and flushed), then kill.
    let mut last = u64::MAX;
    wait_for("the record to settle", Duration::from_secs(20), || {
        thread::sleep(Duration::from_millis(1200));
        let now = flushed_failures(&record_lines(&rec));
        let settled = now == last && now > 0;
        last = now;
        settled
    });
    let (_, err, code) = t.signal(libc::SIGKILL);
    assert_eq!(code, -libc::SIGKILL, "{err}");
    let lines = record_lines(&rec);
    assert_eq!(count_type(&lines, "snapshot"), 0);
    let flushed = flushed_failures(&lines);
    // The disk stays bounded in a storm: at most --record-events-per-s lines a second, the
    // rest tallied per process and destination.
    let one_by_one = count_type(&lines, "failure") as u64;
    assert!(
        one_by_one < n / 4,
        "{one_by_one} failure lines for a {n}-failure storm"
    );
    assert!(count_type(&lines, "suppressed") >= 1);
    let (r, err) = report_json(&[&rec], &[]);
    assert_eq!(r["failures_total"], flushed, "{err}");
    assert_eq!(r["sessions"][0]["counts_from"], "events");
    assert_eq!(offender(&r, "pxh-f-storm")["failures"], flushed);
    // The ring buffer may drop under a storm (counted only in the kernel); without a snapshot
    // those are unknowable, so the report can only be exact for what was flushed.
    assert!(flushed <= n && flushed > 0, "{flushed} of {n}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_clean_stop_appends_snapshot_and_summary_and_two_runs_merge() {
    require_root();
    let dir = tempfile::tempdir().expect("tmp");
    let rec = dir.path().join("clean.ndjson");
    let rec_s = rec.display().to_string();
    let mut totals = 0;
    for round in 0..2 {
        // The same file twice: the second run appends a new session.
        let t = Tracer::trace(&["--record", &rec_s, "--comm", "pxh-f-clean"]);
        totals += Workload::run("v4", 7 + round, "pxh-f-clean", &[]);
        let (_, err, code) = t.signal(libc::SIGTERM);
        assert_eq!(code, 0, "{err}");
    }
    let lines = record_lines(&rec);
    assert_eq!(count_type(&lines, "header"), 2);
    assert_eq!(count_type(&lines, "summary"), 2);
    assert_eq!(
        lines.last().map(|l| l["type"].clone()),
        Some(json!("summary"))
    );
    let (r, err) = report_json(&[&rec], &[]);
    assert_eq!(r["failures_total"], totals, "{err}");
    assert_eq!(r["complete"], true);
    assert_eq!(r["sessions"].as_array().map(Vec::len), Some(2));
    assert!(
        r["sessions"]
            .as_array()
            .expect("s")
            .iter()
            .all(|s| s["counts_from"] == "summary")
    );
    // Two workload processes, one per session, each with its own exact count.
    let per_run: Vec<u64> = r["offenders"]
        .as_array()
        .expect("offenders")
        .iter()
        .filter(|o| o["comm"] == "pxh-f-clean")
        .filter_map(|o| o["failures"].as_u64())
        .collect();
    assert_eq!(per_run, [8, 7]);
}

// ---------------------------------------------------------------------------------------------
// doctor, for real, inside namespaces made by the workload.

fn doctor_in(pid: u32, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg(BIN)
        .arg("doctor")
        .args(args)
        .output()
        .expect("nsenter (util-linux) runs doctor");
    assert!(
        out.status.success(),
        "doctor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn finding<'a>(audit: &'a Value, id: &str) -> &'a Value {
    audit["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["id"] == id))
        .unwrap_or_else(|| panic!("no finding {id}: {audit}"))
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_in_a_namespace_with_a_tiny_range_and_no_tw_reuse_flags_both() {
    require_root();
    // Paused before exhausting: already in its namespace with 10 ports and tcp_tw_reuse=0.
    let w = Workload::start("timewait", 1, "pxh-f-doc", &["--ports", "10"]);
    let audit: Value = serde_json::from_str(&doctor_in(w.pid, &["--json"])).expect("json");
    assert_eq!(audit["type"], "doctor");
    assert_eq!(
        audit["sysctls"]["ip_local_port_range"],
        json!([40000, 40009])
    );
    assert_eq!(audit["sysctls"]["tcp_tw_reuse"], 0);
    assert_eq!(audit["range"]["usable"], 10);
    let range = finding(&audit, "ip_local_port_range");
    assert_eq!(range["severity"], "critical", "{range}");
    let reuse = finding(&audit, "tcp_tw_reuse");
    assert!(
        reuse["severity"] == "warning" || reuse["severity"] == "critical",
        "{reuse}"
    );
    // Application fixes come before the sysctl one; tcp_tw_recycle is never suggested.
    assert_eq!(reuse["fixes"][0]["kind"], "application");
    assert_eq!(
        reuse["fixes"]
            .as_array()
            .and_then(|f| f.last())
            .map(|f| f["command"].clone()),
        Some(json!("sysctl -w net.ipv4.tcp_tw_reuse=1"))
    );
    assert!(!audit.to_string().contains("tcp_tw_recycle=1"));
    // Its own namespace, not the host's.
    assert_eq!(
        audit["netns"].as_u64(),
        std::fs::read_link(format!("/proc/{}/ns/net", w.pid))
            .ok()
            .and_then(|l| l
                .to_str()?
                .strip_prefix("net:[")?
                .strip_suffix(']')?
                .parse()
                .ok())
    );
    let text = doctor_in(w.pid, &[]);
    assert!(
        text.contains("CRITICAL  Ephemeral range 40000-40009: 10 usable ports"),
        "{text}"
    );
    assert!(text.contains("tcp_tw_reuse=0"), "{text}");
    drop(w);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_sees_sockets_bound_before_connect() {
    require_root();
    // The bind scenario binds every port of the range, then keeps failing bind(0) for a
    // while: long enough to be audited with those sockets held.
    let mut w = Workload::start("bind", 50_000_000, "pxh-f-bound", &["--ports", "10"]);
    let before: Value = serde_json::from_str(&doctor_in(w.pid, &["--json"])).expect("json");
    assert_eq!(
        before["bind_holders"],
        json!([]),
        "nothing bound yet: {before}"
    );
    w.go();
    let mut audit = Value::Null;
    wait_for(
        "doctor to see the bound sockets",
        Duration::from_secs(10),
        || {
            audit = serde_json::from_str(&doctor_in(w.pid, &["--json"])).expect("json");
            audit["bind_holders"]
                .as_array()
                .is_some_and(|h| !h.is_empty())
        },
    );
    let h = &audit["bind_holders"][0];
    assert_eq!(h["pid"], w.pid);
    assert_eq!(h["comm"], "pxh-f-bound");
    assert_eq!(h["sockets"], 10);
    let f = finding(&audit, "bind_before_connect");
    assert_eq!(f["severity"], "warning");
    assert!(
        f["fixes"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("IP_BIND_ADDRESS_NO_PORT"))
    );
    drop(w);
}

// ---------------------------------------------------------------------------------------------
// The HTML report in headless Chromium, through the DevTools protocol over a pipe
// (--remote-debugging-pipe: NUL-separated JSON on fds 3 and 4; no port, no websocket).

struct Cdp {
    _guard: Guard,
    to: std::fs::File,
    rx: mpsc::Receiver<Value>,
    next_id: u64,
    events: Vec<Value>,
    _profile: tempfile::TempDir,
}

/// A pipe with both ends close-on-exec, moved above fd 10 so that dup2() onto 3 and 4 in the
/// child can never hit one of them.
fn high_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let high = |fd: i32| {
        // SAFETY: fd is valid; F_DUPFD_CLOEXEC returns a new descriptor >= 10.
        let h = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        assert!(h >= 10);
        // SAFETY: closing the original, which we own.
        unsafe { libc::close(fd) };
        // SAFETY: h is a fresh descriptor we own.
        unsafe { OwnedFd::from_raw_fd(h) }
    };
    (high(fds[0]), high(fds[1]))
}

impl Cdp {
    fn launch() -> Self {
        let chromium = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|c| {
                Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("Chromium is missing: `cargo xtask setup` installs Debian's chromium");
        let profile = tempfile::tempdir().expect("profile dir");
        let (to_r, to_w) = high_pipe();
        let (from_r, from_w) = high_pipe();
        let (r3, w4) = (to_r.as_raw_fd(), from_w.as_raw_fd());
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            "about:blank",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe dup2 calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(r3, 3) < 0 || libc::dup2(w4, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start chromium");
        drop(to_r);
        drop(from_w);
        let (tx, rx) = mpsc::channel();
        let mut from = std::fs::File::from(from_r);
        thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            while let Ok(n) = from.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(i) = buf.iter().position(|&b| b == 0) {
                    let msg: Vec<u8> = buf.drain(..=i).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&msg[..msg.len() - 1])
                        && tx.send(v).is_err()
                    {
                        return;
                    }
                }
            }
        });
        Self {
            _guard: Guard(child),
            to: std::fs::File::from(to_w),
            rx,
            next_id: 1,
            events: Vec::new(),
            _profile: profile,
        }
    }

    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer from chromium to {method}"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.events.push(v);
        }
    }

    fn wait_event(&mut self, method: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if self.events.iter().any(|e| e["method"] == method) {
            return;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {method} from chromium"));
            let hit = v["method"] == method;
            self.events.push(v);
            if hit {
                return;
            }
        }
    }

    /// A fresh tab with console, log, page and network events on.
    fn tab(&mut self) -> String {
        let t = self.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let target = t["targetId"].as_str().expect("target").to_string();
        let s = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        let session = s["sessionId"].as_str().expect("session").to_string();
        for m in [
            "Runtime.enable",
            "Log.enable",
            "Page.enable",
            "Network.enable",
        ] {
            self.call(Some(&session), m, json!({}));
        }
        session
    }

    fn open(&mut self, session: &str, url: &str) {
        self.events.clear();
        self.call(Some(session), "Page.navigate", json!({"url": url}));
        self.wait_event("Page.loadEventFired", Duration::from_secs(30));
        // Let late console messages arrive.
        thread::sleep(Duration::from_millis(300));
        while let Ok(v) = self.rx.try_recv() {
            self.events.push(v);
        }
    }

    /// Console errors, uncaught exceptions and error log entries seen since `open`.
    fn errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e["method"].as_str()? {
                "Runtime.consoleAPICalled"
                    if matches!(e["params"]["type"].as_str(), Some("error" | "assert")) =>
                {
                    Some(format!("console: {}", e["params"]["args"]))
                }
                "Runtime.exceptionThrown" => {
                    Some(format!("exception: {}", e["params"]["exceptionDetails"]))
                }
                "Log.entryAdded" if e["params"]["entry"]["level"] == "error" => {
                    Some(format!("log: {}", e["params"]["entry"]["text"]))
                }
                _ => None,
            })
            .collect()
    }

    /// Requests for anything but the page itself and inline data.
    fn network(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .filter_map(|e| e["params"]["request"]["url"].as_str())
            .filter(|u| !u.starts_with("file:") && !u.starts_with("data:"))
            .map(str::to_string)
            .collect()
    }

    fn eval(&mut self, session: &str, expr: &str) -> Value {
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }
}

/// A real incident, recorded and stopped cleanly, as an HTML report.
fn html_report(dir: &Path) -> PathBuf {
    let rec = dir.join("incident.ndjson");
    let rec_s = rec.display().to_string();
    let t = Tracer::trace(&["--record", &rec_s, "--comm", "pxh-f-html"]);
    let n = Workload::run("timewait", 400, "pxh-f-html", &["--ports", "12"]);
    assert_eq!(n, 400);
    let (_, err, code) = t.signal(libc::SIGTERM);
    assert_eq!(code, 0, "{err}");
    let html = dir.join("incident.html");
    let (_, err, code) = report(&[
        &rec_s,
        "--format",
        "html",
        "-o",
        &html.display().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    html
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn html_report_renders_in_headless_chromium_without_errors() {
    require_root();
    let dir = tempfile::tempdir().expect("tmp");
    let html = html_report(dir.path());
    let page = std::fs::read_to_string(&html).expect("html");
    assert!(page.contains("pxh-f-html"));

    let mut cdp = Cdp::launch();
    let tab = cdp.tab();
    // The detector itself must work, or "no errors" would prove nothing.
    cdp.open(
        &tab,
        "data:text/html,<script>console.error('probe')</script><p>probe</p>",
    );
    assert!(
        cdp.errors().iter().any(|e| e.contains("probe")),
        "the console-error detector saw nothing: {:?}",
        cdp.events
    );

    let url = format!("file://{}", html.display());
    cdp.open(&tab, &url);
    assert_eq!(cdp.errors(), Vec::<String>::new(), "console errors");
    assert_eq!(
        cdp.network(),
        Vec::<String>::new(),
        "the page must need no network"
    );
    let facts = cdp.eval(
        &tab,
        "(() => { const svg = document.querySelector('#timeline-chart');
            const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
            const bars = [...document.querySelectorAll('#timeline-chart rect.bar')];
            return {title: document.title, w: r.width, h: r.height, bars: bars.length,
              tallest: Math.max(0, ...bars.map(b => b.getBoundingClientRect().height)),
              offenders: [...document.querySelectorAll('table td')].some(td => td.textContent === 'pxh-f-html'),
              findings: document.querySelectorAll('.finding').length,
              height: document.documentElement.scrollHeight}; })()",
    );
    assert!(
        facts["title"]
            .as_str()
            .is_some_and(|t| t.starts_with("portexhaust report")),
        "{facts}"
    );
    assert!(
        facts["w"].as_f64().is_some_and(|w| w > 300.0),
        "chart laid out: {facts}"
    );
    assert!(facts["bars"].as_u64().is_some_and(|b| b >= 1), "{facts}");
    assert!(
        facts["tallest"].as_f64().is_some_and(|h| h > 10.0),
        "{facts}"
    );
    assert_eq!(facts["offenders"], true, "{facts}");
    assert!(
        facts["findings"].as_u64().is_some_and(|f| f >= 2),
        "{facts}"
    );

    // A full-page screenshot, kept next to the test binaries for people to look at.
    let height = facts["height"].as_u64().unwrap_or(1200).clamp(600, 8000);
    cdp.call(
        Some(&tab),
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": false}),
    );
    let shot = cdp.call(
        Some(&tab),
        "Page.captureScreenshot",
        json!({"format": "png"}),
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("png data"))
        .expect("base64");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-screenshot.png");
    std::fs::write(&out, &png).expect("write screenshot");
    eprintln!("screenshot: {}", out.display());
}

// ---------------------------------------------------------------------------------------------
// Bad input to `report`, through the binary: one clear line per problem, never a panic.

fn files(dir: &Path, list: &[(&str, &[u8])]) -> Vec<String> {
    list.iter()
        .map(|(name, data)| {
            let p = dir.join(name);
            std::fs::write(&p, data).expect("write");
            p.display().to_string()
        })
        .collect()
}

#[test]
fn report_refuses_unusable_files_with_one_line_each() {
    let dir = tempfile::tempdir().expect("tmp");
    let paths = files(
        dir.path(),
        &[
            ("empty.ndjson", b""),
            ("binary.ndjson", b"\x7fELF\x02\x01\x01\x00"),
            ("v7.ndjson", b"{\"type\":\"header\",\"version\":7}\n"),
        ],
    );
    let missing = dir.path().join("missing.ndjson").display().to_string();
    for (path, want) in [
        (&paths[0], "is empty"),
        (&paths[1], "binary data"),
        (&paths[2], ":1: record version 7 is not supported"),
        (&missing, "cannot open: No such file or directory"),
    ] {
        let (out, err, code) = report(&[path]);
        assert_eq!(code, 1, "{path}: {err}");
        assert!(out.is_empty(), "{path}: nothing on stdout");
        assert_eq!(err.trim().lines().count(), 1, "{path}: one line: {err}");
        assert!(
            err.contains(path.as_str()) && err.contains(want),
            "{path}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (_, err, code) = report(&[
        &paths[0],
        "--since",
        "2026-01-02T00:00:00Z",
        "--until",
        "2026-01-01T00:00:00Z",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--since is later than --until"), "{err}");
}

#[test]
fn report_reports_what_it_can_and_names_each_bad_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let header =
        r#"{"type":"header","version":1,"host":"h","start_ts":"2026-11-25T11:20:00Z","pid":1}"#;
    let fail = |t: &str| {
        format!(
            r#"{{"type":"failure","ts":"2026-11-25T11:20:0{t}Z","pid":5,"comm":"app","dst":"10.0.0.1:80","errno":99}}"#
        )
    };
    let good = format!(
        "{header}\n{}\n{{oops\n{}\n{}",
        fail("1"),
        fail("2"),
        &fail("3")[..30]
    );
    let paths = files(dir.path(), &[("good.ndjson", good.as_bytes())]);
    let missing = dir.path().join("gone.ndjson").display().to_string();
    let out_html = dir.path().join("r.html");
    let (out, err, code) = report(&[
        &paths[0],
        &missing,
        "--format",
        "html",
        "-o",
        &out_html.display().to_string(),
    ]);
    assert_eq!(
        code, 2,
        "a file was unusable but a report was written: {err}"
    );
    assert!(out.is_empty());
    assert!(
        err.contains(&format!("{}:3: not valid JSON", paths[0])),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}:5: the last line is cut off", paths[0])),
        "{err}"
    );
    assert!(err.contains(&format!("{missing}: cannot open")), "{err}");
    let html = std::fs::read_to_string(&out_html).expect("html written");
    assert!(html.contains("<svg id=\"timeline-chart\""));
    let (text, _, code) = report(&[&paths[0]]);
    assert_eq!(code, 0);
    assert!(text.contains("2 exhaustion failures"), "{text}");
    // `-` reads standard input.
    let piped = Command::new(BIN)
        .args(["report", "-", "--format", "json"])
        .stdin(std::fs::File::open(&paths[0]).expect("open"))
        .output()
        .expect("report -");
    assert!(piped.status.success());
    let v: Value = serde_json::from_slice(&piped.stdout).expect("json");
    assert_eq!(v["failures_total"], 2);
    assert!(String::from_utf8_lossy(&piped.stderr).contains("<stdin>:3: not valid JSON"));
}

#[test]
fn doctor_explains_tcp_tw_recycle_without_recommending_it() {
    let out = Command::new(BIN)
        .args(["doctor", "--explain", "tcp_tw_recycle"])
        .output()
        .expect("doctor");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("REMOVED in Linux 4.12") && text.contains("NAT"),
        "{text}"
    );
    assert!(!text.contains("tcp_tw_recycle=1"));
    let bad = Command::new(BIN)
        .args(["doctor", "--explain", "tcp_tw_recycel"])
        .output()
        .expect("doctor");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid value"));
}
