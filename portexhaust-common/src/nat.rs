//! Source-NAT port exhaustion one hop away: what the `skb:kfree_skb` program sends and counts.
//!
//! When a masquerade/SNAT has no free source port for a new connection, `connect()` does not
//! fail. `get_unique_tuple()` (net/netfilter/nf_nat_core.c) gives up after a bounded search and
//! leaves a reply tuple that another connection already uses; `__nf_conntrack_confirm()`
//! (nf_conntrack_core.c) then finds the clash, `nf_ct_resolve_clash()` cannot resolve it for
//! TCP (no `allow_clash`), counts `drop` and `insert_failed` and returns NF_DROP, and
//! `nf_hook_slow()` frees the SYN with `SKB_DROP_REASON_NETFILTER_DROP`. The program sees that
//! free, with the never-inserted conntrack entry still attached to the packet (`skb->_nfct`).

/// `NatEvent::magic`: guards the size-based dispatch of ring-buffer records.
pub const NAT_EVENT_MAGIC: u32 = 0x4e41_5431;

/// `NatEvent::flags`: the entry had `IPS_CONFIRMED` set when it was dropped (kernels 6.2 to
/// about 6.15 set it before the clash check and do not clear it on the clash path).
pub const NAT_CONFIRMED_BIT_SET: u8 = 1;

/// One packet dropped by netfilter whose conntrack entry was source-NATed and never made it
/// into the conntrack table. Told from the other ring-buffer records by its size and magic.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Network namespace of the conntrack entry (`ct->ct_net`): the NAT's, the router.
    pub netns: u32,
    pub magic: u32,
    /// Original direction, before NAT: the client's source and the destination it asked for.
    /// IPv4 in the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The NAT's choice: the reply tuple's destination (the masquerade address and port).
    pub nat_addr: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub nat_port: u16,
    /// `AF_INET` or `AF_INET6` (the tuple's `l3num`).
    pub family: u16,
    /// `IPPROTO_TCP` / `IPPROTO_UDP` (the tuple's `protonum`).
    pub proto: u8,
    pub flags: u8,
    pub _pad: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<NatEvent>() == 80);

/// Key of the exact NAT drop counts: per NAT namespace, destination and NAT address.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatKey {
    pub netns: u32,
    pub family: u16,
    pub dport: u16,
    pub proto: u8,
    /// Explicit padding: keys are hashed as raw bytes.
    pub _pad: [u8; 7],
    pub daddr: [u8; 16],
    pub nat_addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<NatKey>() == 48);

/// Offsets the program reads the drop with, resolved from the kernel's BTF. The layout of
/// `struct nf_conntrack_tuple` itself (40 bytes: src.u3@0 src.u@16 src.l3num@18 dst.u3@20
/// dst.u@36 dst.protonum@38) is fixed in the program and checked against BTF by the loader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatOffsets {
    /// `enum skb_drop_reason` value of `SKB_DROP_REASON_NETFILTER_DROP` (12 on 6.18).
    pub reason_netfilter_drop: u32,
    /// `sk_buff._nfct`.
    pub skb_nfct: u32,
    /// `nf_conn.status`, `nf_conn.ct_net.net`, `nf_conn.tuplehash`.
    pub ct_status: u32,
    pub ct_net: u32,
    pub ct_tuplehash: u32,
    /// `sizeof(struct nf_conntrack_tuple_hash)` and its `tuple` member.
    pub tuplehash_size: u32,
    pub tuplehash_tuple: u32,
    /// `net.ns.inum`.
    pub net_ns_inum: u32,
}

impl NatOffsets {
    /// Global names, in field order (see [`NatOffsets::values`]).
    pub const GLOBALS: [&'static str; 8] = [
        "NAT_REASON",
        "NAT_OFF_SKB_NFCT",
        "NAT_OFF_CT_STATUS",
        "NAT_OFF_CT_NET",
        "NAT_OFF_CT_TUPLEHASH",
        "NAT_TUPLEHASH_SIZE",
        "NAT_OFF_TUPLEHASH_TUPLE",
        "NAT_OFF_NET_INUM",
    ];

    pub const fn values(&self) -> [u32; 8] {
        [
            self.reason_netfilter_drop,
            self.skb_nfct,
            self.ct_status,
            self.ct_net,
            self.ct_tuplehash,
            self.tuplehash_size,
            self.tuplehash_tuple,
            self.net_ns_inum,
        ]
    }
}

/// Byte layout of `struct nf_conntrack_tuple` the program assumes (every kernel since 2.6).
pub mod tuple {
    pub const SIZE: u32 = 40;
    pub const SRC_U3: u32 = 0;
    pub const SRC_PORT: u32 = 16;
    pub const SRC_L3NUM: u32 = 18;
    pub const DST_U3: u32 = 20;
    pub const DST_PORT: u32 = 36;
    pub const DST_PROTONUM: u32 = 38;
}

/// `enum ip_conntrack_status` bits (include/uapi/linux/netfilter/nf_conntrack_common.h).
pub const IPS_CONFIRMED: u64 = 1 << 3;
pub const IPS_SRC_NAT: u64 = 1 << 4;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays only, padding spelled out.
    unsafe impl aya::Pod for super::NatEvent {}
    unsafe impl aya::Pod for super::NatKey {}
}
