//! eBPF programs of portexhaust.
//!
//! One object carries three program sets; the loader loads and attaches only the set of the
//! chosen backend (plus the syscall tracepoints every backend shares):
//!
//! | backend    | TCP connect() exhaustion                                   | bind(0), UDP, socket types |
//! |------------|------------------------------------------------------------|----------------------------|
//! | fentry     | fentry/fexit tcp_v{4,6}_connect, fexit inet{,6}_hash_connect | syscall tracepoints      |
//! | kprobe     | kprobe/kretprobe tcp_v{4,6}_connect, kretprobe __inet_hash_connect | syscall tracepoints |
//! | tracepoint | sys_{enter,exit}_connect + sock:inet_sock_set_state        | syscall tracepoints        |
//!
//! Rust eBPF cannot emit CO-RE relocations, so nothing here reads a kernel struct at a fixed
//! offset: only tracepoint records (stable layouts, see shared/kernel-formats), function
//! arguments that are scalars or user-ABI `struct sockaddr`, and return values.
#![no_std]
#![no_main]
// atomic_xadd: the BPF target has no compare-and-swap, so core's AtomicU64::fetch_add is not
// offered; the intrinsic lowers to BPF_XADD (lock add), which every kernel since 4.x accepts.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel, bpf_probe_read_user, generated::bpf_get_current_cgroup_id,
        generated::bpf_get_current_task, generated::bpf_ktime_get_ns,
    },
    macros::{fentry, fexit, kprobe, kretprobe, map, tracepoint},
    maps::{HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext, TracePointContext},
};
use portexhaust_common::{
    AF_INET, AF_INET6, Backend, COMM_LEN, CountKey, CountValue, DestKey, DestStats, EADDRINUSE,
    EADDRNOTAVAIL, EAGAIN, EVENT_SADDR_KNOWN, FILTER_COMM, FILTER_DPORT, FILTER_PID, FailureEvent,
    INFLIGHT_HASH_FAILED, INFLIGHT_SADDR, INFLIGHT_SYN_SENT, INFLIGHT_V4_NESTED, IPPROTO_TCP,
    IPPROTO_UDP, Inflight, KIND_BIND, KIND_CONNECT, LATENCY_BUCKETS, OWNER_ACTIVE_CLOSE,
    OWNER_PASSIVE_CLOSE, OWNER_TIME_WAIT, Owner, SOCK_DGRAM, SOCK_STREAM, Site, TupleKey, stat,
};

// ---------------------------------------------------------------------------------------------
// Globals, set by the loader before the object is loaded (EbpfLoader::override_global).

/// Which backend this object was loaded for (a `Backend` code). The syscall exit program only
/// reports TCP EADDRNOTAVAIL itself under the tracepoint backend; the others report it from
/// the function hooks, and reporting it twice would double every count.
#[unsafe(no_mangle)]
static BACKEND: u32 = Backend::Tracepoint as u32;

/// Active filters (`FILTER_*` bits).
#[unsafe(no_mangle)]
static FILTER_FLAGS: u32 = 0;

/// 0: skip socket-ownership tracking and the latency histograms (`trace --no-blame`): every
/// connect() then costs only the failure path's checks.
#[unsafe(no_mangle)]
static TRACK_BLAME: u32 = 1;

/// Offsets into task_struct, nsproxy and net, resolved by the loader from the running kernel's
/// BTF (see portexhaust/src/btf.rs): `current->nsproxy->net_ns->ns.inum` and
/// `current->group_leader->start_boottime`. With HAVE_TASK_OFFSETS == 0 nothing is read.
#[unsafe(no_mangle)]
static HAVE_TASK_OFFSETS: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_NSPROXY: u32 = 0;
#[unsafe(no_mangle)]
static OFF_NSPROXY_NET: u32 = 0;
#[unsafe(no_mangle)]
static OFF_NET_INUM: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_GROUP_LEADER: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_START_TIME: u32 = 0;

// ---------------------------------------------------------------------------------------------
// Maps.

/// Failure events for user space. 4 MiB holds ~45k events: a storm fills it only when user space
/// stalls, and then `STATS[RINGBUF_DROPS]` says so while `COUNTS` stays exact.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Exact failure counts per (pid, destination, errno).
#[map]
static COUNTS: HashMap<CountKey, CountValue> = HashMap::with_max_entries(16384, 0);

/// Global counters (see `portexhaust_common::stat`); per CPU so the hot path takes no lock.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::LEN, 0);

/// Per CPU: when this CPU last asked for a ring-buffer wakeup (`bpf_ktime_get_ns`).
#[map]
static LAST_WAKEUP: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);
#[map]
static FILTER_COMMS: HashMap<[u8; COMM_LEN], u8> = HashMap::with_max_entries(1024, 0);
#[map]
static FILTER_DPORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// connect()/bind() syscalls between entry and exit, by thread id. LRU: a thread killed inside
/// the syscall never reaches the exit program, and its entry must not stay forever.
#[map]
static SYSCALL_INFLIGHT: LruHashMap<u64, Inflight> = LruHashMap::with_max_entries(16384, 0);

