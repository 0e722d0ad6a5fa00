//! `skb:kfree_skb`: packets a source NAT dropped because it had no free port (issue 15).
//!
//! A masquerade/SNAT with no free source port does not fail `connect()`. The NAT's search
//! (`get_unique_tuple()` -> `nf_nat_l4proto_unique_tuple()`, net/netfilter/nf_nat_core.c) gives
//! up after a bounded number of tries and leaves a reply tuple that a tracked connection already
//! uses; `__nf_conntrack_confirm()` (nf_conntrack_core.c, at the last POSTROUTING hook) finds
//! that tuple taken, `nf_ct_resolve_clash()` cannot resolve a TCP clash (no `allow_clash`), so
//! it counts `drop` and `insert_failed` and returns NF_DROP; `nf_hook_slow()` frees the packet
//! with `kfree_skb_reason(skb, SKB_DROP_REASON_NETFILTER_DROP)`. The conntrack entry is still
//! attached (`skb->_nfct`) when the tracepoint fires: it is put only later, in
//! `skb_release_head_state()`.
//!
//! A firewall `drop` verdict takes the same `nf_hook_slow()` path with the same reason. What
//! tells the two apart, cheapest test first:
//! 1. the reason (one register compare: every other drop of the machine stops here);
//! 2. a conntrack entry on the packet at all;
//! 3. `IPS_SRC_NAT` in its status: a source NAT rewrote this connection. NAT runs at
//!    POSTROUTING (srcnat, priority 100), after the filter hooks of FORWARD/OUTPUT, so a rule
//!    dropping a new connection there sees no `IPS_SRC_NAT` yet;
//! 4. the entry was never inserted into the conntrack table: the ORIGINAL direction's
//!    `hnnode.pprev` is NULL (set so by `__nf_conntrack_alloc()`; 6.0+ keep no unconfirmed
//!    list), or `IPS_CONFIRMED` is clear (5.10-5.19, whose per-CPU unconfirmed and dying lists
//!    use that node). 6.2-6.15 set `IPS_CONFIRMED` before the clash check and do not clear it on
//!    the clash path, hence the node test. A drop rule hitting a packet of an established,
//!    confirmed connection fails this test.
//!
//! What remains indistinguishable here: a drop rule placed *after* srcnat in POSTROUTING
//! (priority > 100) dropping the first packet of a new SNAT'd connection. User space checks
//! every event against the NAT's conntrack table (the reply tuple must be taken by another
//! entry for a clash) and against the namespace's `insert_failed` counter.
//!
//! Cost: the program runs on every freed-as-dropped packet of the machine (not on consumed
//! ones: `consume_skb` has its own tracepoint), which is why it is attached only on request
//! (`--catch nat`); non-netfilter drops return after one compare, no memory read.
use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, kprobe, kretprobe, map},
    maps::{HashMap, PerCpuArray},
    programs::{BtfTracePointContext, ProbeContext, RetProbeContext},
};
use portexhaust_common::{
    AF_INET, AF_INET6, NAT_EVENT_MAGIC, NatEvent, NatKey,
    nat::{IPS_CONFIRMED, IPS_SRC_NAT, NAT_CONFIRMED_BIT_SET},
};

use crate::{
    addr::{Addr, bytes},
    emit::{atomic_add, now_ns},
    globals,
    maps::EVENTS,
};

// Offsets from the kernel's BTF (`portexhaust_common::NatOffsets`), set by the loader.
#[unsafe(no_mangle)]
static NAT_REASON: u32 = u32::MAX;
#[unsafe(no_mangle)]
static NAT_OFF_SKB_NFCT: u32 = 0;
#[unsafe(no_mangle)]
static NAT_OFF_CT_STATUS: u32 = 0;
#[unsafe(no_mangle)]
static NAT_OFF_CT_NET: u32 = 0;
#[unsafe(no_mangle)]
static NAT_OFF_CT_TUPLEHASH: u32 = 0;
#[unsafe(no_mangle)]
static NAT_TUPLEHASH_SIZE: u32 = 0;
#[unsafe(no_mangle)]
static NAT_OFF_TUPLEHASH_TUPLE: u32 = 0;
#[unsafe(no_mangle)]
static NAT_OFF_NET_INUM: u32 = 0;

#[inline(always)]
fn get(v: &'static u32) -> u32 {
    // SAFETY: a global in .rodata, rewritten by the loader; volatile keeps the default from
    // being folded in.
    unsafe { core::ptr::read_volatile(v) }
}

