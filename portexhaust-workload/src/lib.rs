//! Real port exhaustion in a private network namespace, for `selftest`, the privileged tests
//! and the benchmarks (`portexhaust workload`, hidden from --help).
//!
//! Safety rule: the process first moves itself into a new, anonymous network namespace and
//! proves it did (its namespace differs from PID 1's) before it writes any sysctl. The range
//! and `tcp_tw_reuse` are per-namespace, so the host is never changed, and the namespace
//! disappears with the process, even when it is killed.
//!
//! The crate's parts:
//! - [`isolate()`]: enter a private network namespace and shrink its port range;
//! - `sockets`: listeners, held connections, failing connects and their tally;
//! - `uring`: the same failing connects, submitted through io_uring;
//! - `nat`: the server and client of a source-NAT exhaustion, in namespaces the caller made;
//! - `scenarios`: what each [`Scenario`] does;
//! - [`count_state()`]: sockets by state in a /proc/net/tcp listing.
use std::{
    io::{self, BufRead, Write},
    time::Instant,
};

use portexhaust_common::netns_of;
use serde::{Deserialize, Serialize};
use socket2::Socket;
use thiserror::Error;

mod isolate;
mod nat;
mod scenarios;
mod sockets;
mod tcp_states;
mod uring;

pub use isolate::isolate;
pub use nat::{NatClientReport, nat_client, nat_server};
pub use tcp_states::count_state;

use isolate::set_comm;
use scenarios::{hold_prepare, run_scenario};

#[derive(Debug, Error)]
pub enum WorkloadError {
    #[error("unshare(CLONE_NEWNET) failed: {0} (needs root or CAP_SYS_ADMIN)")]
    Unshare(io::Error),
    #[error("refusing to touch sysctls: still in the host's network namespace")]
    NotIsolated,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error(
        "io_uring is not available here: io_uring_setup() was refused: {source} \
         (kernel.io_uring_disabled = {disabled}; a container's seccomp profile can refuse it too)"
    )]
    UringRefused { source: io::Error, disabled: String },
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> WorkloadError {
    let context = context.into();
    move |source| WorkloadError::Io { context, source }
}

// The variants' doc comments are also their `--help` text, so `[::1]` stays as users read it.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Hold every port to 127.0.0.1:DPORT, then fail IPv4 connects.
    V4,
    /// Hold every port to [::1]:DPORT, then fail IPv6 connects.
    V6,
    /// Hold every port to 127.0.0.1:DPORT, then fail AF_INET6 connects to ::ffff:127.0.0.1.
    V4mapped,
    /// Leave every port in TIME_WAIT (tcp_tw_reuse=0), then fail IPv4 connects.
    Timewait,
    /// Bind every port, then fail TCP bind(port 0) with EADDRINUSE.
    Bind,
    /// Bind every UDP port, then fail UDP connect() (autobind) with EAGAIN.
    Udp,
    /// Hold every port, then a tight loop of failing connects (storm).
    Storm,
    /// Hold every port to 127.0.0.1:DPORT, then fail IPv4 connects submitted through io_uring
    /// (IORING_OP_CONNECT, one submission per fresh socket; no connect() syscall).
    Uring,
    /// Connect FAILURES sockets bound first (SO_REUSEADDR) to the local port of an open
    /// connection to 127.0.0.1:DPORT: the 4-tuple is taken, EADDRNOTAVAIL with free ports left.
    Collision,
    /// v4, v6, a tuple collision, bind and udp in turn (what selftest runs).
    All,
    /// Open RATE connections a second to 127.0.0.1:DPORT for SECONDS, each closed by the client
    /// at once (tcp_tw_reuse=0: each port stays in TIME_WAIT for 60 s). No failures: the load
    /// the what-if model is checked against.
    Churn,
    /// A forked child (comm `<comm>-churn`) leaves the range in TIME_WAIT (tcp_tw_reuse=0)
    /// and exits; then this process fails to the same destination.
    ChurnThenFail,
    /// Before the ready line: hold PORTS/2 connections open and leave the rest in TIME_WAIT
    /// (sockets that exist before a tracer starts). No failures.
    Hold,
    /// connect() latency: fill 99% of a wide range towards DPORT, then FAILURES connects to
    /// DPORT (nearly full) and FAILURES to DPORT+1 (empty). No failures expected.
    Latency,
}

