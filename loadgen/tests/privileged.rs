//! Privileged tests of the load generators: real namespaces, real exhaustion, and a real
//! tracer to check that what a generator counts is what the kernel did (the benchmark's
//! exactness figures rest on it).
//!
//! Run by `cargo xtask test` as root, one at a time (`--ignored --test-threads=1`). They panic
//! rather than skip when they cannot run.
use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use portexhaust::kernel::loader::{BackendRequest, Filters, Tracer};
use pxh_loadgen::report::{ChurnReport, HoldReport, Ready, StormReport};
use serde::de::DeserializeOwned;

const BIN: &str = env!("CARGO_BIN_EXE_pxh-loadgen");

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged tests need root: run them through `cargo xtask test` as root"
    );
}

/// A generator started with --wait; killed and reaped when the test ends, passed or failed.
struct Gen {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Gen {
    fn start(args: &[&str]) -> (Self, Ready) {
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--wait")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pxh-loadgen");
        let stdin = child.stdin.take();
        let stdout: ChildStdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let g = Self {
            child,
            stdin,
            lines: rx,
        };
        let ready: Ready = g.next(Duration::from_secs(60));
        (g, ready)
    }

    fn next<T: DeserializeOwned>(&self, timeout: Duration) -> T {
        let line = self
            .lines
            .recv_timeout(timeout)
            .expect("a JSON line from pxh-loadgen in time");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("go");
        stdin.flush().expect("go");
    }

    /// Close stdin (a holder lets go) and require a clean exit.
    fn finish(mut self) {
        drop(self.stdin.take());
        for _ in 0..600 {
            if let Some(st) = self.child.try_wait().expect("wait") {
                assert!(st.success(), "pxh-loadgen failed: {st}");
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("pxh-loadgen did not exit within 60 s");
    }
}

impl Drop for Gen {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Failures the tracer counted in the kernel for one pid.
fn counted_for(tracer: &Tracer, pid: u32) -> u64 {
    tracer
        .counts()
        .expect("counts")
        .iter()
        .filter(|(k, _)| k.pid == pid)
        .map(|(_, v)| v.count)
        .sum()
}

fn tracer_for(pids: &[u32]) -> Tracer {
    let filters = Filters {
        pids: pids.to_vec(),
        ..Filters::default()
    };
    Tracer::open(BackendRequest::Auto, &filters)
        .expect("a backend runs on this kernel")
        .tracer
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn two_storms_count_exactly_what_the_kernel_saw() {
    require_root();
    let n = 30_000u64;
    let args = ["storm", "--failures", "30000", "--comm", "pxhl-t-storm"];
    let (mut a, ra) = Gen::start(&args);
    let (mut b, rb) = Gen::start(&args);
    assert_ne!(ra.netns, rb.netns, "each storm has its own namespace");
    let tracer = tracer_for(&[ra.ready, rb.ready]);
    a.go();
    b.go();
    for (g, pid) in [(&a, ra.ready), (&b, rb.ready)] {
        let r: StormReport = g.next(Duration::from_secs(120));
        assert_eq!(r.pid, pid);
        assert_eq!(r.failures, n, "{r:?}");
        assert!(r.other.is_empty() && !r.truncated, "{r:?}");
        assert!(r.rate_per_s > 0.0 && r.user_s + r.sys_s > 0.0, "{r:?}");
        assert_eq!(
            counted_for(&tracer, pid),
            n,
            "the kernel saw as many failures as the client counted"
        );
    }
    assert_eq!(tracer.failures_total().expect("total"), 2 * n);
    a.finish();
    b.finish();
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn churn_outlasts_a_small_range_without_a_failure() {
    require_root();
    // 64 ports for 1.5 s: if closed client ports sat in TIME_WAIT (60 s, reusable after 1 s
    // at the earliest), connects would fail after the first 64.
    let (mut g, r) = Gen::start(&[
        "churn",
        "--ports",
        "64",
        "--secs",
        "1.5",
        "--comm",
        "pxhl-t-churn",
    ]);
    let tracer = tracer_for(&[r.ready]);
    g.go();
    let rep: ChurnReport = g.next(Duration::from_secs(60));
    assert!(rep.errors.is_empty(), "{rep:?}");
    assert!(
        rep.connects > 64 * 10,
        "the range was recycled many times: {rep:?}"
    );
    assert_eq!(rep.first_close, "server");
    assert_eq!(
        counted_for(&tracer, r.ready),
        0,
        "successful connects are no failures"
    );
    g.finish();
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn holder_keeps_every_connection_until_released() {
    require_root();
    // More than one process can hold under the usual 20000-fd limit: workers are needed.
    let n = 12_000u64;
    let (mut g, r) = Gen::start(&[
        "hold",
        "--connections",
        "12000",
        "--churn-secs",
        "0.3",
        "--comm",
        "pxhl-t-hold",
    ]);
    g.go();
    let rep: HoldReport = g.next(Duration::from_secs(120));
    assert_eq!(rep.pid, r.ready);
    assert_eq!(rep.connections, n, "{rep:?}");
    assert_eq!(
        rep.established,
        2 * n,
        "both ends of every connection: {rep:?}"
    );
    assert!(rep.churned > 0, "{rep:?}");
    assert!(rep.workers >= 1 && u64::from(rep.dests) == 8 * u64::from(rep.workers));
    // Still holding: the holder's namespace has them all until stdin closes.
    let tcp = std::fs::read_to_string(format!("/proc/{}/net/tcp", r.ready)).expect("net/tcp");
    assert_eq!(portexhaust_workload::count_state(&tcp, "01"), 2 * n);
    g.finish();
    assert!(
        !std::path::Path::new(&format!("/proc/{}", r.ready)).exists(),
        "the holder is gone after release"
    );
}
