//! Counting a failure exactly and streaming its event: the one path every hook reports through.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_ktime_get_ns},
};
use portexhaust_common::{
    COMM_LEN, Cause, CountKey, CountValue, FILTER_CGROUP, FILTER_COMM, FILTER_DPORT, FILTER_PID,
    FailureEvent, MAX_CGROUP_FILTER_LEVEL, Site, stat,
};

use crate::{
    addr::{Addr, bytes},
    cold, globals,
    maps::{
        BUDGET, COUNTS, EVENTS, FILTER_CGROUPS, FILTER_COMMS, FILTER_DPORTS, FILTER_PIDS,
        LAST_WAKEUP, STATS,
    },
};

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Add one to a u64 in a map value shared between CPUs.
///
/// # Safety
/// `p` must point into a live map value.
#[inline(always)]
pub unsafe fn atomic_add(p: *mut u64, v: u64) {
    // atomic_xadd lowers to BPF_XADD (lock add), which every kernel since 4.x accepts; the BPF
    // target has no compare-and-swap, so core's AtomicU64 is not offered.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Count one occurrence in the per-CPU `STATS` array.
#[inline(always)]
pub fn bump(index: u32) {
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
/// a storm that cost more than the failing connect() itself (measured by `cargo xtask bench`).
/// So the first event after a quiet spell still wakes the reader at once, and after that each
/// CPU asks for at most one wakeup per 10 ms; the reader also drains on a timer, so an event
/// submitted without a wakeup waits at most that long.
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

#[inline(always)]
pub fn passes_filters(pid: u32, comm: &[u8; COMM_LEN], dport: u16) -> bool {
    let flags = globals::filter_flags();
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
    if flags & FILTER_CGROUP != 0 && !in_filtered_cgroup() {
        return false;
    }
    true
}

/// Whether the current task is in a `--cgroup`/`--container` subtree. Every caller runs in the
/// connecting (or binding) task's context, so the current task's cgroup is the socket's.
#[inline(always)]
fn in_filtered_cgroup() -> bool {
    let levels = globals::cgroup_levels();
    if levels == 0 {
        // SAFETY: no arguments; allowed in every tracing program type since 4.18.
        let id = unsafe { bpf_get_current_cgroup_id() };
        return FILTER_CGROUPS.get_ptr(id).is_some();
    }
    let mut level: u32 = 0;
    while level <= MAX_CGROUP_FILTER_LEVEL {
        if levels & (1 << level) != 0 {
            // SAFETY: any level is valid; beyond the task's own depth it returns 0, which
            // is never a cgroup id.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if FILTER_CGROUPS.get_ptr(id).is_some() {
                return true;
            }
        }
        level += 1;
    }
    false
}

/// What a hook knows about a failure.
pub struct Failure {
    /// Network namespace (0 when unknown), read once by the caller.
    pub netns: u32,
    pub errno: u32,
    pub site: Site,
    pub cause: Cause,
    pub proto: u8,
    pub family: u16,
    pub dport: u16,
    pub daddr: Addr,
    pub saddr: Addr,
    /// `EVENT_*` flags.
    pub flags: u8,
}

/// Over the budget, the clock is read once per this many failures.
const CLOCK_EVERY: u64 = 64;

/// Whether this CPU may stream one more event in the current second, and the time to count
/// the failure at. Over the budget a storm's failures are still counted exactly (and tallied
/// by user space from `unstreamed`), but skip the ring buffer, the event's helpers, the
/// reader's formatting, and all but one clock read in 64 (a TSC read under virtualisation
/// costs more than the rest of a suppressed failure's accounting): their count's last time
/// lags by at most 63 failures, and the budget's second by as many.
#[inline(always)]
fn budget() -> (bool, u64) {
    let budget = globals::events_per_cpu();
    if budget == 0 {
        return (true, now_ns());
    }
    let Some(b) = BUDGET.get_ptr_mut(0) else {
        return (true, now_ns());
    };
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    unsafe {
        if (*b)[1] < budget {
            let now = now_ns();
            if now.wrapping_sub((*b)[0]) >= 1_000_000_000 {
                (*b)[0] = now;
                (*b)[1] = 0;
            }
            (*b)[1] += 1;
            (*b)[3] = now;
            return (true, now);
        }
        (*b)[2] += 1;
        if (*b)[2] % CLOCK_EVERY == 0 {
            let now = now_ns();
            (*b)[3] = now;
            if now.wrapping_sub((*b)[0]) >= 1_000_000_000 {
                (*b)[0] = now;
                (*b)[1] = 1;
                return (true, now);
            }
        }
        (false, (*b)[3])
    }
}

/// Count a failure exactly and send its event. Failures are rare compared with connect() calls,
/// so everything costly (comm, cgroup, map updates) happens here and not on the entry path.
/// Always runs in the failing task's context, so `current` is the process to blame.
// Out of line: one copy of the reporting path, with its own BPF stack frame.
#[inline(never)]
pub fn report(f: &Failure) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    // The command only where something needs it: a comm filter, a new count key, an event.
    let comm_filter = globals::filter_flags() & FILTER_COMM != 0;
    let mut comm = [0u8; COMM_LEN];
    let mut have_comm = comm_filter;
    if comm_filter {
        comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
    }
    if !passes_filters(pid, &comm, f.dport) {
        return;
    }
    bump(stat::FAILURES);
    let (streamed, now) = budget();

    let key = CountKey {
        pid,
        dport: f.dport,
        family: f.family,
        errno: f.errno as u16,
        proto: f.proto,
        cause: f.cause as u8,
        _pad: [0; 4],
        daddr: bytes(f.daddr),
    };
    let unstreamed = u64::from(!streamed);
    match COUNTS.get_ptr_mut(key) {
        // SAFETY (both arms): `v` points into the map value; counts are updated atomically
        // because several CPUs may fail towards the same key at once.
        Some(v) => unsafe { count_into(v, now, unstreamed) },
        None => {
            if !have_comm {
                comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
                have_comm = true;
            }
            let fresh = CountValue {
                count: 1,
                first_ns: now,
                last_ns: now,
                comm,
                unstreamed,
            };
            // BPF_NOEXIST: if another CPU inserted the key meanwhile, add to its value instead.
            if COUNTS.insert(key, fresh, 1).is_err() {
                match COUNTS.get_ptr_mut(key) {
                    Some(v) => unsafe { count_into(v, now, unstreamed) },
                    None => {
                        cold::count_map_full(pid, u32::from(f.dport));
                    }
                }
            }
        }
    }
    if !streamed {
        bump(stat::SUPPRESSED);
        return;
    }
    if !have_comm {
        comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
    }
    // Reserve, write and submit with nothing in between: verifiers before 6.3 lose track of a
    // reservation held across other code and refuse the program.
    match EVENTS.reserve::<FailureEvent>(0) {
        Some(mut e) => {
            e.write(FailureEvent {
                ts_ns: now,
                // SAFETY: helper without arguments, available to tracing programs since 4.18.
                cgroup_id: unsafe { bpf_get_current_cgroup_id() },
                pid,
                tid: pid_tgid as u32,
                uid: bpf_get_current_uid_gid() as u32,
                errno: f.errno,
                daddr: bytes(f.daddr),
                saddr: bytes(f.saddr),
                dport: f.dport,
                family: f.family,
                proto: f.proto,
                site: f.site as u8,
                backend: globals::backend() as u8,
                flags: f.flags,
                comm,
                netns: f.netns,
                cause: f.cause as u8,
                _pad: [0; 3],
            });
            e.submit(wakeup_flags(now));
        }
        None => {
            // A full ring buffer: counted as not streamed, so that user space tallies it.
            bump(stat::RINGBUF_DROPS);
            if let Some(v) = COUNTS.get_ptr_mut(key) {
                // SAFETY: as above.
                unsafe { atomic_add(&raw mut (*v).unstreamed, 1) };
            }
        }
    }
}

/// One more failure in an existing count.
///
/// # Safety
/// `v` must point into a live `COUNTS` value.
#[inline(always)]
unsafe fn count_into(v: *mut CountValue, now: u64, unstreamed: u64) {
    unsafe {
        atomic_add(&raw mut (*v).count, 1);
        if unstreamed != 0 {
            atomic_add(&raw mut (*v).unstreamed, 1);
        }
        (*v).last_ns = now;
    }
}
