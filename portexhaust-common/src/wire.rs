//! Events, map keys and values: raw bytes between the programs and user space.
use crate::net::COMM_LEN;

/// `FailureEvent::flags`: the source address field is valid.
pub const EVENT_SADDR_KNOWN: u8 = 1;
/// `FailureEvent::flags`: the socket was bound to a local port before connect().
pub const EVENT_BOUND: u8 = 2;

/// One exhaustion failure, sent through the `EVENTS` ring buffer.
// align(8): the programs store the address fields as two 64-bit words (see the eBPF
// crate's addr.rs); every field offset stays what repr(C) gives.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the failure.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    /// Thread-group id (the process id users know).
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    /// Positive errno (99, 98 or 11).
    pub errno: u32,
    /// Destination address (bind: the requested local address); IPv4 in the first 4 bytes.
    pub daddr: [u8; 16],
    /// Source address when `EVENT_SADDR_KNOWN` is set; IPv4 in the first 4 bytes.
    pub saddr: [u8; 16],
    /// Destination port, host byte order.
    pub dport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub proto: u8,
    pub site: u8,
    pub backend: u8,
    pub flags: u8,
    pub comm: [u8; COMM_LEN],
    /// Network namespace inode (of the socket where known, else of the task; 0 = unknown).
    pub netns: u32,
    /// A [`crate::Cause`] code.
    pub cause: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<FailureEvent>() == 96);

/// Key of the exact per-(process, destination, errno, cause) failure counts.
// align(8): the programs store the address fields as two 64-bit words (see the eBPF
// crate's addr.rs); every field offset stays what repr(C) gives.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountKey {
    pub pid: u32,
    pub dport: u16,
    pub family: u16,
    pub errno: u16,
    pub proto: u8,
    /// A [`crate::Cause`] code.
    pub cause: u8,
    /// Explicit padding: keys are hashed as raw bytes, so every byte must be written.
    pub _pad: [u8; 4],
    pub daddr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<CountKey>() == 32);

/// Value of the exact counts map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CountValue {
    /// Incremented atomically: several CPUs can fail towards the same key at once.
    pub count: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// The command name seen at the first failure of this key.
    pub comm: [u8; COMM_LEN],
    /// Of `count`, failures that were not streamed as events: over the per-second event budget
    /// of a storm, or refused by a full ring buffer. User space turns its increase into exact
    /// `tally` lines, so every failure is either an event or in a tally, never both.
    pub unstreamed: u64,
}

const _: () = assert!(core::mem::size_of::<CountValue>() == 48);

/// `Inflight::kind`.
pub const INFLIGHT_CONNECT: u8 = 1;
pub const INFLIGHT_BIND: u8 = 2;

/// `Inflight::flags` bits.
/// `inet_sock_set_state` saw CLOSE -> SYN_SENT during this call: port selection was reached.
pub const INFLIGHT_SYN_SENT: u8 = 1;
/// The source address was learnt.
pub const INFLIGHT_SADDR: u8 = 2;
/// `__inet_hash_connect` / `inet_hash_connect` returned -EADDRNOTAVAIL during this call.
pub const INFLIGHT_HASH_FAILED: u8 = 4;
/// A tcp_v6_connect() of a v4-mapped address went on into tcp_v4_connect().
pub const INFLIGHT_V4_NESTED: u8 = 8;
/// The socket already had a local port when port selection ran (bind() before connect()).
pub const INFLIGHT_BOUND: u8 = 16;
/// The bound/unbound question was answered (BTF offsets were available).
pub const INFLIGHT_BOUND_KNOWN: u8 = 32;

/// State kept per thread between the entry and the return of a hooked call.
// align(8): the programs store the address fields as two 64-bit words (see the eBPF
// crate's addr.rs); every field offset stays what repr(C) gives.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inflight {
    /// Kernel `struct sock *` (function hooks) or the fd (syscall tracepoints).
    pub handle: u64,
    pub daddr: [u8; 16],
    pub saddr: [u8; 16],
    pub dport: u16,
    pub family: u16,
    pub kind: u8,
    pub flags: u8,
    /// Nesting depth of tcp_v6_connect -> tcp_v4_connect (kprobe/fentry backends).
    pub depth: u8,
    /// Which function opened the entry (a `Site` code: TcpV4Connect or TcpV6Connect), or the
    /// protocol for bind entries.
    pub opener: u8,
    /// `bpf_ktime_get_ns()` at entry.
    pub start_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Inflight>() == 56);

/// `Owner::flags` bits.
/// The socket left through FIN_WAIT1/FIN_WAIT2/CLOSING -> CLOSE: its tuple is in TIME_WAIT
/// from `at_ns` (60 s, TCP_TIMEWAIT_LEN).
pub const OWNER_TIME_WAIT: u32 = 2;

