//! Types shared by the eBPF programs and the user-space loader.
//!
//! Every struct here crosses the kernel/user boundary as raw bytes, so each one holds only
//! integers and byte arrays, has explicit padding fields (no implicit padding the verifier or
//! `aya::Pod` could trip over), and carries a `size_of` assertion. User space never transmutes
//! these bytes into enums: sites, protocols and backends travel as `u8` codes and are decoded
//! with a checked `from_u8`.
#![no_std]

/// Length of `task_struct.comm` (TASK_COMM_LEN in include/linux/sched.h).
pub const COMM_LEN: usize = 16;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const EAGAIN: u32 = 11;
pub const EADDRINUSE: u32 = 98;
pub const EADDRNOTAVAIL: u32 = 99;

/// Names of maps and globals, shared so that the loader and the programs cannot drift apart.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTS: &str = "COUNTS";
    pub const STATS: &str = "STATS";
    pub const FILTER_PIDS: &str = "FILTER_PIDS";
    pub const FILTER_COMMS: &str = "FILTER_COMMS";
    pub const FILTER_DPORTS: &str = "FILTER_DPORTS";
    pub const SYSCALL_INFLIGHT: &str = "SYSCALL_INFLIGHT";
    pub const KFUNC_INFLIGHT: &str = "KFUNC_INFLIGHT";
    pub const SOCKET_ARGS: &str = "SOCKET_ARGS";
    pub const SOCK_TYPES: &str = "SOCK_TYPES";
    pub const OWNER_BY_SK: &str = "OWNER_BY_SK";
    pub const OWNER_BY_TUPLE: &str = "OWNER_BY_TUPLE";
    pub const DEST_STATS: &str = "DEST_STATS";

    /// Globals: kernel struct offsets resolved from BTF at load time (`u32` each), and whether
    /// they are valid (`HAVE_TASK_OFFSETS` != 0). Without them netns and start time read as 0.
    pub const GLOBAL_HAVE_TASK_OFFSETS: &str = "HAVE_TASK_OFFSETS";
    pub const GLOBAL_OFF_TASK_NSPROXY: &str = "OFF_TASK_NSPROXY";
    pub const GLOBAL_OFF_NSPROXY_NET: &str = "OFF_NSPROXY_NET";
    pub const GLOBAL_OFF_NET_INUM: &str = "OFF_NET_INUM";
    pub const GLOBAL_OFF_TASK_GROUP_LEADER: &str = "OFF_TASK_GROUP_LEADER";
    pub const GLOBAL_OFF_TASK_START_TIME: &str = "OFF_TASK_START_TIME";

    /// Global: which backend the object was loaded for ([`super::Backend`] code, `u32`).
    pub const GLOBAL_BACKEND: &str = "BACKEND";
    /// Global: bit set of active filters (`FILTER_*` bits, `u32`).
    pub const GLOBAL_FILTER_FLAGS: &str = "FILTER_FLAGS";
    /// Global: ownership tracking and latency histograms on (1) or off (0), `u32`.
    pub const GLOBAL_TRACK_BLAME: &str = "TRACK_BLAME";
}

/// Filter bits in the `FILTER_FLAGS` global: a set bit means the matching map is a whitelist.
pub const FILTER_PID: u32 = 1;
pub const FILTER_COMM: u32 = 2;
pub const FILTER_DPORT: u32 = 4;

/// Indices into the per-CPU `STATS` array.
pub mod stat {
    /// Every exhaustion failure that passed the filters (exact).
    pub const FAILURES: u32 = 0;
    /// Events that could not be reserved in the ring buffer (the counts still saw them).
    pub const RINGBUF_DROPS: u32 = 1;
    /// Failures whose (pid, destination, errno) key did not fit into `COUNTS` (map full).
    pub const COUNT_MAP_FULL: u32 = 2;
    /// New keys inserted into / removed from `OWNER_BY_TUPLE` by the kernel. With the number
    /// of entries and user-space deletions they give the LRU evictions.
    pub const TUPLE_INSERTS: u32 = 3;
    pub const TUPLE_DELETES: u32 = 4;
    /// The same for `OWNER_BY_SK`.
    pub const SK_INSERTS: u32 = 5;
    pub const SK_DELETES: u32 = 6;
    pub const LEN: u32 = 7;
}

/// The kernel site a failure is attributed to.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// `__inet_hash_connect()` found no usable local port (range exhausted, or the 4-tuple of a
    /// pre-bound port is taken).
    InetHashConnect = 1,
    /// `tcp_v4_connect()` failed with EADDRNOTAVAIL before/outside port selection.
    TcpV4Connect = 2,
    /// `tcp_v6_connect()` failed with EADDRNOTAVAIL before/outside port selection (for
    /// example no usable IPv6 source address).
    TcpV6Connect = 3,
    /// `bind()` to port 0 found no free port (`inet_csk_get_port` / `udp_lib_get_port`).
    Bind = 4,
    /// `connect()` on an unbound datagram socket could not autobind (`inet_autobind`).
    UdpAutobind = 5,
}

impl Site {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::InetHashConnect),
            2 => Some(Self::TcpV4Connect),
            3 => Some(Self::TcpV6Connect),
            4 => Some(Self::Bind),
            5 => Some(Self::UdpAutobind),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::InetHashConnect => "__inet_hash_connect",
            Self::TcpV4Connect => "tcp_v4_connect",
            Self::TcpV6Connect => "tcp_v6_connect",
            Self::Bind => "bind",
            Self::UdpAutobind => "udp_autobind",
        }
    }
}

