//! What every generator shares: errors, the paused-start protocol, CPU accounting, sockets.
use std::{
    io::{self, BufRead, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use portexhaust_common::netns_of;
use portexhaust_workload::WorkloadError;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

use crate::report::Ready;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LoadError {
    let context = context.into();
    move |source| LoadError::Io { context, source }
}

pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Set this process's command name (what `comm` shows in the tracers' reports).
pub fn set_comm(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated buffer of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Print one JSON line on stdout and flush it (the harness reads line by line).
pub fn emit<T: Serialize>(value: &T) -> Result<(), LoadError> {
    let line = serde_json::to_string(value)
        .map_err(|e| LoadError::Invalid(format!("serialising a report: {e}")))?;
    let mut out = io::stdout().lock();
    writeln!(out, "{line}").map_err(io_err("writing to stdout"))?;
    out.flush().map_err(io_err("flushing stdout"))
}

/// Announce readiness and, when asked to, block until the harness says `go`.
pub fn ready_then_wait(comm: &str, wait: bool) -> Result<(), LoadError> {
    let pid = std::process::id();
    emit(&Ready {
        ready: pid,
        comm: comm.to_string(),
        netns: netns_of(pid),
    })?;
    if !wait {
        return Ok(());
    }
    let mut line = String::new();
    let n = io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(io_err("waiting for go on stdin"))?;
    if n == 0 {
        return Err(LoadError::Invalid(
            "stdin closed before the harness said go".into(),
        ));
    }
    Ok(())
}

/// Block until stdin sends a line or closes: a holder keeps its sockets until then.
pub fn wait_for_release() {
    let mut line = String::new();
    let _ = io::stdin().lock().read_line(&mut line);
}

/// User and system CPU seconds of this process so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub user_s: f64,
    pub sys_s: f64,
}

impl Cpu {
    pub fn now() -> Self {
        // SAFETY: getrusage fills the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Self {
            user_s: secs(ru.ru_utime),
            sys_s: secs(ru.ru_stime),
        }
    }

    pub fn since(self, start: Self) -> Self {
        Self {
            user_s: self.user_s - start.user_s,
            sys_s: self.sys_s - start.sys_s,
        }
    }
}

pub fn v4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

pub fn tcp_socket() -> io::Result<Socket> {
    Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
}

pub fn listener(addr: SocketAddr) -> Result<Socket, LoadError> {
    let s = tcp_socket().map_err(io_err("listener socket"))?;
    s.set_reuse_address(true).map_err(io_err("SO_REUSEADDR"))?;
    s.bind(&addr.into())
        .map_err(io_err(format!("bind {addr}")))?;
    // The kernel caps this at net.core.somaxconn (4096); every generator accepts right after
    // each connect, so the queue never holds more than one connection.
    s.listen(4096).map_err(io_err("listen"))?;
    Ok(s)
}

/// Raise RLIMIT_NOFILE to at least `want` (root may raise the hard limit up to fs.nr_open).
pub fn raise_nofile(want: u64) -> Result<(), LoadError> {
    // SAFETY: getrlimit/setrlimit read and write the struct they are given.
    let mut cur: libc::rlimit = unsafe { std::mem::zeroed() };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
    if cur.rlim_cur >= want {
        return Ok(());
    }
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: cur.rlim_max.max(want),
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(LoadError::Invalid(format!(
            "cannot raise the open-file limit to {want} (now {}, hard {}): {}; \
             fewer connections, or raise fs.nr_open",
            cur.rlim_cur,
            cur.rlim_max,
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Resident set of this process in KiB (VmRSS), 0 if /proc cannot tell.
pub fn own_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
