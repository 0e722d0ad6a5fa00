//! Logic shared by the function hooks (fentry/fexit and kprobe/kretprobe): TCP connect for the
//! fentry and kprobe backends, bind(0) and UDP autobind for every backend on kernels that
//! allow function hooks. The per-backend programs (fentry.rs, kprobe.rs) are thin wrappers.
//!
//! `int tcp_v4_connect(struct sock *sk, struct sockaddr *uaddr, int addr_len)` (5.10..6.x; 7.x
//! renames the uaddr type to `struct sockaddr_unsized *`, same layout); `tcp_v6_connect` has
//! the same shape (static, still a probe target).
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel};
use portexhaust_common::{
    AF_INET, AF_INET6, Cause, EADDRINUSE, EADDRNOTAVAIL, EAGAIN, EVENT_BOUND, EVENT_SADDR_KNOWN,
    INFLIGHT_BIND, INFLIGHT_BOUND, INFLIGHT_BOUND_KNOWN, INFLIGHT_CONNECT, INFLIGHT_HASH_FAILED,
    INFLIGHT_SADDR, INFLIGHT_V4_NESTED, IPPROTO_TCP, IPPROTO_UDP, Inflight, SOCK_DGRAM, Site,
};

use crate::{
    addr,
    emit::{Failure, now_ns, report},
    globals::{self, off},
    maps::KFUNC_INFLIGHT,
    sock::Sock,
    task::current_netns,
};

/// Fill destination fields from the leading 24 bytes of a `struct sockaddr_in{,6}`, read as
/// words (see addr.rs). Returns false for families other than AF_INET/AF_INET6.
#[inline(always)]
pub fn parse_sockaddr(raw: &[u64; 3], out: &mut Inflight) -> bool {
    // sa_family at 0, sin_port / sin6_port (network order) at 2, sin_addr at 4; sockaddr_in6
    // has sin6_flowinfo at 4 and sin6_addr at 8.
    let family = raw[0] as u16;
    out.dport = u16::from_be((raw[0] >> 16) as u16);
    out.family = family;
    if family == AF_INET {
        out.daddr = addr::bytes(addr::v4((raw[0] >> 32) as u32));
        true
    } else if family == AF_INET6 {
        out.daddr = addr::bytes([raw[1], raw[2]]);
        true
    } else {
        false
    }
}

/// Read a socket address from kernel memory: the `uaddr` argument of the hooked functions is
/// the kernel copy `move_addr_to_kernel()` made of the user's address (a sockaddr_storage, so
/// 24 bytes are always there).
#[inline(always)]
pub fn read_kernel_sockaddr(uaddr: u64, out: &mut Inflight) -> bool {
    // SAFETY: bpf_probe_read_kernel fails cleanly on a bad address.
    match unsafe { bpf_probe_read_kernel(uaddr as *const [u64; 3]) } {
        Ok(raw) => parse_sockaddr(&raw, out),
        Err(_) => false,
    }
}

#[inline(always)]
pub fn empty_inflight(kind: u8, handle: u64) -> Inflight {
    Inflight {
        handle,
        daddr: [0; 16],
        saddr: [0; 16],
        dport: 0,
        family: 0,
        kind,
        flags: 0,
        depth: 0,
        opener: 0,
        start_ns: now_ns(),
    }
}

/// Is this destination an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)? Those go through
/// tcp_v4_connect() from tcp_v6_connect().
#[inline(always)]
pub fn is_v4_mapped(info: &Inflight) -> bool {
    let a = addr::words(&info.daddr);
    info.family == AF_INET6 && a[0] == 0 && a[1] & 0xffff_ffff == 0xffff_0000
}

// ---------------------------------------------------------------------------------------------
// TCP connect (fentry and kprobe backends).

#[inline(always)]
pub fn connect_entry(sk: u64, uaddr: u64, opener: Site) {
    let tid = bpf_get_current_pid_tgid();
    if let Some(p) = KFUNC_INFLIGHT.get_ptr_mut(tid) {
        // SAFETY: this thread's own entry.
        unsafe {
            // tcp_v6_connect() of a v4-mapped address calls tcp_v4_connect() with the same sk:
            // keep the outer (IPv6) destination and note the nesting. A different sk means a
            // stale entry (a missed return), which is replaced below.
            if (*p).kind == INFLIGHT_CONNECT && (*p).handle == sk && (*p).depth > 0 {
                (*p).depth += 1;
                (*p).flags |= INFLIGHT_V4_NESTED;
                return;
            }
        }
    }
    let mut info = empty_inflight(INFLIGHT_CONNECT, sk);
    info.depth = 1;
    info.opener = opener as u8;
    if !read_kernel_sockaddr(uaddr, &mut info) {
        return;
    }
    let _ = KFUNC_INFLIGHT.insert(tid, info, 0);
}

