//! Socket helpers: listeners, held connections, failing connects and the tally of their
//! outcomes.
use std::{
    io::{self, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{WorkloadError, io_err};

pub(crate) fn listener(addr: SocketAddr) -> Result<Socket, WorkloadError> {
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

pub(crate) fn errno_of(e: &io::Error) -> u32 {
    e.raw_os_error().unwrap_or(0) as u32
}

/// Tallies attempts that should fail with one errno.
pub(crate) struct Tally {
    pub(crate) want: u32,
    pub(crate) seen: u64,
    pub(crate) other: std::collections::BTreeMap<String, u64>,
}

impl Tally {
    pub(crate) fn new(want: u32) -> Self {
        Self {
            want,
            seen: 0,
            other: Default::default(),
        }
    }
    pub(crate) fn note(&mut self, what: impl Into<String>) {
        *self.other.entry(what.into()).or_default() += 1;
    }
    pub(crate) fn record(&mut self, r: io::Result<()>) {
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
pub(crate) fn hold(dst: SocketAddr, n: u16) -> Result<Vec<Socket>, WorkloadError> {
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

pub(crate) fn fail_connects(domain: Domain, ty: Type, dst: SocketAddr, k: u64, want: u32) -> Tally {
    let mut t = Tally::new(want);
    for _ in 0..k {
        let r = Socket::new(domain, ty, None).and_then(|s| s.connect(&dst.into()));
        t.record(r);
    }
    t
}

pub(crate) fn v4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}
pub(crate) fn v6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)
}

/// Leave `n` client sockets to `dst` in TIME_WAIT: the client closes first (active close).
pub(crate) fn make_time_wait(
    listener: &Socket,
    dst: SocketAddr,
    n: u16,
) -> Result<(), WorkloadError> {
    for i in 0..n {
        one_time_wait(listener, dst)
            .map_err(io_err(format!("churn connection {} of {n}", i + 1)))?;
    }
    // Let the last FIN/ACK exchange land (loopback: microseconds).
    std::thread::sleep(std::time::Duration::from_millis(50));
    Ok(())
}

/// One connection to `dst`, accepted on `listener`, closed by the client first: its port is in
/// TIME_WAIT for 60 s once the server's FIN lands (microseconds later, on loopback).
pub(crate) fn one_time_wait(listener: &Socket, dst: SocketAddr) -> io::Result<()> {
    let c = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    c.connect(&dst.into())?;
    let (mut srv, _) = listener.accept()?;
    drop(c); // client FIN first -> the client side will hold TIME_WAIT
    let mut buf = [0u8; 1];
    // The server reads EOF, then closes: the client's FIN_WAIT2 -> TIME_WAIT.
    let _ = srv.read(&mut buf);
    drop(srv);
    Ok(())
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
}
