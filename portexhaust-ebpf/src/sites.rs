//! Call sites: which user-space code made the connects that failed and the ones that hold the
//! ports. Counted per (pid, user stack, destination) in `SITES`, from `inet_sock_set_state`
//! (state.rs) in the connecting task: CLOSE -> SYN_SENT (a connect reached port selection) and
//! the port-selection failure SYN_SENT -> CLOSE inside the same connect().
//!
//! A user stack walk (`bpf_get_stackid(BPF_F_USER_STACK)`, frame pointers, 4.6+; allowed in
//! tp_btf, raw_tp and perf tracepoint programs) costs about as much as the rest of a failing
//! connect's tracing, so it is rate-limited: each CPU walks the first `WALKS_PER_JIFFY`
//! connects of each jiffy (a few thousand a second at most), and a failure inside a walked
//! connect reuses its walk. Beyond the budget, connects and failures count to the call site
//! last walked for the same thread and destination on this CPU (the loop that leaks
//! connections calls connect() from one place), and the others to `STACK_NOT_WALKED`, so the
//! per-(process, destination) totals stay exact and only the split between call sites is
//! sampled. The memo of the current run is added to `SITES` when the CPU moves on, and read
//! by user space meanwhile, as `CONN_MEMO` is.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_jiffies64},
    programs::tracing::StackIdContext,
};
use portexhaust_common::{
    COMM_LEN, FILTER_COMM, SITE_EVENT_MAGIC, STACK_NOT_WALKED, SiteEvent, SiteKey, SiteRef,
    SiteValue, TupleKey, stat,
};

use crate::{
    addr::{self, Addr, bytes},
    emit::{atomic_add, bump, passes_filters},
    globals,
    maps::{EVENTS, SITE_MEMO, SITES, SOCK_SITES, STACKS},
};

/// Stack walks one CPU may make per jiffy (250..1000 a second at HZ 250..1000): at ~1 us
/// each, at most 0.1-0.4% of the CPU.
const WALKS_PER_JIFFY: u32 = 4;

/// `BPF_F_USER_STACK`: walk the task's user stack, not the kernel's.
const BPF_F_USER_STACK: u64 = 1 << 8;

/// What one hook adds to the current call site.
#[derive(Clone, Copy)]
pub struct Add {
    pub connects: u64,
    pub bound: u64,
    pub failures: u64,
}

/// Count `add` to the call site of the current task's connect to (family, dport, daddr).
/// The key's namespace is left 0: a process connects from one namespace (user space names
/// it), and reading the socket's on every connect would cost the hot path two loads, or two
/// helper calls without BTF. Returns the site, packed (`pid << 32 | stack id`), when this call walked the
/// stack, so that the caller can carry it to the socket (holders, see state.rs), else 0.
/// A plain word rather than an `Option`: the verifier refuses the shifts the compiler makes
/// of an `Option` that shares a register with a pointer on the other path.
#[inline(always)]
pub fn note<C: StackIdContext>(ctx: &C, family: u16, dport: u16, daddr: Addr, add: Add) -> u64 {
    let id = bpf_get_current_pid_tgid();
    let pid = (id >> 32) as u32;
    let tid = id as u32;
    // `trace --pid/--comm/--dport` narrow the call sites as they narrow the failures (a
    // filtered run pays these lookups per connect; an unfiltered one, whose flags the
    // verifier knows are 0, nothing).
    let flags = globals::filter_flags();
    if flags != 0 {
        let comm = if flags & FILTER_COMM != 0 {
            bpf_get_current_comm().unwrap_or([0u8; COMM_LEN])
        } else {
            [0u8; COMM_LEN]
        };
        if !passes_filters(pid, &comm, dport) {
            return 0;
        }
    }
    let Some(m) = SITE_MEMO.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: helper without arguments (5.5+): a plain read of jiffies.
    let j = unsafe { bpf_jiffies64() };
    // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile. Compared field by
    // field (words for the address: byte-array comparisons become calls in BPF code).
    unsafe {
        let same = (*m).tid == tid
            && (*m).key.pid == pid
            && (*m).key.family == family
            && (*m).key.dport == dport
            && addr::words(&(*m).key.daddr) == daddr;
        // A failure right after its own connect's walk (same thread, destination and
        // jiffy) is that connect's call site: no second walk.
        if same && (*m).jiffy == j && add.connects == 0 {
            (*m).pending.failures += add.failures;
            return 0;
        }
        if (*m).budget_jiffy != j {
            (*m).budget_jiffy = j;
            (*m).walks = 0;
        }
        if (*m).walks >= WALKS_PER_JIFFY && same {
            // Over the budget: the thread's last walked call site to this destination.
            (*m).pending.connects += add.connects;
            (*m).pending.bound += add.bound;
            (*m).pending.failures += add.failures;
            return 0;
        }
        let mut stack_id = STACK_NOT_WALKED;
        if (*m).walks < WALKS_PER_JIFFY {
            (*m).walks += 1;
            bump(stat::STACK_WALKS);
            match ctx.get_stackid(&STACKS, BPF_F_USER_STACK) {
                Ok(s) => stack_id = s as u32,
                Err(_) => bump(stat::STACK_WALK_ERRORS),
            }
        }
        let walked = u64::from(stack_id != STACK_NOT_WALKED) * add.connects;
        if same && stack_id == (*m).key.stack_id {
            // The same call site again (a loop): nothing to flush.
            (*m).jiffy = j;
            (*m).pending.connects += add.connects;
            (*m).pending.bound += add.bound;
            (*m).pending.failures += add.failures;
            (*m).pending.walked += walked;
            return if stack_id == STACK_NOT_WALKED {
                0
            } else {
                (id & 0xffff_ffff_0000_0000) | u64::from(stack_id)
            };
        }
        flush(m);
        let prev = ((*m).key.pid, (*m).key.stack_id);
        (*m).key = SiteKey {
            pid,
            stack_id,
            netns: 0,
            family,
            dport,
            daddr: bytes(daddr),
        };
        (*m).tid = tid;
        (*m).jiffy = j;
        (*m).pending = SiteValue {
            connects: add.connects,
            bound: add.bound,
            failures: add.failures,
            walked,
        };
        if stack_id == STACK_NOT_WALKED {
            return 0;
        }
        if prev != (pid, stack_id) {
            announce(pid, stack_id);
        }
        (id & 0xffff_ffff_0000_0000) | u64::from(stack_id)
    }
}

