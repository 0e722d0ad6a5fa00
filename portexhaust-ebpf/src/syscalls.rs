//! Syscall tracepoints, attached only on request (`trace --catch ...`) and only where no
//! function hook can see the same failure. Attaching any of them puts every syscall of every
//! task on the machine on the slow path (the syscall-tracepoint work flag) and builds a perf
//! record per attached syscall event, so TCP exhaustion and blame never use them.
//!
//! Layouts: shared/kernel-formats/syscalls_*.format, identical 5.10..7.2: arguments are 8-byte
//! slots from offset 16, the return value at 16.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use portexhaust_common::{
    AF_INET, AF_INET6, Cause, EADDRINUSE, EADDRNOTAVAIL, EAGAIN, EVENT_SADDR_KNOWN, INFLIGHT_BIND,
    INFLIGHT_CONNECT, INFLIGHT_SADDR, INFLIGHT_SYN_SENT, IPPROTO_TCP, IPPROTO_UDP, Inflight,
    KIND_BIND, KIND_CONNECT_EARLY, KIND_UDP, SOCK_DGRAM, SOCK_STREAM, Site,
};

use crate::{
    addr,
    emit::{Failure, report},
    globals,
    kfunc::{empty_inflight, is_v4_mapped, parse_sockaddr},
    maps::{SOCK_TYPES, SOCKET_ARGS, SYSCALL_INFLIGHT},
    state::read_tp,
    task::current_netns,
};

/// Read a socket address from user memory (syscall arguments).
#[inline(always)]
fn read_user_sockaddr(uaddr: u64, addrlen: u64, out: &mut Inflight) -> bool {
    let mut raw = [0u64; 3];
    // A sockaddr_in is 16 bytes and may sit at the end of a mapping: read only what was given.
    // SAFETY: bpf_probe_read_user fails cleanly on a bad address.
    let ok = if addrlen >= 24 {
        unsafe { bpf_probe_read_user(uaddr as *const [u64; 3]) }.map(|v| raw = v)
    } else if addrlen >= 16 {
        unsafe { bpf_probe_read_user(uaddr as *const [u64; 2]) }.map(|v| {
            raw[0] = v[0];
            raw[1] = v[1];
        })
    } else {
        Err(-1)
    };
    ok.is_ok() && parse_sockaddr(&raw, out)
}

/// The type of a socket created while tracing (only datagram sockets are remembered), 0 if
/// unknown.
#[inline(always)]
fn sock_type_of(fd: u64) -> u8 {
    let tgid = bpf_get_current_pid_tgid() >> 32;
    let key = (tgid << 32) | (fd & 0xffff_ffff);
    // SAFETY: copied out of the map value at once.
    SOCK_TYPES.get_ptr(key).map(|p| unsafe { *p }).unwrap_or(0)
}

#[inline(always)]
fn failure(info: &Inflight, errno: u32, site: Site, cause: Cause, proto: u8) -> Failure {
    Failure {
        netns: current_netns(),
        errno,
        site,
        cause,
        proto,
        family: info.family,
        dport: info.dport,
        daddr: addr::words(&info.daddr),
        saddr: addr::words(&info.saddr),
        flags: if info.flags & INFLIGHT_SADDR != 0 {
            EVENT_SADDR_KNOWN
        } else {
            0
        },
    }
}

#[tracepoint]
pub fn tp_sys_enter_socket(ctx: TracePointContext) -> u32 {
    // sys_enter_socket: family@16, type@24, protocol@32.
    // SAFETY: record offsets above.
    let family = unsafe { read_tp::<u64>(&ctx, 16) };
    if family != AF_INET as u64 && family != AF_INET6 as u64 {
        return 0;
    }
    let ty = unsafe { read_tp::<u64>(&ctx, 24) };
    // Only datagram sockets are remembered: everything that reads SOCK_TYPES treats a socket
    // it does not know as TCP, so stream sockets are spared two map updates each.
    if ty & 0xf != SOCK_DGRAM as u64 {
        return 0;
    }
    let _ = SOCKET_ARGS.insert(bpf_get_current_pid_tgid(), ty as u32, 0);
    0
}

#[tracepoint]
pub fn tp_sys_exit_socket(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid();
    // SAFETY: copied out of the map value at once.
    let ty = SOCKET_ARGS.get_ptr(tid).map(|p| unsafe { *p });
    if ty.is_some() {
        let _ = SOCKET_ARGS.remove(tid);
    }
    // SAFETY: ret@16.
    let ret = unsafe { read_tp::<i64>(&ctx, 16) };
    if ret < 0 {
        return 0;
    }
    let key = ((tid >> 32) << 32) | (ret as u64 & 0xffff_ffff);
    // The low 4 bits are the type; SOCK_NONBLOCK/SOCK_CLOEXEC live above them. Any other new
    // fd forgets what an earlier, closed socket with the same number was.
    match ty.map(|t| t & 0xf) {
        Some(t) if t == SOCK_DGRAM as u32 => {
            let _ = SOCK_TYPES.insert(key, SOCK_DGRAM, 0);
        }
        _ => {
            let _ = SOCK_TYPES.remove(key);
        }
    }
    0
}

