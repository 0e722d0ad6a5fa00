//! Real port exhaustion in a private network namespace, for `selftest`, the privileged tests
//! and the benchmarks (`portexhaust workload`, hidden from --help).
//!
//! Safety rule: the process first moves itself into a new, anonymous network namespace and
//! proves it did (its namespace differs from PID 1's) before it writes any sysctl. The range
//! and `tcp_tw_reuse` are per-namespace, so the host is never changed, and the namespace
//! disappears with the process, even when it is killed.
use std::{
    io::{self, BufRead, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Instant,
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

use crate::procinfo::netns_of;

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

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> WorkloadError {
    let context = context.into();
    move |source| WorkloadError::Io { context, source }
}

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
    /// v4, v6, bind and udp in turn (what selftest runs).
    All,
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
}

/// One kind of failure the workload caused, with the count it saw itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    pub dst: String,
    pub errno: u32,
    pub site: String,
    pub proto: String,
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

// ---------------------------------------------------------------------------------------------
// Namespace set-up.

fn set_comm(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated buffer of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

fn lo_up() -> Result<(), WorkloadError> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, None).map_err(io_err("socket for ioctl"))?;
    // SAFETY: ifreq is plain old data; the name is NUL-terminated; the fd is valid.
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        use std::os::fd::AsRawFd;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            return Err(io_err("SIOCGIFFLAGS lo")(io::Error::last_os_error()));
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) != 0 {
            return Err(io_err("SIOCSIFFLAGS lo up")(io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn write_sysctl(path: &str, value: &str) -> Result<(), WorkloadError> {
    std::fs::write(path, value).map_err(io_err(format!("writing {path}")))
}

/// Enter a fresh network namespace and shrink its port range to `ports` ports.
/// Must run before any thread is spawned: unshare() moves only the calling thread.
pub fn isolate(ports: u16, tw_reuse: Option<u8>) -> Result<(), WorkloadError> {
    // SAFETY: plain syscall.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(WorkloadError::Unshare(io::Error::last_os_error()));
    }
    let mine = netns_of(std::process::id());
    if mine.is_none() || mine == netns_of(1) {
        return Err(WorkloadError::NotIsolated);
    }
    lo_up()?;
    let hi = PORT_BASE + ports.max(1) - 1;
    write_sysctl(
        "/proc/sys/net/ipv4/ip_local_port_range",
        &format!("{PORT_BASE} {hi}"),
    )?;
    if let Some(r) = tw_reuse {
        write_sysctl("/proc/sys/net/ipv4/tcp_tw_reuse", &r.to_string())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Socket helpers.

fn listener(addr: SocketAddr) -> Result<Socket, WorkloadError> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(io_err("listener socket"))?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(io_err("IPV6_V6ONLY"))?;
    }
    s.set_reuse_address(true).map_err(io_err("SO_REUSEADDR"))?;
    s.bind(&addr.into())
        .map_err(io_err(format!("bind {addr}")))?;
    s.listen(4096).map_err(io_err("listen"))?;
    Ok(s)
}

fn errno_of(e: &io::Error) -> u32 {
    e.raw_os_error().unwrap_or(0) as u32
}

/// Tallies attempts that should fail with one errno.
struct Tally {
    want: u32,
    seen: u64,
    other: std::collections::BTreeMap<String, u64>,
}

impl Tally {
    fn new(want: u32) -> Self {
        Self {
            want,
            seen: 0,
            other: Default::default(),
        }
    }
    fn note(&mut self, what: impl Into<String>) {
        *self.other.entry(what.into()).or_default() += 1;
    }
    fn record(&mut self, r: io::Result<()>) {
        match r {
            Err(e) if errno_of(&e) == self.want => self.seen += 1,
            Err(e) => {
                *self
                    .other
                    .entry(format!("errno {}", errno_of(&e)))
                    .or_default() += 1
            }
            Ok(()) => *self.other.entry("succeeded".into()).or_default() += 1,
        }
    }
}

/// Open `n` connections to `dst` and keep them (each takes one local port for this 4-tuple).
fn hold(dst: SocketAddr, n: u16) -> Result<Vec<Socket>, WorkloadError> {
    (0..n)
        .map(|i| {
            let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))
                .map_err(io_err("socket"))?;
            s.connect(&dst.into()).map_err(io_err(format!(
                "holding connection {} of {n} to {dst}",
                i + 1
            )))?;
            Ok(s)
        })
        .collect()
}