/// Add the memo's pending counts to `SITES`.
///
/// # Safety
/// `m` is this CPU's `SITE_MEMO` slot.
#[inline(always)]
unsafe fn flush(m: *mut portexhaust_common::SiteMemo) {
    // SAFETY: the caller's slot.
    unsafe {
        let p = (*m).pending;
        if p.connects == 0 && p.failures == 0 {
            return;
        }
        site_add(&(*m).key, &p);
        (*m).pending = SiteValue::default();
    }
}

// Out of line: the key and value get their own stack frame.
#[inline(never)]
fn site_add(key: &SiteKey, v: &SiteValue) {
    if let Some(p) = SITES.get_ptr_mut(key) {
        // SAFETY: pointer into the map value; atomic adds because one site's counts are
        // flushed from several CPUs.
        unsafe {
            atomic_add(&raw mut (*p).connects, v.connects);
            atomic_add(&raw mut (*p).bound, v.bound);
            atomic_add(&raw mut (*p).failures, v.failures);
            atomic_add(&raw mut (*p).walked, v.walked);
        }
        return;
    }
    // BPF_NOEXIST: a CPU that inserted the key at the same moment wins; then add to it.
    if SITES.insert(key, v, 1).is_err()
        && let Some(p) = SITES.get_ptr_mut(key)
    {
        // SAFETY: as above.
        unsafe {
            atomic_add(&raw mut (*p).connects, v.connects);
            atomic_add(&raw mut (*p).bound, v.bound);
            atomic_add(&raw mut (*p).failures, v.failures);
            atomic_add(&raw mut (*p).walked, v.walked);
        }
    }
}

/// Tell user space about a stack it may not have symbolised yet, while the process lives.
/// Lost when the ring buffer is full: user space then symbolises at its next read of `SITES`.
#[inline(always)]
fn announce(pid: u32, stack_id: u32) {
    if let Some(mut e) = EVENTS.reserve::<SiteEvent>(0) {
        e.write(SiteEvent {
            pid,
            stack_id,
            magic: SITE_EVENT_MAGIC,
            _pad: 0,
        });
        e.submit(0);
    }
}

/// A walked connect became a connection: remember its call site by 4-tuple, for the holders.
#[inline(always)]
pub fn opened(key: &TupleKey, site: u64) {
    let r = SiteRef {
        pid: (site >> 32) as u32,
        stack_id: site as u32,
    };
    let _ = SOCK_SITES.insert(key, r, 0);
}