/// Exact drops per (NAT namespace, destination, NAT address).
#[map]
pub static NAT_COUNTS: HashMap<NatKey, u64> = HashMap::with_max_entries(4096, 0);

/// Per CPU: [drops seen, drops not streamed (over the event budget or a full ring buffer),
/// drops whose key did not fit in `NAT_COUNTS`, budget window start, events in the window,
/// confirm calls the kprobe pair could not match to their entry (nested deeper than
/// `CONFIRM_DEPTH`, or a stale entry cleared)].
#[map]
pub static NAT_STATS: PerCpuArray<[u64; 6]> = PerCpuArray::with_max_entries(1, 0);

/// `_nfct` holds the `nf_conn` pointer with `enum ip_conntrack_info` in its low 3 bits
/// (`NFCT_INFOMASK`, include/linux/skbuff.h).
const NFCT_PTRMASK: u64 = !7;

/// tp_btf (5.17+ for the reason argument): `btf_trace_kfree_skb(void *, struct sk_buff *skb,
/// void *location, enum skb_drop_reason reason[, struct sock *rx_sk (6.12+)])`.
#[btf_tracepoint(function = "kfree_skb")]
pub fn tp_btf_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    // 1. The reason first: every other drop of the machine costs this compare only.
    if ctx.arg::<u64>(2) as u32 != get(&NAT_REASON) {
        return 0;
    }
    let skb: *const u8 = ctx.arg(0);
    // SAFETY: `skb` is BTF-typed (tp_btf): the verifier checks this load against
    // `struct sk_buff` (the offset is a constant of frozen .rodata) and makes it fault-safe.
    let nfct =
        unsafe { core::ptr::read_volatile(skb.add(get(&NAT_OFF_SKB_NFCT) as usize) as *const u64) };
    on_netfilter_drop(nfct);
    0
}

// ---- kprobe + kretprobe on `__nf_conntrack_confirm` (where kfree_skb has no reason) ----
//
// `int __nf_conntrack_confirm(struct sk_buff *skb)` (net/netfilter/nf_conntrack_core.c, in the
// nf_conntrack module on Debian; same signature 5.10 - 6.18) is called by
// `nf_conntrack_confirm()` for an entry not yet confirmed, at the last POSTROUTING/INPUT hook:
// once per new connection, not per packet. It returns NF_DROP (0) on: the clash its
// `hlist_nulls_for_each_entry` lookups find, when `nf_ct_resolve_clash()` cannot resolve it
// (always for TCP: counts `drop` and `insert_failed`; this is NAT exhaustion); a dying entry
// (counts `insert_failed`); on 6.1 also a too-long hash chain (`chaintoolong`, counts
// `insert_failed`) or an extension area gone invalid (`nf_ct_ext_valid_pre`: `insert_failed`;
// `_post`: after the insert, `drop`); and an entry already confirmed (a WARN, no count).
// The same `IPS_SRC_NAT` and never-inserted tests as on kfree_skb then keep the NAT clashes:
// `_post` and the already-confirmed case concern entries in the table. Unlike kfree_skb, a
// firewall drop never gets here: the verdict of a rule is not confirm's return value.
//
// A kretprobe sees only the return value, so the entry probe saves `skb` per CPU. A softirq
// can run a forwarded packet's confirm on a CPU whose task is inside its own confirm, before
// that one's `local_bh_disable()`: calls nest, and return in LIFO order, hence a small stack
// rather than one slot. (BPF kprobe programs do not nest on one CPU: when one is running, an
// interrupt's confirm skips both its entry and its return, so the stack stays balanced.)

/// Nesting depth kept per CPU: process context plus one softirq is 2 in practice.
const CONFIRM_DEPTH: usize = 4;

/// An entry older than this cannot be a live call (confirm holds no sleeping lock): its return
/// was missed (kretprobe instances exhausted) and it is cleared rather than matched.
const CONFIRM_STALE_NS: u64 = 1_000_000_000;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConfirmSlot {
    skb: u64,
    /// `skb->_nfct` at entry: the return checks it is still the same packet's entry.
    nfct: u64,
    ts: u64,
}

#[repr(C)]
pub struct ConfirmStack {
    /// Calls entered and not yet returned, including those deeper than `CONFIRM_DEPTH`.
    depth: u64,
    slots: [ConfirmSlot; CONFIRM_DEPTH],
}

#[map]
pub static NAT_CONFIRM_STACK: PerCpuArray<ConfirmStack> = PerCpuArray::with_max_entries(1, 0);

