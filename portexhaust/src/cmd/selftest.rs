//! `portexhaust selftest`: does tracing work on this kernel? Exhaust a private namespace for
//! real and check that the tracer saw exactly what the workload saw.
use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use portexhaust_common::{
    Cause, Site, kind_name,
    programs::{Hook, Set},
};

use portexhaust_workload::{Expected, WorkloadReport};

use crate::{
    cmd::trace::announce,
    engine::counts::{Counts, of_exact},
    kernel::{
        Error, Result, attached,
        clock::Clock,
        gather::exact_counts,
        loader::{BackendRequest, Filters, Tracer, Tracking},
    },
    schema::{Errno, Failure, event::decode_event},
};

pub const SELFTEST_COMM: &str = "pxh-selftest";

/// Kills the workload if the self-test bails out early, so nothing is left behind.
struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One row of the result table.
#[derive(Debug)]
pub struct Check {
    pub what: String,
    pub expected: u64,
    pub events: u64,
    pub counted: u64,
    pub ok: bool,
    /// The failure kind is not watched on this kernel with these options: the row says so
    /// instead of showing a 0 that looks like a miss.
    pub not_watched: bool,
}

pub struct SelftestResult {
    pub backend: &'static str,
    pub checks: Vec<Check>,
}

impl SelftestResult {
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok || c.not_watched)
    }

    pub fn table(&self) -> String {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(["check", "expected", "events", "counted", "result"]);
        for c in &self.checks {
            t.add_row([
                c.what.clone(),
                c.expected.to_string(),
                c.events.to_string(),
                c.counted.to_string(),
                if c.not_watched {
                    "not watched"
                } else if c.ok {
                    "pass"
                } else {
                    "FAIL"
                }
                .to_string(),
            ]);
        }
        t.to_string()
    }
}

