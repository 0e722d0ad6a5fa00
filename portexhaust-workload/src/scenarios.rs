//! What each scenario does once the namespace is isolated.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Instant,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    Expected, Keep, Scenario, WorkloadError, WorkloadOptions, io_err,
    isolate::set_comm,
    sockets::{Tally, fail_connects, hold, listener, make_time_wait, one_time_wait, v4, v6},
    tcp_states::count_time_wait,
    uring::uring_fail_connects,
};

#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) expected: Vec<Expected>,
    pub(crate) unexpected: Vec<(String, u64)>,
    pub(crate) time_wait_before: Option<u64>,
    pub(crate) churner_pid: Option<u32>,
    pub(crate) churner_comm: Option<String>,
    pub(crate) latency_us: Vec<(String, f64)>,
    pub(crate) keep: Keep,
}

impl Outcome {
    /// Failures of the cause the site implies: no port left (for this destination, for
    /// bind(0), for a datagram autobind).
    pub(crate) fn push(&mut self, dst: SocketAddr, site: &str, proto: &str, t: Tally) {
        let cause = match site {
            "bind" => "bind_exhausted",
            "udp_autobind" => "autobind_exhausted",
            _ => "exhausted",
        };
        self.push_cause(dst, site, proto, cause, t);
    }

    pub(crate) fn push_cause(
        &mut self,
        dst: SocketAddr,
        site: &str,
        proto: &str,
        cause: &str,
        t: Tally,
    ) {
        self.expected.push(Expected {
            dst: dst.to_string(),
            errno: t.want,
            site: site.into(),
            proto: proto.into(),
            cause: cause.into(),
            count: t.seen,
        });
        for (k, v) in t.other {
            self.unexpected.push((format!("{dst} {proto}: {k}"), v));
        }
    }
}

pub(crate) fn run_scenario(o: &WorkloadOptions) -> Result<Outcome, WorkloadError> {
    let mut out = Outcome::default();
    let k = o.failures;
    let n = o.ports;
    let p = o.dport;
    match o.scenario {
        Scenario::V4 | Scenario::Storm => {
            let _l = listener(v4(p))?;
            let _held = hold(v4(p), n)?;
            let t = fail_connects(Domain::IPV4, Type::STREAM, v4(p), k, 99);
            out.push(v4(p), "__inet_hash_connect", "tcp", t);
        }
        Scenario::Uring => {
            let _l = listener(v4(p))?;
            let _held = hold(v4(p), n)?;
            let t = uring_fail_connects(v4(p), k, 99)?;
            out.push(v4(p), "__inet_hash_connect", "tcp", t);
        }
        Scenario::V6 => {
            let _l = listener(v6(p))?;
            let _held = hold(v6(p), n)?;
            let t = fail_connects(Domain::IPV6, Type::STREAM, v6(p), k, 99);
            out.push(v6(p), "__inet_hash_connect", "tcp", t);
        }
        Scenario::V4mapped => {
            let _l = listener(v4(p))?;
            let _held = hold(v4(p), n)?;
            let mapped = SocketAddr::new(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), p);
            let t = fail_connects(Domain::IPV6, Type::STREAM, mapped, k, 99);
            out.push(mapped, "__inet_hash_connect", "tcp", t);
        }
        Scenario::Timewait => {
            let l = listener(v4(p))?;
            make_time_wait(&l, v4(p), n)?;
            out.time_wait_before = Some(count_time_wait());
            let t = fail_connects(Domain::IPV4, Type::STREAM, v4(p), k, 99);
            out.push(v4(p), "__inet_hash_connect", "tcp", t);
        }
        Scenario::ChurnThenFail => {
            let l = listener(v4(p))?;
            // As the kernel will keep it: TASK_COMM_LEN - 1 bytes.
            let churn_comm: String = format!("{}-churn", o.comm).chars().take(15).collect();
            // SAFETY: the workload is single-threaded here, so fork() is safe; the child only
            // runs plain socket calls and leaves with _exit.
            let child = unsafe { libc::fork() };
            if child < 0 {
                return Err(io_err("fork")(io::Error::last_os_error()));
            }
            if child == 0 {
                set_comm(&churn_comm);
                let code = i32::from(make_time_wait(&l, v4(p), n).is_err());
                // SAFETY: leaving the child without running the parent's destructors.
                unsafe { libc::_exit(code) };
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                return Err(WorkloadError::Setup("the churner child failed".into()));
            }
            out.churner_pid = Some(child as u32);
            out.churner_comm = Some(churn_comm);
            out.time_wait_before = Some(count_time_wait());
            let t = fail_connects(Domain::IPV4, Type::STREAM, v4(p), k, 99);
            out.push(v4(p), "__inet_hash_connect", "tcp", t);
            out.keep.0.push(l);
        }
        Scenario::Hold => {} // prepared before the ready line
        Scenario::Churn => {
            let l = listener(v4(p))?;
            churn(&l, v4(p), o.rate, o.seconds)?;
            out.keep.0.push(l);
        }
        Scenario::Latency => latency_scenario(&mut out, n, k, p)?,
        Scenario::Bind => bind_scenario(&mut out, n, k)?,
        Scenario::Collision => {
            let _l = listener(v4(p))?;
            collision_scenario(&mut out, k, p)?;
        }
        Scenario::Udp => udp_scenario(&mut out, n, k, p + 1)?,
        Scenario::All => {
            // bind(0) and UDP first: their sockets give their ports back at close, whereas
            // closed TCP connections linger (FIN_WAIT2/TIME_WAIT) and would keep the range full.
            bind_scenario(&mut out, n, k)?;
            udp_scenario(&mut out, n, k, p + 1)?;
            let _l4 = listener(v4(p))?;
            let _l6 = listener(v6(p))?;
            let _h4 = hold(v4(p), n)?;
            let t = fail_connects(Domain::IPV4, Type::STREAM, v4(p), k, 99);
            out.push(v4(p), "__inet_hash_connect", "tcp", t);
            let _h6 = hold(v6(p), n)?;
            let t = fail_connects(Domain::IPV6, Type::STREAM, v6(p), k, 99);
            out.push(v6(p), "__inet_hash_connect", "tcp", t);
            // The range is full by now: the collision's one connection takes a port outside it.
            collision_scenario(&mut out, k, p)?;
        }
    }
    Ok(out)
}