/// `i` as a slot index, bounds-checked on a value the compiler cannot relate to others: left
/// to itself, LLVM checks `depth - 1 < 4` and then indexes with `depth` and a folded offset,
/// which the verifier cannot follow ("math between map_value pointer and register with
/// unbounded min value").
#[inline(always)]
fn slot(st: *mut ConfirmStack, i: u64) -> Option<*mut ConfirmSlot> {
    // SAFETY: a read of a local.
    let i = unsafe { core::ptr::read_volatile(&i) } as usize;
    if i >= CONFIRM_DEPTH {
        return None;
    }
    // SAFETY: `st` is this CPU's map value; `i` is in range.
    unsafe { (*st).slots.get_mut(i).map(|s| s as *mut ConfirmSlot) }
}

#[inline(always)]
fn read_nfct(skb: u64) -> u64 {
    // SAFETY: bpf_probe_read_kernel fails cleanly on a bad address.
    unsafe {
        bpf_probe_read_kernel((skb as *const u8).add(get(&NAT_OFF_SKB_NFCT) as usize) as *const u64)
    }
    .unwrap_or(0)
}

#[kprobe]
pub fn kprobe_nf_conntrack_confirm(ctx: ProbeContext) -> u32 {
    let Some(skb) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let Some(st) = NAT_CONFIRM_STACK.get_ptr_mut(0) else {
        return 0;
    };
    let now = now_ns();
    // SAFETY (the derefs of `st` and its slots): this CPU's map value; BPF kprobe programs do
    // not nest on one CPU.
    let mut d = unsafe { (*st).depth };
    if d > 0
        && let Some(top) = slot(st, d - 1)
        && now.wrapping_sub(unsafe { (*top).ts }) > CONFIRM_STALE_NS
    {
        stat_add(5, d);
        d = 0;
    }
    match slot(st, d) {
        Some(s) => unsafe {
            (*s).skb = skb;
            (*s).nfct = read_nfct(skb);
            (*s).ts = now;
        },
        // Deeper than kept: counted, and its return is only popped.
        None => stat_add(5, 1),
    }
    unsafe { (*st).depth = d + 1 };
    0
}

#[kretprobe]
pub fn kretprobe_nf_conntrack_confirm(ctx: RetProbeContext) -> u32 {
    // NF_DROP is 0 (include/uapi/linux/netfilter.h); the C int in the return register.
    let verdict = ctx.ret::<u64>() as u32;
    let Some(st) = NAT_CONFIRM_STACK.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY (the derefs): this CPU's map value.
    let d = unsafe { (*st).depth };
    if d == 0 {
        return 0; // its entry was cleared as stale, or came before we attached
    }
    unsafe { (*st).depth = d - 1 };
    let Some(s) = slot(st, d - 1) else {
        return 0; // one of the calls nested too deep
    };
    if verdict != 0 {
        return 0;
    }
    let (skb, nfct) = unsafe { ((*s).skb, (*s).nfct) };
    // Still the packet that entered: a mismatched pop (a return missed) fails this.
    let now_nfct = read_nfct(skb);
    if now_nfct != nfct {
        stat_add(5, 1);
        return 0;
    }
    on_netfilter_drop(now_nfct);
    0
}