fn spawn_workload(failures: u64) -> Result<(ChildGuard, u32)> {
    let exe = std::env::current_exe().map_err(|e| Error::io("locating own executable", e))?;
    let child = Command::new(exe)
        .args(["workload", "--scenario", "all", "--ports", "10", "--comm"])
        .arg(SELFTEST_COMM)
        .args(["--failures", &failures.to_string(), "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::io("starting the self-test workload", e))?;
    let mut guard = ChildGuard(child);
    let stdout = guard
        .0
        .stdout
        .as_mut()
        .ok_or_else(|| Error::io("workload stdout", std::io::ErrorKind::BrokenPipe.into()))?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| Error::io("reading the workload's ready line", e))?;
    let v: serde_json::Value = serde_json::from_str(line.trim()).map_err(|e| {
        Error::io(
            format!("the workload did not start (said {line:?})"),
            std::io::Error::other(e),
        )
    })?;
    let pid = v["ready"].as_u64().ok_or_else(|| {
        Error::io(
            "workload ready line",
            std::io::ErrorKind::InvalidData.into(),
        )
    })?;
    Ok((guard, pid as u32))
}

/// Compare what the workload saw with what the tracer reported. `watched`: the `KIND_*` bits
/// the tracer watches; failures of other kinds are marked not watched and left out of the
/// total. Pure, for unit tests.
pub fn compare(
    report: &WorkloadReport,
    events: &[Failure],
    counts: &Counts,
    failures_total: u64,
    watched: u32,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut sum = 0;
    for e in &report.expected {
        let Expected {
            dst,
            errno,
            site,
            proto,
            cause,
            count,
        } = e;
        // Workloads older than causes say none: any cause matches.
        let cause_ok = |c: Cause| cause.is_empty() || c.name() == cause;
        let kind = Site::from_name(site).map_or(0, Site::kind);
        if watched & kind == 0 {
            checks.push(Check {
                what: format!(
                    "{proto} {dst} {} at {site} ({})",
                    Errno(*errno).name(),
                    kind_name(kind)
                ),
                expected: *count,
                events: 0,
                counted: 0,
                ok: false,
                not_watched: true,
            });
            continue;
        }
        sum += count;
        let matching = events
            .iter()
            .filter(|f| {
                f.pid == report.pid
                    && f.comm == report.comm
                    && f.dst.to_string() == *dst
                    && f.errno == Errno(*errno)
                    && f.site.name() == site
                    && f.proto.name() == proto
                    && cause_ok(f.cause)
            })
            .count() as u64;
        let counted: u64 = counts
            .iter()
            .filter(|(k, _)| {
                k.pid == report.pid
                    && k.dst.to_string() == *dst
                    && k.errno == Errno(*errno)
                    && cause_ok(k.cause)
            })
            .map(|(_, v)| v.count)
            .sum();
        checks.push(Check {
            what: format!(
                "{proto} {dst} {} at {site}{}",
                Errno(*errno).name(),
                if cause.is_empty() {
                    String::new()
                } else {
                    format!(" ({cause})")
                }
            ),
            expected: *count,
            events: matching,
            counted,
            ok: *count > 0 && matching == *count && counted == *count,
            not_watched: false,
        });
    }
    if let Some(ns) = report.netns {
        // The kernel reads the namespace through offsets resolved from BTF at load time:
        // this row proves them on the running kernel.
        let right = events.iter().filter(|f| f.netns == Some(ns)).count() as u64;
        checks.push(Check {
            what: format!("network namespace {ns} in every event (kernel BTF offsets)"),
            expected: sum,
            events: right,
            counted: 0,
            ok: right == events.len() as u64 && right > 0,
            not_watched: false,
        });
    }
    let foreign = events.iter().filter(|f| f.pid != report.pid).count() as u64;
    checks.push(Check {
        what: "events from other processes (pid filter)".into(),
        expected: 0,
        events: foreign,
        counted: 0,
        ok: foreign == 0,
        not_watched: false,
    });
    checks.push(Check {
        what: "total failures (exact in-kernel count)".into(),
        expected: sum,
        events: events.len() as u64,
        counted: failures_total,
        ok: events.len() as u64 == sum && failures_total == sum,
        not_watched: false,
    });
    if !report.unexpected.is_empty() {
        for (what, n) in &report.unexpected {
            checks.push(Check {
                what: format!("workload: unexpected outcome {what}"),
                expected: 0,
                events: 0,
                counted: *n,
                ok: false,
                not_watched: false,
            });
        }
    }
    checks
}

/// Rows from the kernel's own list of what this process attached: the state hook must be
/// there, and syscall tracepoints only if asked for.
fn attachment_checks(tracer: &Tracer) -> Vec<Check> {
    let list = match attached::of_process(std::process::id()) {
        Ok(l) => l,
        Err(e) => {
            return vec![Check {
                what: format!("the kernel's list of attached hooks could not be read: {e}"),
                expected: 1,
                events: 0,
                counted: 0,
                ok: false,
                not_watched: false,
            }];
        }
    };
    log::debug!("kernel's list of attachments: {list:?}");
    let mut state = list
        .iter()
        .filter(|a| a.target == "inet_sock_set_state")
        .count() as u64;
    // Before 6.6 a perf-event link does not name its event: the perf-tracepoint state hook
    // then shows as one of those.
    let perf_state = tracer.attached.iter().any(|p| p.set == Set::StatePerf);
    let undescribed = list.iter().filter(|a| a.undescribed()).count() as u64;
    if state == 0 && perf_state && undescribed > 0 {
        state = 1;
    }
    let mut syscall = list.iter().filter(|a| a.on_syscall_path()).count() as u64;
    let want_syscall = tracer
        .attached
        .iter()
        .filter(|p| p.hook.on_syscall_path())
        .count() as u64;
    // Likewise, count undescribed perf links against the perf-based programs the loader
    // attached: any surplus could be a syscall tracepoint.
    if undescribed > 0 {
        let perf_based = tracer
            .attached
            .iter()
            .filter(|p| {
                matches!(
                    p.hook,
                    Hook::TracePoint { .. } | Hook::KProbe(_) | Hook::KRetProbe(_)
                )
            })
            .count() as u64;
        let others = perf_based.saturating_sub(want_syscall);
        syscall += undescribed.saturating_sub(others);
    }
    vec![
        Check {
            what: "inet_sock_set_state hook in the kernel's list of attachments".into(),
            expected: 1,
            events: state,
            counted: 0,
            ok: state == 1,
            not_watched: false,
        },
        Check {
            what: if want_syscall == 0 {
                "syscall tracepoints attached (kernel's list; none unless --catch)".into()
            } else {
                "syscall tracepoints attached (kernel's list; asked for by --catch)".into()
            },
            expected: want_syscall,
            events: syscall,
            counted: 0,
            ok: syscall == want_syscall,
            not_watched: false,
        },
    ]
}

pub fn run(backend: BackendRequest, failures: u64, catch: u32) -> Result<SelftestResult> {
    let opened = Tracer::open_with(
        backend,
        &Filters {
            pid_whitelist: true,
            ..Default::default()
        },
        Tracking {
            catch,
            ..Default::default()
        },
    )?;
    announce(&opened.tracer, &opened.skipped);
    let mut tracer = opened.tracer;
    let clock = Clock::new();

    let (mut child, pid) = spawn_workload(failures)?;
    tracer.add_pid_filter(pid)?;
    eprintln!(
        "portexhaust: selftest: workload pid {pid} exhausting a private network namespace (10 ports)"
    );
    child
        .0
        .stdin
        .as_mut()
        .ok_or_else(|| Error::io("workload stdin", std::io::ErrorKind::BrokenPipe.into()))?
        .write_all(b"go\n")
        .map_err(|e| Error::io("starting the workload", e))?;

    let mut events: Vec<Failure> = Vec::new();
    let mut collect = |tracer: &mut Tracer| {
        tracer.drain(|b| {
            if let Ok((_, f)) = decode_event(b, |t| clock.ts(t)) {
                events.push(f);
            }
        });
    };
    let started = Instant::now();
    let status = loop {
        collect(&mut tracer);
        match child.0.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > Duration::from_secs(120) => {
                return Err(Error::io(
                    "the self-test workload",
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "did not finish in 120 s"),
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(Error::io("waiting for the workload", e)),
        }
    };
    let mut out = String::new();
    if let Some(mut so) = child.0.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut so, &mut out);
    }
    if !status.success() {
        return Err(Error::io(
            "the self-test workload",
            std::io::Error::other(format!("exited with {status}")),
        ));
    }
    let report: WorkloadReport = serde_json::from_str(out.trim()).map_err(|e| {
        Error::io(
            format!("parsing the workload report {out:?}"),
            std::io::Error::other(e),
        )
    })?;
    // Everything was submitted before the workload exited; read what is left (and any warning
    // the programs logged, such as reads through BTF offsets that failed).
    collect(&mut tracer);
    tracer.drain_log();
    let counts = of_exact(&exact_counts(&tracer.counts()?, &clock));
    let total = tracer.failures_total()?;
    let mut report = report;
    if !tracer.kernel_netns {
        // No BTF: the namespace is not read in the kernel, nothing to check there.
        report.netns = None;
    }
    let mut checks = compare(&report, &events, &counts, total, tracer.watched_kinds());
    checks.extend(attachment_checks(&tracer));
    Ok(SelftestResult {
        backend: tracer.backend.name(),
        checks,
    })
}

