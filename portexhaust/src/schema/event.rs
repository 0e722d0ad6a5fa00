//! The programs' ring-buffer events (`portexhaust_common::FailureEvent`, the kernel's side of
//! the wire) to [`Failure`]s, the one form every output and the record use. No BPF and no I/O:
//! what the programs wrote, checked and named.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use portexhaust_common::{
    AF_INET, AF_INET6, Backend, COMM_LEN, Cause, EVENT_SADDR_KNOWN, FailureEvent, IPPROTO_TCP,
    IPPROTO_UDP, Site,
};
use thiserror::Error;

use crate::schema::{Errno, Failure, Family, Proto, Ts};

/// One exhaustion failure as user space sees it.
/// Command name from the kernel's NUL-padded `comm`.
pub fn comm_str(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Kernel `comm` bytes for a name (truncated to 15 bytes plus NUL, as the kernel does).
pub fn comm_bytes(name: &str) -> [u8; COMM_LEN] {
    let mut out = [0u8; COMM_LEN];
    let b = name.as_bytes();
    let n = b.len().min(COMM_LEN - 1);
    out[..n].copy_from_slice(&b[..n]);
    out
}

/// An address as stored by the eBPF programs: IPv4 in the first four bytes.
pub fn ip_from_raw(family: Family, raw: &[u8; 16]) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(*raw)),
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {got} bytes, expected {want}")]
    Size { got: usize, want: usize },
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown protocol {0}")]
    Proto(u8),
    #[error("unknown site code {0}")]
    Site(u8),
    #[error("unknown backend code {0}")]
    Backend(u8),
}

/// Check the codes of a raw event, as [`failure_from_event`] does, without building it (the
/// live stream writes its lines straight from the event).
pub fn validate(ev: &FailureEvent) -> Result<(), DecodeError> {
    if ev.family != AF_INET && ev.family != AF_INET6 {
        return Err(DecodeError::Family(ev.family));
    }
    if ev.proto != IPPROTO_TCP && ev.proto != IPPROTO_UDP {
        return Err(DecodeError::Proto(ev.proto));
    }
    if Site::from_u8(ev.site).is_none() {
        return Err(DecodeError::Site(ev.site));
    }
    if Backend::from_u8(ev.backend).is_none() {
        return Err(DecodeError::Backend(ev.backend));
    }
    Ok(())
}

/// A ring-buffer record that announces a new call-site stack (see `SiteEvent`), if it is one.
pub fn site_event(bytes: &[u8]) -> Option<portexhaust_common::SiteEvent> {
    if bytes.len() != std::mem::size_of::<portexhaust_common::SiteEvent>() {
        return None;
    }
    // SAFETY: SiteEvent is a Pod (integers only) and `bytes` holds exactly its size.
    let ev: portexhaust_common::SiteEvent =
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    (ev.magic == portexhaust_common::SITE_EVENT_MAGIC).then_some(ev)
}

/// Decode one ring-buffer record. `ts_of` converts `bpf_ktime_get_ns()` values.
pub fn decode_event(
    bytes: &[u8],
    ts_of: impl Fn(u64) -> Ts,
) -> Result<(FailureEvent, Failure), DecodeError> {
    let want = std::mem::size_of::<FailureEvent>();
    if bytes.len() < want {
        return Err(DecodeError::Size {
            got: bytes.len(),
            want,
        });
    }
    // SAFETY: FailureEvent is a Pod (integers and byte arrays only) and `bytes` holds at least
    // size_of::<FailureEvent>() bytes; read_unaligned copes with any alignment.
    let ev: FailureEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let failure = failure_from_event(&ev, ts_of)?;
    Ok((ev, failure))
}

/// The destination of a raw event, or None for an unknown family.
pub fn dst_of(ev: &FailureEvent) -> Option<SocketAddr> {
    let family = Family::from_af(ev.family)?;
    Some(SocketAddr::new(ip_from_raw(family, &ev.daddr), ev.dport))
}

