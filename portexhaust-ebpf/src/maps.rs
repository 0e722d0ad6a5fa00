//! Every map of the object. The sizes here are the defaults; the loader shrinks to one entry
//! every map whose programs it does not attach (hash maps reserve all their memory up front),
//! and sizes the ownership map from `--max-tracked-sockets`.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, StackTrace},
};
use portexhaust_common::{
    COMM_LEN, ConnMemo, CountKey, CountValue, DestKey, DestStats, Inflight, Owner, ProcInfo,
    ProcKey, SiteKey, SiteMemo, SiteRef, SiteValue, TupleKey, stat,
};

/// Failure events for user space. 2 MiB holds ~20k events, ~130 ms of the fastest storm
/// measured here; the reader drains at least every 10 ms in a storm, so it fills only when
/// user space stalls, and then `STATS[RINGBUF_DROPS]` says so while `COUNTS` stays exact.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(2 << 20, 0);

/// Exact failure counts per (pid, destination, errno, cause).
#[map]
pub static COUNTS: HashMap<CountKey, CountValue> = HashMap::with_max_entries(16384, 0);

/// Global counters (see `portexhaust_common::stat`); per CPU so the hot path takes no lock.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::LEN, 0);

/// Per CPU: which cold-path warnings this CPU has already logged (`cold.rs`), one bit each.
#[map]
pub static LOGGED: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: when this CPU last asked for a ring-buffer wakeup (`bpf_ktime_get_ns`).
#[map]
pub static LAST_WAKEUP: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the event budget's window start, events streamed in it, failures over it since
/// the clock was last read, and that clock reading (see emit.rs).
#[map]
pub static BUDGET: PerCpuArray<[u64; 4]> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);
#[map]
pub static FILTER_COMMS: HashMap<[u8; COMM_LEN], u8> = HashMap::with_max_entries(1024, 0);
#[map]
pub static FILTER_DPORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);
/// `--cgroup`/`--container`: cgroup ids (cgroup v2 directory inodes) whose tasks pass; see
/// `CGROUP_LEVELS` for whether they are ancestors or every cgroup of the subtree.
#[map]
pub static FILTER_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(4096, 0);

/// connect()/bind() syscalls between entry and exit, by thread id (syscall tracepoints, only
/// attached on request). LRU: a thread killed inside the syscall never reaches the exit
/// program, and its entry must not stay forever.
#[map]
pub static SYSCALL_INFLIGHT: LruHashMap<u64, Inflight> = LruHashMap::with_max_entries(4096, 0);

/// Hooked kernel calls between entry and return, by thread id (function-hook sets). Kept apart
/// from the syscall map: io_uring connects reach these functions without a syscall.
#[map]
pub static KFUNC_INFLIGHT: LruHashMap<u64, Inflight> = LruHashMap::with_max_entries(4096, 0);

/// socket() type argument between sys_enter_socket and sys_exit_socket, by thread id.
#[map]
pub static SOCKET_ARGS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(4096, 0);

/// Datagram sockets by (tgid << 32 | fd) created while tracing: tells UDP from TCP for the
/// syscall-tracepoint bind() and connect() paths.
#[map]
pub static SOCK_TYPES: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65536, 0);

/// Connects between CLOSE -> SYN_SENT and their outcome, by kernel socket address. Only the
/// handshakes in flight live here, so it is small; from ESTABLISHED the owner moves to `OWNERS`
/// (never both at once). Loopback connects, whose outcome comes inside the connect() itself,
/// wait in `PENDING_SLOT` instead (see state.rs).
///
/// Value: the connect's start time (0: not timed) and its call site when its stack was walked
/// (`sites::pack`, 0: none).
#[map]
pub static PENDING: LruHashMap<u64, [u64; 2]> = LruHashMap::with_max_entries(4096, 0);

/// Owners by (netns, 4-tuple) of sockets closed actively, from the close through TIME_WAIT:
/// TIME_WAIT sockets have no owner in the kernel, this map remembers the process that closed
/// them (live sockets are named by the process holding their file). Only sockets whose local
/// port is in their namespace's ephemeral range: those are the ones that exhaust it. User
/// space removes entries whose TIME_WAIT is over.
#[map]
pub static OWNERS: LruHashMap<TupleKey, Owner> = LruHashMap::with_max_entries(131072, 0);

/// Per CPU: the loopback connect in flight on this CPU, as (socket address, start time,
/// packed call site).
#[map]
pub static PENDING_SLOT: PerCpuArray<[u64; 3]> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the last connecting task (its `task_struct` address), its pid and start time,
/// whose `PROCS` entry is known to exist.
#[map]
pub static LAST_PROC: PerCpuArray<[u64; 3]> = PerCpuArray::with_max_entries(1, 0);

/// Command and cgroup of each connecting process, once per process rather than per socket.
#[map]
pub static PROCS: LruHashMap<ProcKey, ProcInfo> = LruHashMap::with_max_entries(8192, 0);

/// connect() count and latency histogram per destination.
#[map]
pub static DEST_STATS: LruHashMap<DestKey, DestStats> = LruHashMap::with_max_entries(4096, 0);

/// Per CPU: the run of established connects to one destination not yet in `DEST_STATS`.
#[map]
pub static CONN_MEMO: PerCpuArray<ConnMemo> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the jiffy and destination signature of the last connect whose latency was timed.
#[map]
pub static SAMPLED: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// One all-zero DestStats to insert from: 272 bytes would crowd the 512-byte BPF stack.
#[map]
pub static ZERO_STATS: PerCpuArray<DestStats> = PerCpuArray::with_max_entries(1, 0);

/// User-space stacks of call sites (`bpf_get_stackid`), by stack id. A bucket taken by
/// another stack makes the walk fail (no `BPF_F_REUSE_STACKID`: an id never changes meaning
/// while user space may still read it); the connect then counts as not walked.
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(2048, 0);

/// Connects, bound connects and failures per (pid, stack id, destination); see sites.rs.
#[map]
pub static SITES: HashMap<SiteKey, SiteValue> = HashMap::with_max_entries(8192, 0);

/// Per CPU: the current call site and its counts not yet in `SITES`.
#[map]
pub static SITE_MEMO: PerCpuArray<SiteMemo> = PerCpuArray::with_max_entries(1, 0);

/// The call site of the connections whose connect was walked, by 4-tuple (as `OWNERS`), from
/// ESTABLISHED through TIME_WAIT: the holders' call sites. LRU: nothing removes them.
#[map]
pub static SOCK_SITES: LruHashMap<TupleKey, SiteRef> = LruHashMap::with_max_entries(16384, 0);
