//! Namespace set-up: a fresh network namespace, its loopback up, its port range shrunk.
use std::io;

use portexhaust_common::netns_of;
use socket2::{Domain, Socket, Type};

use crate::{PORT_BASE, WorkloadError, io_err};

pub(crate) fn set_comm(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated buffer of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

fn lo_up() -> Result<(), WorkloadError> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, None).map_err(io_err("socket for ioctl"))?;
    // SAFETY: ifreq is plain old data; the name is NUL-terminated; the fd is valid.
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        use std::os::fd::AsRawFd;
        // `as _`: ioctl's request is an unsigned long in glibc and an int in musl (the static
        // release build); both hold these small constants.
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) != 0 {
            return Err(io_err("SIOCGIFFLAGS lo")(io::Error::last_os_error()));
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &ifr) != 0 {
            return Err(io_err("SIOCSIFFLAGS lo up")(io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn write_sysctl(path: &str, value: &str) -> Result<(), WorkloadError> {
    std::fs::write(path, value).map_err(io_err(format!("writing {path}")))
}

/// Enter a fresh network namespace and shrink its port range to `ports` ports.
/// Must run before any thread is spawned: unshare() moves only the calling thread.
pub fn isolate(ports: u16, tw_reuse: Option<u8>) -> Result<(), WorkloadError> {
    // SAFETY: plain syscall.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(WorkloadError::Unshare(io::Error::last_os_error()));
    }
    let mine = netns_of(std::process::id());
    if mine.is_none() || mine == netns_of(1) {
        return Err(WorkloadError::NotIsolated);
    }
    lo_up()?;
    let hi = PORT_BASE + ports.max(1) - 1;
    write_sysctl(
        "/proc/sys/net/ipv4/ip_local_port_range",
        &format!("{PORT_BASE} {hi}"),
    )?;
    if let Some(r) = tw_reuse {
        write_sysctl("/proc/sys/net/ipv4/tcp_tw_reuse", &r.to_string())?;
    }
    Ok(())
}