/// Local port of the collision scenario's connections: below every range the workloads set
/// (they start at 40000), so it is free even when the range is full.
const COLLISION_PORT: u16 = 30999;

/// A socket bound, before connect(), to the local port an open connection to `dst` already
/// uses: connect() finds that exact 4-tuple taken (`__inet_hash_connect` ->
/// `check_established` fails) and returns EADDRNOTAVAIL although ports are free. SO_REUSEADDR
/// on both lets the second bind() succeed (neither listens).
fn collision_scenario(out: &mut Outcome, k: u64, p: u16) -> Result<(), WorkloadError> {
    let dst = v4(p);
    let local = v4(COLLISION_PORT);
    let bound = || -> io::Result<Socket> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.bind(&local.into())?;
        Ok(s)
    };
    let first = bound().map_err(io_err("binding the first collision socket"))?;
    first
        .connect(&dst.into())
        .map_err(io_err("connecting the first collision socket"))?;
    let mut t = Tally::new(99);
    for _ in 0..k {
        t.record(bound().and_then(|s| s.connect(&dst.into())));
    }
    out.push_cause(dst, "__inet_hash_connect", "tcp", "tuple_collision", t);
    out.keep.0.push(first);
    Ok(())
}

/// `rate` connections a second for `seconds`, on a fixed schedule (a late one does not make
/// the next early), each left in TIME_WAIT by the client.
fn churn(l: &Socket, dst: SocketAddr, rate: u32, seconds: f64) -> Result<(), WorkloadError> {
    if rate == 0 || seconds.is_nan() || seconds <= 0.0 {
        return Err(WorkloadError::Setup(
            "the churn scenario needs --rate and --seconds".into(),
        ));
    }
    let start = Instant::now();
    let total = (f64::from(rate) * seconds) as u64;
    for i in 0..total {
        let due = start + std::time::Duration::from_secs_f64(i as f64 / f64::from(rate));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        one_time_wait(l, dst).map_err(io_err(format!("churn connection {}", i + 1)))?;
    }
    Ok(())
}

