//! Socket holder for the ownership-at-scale benchmark: open many established connections over
//! several destinations, churn some of them, report, and keep them open until released; then
//! close every client side first, so that each leaves a TIME_WAIT socket behind.
//!
//! One process cannot hold 100k connections here: each takes two fds (the client's and the
//! accepted one), and RLIMIT_NOFILE cannot be raised past its hard limit without
//! CAP_SYS_RESOURCE, which sandboxes and containers often withhold (20000 on the development
//! machines). So `hold` enters a fresh namespace and spawns as many `hold-worker` processes as
//! the limit requires; they inherit the namespace, each listens on its own destination ports and
//! holds its share, and `hold` sums their reports.
use std::{
    io::{BufRead, BufReader, Read, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Instant,
};

use portexhaust_common::netns_of;
use portexhaust_workload::{count_state, isolate};
use serde::de::DeserializeOwned;
use socket2::Socket;

use crate::{
    common::{
        LoadError, emit, io_err, listener, own_rss_kib, ready_then_wait, set_comm, tcp_socket, v4,
        wait_for_release,
    },
    report::{HoldReport, Ready},
};

/// Ports in the holder's range (40000..=64999): each destination can take this many
/// connections. `isolate` counts from 40000, and 40000 + 25000 stays inside u16.
pub const RANGE: u16 = 25_000;

/// Destination ports stay below the ephemeral range.
const DPORT_LIMIT: u32 = 40_000;

#[derive(Clone, Debug)]
pub struct HoldOptions {
    pub connections: u64,
    /// Destinations per worker: 127.0.0.1:dport.. (one listener each).
    pub dests: u16,
    pub dport: u16,
    /// How long to close and reopen held connections after opening them all.
    pub churn_secs: f64,
    pub comm: String,
    pub wait: bool,
}

fn validate(connections: u64, dests: u16, churn_secs: f64) -> Result<(), LoadError> {
    if connections == 0 || connections > 500_000 {
        return Err(LoadError::Invalid(
            "--connections must be between 1 and 500000".into(),
        ));
    }
    if dests == 0 {
        return Err(LoadError::Invalid("--dests must be at least 1".into()));
    }
    let per_dest = connections.div_ceil(u64::from(dests));
    if per_dest > u64::from(RANGE) {
        return Err(LoadError::Invalid(format!(
            "{connections} connections over {dests} destinations is {per_dest} per destination, \
             more than the {RANGE} ports of the range"
        )));
    }
    if !(0.0..=600.0).contains(&churn_secs) {
        return Err(LoadError::Invalid(
            "--churn-secs must be between 0 and 600".into(),
        ));
    }
    Ok(())
}

/// Raise the soft open-file limit to the hard one and return it.
fn nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write the struct they are given.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return r.rlim_max;
        }
    }
    r.rlim_cur
}

/// Connections one process can hold: two fds each, and room for listeners and stdio.
pub fn per_process_capacity(nofile: u64, dests: u16) -> u64 {
    nofile.saturating_sub(u64::from(dests) + 64) / 2
}

/// How to split `connections` over workers of `capacity` each: the shares, in order.
pub fn shares(connections: u64, capacity: u64) -> Vec<u64> {
    if capacity == 0 {
        return Vec::new();
    }
    let workers = connections.div_ceil(capacity);
    let base = connections / workers;
    let extra = connections % workers;
    (0..workers).map(|w| base + u64::from(w < extra)).collect()
}

fn open(l: &Socket, dport: u16) -> Result<(Socket, Socket), LoadError> {
    let c = tcp_socket().map_err(io_err("socket"))?;
    c.connect(&v4(dport).into())
        .map_err(io_err(format!("connecting to 127.0.0.1:{dport}")))?;
    let (s, _) = l.accept().map_err(io_err("accept"))?;
    Ok((c, s))
}