/// The process that closed a connection actively (captured at ESTABLISHED -> FIN_WAIT1, in the
/// closing task's own context): it leaves the TIME_WAIT socket behind. Its command and cgroup
/// are in `PROCS`, once per process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub flags: u32,
    /// Start time of the process (`group_leader->start_boottime`, ns since boot): with the pid
    /// it identifies the process even after the pid is reused. 0 when unknown.
    pub start_ns: u64,
    /// `bpf_ktime_get_ns()` of the active close, then of its CLOSE (when its TIME_WAIT began)
    /// once `OWNER_TIME_WAIT` is set. One field for both: the map holds 100k+ of these, and no
    /// reader needs the two at once.
    pub at_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Owner>() == 24);

/// A connection's identity once its source port is known: the 4-tuple in its namespace.
/// Socket addresses are reused quickly after a socket is freed, and a TIME_WAIT socket is a
/// new object, so owners are keyed by this from ESTABLISHED through TIME_WAIT. IPv4
/// addresses are stored IPv4-mapped (`::ffff:a.b.c.d`): a v4 socket and a v4-mapped v6 socket
/// share one port space, so the family adds nothing to the key but bytes.
// align(8): the programs store the address fields as two 64-bit words (see the eBPF
// crate's addr.rs); every field offset stays what repr(C) gives.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TupleKey {
    pub netns: u32,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<TupleKey>() == 40);

/// `PROCS` key: a process, by pid and start time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcKey {
    pub pid: u32,
    pub _pad: u32,
    pub start_ns: u64,
}

const _: () = assert!(core::mem::size_of::<ProcKey>() == 16);

/// What is remembered once per connecting process, so that exited owners are still named.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcInfo {
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}

const _: () = assert!(core::mem::size_of::<ProcInfo>() == 24);

/// Per-destination key of the connect statistics.
// align(8): the programs store the address fields as two 64-bit words (see the eBPF
// crate's addr.rs); every field offset stays what repr(C) gives.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestKey {
    pub netns: u32,
    pub family: u16,
    pub dport: u16,
    pub daddr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<DestKey>() == 24);

/// Buckets of the latency histogram: bucket i counts latencies in [2^i, 2^(i+1)) ns
/// (bucket 0 also takes 0 ns); the last bucket takes everything above.
pub const LATENCY_BUCKETS: usize = 32;

/// connect() statistics per destination, updated with atomic adds (one entry per destination
/// whatever the number of CPUs, unlike a per-CPU map). Failures are not counted here: `COUNTS`
/// has them exactly per process and destination, and the failure path stays short.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestStats {
    /// TCP connects that were established (new connections holding a port). Per-CPU runs of
    /// connects to one destination are added here when the CPU moves on (`ConnMemo`).
    pub connects: u64,
    /// Their latency, from CLOSE -> SYN_SENT (port selection starts) to ESTABLISHED, for a
    /// sample: per CPU, the first connect of each jiffy and the first after a change of
    /// destination (every connect of a quiet host; a few hundred a second per CPU in a storm).
    pub hist: [u64; LATENCY_BUCKETS],
}

/// Per CPU: the destination this CPU's last established connects went to, and how many are
/// not yet in `DEST_STATS`. User space adds `pending` when it reads the counts.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnMemo {
    pub key: DestKey,
    pub pending: u64,
}

const _: () = assert!(core::mem::size_of::<ConnMemo>() == 32);

const _: () = assert!(core::mem::size_of::<DestStats>() == 264);

/// `SiteKey::stack_id` of connects and failures whose stack was not walked: over the walk
/// budget, or no user stack to walk (a kernel thread, io_uring), or a stack-map collision.
/// Their counts stay exact per process and destination; only the call site is unknown.
pub const STACK_NOT_WALKED: u32 = u32::MAX;

/// Key of the call-site counts: one process's connects to one destination from one user-space
/// stack (a `STACKS` stack id, or [`STACK_NOT_WALKED`]). `netns` is 0 (not read on the hot
/// path): user space names the process's namespace.
// align(8): the programs store the address fields as two 64-bit words (see the eBPF
// crate's addr.rs); every field offset stays what repr(C) gives.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteKey {
    pub pid: u32,
    pub stack_id: u32,
    pub netns: u32,
    pub family: u16,
    pub dport: u16,
    pub daddr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<SiteKey>() == 32);

/// Counts of one call site, added with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteValue {
    /// TCP connects started (CLOSE -> SYN_SENT: port selection reached).
    pub connects: u64,
    /// Of them, on sockets already bound to a local port (bind() before connect()): each takes
    /// its port from the whole range, for every destination at once.
    pub bound: u64,
    /// Port-selection failures (exhausted range or taken 4-tuple).
    pub failures: u64,
    /// Of `connects`, the ones whose own stack was walked (the rest inherited the site): the
    /// sockets of walked connects are known by 4-tuple, the others are shared out by the
    /// connects each site did not walk.
    pub walked: u64,
}

const _: () = assert!(core::mem::size_of::<SiteValue>() == 32);