/// tcp_v{4,6}_connect calls between entry and return, by thread id (kprobe/fentry backends).
/// Kept apart from the syscall map: io_uring connects reach these functions without a syscall.
#[map]
static KFUNC_INFLIGHT: LruHashMap<u64, Inflight> = LruHashMap::with_max_entries(16384, 0);

/// socket() type argument between sys_enter_socket and sys_exit_socket, by thread id.
#[map]
static SOCKET_ARGS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(4096, 0);

/// Socket type per (tgid << 32 | fd) for sockets created while tracing: tells TCP from UDP for
/// bind() and for connect() errors the syscall tracepoints cannot attribute otherwise.
#[map]
static SOCK_TYPES: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65536, 0);

/// Owners of outgoing TCP sockets by kernel address, from CLOSE -> SYN_SENT until CLOSE.
#[map]
static OWNER_BY_SK: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(131072, 0);

/// Owners by (netns, 4-tuple), from ESTABLISHED through TIME_WAIT: TIME_WAIT sockets have no
/// owner in the kernel, this map remembers who created them. User space removes entries whose
/// TIME_WAIT is over.
#[map]
static OWNER_BY_TUPLE: LruHashMap<TupleKey, Owner> = LruHashMap::with_max_entries(131072, 0);

/// connect() count and latency histogram per destination.
#[map]
static DEST_STATS: LruPerCpuHashMap<DestKey, DestStats> =
    LruPerCpuHashMap::with_max_entries(8192, 0);

/// One all-zero DestStats to insert from: 272 bytes would crowd the 512-byte BPF stack.
#[map]
static ZERO_STATS: PerCpuArray<DestStats> = PerCpuArray::with_max_entries(1, 0);

// ---------------------------------------------------------------------------------------------
// Shared helpers.

/// Follow a pointer field of a kernel struct; null when unreadable.
#[inline(always)]
fn read_ptr(base: *const u8, off: u32) -> *const u8 {
    // SAFETY: bpf_probe_read_kernel fails cleanly on a bad address.
    unsafe { bpf_probe_read_kernel(base.add(off as usize) as *const u64) }.unwrap_or(0) as *const u8
}