/// Close one held connection the way the churn benchmark does (server first, client reads
/// EOF, so no client port lingers in TIME_WAIT) and open a new one in its place.
fn reopen(pair: &mut (Socket, Socket), l: &Socket, dport: u16) -> Result<(), LoadError> {
    let fresh = open(l, dport)?;
    let (mut c, s) = std::mem::replace(pair, fresh);
    drop(s);
    let mut buf = [0u8; 1];
    let _ = c.read(&mut buf);
    drop(c);
    Ok(())
}

fn established_in_namespace() -> Result<u64, LoadError> {
    std::fs::read_to_string("/proc/self/net/tcp")
        .map(|s| count_state(&s, "01"))
        .map_err(io_err("reading /proc/self/net/tcp"))
}

/// One worker: runs inside the namespace its parent made; holds `o.connections`.
pub fn worker(o: &HoldOptions) -> Result<HoldReport, LoadError> {
    validate(o.connections, o.dests, o.churn_secs)?;
    let capacity = per_process_capacity(nofile_limit(), o.dests);
    if o.connections > capacity {
        return Err(LoadError::Invalid(format!(
            "a worker can hold {capacity} connections with this open-file limit, not {}",
            o.connections
        )));
    }
    set_comm(&o.comm);
    let listeners = (0..o.dests)
        .map(|d| listener(v4(o.dport + d)))
        .collect::<Result<Vec<_>, _>>()?;
    ready_then_wait(&o.comm, o.wait)?;

    let t0 = Instant::now();
    let mut held: Vec<(Socket, Socket)> = Vec::with_capacity(o.connections as usize);
    let dests = u64::from(o.dests);
    for i in 0..o.connections {
        let d = (i % dests) as usize;
        held.push(open(&listeners[d], o.dport + d as u16)?);
    }
    let open_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut churned = 0u64;
    let n = held.len() as u64;
    loop {
        if churned.is_multiple_of(64) && t1.elapsed().as_secs_f64() >= o.churn_secs {
            break;
        }
        // Connection i was opened towards destination i % dests: reopen it towards the same.
        let i = churned % n;
        let d = (i % dests) as usize;
        reopen(&mut held[i as usize], &listeners[d], o.dport + d as u16)?;
        churned += 1;
    }
    let pid = std::process::id();
    let report = HoldReport {
        kind: "hold".into(),
        pid,
        comm: o.comm.clone(),
        netns: netns_of(pid),
        connections: n,
        dests: o.dests,
        workers: 1,
        open_s,
        open_rate_per_s: n as f64 / open_s.max(1e-9),
        churned,
        churn_s: t1.elapsed().as_secs_f64(),
        established: established_in_namespace()?,
        rss_kib: own_rss_kib(),
    };
    emit(&report)?;
    if o.wait {
        wait_for_release();
    }
    // Released: every client side closes first and leaves a TIME_WAIT socket (60 s) behind,
    // the sockets a tracer must remember the owner of (nothing in the kernel names it).
    let (clients, servers): (Vec<Socket>, Vec<Socket>) = held.into_iter().unzip();
    drop(clients);
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(servers);
    Ok(report)
}

