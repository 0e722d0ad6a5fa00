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
//! - SYN_SENT -> ESTABLISHED: the handshake completed (softirq or the task): a new connection,
//!   counted per destination, with its connect latency if it was timed.
//! - ESTABLISHED -> FIN_WAIT1: the active close, in the closing task (close(), shutdown(), the
//!   process's exit). That process will leave a TIME_WAIT socket, which nothing in the kernel
//!   names: it is remembered by 4-tuple (`OWNERS`), for sockets in the ephemeral range.
//! - X -> CLOSE from FIN_WAIT1/FIN_WAIT2/CLOSING: the active closer's socket is replaced by a
//!   TIME_WAIT mini-socket with the same 4-tuple; its TIME_WAIT starts now. From other states
//!   the port is free again and there is nothing to do.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_jiffies64},
    },
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{
        BtfTracePointContext, RawTracePointContext, TracePointContext, tracing::StackIdContext,
    },
};
use portexhaust_common::{
    AF_INET, COMM_LEN, Cause, DestKey, DestStats, EADDRNOTAVAIL, EVENT_BOUND, EVENT_SADDR_KNOWN,
    INFLIGHT_SYN_SENT, IPPROTO_TCP, LATENCY_BUCKETS, OWNER_TIME_WAIT, Owner, ProcInfo, ProcKey,
    Site, TcpState, TupleKey, stat,
};

use crate::{
    addr::{self, bytes},
    emit::{Failure, atomic_add, bump, now_ns, report},
    globals,
    maps::{
        CONN_MEMO, DEST_STATS, LAST_PROC, OWNERS, PENDING, PENDING_SLOT, PROCS, SAMPLED,
        SYSCALL_INFLIGHT, ZERO_STATS,
    },
    sites::{self, Add},
    sock::{BtfSock, Conn, ProbeSock, Sock},
    task::{current_netns, current_start_ns},
};

const CLOSE: i32 = TcpState::Close as i32;
const SYN_SENT: i32 = TcpState::SynSent as i32;
const ESTABLISHED: i32 = TcpState::Established as i32;
const FIN_WAIT1: i32 = TcpState::FinWait1 as i32;

/// Dispatch one transition. Most transitions on a busy host (both ends of every connection,
/// ~10 per connection) are none of these and return before any memory access.
#[inline(always)]
///
/// `fast` reads the socket for the failure path and the connect start (storms live there);
/// `rest` for the once-per-connection bookkeeping. For tp_btf they differ: direct BTF loads
/// are the cheapest to run, but the verifier walks `struct sock`'s BTF for every one on every
/// path it explores, and on the bookkeeping paths that tripled the program's load time
/// (45 ms against 13 ms); there a helper call per field is the better trade.
///
/// `ctx` is the program's context, for the call sites' user stack walks.
pub fn on_state<C: StackIdContext>(
    ctx: &C,
    fast: &impl Sock,
    rest: &impl Sock,
    old: i32,
    new: i32,
) {
    if old == CLOSE && new == SYN_SENT {
        connect_start(ctx, fast);
    } else if old == SYN_SENT {
        if new == CLOSE {
            connect_closed(ctx, fast);
        } else if new == ESTABLISHED {
            connect_established(rest);
        }
    } else if !globals::blame() {
    } else if old == ESTABLISHED && new == FIN_WAIT1 {
        active_close(rest);
    } else if new == CLOSE && TcpState::from_u8(old as u8).is_some_and(TcpState::ends_in_time_wait)
    {
        time_wait_begins(rest);
    }
}

/// CLOSE -> SYN_SENT, in the connecting task: count the connect to its call site, and note
/// when port selection starts, for the connect latency of the destination.
// Out of line: each transition gets its own 512-byte BPF stack frame.
#[inline(never)]
fn connect_start<C: StackIdContext>(ctx: &C, s: &impl Sock) {
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
    // Latency is sampled: at most one connect per CPU and jiffy is timed (every connect of a
    // quiet host; a few hundred a second per CPU in a storm), so the others read no clock.
    let Some((family, dport, daddr)) = s.dest() else {
        return;
    };
    let mut site = 0;
    if globals::call_sites() {
        // `inet_num` is still 0 here unless the socket was bound before connect(): such a
        // socket holds its port against the whole range, whatever the destination.
        let bound = u64::from(s.num().is_some_and(|n| n != 0));
        let add = Add {
            connects: 1,
            bound,
            failures: 0,
        };
        site = sites::note(ctx, family, dport, daddr, add);
    }
    // A walked connect is always pended: its call site must reach the connection (holders).
    if site == 0 && !sample_now(daddr[0] ^ daddr[1] ^ u64::from(dport)) {
        return;
    }
    let at = now_ns();
    // A loopback connect has its outcome before connect() returns, in this task: it waits in
    // this CPU's slot, which costs no map update (one left there by a task that moved to
    // another CPU inside connect(), rare, is overwritten: one sample lost). Every other
    // connect's outcome comes later, maybe on another CPU, so it waits in the shared map.
    if addr::is_loopback(family, daddr) {
        if let Some(slot) = PENDING_SLOT.get_ptr_mut(0) {
            // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
            unsafe { *slot = [s.addr(), at, site] };
        }
        return;
    }
    pend(s.addr(), [at, site]);
}