#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    pub scenario: Scenario,
    pub ports: u16,
    pub failures: u64,
    pub dport: u16,
    pub comm: String,
    pub wait: bool,
    /// `churn`: new connections per second, and for how long.
    pub rate: u32,
    pub seconds: f64,
}

/// One kind of failure the workload caused, with the count it saw itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    pub dst: String,
    pub errno: u32,
    pub site: String,
    pub proto: String,
    /// Why, as the tracer names it (`exhausted`, `tuple_collision`, ...); empty in reports of
    /// older workloads.
    #[serde(default)]
    pub cause: String,
    pub count: u64,
}

/// Sockets a workload keeps open until it exits (so `--linger` keeps them visible).
#[derive(Default)]
pub struct Keep(Vec<Socket>);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadReport {
    pub scenario: Scenario,
    pub pid: u32,
    pub comm: String,
    pub netns: Option<u64>,
    pub ports: u16,
    pub expected: Vec<Expected>,
    /// Attempts that did not fail as planned (succeeded, or another errno): "errno N" -> count.
    pub unexpected: Vec<(String, u64)>,
    /// TIME_WAIT sockets in the namespace just before the failing connects (timewait only).
    #[serde(default)]
    pub time_wait_before: Option<u64>,
    /// churn-then-fail: the child that left the TIME_WAIT sockets.
    #[serde(default)]
    pub churner_pid: Option<u32>,
    #[serde(default)]
    pub churner_comm: Option<String>,
    /// latency: client-side median connect() time per destination, microseconds.
    #[serde(default)]
    pub latency_us: Vec<(String, f64)>,
    pub elapsed_s: f64,
}

pub const PORT_BASE: u16 = 40000;

/// Run a workload in this process: isolate, announce, optionally wait for "go", exhaust.
/// The returned `Keep` holds sockets that must stay open until the caller lets go.
pub fn run(o: &WorkloadOptions) -> Result<(WorkloadReport, Keep), WorkloadError> {
    set_comm(&o.comm);
    let tw_reuse = matches!(
        o.scenario,
        Scenario::Timewait | Scenario::ChurnThenFail | Scenario::Hold | Scenario::Churn
    )
    .then_some(0);
    isolate(o.ports, tw_reuse)?;
    let pid = std::process::id();
    let prepared = match o.scenario {
        Scenario::Hold => hold_prepare(o.ports, o.dport)?,
        _ => Keep::default(),
    };
    if o.wait {
        let mut stdout = io::stdout().lock();
        let _ = writeln!(stdout, "{{\"ready\":{pid}}}");
        let _ = stdout.flush();
        let mut line = String::new();
        io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(io_err("waiting for go on stdin"))?;
    }
    let started = Instant::now();
    let mut outcome = run_scenario(o)?;
    outcome.keep.0.extend(prepared.0);
    let report = WorkloadReport {
        scenario: o.scenario,
        pid,
        comm: o.comm.clone(),
        netns: netns_of(pid),
        ports: o.ports,
        expected: outcome.expected,
        unexpected: outcome.unexpected,
        time_wait_before: outcome.time_wait_before,
        churner_pid: outcome.churner_pid,
        churner_comm: outcome.churner_comm,
        latency_us: outcome.latency_us,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    Ok((report, outcome.keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_as_json() {
        let r = WorkloadReport {
            scenario: Scenario::V4,
            pid: 1,
            comm: "x".into(),
            netns: Some(5),
            ports: 10,
            expected: vec![Expected {
                dst: "127.0.0.1:5000".into(),
                errno: 99,
                site: "__inet_hash_connect".into(),
                proto: "tcp".into(),
                cause: "exhausted".into(),
                count: 3,
            }],
            unexpected: vec![],
            time_wait_before: None,
            churner_pid: None,
            churner_comm: None,
            latency_us: vec![],
            elapsed_s: 0.1,
        };
        let s = serde_json::to_string(&r).expect("json");
        let back: WorkloadReport = serde_json::from_str(&s).expect("parse");
        assert_eq!(back.expected, r.expected);
        assert_eq!(back.scenario, Scenario::V4);
    }
}
