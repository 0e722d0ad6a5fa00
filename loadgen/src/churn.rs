//! Connection churn that succeeds: connect, accept, close, over and over, on loopback.
//!
//! Who closes first decides what the measurement sees. If the client closed first, its side
//! would enter TIME_WAIT (60 s, `TCP_TIMEWAIT_LEN`) on its ephemeral port: the range would fill
//! within seconds and from then on every connect() would depend on TIME_WAIT reuse
//! (`tcp_tw_reuse`, which also needs the socket to be over a second old, `tcp_tw_reuse_delay`
//! on 6.13+), so the rate would change shape half-way through a run. Here the server closes
//! first: the TIME_WAIT entry lands on the server's side (keyed by the listener's port, which
//! never blocks the client's port search), the client's port is free again as soon as it has
//! closed, and the rate stays flat for as long as the run lasts. `tcp_tw_reuse=1` is set in the
//! namespace anyway, so a stray client-side TIME_WAIT can never exhaust the range.
use std::{collections::BTreeMap, io::Read, time::Instant};

use portexhaust_common::netns_of;
use portexhaust_workload::isolate;

use crate::{
    common::{
        Cpu, LoadError, errno_of, io_err, listener, ready_then_wait, set_comm, tcp_socket, v4,
    },
    report::ChurnReport,
};

#[derive(Clone, Debug)]
pub struct ChurnOptions {
    /// Size of the namespace's port range.
    pub ports: u16,
    /// How long to churn.
    pub secs: f64,
    pub dport: u16,
    pub comm: String,
    pub wait: bool,
}

/// More failed connects than this in a row means something is broken: stop rather than spin.
const MAX_ERRORS_IN_A_ROW: u64 = 10_000;

pub fn run(o: &ChurnOptions) -> Result<ChurnReport, LoadError> {
    if !(o.secs > 0.0 && o.secs <= 600.0) {
        return Err(LoadError::Invalid(
            "--secs must be more than 0 and at most 600".into(),
        ));
    }
    set_comm(&o.comm);
    isolate(o.ports, Some(1))?;
    let l = listener(v4(o.dport))?;
    let dst = v4(o.dport).into();
    ready_then_wait(&o.comm, o.wait)?;

    let cpu0 = Cpu::now();
    let t0 = Instant::now();
    let mut connects = 0u64;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut in_a_row = 0u64;
    let mut buf = [0u8; 1];
    let mut i = 0u64;
    loop {
        i += 1;
        if i.is_multiple_of(64) && t0.elapsed().as_secs_f64() >= o.secs {
            break;
        }
        let mut c = tcp_socket().map_err(io_err("socket"))?;
        if let Err(e) = c.connect(&dst) {
            *errors.entry(format!("errno {}", errno_of(&e))).or_default() += 1;
            in_a_row += 1;
            if in_a_row >= MAX_ERRORS_IN_A_ROW {
                return Err(LoadError::Invalid(format!(
                    "{in_a_row} connects in a row failed (last: {e}): the churn cannot go on"
                )));
            }
            continue;
        }
        in_a_row = 0;
        let (s, _) = l.accept().map_err(io_err("accept"))?;
        drop(s); // the server closes first: its FIN reaches the client ...
        // ... which reads EOF, so that its own close is the passive one (LAST_ACK -> CLOSE).
        let n = c.read(&mut buf).map_err(io_err("reading EOF"))?;
        if n != 0 {
            return Err(LoadError::Invalid(
                "the server sent data; expected EOF".into(),
            ));
        }
        drop(c);
        connects += 1;
    }
    let elapsed_s = t0.elapsed().as_secs_f64();
    let cpu = Cpu::now().since(cpu0);
    let pid = std::process::id();
    Ok(ChurnReport {
        kind: "churn".into(),
        pid,
        comm: o.comm.clone(),
        netns: netns_of(pid),
        ports: o.ports,
        dst: v4(o.dport).to_string(),
        first_close: "server".into(),
        connects,
        errors,
        elapsed_s,
        rate_per_s: connects as f64 / elapsed_s.max(1e-9),
        user_s: cpu.user_s,
        sys_s: cpu.sys_s,
    })
}