#[cfg(test)]
mod tests {
    use portexhaust_common::{Backend, KIND_ALL, KIND_CONNECT};
    use portexhaust_workload::Scenario;

    use super::*;
    use crate::{
        engine::counts::{Key, KeyCount},
        schema::{Family, Proto, Ts},
    };

    fn report() -> WorkloadReport {
        WorkloadReport {
            scenario: Scenario::V4,
            pid: 50,
            comm: SELFTEST_COMM.into(),
            netns: None,
            ports: 10,
            expected: vec![Expected {
                dst: "127.0.0.1:5000".into(),
                errno: 99,
                site: "__inet_hash_connect".into(),
                proto: "tcp".into(),
                cause: "exhausted".into(),
                count: 2,
            }],
            unexpected: vec![],
            time_wait_before: None,
            churner_pid: None,
            churner_comm: None,
            latency_us: vec![],
            elapsed_s: 0.0,
        }
    }

    fn event(pid: u32) -> Failure {
        Failure {
            ts: Ts(0),
            pid,
            tid: pid,
            uid: 0,
            comm: SELFTEST_COMM.into(),
            cgroup_id: 0,
            netns: None,
            family: Family::Ipv4,
            proto: Proto::Tcp,
            dst: "127.0.0.1:5000".parse().expect("addr"),
            src: None,
            errno: Errno::EADDRNOTAVAIL,
            cause: portexhaust_common::Cause::Exhausted,
            site: Site::InetHashConnect,
            backend: Backend::Tracepoint,
            container: None,
            nat: None,
        }
    }

