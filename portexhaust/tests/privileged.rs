//! Privileged tests: real eBPF programs on the running kernel, real exhaustion in private
//! network namespaces (each workload unshares its own; it vanishes with the process).
//!
//! Run by `cargo xtask test` as root, one at a time (`--ignored --test-threads=1`): they load
//! programs into the one kernel and must not see each other's workloads. They panic rather
//! than skip when they cannot run: a kernel test that silently does nothing proves nothing.
mod common;

use std::{
    io::{BufRead, BufReader, Read},
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{
    BIN, Guard, Tracer, Workload, backends_here, events_and_summary, function_hooks_here,
    require_root, tallied,
};
use serde_json::Value;

/// Run one workload under `trace --json --pid <it> --backend B TRACE_ARGS` and return
/// (events, summary, report).
fn traced(
    backend: &str,
    scenario: &str,
    failures: u64,
    comm: &str,
    extra: &[&str],
    trace_args: &[&str],
) -> (Vec<Value>, Value, Value) {
    require_root();
    let mut w = Workload::start(scenario, failures, comm, extra);
    let pid = w.pid.to_string();
    let t = Tracer::trace(
        &[
            &["--json", "--pid", &pid, "--backend", backend][..],
            trace_args,
        ]
        .concat(),
    );
    w.go();
    let report = w.finish();
    let (out, err, code) = t.stop();
    assert_eq!(code, 0, "trace --backend {backend} failed:\n{err}");
    let (events, summary) = events_and_summary(&out);
    assert_eq!(summary["backend"], backend, "{summary}");
    (events, summary, report)
}

/// The workload saw `n` failures of this errno; the tracer must agree on every field.
fn assert_exact(
    events: &[Value],
    summary: &Value,
    report: &Value,
    want: (&str, u64, &str, &str, &str),
) {
    let (dst, errno, site, proto, family) = want;
    let pid = report["pid"].as_u64().expect("pid");
    let seen = &report["expected"][0];
    assert_eq!(seen["dst"], dst, "{report}");
    let n = seen["count"].as_u64().expect("count");
    assert!(n > 0, "the workload caused no failure: {report}");
    assert!(
        report["unexpected"].as_array().is_some_and(Vec::is_empty),
        "{report}"
    );

    assert_eq!(events.len() as u64, n, "one event per failure");
    for e in events {
        assert_eq!(e["pid"], pid);
        assert_eq!(e["comm"], report["comm"]);
        assert_eq!(e["dst"], dst);
        assert_eq!(e["errno"], errno);
        assert_eq!(e["site"], site);
        assert_eq!(e["proto"], proto);
        assert_eq!(e["family"], family);
        assert_eq!(e["netns"], report["netns"], "namespace of the workload");
        assert_eq!(e["backend"], summary["backend"]);
        assert!(e["ts"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
    assert_eq!(summary["failures_total"], n, "exact in-kernel total");
    assert_eq!(summary["dropped_events"], 0);
    let off = &summary["offenders"];
    assert_eq!(off.as_array().map(Vec::len), Some(1), "{summary}");
    assert_eq!(off[0]["pid"], pid);
    assert_eq!(off[0]["comm"], report["comm"]);
    assert_eq!(off[0]["failures"], n);
    assert_eq!(off[0]["destinations"][0]["dst"], dst);
    assert_eq!(off[0]["destinations"][0]["errno"], errno);
    assert_eq!(off[0]["destinations"][0]["failures"], n);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv4_held_connections_exhaust_the_range() {
    for b in backends_here() {
        let (events, summary, report) = traced(&b, "v4", 25, "pxh-t-v4", &[], &[]);
        assert_exact(
            &events,
            &summary,
            &report,
            ("127.0.0.1:5000", 99, "__inet_hash_connect", "tcp", "ipv4"),
        );
        assert!(
            events
                .iter()
                .all(|e| e["src"] == "127.0.0.1" && e["errname"] == "EADDRNOTAVAIL"),
            "{b}: {events:?}"
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_held_connections_exhaust_the_range() {
    for b in backends_here() {
        let (events, summary, report) = traced(&b, "v6", 25, "pxh-t-v6", &[], &[]);
        assert_exact(
            &events,
            &summary,
            &report,
            ("[::1]:5000", 99, "__inet_hash_connect", "tcp", "ipv6"),
        );
        assert!(events.iter().all(|e| e["src"] == "::1"), "{b}: {events:?}");
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn v4_mapped_destinations_on_ipv6_sockets() {
    for b in backends_here() {
        let (events, summary, report) = traced(&b, "v4mapped", 12, "pxh-t-mapped", &[], &[]);
        assert_exact(
            &events,
            &summary,
            &report,
            (
                "[::ffff:127.0.0.1]:5000",
                99,
                "__inet_hash_connect",
                "tcp",
                "ipv6",
            ),
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn time_wait_exhaustion_with_tw_reuse_off() {
    for b in backends_here() {
        let (events, summary, report) =
            traced(&b, "timewait", 20, "pxh-t-tw", &["--ports", "16"], &[]);
        assert_eq!(
            report["time_wait_before"], 16,
            "every port of the range was in TIME_WAIT before the failing connects: {report}"
        );
        assert_exact(
            &events,
            &summary,
            &report,
            ("127.0.0.1:5000", 99, "__inet_hash_connect", "tcp", "ipv4"),
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn bind_port_zero_eaddrinuse() {
    for b in backends_here() {
        let (events, summary, report) =
            traced(&b, "bind", 15, "pxh-t-bind", &[], &["--catch", "bind"]);
        assert_exact(
            &events,
            &summary,
            &report,
            ("127.0.0.1:0", 98, "bind", "tcp", "ipv4"),
        );
        assert!(events.iter().all(|e| e["errname"] == "EADDRINUSE"));
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn udp_autobind_eagain() {
    for b in backends_here() {
        let (events, summary, report) =
            traced(&b, "udp", 15, "pxh-t-udp", &[], &["--catch", "udp"]);
        assert_exact(
            &events,
            &summary,
            &report,
            ("127.0.0.1:5001", 11, "udp_autobind", "udp", "ipv4"),
        );
        assert!(events.iter().all(|e| e["errname"] == "EAGAIN"));
    }
}

/// Without --catch, bind() and UDP failures on a kernel with no function hooks are not
/// watched: the startup line says so and nothing is reported (never a silent 0 that looks
/// like "no failures"); the summary lists them as not watched.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn unwatched_kinds_are_said_to_be_unwatched() {
    require_root();
    if function_hooks_here() {
        eprintln!("this kernel offers fexit/kprobes: bind and udp are watched by default");
        return;
    }
    let (events, summary, _) = traced("tp-btf", "bind", 5, "pxh-t-nobind", &[], &[]);
    assert!(events.is_empty(), "{events:?}");
    let not = &summary["not_watched"];
    for kind in ["bind", "udp", "connect-early"] {
        assert!(
            not[kind]
                .as_str()
                .is_some_and(|why| why.contains("--catch")),
            "{kind} must be listed as not watched, with how to watch it: {summary}"
        );
    }
    assert!(
        summary["watched"]
            .as_array()
            .is_some_and(|w| w.iter().any(|k| k == "connect")),
        "{summary}"
    );
}

/// io_uring's IORING_OP_CONNECT calls the socket's connect op without the connect() syscall,
/// so the connect() syscall tracepoints never see it; every backend now watches the kernel's
/// connect path (inet_sock_set_state, or tcp_v4_connect and __inet_hash_connect) and must.
/// The default submission completes inline in the submitting task; IOSQE_ASYNC and SQPOLL run
/// it in io_uring's own threads (same pid, comm `iou-wrk-*`/`iou-sqp-*`).
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn io_uring_connects_are_caught_by_every_backend() {
    require_root();
    let n = 50u64;
    let comm = "pxh-t-uring";
    for backend in backends_here() {
        let mut w = Workload::start("uring", n, comm, &[]);
        let t = Tracer::trace(&["--json", "--comm", comm, "--backend", &backend]);
        w.go();
        let report = w.finish();
        let (out, err, code) = t.stop();
        assert_eq!(code, 0, "trace --backend {backend} failed:\n{err}");
        assert_eq!(
            report["expected"][0]["count"], n,
            "the workload itself must see {n} io_uring EADDRNOTAVAIL completions: {report}"
        );
        let (events, summary) = events_and_summary(&out);
        assert_eq!(summary["backend"], backend.as_str(), "{summary}");
        assert_eq!(
            summary["failures_total"], n,
            "backend {backend}: exact in-kernel count of the {n} io_uring connect failures \
             of pid {}: {summary}",
            report["pid"]
        );
        assert_exact(
            &events,
            &summary,
            &report,
            ("127.0.0.1:5000", 99, "__inet_hash_connect", "tcp", "ipv4"),
        );
        assert!(events.iter().all(|e| e["errname"] == "EADDRNOTAVAIL"));
    }
}

/// A seccomp filter that refuses io_uring_setup() with EPERM, as container runtimes' default
/// profiles do: the refusal is seen without touching the host's `kernel.io_uring_disabled`.
fn refuse_io_uring_setup(cmd: &mut Command) {
    let nr = libc::SYS_io_uring_setup as u32;
    let filter = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0, // seccomp_data.nr
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: nr,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    // SAFETY: between fork and exec the closure only makes two prctl() calls on memory it
    // owns (the filter is moved into it).
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn uring_workload_without_io_uring_is_a_one_line_error() {
    require_root();
    let mut cmd = Command::new(BIN);
    cmd.args(["workload", "--scenario", "uring", "--failures", "5"]);
    refuse_io_uring_setup(&mut cmd);
    let out = cmd.output().expect("run the workload");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        out.stdout.is_empty(),
        "no report: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("io_uring is not available here")
            && err.contains("io_uring_setup() was refused")
            && err.contains("kernel.io_uring_disabled"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn storm_of_100k_failures_is_counted_exactly() {
    require_root();
    let n = 100_000u64;
    let mut w = Workload::start("storm", n, "pxh-t-storm", &[]);
    let pid = w.pid.to_string();
    let t = Tracer::trace(&["--json", "--pid", &pid]);
    w.go();
    let report = w.finish();
    assert_eq!(report["expected"][0]["count"], n, "{report}");
    let (out, err, code) = t.stop();
    assert_eq!(code, 0, "{err}");
    let (events, summary) = events_and_summary(&out);
    assert_eq!(summary["failures_total"], n, "exact total: {summary}");
    assert_eq!(summary["offenders"][0]["failures"], n);
    // The stream is bounded (--events-per-s, 1000 by default): the rest are tallied exactly.
    let tally = tallied(&out);
    assert!(tally > 0, "a storm goes over the event budget");
    assert!(
        events.len() as u64 <= 1000 * 8,
        "{} events: the budget bounds the stream",
        events.len()
    );
    assert_eq!(
        events.len() as u64 + tally,
        n,
        "every failure is shown or tallied, exactly once"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_stalled_reader_drops_events_but_counts_stay_exact() {
    require_root();
    let n = 200_000u64;
    let mut w = Workload::start("storm", n, "pxh-t-drop", &[]);
    let pid = w.pid.to_string();
    // stdout is not read while the storm runs: the tracer blocks on the full pipe, the ring
    // buffer fills up and the kernel counts what it could not queue.
    // Every failure streamed (--events-per-s 0), so that the ring buffer overflows.
    let mut child = Command::new(BIN)
        .args(["trace", "--json", "--events-per-s", "0", "--pid", &pid])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("trace");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut guard = Guard(child);
    let mut line = String::new();
    while !line.contains("ready:") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).expect("stderr") > 0,
            "no ready line"
        );
    }
    w.go();
    let report = w.finish();
    assert_eq!(report["expected"][0]["count"], n);
    let mut so = guard.0.stdout.take().expect("stdout");
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
    let status = guard.0.wait().expect("wait");
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err);
    assert!(status.success(), "{err}");
    let out_text = reader.join().expect("stdout");
    let (events, summary) = events_and_summary(&out_text);
    let dropped = summary["dropped_events"].as_u64().expect("dropped");
    assert!(
        dropped > 0,
        "the stalled reader should have made the ring buffer overflow"
    );
    assert_eq!(summary["failures_total"], n, "exact despite the drops");
    assert_eq!(summary["offenders"][0]["failures"], n);
    let stdout = &out_text;
    assert_eq!(
        events.len() as u64 + tallied(stdout),
        n,
        "the dropped events are tallied: every failure accounted for once"
    );
    assert!(tallied(stdout) >= dropped);
    assert!(
        err.contains("dropped (ring buffer full"),
        "live warning: {err}"
    );
}

/// CPUs the kernel's per-CPU maps have a slot for (/sys/devices/system/cpu/possible: "0-7").
fn possible_cpus() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    text.trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().expect("cpu") - a.parse::<usize>().expect("cpu") + 1,
            None => 1,
        })
        .sum()
}

/// A host that starts failing processes all day: the counts of the ones that exited leave
/// the kernel's map before it fills, and stay counted. Eight processes fail one after the
/// other with a counts map of four keys; every one of them keeps its exact count, nothing is
/// uncounted.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn exited_failers_make_room_in_the_counts_map() {
    require_root();
    let per_workload = 50u64;
    let backend = backends_here().remove(0);
    let mut ws: Vec<Workload> = (0..8)
        .map(|i| Workload::start("storm", per_workload, &format!("pxh-t-ret{i}"), &[]))
        .collect();
    let pids: Vec<String> = ws.iter().map(|w| w.pid.to_string()).collect();
    let mut args = vec!["--json", "--max-count-keys", "4", "--backend", &backend];
    for p in &pids {
        args.extend(["--pid", p.as_str()]);
    }
    let t = Tracer::trace(&args);
    for w in ws.drain(..) {
        let mut w = w;
        w.go();
        assert_eq!(w.finish()["expected"][0]["count"], per_workload);
        // Two a retirement period (5 s): the map of four never holds more than three.
        std::thread::sleep(Duration::from_millis(2500));
    }
    let (out, err, code) = t.stop();
    assert_eq!(code, 0, "{err}");
    let (_, summary) = events_and_summary(&out);
    assert_eq!(summary["failures_total"], 8 * per_workload, "{summary}");
    assert_eq!(summary["uncounted_keys"], 0, "room was made: {summary}");
    let offenders = summary["offenders"].as_array().expect("offenders");
    assert_eq!(offenders.len(), 8, "{summary}");
    for o in offenders {
        assert_eq!(o["failures"], per_workload, "each exact: {o}");
        assert!(
            o["comm"]
                .as_str()
                .is_some_and(|c| c.starts_with("pxh-t-ret")),
            "{o}"
        );
    }
}

/// A counts map too small for the failing keys: the kernel counts the rest in
/// `uncounted_keys` and says so through aya-log once per CPU, not once per failure.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_full_counts_map_is_logged_once_per_cpu() {
    require_root();
    let per_workload = 2000u64;
    for backend in backends_here() {
        // Three processes failing towards their namespaces' 127.0.0.1:5000: three count keys
        // for a map of two, so every failure of one of them finds the map full.
        let mut ws: Vec<Workload> = (0..3)
            .map(|i| Workload::start("storm", per_workload, &format!("pxh-t-full{i}"), &[]))
            .collect();
        let pids: Vec<String> = ws.iter().map(|w| w.pid.to_string()).collect();
        let mut args = vec![
            "-v",
            "--json",
            "--max-count-keys",
            "2",
            "--backend",
            &backend,
        ];
        for p in &pids {
            args.extend(["--pid", p.as_str()]);
        }
        let t = Tracer::trace(&args);
        for w in &mut ws {
            w.go();
        }
        for w in ws {
            assert_eq!(w.finish()["expected"][0]["count"], per_workload);
        }
        let (out, err, code) = t.stop();
        assert_eq!(code, 0, "{backend}: {err}");
        let (_, summary) = events_and_summary(&out);
        assert_eq!(summary["failures_total"], 3 * per_workload, "{summary}");
        let uncounted = summary["uncounted_keys"].as_u64().expect("uncounted_keys");
        assert!(
            uncounted > 0,
            "{backend}: a map of 2 keys cannot hold 3: {summary}"
        );
        let counted: u64 = summary["offenders"]
            .as_array()
            .expect("offenders")
            .iter()
            .map(|o| o["failures"].as_u64().expect("failures"))
            .sum();
        assert_eq!(
            counted + uncounted,
            3 * per_workload,
            "{backend}: every failure is in a key or in uncounted_keys: {summary}"
        );

        let said: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("counts map full"))
            .collect();
        assert!(
            !said.is_empty(),
            "{backend}: no warning from the kernel:\n{err}"
        );
        for l in &said {
            assert!(l.starts_with("portexhaust: warn: "), "{backend}: {l}");
        }
        // At most once per CPU: each line names its CPU, and no CPU twice.
        let mut cpus: Vec<&str> = said
            .iter()
            .map(|l| {
                l.split("first on cpu ")
                    .nth(1)
                    .and_then(|r| r.split(':').next())
                    .unwrap_or_else(|| panic!("no cpu in {l:?}"))
            })
            .collect();
        cpus.sort_unstable();
        cpus.dedup();
        assert_eq!(
            cpus.len(),
            said.len(),
            "{backend}: a CPU said it twice:\n{err}"
        );
        assert!(
            said.len() <= possible_cpus(),
            "{backend}: {} warnings for {} CPUs after {uncounted} map-full failures:\n{err}",
            said.len(),
            possible_cpus()
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn filters_by_pid_comm_and_dport() {
    require_root();
    let mut a = Workload::start("v4", 7, "pxh-t-fa", &["--dport", "5000"]);
    let mut b = Workload::start("v4", 9, "pxh-t-fb", &["--dport", "6000"]);
    let pid_a = a.pid.to_string();
    let by_pid = Tracer::trace(&["--json", "--pid", &pid_a]);
    let by_comm = Tracer::trace(&["--json", "--comm", "pxh-t-fb"]);
    let by_dport = Tracer::trace(&["--json", "--dport", "6000"]);
    let both = Tracer::trace(&["--json", "--comm", "pxh-t-fa", "--comm", "pxh-t-fb"]);
    a.go();
    b.go();
    let (ra, rb) = (a.finish(), b.finish());
    assert_eq!(ra["expected"][0]["count"], 7);
    assert_eq!(rb["expected"][0]["count"], 9);

    let check = |t: Tracer, want_pids: &[u64], want_total: u64| {
        let (out, err, code) = t.stop();
        assert_eq!(code, 0, "{err}");
        let (events, summary) = events_and_summary(&out);
        assert_eq!(summary["failures_total"], want_total, "{summary}");
        assert_eq!(events.len() as u64, want_total);
        for e in &events {
            let p = e["pid"].as_u64().expect("pid");
            assert!(want_pids.contains(&p), "unexpected pid {p}");
        }
    };
    let (pa, pb) = (
        ra["pid"].as_u64().expect("a"),
        rb["pid"].as_u64().expect("b"),
    );
    check(by_pid, &[pa], 7);
    check(by_comm, &[pb], 9);
    check(by_dport, &[pb], 9);
    check(both, &[pa, pb], 16);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn duration_stops_the_tracer_and_human_output_has_a_summary() {
    require_root();
    let mut w = Workload::start("v4", 3, "pxh-t-human", &[]);
    let pid = w.pid.to_string();
    let t = Tracer::trace(&["--duration", "2", "--pid", &pid]);
    w.go();
    let _ = w.finish();
    let started = Instant::now();
    let (out, err, code) = t.wait();
    assert_eq!(code, 0, "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut it = out.lines();
    let header = it.next().expect("header");
    assert!(
        header.starts_with("TIME") && header.contains("DESTINATION") && header.contains("SITE")
    );
    let rows: Vec<&str> = out.lines().filter(|l| l.contains("pxh-t-human")).collect();
    assert!(rows.len() >= 4, "3 rows and an offender line:\n{out}");
    assert!(rows[0].contains("127.0.0.1:5000") && rows[0].contains("EADDRNOTAVAIL"));
    assert!(out.contains("3 exhaustion failures"), "{out}");
    assert!(out.contains("Offenders:"), "{out}");
    assert!(err.contains("using backend"), "{err}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn non_root_gets_a_one_line_error() {
    require_root();
    let out = Command::new(BIN)
        .args(["trace", "--duration", "1"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing on stdout");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("not enough privileges") && err.contains("sudo"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn unavailable_backend_is_a_clear_error() {
    require_root();
    let kprobes = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    let out = Command::new(BIN)
        .args(["trace", "--backend", "kprobe", "--duration", "0.5"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    if kprobes {
        assert!(out.status.success(), "{err}");
    } else {
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains("backend kprobe is not available on this kernel"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn selftest_passes_on_every_backend_with_and_without_catch() {
    require_root();
    for backend in backends_here() {
        for catch in [None, Some("all")] {
            let mut cmd = Command::new(BIN);
            cmd.args(["selftest", "--backend", &backend]);
            if let Some(c) = catch {
                cmd.args(["--catch", c]);
            }
            let out = cmd.output().expect("selftest");
            let so = String::from_utf8_lossy(&out.stdout);
            let se = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{backend} {catch:?}:\n{so}\n{se}");
            assert!(so.contains("selftest passed"), "{so}");
            for row in ["EADDRNOTAVAIL", "EADDRINUSE", "EAGAIN", "[::1]:5000"] {
                assert!(so.contains(row), "{row} missing:\n{so}");
            }
            assert!(so.contains("syscall tracepoints attached"), "{so}");
            let watched_all = so
                .lines()
                .filter(|l| l.contains("EADDRINUSE") || l.contains("EAGAIN"))
                .all(|l| l.contains("pass"));
            let unwatched = so.contains("not watched");
            if catch.is_some() {
                assert!(
                    watched_all && !unwatched,
                    "--catch all watches everything:\n{so}"
                );
            } else if !function_hooks_here() {
                assert!(
                    unwatched,
                    "bind/udp are not watched without --catch here:\n{so}"
                );
            }
        }
    }
}

/// The kernel's own list of what the tracer attached (its links, as /proc/PID/fdinfo shows
/// them; selftest reads the same through BPF_TASK_FD_QUERY and the link info): the state hook,
/// and no syscall tracepoint unless asked for.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn nothing_on_the_syscall_path_by_default() {
    require_root();
    for backend in backends_here() {
        for catch in [None, Some("all")] {
            let mut args = vec!["--json", "--backend", backend.as_str()];
            if let Some(c) = catch {
                args.extend(["--catch", c]);
            }
            let t = Tracer::trace(&args);
            let hooks = kernel_hooks_of(t.pid());
            let (_, err, code) = t.stop();
            assert_eq!(code, 0, "{err}");
            assert!(
                hooks.iter().any(|h| h.contains("inet_sock_set_state")),
                "{backend}: the state hook must be in the kernel's list: {hooks:?}"
            );
            let syscall: Vec<&String> = hooks
                .iter()
                .filter(|h| h.contains("sys_enter") || h.contains("sys_exit"))
                .collect();
            match catch {
                None => assert!(
                    syscall.is_empty(),
                    "{backend}: syscall tracepoints attached by default: {syscall:?}"
                ),
                Some(_) if !function_hooks_here() => assert!(
                    !syscall.is_empty(),
                    "{backend}: --catch all on a kernel without function hooks needs syscall \
                     tracepoints: {hooks:?}"
                ),
                Some(_) => {}
            }
        }
    }
}

/// "link_type tp_name/func" of every BPF link `pid` holds, from the kernel's own
/// /proc/PID/fdinfo (which names the tracepoint or function of each link on this kernel).
fn kernel_hooks_of(pid: u32) -> Vec<String> {
    let mut hooks = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo") {
        let info = std::fs::read_to_string(e.expect("entry").path()).unwrap_or_default();
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        if let Some(ty) = field("link_type:") {
            let target = field("tp_name:")
                .or_else(|| field("func_name:"))
                .unwrap_or_default();
            hooks.push(format!("{ty} {target}"));
        }
    }
    hooks
}
