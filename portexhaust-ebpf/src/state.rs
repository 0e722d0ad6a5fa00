//! `inet_sock_set_state(sk, oldstate, newstate)`: ownership, connect latency and, for the state
//! backends, the TCP connect failures themselves, all from one hook and no syscall tracepoint.
//!
//! What each transition means (kernel 5.10..7.2, `tcp_v4_connect()` / `tcp_v6_connect()`; see
//! shared/notes/kernel.md):
//! - CLOSE -> SYN_SENT runs in the connecting task, inside connect(), after the route (so the
//!   source address) is known and just before `inet_hash_connect()`. `inet_num` is still 0
//!   unless the socket was bound before connect().
//! - SYN_SENT -> CLOSE inside that same connect() is its failure path. If port selection
//!   failed, the socket never got a source port: `inet_sport` is still 0 (unbound socket: the
//!   range is exhausted for this destination), or, for a socket bound before connect(), the
//!   bound port's 4-tuple was taken: then `write_seq` is still 0 (it is set only after port
//!   selection succeeds) and `sk_err` is 0 (a reset or timeout sets it first). The failing
//!   task is `current`. The tracepoint fires after `unhash()`/`inet_put_port()`, so `inet_num`
//!   itself cannot tell.
//! - SYN_SENT -> ESTABLISHED: the handshake completed (softirq or the task).
//! - X -> CLOSE from FIN_WAIT1/FIN_WAIT2/CLOSING: the active closer's socket is replaced by a
//!   TIME_WAIT mini-socket with the same 4-tuple; from other states the port is free again.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_get_current_cgroup_id,
    },
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use portexhaust_common::{
    AF_INET, COMM_LEN, Cause, DestKey, DestStats, EADDRNOTAVAIL, EVENT_BOUND, EVENT_SADDR_KNOWN,
    INFLIGHT_SYN_SENT, IPPROTO_TCP, LATENCY_BUCKETS, OWNER_BOUND, OWNER_TIME_WAIT, Owner, ProcInfo,
    ProcKey, Site, TcpState, TupleKey, stat,
};

use crate::{
    addr::{self, bytes},
    emit::{Failure, atomic_add, bump, now_ns, report},
    globals,
    maps::{DEST_STATS, OWNERS, PENDING, PROCS, SYSCALL_INFLIGHT, ZERO_STATS},
    sock::{BtfSock, Conn, ProbeSock, Sock},
    task::{current_netns, current_start_ns},
};

const CLOSE: i32 = TcpState::Close as i32;
const SYN_SENT: i32 = TcpState::SynSent as i32;
const ESTABLISHED: i32 = TcpState::Established as i32;

/// Dispatch one transition. Most transitions on a busy host (both ends of every connection,
/// ~10 per connection) are none of these and return before any memory access.
#[inline(always)]
pub fn on_state(s: &impl Sock, old: i32, new: i32) {
    if old == CLOSE && new == SYN_SENT {
        connect_start(s);
    } else if old == SYN_SENT {
        if new == CLOSE {
            connect_closed(s);
        } else if new == ESTABLISHED {
            connect_established(s);
        }
    } else if new == CLOSE && globals::blame() {
        socket_closed(s, old);
    }
}

/// CLOSE -> SYN_SENT, in the connecting task: remember who opens the connection.
// Out of line: each transition gets its own 512-byte BPF stack frame.
#[inline(never)]
fn connect_start(s: &impl Sock) {
    if !s.is_tcp() {
        return;
    }
    if globals::syscall_kinds() != 0 {
        // The syscall tracepoints (attached only on request) must know that port selection
        // was reached inside this connect(), to tell its EADDRNOTAVAIL from earlier ones.
        if let Some(p) = SYSCALL_INFLIGHT.get_ptr_mut(bpf_get_current_pid_tgid()) {
            // SAFETY: this thread's own entry.
            unsafe { (*p).flags |= INFLIGHT_SYN_SENT };
        }
    }
    if !globals::blame() {
        return;
    }
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let start_ns = current_start_ns();
    let bound = s.num().is_some_and(|n| n != 0);
    let owner = Owner {
        pid,
        flags: if bound { OWNER_BOUND } else { 0 },
        start_ns,
        at_ns: now_ns(),
    };
    // BPF_NOEXIST first, to count only new keys (the eviction count is derived from this).
    if PENDING.insert(s.addr(), owner, 1).is_ok() {
        bump(stat::PENDING_INSERTS);
    } else {
        let _ = PENDING.insert(s.addr(), owner, 0);
    }
    // The command and cgroup once per process, so that exited owners are still named.
    let key = ProcKey {
        pid,
        _pad: 0,
        start_ns,
    };
    if PROCS.get_ptr(key).is_none() {
        let info = ProcInfo {
            // SAFETY: helper without arguments.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
        };
        let _ = PROCS.insert(key, info, 0);
    }
}

