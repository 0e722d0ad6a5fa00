//! Failure storm: hold every port of a small range towards one destination, then a tight loop
//! of connect() calls that fail with EADDRNOTAVAIL, counting each one exactly.
use std::{collections::BTreeMap, time::Instant};

use portexhaust_common::netns_of;
use portexhaust_workload::isolate;
use socket2::Socket;

use crate::{
    common::{
        Cpu, LoadError, errno_of, io_err, listener, ready_then_wait, set_comm, tcp_socket, v4,
    },
    report::StormReport,
};

#[derive(Clone, Debug)]
pub struct StormOptions {
    /// Size of the namespace's port range (every port is held before the storm).
    pub ports: u16,
    /// connect() calls to make.
    pub failures: u64,
    /// Stop early after this long (a bound, not the plan: the report says `truncated`).
    pub max_secs: f64,
    pub dport: u16,
    pub comm: String,
    pub wait: bool,
}

/// Connect `n` times to `dst` and keep both ends: every port of the range is then taken for
/// this destination.
fn hold_range(l: &Socket, n: u16, dport: u16) -> Result<Vec<(Socket, Socket)>, LoadError> {
    (0..n)
        .map(|i| {
            let c = tcp_socket().map_err(io_err("socket"))?;
            c.connect(&v4(dport).into()).map_err(io_err(format!(
                "holding connection {} of {n} to 127.0.0.1:{dport}",
                i + 1
            )))?;
            let (s, _) = l.accept().map_err(io_err("accept"))?;
            Ok((c, s))
        })
        .collect()
}

pub fn run(o: &StormOptions) -> Result<StormReport, LoadError> {
    if o.failures == 0 {
        return Err(LoadError::Invalid("--failures must be at least 1".into()));
    }
    set_comm(&o.comm);
    isolate(o.ports, None)?;
    let l = listener(v4(o.dport))?;
    let _held = hold_range(&l, o.ports, o.dport)?;
    let dst = v4(o.dport).into();
    // Prove the range is full before announcing: one more connect must fail with 99. (No
    // tracer is attached yet, so this call is in no one's count.)
    match tcp_socket().and_then(|s| s.connect(&dst)) {
        Err(e) if errno_of(&e) == libc::EADDRNOTAVAIL => {}
        other => {
            return Err(LoadError::Invalid(format!(
                "the range of {} ports is not exhausted after holding it: connect gave {other:?}",
                o.ports
            )));
        }
    }
    ready_then_wait(&o.comm, o.wait)?;

    let cpu0 = Cpu::now();
    let t0 = Instant::now();
    let mut failures = 0u64;
    let mut other: BTreeMap<String, u64> = BTreeMap::new();
    let mut truncated = false;
    for i in 0..o.failures {
        // A new socket per attempt, as a real client retrying would do.
        match tcp_socket().and_then(|s| s.connect(&dst)) {
            Err(e) if errno_of(&e) == libc::EADDRNOTAVAIL => failures += 1,
            Err(e) => *other.entry(format!("errno {}", errno_of(&e))).or_default() += 1,
            Ok(()) => *other.entry("succeeded".into()).or_default() += 1,
        }
        if i % 4096 == 4095 && t0.elapsed().as_secs_f64() > o.max_secs {
            truncated = true;
            break;
        }
    }
    let elapsed_s = t0.elapsed().as_secs_f64();
    let cpu = Cpu::now().since(cpu0);
    let pid = std::process::id();
    Ok(StormReport {
        kind: "storm".into(),
        pid,
        comm: o.comm.clone(),
        netns: netns_of(pid),
        ports: o.ports,
        dst: v4(o.dport).to_string(),
        failures,
        other,
        truncated,
        elapsed_s,
        rate_per_s: failures as f64 / elapsed_s.max(1e-9),
        user_s: cpu.user_s,
        sys_s: cpu.sys_s,
    })
}
