//! The two ends of a source-NAT exhaustion (`portexhaust workload-nat`, hidden): a server that
//! accepts and keeps every connection, and a client that connects N times through a NAT and
//! keeps what it gets. Unlike the other scenarios they do not isolate themselves: the caller
//! runs each inside a network namespace it made (`ip netns exec`), with a router namespace
//! masquerading between them (`cargo xtask vmtest`'s NAT scenario).
use std::{
    io::{self, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{WorkloadError, io_err};

/// What the client did: the pid the tracer must name, and how many connects got through.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NatClientReport {
    pub pid: u32,
    pub ok: u32,
    /// Connects that timed out: their SYNs (and retransmissions) were dropped by the NAT.
    pub failed: u32,
}

/// Listen on `addr`, say `listening`, then accept and keep every connection until killed.
pub fn nat_server(addr: SocketAddr) -> Result<(), WorkloadError> {
    let l = TcpListener::bind(addr).map_err(io_err(format!("listening on {addr}")))?;
    {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "listening");
        let _ = out.flush();
    }
    // A failed accept (a reset before it) is not the server's failure: skipped.
    let kept: Vec<TcpStream> = l.incoming().flatten().collect();
    drop(kept);
    Ok(())
}

/// Connect `n` times to `addr`, giving up on each after `timeout` (the SYN and, with 1.5 s,
/// one retransmission): what happened, and the connections that got through, which the caller
/// keeps open so that the tracer can still find the client while it names the last drops.
pub fn nat_client(
    addr: SocketAddr,
    n: u32,
    timeout: Duration,
) -> (NatClientReport, Vec<TcpStream>) {
    let mut kept = Vec::new();
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                ok += 1;
                kept.push(s);
            }
            Err(_) => failed += 1,
        }
    }
    let report = NatClientReport {
        pid: std::process::id(),
        ok,
        failed,
    };
    (report, kept)
}
