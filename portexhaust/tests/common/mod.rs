//! What the integration tests (privileged.rs, blame.rs, fleet.rs, forensics.rs, pipes.rs,
//! service.rs, ...) share: a root check, processes killed on drop, the paused workload, a tracer (or `top`)
//! whose output is drained while it runs, and the NDJSON of `trace --json`.
//!
//! Every test binary compiles its own copy of this module (`mod common;`) and uses only a
//! subset of it, so what one binary leaves unused is not dead code.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::ExitStatusExt,
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use std::path::{Path, PathBuf};

pub const BIN: &str = env!("CARGO_BIN_EXE_portexhaust");

/// How long a tracer may take to load its programs and say `ready:`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged tests need root: run them through `cargo xtask test` as root"
    );
}

/// Kills and reaps a child when a test ends, passed or failed.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private temporary directory, removed on drop; `tag` names it for whoever finds one.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("pxh-{tag}-"))
        .tempdir()
        .expect("temp dir")
}

/// The exit code, or minus the signal that ended the process.
fn exit_code(status: ExitStatus) -> i32 {
    status.code().or(status.signal().map(|s| -s)).unwrap_or(-1)
}

/// `portexhaust workload --wait ...`: isolated in its own network namespace (range and
/// tcp_tw_reuse already set), paused until `go()`. Killed on drop.
pub struct Workload {
    guard: Guard,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    pub pid: u32,
}

impl Workload {
    /// A paused workload of `scenario` that causes `failures` failures as `comm`.
    pub fn start(scenario: &str, failures: u64, comm: &str, extra: &[&str]) -> Self {
        let failures = failures.to_string();
        let args = [
            "--scenario",
            scenario,
            "--comm",
            comm,
            "--failures",
            &failures,
        ];
        Self::spawn(&[&args[..], extra].concat())
    }

    /// With `--linger`: after its report it keeps its namespace and sockets until `release()`.
    pub fn lingering(args: &[&str]) -> Self {
        Self::spawn(&[&["--linger"][..], args].concat())
    }

    /// `portexhaust workload --wait ARGS`, once it has said `{"ready":PID}`.
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["workload", "--wait"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start workload");
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let guard = Guard(child);
        let mut line = String::new();
        out.read_line(&mut line).expect("ready line");
        let v: Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("workload ready line {line:?}: {e}"));
        let pid = v["ready"].as_u64().expect("pid") as u32;
        Self {
            guard,
            stdin,
            out,
            pid,
        }
    }

    /// Run a workload to its end: the failures it caused itself, and nothing else.
    pub fn run(scenario: &str, failures: u64, comm: &str, extra: &[&str]) -> u64 {
        let mut w = Self::start(scenario, failures, comm, extra);
        w.go();
        expected_failures(&w.finish())
    }

    pub fn go(&mut self) {
        let s = self.stdin.as_mut().expect("stdin");
        s.write_all(b"go\n").expect("go");
        s.flush().expect("flush");
    }

    /// The report line, without waiting for the workload to exit (a lingering one does not).
    pub fn report(&mut self) -> Value {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("report");
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("report {line:?}: {e}"))
    }

    /// Wait for the workload to exit and return its report.
    pub fn finish(mut self) -> Value {
        drop(self.stdin.take());
        let mut out = String::new();
        self.out.read_to_string(&mut out).expect("report");
        let status = self.guard.0.wait().expect("wait");
        assert!(status.success(), "workload failed: {status}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("report {out:?}: {e}"))
    }

    /// `/proc/PID/ns/net` of the workload's namespace.
    pub fn netns_path(&self) -> String {
        format!("/proc/{}/ns/net", self.pid)
    }

    /// Let a lingering workload go, after its report: it must exit cleanly.
    pub fn release(mut self) {
        drop(self.stdin.take());
        let status = self.guard.0.wait().expect("wait");
        assert!(status.success(), "workload failed: {status}");
    }
}

