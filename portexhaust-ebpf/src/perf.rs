//! The socket as the perf tracepoint `sock:inet_sock_set_state` shows it: the record for what
//! it carries, BTF offsets (when the kernel has BTF) for the rest. Without BTF the tracepoint
//! backend still catches exhausted ranges (the record's source port is enough); only the
//! bound-socket cause and the socket's namespace need the offsets.
use aya_ebpf::programs::TracePointContext;
use portexhaust_common::{AF_INET, IPPROTO_TCP};

use crate::{
    addr::{self, Addr},
    globals,
    sock::{Conn, ProbeSock, Sock},
    state::read_tp,
};

pub struct PerfSock {
    ctx: TracePointContext,
    sk: ProbeSock,
}

impl PerfSock {
    #[inline(always)]
    pub fn new(ctx: TracePointContext) -> Self {
        // SAFETY: skaddr@8 of the record.
        let sk = unsafe { read_tp::<u64>(&ctx, 8) };
        Self {
            ctx,
            sk: ProbeSock(sk as *const u8),
        }
    }

    #[inline(always)]
    fn rec<T: Copy>(&self, off: usize) -> T {
        // SAFETY: only called with the record offsets listed in state.rs.
        unsafe { read_tp::<T>(&self.ctx, off) }
    }

    /// 16 address bytes as two aligned words: byte-array copies through the ctx pointer become
    /// moved ctx pointers, which the verifier refuses.
    #[inline(always)]
    fn addr16(&self, off: usize) -> Addr {
        [self.rec(off), self.rec(off + 8)]
    }
}

impl Sock for PerfSock {
    #[inline(always)]
    fn addr(&self) -> u64 {
        self.sk.0 as u64
    }

    #[inline(always)]
    fn is_tcp(&self) -> bool {
        self.rec::<u16>(30) == IPPROTO_TCP as u16
    }

    #[inline(always)]
    fn conn(&self) -> Option<Conn> {
        let family: u16 = self.rec(28);
        let (saddr, daddr) = if family == AF_INET {
            (addr::v4(self.rec(32)), addr::v4(self.rec(36)))
        } else {
            (self.addr16(40), self.addr16(56))
        };
        Some(Conn {
            family,
            sport: self.rec(24),
            dport: self.rec(26),
            saddr,
            daddr,
        })
    }

    #[inline(always)]
    fn dest(&self) -> Option<(u16, u16, Addr)> {
        let family: u16 = self.rec(28);
        let dport: u16 = self.rec(26);
        let daddr = if family == AF_INET {
            addr::v4(self.rec(36))
        } else {
            self.addr16(56)
        };
        Some((family, dport, daddr))
    }

    #[inline(always)]
    fn num(&self) -> Option<u16> {
        if !globals::have_sock_offsets() {
            return None;
        }
        self.sk.num()
    }

    #[inline(always)]
    fn write_seq(&self) -> Option<u32> {
        if !globals::have_sock_offsets() {
            return None;
        }
        self.sk.write_seq()
    }

    #[inline(always)]
    fn sk_err(&self) -> Option<i32> {
        if !globals::have_sock_offsets() {
            return None;
        }
        self.sk.sk_err()
    }

    #[inline(always)]
    fn netns(&self) -> u32 {
        if !globals::have_sock_offsets() {
            return 0;
        }
        self.sk.netns()
    }

    #[inline(always)]
    fn port_range(&self) -> Option<(u16, u16)> {
        if !globals::have_sock_offsets() {
            return None;
        }
        self.sk.port_range()
    }
}