#[tracepoint]
pub fn tp_sys_enter_connect(ctx: TracePointContext) -> u32 {
    // sys_enter_connect: fd@16, uservaddr@24, addrlen@32.
    // SAFETY: record offsets above.
    let (fd, uaddr, len) = unsafe {
        (
            read_tp::<u64>(&ctx, 16),
            read_tp::<u64>(&ctx, 24),
            read_tp::<u64>(&ctx, 32),
        )
    };
    let mut info = empty_inflight(INFLIGHT_CONNECT, fd);
    if read_user_sockaddr(uaddr, len, &mut info) {
        let _ = SYSCALL_INFLIGHT.insert(bpf_get_current_pid_tgid(), info, 0);
    }
    0
}

#[tracepoint]
pub fn tp_sys_exit_connect(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid();
    // SAFETY: copied out of the map value at once.
    let Some(info) = SYSCALL_INFLIGHT.get_ptr(tid).map(|p| unsafe { *p }) else {
        return 0;
    };
    let _ = SYSCALL_INFLIGHT.remove(tid);
    // SAFETY: ret@16.
    let ret = unsafe { read_tp::<i64>(&ctx, 16) };
    let kinds = globals::syscall_kinds();
    if ret == -(EAGAIN as i64) {
        // connect() on an inet socket returns EAGAIN only from inet_autobind() (datagram
        // sockets: inet_dgram_connect). A stream socket known to us is something else.
        if kinds & KIND_UDP != 0 && sock_type_of(info.handle) != SOCK_STREAM {
            report(&failure(
                &info,
                EAGAIN,
                Site::UdpAutobind,
                Cause::AutobindExhausted,
                IPPROTO_UDP,
            ));
        }
        return 0;
    }
    // EADDRNOTAVAIL after CLOSE -> SYN_SENT came from port selection, which the state hook
    // reports; before it, from an earlier site (e.g. no usable IPv6 source address).
    if ret != -(EADDRNOTAVAIL as i64)
        || kinds & KIND_CONNECT_EARLY == 0
        || info.flags & INFLIGHT_SYN_SENT != 0
        || sock_type_of(info.handle) == SOCK_DGRAM
    {
        return 0;
    }
    let site = if info.family == AF_INET || is_v4_mapped(&info) {
        Site::TcpV4Connect
    } else {
        Site::TcpV6Connect
    };
    report(&failure(
        &info,
        EADDRNOTAVAIL,
        site,
        Cause::NoSourceAddress,
        IPPROTO_TCP,
    ));
    0
}

#[tracepoint]
pub fn tp_sys_enter_bind(ctx: TracePointContext) -> u32 {
    // sys_enter_bind: fd@16, umyaddr@24, addrlen@32.
    // SAFETY: record offsets above.
    let (fd, uaddr, len) = unsafe {
        (
            read_tp::<u64>(&ctx, 16),
            read_tp::<u64>(&ctx, 24),
            read_tp::<u64>(&ctx, 32),
        )
    };
    let mut info = empty_inflight(INFLIGHT_BIND, fd);
    // Only bind() to port 0 asks the kernel to pick a port; EADDRINUSE for an explicit port is
    // a conflict, not exhaustion.
    if read_user_sockaddr(uaddr, len, &mut info) && info.dport == 0 {
        let _ = SYSCALL_INFLIGHT.insert(bpf_get_current_pid_tgid(), info, 0);
    }
    0
}

#[tracepoint]
pub fn tp_sys_exit_bind(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid();
    // SAFETY: copied out of the map value at once.
    let Some(info) = SYSCALL_INFLIGHT.get_ptr(tid).map(|p| unsafe { *p }) else {
        return 0;
    };
    let _ = SYSCALL_INFLIGHT.remove(tid);
    // SAFETY: ret@16.
    let ret = unsafe { read_tp::<i64>(&ctx, 16) };
    // EADDRNOTAVAIL from bind() means a non-local address: not exhaustion, never reported.
    if ret != -(EADDRINUSE as i64)
        || info.kind != INFLIGHT_BIND
        || globals::syscall_kinds() & KIND_BIND == 0
    {
        return 0;
    }
    let proto = if sock_type_of(info.handle) == SOCK_DGRAM {
        IPPROTO_UDP
    } else {
        IPPROTO_TCP
    };
    report(&failure(
        &info,
        EADDRINUSE,
        Site::Bind,
        Cause::BindExhausted,
        proto,
    ));
    0
}