/// Per CPU: the last call site this CPU counted, the thread and jiffy of its stack walk, the
/// walk budget of the current jiffy, and the counts not yet added to `SITES` (user space adds
/// `pending` when it reads the sites).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteMemo {
    pub key: SiteKey,
    pub tid: u32,
    /// Stack walks this CPU made in `budget_jiffy`.
    pub walks: u32,
    /// Jiffy when `key.stack_id` was decided (walked or not).
    pub jiffy: u64,
    pub budget_jiffy: u64,
    pub pending: SiteValue,
}

const _: () = assert!(core::mem::size_of::<SiteMemo>() == 88);

/// Which call site opened a socket: its process and stack id (`SOCK_SITES`, by 4-tuple, for
/// the sockets whose connect was walked).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteRef {
    pub pid: u32,
    pub stack_id: u32,
}

const _: () = assert!(core::mem::size_of::<SiteRef>() == 8);

/// Ring-buffer event: a new (process, stack) pair was walked, so that user space symbolises
/// the stack while the process still lives. Told from a [`FailureEvent`] by its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteEvent {
    pub pid: u32,
    pub stack_id: u32,
    /// Always [`SITE_EVENT_MAGIC`]: guards the size-based dispatch.
    pub magic: u32,
    pub _pad: u32,
}

pub const SITE_EVENT_MAGIC: u32 = 0x5354_4b31;

const _: () = assert!(core::mem::size_of::<SiteEvent>() == 16);

/// Kernel struct offsets, resolved from the running kernel's BTF at load time (Rust eBPF emits
/// no CO-RE relocations) and handed to the programs as one `u32` global each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    // task_struct -> nsproxy -> net -> ns.inum; task_struct -> group_leader -> start_boottime
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
    pub net_ns_inum: u32,
    pub task_group_leader: u32,
    pub task_start_time: u32,
    // struct sock (the first member of inet_sock and tcp_sock, so one base for all)
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_net: u32,
    pub sk_protocol: u32,
    pub sk_err: u32,
    pub inet_sport: u32,
    pub tcp_write_seq: u32,
    // struct socket
    pub socket_type: u32,
    // net->ipv4.ip_local_ports.range, and whether it is one packed u32 (else int[2])
    pub net_port_range: u32,
    pub port_range_packed: u32,
}

impl Offsets {
    /// Global names, in field order (see [`Offsets::values`]).
    pub const GLOBALS: [&'static str; 20] = [
        "OFF_TASK_NSPROXY",
        "OFF_NSPROXY_NET",
        "OFF_NET_INUM",
        "OFF_TASK_GROUP_LEADER",
        "OFF_TASK_START_TIME",
        "OFF_SKC_DADDR",
        "OFF_SKC_RCV_SADDR",
        "OFF_SKC_DPORT",
        "OFF_SKC_NUM",
        "OFF_SKC_FAMILY",
        "OFF_SKC_V6_DADDR",
        "OFF_SKC_V6_RCV_SADDR",
        "OFF_SKC_NET",
        "OFF_SK_PROTOCOL",
        "OFF_SK_ERR",
        "OFF_INET_SPORT",
        "OFF_TCP_WRITE_SEQ",
        "OFF_SOCKET_TYPE",
        "OFF_NET_PORT_RANGE",
        "PORT_RANGE_PACKED",
    ];

    pub const fn values(&self) -> [u32; 20] {
        [
            self.task_nsproxy,
            self.nsproxy_net_ns,
            self.net_ns_inum,
            self.task_group_leader,
            self.task_start_time,
            self.skc_daddr,
            self.skc_rcv_saddr,
            self.skc_dport,
            self.skc_num,
            self.skc_family,
            self.skc_v6_daddr,
            self.skc_v6_rcv_saddr,
            self.skc_net,
            self.sk_protocol,
            self.sk_err,
            self.inet_sport,
            self.tcp_write_seq,
            self.socket_type,
            self.net_port_range,
            self.port_range_packed,
        ]
    }
}

/// An IPv4 address IPv4-mapped, as [`TupleKey`] stores it.
pub fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), made only of integers and byte arrays, with every
    // padding byte spelled out as a field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::FailureEvent {}
    unsafe impl aya::Pod for super::CountKey {}
    unsafe impl aya::Pod for super::CountValue {}
    unsafe impl aya::Pod for super::Inflight {}
    unsafe impl aya::Pod for super::Owner {}
    unsafe impl aya::Pod for super::TupleKey {}
    unsafe impl aya::Pod for super::ProcKey {}
    unsafe impl aya::Pod for super::ProcInfo {}
    unsafe impl aya::Pod for super::DestKey {}
    unsafe impl aya::Pod for super::DestStats {}
    unsafe impl aya::Pod for super::ConnMemo {}
    unsafe impl aya::Pod for super::SiteKey {}
    unsafe impl aya::Pod for super::SiteValue {}
    unsafe impl aya::Pod for super::SiteMemo {}
    unsafe impl aya::Pod for super::SiteRef {}
    unsafe impl aya::Pod for super::SiteEvent {}
}