fn fail_connects(domain: Domain, ty: Type, dst: SocketAddr, k: u64, want: u32) -> Tally {
    let mut t = Tally::new(want);
    for _ in 0..k {
        let r = Socket::new(domain, ty, None).and_then(|s| s.connect(&dst.into()));
        t.record(r);
    }
    t
}

/// An io_uring completion's result as an outcome: 0 (or more) for success, -errno for failure.
fn cqe_result(res: i32) -> io::Result<()> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(())
    }
}

/// Tally the completions of one batch: submissions `first..first + n` (their user_data) must
/// each complete exactly once. A missing, repeated or foreign completion is an unexpected
/// outcome, never silently a failure or a success.
fn tally_completions(t: &mut Tally, first: u64, n: u64, cqes: &[(u64, i32)]) {
    let mut seen = vec![false; n as usize];
    for &(user_data, res) in cqes {
        let slot = usize::try_from(user_data.wrapping_sub(first)).ok();
        match slot.and_then(|i| seen.get_mut(i)) {
            Some(done) if !*done => {
                *done = true;
                t.record(cqe_result(res));
            }
            Some(_) => t.note("io_uring: repeated completion"),
            None => t.note("io_uring: completion of no submission of this batch"),
        }
    }
    for _ in seen.iter().filter(|done| !**done) {
        t.note("io_uring: no completion");
    }
}

/// Submissions in flight at once, and the ring's size.
const URING_BATCH: u32 = 64;

/// `k` TCP connects to `dst` through io_uring: each on a fresh socket, one IORING_OP_CONNECT
/// submission per socket, in batches of at most `URING_BATCH` per io_uring_enter().
fn uring_fail_connects(dst: SocketAddr, k: u64, want: u32) -> Result<Tally, WorkloadError> {
    use std::os::fd::AsRawFd;

    use io_uring::{IoUring, opcode, types};

    let mut ring = IoUring::new(URING_BATCH).map_err(|source| WorkloadError::UringRefused {
        source,
        disabled: std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unreadable".into()),
    })?;
    let addr = socket2::SockAddr::from(dst);
    let mut t = Tally::new(want);
    let mut first = 0u64;
    while first < k {
        let n = (k - first).min(u64::from(URING_BATCH));
        let socks = (0..n)
            .map(|_| Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)))
            .collect::<io::Result<Vec<Socket>>>()
            .map_err(io_err("socket for an io_uring connect"))?;
        {
            let mut sq = ring.submission();
            for (i, s) in (first..).zip(&socks) {
                let sqe = opcode::Connect::new(
                    types::Fd(s.as_raw_fd()),
                    addr.as_ptr().cast(),
                    addr.len(),
                )
                .build()
                .user_data(i);
                // SAFETY: the socket and the address stay alive until every completion of this
                // batch has been reaped below; the ring has room for a whole batch.
                unsafe { sq.push(&sqe) }.map_err(|_| {
                    WorkloadError::Setup("io_uring submission queue unexpectedly full".into())
                })?;
            }
        }
        let mut cqes = Vec::with_capacity(n as usize);
        while (cqes.len() as u64) < n {
            match ring.submit_and_wait(n as usize - cqes.len()) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("io_uring_enter")(e)),
            }
            cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        }
        tally_completions(&mut t, first, n, &cqes);
        drop(socks);
        first += n;
    }
    Ok(t)
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}
fn v6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)
}

#[derive(Default)]
struct Outcome {
    expected: Vec<Expected>,
    unexpected: Vec<(String, u64)>,
    time_wait_before: Option<u64>,
    churner_pid: Option<u32>,
    churner_comm: Option<String>,
    latency_us: Vec<(String, f64)>,
    keep: Keep,
}

/// TIME_WAIT sockets (state 06) in this thread's network namespace, IPv4 and IPv6.
fn count_time_wait() -> u64 {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| count_state(&s, "06"))
        .sum()
}

/// Rows of a /proc/net/tcp listing in one state (hex code, 4th column).
pub fn count_state(listing: &str, state: &str) -> u64 {
    listing
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3) == Some(state))
        .count() as u64
}

impl Outcome {
    fn push(&mut self, dst: SocketAddr, site: &str, proto: &str, t: Tally) {
        self.expected.push(Expected {
            dst: dst.to_string(),
            errno: t.want,
            site: site.into(),
            proto: proto.into(),
            count: t.seen,
        });
        for (k, v) in t.other {
            self.unexpected.push((format!("{dst} {proto}: {k}"), v));
        }
    }
}