/// `current->nsproxy->net_ns->ns.inum` through offsets resolved from BTF at load time (three
/// kernel reads); 0 when they are unknown or unreadable.
#[inline(always)]
fn current_netns() -> u32 {
    if global(&HAVE_TASK_OFFSETS) == 0 {
        return 0;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let nsproxy = read_ptr(task, global(&OFF_TASK_NSPROXY));
    if nsproxy.is_null() {
        return 0;
    }
    let net = read_ptr(nsproxy, global(&OFF_NSPROXY_NET));
    if net.is_null() {
        return 0;
    }
    // SAFETY: as read_ptr.
    unsafe { bpf_probe_read_kernel(net.add(global(&OFF_NET_INUM) as usize) as *const u32) }
        .unwrap_or(0)
}

/// `current->group_leader->start_boottime` (two kernel reads); 0 when unknown. Only the
/// ownership record needs it, so it is kept apart from the namespace read on the hot paths.
#[inline(always)]
fn current_start_ns() -> u64 {
    if global(&HAVE_TASK_OFFSETS) == 0 {
        return 0;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let leader = read_ptr(task, global(&OFF_TASK_GROUP_LEADER));
    if leader.is_null() {
        return 0;
    }
    // SAFETY: as read_ptr.
    unsafe {
        bpf_probe_read_kernel(leader.add(global(&OFF_TASK_START_TIME) as usize) as *const u64)
    }
    .unwrap_or(0)
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
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

/// Count a TCP connect that reached port selection, with its latency, per destination.
#[inline(always)]
fn record_connect(info: &Inflight, failed: bool, netns: u32) {
    if global(&TRACK_BLAME) == 0 {
        return;
    }
    let key = DestKey {
        netns,
        family: info.family,
        dport: info.dport,
        daddr: info.daddr,
    };
    let mut p = DEST_STATS.get_ptr_mut(key);
    if p.is_none() {
        let Some(zero) = ZERO_STATS.get_ptr(0) else {
            return;
        };
        // SAFETY: pointer to our own all-zero scratch value. Passed by reference on purpose:
        // by value it would be copied onto the stack, which is what the scratch map avoids.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = DEST_STATS.insert(key, unsafe { &*zero }, 0);
        p = DEST_STATS.get_ptr_mut(key);
    }
    let Some(p) = p else {
        return;
    };
    let bucket = latency_bucket(now_ns().saturating_sub(info.start_ns));
    // SAFETY: this CPU's slot of a per-CPU map value; nothing else writes it meanwhile.
    unsafe {
        (*p).connects += 1;
        if failed {
            (*p).failures += 1;
        }
        if let Some(h) = (*p).hist.get_mut(bucket) {
            *h += 1;
        }
    }
}

#[inline(always)]
fn global(v: &'static u32) -> u32 {
    // SAFETY: reading a global the loader may have rewritten in .rodata; volatile stops the
    // compiler from folding the default value.
    unsafe { core::ptr::read_volatile(v) }
}

/// Add one to a shared u64 in a map value.
///
/// # Safety
/// `p` must point into a live map value.
#[inline(always)]
unsafe fn atomic_add(p: *mut u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, 1) };
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

// bpf_ringbuf_submit() flags (include/uapi/linux/bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// At most one ring-buffer wakeup per CPU per this many nanoseconds.
const WAKEUP_INTERVAL_NS: u64 = 10_000_000;

/// Wakeup policy for one submitted event.
///
/// With flags 0 the kernel wakes the reader whenever it has caught up, which for a reader that
/// keeps up means once per event: `bpf_ringbuf_submit()` -> `irq_work_queue()` -> a self-IPI
/// (an APIC MSR write, a VM exit under virtualisation) plus a cross-CPU wakeup, per failure. In
/// a storm that cost more than the failing connect() itself (measured by `cargo xtask bench`:
/// a third of the storm process's samples in `native_write_msr` on 6.18, rate 36% of untraced).
/// So the first event after a quiet spell still wakes the reader at once, and after that each
/// CPU asks for at most one wakeup per 10 ms; the reader drains everything each time, and also
/// on a timer, so an event submitted without a wakeup waits at most that long. 10 ms of the
/// fastest storm is far less than the buffer holds, so the policy itself never drops events.
#[inline(always)]
fn wakeup_flags(now: u64) -> u64 {
    let Some(last) = LAST_WAKEUP.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    unsafe {
        if now.wrapping_sub(*last) >= WAKEUP_INTERVAL_NS {
            *last = now;
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        }
    }
}

/// What an emitter knows about a failure.
struct Failure<'a> {
    /// Network namespace of the current task (0 when unknown), read once by the caller.
    netns: u32,
    errno: u32,
    site: Site,
    proto: u8,
    info: &'a Inflight,
}

#[inline(always)]
fn passes_filters(pid: u32, comm: &[u8; COMM_LEN], dport: u16) -> bool {
    let flags = global(&FILTER_FLAGS);
    if flags == 0 {
        return true;
    }
    if flags & FILTER_PID != 0 && FILTER_PIDS.get_ptr(pid).is_none() {
        return false;
    }
    if flags & FILTER_COMM != 0 && FILTER_COMMS.get_ptr(comm).is_none() {
        return false;
    }
    if flags & FILTER_DPORT != 0 && FILTER_DPORTS.get_ptr(dport).is_none() {
        return false;
    }
    true
}

/// Count a failure exactly and send its event. Failures are rare compared with connect() calls,
/// so everything costly (comm, cgroup, map updates) happens here and not on the entry path.
#[inline(always)]
fn report(f: Failure<'_>) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
    let info = f.info;
    if !passes_filters(pid, &comm, info.dport) {
        return;
    }
    let now = now_ns();
    bump(stat::FAILURES);

    let key = CountKey {
        pid,
        dport: info.dport,
        family: info.family,
        errno: f.errno as u16,
        proto: f.proto,
        _pad: [0; 5],
        daddr: info.daddr,
    };
    match COUNTS.get_ptr_mut(key) {
        Some(v) => {
            // SAFETY: `v` points into the map value; the count is updated atomically because
            // several CPUs may fail towards the same key at once.
            unsafe {
                atomic_add(&raw mut (*v).count);
                (*v).last_ns = now;
            }
        }
        None => {
            let fresh = CountValue {
                count: 1,
                first_ns: now,
                last_ns: now,
                comm,
            };
            // BPF_NOEXIST: if another CPU inserted the key meanwhile, add to its value instead.
            if COUNTS.insert(key, fresh, 1).is_err() {
                match COUNTS.get_ptr_mut(key) {
                    Some(v) => unsafe {
                        atomic_add(&raw mut (*v).count);
                    },
                    None => bump(stat::COUNT_MAP_FULL),
                }
            }
        }
    }

    let Some(mut entry) = EVENTS.reserve::<FailureEvent>(0) else {
        bump(stat::RINGBUF_DROPS);
        return;
    };
    let uid = bpf_get_current_uid_gid() as u32;
    // SAFETY: helper without arguments, available to tracing programs since 4.18.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let netns = f.netns;
    entry.write(FailureEvent {
        ts_ns: now,
        cgroup_id,
        pid,
        tid: pid_tgid as u32,
        uid,
        errno: f.errno,
        daddr: info.daddr,
        saddr: info.saddr,
        dport: info.dport,
        family: info.family,
        proto: f.proto,
        site: f.site as u8,
        backend: global(&BACKEND) as u8,
        flags: if info.flags & INFLIGHT_SADDR != 0 {
            EVENT_SADDR_KNOWN
        } else {
            0
        },
        comm,
        netns,
        _pad: 0,
    });
    entry.submit(wakeup_flags(now));
}

/// Read a field of a tracepoint record.
///
/// The verifier lets tracepoint programs load straight from their context (aligned, inside
/// the record: `tp_prog_is_valid_access`), so this is one load, where aya's
/// `TracePointContext::read_at` makes a `bpf_probe_read_kernel()` call per field. Every
/// syscall on the machine runs these programs, so the difference adds up.
///
/// # Safety
/// `off` must be the offset of a field of type `T` in this tracepoint's record (see
/// shared/kernel-formats), aligned to the size of `T`'s loads.
#[inline(always)]
unsafe fn read_tp<T: Copy>(ctx: &TracePointContext, off: usize) -> Result<T, i32> {
    // SAFETY: the caller guarantees the offset; the record outlives the program run.
    // Volatile: one load per field at a constant offset from the ctx register, never a
    // pointer derived from it.
    Ok(unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(off) as *const T) })
}