/// Port selection is running (or ran) on `s`: note whether the socket already had a local
/// port (bind() before connect()) and its source address, for the failure report.
#[inline(always)]
pub fn note_port_selection(s: &impl Sock, failed: bool) {
    let Some(p) = KFUNC_INFLIGHT.get_ptr_mut(bpf_get_current_pid_tgid()) else {
        return;
    };
    // SAFETY: this thread's own entry.
    unsafe {
        if (*p).kind != INFLIGHT_CONNECT {
            return;
        }
        if failed {
            (*p).flags |= INFLIGHT_HASH_FAILED;
        }
        if !globals::have_sock_offsets() {
            return;
        }
        if let Some(num) = s.num() {
            (*p).flags |= INFLIGHT_BOUND_KNOWN;
            if num != 0 {
                (*p).flags |= INFLIGHT_BOUND;
            }
        }
        if let Some(c) = s.conn() {
            (*p).saddr = addr::bytes(c.saddr);
            (*p).flags |= INFLIGHT_SADDR;
        }
    }
}

/// The return of `__inet_hash_connect()` / `inet_hash_connect()`: -EADDRNOTAVAIL is "no port".
#[inline(always)]
pub fn hash_connect_failed(ret: i64) -> bool {
    ret == -(EADDRNOTAVAIL as i64)
}

#[inline(always)]
pub fn connect_return(ret: i64, s: &impl Sock) {
    let tid = bpf_get_current_pid_tgid();
    let Some(p) = KFUNC_INFLIGHT.get_ptr_mut(tid) else {
        return;
    };
    // SAFETY: this thread's own entry.
    let info = unsafe {
        if (*p).kind != INFLIGHT_CONNECT || (*p).opener == Site::UdpAutobind as u8 {
            return;
        }
        (*p).depth = (*p).depth.saturating_sub(1);
        if (*p).depth > 0 {
            return; // the inner tcp_v4_connect of a v4-mapped connect; the outer one reports
        }
        *p
    };
    let _ = KFUNC_INFLIGHT.remove(tid);
    if ret != -(EADDRNOTAVAIL as i64) {
        return;
    }
    let (site, cause) = if info.flags & INFLIGHT_HASH_FAILED != 0 {
        let cause = if info.flags & INFLIGHT_BOUND_KNOWN == 0 {
            Cause::Unknown
        } else if info.flags & INFLIGHT_BOUND != 0 {
            Cause::TupleCollision
        } else {
            Cause::Exhausted
        };
        (Site::InetHashConnect, cause)
    } else if info.flags & INFLIGHT_V4_NESTED != 0 {
        (Site::TcpV4Connect, Cause::NoSourceAddress)
    } else {
        (
            Site::from_u8(info.opener).unwrap_or(Site::TcpV4Connect),
            Cause::NoSourceAddress,
        )
    };
    let netns = if globals::have_sock_offsets() {
        s.netns()
    } else {
        current_netns()
    };
    let mut flags = 0;
    if info.flags & INFLIGHT_SADDR != 0 {
        flags |= EVENT_SADDR_KNOWN;
    }
    if info.flags & INFLIGHT_BOUND != 0 {
        flags |= EVENT_BOUND;
    }
    report(&Failure {
        netns,
        errno: EADDRNOTAVAIL,
        site,
        cause,
        proto: IPPROTO_TCP,
        family: info.family,
        dport: info.dport,
        daddr: addr::words(&info.daddr),
        saddr: addr::words(&info.saddr),
        flags,
    });
}

// ---------------------------------------------------------------------------------------------
// bind(port 0) and UDP autobind, every backend, where function hooks exist.
//
// `int inet_bind(struct socket *sock, struct sockaddr *uaddr, int addr_len)` and `inet6_bind`
// (same shape; 5.10..6.x) return what bind() returns: EADDRINUSE for port 0 means the whole
// range is taken (`inet_csk_get_port` / `udp_lib_get_port` found nothing). EADDRNOTAVAIL from
// bind() means a non-local address: not exhaustion, never reported.
// `int inet_dgram_connect(struct socket *sock, struct sockaddr *uaddr, int addr_len, int
// flags)` returns -EAGAIN only when `inet_autobind()` found no port.