/// Hold half the range open to DPORT and leave the other half in TIME_WAIT.
pub(crate) fn hold_prepare(n: u16, p: u16) -> Result<Keep, WorkloadError> {
    let l = listener(v4(p))?;
    make_time_wait(&l, v4(p), n - n / 2)?;
    let mut keep = hold(v4(p), n / 2)?;
    keep.push(l);
    Ok(Keep(keep))
}

/// Accept connections in the background so the accept queue never fills. The accepted side
/// is closed at once: the client socket stays (in CLOSE_WAIT) and keeps its port, and only
/// one fd per connection is spent.
fn acceptor(l: Socket) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || while l.accept().is_ok() {})
}

/// As many fds as allowed: the hard limit, or more where CAP_SYS_RESOURCE permits.
fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers. Best effort: the connects fail loudly if fds run out.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        let want = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: 1 << 20,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn timed_connects(dst: SocketAddr, m: u64, keep: &mut Vec<Socket>) -> Result<f64, WorkloadError> {
    let mut times = Vec::with_capacity(m as usize);
    for _ in 0..m {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))
            .map_err(io_err("socket"))?;
        let t0 = Instant::now();
        s.connect(&dst.into())
            .map_err(io_err(format!("timed connect to {dst}")))?;
        times.push(t0.elapsed().as_secs_f64() * 1e6);
        keep.push(s);
    }
    times.sort_by(f64::total_cmp);
    Ok(times.get(times.len() / 2).copied().unwrap_or(0.0))
}

/// Fill 99% of the range towards `p`, then time `m` connects to `p` and `m` to `p + 1`.
fn latency_scenario(out: &mut Outcome, n: u16, m: u64, p: u16) -> Result<(), WorkloadError> {
    raise_nofile();
    let full = v4(p);
    let empty = v4(p + 1);
    let _a = acceptor(listener(full)?);
    let _b = acceptor(listener(empty)?);
    let fill = u64::from(n) * 99 / 100;
    if fill + m > u64::from(n) {
        return Err(WorkloadError::Setup(format!(
            "--ports {n} leaves no room for {m} timed connects after filling 99%"
        )));
    }
    let mut keep = hold(full, fill as u16)?;
    // Interleave so that background noise hits both destinations alike.
    let mut med_full = Vec::new();
    let mut med_empty = Vec::new();
    for _ in 0..m.div_ceil(10) {
        med_full.push(timed_connects(full, 10.min(m), &mut keep)?);
        med_empty.push(timed_connects(empty, 10.min(m), &mut keep)?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    out.latency_us = vec![
        (full.to_string(), median(med_full)),
        (empty.to_string(), median(med_empty)),
    ];
    out.keep.0.extend(keep);
    Ok(())
}

/// Bind every port of the range to 127.0.0.1, then bind(127.0.0.1:0) must fail (EADDRINUSE).
fn bind_scenario(out: &mut Outcome, n: u16, k: u64) -> Result<(), WorkloadError> {
    let any = v4(0);
    let _held: Vec<Socket> = (0..n)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                .map_err(io_err("socket"))?;
            s.bind(&any.into())
                .map_err(io_err("binding a port of the range"))?;
            Ok(s)
        })
        .collect::<Result<_, WorkloadError>>()?;
    let mut t = Tally::new(98);
    for _ in 0..k {
        t.record(
            Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                .and_then(|s| s.bind(&any.into())),
        );
    }
    out.push(any, "bind", "tcp", t);
    Ok(())
}

/// Bind every UDP port of the range, then connect() on an unbound UDP socket must fail to
/// autobind (EAGAIN).
fn udp_scenario(out: &mut Outcome, n: u16, k: u64, port: u16) -> Result<(), WorkloadError> {
    let _held: Vec<Socket> = (0..n)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
                .map_err(io_err("socket"))?;
            s.bind(&v4(0).into())
                .map_err(io_err("binding a UDP port of the range"))?;
            Ok(s)
        })
        .collect::<Result<_, WorkloadError>>()?;
    let t = fail_connects(Domain::IPV4, Type::DGRAM, v4(port), k, 11);
    out.push(v4(port), "udp_autobind", "udp", t);
    Ok(())
}
