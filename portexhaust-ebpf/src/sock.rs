//! Reading a `struct sock` through offsets resolved from the running kernel's BTF.
//!
//! Three readers, one per form of the `inet_sock_set_state` hook (and the function hooks):
//! - [`BtfSock`]: the pointer is BTF-typed (tp_btf, fentry/fexit arguments). Fields inside
//!   `struct sock` are plain loads, which the verifier checks against the kernel's BTF and
//!   turns into fault-safe PROBE_MEM loads: no helper call per field. Fields of `inet_sock` and
//!   `tcp_sock` lie beyond `struct sock`, so they are read through `bpf_skc_to_tcp_sock()`
//!   (5.9+), which returns a typed `tcp_sock` pointer.
//! - [`ProbeSock`]: an untyped address (raw tracepoint, kprobe arguments):
//!   `bpf_probe_read_kernel()` per field.
//! - The perf tracepoint's record already holds family, ports and addresses (its layout is
//!   stable from 5.10 to 7.2, see shared/kernel-formats); see `state.rs`.
use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_skc_to_tcp_sock};
use portexhaust_common::{AF_INET, IPPROTO_TCP};

use crate::{
    addr::{self, Addr},
    cold,
    globals::off,
};

/// Family, ports (host order) and addresses of a connection; IPv4 in the first 4 bytes.
#[derive(Clone, Copy)]
pub struct Conn {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: Addr,
    pub daddr: Addr,
}

/// What the state logic needs of a socket, whichever way it is read.
pub trait Sock {
    /// The kernel address of the socket (the `PENDING` key).
    fn addr(&self) -> u64;
    fn is_tcp(&self) -> bool;
    fn conn(&self) -> Option<Conn>;
    /// Family, destination port (host order) and address only (cheaper than `conn`).
    fn dest(&self) -> Option<(u16, u16, Addr)>;
    /// `inet_num`: the local port the socket holds (host order), 0 when it has none.
    fn num(&self) -> Option<u16>;
    /// `tcp_sock.write_seq`: 0 until tcp_v{4,6}_connect() got past port selection.
    fn write_seq(&self) -> Option<u32>;
    fn sk_err(&self) -> Option<i32>;
    /// Network namespace inode of the socket (`sk->__sk_common.skc_net.net->ns.inum`), 0 when
    /// unknown.
    fn netns(&self) -> u32;
    /// The socket's namespace's `ip_local_port_range` (`net->ipv4.ip_local_ports.range`).
    fn port_range(&self) -> Option<(u16, u16)>;
}

/// Low-level field access, implemented by the two pointer kinds.
pub trait Fields {
    fn base(&self) -> *const u8;
    /// A field of `struct sock` at `off`.
    fn field<T: Copy>(&self, off: usize) -> Option<T>;
    /// A field of `tcp_sock` (which begins with `inet_sock`, which begins with `sock`).
    fn tcp_field<T: Copy>(&self, off: usize) -> Option<T>;
    /// A field of the `struct net` a pointer field of the socket points to.
    fn net_field<T: Copy>(&self, ptr_off: usize, off: usize) -> Option<T>;
}

/// A BTF-typed `struct sock *` (see the module comment).
pub struct BtfSock(pub *const u8);

impl Fields for BtfSock {
    #[inline(always)]
    fn base(&self) -> *const u8 {
        self.0
    }

    #[inline(always)]
    fn field<T: Copy>(&self, off: usize) -> Option<T> {
        // SAFETY: the verifier checks this load against the kernel's BTF of `struct sock`
        // (the offset is a known constant from frozen .rodata) and makes it fault-safe.
        // Volatile: one load at that offset, never a copy LLVM might split or widen.
        Some(unsafe { core::ptr::read_volatile(self.0.add(off) as *const T) })
    }

    #[inline(always)]
    fn tcp_field<T: Copy>(&self, off: usize) -> Option<T> {
        // SAFETY: the helper returns a typed tcp_sock pointer, or null for a socket that is
        // not TCP; the load is checked against tcp_sock's BTF like `field`.
        let tcp = unsafe { bpf_skc_to_tcp_sock(self.0 as *mut _) } as *const u8;
        if tcp.is_null() {
            return None;
        }
        Some(unsafe { core::ptr::read_volatile(tcp.add(off) as *const T) })
    }