/// Fill destination fields from the leading bytes of a `struct sockaddr_in{,6}`.
/// Returns false for families other than AF_INET/AF_INET6.
#[inline(always)]
fn parse_sockaddr(raw: &[u8; 28], out: &mut Inflight) -> bool {
    let family = u16::from_ne_bytes([raw[0], raw[1]]);
    // sin_port / sin6_port: network byte order at offset 2 in both layouts.
    out.dport = u16::from_be_bytes([raw[2], raw[3]]);
    out.family = family;
    if family == AF_INET {
        // sockaddr_in: sin_addr at offset 4.
        out.daddr[..4].copy_from_slice(&raw[4..8]);
        true
    } else if family == AF_INET6 {
        // sockaddr_in6: sin6_flowinfo at 4, sin6_addr at 8.
        out.daddr.copy_from_slice(&raw[8..24]);
        true
    } else {
        false
    }
}

/// Read a socket address from user memory (syscall arguments).
#[inline(always)]
fn read_user_sockaddr(uaddr: u64, addrlen: u64, out: &mut Inflight) -> bool {
    let mut raw = [0u8; 28];
    let ptr = uaddr as *const u8;
    // A sockaddr_in is 16 bytes and may sit at the end of a mapping: read only what was given.
    let ok = if addrlen >= 28 {
        unsafe { bpf_probe_read_user(ptr as *const [u8; 28]) }.map(|v| raw = v)
    } else if addrlen >= 16 {
        unsafe { bpf_probe_read_user(ptr as *const [u8; 16]) }
            .map(|v| raw[..16].copy_from_slice(&v))
    } else {
        Err(-1)
    };
    ok.is_ok() && parse_sockaddr(&raw, out)
}

/// Read a socket address from kernel memory (the `uaddr` argument of tcp_v{4,6}_connect, which
/// is the kernel copy `move_addr_to_kernel()` made of the user's address).
#[inline(always)]
fn read_kernel_sockaddr(uaddr: u64, out: &mut Inflight) -> bool {
    match unsafe { bpf_probe_read_kernel(uaddr as *const [u8; 28]) } {
        Ok(raw) => parse_sockaddr(&raw, out),
        Err(_) => false,
    }
}

#[inline(always)]
fn empty_inflight(kind: u8, handle: u64) -> Inflight {
    Inflight {
        handle,
        daddr: [0; 16],
        saddr: [0; 16],
        dport: 0,
        family: 0,
        kind,
        flags: 0,
        depth: 0,
        opener: 0,
        start_ns: now_ns(),
    }
}

#[inline(always)]
fn sock_type_of(fd: u64) -> u8 {
    let tgid = bpf_get_current_pid_tgid() >> 32;
    let key = (tgid << 32) | (fd & 0xffff_ffff);
    match SOCK_TYPES.get_ptr(key) {
        Some(p) => unsafe { *p },
        None => 0,
    }
}

/// Is this destination an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)? Those go through
/// tcp_v4_connect() from tcp_v6_connect().
#[inline(always)]
fn is_v4_mapped(info: &Inflight) -> bool {
    info.family == AF_INET6
        && info.daddr[..10] == [0u8; 10]
        && info.daddr[10] == 0xff
        && info.daddr[11] == 0xff
}

// ---------------------------------------------------------------------------------------------
// Syscall tracepoints (every backend). Layouts: shared/kernel-formats/syscalls_*.format,
// identical from 5.10 to 7.2: args are 8-byte slots from offset 16, the return value at 16.

#[tracepoint]
pub fn tp_sys_enter_socket(ctx: TracePointContext) -> u32 {
    // sys_enter_socket: family@16, type@24, protocol@32.
    let Ok(family) = (unsafe { read_tp::<u64>(&ctx, 16) }) else {
        return 0;
    };
    if family != AF_INET as u64 && family != AF_INET6 as u64 {
        return 0;
    }
    let Ok(ty) = (unsafe { read_tp::<u64>(&ctx, 24) }) else {
        return 0;
    };
    // Only datagram sockets are remembered. Everything that reads SOCK_TYPES treats a socket it
    // does not know as TCP, except connect() EAGAIN, which on inet sockets only inet_autobind()
    // returns (TCP connect() never does), so nothing is classified differently. Skipping stream
    // sockets spares every TCP socket() on the machine two LRU map updates (BPF time per
    // socket() on 6.18, BPF_ENABLE_STATS during `pxh-loadgen storm`: see BENCHMARKS.md).
    if ty & 0xf != 2 {
        return 0;
    }
    let _ = SOCKET_ARGS.insert(bpf_get_current_pid_tgid(), ty as u32, 0);
    0
}