const NO_OWNER: Owner = Owner {
    pid: 0,
    flags: 0,
    start_ns: 0,
    at_ns: 0,
};

/// Take the socket's pending connect into `out`, if it was seen starting.
///
/// An out-parameter the caller zeroes, not an `Option<Owner>`: LLVM may load a field of the
/// `None` variant speculatively, and verifiers before 6.3 refuse any read of an uninitialised
/// stack slot, even one whose value is never used.
#[inline(always)]
fn take_pending(s: &impl Sock, out: &mut Owner) -> bool {
    if !globals::blame() {
        return false;
    }
    let Some(p) = PENDING.get_ptr(s.addr()) else {
        return false;
    };
    // SAFETY: the pointer is into the map value, copied out at once.
    *out = unsafe { *p };
    if PENDING.remove(s.addr()).is_ok() {
        bump(stat::PENDING_DELETES);
    }
    true
}

/// Why a SYN_SENT -> CLOSE happened inside connect(), if port selection is what failed.
#[inline(always)]
fn port_selection_failure(s: &impl Sock, c: &Conn) -> Option<Cause> {
    if c.sport == 0 {
        return Some(Cause::Exhausted);
    }
    // A source port is set: either the socket was bound before connect() (and then a taken
    // 4-tuple fails port selection with the port still set), or port selection succeeded and
    // something later failed or the connect was aborted.
    if s.num()? != 0 && s.write_seq()? == 0 && s.sk_err()? == 0 {
        return Some(Cause::TupleCollision);
    }
    None
}

/// SYN_SENT -> CLOSE: a failed or aborted connect.
// Out of line: each transition gets its own 512-byte BPF stack frame.
#[inline(never)]
fn connect_closed(s: &impl Sock) {
    if !s.is_tcp() {
        return;
    }
    let mut pending = NO_OWNER;
    let seen = take_pending(s, &mut pending);
    let Some(c) = s.conn() else {
        return;
    };
    let Some(cause) = port_selection_failure(s, &c) else {
        return;
    };
    let netns = s.netns();
    if seen {
        dest_outcome(netns, &c, true, pending.at_ns);
    }
    if !globals::state_reports() {
        return; // the fentry/kprobe backends report from their own hooks
    }
    // Without BTF offsets (tracepoint backend on a kernel without BTF) the socket's namespace is
    // unknown; the failing task's is the same one but for sockets handed across setns().
    let netns = if netns == 0 { current_netns() } else { netns };
    let mut flags = 0;
    if !addr::is_zero(c.saddr) {
        flags |= EVENT_SADDR_KNOWN;
    }
    if cause == Cause::TupleCollision {
        flags |= EVENT_BOUND;
    }
    report(&Failure {
        netns,
        errno: EADDRNOTAVAIL,
        site: Site::InetHashConnect,
        cause,
        proto: IPPROTO_TCP,
        family: c.family,
        dport: c.dport,
        daddr: c.daddr,
        saddr: c.saddr,
        flags,
    });
}

#[inline(always)]
fn tuple_of(netns: u32, c: &Conn) -> TupleKey {
    let (s, d) = if c.family == AF_INET {
        (addr::v4_mapped(c.saddr), addr::v4_mapped(c.daddr))
    } else {
        (c.saddr, c.daddr)
    };
    TupleKey {
        netns,
        sport: c.sport,
        dport: c.dport,
        saddr: bytes(s),
        daddr: bytes(d),
    }
}

/// SYN_SENT -> ESTABLISHED: the owner moves from the socket address to the 4-tuple.
// Out of line: each transition gets its own 512-byte BPF stack frame.
#[inline(never)]
fn connect_established(s: &impl Sock) {
    let mut owner = NO_OWNER;
    if !take_pending(s, &mut owner) {
        return;
    }
    let Some(c) = s.conn() else {
        return;
    };
    let netns = s.netns();
    dest_outcome(netns, &c, false, owner.at_ns);
    let key = tuple_of(netns, &c);
    if OWNERS.insert(key, owner, 1).is_ok() {
        bump(stat::OWNER_INSERTS);
    } else {
        // The tuple is still remembered from a TIME_WAIT this connection reused.
        let _ = OWNERS.insert(key, owner, 0);
    }
}