/// A packet netfilter dropped (kfree_skb) or refused to confirm (the kretprobe), with its
/// `skb->_nfct`: keep it if it is a source-NAT clash; count it and stream it. Both NAT hooks
/// share this path: one key, one event, one budget.
// Out of line: the rare path gets its own stack frame.
#[inline(never)]
fn on_netfilter_drop(nfct: u64) {
    let ct = nfct & NFCT_PTRMASK;
    if ct == 0 {
        return; // 2. no conntrack entry (or IP_CT_UNTRACKED)
    }
    let ct = ct as *const u8;
    // SAFETY (all probe reads): bpf_probe_read_kernel fails cleanly on a bad address.
    let Ok(status) =
        (unsafe { bpf_probe_read_kernel(ct.add(get(&NAT_OFF_CT_STATUS) as usize) as *const u64) })
    else {
        return;
    };
    if status & IPS_SRC_NAT == 0 {
        return; // 3. not source-NATed: a firewall drop
    }
    let orig = unsafe { ct.add(get(&NAT_OFF_CT_TUPLEHASH) as usize) };
    // hlist_nulls_node { next, pprev }: pprev is the second word.
    let Ok(pprev) = (unsafe { bpf_probe_read_kernel(orig.add(8) as *const u64) }) else {
        return;
    };
    let confirmed = status & IPS_CONFIRMED != 0;
    if pprev != 0 && confirmed {
        return; // 4. in the table: an established connection dropped by a rule
    }
    let tuple_off = get(&NAT_OFF_TUPLEHASH_TUPLE) as usize;
    let Ok(o) = (unsafe { bpf_probe_read_kernel(orig.add(tuple_off) as *const [u32; 10]) }) else {
        return;
    };
    let reply = unsafe { orig.add(get(&NAT_TUPLEHASH_SIZE) as usize + tuple_off) };
    let Ok(r) = (unsafe { bpf_probe_read_kernel(reply as *const [u32; 10]) }) else {
        return;
    };
    let netns =
        unsafe { bpf_probe_read_kernel(ct.add(get(&NAT_OFF_CT_NET) as usize) as *const u64) }
            .ok()
            .filter(|&n| n != 0)
            .and_then(|n| {
                unsafe {
                    bpf_probe_read_kernel(
                        (n as *const u8).add(get(&NAT_OFF_NET_INUM) as usize) as *const u32
                    )
                }
                .ok()
            })
            .unwrap_or(0);
    // struct nf_conntrack_tuple as [u32; 10]: src.u3 [0..4], src.u.all | src.l3num << 16 [4],
    // dst.u3 [5..9], dst.u.all | dst.protonum << 16 | dst.dir << 24 [9] (little-endian; the
    // ports are big-endian in memory).
    let family = (o[4] >> 16) as u16;
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let proto = (o[9] >> 16) as u8;
    let v4 = family == AF_INET;
    let key = NatKey {
        netns,
        family,
        dport: u16::from_be(o[9] as u16),
        proto,
        _pad: [0; 7],
        daddr: bytes(addr_of(&o, 5, v4)),
        // The reply tuple's destination is where the NAT rewrote the source to.
        nat_addr: bytes(addr_of(&r, 5, v4)),
    };
    count(&key);
    let stream = within_budget();
    if !stream {
        stat_add(1, 1);
        return;
    }
    let ev = NatEvent {
        ts_ns: now_ns(),
        netns,
        magic: NAT_EVENT_MAGIC,
        saddr: bytes(addr_of(&o, 0, v4)),
        daddr: key.daddr,
        nat_addr: key.nat_addr,
        sport: u16::from_be(o[4] as u16),
        dport: key.dport,
        nat_port: u16::from_be(r[9] as u16),
        family,
        proto,
        flags: if confirmed { NAT_CONFIRMED_BIT_SET } else { 0 },
        _pad: [0; 6],
    };
    if EVENTS.output::<NatEvent>(&ev, 0).is_err() {
        stat_add(1, 1);
    }
}

/// An address of a tuple read as `[u32; 10]`, from word `at`; IPv4 in the first four bytes.
#[inline(always)]
fn addr_of(t: &[u32; 10], at: usize, v4: bool) -> Addr {
    let w = |i: usize| u64::from(t.get(at + i).copied().unwrap_or(0));
    if v4 {
        return [w(0), 0];
    }
    [w(0) | w(1) << 32, w(2) | w(3) << 32]
}

#[inline(always)]
fn stat_add(index: usize, v: u64) {
    if let Some(s) = NAT_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe {
            if let Some(x) = (*s).get_mut(index) {
                *x += v;
            }
        }
    }
}

/// One more drop for `key`, exactly (several CPUs may drop towards one key at once).
#[inline(always)]
fn count(key: &NatKey) {
    stat_add(0, 1);
    if let Some(v) = NAT_COUNTS.get_ptr_mut(key) {
        // SAFETY: pointer into the map value.
        unsafe { atomic_add(v, 1) };
        return;
    }
    // BPF_NOEXIST: another CPU may have inserted it meanwhile; then add to its value.
    if NAT_COUNTS.insert(key, 1u64, 1).is_err() {
        match NAT_COUNTS.get_ptr_mut(key) {
            // SAFETY: as above.
            Some(v) => unsafe { atomic_add(v, 1) },
            None => stat_add(2, 1),
        }
    }
}

/// The same per-CPU event budget as the failure events (`--events-per-s`): beyond it a storm of
/// drops is counted exactly but not streamed.
#[inline(always)]
fn within_budget() -> bool {
    let budget = globals::events_per_cpu();
    if budget == 0 {
        return true;
    }
    let Some(s) = NAT_STATS.get_ptr_mut(0) else {
        return true;
    };
    let now = now_ns();
    // SAFETY: this CPU's slot.
    unsafe {
        if now.wrapping_sub((*s)[3]) >= 1_000_000_000 {
            (*s)[3] = now;
            (*s)[4] = 0;
        }
        if (*s)[4] >= budget {
            return false;
        }
        (*s)[4] += 1;
    }
    true
}