/// The socket's namespace, or the task's where the socket's cannot be read (no BTF offsets):
/// the same one but for sockets handed across setns().
#[inline(always)]
fn netns_of(s: &impl Sock) -> u32 {
    let n = s.netns();
    if n == 0 { current_netns() } else { n }
}

/// Whether this CPU's connect now is timed: the first of each jiffy, and the first after a
/// change of destination (`dest`: a signature of it), so that a quiet destination next to a
/// busy one still gets its samples.
#[inline(always)]
fn sample_now(dest: u64) -> bool {
    // SAFETY: helper without arguments (5.5+): a plain read of jiffies, no clock source.
    let j = unsafe { bpf_jiffies64() };
    let Some(last) = SAMPLED.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's slot.
    unsafe {
        if (*last)[0] == j && (*last)[1] == dest {
            return false;
        }
        *last = [j, dest];
    }
    true
}

#[inline(always)]
fn pend(sk: u64, at: [u64; 2]) {
    // BPF_NOEXIST first, to count only new keys (the eviction count is derived from this).
    if PENDING.insert(sk, at, 1).is_ok() {
        bump(stat::PENDING_INSERTS);
    } else {
        let _ = PENDING.insert(sk, at, 0);
    }
}

/// The start time of the current process, making sure `PROCS` names it (command and cgroup,
/// once per process, so that exited owners are still named). Remembered per CPU for the last
/// task seen: a process that closes in a loop pays for it once, not per close.
#[inline(always)]
fn known_process(pid: u32) -> u64 {
    // SAFETY: helper without arguments; the address only identifies the task.
    let task = unsafe { bpf_get_current_task() };
    let last = LAST_PROC.get_ptr_mut(0);
    if let Some(l) = last {
        // SAFETY: this CPU's slot.
        unsafe {
            if (*l)[0] == task && (*l)[1] == u64::from(pid) {
                return (*l)[2];
            }
        }
    }
    let start_ns = current_start_ns();
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
    if let Some(l) = last {
        // SAFETY: this CPU's slot.
        unsafe { *l = [task, u64::from(pid), start_ns] };
    }
    start_ns
}

