//! Addresses inside the programs: two 64-bit words, in memory order.
//!
//! As `[u8; 16]`, LLVM's BPF backend splits an address into sixteen bytes and spills each one
//! to its own 8-byte stack slot, which blew the 512-byte stack of the state hook. Words stay
//! words; the 8-byte aligned wire types (portexhaust-common) take them as two stores.

pub type Addr = [u64; 2];

/// The wire form (`[u8; 16]`, IPv4 in the first four bytes).
#[inline(always)]
pub fn bytes(a: Addr) -> [u8; 16] {
    // SAFETY: both are 16 plain bytes; every bit pattern is valid for either.
    unsafe { core::mem::transmute::<Addr, [u8; 16]>(a) }
}

/// An IPv4 address as loaded from memory (a `__be32`), in the first four bytes.
#[inline(always)]
pub fn v4(word: u32) -> Addr {
    [word as u64, 0]
}

/// `::ffff:a.b.c.d`: bytes 10 and 11 are 0xff, the address in bytes 12..16.
#[inline(always)]
pub fn v4_mapped(a: Addr) -> Addr {
    [0, 0xffff_0000 | ((a[0] & 0xffff_ffff) << 32)]
}

/// 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104: a connect to these completes (or fails) inside
/// the connect() call, in the connecting task (loopback delivers in the sender's softirq, and
/// the handshake's reply waits in the socket's backlog until connect() releases it).
#[inline(always)]
pub fn is_loopback(family: u16, a: Addr) -> bool {
    if family == portexhaust_common::AF_INET {
        return a[0] & 0xff == 127;
    }
    // Memory order, little-endian words: ::1 is [0, 1 << 56]; ::ffff:127.x is
    // [0, 0xffff_0000 | 127 << 32 | ...].
    a[0] == 0 && (a[1] == 1 << 56 || a[1] & 0xff_ffff_ffff == 0x7f_ffff_0000)
}

#[inline(always)]
pub fn is_zero(a: Addr) -> bool {
    a[0] | a[1] == 0
}

/// From the wire form (the 8-byte aligned structs of portexhaust-common).
#[inline(always)]
pub fn words(b: &[u8; 16]) -> Addr {
    // SAFETY: as `bytes`.
    unsafe { core::mem::transmute::<[u8; 16], Addr>(*b) }
}