/// A worker process, killed and reaped if the holder stops early.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn line<T: DeserializeOwned>(&mut self, what: &str) -> Result<T, LoadError> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(io_err(format!("reading a worker's {what}")))?;
        serde_json::from_str(line.trim()).map_err(|e| {
            LoadError::Invalid(format!(
                "worker {} sent no {what} ({e}): {:?}",
                self.child.id(),
                line.trim()
            ))
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing stdin releases a worker that is waiting: it closes its connections (client
        // sides first) and exits. Kill covers one that does not within 30 s.
        drop(self.stdin.take());
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The holder: a fresh namespace, then as many workers as the open-file limit needs.
pub fn run(o: &HoldOptions) -> Result<HoldReport, LoadError> {
    validate(o.connections, o.dests, o.churn_secs)?;
    let capacity = per_process_capacity(nofile_limit(), o.dests);
    let shares = shares(o.connections, capacity);
    if shares.is_empty() {
        return Err(LoadError::Invalid(
            "the open-file limit is too small to hold any connection".into(),
        ));
    }
    let last_port = u32::from(o.dport) + shares.len() as u32 * u32::from(o.dests);
    if last_port > DPORT_LIMIT {
        return Err(LoadError::Invalid(format!(
            "{} workers x {} destinations from port {} reach port {last_port}: the destination \
             ports must stay below the range ({DPORT_LIMIT}); use fewer --dests or a lower --dport",
            shares.len(),
            o.dests,
            o.dport
        )));
    }
    set_comm(&o.comm);
    isolate(RANGE, Some(1))?;
    let exe = std::env::current_exe().map_err(io_err("finding this executable"))?;
    let mut workers = Vec::with_capacity(shares.len());
    for (w, &share) in shares.iter().enumerate() {
        let dport = o.dport + (w as u16) * o.dests;
        let mut child = Command::new(&exe)
            .arg("hold-worker")
            .args(["--connections", &share.to_string()])
            .args(["--dests", &o.dests.to_string()])
            .args(["--dport", &dport.to_string()])
            .args(["--churn-secs", &o.churn_secs.to_string()])
            .args(["--comm", &o.comm, "--wait"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(io_err(format!("starting worker {w}")))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(BufReader::new);
        let Some(stdout) = stdout else {
            return Err(LoadError::Invalid("a worker has no stdout".into()));
        };
        workers.push(Worker {
            child,
            stdin,
            stdout,
        });
    }
    for w in &mut workers {
        let _: Ready = w.line("ready line")?;
    }
    ready_then_wait(&o.comm, o.wait)?;
    for w in &mut workers {
        if let Some(stdin) = w.stdin.as_mut() {
            stdin
                .write_all(b"go\n")
                .map_err(io_err("telling a worker to go"))?;
            stdin.flush().map_err(io_err("telling a worker to go"))?;
        }
    }
    let mut reports: Vec<HoldReport> = Vec::with_capacity(workers.len());
    for w in &mut workers {
        reports.push(w.line("report")?);
    }
    let connections: u64 = reports.iter().map(|r| r.connections).sum();
    let open_s = reports.iter().map(|r| r.open_s).fold(0.0, f64::max);
    let pid = std::process::id();
    let report = HoldReport {
        kind: "hold".into(),
        pid,
        comm: o.comm.clone(),
        netns: netns_of(pid),
        connections,
        dests: o.dests * workers.len() as u16,
        workers: workers.len() as u32,
        open_s,
        open_rate_per_s: connections as f64 / open_s.max(1e-9),
        churned: reports.iter().map(|r| r.churned).sum(),
        churn_s: reports.iter().map(|r| r.churn_s).fold(0.0, f64::max),
        // Counted once for the whole namespace, after every worker is done.
        established: established_in_namespace()?,
        rss_kib: own_rss_kib() + reports.iter().map(|r| r.rss_kib).sum::<u64>(),
    };
    emit(&report)?;
    if o.wait {
        wait_for_release();
    }
    // Dropping the workers closes their stdin (they exit and close their sockets) and reaps them.
    drop(workers);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_connection_within_capacity() {
        for (n, cap) in [
            (100_000u64, 9_900u64),
            (10_000, 9_900),
            (7, 10),
            (9_900, 9_900),
        ] {
            let s = shares(n, cap);
            assert_eq!(s.iter().sum::<u64>(), n, "{n}/{cap}");
            assert!(s.iter().all(|&x| x <= cap && x > 0), "{s:?}");
            assert_eq!(s.len() as u64, n.div_ceil(cap));
        }
        assert!(shares(5, 0).is_empty());
    }

    #[test]
    fn capacity_leaves_room_for_listeners() {
        assert_eq!(per_process_capacity(20_000, 8), (20_000 - 72) / 2);
        assert_eq!(per_process_capacity(10, 8), 0);
    }

    #[test]
    fn bad_hold_options_are_refused() {
        assert!(validate(0, 8, 1.0).is_err());
        assert!(validate(10, 0, 1.0).is_err());
        assert!(validate(100_000, 1, 1.0).is_err());
        assert!(validate(10, 1, -1.0).is_err());
        assert!(validate(10_000, 8, 1.0).is_ok());
    }
}