    #[inline(always)]
    fn net_field<T: Copy>(&self, ptr_off: usize, off: usize) -> Option<T> {
        // SAFETY: as `field`; the loaded pointer is typed `struct net *` by the verifier.
        let net = unsafe { core::ptr::read_volatile(self.0.add(ptr_off) as *const *const u8) };
        if net.is_null() {
            return None;
        }
        Some(unsafe { core::ptr::read_volatile(net.add(off) as *const T) })
    }
}

/// An untyped kernel address of a `struct sock`.
pub struct ProbeSock(pub *const u8);

impl Fields for ProbeSock {
    #[inline(always)]
    fn base(&self) -> *const u8 {
        self.0
    }

    #[inline(always)]
    fn field<T: Copy>(&self, off: usize) -> Option<T> {
        // SAFETY: bpf_probe_read_kernel fails cleanly on a bad address.
        match unsafe { bpf_probe_read_kernel(self.0.add(off) as *const T) } {
            Ok(v) => Some(v),
            Err(_) => {
                cold::read_failed(off as u64);
                None
            }
        }
    }

    #[inline(always)]
    fn tcp_field<T: Copy>(&self, off: usize) -> Option<T> {
        self.field(off)
    }

    #[inline(always)]
    fn net_field<T: Copy>(&self, ptr_off: usize, off: usize) -> Option<T> {
        let net: u64 = self.field(ptr_off)?;
        if net == 0 {
            return None;
        }
        // SAFETY: as `field`.
        unsafe { bpf_probe_read_kernel((net as *const u8).add(off) as *const T) }.ok()
    }
}

/// An IPv6 address as two aligned words.
#[inline(always)]
fn addr16(f: &impl Fields, off: usize) -> Option<Addr> {
    Some([f.field(off)?, f.field(off + 8)?])
}

#[inline(always)]
fn addr4(f: &impl Fields, off: usize) -> Option<Addr> {
    Some(addr::v4(f.field(off)?))
}

impl<F: Fields> Sock for F {
    #[inline(always)]
    fn addr(&self) -> u64 {
        self.base() as u64
    }

    #[inline(always)]
    fn is_tcp(&self) -> bool {
        self.field::<u16>(off::sk_protocol()) == Some(IPPROTO_TCP as u16)
    }

    #[inline(always)]
    fn conn(&self) -> Option<Conn> {
        let family: u16 = self.field(off::skc_family())?;
        let dport = u16::from_be(self.field(off::skc_dport())?);
        let sport = u16::from_be(self.tcp_field(off::inet_sport())?);
        let (saddr, daddr) = if family == AF_INET {
            (
                addr4(self, off::skc_rcv_saddr())?,
                addr4(self, off::skc_daddr())?,
            )
        } else {
            (
                addr16(self, off::skc_v6_rcv_saddr())?,
                addr16(self, off::skc_v6_daddr())?,
            )
        };
        Some(Conn {
            family,
            sport,
            dport,
            saddr,
            daddr,
        })
    }

    #[inline(always)]
    fn dest(&self) -> Option<(u16, u16, Addr)> {
        let family: u16 = self.field(off::skc_family())?;
        let dport = u16::from_be(self.field(off::skc_dport())?);
        let daddr = if family == AF_INET {
            addr4(self, off::skc_daddr())?
        } else {
            addr16(self, off::skc_v6_daddr())?
        };
        Some((family, dport, daddr))
    }

    #[inline(always)]
    fn num(&self) -> Option<u16> {
        self.field(off::skc_num())
    }

    #[inline(always)]
    fn write_seq(&self) -> Option<u32> {
        self.tcp_field(off::tcp_write_seq())
    }

    #[inline(always)]
    fn sk_err(&self) -> Option<i32> {
        self.field(off::sk_err())
    }

    #[inline(always)]
    fn netns(&self) -> u32 {
        self.net_field::<u32>(off::skc_net(), off::net_inum())
            .unwrap_or(0)
    }

    #[inline(always)]
    fn port_range(&self) -> Option<(u16, u16)> {
        if off::port_range_packed() {
            let v: u32 = self.net_field(off::skc_net(), off::net_port_range())?;
            Some((v as u16, (v >> 16) as u16))
        } else {
            let lo: u32 = self.net_field(off::skc_net(), off::net_port_range())?;
            let hi: u32 = self.net_field(off::skc_net(), off::net_port_range() + 4)?;
            Some((lo as u16, hi as u16))
        }
    }
}