#[tracepoint]
pub fn tp_sys_exit_socket(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid();
    let ty = SOCKET_ARGS.get_ptr(tid).map(|p| unsafe { *p });
    if ty.is_some() {
        let _ = SOCKET_ARGS.remove(tid);
    }
    let Ok(ret) = (unsafe { read_tp::<i64>(&ctx, 16) }) else {
        return 0;
    };
    if ret < 0 {
        return 0;
    }
    let key = ((tid >> 32) << 32) | (ret as u64 & 0xffff_ffff);
    // The low 4 bits are the type; SOCK_NONBLOCK/SOCK_CLOEXEC live above them. Only datagram
    // sockets are remembered (see tp_sys_enter_socket); any other new fd forgets what an
    // earlier, closed socket with the same number was.
    match ty.map(|t| t & 0xf) {
        Some(2) => {
            let _ = SOCK_TYPES.insert(key, SOCK_DGRAM, 0);
        }
        _ => {
            let _ = SOCK_TYPES.remove(key);
        }
    }
    0
}

#[tracepoint]
pub fn tp_sys_enter_connect(ctx: TracePointContext) -> u32 {
    // sys_enter_connect: fd@16, uservaddr@24, addrlen@32.
    let args = unsafe {
        (
            read_tp::<u64>(&ctx, 16),
            read_tp::<u64>(&ctx, 24),
            read_tp::<u64>(&ctx, 32),
        )
    };
    let (Ok(fd), Ok(uaddr), Ok(len)) = args else {
        return 0;
    };
    let mut info = empty_inflight(KIND_CONNECT, fd);
    if read_user_sockaddr(uaddr, len, &mut info) {
        let _ = SYSCALL_INFLIGHT.insert(bpf_get_current_pid_tgid(), info, 0);
    }
    0
}

#[tracepoint]
pub fn tp_sys_exit_connect(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid();
    let Some(info) = SYSCALL_INFLIGHT.get_ptr(tid).map(|p| unsafe { *p }) else {
        return 0;
    };
    let _ = SYSCALL_INFLIGHT.remove(tid);
    let Ok(ret) = (unsafe { read_tp::<i64>(&ctx, 16) }) else {
        return 0;
    };
    if ret == -(EAGAIN as i64) {
        // connect() on an inet socket returns EAGAIN only from inet_autobind() (datagram
        // sockets: inet_dgram_connect). A stream socket known to us is something else.
        if sock_type_of(info.handle) != SOCK_STREAM {
            report(Failure {
                netns: current_netns(),
                errno: EAGAIN,
                site: Site::UdpAutobind,
                proto: IPPROTO_UDP,
                info: &info,
            });
        }
        return 0;
    }
    if global(&BACKEND) != Backend::Tracepoint as u32 {
        return 0;
    }
    // Under this backend the connect() syscall is what can be timed; a CLOSE -> SYN_SENT seen
    // inside it marks a TCP connect that reached port selection.
    let failed = ret == -(EADDRNOTAVAIL as i64);
    let timed = info.flags & INFLIGHT_SYN_SENT != 0 && global(&TRACK_BLAME) != 0;
    if !timed && !failed {
        return 0;
    }
    // Read once: four kernel reads that both the histogram and the event need.
    let netns = current_netns();
    if timed {
        record_connect(&info, failed, netns);
    }
    if !failed {
        return 0;
    }
    // tcp_v4_connect() enters SYN_SENT before inet_hash_connect(); if that state was reached
    // in this very call, the EADDRNOTAVAIL came from port selection (kernel 5.10..7.2).
    let site = if info.flags & INFLIGHT_SYN_SENT != 0 {
        Site::InetHashConnect
    } else if sock_type_of(info.handle) == SOCK_DGRAM {
        // UDP connect() EADDRNOTAVAIL (e.g. no IPv6 source address) is not exhaustion.
        return 0;
    } else if info.family == AF_INET || is_v4_mapped(&info) {
        Site::TcpV4Connect
    } else {
        Site::TcpV6Connect
    };
    report(Failure {
        netns,
        errno: EADDRNOTAVAIL,
        site,
        proto: IPPROTO_TCP,
        info: &info,
    });
    0
}

#[tracepoint]
pub fn tp_sys_enter_bind(ctx: TracePointContext) -> u32 {
    // sys_enter_bind: fd@16, umyaddr@24, addrlen@32.
    let args = unsafe {
        (
            read_tp::<u64>(&ctx, 16),
            read_tp::<u64>(&ctx, 24),
            read_tp::<u64>(&ctx, 32),
        )
    };
    let (Ok(fd), Ok(uaddr), Ok(len)) = args else {
        return 0;
    };
    let mut info = empty_inflight(KIND_BIND, fd);
    // Only bind() to port 0 asks the kernel to pick a port; EADDRINUSE for an explicit port is
    // a conflict, not exhaustion.
    if read_user_sockaddr(uaddr, len, &mut info) && info.dport == 0 {
        let _ = SYSCALL_INFLIGHT.insert(bpf_get_current_pid_tgid(), info, 0);
    }
    0
}

#[tracepoint]
pub fn tp_sys_exit_bind(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid();
    let Some(info) = SYSCALL_INFLIGHT.get_ptr(tid).map(|p| unsafe { *p }) else {
        return 0;
    };
    let _ = SYSCALL_INFLIGHT.remove(tid);
    let Ok(ret) = (unsafe { read_tp::<i64>(&ctx, 16) }) else {
        return 0;
    };
    // EADDRNOTAVAIL from bind() means a non-local address: not exhaustion, never reported.
    if ret != -(EADDRINUSE as i64) || info.kind != KIND_BIND {
        return 0;
    }
    let proto = if sock_type_of(info.handle) == SOCK_DGRAM {
        IPPROTO_UDP
    } else {
        IPPROTO_TCP
    };
    report(Failure {
        netns: current_netns(),
        errno: EADDRINUSE,
        site: Site::Bind,
        proto,
        info: &info,
    });
    0
}

