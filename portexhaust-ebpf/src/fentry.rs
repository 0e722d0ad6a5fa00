//! fentry/fexit programs (BTF trampolines, 5.5+): the fentry backend's TCP connect hooks and
//! the bind()/UDP hooks. fexit programs read the return value as the argument after the last
//! one (works from 5.5 on, unlike bpf_get_func_ret which needs 5.17), so each fexit must
//! match its function's argument count exactly.
use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use portexhaust_common::Site;

use crate::{kfunc, sock::BtfSock};

#[fentry(function = "tcp_v4_connect")]
pub fn fentry_tcp_v4_connect(ctx: FEntryContext) -> u32 {
    kfunc::connect_entry(ctx.arg::<u64>(0), ctx.arg::<u64>(1), Site::TcpV4Connect);
    0
}

#[fentry(function = "tcp_v6_connect")]
pub fn fentry_tcp_v6_connect(ctx: FEntryContext) -> u32 {
    kfunc::connect_entry(ctx.arg::<u64>(0), ctx.arg::<u64>(1), Site::TcpV6Connect);
    0
}

/// `int tcp_v4_connect(sk, uaddr, addr_len)`: the return value is argument 3.
#[fexit(function = "tcp_v4_connect")]
pub fn fexit_tcp_v4_connect(ctx: FExitContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    kfunc::connect_return(ctx.arg::<i64>(3) as i32 as i64, &BtfSock(sk));
    0
}

#[fexit(function = "tcp_v6_connect")]
pub fn fexit_tcp_v6_connect(ctx: FExitContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    kfunc::connect_return(ctx.arg::<i64>(3) as i32 as i64, &BtfSock(sk));
    0
}

/// `__inet_hash_connect()` gained an argument in 6.15 (hash_port0), which would move an
/// fexit's return value, so the fexit goes on its stable, exported caller
/// `int inet_hash_connect(struct inet_timewait_death_row *, struct sock *)`, which returns
/// __inet_hash_connect()'s value unchanged. At its exit a failed socket still has its source
/// address, and `inet_num` still tells a bound socket from an unbound one.
#[fexit(function = "inet_hash_connect")]
pub fn fexit_inet_hash_connect(ctx: FExitContext) -> u32 {
    let ret = ctx.arg::<i64>(2) as i32 as i64;
    if kfunc::hash_connect_failed(ret) {
        let sk: *const u8 = ctx.arg(1);
        kfunc::note_port_selection(&BtfSock(sk), true);
    }
    0
}

/// IPv6 has its own exported wrapper around __inet_hash_connect():
/// `int inet6_hash_connect(struct inet_timewait_death_row *, struct sock *)` (5.10..6.12+).
#[fexit(function = "inet6_hash_connect")]
pub fn fexit_inet6_hash_connect(ctx: FExitContext) -> u32 {
    let ret = ctx.arg::<i64>(2) as i32 as i64;
    if kfunc::hash_connect_failed(ret) {
        let sk: *const u8 = ctx.arg(1);
        kfunc::note_port_selection(&BtfSock(sk), true);
    }
    0
}

/// `int inet_bind(struct socket *, struct sockaddr *, int)`: return value is argument 3.
#[fexit(function = "inet_bind")]
pub fn fexit_inet_bind(ctx: FExitContext) -> u32 {
    kfunc::bind_exit(
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1),
        ctx.arg::<i64>(3) as i32 as i64,
    );
    0
}

#[fexit(function = "inet6_bind")]
pub fn fexit_inet6_bind(ctx: FExitContext) -> u32 {
    kfunc::bind_exit(
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1),
        ctx.arg::<i64>(3) as i32 as i64,
    );
    0
}

/// `int inet_dgram_connect(struct socket *, struct sockaddr *, int, int)`: argument 4.
#[fexit(function = "inet_dgram_connect")]
pub fn fexit_inet_dgram_connect(ctx: FExitContext) -> u32 {
    kfunc::dgram_connect_exit(
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1),
        ctx.arg::<i64>(4) as i32 as i64,
    );
    0
}
