//! Types shared by the eBPF programs and the user-space loader.
//!
//! Every struct in [`wire`] crosses the kernel/user boundary as raw bytes, so each one holds
//! only integers and byte arrays, has explicit padding fields (no implicit padding the verifier
//! or `aya::Pod` could trip over), and carries a `size_of` assertion. User space never
//! transmutes these bytes into enums: sites, causes, protocols and backends travel as `u8`
//! codes and are decoded with a checked `from_u8`.
//!
//! - [`net`]: kernel constants (TCP states, errnos, address families) as the kernel numbers them.
//! - [`codes`]: the codes the programs put into events (site, cause, backend, failure kind).
//! - [`wire`]: events, map keys and values.
//! - With the `user` feature, the codes and TCP states (de)serialise by their names
//!   (`"TIME_WAIT"`, `"__inet_hash_connect"`, `"tp-btf"`), as every record and JSON line
//!   writes them.
//! - [`programs`]: the program table: every program of the object, its hook and its role, so
//!   the loader and the object cannot disagree on names or attach targets.
//! - With the `std` feature (implied by `user`), `procns`: a process's network namespace, read
//!   from /proc (`netns_of`, `parse_ns_link`, re-exported at the root).
#![no_std]

#[cfg(feature = "std")]
extern crate std;

pub mod codes;
pub mod nat;
pub mod net;
#[cfg(feature = "std")]
pub mod procns;
pub mod programs;
#[cfg(feature = "user")]
mod serde_names;
pub mod wire;

pub use codes::*;
pub use nat::{NAT_EVENT_MAGIC, NatEvent, NatKey, NatOffsets};
pub use net::*;
#[cfg(feature = "std")]
pub use procns::{netns_of, parse_ns_link};
pub use wire::*;

/// Names of maps and globals, shared so that the loader and the programs cannot drift apart.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTS: &str = "COUNTS";
    pub const STATS: &str = "STATS";
    pub const FILTER_PIDS: &str = "FILTER_PIDS";
    pub const FILTER_COMMS: &str = "FILTER_COMMS";
    pub const FILTER_DPORTS: &str = "FILTER_DPORTS";
    pub const FILTER_CGROUPS: &str = "FILTER_CGROUPS";
    pub const SYSCALL_INFLIGHT: &str = "SYSCALL_INFLIGHT";
    pub const KFUNC_INFLIGHT: &str = "KFUNC_INFLIGHT";
    pub const SOCKET_ARGS: &str = "SOCKET_ARGS";
    pub const SOCK_TYPES: &str = "SOCK_TYPES";
    pub const PENDING: &str = "PENDING";
    pub const OWNERS: &str = "OWNERS";
    pub const PROCS: &str = "PROCS";
    pub const DEST_STATS: &str = "DEST_STATS";
    pub const CONN_MEMO: &str = "CONN_MEMO";
    pub const STACKS: &str = "STACKS";
    pub const SITES: &str = "SITES";
    pub const SITE_MEMO: &str = "SITE_MEMO";
    pub const SOCK_SITES: &str = "SOCK_SITES";
    /// Exact source-NAT drop counts (`NatKey` -> u64), see `nat`.
    pub const NAT_COUNTS: &str = "NAT_COUNTS";

    /// Global: which backend the object was loaded for ([`super::Backend`] code, `u32`).
    pub const GLOBAL_BACKEND: &str = "BACKEND";
    /// Global: bit set of active filters (`FILTER_*` bits, `u32`).
    pub const GLOBAL_FILTER_FLAGS: &str = "FILTER_FLAGS";
    /// Global: the cgroup v2 levels (bit i: level i) at which `FILTER_CGROUPS` holds an
    /// ancestor to match with `bpf_get_current_ancestor_cgroup_id()` (tracing programs 5.14+);
    /// 0: match the task's own cgroup id (`bpf_get_current_cgroup_id()`, 4.18+), the map then
    /// holding every descendant too (`u32`).
    pub const GLOBAL_CGROUP_LEVELS: &str = "CGROUP_LEVELS";
    /// Global: ownership tracking and latency histograms on (1) or off (0), `u32`.
    pub const GLOBAL_TRACK_BLAME: &str = "TRACK_BLAME";
    /// Global: failure events each CPU may stream per second (`u32`; 0: no limit). Beyond it a
    /// storm's failures are counted exactly and tallied, not streamed one by one.
    pub const GLOBAL_EVENTS_PER_CPU: &str = "EVENTS_PER_CPU";
    /// Global: which failure kinds the syscall tracepoints report (`KIND_*` bits, `u32`).
    pub const GLOBAL_SYSCALL_KINDS: &str = "SYSCALL_KINDS";
    /// Global: call-site stacks walked and counted (1) or not (0), `u32`.
    pub const GLOBAL_CALL_SITES: &str = "CALL_SITES";
    /// Global: the kernel struct offsets of [`super::Offsets`], one `u32` global each, named
    /// `OFF_<FIELD>` (see `Offsets::GLOBALS`), and whether each group is valid.
    pub const GLOBAL_HAVE_TASK_OFFSETS: &str = "HAVE_TASK_OFFSETS";
    pub const GLOBAL_HAVE_SOCK_OFFSETS: &str = "HAVE_SOCK_OFFSETS";
}

/// Filter bits in the `FILTER_FLAGS` global: a set bit means the matching map is a whitelist.
pub const FILTER_PID: u32 = 1;
pub const FILTER_COMM: u32 = 2;
pub const FILTER_DPORT: u32 = 4;
/// The task is in one of `FILTER_CGROUPS`'s cgroups or below one (`--cgroup`, `--container`).
pub const FILTER_CGROUP: u32 = 8;
/// Deepest cgroup v2 level `--cgroup` can name in ancestor mode (bits of `CGROUP_LEVELS`).
pub const MAX_CGROUP_FILTER_LEVEL: u32 = 31;

/// Indices into the per-CPU `STATS` array.
pub mod stat {
    /// Every exhaustion failure that passed the filters (exact).
    pub const FAILURES: u32 = 0;
    /// Events that could not be reserved in the ring buffer (the counts still saw them).
    pub const RINGBUF_DROPS: u32 = 1;
    /// Failures whose (pid, destination, errno, cause) key did not fit into `COUNTS`.
    pub const COUNT_MAP_FULL: u32 = 2;
    /// New keys inserted into / removed from `OWNERS` by the kernel. With the number of
    /// entries and user-space deletions they give the LRU evictions.
    pub const OWNER_INSERTS: u32 = 3;
    pub const OWNER_DELETES: u32 = 4;
    /// The same for `PENDING` (connects between SYN_SENT and their outcome).
    pub const PENDING_INSERTS: u32 = 5;
    pub const PENDING_DELETES: u32 = 6;
    /// A kernel read through a BTF offset failed (the offsets do not fit this kernel).
    pub const READ_ERRORS: u32 = 7;
    /// Failures over the per-second event budget: counted, not streamed.
    pub const SUPPRESSED: u32 = 8;
    /// User-space stacks walked for call sites, and walks that found no stack (a kernel
    /// thread, or a full or colliding stack map).
    pub const STACK_WALKS: u32 = 9;
    pub const STACK_WALK_ERRORS: u32 = 10;
    pub const LEN: u32 = 11;
}