// ---------------------------------------------------------------------------------------------
// sock:inet_sock_set_state (every backend): marks that port selection was reached and learns
// the source address. Layout (shared/kernel-formats/sock_inet_sock_set_state.format, identical
// 5.10..7.2): oldstate@16 newstate@20 sport@24 dport@26 family@28 protocol@30 saddr@32
// daddr@36 saddr_v6@40 daddr_v6@56.

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_FIN_WAIT2: i32 = 5;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;
const TCP_CLOSING: i32 = 11;

/// Note that port selection is about to run for this thread's connect, and the source address.
#[inline(always)]
fn mark_syn_sent(ctx: &TracePointContext, p: *mut Inflight) {
    let family = unsafe { read_tp::<u16>(ctx, 28) }.unwrap_or(0);
    // Whole aligned words: the verifier refuses loads through a ctx pointer that was moved,
    // which is what LLVM makes of a byte-array copy.
    let saddr = if family == AF_INET {
        unsafe { read_tp::<u32>(ctx, 32) }.map(|a| {
            let mut s = [0u8; 16];
            s[..4].copy_from_slice(&a.to_ne_bytes());
            s
        })
    } else {
        unsafe { read_tp::<u64>(ctx, 40) }.and_then(|hi| {
            let lo = unsafe { read_tp::<u64>(ctx, 48) }?;
            let mut s = [0u8; 16];
            s[..8].copy_from_slice(&hi.to_ne_bytes());
            s[8..].copy_from_slice(&lo.to_ne_bytes());
            Ok(s)
        })
    };
    // SAFETY: pointer into this thread's own map value.
    unsafe {
        (*p).flags |= INFLIGHT_SYN_SENT;
        if let Ok(a) = saddr {
            (*p).saddr = a;
            (*p).flags |= INFLIGHT_SADDR;
        }
    }
}