/// Leave `n` client sockets to `dst` in TIME_WAIT: the client closes first (active close).
fn make_time_wait(listener: &Socket, dst: SocketAddr, n: u16) -> Result<(), WorkloadError> {
    for i in 0..n {
        let c = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))
            .map_err(io_err("socket"))?;
        c.connect(&dst.into())
            .map_err(io_err(format!("churn connection {} of {n}", i + 1)))?;
        let (mut srv, _) = listener.accept().map_err(io_err("accept"))?;
        drop(c); // client FIN first -> the client side will hold TIME_WAIT
        let mut buf = [0u8; 1];
        // The server reads EOF, then closes: the client's FIN_WAIT2 -> TIME_WAIT.
        let _ = srv.read(&mut buf);
        drop(srv);
    }
    // Let the last FIN/ACK exchange land (loopback: microseconds).
    std::thread::sleep(std::time::Duration::from_millis(50));
    Ok(())
}

fn run_scenario(o: &WorkloadOptions) -> Result<Outcome, WorkloadError> {
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
        Scenario::Latency => latency_scenario(&mut out, n, k, p)?,
        Scenario::Bind => bind_scenario(&mut out, n, k)?,
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
        }
    }
    Ok(out)
}

/// Hold half the range open to DPORT and leave the other half in TIME_WAIT.
fn hold_prepare(n: u16, p: u16) -> Result<Keep, WorkloadError> {
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

/// Run a workload in this process: isolate, announce, optionally wait for "go", exhaust.
/// The returned `Keep` holds sockets that must stay open until the caller lets go.
pub fn run(o: &WorkloadOptions) -> Result<(WorkloadReport, Keep), WorkloadError> {
    set_comm(&o.comm);
    let tw_reuse = matches!(
        o.scenario,
        Scenario::Timewait | Scenario::ChurnThenFail | Scenario::Hold
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
    fn tally_separates_expected_from_other_outcomes() {
        let mut t = Tally::new(99);
        t.record(Err(io::Error::from_raw_os_error(99)));
        t.record(Err(io::Error::from_raw_os_error(99)));
        t.record(Err(io::Error::from_raw_os_error(111)));
        t.record(Ok(()));
        assert_eq!(t.seen, 2);
        assert_eq!(t.other.get("errno 111"), Some(&1));
        assert_eq!(t.other.get("succeeded"), Some(&1));
    }

    #[test]
    fn completion_results_are_zero_or_minus_errno() {
        assert!(cqe_result(0).is_ok());
        assert_eq!(cqe_result(-99).map_err(|e| errno_of(&e)), Err(99));
        assert_eq!(cqe_result(-111).map_err(|e| errno_of(&e)), Err(111));
    }

    #[test]
    fn each_submission_of_a_batch_completes_once() {
        // Batch 64..68: four EADDRNOTAVAIL in any order, one success.
        let mut t = Tally::new(99);
        tally_completions(
            &mut t,
            64,
            5,
            &[(66, -99), (64, -99), (68, 0), (65, -99), (67, -99)],
        );
        assert_eq!(t.seen, 4);
        assert_eq!(t.other.len(), 1);
        assert_eq!(t.other.get("succeeded"), Some(&1));
    }

    #[test]
    fn missing_repeated_and_foreign_completions_are_unexpected() {
        let mut t = Tally::new(99);
        // 10 twice, 11 never, 12 with another errno, 3 and 13 outside the batch 10..13.
        tally_completions(
            &mut t,
            10,
            3,
            &[(10, -99), (10, -99), (12, -111), (3, -99), (13, -99)],
        );
        assert_eq!(t.seen, 1, "only the first completion of 10 counts");
        assert_eq!(t.other.get("io_uring: repeated completion"), Some(&1));
        assert_eq!(t.other.get("io_uring: no completion"), Some(&1));
        assert_eq!(
            t.other
                .get("io_uring: completion of no submission of this batch"),
            Some(&2)
        );
        assert_eq!(t.other.get("errno 111"), Some(&1));
    }

    #[test]
    fn counts_sockets_by_state() {
        let listing = "  sl  local_address rem_address   st tx_queue rx_queue\n\
   0: 0100007F:1388 00000000:0000 0A 00000000:00000000\n\
   1: 0100007F:9C40 0100007F:1388 06 00000000:00000000\n\
   2: 0100007F:9C41 0100007F:1388 06 00000000:00000000\n";
        assert_eq!(count_state(listing, "06"), 2);
        assert_eq!(count_state(listing, "0A"), 1);
        assert_eq!(count_state(listing, "01"), 0);
    }

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