pub fn failure_from_event(
    ev: &FailureEvent,
    ts_of: impl Fn(u64) -> Ts,
) -> Result<Failure, DecodeError> {
    let family = Family::from_af(ev.family).ok_or(DecodeError::Family(ev.family))?;
    let proto = Proto::from_ipproto(ev.proto).ok_or(DecodeError::Proto(ev.proto))?;
    let site = Site::from_u8(ev.site).ok_or(DecodeError::Site(ev.site))?;
    let backend = Backend::from_u8(ev.backend).ok_or(DecodeError::Backend(ev.backend))?;
    let src = (ev.flags & EVENT_SADDR_KNOWN != 0).then(|| ip_from_raw(family, &ev.saddr));
    Ok(Failure {
        ts: ts_of(ev.ts_ns),
        pid: ev.pid,
        tid: ev.tid,
        uid: ev.uid,
        comm: comm_str(&ev.comm),
        cgroup_id: ev.cgroup_id,
        // 0: the kernel could not read it (no BTF offsets); user space fills it from /proc.
        netns: (ev.netns != 0).then_some(u64::from(ev.netns)),
        family,
        proto,
        dst: SocketAddr::new(ip_from_raw(family, &ev.daddr), ev.dport),
        src,
        errno: Errno(ev.errno),
        cause: Cause::from_u8(ev.cause).unwrap_or(Cause::Unknown),
        site,
        backend,
        container: None,
        nat: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FailureEvent {
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        FailureEvent {
            ts_ns: 1_000,
            cgroup_id: 42,
            pid: 10,
            tid: 11,
            uid: 1000,
            errno: 99,
            daddr,
            saddr,
            dport: 5000,
            family: AF_INET,
            proto: IPPROTO_TCP,
            site: Site::InetHashConnect as u8,
            backend: Backend::Tracepoint as u8,
            flags: EVENT_SADDR_KNOWN,
            comm: comm_bytes("python3"),
            netns: 4026531840,
            cause: 1,
            _pad: [0; 3],
        }
    }

    fn as_bytes(ev: &FailureEvent) -> Vec<u8> {
        // SAFETY: Pod struct viewed as bytes for the test.
        unsafe {
            std::slice::from_raw_parts(
                (ev as *const FailureEvent).cast::<u8>(),
                std::mem::size_of::<FailureEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_ipv4_event() {
        let (_, f) = decode_event(&as_bytes(&sample()), |t| Ts(t as i128 + 5)).expect("decodes");
        assert_eq!(f.ts, Ts(1_005));
        assert_eq!(f.dst.to_string(), "127.0.0.1:5000");
        assert_eq!(f.src, Some("127.0.0.2".parse().expect("ip")));
        assert_eq!(f.comm, "python3");
        assert_eq!(f.site, Site::InetHashConnect);
        assert_eq!(f.proto, Proto::Tcp);
        assert_eq!(f.netns, Some(4026531840));
    }

    #[test]
    fn decodes_ipv6_event_without_source() {
        let mut ev = sample();
        ev.family = AF_INET6;
        ev.daddr = Ipv6Addr::LOCALHOST.octets();
        ev.flags = 0;
        let (_, f) = decode_event(&as_bytes(&ev), |t| Ts(t as i128)).expect("decodes");
        assert_eq!(f.dst.to_string(), "[::1]:5000");
        assert_eq!(f.src, None);
        assert_eq!(f.family, Family::Ipv6);
    }

    #[test]
    fn rejects_short_and_garbage_records() {
        let b = as_bytes(&sample());
        assert_eq!(
            decode_event(&b[..10], |t| Ts(t as i128)).err(),
            Some(DecodeError::Size { got: 10, want: 96 })
        );
        let mut ev = sample();
        ev.site = 200;
        assert_eq!(
            decode_event(&as_bytes(&ev), |t| Ts(t as i128)).err(),
            Some(DecodeError::Site(200))
        );
        let mut ev = sample();
        ev.family = 1;
        assert_eq!(
            decode_event(&as_bytes(&ev), |t| Ts(t as i128)).err(),
            Some(DecodeError::Family(1))
        );
    }

    #[test]
    fn comm_round_trip_truncates_like_the_kernel() {
        assert_eq!(
            comm_str(&comm_bytes("a-very-long-command-name")),
            "a-very-long-com"
        );
        assert_eq!(comm_str(&comm_bytes("")), "");
    }
}