/// The connection's 4-tuple from the tracepoint record, in the owner's namespace.
#[inline(always)]
fn tuple_of(ctx: &TracePointContext, netns: u32) -> Option<TupleKey> {
    let family = unsafe { read_tp::<u16>(ctx, 28) }.ok()?;
    let mut key = TupleKey {
        netns,
        family,
        sport: unsafe { read_tp::<u16>(ctx, 24) }.ok()?,
        dport: unsafe { read_tp::<u16>(ctx, 26) }.ok()?,
        _pad: [0; 2],
        saddr: [0; 16],
        daddr: [0; 16],
    };
    // Whole aligned words, as in mark_syn_sent: byte-array copies become moved ctx pointers.
    if family == AF_INET {
        let s = unsafe { read_tp::<u32>(ctx, 32) }.ok()?;
        let d = unsafe { read_tp::<u32>(ctx, 36) }.ok()?;
        key.saddr[..4].copy_from_slice(&s.to_ne_bytes());
        key.daddr[..4].copy_from_slice(&d.to_ne_bytes());
    } else {
        for (i, off) in [40usize, 48].into_iter().enumerate() {
            let w = unsafe { read_tp::<u64>(ctx, off) }.ok()?;
            key.saddr[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
            let w = unsafe { read_tp::<u64>(ctx, off + 16) }.ok()?;
            key.daddr[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
        }
    }
    Some(key)
}

/// CLOSE -> SYN_SENT runs in the connecting task: remember it as the socket's owner.
#[inline(always)]
fn own_socket(sk: u64) {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let netns = current_netns();
    let start_ns = current_start_ns();
    let owner = Owner {
        pid,
        netns,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        start_ns,
        connect_ns: now_ns(),
        closed_ns: 0,
        comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
        flags: 0,
        _pad: 0,
    };
    // BPF_NOEXIST first, to count only new keys (the eviction count is derived from this).
    if OWNER_BY_SK.insert(sk, owner, 1).is_ok() {
        bump(stat::SK_INSERTS);
    } else {
        let _ = OWNER_BY_SK.insert(sk, owner, 0);
    }
}

/// Follow an owned socket through its states (see shared/notes/kernel.md, "Attributing
/// TIME_WAIT"): keyed by skaddr until the source port is known, by 4-tuple from ESTABLISHED,
/// marked at the active close, and left in place through TIME_WAIT.
#[inline(always)]
fn follow_socket(ctx: &TracePointContext, sk: u64, oldstate: i32, newstate: i32) {
    // This tracepoint fires ~10 times per connection, on both ends; only these transitions
    // matter for ownership, and the others must not pay for a map lookup.
    let interesting = newstate == TCP_CLOSE
        || (oldstate == TCP_SYN_SENT && newstate == TCP_ESTABLISHED)
        || (oldstate == TCP_ESTABLISHED
            && (newstate == TCP_FIN_WAIT1 || newstate == TCP_CLOSE_WAIT));
    if !interesting {
        return;
    }
    let Some(owner) = OWNER_BY_SK.get_ptr(sk).map(|p| unsafe { *p }) else {
        return;
    };
    if newstate == TCP_CLOSE {
        if OWNER_BY_SK.remove(sk).is_ok() {
            bump(stat::SK_DELETES);
        }
        if oldstate == TCP_SYN_SENT {
            return; // the connect failed: no tuple was ever recorded
        }
        let Some(key) = tuple_of(ctx, owner.netns) else {
            return;
        };
        // tcp_time_wait() -> tcp_done() sets CLOSE on the full socket as the TIME_WAIT
        // mini-socket replaces it; that happens from FIN_WAIT1/FIN_WAIT2/CLOSING (active close).
        if oldstate == TCP_FIN_WAIT1 || oldstate == TCP_FIN_WAIT2 || oldstate == TCP_CLOSING {
            if let Some(p) = OWNER_BY_TUPLE.get_ptr_mut(key) {
                // SAFETY: pointer into the map value.
                unsafe {
                    (*p).closed_ns = now_ns();
                    (*p).flags |= OWNER_TIME_WAIT;
                }
            }
        } else if OWNER_BY_TUPLE.remove(key).is_ok() {
            // Passive close or reset: the port is free again, nothing to remember.
            bump(stat::TUPLE_DELETES);
        }
        return;
    }
    let Some(key) = tuple_of(ctx, owner.netns) else {
        return;
    };
    if oldstate == TCP_SYN_SENT && newstate == TCP_ESTABLISHED {
        if OWNER_BY_TUPLE.insert(key, owner, 1).is_ok() {
            bump(stat::TUPLE_INSERTS);
        } else {
            // The tuple is still remembered from a TIME_WAIT this connection reused.
            let _ = OWNER_BY_TUPLE.insert(key, owner, 0);
        }
        return;
    }
    let flag = if oldstate == TCP_ESTABLISHED && newstate == TCP_FIN_WAIT1 {
        OWNER_ACTIVE_CLOSE
    } else if oldstate == TCP_ESTABLISHED && newstate == TCP_CLOSE_WAIT {
        OWNER_PASSIVE_CLOSE
    } else {
        return;
    };
    if let Some(p) = OWNER_BY_TUPLE.get_ptr_mut(key) {
        unsafe { (*p).flags |= flag };
    }
}

#[tracepoint]
pub fn tp_inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let (Ok(oldstate), Ok(newstate), Ok(protocol), Ok(sk)) = (unsafe {
        (
            read_tp::<i32>(&ctx, 16),
            read_tp::<i32>(&ctx, 20),
            read_tp::<u16>(&ctx, 30),
            read_tp::<u64>(&ctx, 8),
        )
    }) else {
        return 0;
    };
    if protocol != IPPROTO_TCP as u16 {
        return 0;
    }
    // CLOSE -> SYN_SENT happens in the connecting task, inside tcp_v{4,6}_connect, after the
    // route (and so the source address) is known and before inet_hash_connect().
    let blame = global(&TRACK_BLAME) != 0;
    if oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT {
        if blame {
            own_socket(sk);
        }
        let tid = bpf_get_current_pid_tgid();
        // Only the backend's own in-flight map: the tracepoint backend decides the site from
        // the syscall entry, the function hooks from theirs. One lookup per connect, not two.
        let p = if global(&BACKEND) == Backend::Tracepoint as u32 {
            SYSCALL_INFLIGHT.get_ptr_mut(tid)
        } else {
            KFUNC_INFLIGHT.get_ptr_mut(tid)
        };
        if let Some(p) = p {
            mark_syn_sent(&ctx, p);
        }
        return 0;
    }
    if blame {
        follow_socket(&ctx, sk, oldstate, newstate);
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Function hooks shared by the kprobe and fentry backends.
//
// int tcp_v4_connect(struct sock *sk, struct sockaddr *uaddr, int addr_len)   (5.10..6.x)
// int tcp_v6_connect(struct sock *sk, struct sockaddr *uaddr, int addr_len)   (static)
// 7.x renames the uaddr type to struct sockaddr_unsized *; the layout it points to is the same.

#[inline(always)]
fn connect_entry(sk: u64, uaddr: u64, opener: Site) {
    let tid = bpf_get_current_pid_tgid();
    if let Some(p) = KFUNC_INFLIGHT.get_ptr_mut(tid) {
        // SAFETY: this thread's own entry.
        unsafe {
            // tcp_v6_connect() of a v4-mapped address calls tcp_v4_connect() with the same sk:
            // keep the outer (IPv6) destination and note the nesting. A different sk means a
            // stale entry (a missed return), which is replaced below.
            if (*p).handle == sk && (*p).depth > 0 {
                (*p).depth += 1;
                (*p).flags |= INFLIGHT_V4_NESTED;
                return;
            }
        }
    }
    let mut info = empty_inflight(KIND_CONNECT, sk);
    info.depth = 1;
    info.opener = opener as u8;
    if !read_kernel_sockaddr(uaddr, &mut info) {
        return;
    }
    let _ = KFUNC_INFLIGHT.insert(tid, info, 0);
}

#[inline(always)]
fn hash_connect_return(ret: i64) {
    if ret != -(EADDRNOTAVAIL as i64) {
        return;
    }
    if let Some(p) = KFUNC_INFLIGHT.get_ptr_mut(bpf_get_current_pid_tgid()) {
        unsafe { (*p).flags |= INFLIGHT_HASH_FAILED };
    }
}

#[inline(always)]
fn connect_return(ret: i64) {
    let tid = bpf_get_current_pid_tgid();
    let Some(p) = KFUNC_INFLIGHT.get_ptr_mut(tid) else {
        return;
    };
    // SAFETY: this thread's own entry.
    let info = unsafe {
        (*p).depth = (*p).depth.saturating_sub(1);
        if (*p).depth > 0 {
            return; // the inner tcp_v4_connect of a v4-mapped connect; the outer one reports
        }
        *p
    };
    let _ = KFUNC_INFLIGHT.remove(tid);
    // tcp_v{4,6}_connect() covers route lookup, port selection and sending the SYN, not the
    // wait for the handshake: its duration is the cost port selection adds.
    let failed = ret == -(EADDRNOTAVAIL as i64);
    let timed = global(&TRACK_BLAME) != 0;
    if !timed && !failed {
        return;
    }
    let netns = current_netns();
    if timed {
        record_connect(&info, failed, netns);
    }
    if !failed {
        return;
    }
    let site = if info.flags & INFLIGHT_HASH_FAILED != 0 {
        Site::InetHashConnect
    } else if info.flags & INFLIGHT_V4_NESTED != 0 {
        Site::TcpV4Connect
    } else {
        Site::from_u8(info.opener).unwrap_or(Site::TcpV4Connect)
    };
    report(Failure {
        netns,
        errno: EADDRNOTAVAIL,
        site,
        proto: IPPROTO_TCP,
        info: &info,
    });
}

// kprobe backend ------------------------------------------------------------------------------

#[kprobe]
pub fn kprobe_tcp_v4_connect(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(uaddr)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        connect_entry(sk, uaddr, Site::TcpV4Connect);
    }
    0
}

#[kprobe]
pub fn kprobe_tcp_v6_connect(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(uaddr)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        connect_entry(sk, uaddr, Site::TcpV6Connect);
    }
    0
}

#[kretprobe]
pub fn kretprobe_tcp_v4_connect(ctx: RetProbeContext) -> u32 {
    connect_return(ctx.ret::<i64>() as i32 as i64);
    0
}

#[kretprobe]
pub fn kretprobe_tcp_v6_connect(ctx: RetProbeContext) -> u32 {
    connect_return(ctx.ret::<i64>() as i32 as i64);
    0
}

/// Attached to `__inet_hash_connect`. `int __inet_hash_connect(...)`: 4 arguments on 5.10..6.14, 5 on 6.15+ (hash_port0); only
/// the return value is read, so the signature change does not matter to a kretprobe.
#[kretprobe]
pub fn kretprobe_inet_hash_connect(ctx: RetProbeContext) -> u32 {
    hash_connect_return(ctx.ret::<i64>() as i32 as i64);
    0
}

// fentry backend ------------------------------------------------------------------------------
// fexit programs read the return value as the argument after the last one (works from 5.5 on,
// unlike bpf_get_func_ret which needs 5.17). Because __inet_hash_connect() changed its number
// of arguments in 6.15, the fexit goes on its stable, exported caller
// `int inet_hash_connect(struct inet_timewait_death_row *, struct sock *)`, which returns
// __inet_hash_connect()'s value unchanged.

#[fentry(function = "tcp_v4_connect")]
pub fn fentry_tcp_v4_connect(ctx: FEntryContext) -> u32 {
    connect_entry(ctx.arg::<u64>(0), ctx.arg::<u64>(1), Site::TcpV4Connect);
    0
}

#[fentry(function = "tcp_v6_connect")]
pub fn fentry_tcp_v6_connect(ctx: FEntryContext) -> u32 {
    connect_entry(ctx.arg::<u64>(0), ctx.arg::<u64>(1), Site::TcpV6Connect);
    0
}

#[fexit(function = "tcp_v4_connect")]
pub fn fexit_tcp_v4_connect(ctx: FExitContext) -> u32 {
    connect_return(ctx.arg::<i64>(3) as i32 as i64);
    0
}

#[fexit(function = "tcp_v6_connect")]
pub fn fexit_tcp_v6_connect(ctx: FExitContext) -> u32 {
    connect_return(ctx.arg::<i64>(3) as i32 as i64);
    0
}

#[fexit(function = "inet_hash_connect")]
pub fn fexit_inet_hash_connect(ctx: FExitContext) -> u32 {
    hash_connect_return(ctx.arg::<i64>(2) as i32 as i64);
    0
}

/// IPv6 has its own exported wrapper around __inet_hash_connect():
/// `int inet6_hash_connect(struct inet_timewait_death_row *, struct sock *)` (5.10..6.12+).
#[fexit(function = "inet6_hash_connect")]
pub fn fexit_inet6_hash_connect(ctx: FExitContext) -> u32 {
    hash_connect_return(ctx.arg::<i64>(2) as i32 as i64);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects unreachable code paths that are not provably dead; a loop is the
    // safe way to satisfy the `!` return type.
    #[allow(clippy::empty_loop)]
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
