//! Child processes of a benchmark run: load generators and tracers. Each is killed and reaped
//! when dropped, so a failed run leaves nothing behind.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::de::DeserializeOwned;

use super::sys::{self, Exit};

// ---------------------------------------------------------------------------------------------
// Load generators (pxh-loadgen with --wait).

struct LoadProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    name: String,
}

impl LoadProc {
    fn next<T: DeserializeOwned>(&self, timeout: Duration, what: &str) -> Result<T> {
        let line = match self.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                bail!("{} sent no {what} within {timeout:?}", self.name)
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!(
                    "{} ended before its {what} (see its error above)",
                    self.name
                )
            }
        };
        serde_json::from_str(line.trim())
            .with_context(|| format!("{}: {what} {:?}", self.name, line.trim()))
    }
}

impl Drop for LoadProc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(serde::Deserialize)]
struct Ready {
    ready: u32,
}

/// Load generators started together, all paused until `go`.
pub struct Load {
    procs: Vec<LoadProc>,
    pub pids: Vec<u32>,
}

impl Load {
    /// Start one `pxh-loadgen` per argument list and wait until each is ready.
    pub fn start(bin: &Path, arg_lists: &[Vec<String>], ready_timeout: Duration) -> Result<Self> {
        let mut procs = Vec::new();
        for args in arg_lists {
            let name = format!("pxh-loadgen {}", args.join(" "));
            let mut child = Command::new(bin)
                .args(args)
                .arg("--wait")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            let stdin = child.stdin.take();
            let stdout = child.stdout.take().context("load generator stdout")?;
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            procs.push(LoadProc {
                child,
                stdin,
                lines: rx,
                name,
            });
        }
        let mut pids = Vec::new();
        for p in &procs {
            let r: Ready = p.next(ready_timeout, "ready line")?;
            pids.push(r.ready);
        }
        Ok(Self { procs, pids })
    }

    pub fn go(&mut self) -> Result<()> {
        for p in &mut self.procs {
            let stdin = p.stdin.as_mut().context("go sent twice")?;
            stdin
                .write_all(b"go\n")
                .and_then(|()| stdin.flush())
                .with_context(|| format!("telling {} to go", p.name))?;
        }
        Ok(())
    }

    pub fn reports<T: DeserializeOwned>(&self, timeout: Duration) -> Result<Vec<T>> {
        let deadline = Instant::now() + timeout;
        self.procs
            .iter()
            .map(|p| p.next(deadline.saturating_duration_since(Instant::now()), "report"))
            .collect()
    }

