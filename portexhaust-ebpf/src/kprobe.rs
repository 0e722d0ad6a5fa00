//! kprobe/kretprobe programs (CONFIG_KPROBES): the design's pair on `__inet_hash_connect` and
//! `tcp_v{4,6}_connect`, and the bind()/UDP hooks. Return values come from the return register
//! (`ctx.ret()`), truncated to the C `int` every one of these functions returns.
use aya_ebpf::{
    macros::{kprobe, kretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use portexhaust_common::Site;

use crate::{kfunc, maps::KFUNC_INFLIGHT, sock::ProbeSock};

#[inline(always)]
fn ret(ctx: &RetProbeContext) -> i64 {
    ctx.ret::<i64>() as i32 as i64
}

#[kprobe]
pub fn kprobe_tcp_v4_connect(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(uaddr)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        kfunc::connect_entry(sk, uaddr, Site::TcpV4Connect);
    }
    0
}

#[kprobe]
pub fn kprobe_tcp_v6_connect(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(uaddr)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        kfunc::connect_entry(sk, uaddr, Site::TcpV6Connect);
    }
    0
}

/// The in-flight connect's socket, for the return probes (which see no arguments).
#[inline(always)]
fn inflight_sock() -> ProbeSock {
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    // SAFETY: this thread's own entry.
    let sk = KFUNC_INFLIGHT
        .get_ptr(tid)
        .map(|p| unsafe { (*p).handle })
        .unwrap_or(0);
    ProbeSock(sk as *const u8)
}

#[kretprobe]
pub fn kretprobe_tcp_v4_connect(ctx: RetProbeContext) -> u32 {
    kfunc::connect_return(ret(&ctx), &inflight_sock());
    0
}

#[kretprobe]
pub fn kretprobe_tcp_v6_connect(ctx: RetProbeContext) -> u32 {
    kfunc::connect_return(ret(&ctx), &inflight_sock());
    0
}

/// Entry of `__inet_hash_connect(death_row, sk, port_offset, ...)`: 4 arguments on
/// 5.10..6.14, 5 on 6.15+ (hash_port0); `sk` is the second on all of them. Whether the socket
/// already had a local port (bind() before connect()) can only be seen here: by the return,
/// a successful search has set it.
#[kprobe]
pub fn kprobe_inet_hash_connect(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(1) {
        kfunc::note_port_selection(&ProbeSock(sk as *const u8), false);
    }
    0
}

#[kretprobe]
pub fn kretprobe_inet_hash_connect(ctx: RetProbeContext) -> u32 {
    if kfunc::hash_connect_failed(ret(&ctx)) {
        let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
        if let Some(p) = KFUNC_INFLIGHT.get_ptr_mut(tid) {
            // SAFETY: this thread's own entry.
            unsafe { (*p).flags |= portexhaust_common::INFLIGHT_HASH_FAILED };
        }
    }
    0
}

#[kprobe]
pub fn kprobe_inet_bind(ctx: ProbeContext) -> u32 {
    if let (Some(sock), Some(uaddr)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        kfunc::bind_entry(sock, uaddr);
    }
    0
}

#[kretprobe]
pub fn kretprobe_inet_bind(ctx: RetProbeContext) -> u32 {
    kfunc::bind_return(ret(&ctx));
    0
}

#[kprobe]
pub fn kprobe_inet6_bind(ctx: ProbeContext) -> u32 {
    if let (Some(sock), Some(uaddr)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        kfunc::bind_entry(sock, uaddr);
    }
    0
}

#[kretprobe]
pub fn kretprobe_inet6_bind(ctx: RetProbeContext) -> u32 {
    kfunc::bind_return(ret(&ctx));
    0
}

#[kprobe]
pub fn kprobe_inet_dgram_connect(ctx: ProbeContext) -> u32 {
    if let (Some(sock), Some(uaddr)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        kfunc::dgram_connect_entry(sock, uaddr);
    }
    0
}

#[kretprobe]
pub fn kretprobe_inet_dgram_connect(ctx: RetProbeContext) -> u32 {
    kfunc::dgram_connect_return(ret(&ctx));
    0
}
