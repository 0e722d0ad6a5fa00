//! Globals the loader sets before the object is loaded (`EbpfLoader::override_global`). They
//! live in `.rodata`, which the loader freezes: the verifier then knows their values, prunes
//! the branches they turn off, and accepts them as constant offsets into BTF-typed pointers.
use portexhaust_common::Backend;

/// Which backend this object was loaded for (a `Backend` code). Only the state backends report
/// TCP connect failures from `inet_sock_set_state`; the fentry/kprobe backends report them
/// from their function hooks, and reporting both would double every count.
#[unsafe(no_mangle)]
static BACKEND: u32 = Backend::TpBtf as u32;

/// Active filters (`FILTER_*` bits).
#[unsafe(no_mangle)]
static FILTER_FLAGS: u32 = 0;

/// `--cgroup`: bit i set when `FILTER_CGROUPS` holds a cgroup at level i, matched against the
/// task's ancestor at that level; 0 matches the task's own cgroup (the map then lists the whole
/// subtree). Frozen, so on kernels without the ancestor helper for tracing programs (before
/// 5.14, Namhyung Kim's "bpf: Allow bpf_get_current_ancestor_cgroup_id for tracing") that
/// branch is dead code the verifier never checks.
#[unsafe(no_mangle)]
static CGROUP_LEVELS: u32 = 0;

/// 0: skip socket-ownership tracking and the latency histograms (`trace --no-blame`).
#[unsafe(no_mangle)]
static TRACK_BLAME: u32 = 1;

/// Failure events each CPU may stream per second; 0: every one (see emit.rs).
#[unsafe(no_mangle)]
static EVENTS_PER_CPU: u32 = 0;

/// Which failure kinds the syscall tracepoints report (`KIND_*` bits); 0 when they are not
/// attached. `inet_sock_set_state` marks the in-flight connect() only when this is non-zero.
#[unsafe(no_mangle)]
static SYSCALL_KINDS: u32 = 0;

/// 1: count call sites and walk their user stacks (sites.rs); needs TRACK_BLAME.
#[unsafe(no_mangle)]
static CALL_SITES: u32 = 0;

/// Kernel struct offsets resolved from BTF (`portexhaust_common::Offsets`). With
/// HAVE_TASK_OFFSETS == 0 no task field is read; with HAVE_SOCK_OFFSETS == 0 no sock field is
/// read (the perf tracepoint's record still has the addresses and ports).
#[unsafe(no_mangle)]
static HAVE_TASK_OFFSETS: u32 = 0;
#[unsafe(no_mangle)]
static HAVE_SOCK_OFFSETS: u32 = 0;
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
#[unsafe(no_mangle)]
static OFF_SKC_DADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_RCV_SADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_DPORT: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_NUM: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_FAMILY: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_V6_DADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_V6_RCV_SADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_NET: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_PROTOCOL: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_ERR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_INET_SPORT: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TCP_WRITE_SEQ: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SOCKET_TYPE: u32 = 0;
#[unsafe(no_mangle)]
static OFF_NET_PORT_RANGE: u32 = 0;
/// 1: `net.ipv4.ip_local_ports.range` is one u32 (lo | hi << 16, 6.7+); 0: `int range[2]`.
#[unsafe(no_mangle)]
static PORT_RANGE_PACKED: u32 = 0;

#[inline(always)]
fn get(v: &'static u32) -> u32 {
    // SAFETY: reading a global the loader may have rewritten in .rodata; volatile stops the
    // compiler from folding the default value.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
pub fn backend() -> u32 {
    get(&BACKEND)
}

/// The state hook reports TCP connect failures itself (tp-btf, raw-tp, tracepoint).
#[inline(always)]
pub fn state_reports() -> bool {
    let b = backend();
    b == Backend::TpBtf as u32 || b == Backend::RawTp as u32 || b == Backend::Tracepoint as u32
}

#[inline(always)]
pub fn filter_flags() -> u32 {
    get(&FILTER_FLAGS)
}

#[inline(always)]
pub fn cgroup_levels() -> u32 {
    get(&CGROUP_LEVELS)
}

#[inline(always)]
pub fn blame() -> bool {
    get(&TRACK_BLAME) != 0
}

#[inline(always)]
pub fn events_per_cpu() -> u64 {
    u64::from(get(&EVENTS_PER_CPU))
}

#[inline(always)]
pub fn call_sites() -> bool {
    get(&CALL_SITES) != 0
}

#[inline(always)]
pub fn syscall_kinds() -> u32 {
    get(&SYSCALL_KINDS)
}

#[inline(always)]
pub fn have_task_offsets() -> bool {
    get(&HAVE_TASK_OFFSETS) != 0
}

#[inline(always)]
pub fn have_sock_offsets() -> bool {
    get(&HAVE_SOCK_OFFSETS) != 0
}

/// Offsets of the kernel fields the programs read (see `portexhaust_common::Offsets`).
pub mod off {
    use super::*;

    macro_rules! offsets {
        ($($f:ident => $g:ident),* $(,)?) => {
            $(
                #[inline(always)]
                pub fn $f() -> usize {
                    get(&$g) as usize
                }
            )*
        };
    }

    offsets! {
        task_nsproxy => OFF_TASK_NSPROXY,
        nsproxy_net => OFF_NSPROXY_NET,
        net_inum => OFF_NET_INUM,
        task_group_leader => OFF_TASK_GROUP_LEADER,
        task_start_time => OFF_TASK_START_TIME,
        skc_daddr => OFF_SKC_DADDR,
        skc_rcv_saddr => OFF_SKC_RCV_SADDR,
        skc_dport => OFF_SKC_DPORT,
        skc_num => OFF_SKC_NUM,
        skc_family => OFF_SKC_FAMILY,
        skc_v6_daddr => OFF_SKC_V6_DADDR,
        skc_v6_rcv_saddr => OFF_SKC_V6_RCV_SADDR,
        skc_net => OFF_SKC_NET,
        sk_protocol => OFF_SK_PROTOCOL,
        sk_err => OFF_SK_ERR,
        inet_sport => OFF_INET_SPORT,
        tcp_write_seq => OFF_TCP_WRITE_SEQ,
        socket_type => OFF_SOCKET_TYPE,
        net_port_range => OFF_NET_PORT_RANGE,
    }

    #[inline(always)]
    pub fn port_range_packed() -> bool {
        get(&PORT_RANGE_PACKED) != 0
    }
}