/// Every backend this kernel runs, the cheapest first, as `trace --backend B` finds it (exit
/// 3 means "not on this kernel"; the VM matrix covers the others). The development machines
/// run tp-btf, raw-tp and tracepoint; a kernel test that finds none of them fails.
pub fn backends_here() -> Vec<String> {
    static CACHE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    CACHE
        .get_or_init(|| {
            let mut here = Vec::new();
            for b in ["tp-btf", "raw-tp", "fentry", "kprobe", "tracepoint"] {
                let out = Command::new(BIN)
                    .args(["trace", "--json", "--duration", "0.1", "--backend", b])
                    .output()
                    .expect("run portexhaust");
                match out.status.code() {
                    Some(0) => here.push(b.to_string()),
                    Some(3) => eprintln!(
                        "backend {b} is not available on this kernel: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                    other => panic!(
                        "trace --backend {b}: exit {other:?}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ),
                }
            }
            assert!(!here.is_empty(), "no backend runs on this kernel");
            eprintln!("backends on this kernel: {here:?}");
            here
        })
        .clone()
}

/// Whether the kernel offers function hooks (fentry or kprobes), which watch bind() and UDP
/// failures without syscall tracepoints.
pub fn function_hooks_here() -> bool {
    let b = backends_here();
    b.iter().any(|b| b == "fentry" || b == "kprobe")
}

/// The failures a workload report says it caused itself; it must have seen nothing else.
pub fn expected_failures(report: &Value) -> u64 {
    assert!(
        report["unexpected"].as_array().is_some_and(Vec::is_empty),
        "{report}"
    );
    report["expected"][0]["count"].as_u64().expect("count")
}

/// `portexhaust trace` (or `top`, or anything that prints `ready:` on stderr once it traces),
/// its stdout and stderr drained by threads so that a storm cannot fill a pipe and stall it.
/// Killed on drop.
pub struct Tracer {
    guard: Guard,
    stdout: Option<thread::JoinHandle<String>>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Tracer {
    /// `portexhaust trace ARGS`, ready.
    pub fn trace(args: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("trace").args(args);
        Self::start(cmd)
    }

    /// `portexhaust ARGS` (`trace ...`, `top ...`), ready.
    pub fn tool(args: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        Self::start(cmd)
    }

    /// Start `cmd` (any user, any capabilities) and wait until it is ready.
    pub fn start(cmd: Command) -> Self {
        Self::spawn(cmd).unwrap_or_else(|(err, code)| {
            panic!("tracer never became ready (exit {code:?}); stderr:\n{err}")
        })
    }

    /// Start `cmd` and wait for its ready line. Err((stderr, exit code)) when it exits, or is
    /// killed after 30 s, without one.
    pub fn spawn(mut cmd: Command) -> Result<Self, (String, Option<i32>)> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portexhaust");
        let mut so = child.stdout.take().expect("stdout");
        let se = child.stderr.take().expect("stderr");
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = so.read_to_string(&mut s);
            s
        });
        let (tx, rx) = mpsc::channel();
        let stderr = thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(se).lines().map_while(Result::ok) {
                if line.contains("ready:") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let mut t = Self {
            guard: Guard(child),
            stdout: Some(stdout),
            stderr: Some(stderr),
        };
        if rx.recv_timeout(READY_TIMEOUT).is_err() {
            let _ = t.guard.0.kill();
            let (status, _, err) = t.reap();
            return Err((err, status.code()));
        }
        Ok(t)
    }

    pub fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    /// SIGTERM, then (stdout, stderr, exit code).
    pub fn stop(self) -> (String, String, i32) {
        self.signal(libc::SIGTERM)
    }

    /// Send `sig`, then (stdout, stderr, exit code or -signal).
    pub fn signal(self, sig: i32) -> (String, String, i32) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.guard.0.id() as i32, sig) };
        self.wait()
    }

    /// Wait for it to end by itself (`--duration`, `--count`): (stdout, stderr, exit code or
    /// -signal).
    pub fn wait(mut self) -> (String, String, i32) {
        let (status, out, err) = self.reap();
        (out, err, exit_code(status))
    }

    fn reap(&mut self) -> (ExitStatus, String, String) {
        let status = self.guard.0.wait().expect("wait");
        let out = self.stdout.take().expect("once").join().expect("stdout");
        let err = self.stderr.take().expect("once").join().expect("stderr");
        (status, out, err)
    }
}

/// Failures the `tally` lines of a `trace --json` stream account for.
pub fn tallied(stdout: &str) -> u64 {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "tally")
        .map(|v| v["count"].as_u64().expect("tally count"))
        .sum()
}

/// The NDJSON of `trace --json`: (failure events, summary). It must start with its header.
pub fn events_and_summary(stdout: &str) -> (Vec<Value>, Value) {
    let mut events = Vec::new();
    let mut summary = Value::Null;
    for (i, l) in stdout.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON {l:?}: {e}"));
        match v["type"].as_str() {
            Some("header") if i == 0 => assert_eq!(v["version"], 2, "{v}"),
            Some("failure") => events.push(v),
            Some("summary") => summary = v,
            // Failures counted but not streamed (over --events-per-s, or a full ring buffer).
            Some("tally") => {}
            other => panic!("unknown record type {other:?}"),
        }
    }
    assert!(!summary.is_null(), "no summary in output:\n{stdout}");
    (events, summary)
}

/// `portexhaust report ...`: (stdout, stderr, exit code).
pub fn report(args: &[&str]) -> (String, String, i32) {
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

pub fn report_json(files: &[&std::path::Path], extra: &[&str]) -> (Value, String) {
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

/// Poll `f` every 50 ms until it holds; panic after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Wait for the workload; returns its report and the number of failures it caused itself.
pub fn finished(w: Workload) -> (Value, u64) {
    let report = w.finish();
    let n = expected_failures(&report);
    assert!(n > 0, "the workload caused no failure: {report}");
    (report, n)
}

/// The repository root (deployment files live in deploy/).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}