/// `struct socket.type` (`short`): SOCK_DGRAM is UDP here (inet sockets), the rest TCP.
#[inline(always)]
fn proto_of_socket(sock: u64) -> u8 {
    if globals::have_sock_offsets() {
        // SAFETY: bpf_probe_read_kernel fails cleanly on a bad address.
        let ty = unsafe {
            bpf_probe_read_kernel((sock as *const u8).add(off::socket_type()) as *const u16)
        };
        if ty == Ok(SOCK_DGRAM as u16) {
            return IPPROTO_UDP;
        }
    }
    IPPROTO_TCP
}

#[inline(always)]
fn report_bind(info: &Inflight) {
    report(&Failure {
        netns: current_netns(),
        errno: EADDRINUSE,
        site: Site::Bind,
        cause: Cause::BindExhausted,
        proto: info.opener,
        family: info.family,
        dport: 0,
        daddr: addr::words(&info.daddr),
        saddr: [0; 2],
        flags: 0,
    });
}

#[inline(always)]
fn report_autobind(info: &Inflight) {
    report(&Failure {
        netns: current_netns(),
        errno: EAGAIN,
        site: Site::UdpAutobind,
        cause: Cause::AutobindExhausted,
        proto: IPPROTO_UDP,
        family: info.family,
        dport: info.dport,
        daddr: addr::words(&info.daddr),
        saddr: [0; 2],
        flags: 0,
    });
}

/// A bind() to port 0 of an inet address, or None.
#[inline(always)]
fn bind_request(sock: u64, uaddr: u64) -> Option<Inflight> {
    let mut info = empty_inflight(INFLIGHT_BIND, sock);
    if !read_kernel_sockaddr(uaddr, &mut info) || info.dport != 0 {
        return None;
    }
    info.opener = proto_of_socket(sock);
    Some(info)
}

/// fexit: arguments and return value together.
#[inline(always)]
pub fn bind_exit(sock: u64, uaddr: u64, ret: i64) {
    if ret != -(EADDRINUSE as i64) {
        return;
    }
    if let Some(info) = bind_request(sock, uaddr) {
        report_bind(&info);
    }
}

/// kprobe: remember a bind() to port 0 until its return.
#[inline(always)]
pub fn bind_entry(sock: u64, uaddr: u64) {
    if let Some(info) = bind_request(sock, uaddr) {
        let _ = KFUNC_INFLIGHT.insert(bpf_get_current_pid_tgid(), info, 0);
    }
}

#[inline(always)]
fn take(kind: u8) -> Option<Inflight> {
    let tid = bpf_get_current_pid_tgid();
    // SAFETY: this thread's own entry, copied out at once.
    let info = KFUNC_INFLIGHT.get_ptr(tid).map(|p| unsafe { *p })?;
    if info.kind != kind {
        return None;
    }
    let _ = KFUNC_INFLIGHT.remove(tid);
    Some(info)
}

/// kretprobe of inet_bind / inet6_bind.
#[inline(always)]
pub fn bind_return(ret: i64) {
    let Some(info) = take(INFLIGHT_BIND) else {
        return;
    };
    if ret == -(EADDRINUSE as i64) {
        report_bind(&info);
    }
}

/// A UDP connect's destination (opener marks the entry as UDP, apart from TCP connects).
#[inline(always)]
fn udp_request(sock: u64, uaddr: u64) -> Option<Inflight> {
    let mut info = empty_inflight(INFLIGHT_CONNECT, sock);
    info.opener = Site::UdpAutobind as u8;
    read_kernel_sockaddr(uaddr, &mut info).then_some(info)
}

#[inline(always)]
pub fn dgram_connect_exit(sock: u64, uaddr: u64, ret: i64) {
    if ret != -(EAGAIN as i64) {
        return;
    }
    if let Some(info) = udp_request(sock, uaddr) {
        report_autobind(&info);
    }
}

#[inline(always)]
pub fn dgram_connect_entry(sock: u64, uaddr: u64) {
    if let Some(info) = udp_request(sock, uaddr) {
        let _ = KFUNC_INFLIGHT.insert(bpf_get_current_pid_tgid(), info, 0);
    }
}

#[inline(always)]
pub fn dgram_connect_return(ret: i64) {
    let Some(info) = take(INFLIGHT_CONNECT) else {
        return;
    };
    if info.opener == Site::UdpAutobind as u8 && ret == -(EAGAIN as i64) {
        report_autobind(&info);
    }
}