/// X -> CLOSE after ESTABLISHED: TIME_WAIT follows an active close; otherwise forget the owner.
// Out of line: each transition gets its own 512-byte BPF stack frame.
#[inline(never)]
fn socket_closed(s: &impl Sock, old: i32) {
    if !s.is_tcp() {
        return;
    }
    let Some(c) = s.conn() else {
        return;
    };
    let key = tuple_of(s.netns(), &c);
    let time_wait = TcpState::from_u8(old as u8).is_some_and(TcpState::ends_in_time_wait);
    if time_wait {
        if let Some(p) = OWNERS.get_ptr_mut(key) {
            // SAFETY: pointer into the map value.
            unsafe {
                (*p).at_ns = now_ns();
                (*p).flags |= OWNER_TIME_WAIT;
            }
        }
    } else if OWNERS.remove(key).is_ok() {
        bump(stat::OWNER_DELETES);
    }
}

/// log2 bucket of a latency in ns.
#[inline(always)]
fn latency_bucket(ns: u64) -> usize {
    if ns == 0 {
        return 0;
    }
    let b = 63 - ns.leading_zeros() as usize;
    if b >= LATENCY_BUCKETS {
        LATENCY_BUCKETS - 1
    } else {
        b
    }
}

/// Count a connect's outcome and its latency (from CLOSE -> SYN_SENT) per destination.
// Out of line: its key and scratch pointer get their own stack frame.
#[inline(never)]
fn dest_outcome(netns: u32, c: &Conn, failed: bool, connect_ns: u64) {
    let key = DestKey {
        netns,
        family: c.family,
        dport: c.dport,
        daddr: bytes(c.daddr),
    };
    let mut p = DEST_STATS.get_ptr_mut(key);
    if p.is_none() {
        let Some(zero) = ZERO_STATS.get_ptr(0) else {
            return;
        };
        // SAFETY: pointer to our own all-zero scratch value. By reference on purpose: by value
        // it would be copied onto the stack, which is what the scratch map avoids.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = DEST_STATS.insert(key, unsafe { &*zero }, 1);
        p = DEST_STATS.get_ptr_mut(key);
    }
    let Some(p): Option<*mut DestStats> = p else {
        return;
    };
    let bucket = latency_bucket(now_ns().saturating_sub(connect_ns));
    // SAFETY: pointer into the map value; atomic adds because one destination's connects
    // complete on several CPUs at once.
    unsafe {
        atomic_add(&raw mut (*p).connects, 1);
        if failed {
            atomic_add(&raw mut (*p).failures, 1);
        }
        if let Some(h) = (*p).hist.get_mut(bucket) {
            atomic_add(h, 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The three forms of the hook: three-line wrappers over the logic above.

/// tp_btf (5.5+): `btf_trace_inet_sock_set_state(void *, const struct sock *sk, const int
/// oldstate, const int newstate)`; `sk` is BTF-typed, so its fields are direct loads.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tp_btf_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    on_state(&BtfSock(sk), ctx.arg::<i32>(1), ctx.arg::<i32>(2));
    0
}

/// Plain raw tracepoint (4.17+), where tp_btf is refused: the same arguments, untyped.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn raw_tp_inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    on_state(
        &ProbeSock(sk as *const u8),
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
    );
    0
}

/// The perf tracepoint `sock:inet_sock_set_state`: the record carries family, ports and
/// addresses (shared/kernel-formats/sock_inet_sock_set_state.format, identical 5.10..7.2:
/// skaddr@8 oldstate@16 newstate@20 sport@24 dport@26 family@28 protocol@30 saddr@32
/// daddr@36 saddr_v6@40 daddr_v6@56); the rest is read through BTF offsets when known.
#[tracepoint]
pub fn tp_inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets and types of this tracepoint's record (see above).
    let (old, new) = unsafe { (read_tp::<i32>(&ctx, 16), read_tp::<i32>(&ctx, 20)) };
    on_state(&crate::perf::PerfSock::new(ctx), old, new);
    0
}

/// Read a field of a tracepoint record: one load, since the verifier lets tracepoint programs
/// load straight from their context (aligned, inside the record: `tp_prog_is_valid_access`).
///
/// # Safety
/// `off` must be the offset of a field of type `T` in this tracepoint's record, aligned to
/// the size of `T`.
#[inline(always)]
pub unsafe fn read_tp<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    use aya_ebpf::EbpfContext as _;
    // SAFETY: the caller guarantees the offset; the record outlives the program run.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(off) as *const T) }
}