    /// Close their stdin (holders let go of their sockets) and check they exit cleanly.
    pub fn finish(mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for p in &mut self.procs {
            drop(p.stdin.take());
            loop {
                if let Some(st) = p.child.try_wait().context("waiting for a load generator")? {
                    if !st.success() {
                        bail!("{} failed: {st}", p.name);
                    }
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("{} did not exit within {timeout:?}", p.name);
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tracers.

/// Which `portexhaust trace` a variant runs, beyond its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Plain `trace` (blame on): what the targets are about.
    Default,
    /// `trace --no-blame`: failures only, no ownership tracking or latency histograms
    /// (a diagnostic variant).
    NoBlame,
    /// `trace --pid 1`: every program runs but no failure passes the filter: what tracking
    /// costs without reporting (a diagnostic variant).
    HooksOnly,
    /// `trace --catch bind,udp`: bind(0) EADDRINUSE and UDP EAGAIN coverage switched on, so
    /// that its extra cost shows on its own (only for a binary whose help offers `--catch`).
    Catch,
    /// `trace --no-call-sites`: no user stack walks, so that what the call sites cost shows
    /// against the default (only for a binary whose help offers `--no-call-sites`).
    NoCallSites,
    /// `trace --catch nat`: the default trace with the source-NAT hook attached as well (it
    /// runs on every dropped packet of the machine); judged against the same targets as the
    /// default (only for a binary whose `--catch` offers nat).
    CatchNat,
}

impl Flavor {
    /// The variant name's prefix: `portexhaust/fentry`, `no-blame/fentry`, ...
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Default => "portexhaust",
            Self::NoBlame => "no-blame",
            Self::HooksOnly => "hooks-only",
            Self::Catch => "catch",
            Self::NoCallSites => "no-call-sites",
            Self::CatchNat => "catch-nat",
        }
    }

    pub fn args(self) -> &'static [&'static str] {
        match self {
            Self::Default => &[],
            Self::NoBlame => &["--no-blame"],
            Self::HooksOnly => &["--pid", "1"],
            Self::Catch => &["--catch", "bind,udp"],
            Self::NoCallSites => &["--no-call-sites"],
            Self::CatchNat => &["--catch", "nat"],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TracerKind {
    Portexhaust { backend: String, flavor: Flavor },
    Bpftrace,
}

/// The bpftrace one-liner users reach for: count failed connect()s (EADDRNOTAVAIL) per comm.
pub const BPFTRACE_PROGRAM: &str =
    "tracepoint:syscalls:sys_exit_connect /args->ret == -99/ { @[comm] = count(); }";

/// Printed by bpftrace (its own test hook) once every probe is attached.
const BPFTRACE_ATTACHED: &str = "__BPFTRACE_NOTIFY_PROBES_ATTACHED";

enum Marker {
    Attaching,
    Ready,
    /// portexhaust's `census:` line (after ready: its count of the sockets already open).
    Census,
}

/// What a tracer wrote on stdout: a count of lines and the last one (portexhaust streams one
/// line per failure, so the harness keeps only what it needs), or everything (bpftrace).
#[derive(Debug, Default)]
pub struct Tally {
    pub newlines: u64,
    pub last_line: String,
    pub text: String,
}

/// Counts lines of a stream chunk by chunk, keeping only the last line.
#[derive(Default)]
pub struct LineTally {
    newlines: u64,
    tail: Vec<u8>,
}

impl LineTally {
    pub fn push(&mut self, chunk: &[u8]) {
        self.newlines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > 1 << 20 {
            self.compact();
        }
    }

    /// Keep only the last line (complete or not).
    fn compact(&mut self) {
        let end = if self.tail.last() == Some(&b'\n') {
            self.tail.len() - 1
        } else {
            self.tail.len()
        };
        let start = self.tail[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        self.tail.drain(..start);
    }

    pub fn finish(mut self) -> Tally {
        self.compact();
        Tally {
            newlines: self.newlines,
            last_line: String::from_utf8_lossy(&self.tail).trim().to_string(),
            text: String::new(),
        }
    }
}

pub struct Tracer {
    pub kind: TracerKind,
    child: Child,
    pub pid: u32,
    /// From spawn to "attached and reading".
    pub ready_after: Duration,
    /// bpftrace only: from spawn to its "Attaching N probes..." line.
    pub attaching_after: Option<Duration>,
    out: Option<JoinHandle<Tally>>,
    /// Markers that come after ready (the census line), read when the tracer is stopped.
    markers: Receiver<(Marker, Instant)>,
    t0: Instant,
    /// Where portexhaust's stdout goes (removed when the tracer is dropped).
    out_file: Option<PathBuf>,
    err: Option<JoinHandle<String>>,
    reaped: bool,
}

/// A new file for one tracer's output, in /dev/shm when there is one (memory, not disk).
fn stream_file() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = Path::new("/dev/shm");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!(
        "pxh-bench-{}-{}.ndjson",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Count the lines of a file and keep its last one.
fn tally_file(path: &Path) -> Tally {
    let mut t = LineTally::default();
    if let Ok(mut f) = std::fs::File::open(path) {
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            t.push(&buf[..n]);
        }
    }
    t.finish()
}

pub struct Stopped {
    pub exit: Exit,
    pub out: Tally,
    pub stderr: String,
    /// From spawn to portexhaust's `census:` line, if it printed one.
    pub census_after: Option<Duration>,
}

impl Tracer {
    pub fn start(kind: TracerKind, portexhaust: &Path, ready_timeout: Duration) -> Result<Self> {
        let mut cmd = match &kind {
            TracerKind::Portexhaust { backend, flavor } => {
                let mut c = Command::new(portexhaust);
                c.args(["trace", "--json", "--backend", backend])
                    .args(flavor.args());
                c
            }
            TracerKind::Bpftrace => {
                let mut c = Command::new("bpftrace");
                c.args(["-e", BPFTRACE_PROGRAM]).env(BPFTRACE_ATTACHED, "1");
                c
            }
        };
        // portexhaust streams a line per failure: into a file in memory (tmpfs), read after it
        // exits, so that no reader of ours competes with the tracer and the load for the CPUs
        // during the measured part. bpftrace prints little: a pipe.
        let out_file = match kind {
            TracerKind::Portexhaust { .. } => Some(stream_file()),
            TracerKind::Bpftrace => None,
        };
        let stdout_to = match &out_file {
            Some(p) => Stdio::from(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            ),
            None => Stdio::piped(),
        };
        let t0 = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(stdout_to)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {kind:?}"))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take().context("tracer stderr")?;
        let (tx, rx) = mpsc::channel::<(Marker, Instant)>();
        let (out, err) = match kind {
            TracerKind::Portexhaust { .. } => {
                let out = None;
                let err = thread::spawn(move || {
                    let mut all = String::new();
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        if line.contains("ready:") {
                            let _ = tx.send((Marker::Ready, Instant::now()));
                        } else if line.starts_with("portexhaust: census:") {
                            let _ = tx.send((Marker::Census, Instant::now()));
                        }
                        all.push_str(&line);
                        all.push('\n');
                    }
                    all
                });
                (out, err)
            }
            TracerKind::Bpftrace => {
                // bpftrace 0.17 prints "Attaching N probes..." on stdout and its attached
                // notice on stderr; look for both markers on both streams.
                let tx2 = tx.clone();
                let stdout = stdout.context("bpftrace stdout")?;
                let out = thread::spawn(move || {
                    let mut t = Tally::default();
                    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                        if line.starts_with("Attaching") {
                            let _ = tx.send((Marker::Attaching, Instant::now()));
                        } else if line.contains(BPFTRACE_ATTACHED) {
                            let _ = tx.send((Marker::Ready, Instant::now()));
                            continue;
                        }
                        t.newlines += 1;
                        t.text.push_str(&line);
                        t.text.push('\n');
                    }
                    t
                });
                let out = Some(out);
                let err = thread::spawn(move || {
                    let mut all = String::new();
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        if line.contains(BPFTRACE_ATTACHED) {
                            let _ = tx2.send((Marker::Ready, Instant::now()));
                            continue;
                        }
                        all.push_str(&line);
                        all.push('\n');
                    }
                    all
                });
                (out, err)
            }
        };
        let mut tracer = Self {
            kind,
            child,
            pid,
            ready_after: Duration::ZERO,
            attaching_after: None,
            out,
            markers: rx,
            t0,
            out_file,
            err: Some(err),
            reaped: false,
        };
        let deadline = t0 + ready_timeout;
        loop {
            let got = tracer
                .markers
                .recv_timeout(deadline.saturating_duration_since(Instant::now()));
            match got {
                Ok((Marker::Attaching, at)) => tracer.attaching_after = Some(at - t0),
                Ok((Marker::Census, _)) => {}
                Ok((Marker::Ready, at)) => {
                    tracer.ready_after = at - t0;
                    return Ok(tracer);
                }
                Err(_) => {
                    let kind = tracer.kind.clone();
                    let stopped = tracer.stop();
                    let detail = stopped.map(|s| s.stderr).unwrap_or_else(|e| e.to_string());
                    return Err(anyhow!(
                        "{kind:?} was not ready within {ready_timeout:?}: {}",
                        detail.trim()
                    ));
                }
            }
        }
    }

    /// SIGINT (both tracers print their results on it), then reap with wait4 for its rusage.
    pub fn stop(mut self) -> Result<Stopped> {
        sys::signal(self.pid, libc::SIGINT);
        let exit = match self.wait_after_sigint(Duration::from_secs(60)) {
            Some(e) => e,
            None => {
                sys::signal(self.pid, libc::SIGKILL);
                sys::wait4_timeout(self.pid, Duration::from_secs(10))
                    .context("a tracer survived SIGKILL")?
            }
        };
        self.reaped = true;
        let out = match (&self.out_file, self.out.take()) {
            (Some(p), _) => tally_file(p),
            (None, Some(h)) => h.join().unwrap_or_default(),
            (None, None) => Tally::default(),
        };
        let stderr = self
            .err
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        // The stderr reader has ended (joined above): every marker it sent is here.
        let census_after = self
            .markers
            .try_iter()
            .find_map(|(m, at)| matches!(m, Marker::Census).then(|| at - self.t0));
        Ok(Stopped {
            exit,
            out,
            stderr,
            census_after,
        })
    }
}

impl Tracer {
    /// Wait for the tracer to exit after SIGINT. bpftrace (0.17) only notices SIGINT when it
    /// interrupts its epoll_wait: one that arrives between the attached notice and the first
    /// epoll_wait sets its flag and is then never looked at again, and bpftrace runs until
    /// killed (and loses its counts). So bpftrace gets SIGINT again every half second until
    /// it has gone; portexhaust handles the first one.
    fn wait_after_sigint(&self, timeout: Duration) -> Option<sys::Exit> {
        if !matches!(self.kind, TracerKind::Bpftrace) {
            return sys::wait4_timeout(self.pid, timeout);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(e) = sys::wait4_timeout(self.pid, left.min(Duration::from_millis(500))) {
                return Some(e);
            }
            if left.is_zero() || !sys::is_our_child(self.pid) {
                return None;
            }
            sys::signal(self.pid, libc::SIGINT);
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = sys::wait4_timeout(self.pid, Duration::from_secs(10));
        }
        if let Some(p) = self.out_file.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `@[comm]: count` lines of bpftrace's map dump.
pub fn parse_bpftrace_counts(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("@[")?;
            let (key, count) = rest.rsplit_once("]:")?;
            Some((key.to_string(), count.trim().parse::<u64>().ok()?))
        })
        .fold(BTreeMap::new(), |mut m: BTreeMap<String, u64>, (k, v)| {
            *m.entry(k).or_default() += v;
            m
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_tally_counts_lines_and_keeps_the_last() {
        let mut t = LineTally::default();
        t.push(b"{\"a\":1}\n{\"a\"");
        t.push(b":2}\n");
        for _ in 0..20_000 {
            t.push(b"{\"type\":\"failure\",\"padding\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}\n");
        }
        t.push(b"{\"type\":\"sum");
        t.push(b"mary\"}\n");
        let r = t.finish();
        assert_eq!(r.newlines, 20_003);
        assert_eq!(r.last_line, "{\"type\":\"summary\"}");
    }

    #[test]
    fn bpftrace_map_dump_is_parsed() {
        let out = "Attaching 1 probe...\n\n\n@[pxhb-storm]: 300000\n@[curl]: 2\n@[a]:b]: 7\n";
        let m = parse_bpftrace_counts(out);
        assert_eq!(m.get("pxhb-storm"), Some(&300000));
        assert_eq!(m.get("curl"), Some(&2));
        assert_eq!(m.get("a]:b"), Some(&7));
        assert_eq!(m.len(), 3);
    }
}
