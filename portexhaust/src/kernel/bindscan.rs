//! Finding programs that bind() before connect() without IP_BIND_ADDRESS_NO_PORT, where that
//! can be seen: a TCP socket that holds a port of the ephemeral range but is neither connected
//! nor listening. Such a socket is in no connection table (/proc/net/tcp and sock_diag list only
//! listening and hashed sockets), so it is looked at from its owner's fd table:
//! `pidfd_getfd()` (Linux 5.6+, needs ptrace rights: root) lends us a duplicate of the fd, and
//! getsockname()/getpeername() tell bound from connected. A duplicate changes nothing for the
//! owner; it is closed at once. A connected socket does not tell whether it was bound first,
//! so only the window between bind() and connect(), or sockets left bound, can be seen.
use std::{
    collections::{BTreeMap, HashSet},
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use procfs::{
    FromRead, FromReadSI, current_system_info,
    net::{TcpNetEntries, UdpNetEntries, UnixNetEntries},
    process::{FDTarget, all_processes},
};
use socket2::SockRef;

use crate::{advice::BindHolder, schema::PortRange};

/// `SIOCGSKNS` (linux/sockios.h, 4.9+): an fd for the network namespace of a socket.
const SIOCGSKNS: libc::c_ulong = 0x894C;
/// Stop after this many candidate sockets: a doctor run must stay quick on a busy host.
const MAX_CANDIDATES: usize = 100_000;

/// Inodes of sockets that are in this namespace's tables: those are listening or connected (or
/// not TCP), so they need no closer look.
fn hashed_inodes() -> HashSet<u64> {
    let mut out = HashSet::new();
    let si = current_system_info();
    for p in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        if let Ok(e) = TcpNetEntries::from_file(p, si) {
            out.extend(e.0.iter().map(|e| e.inode));
        }
    }
    for p in ["/proc/thread-self/net/udp", "/proc/thread-self/net/udp6"] {
        if let Ok(e) = UdpNetEntries::from_file(p, si) {
            out.extend(e.0.iter().map(|e| e.inode));
        }
    }
    if let Ok(e) = UnixNetEntries::from_file("/proc/thread-self/net/unix") {
        out.extend(e.0.iter().map(|e| e.inode));
    }
    out
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success the kernel returns a new fd that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor returned above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd (O_CLOEXEC) is ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor returned above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Network namespace inode of a socket.
fn socket_netns(sock: &OwnedFd) -> Option<u64> {
    // SAFETY: ioctl with no argument; returns a new fd on success.
    let ns = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGSKNS as _) };
    if ns < 0 {
        return None;
    }
    // SAFETY: fresh fd from the ioctl.
    let ns = unsafe { OwnedFd::from_raw_fd(ns) };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a stat buffer of the right type.
    (unsafe { libc::fstat(ns.as_raw_fd(), &mut st) } == 0).then_some(st.st_ino)
}

/// If this is a TCP socket of `netns` holding a port of `range` without a peer, its address.
fn bound_unconnected(sock: &OwnedFd, netns: u64, range: &PortRange) -> Option<String> {
    let s = SockRef::from(sock);
    if s.protocol().ok()?? != socket2::Protocol::TCP {
        return None;
    }
    if s.is_listener().ok()? {
        return None;
    }
    let local = s.local_addr().ok()?.as_socket()?;
    let port = u32::from(local.port());
    if port == 0 || port < range.lo || port > range.hi {
        return None;
    }
    match s.peer_addr() {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
        _ => return None,
    }
    (socket_netns(sock)? == netns).then(|| local.to_string())
}

/// Processes holding TCP sockets bound to a port of `range` and not connected, in the network
/// namespace `netns`. Err when this process may not look (not root).
pub fn scan(netns: u64, range: &PortRange) -> io::Result<Vec<BindHolder>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "inspecting other processes' sockets needs root",
        ));
    }
    let hashed = hashed_inodes();
    let me = std::process::id() as i32;
    let mut holders: BTreeMap<u32, BindHolder> = BTreeMap::new();
    let mut seen = 0usize;
    let (mut tried, mut refused) = (0u64, 0u64);
    let procs = all_processes().map_err(|e| io::Error::other(format!("/proc: {e}")))?;
    for p in procs.flatten() {
        if p.pid == me || seen >= MAX_CANDIDATES {
            continue;
        }
        let Ok(fds) = p.fd() else { continue };
        let candidates: Vec<i32> = fds
            .flatten()
            .filter_map(|fd| match fd.target {
                FDTarget::Socket(ino) if !hashed.contains(&ino) => Some(fd.fd),
                _ => None,
            })
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let Ok(pidfd) = pidfd_open(p.pid as u32) else {
            continue; // exited meanwhile
        };
        for fd in candidates {
            seen += 1;
            tried += 1;
            let dup = match pidfd_getfd(&pidfd, fd) {
                Ok(d) => d,
                Err(e) => {
                    if e.raw_os_error() == Some(libc::EPERM) {
                        refused += 1;
                    }
                    continue;
                }
            };
            if let Some(addr) = bound_unconnected(&dup, netns, range) {
                let h = holders.entry(p.pid as u32).or_insert_with(|| BindHolder {
                    pid: p.pid as u32,
                    comm: std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                        .map(|s| s.trim().to_string())
                        .unwrap_or_default(),
                    sockets: 0,
                    example: addr,
                });
                h.sockets += 1;
            }
        }
    }
    if tried > 0 && refused == tried {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "pidfd_getfd was refused for every socket (ptrace restrictions?)",
        ));
    }
    let mut out: Vec<BindHolder> = holders.into_values().collect();
    out.sort_by(|a, b| b.sockets.cmp(&a.sockets).then(a.pid.cmp(&b.pid)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Socket, Type};

    #[test]
    fn a_bound_unconnected_socket_is_recognised_and_a_listener_is_not() {
        let netns = crate::kernel::procinfo::netns_of(std::process::id()).expect("netns");
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        s.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .expect("a")
                .into(),
        )
        .expect("bind");
        let port = s
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("inet")
            .port();
        let fd: OwnedFd = s.into();
        let range = PortRange::new(u32::from(port), u32::from(port), &[]);
        // SIOCGSKNS needs CAP_NET_ADMIN: without it the socket's namespace is unknown and the
        // socket is (safely) not reported.
        let got = bound_unconnected(&fd, netns, &range);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(got, Some(format!("127.0.0.1:{port}")));
        }
        let outside = PortRange::new(1, 2, &[]);
        assert_eq!(bound_unconnected(&fd, netns, &outside), None);

        let l = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        l.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .expect("a")
                .into(),
        )
        .expect("bind");
        l.listen(1).expect("listen");
        let lfd: OwnedFd = l.into();
        let wide = PortRange::new(1, 65535, &[]);
        assert_eq!(bound_unconnected(&lfd, netns, &wide), None);
    }
}