    fn count(n: u64) -> Counts {
        let key = Key {
            pid: 50,
            dst: "127.0.0.1:5000".parse().expect("addr"),
            errno: Errno::EADDRNOTAVAIL,
            cause: portexhaust_common::Cause::Exhausted,
        };
        let c = KeyCount {
            count: n,
            comm: SELFTEST_COMM.into(),
            ..Default::default()
        };
        [(key, c)].into()
    }

    #[test]
    fn exact_match_passes() {
        let checks = compare(&report(), &[event(50), event(50)], &count(2), 2, KIND_ALL);
        assert!(checks.iter().all(|c| c.ok), "{checks:?}");
    }

    #[test]
    fn a_missing_event_a_foreign_event_or_a_wrong_count_fails() {
        let c = compare(&report(), &[event(50)], &count(2), 2, KIND_ALL);
        assert!(!c[0].ok);
        let c = compare(
            &report(),
            &[event(50), event(50), event(7)],
            &count(2),
            3,
            KIND_ALL,
        );
        assert!(!c[1].ok && !c[2].ok);
        let c = compare(&report(), &[event(50), event(50)], &count(3), 2, KIND_ALL);
        assert!(!c[0].ok);
        let mut wrong_site = event(50);
        wrong_site.site = Site::TcpV4Connect;
        let c = compare(&report(), &[event(50), wrong_site], &count(2), 2, KIND_ALL);
        assert!(!c[0].ok);
    }

    #[test]
    fn events_must_carry_the_workloads_namespace() {
        let mut r = report();
        r.netns = Some(5);
        let mut a = event(50);
        a.netns = Some(5);
        let mut b = event(50);
        b.netns = Some(5);
        let ok = compare(&r, &[a.clone(), b.clone()], &count(2), 2, KIND_ALL);
        assert!(ok.iter().all(|c| c.ok), "{ok:?}");
        b.netns = Some(6);
        let bad = compare(&r, &[a, b], &count(2), 2, KIND_ALL);
        assert!(bad.iter().any(|c| !c.ok && c.what.contains("namespace")));
    }

    #[test]
    fn unwatched_kinds_are_marked_and_left_out_of_the_total() {
        let mut r = report();
        r.expected.push(Expected {
            dst: "127.0.0.1:0".into(),
            errno: 98,
            site: "bind".into(),
            proto: "tcp".into(),
            cause: "bind_exhausted".into(),
            count: 5,
        });
        let c = compare(&r, &[event(50), event(50)], &count(2), 2, KIND_CONNECT);
        let bind = c
            .iter()
            .find(|c| c.what.contains("bind"))
            .expect("bind row");
        assert!(bind.not_watched && !bind.ok);
        let total = c
            .iter()
            .find(|c| c.what.starts_with("total"))
            .expect("total");
        assert!(total.ok && total.expected == 2, "{total:?}");
        let res = SelftestResult {
            backend: "tp-btf",
            checks: c,
        };
        assert!(res.passed());
        assert!(res.table().contains("not watched"));
        // Watched but missing is a failure, never "not watched".
        let c = compare(&r, &[event(50), event(50)], &count(2), 2, KIND_ALL);
        assert!(
            c.iter()
                .any(|c| c.what.contains("bind") && !c.ok && !c.not_watched)
        );
    }

    #[test]
    fn zero_expected_never_passes() {
        let mut r = report();
        r.expected[0].count = 0;
        let c = compare(&r, &[], &Counts::new(), 0, KIND_ALL);
        assert!(!c[0].ok);
    }
}