/// Take the socket's pending connect: its start (0 if it was not timed) and its packed call
/// site (0: not walked). A loopback connect's is in this CPU's slot, any other's in the map.
#[inline(always)]
fn take_pending(s: &impl Sock, loopback: bool) -> [u64; 2] {
    if !globals::blame() {
        return [0, 0];
    }
    if loopback {
        let Some(slot) = PENDING_SLOT.get_ptr_mut(0) else {
            return [0, 0];
        };
        // SAFETY: this CPU's slot.
        unsafe {
            if (*slot)[0] == s.addr() {
                (*slot)[0] = 0;
                return [(*slot)[1], (*slot)[2]];
            }
        }
        return [0, 0];
    }
    let Some(p) = PENDING.get_ptr(s.addr()) else {
        return [0, 0];
    };
    // SAFETY: the pointer is into the map value, copied out at once.
    let v = unsafe { *p };
    if PENDING.remove(s.addr()).is_ok() {
        bump(stat::PENDING_DELETES);
    }
    v
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
fn connect_closed<C: StackIdContext>(ctx: &C, s: &impl Sock) {
    if !s.is_tcp() {
        return;
    }
    let Some(c) = s.conn() else {
        return;
    };
    // The failure path needs no start time (its latency is not a connect's): only clear it.
    take_pending(s, addr::is_loopback(c.family, c.daddr));
    let Some(cause) = port_selection_failure(s, &c) else {
        return;
    };
    // Without BTF offsets (tracepoint backend on a kernel without BTF) the socket's namespace is
    // unknown; the failing task's is the same one but for sockets handed across setns().
    let netns = netns_of(s);
    if globals::call_sites() && globals::blame() {
        // Every backend: the failure's call site is the connect's, whichever hook reports it.
        let add = Add {
            connects: 0,
            bound: 0,
            failures: 1,
        };
        sites::note(ctx, c.family, c.dport, c.daddr, add);
    }
    if !globals::state_reports() {
        return; // the fentry/kprobe backends report from their own hooks
    }
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

/// SYN_SENT -> ESTABLISHED: count the new connection and, if it was timed, its latency.
// Out of line: each transition gets its own 512-byte BPF stack frame.
#[inline(never)]
fn connect_established(s: &impl Sock) {
    if !globals::blame() {
        return;
    }
    let Some((family, dport, daddr)) = s.dest() else {
        return;
    };
    let [at, site] = take_pending(s, addr::is_loopback(family, daddr));
    if site != 0
        && let Some(c) = s.conn()
    {
        sites::opened(&tuple_of(s.netns(), &c), site);
    }
    let key = DestKey {
        netns: s.netns(),
        family,
        dport,
        daddr: bytes(daddr),
    };
    let Some(m) = CONN_MEMO.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; compared field by field (words for the address: byte-array
    // comparisons become calls or byte spills in BPF code).
    unsafe {
        let same = (*m).key.netns == key.netns
            && (*m).key.family == key.family
            && (*m).key.dport == key.dport
            && addr::words(&(*m).key.daddr) == daddr;
        if same && at == 0 {
            (*m).pending += 1;
            return;
        }
        if !same {
            if (*m).pending > 0 {
                dest_add(&(*m).key, (*m).pending, 0);
            }
            (*m).key = key;
            (*m).pending = 0;
        }
        if at == 0 {
            (*m).pending += 1;
        } else {
            dest_add(&key, 1, at);
        }
    }
}

/// The connection and whether its local port is in its namespace's ephemeral range: only
/// those sockets use up the range (the server side of a connection keeps its listening port).
#[inline(always)]
fn ephemeral(s: &impl Sock) -> Option<Conn> {
    if !s.is_tcp() {
        return None;
    }
    // `inet_num` is the local port: one load decides before the whole tuple is read.
    let num = s.num()?;
    if let Some((lo, hi)) = s.port_range()
        && (num < lo || num > hi)
    {
        return None;
    }
    s.conn()
}

/// ESTABLISHED -> FIN_WAIT1: the active close, in the closing task's context (close(),
/// shutdown() or the process's exit): this process will leave the TIME_WAIT socket behind.
// Out of line: each transition gets its own 512-byte BPF stack frame.
#[inline(never)]
fn active_close(s: &impl Sock) {
    let Some(c) = ephemeral(s) else {
        return;
    };
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let owner = Owner {
        pid,
        flags: 0,
        start_ns: known_process(pid),
        at_ns: now_ns(),
    };
    let key = tuple_of(s.netns(), &c);
    // BPF_NOEXIST first, to count only new keys (the eviction count is derived from this).
    if OWNERS.insert(key, owner, 1).is_ok() {
        bump(stat::OWNER_INSERTS);
    } else {
        // The tuple is still remembered from a TIME_WAIT this connection reused.
        let _ = OWNERS.insert(key, owner, 0);
    }
}

/// FIN_WAIT1/FIN_WAIT2/CLOSING -> CLOSE: `tcp_time_wait()` replaced the socket with a
/// TIME_WAIT mini-socket of the same 4-tuple (softirq or timer: `current` is not the owner).
// Out of line: each transition gets its own 512-byte BPF stack frame.
#[inline(never)]
fn time_wait_begins(s: &impl Sock) {
    let Some(c) = ephemeral(s) else {
        return;
    };
    if let Some(p) = OWNERS.get_ptr_mut(tuple_of(s.netns(), &c)) {
        // SAFETY: pointer into the map value.
        unsafe {
            (*p).at_ns = now_ns();
            (*p).flags |= OWNER_TIME_WAIT;
        }
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

/// Add `n` established connects to a destination, and the latency of one started at
/// `connect_ns` (0: none timed).
// Out of line: its key and scratch pointer get their own stack frame.
#[inline(never)]
fn dest_add(key: &DestKey, n: u64, connect_ns: u64) {
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
    // SAFETY: pointer into the map value; atomic adds because one destination's connects
    // complete on several CPUs at once.
    unsafe {
        atomic_add(&raw mut (*p).connects, n);
        if connect_ns != 0 {
            let bucket = latency_bucket(now_ns().saturating_sub(connect_ns));
            if let Some(h) = (*p).hist.get_mut(bucket) {
                atomic_add(h, 1);
            }
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
    on_state(
        &ctx,
        &BtfSock(sk),
        &ProbeSock(sk),
        ctx.arg::<i32>(1),
        ctx.arg::<i32>(2),
    );
    0
}

/// Plain raw tracepoint (4.17+), where tp_btf is refused: the same arguments, untyped.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn raw_tp_inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let s = ProbeSock(sk as *const u8);
    on_state(
        &ctx,
        &s,
        &s,
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
    use aya_ebpf::EbpfContext as _;
    let stack_ctx = TracePointContext::new(ctx.as_ptr());
    let s = crate::perf::PerfSock::new(ctx);
    on_state(&stack_ctx, &s, &s, old, new);
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