/// The probe backend a program set belongs to.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Fentry = 1,
    Kprobe = 2,
    Tracepoint = 3,
}

impl Backend {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Fentry),
            2 => Some(Self::Kprobe),
            3 => Some(Self::Tracepoint),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::Tracepoint => "tracepoint",
        }
    }
}

/// `FailureEvent::flags`: the source address field is valid.
pub const EVENT_SADDR_KNOWN: u8 = 1;

/// One exhaustion failure, sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the failing return.
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
    /// `AF_INET` or `AF_INET6` (of the socket address the caller passed).
    pub family: u16,
    pub proto: u8,
    pub site: u8,
    pub backend: u8,
    pub flags: u8,
    pub comm: [u8; COMM_LEN],
    /// Network namespace inode of the failing task (0 when kernel BTF was not available).
    pub netns: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<FailureEvent>() == 96);

/// Key of the exact per-(process, destination, errno) failure counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountKey {
    pub pid: u32,
    pub dport: u16,
    pub family: u16,
    pub errno: u16,
    pub proto: u8,
    /// Explicit padding: keys are hashed as raw bytes, so every byte must be written.
    pub _pad: [u8; 5],
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
}

const _: () = assert!(core::mem::size_of::<CountValue>() == 40);

/// `Inflight::kind`.
pub const KIND_CONNECT: u8 = 1;
pub const KIND_BIND: u8 = 2;

/// `Inflight::flags` bits.
/// `sock:inet_sock_set_state` saw CLOSE -> SYN_SENT during this call: port selection was reached.
pub const INFLIGHT_SYN_SENT: u8 = 1;
/// The source address was learnt (at SYN_SENT).
pub const INFLIGHT_SADDR: u8 = 2;
/// `__inet_hash_connect` / `inet_hash_connect` returned -EADDRNOTAVAIL during this call.
pub const INFLIGHT_HASH_FAILED: u8 = 4;
/// A tcp_v6_connect() of a v4-mapped address went on into tcp_v4_connect().
pub const INFLIGHT_V4_NESTED: u8 = 8;

/// State kept per thread between the entry and the return of connect()/bind().
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inflight {
    /// Kernel `struct sock *` (kprobe/fentry backends) or the fd (syscall tracepoints).
    pub handle: u64,
    pub daddr: [u8; 16],
    pub saddr: [u8; 16],
    pub dport: u16,
    pub family: u16,
    pub kind: u8,
    pub flags: u8,
    /// Nesting depth of tcp_v6_connect -> tcp_v4_connect (kprobe/fentry backends).
    pub depth: u8,
    /// Which function opened the entry (a `Site` code: TcpV4Connect or TcpV6Connect).
    pub opener: u8,
    /// `bpf_ktime_get_ns()` at entry, for the connect() latency histogram.
    pub start_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Inflight>() == 56);

/// `Owner::flags` bits.
/// The owner closed first (ESTABLISHED -> FIN_WAIT1): it will hold TIME_WAIT.
pub const OWNER_ACTIVE_CLOSE: u32 = 1;
/// The socket left through FIN_WAIT1/FIN_WAIT2/CLOSING -> CLOSE: its tuple is in TIME_WAIT.
pub const OWNER_TIME_WAIT: u32 = 2;
/// The peer closed first (ESTABLISHED -> CLOSE_WAIT).
pub const OWNER_PASSIVE_CLOSE: u32 = 4;

/// The process that opened an outgoing TCP connection (captured at CLOSE -> SYN_SENT, in the
/// connecting task's own context).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub netns: u32,
    pub cgroup_id: u64,
    /// Start time of the process (`group_leader->start_boottime`, ns since boot): with the pid it
    /// identifies the process even after the pid is reused.
    pub start_ns: u64,
    pub connect_ns: u64,
    /// When the socket reached CLOSE (its TIME_WAIT began, if `OWNER_TIME_WAIT`), else 0.
    pub closed_ns: u64,
    pub comm: [u8; COMM_LEN],
    pub flags: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<Owner>() == 64);

/// A connection's identity once its source port is known: the 4-tuple in its namespace.
/// Socket addresses (`skaddr`) are reused quickly after a socket is freed, so owners move to
/// this key at ESTABLISHED and keep it through TIME_WAIT.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TupleKey {
    pub netns: u32,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _pad: [u8; 2],
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<TupleKey>() == 44);

/// Per-destination key of the connect statistics.
#[repr(C)]
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

/// connect() statistics per destination (per CPU; user space sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestStats {
    /// TCP connects that reached port selection (any outcome).
    pub connects: u64,
    /// Of those, failed with EADDRNOTAVAIL.
    pub failures: u64,
    pub hist: [u64; LATENCY_BUCKETS],
}

const _: () = assert!(core::mem::size_of::<DestStats>() == 272);

/// `SOCK_TYPES` value: the socket type given to socket() (SOCK_STREAM = 1, SOCK_DGRAM = 2).
pub const SOCK_STREAM: u8 = 1;
pub const SOCK_DGRAM: u8 = 2;

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
    unsafe impl aya::Pod for super::DestKey {}
    unsafe impl aya::Pod for super::DestStats {}
}
