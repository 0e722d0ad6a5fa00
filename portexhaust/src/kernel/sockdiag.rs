//! Listing the TCP sockets of the current network namespace through NETLINK_SOCK_DIAG.
//!
//! The request is built with `netlink-packet-sock-diag`; the replies are decoded here from the
//! fixed `struct inet_diag_msg` layout (include/uapi/linux/inet_diag.h) because the crate's
//! parsed form drops `idiag_expires` for TIME_WAIT rows, and the time left in TIME_WAIT is
//! what tells how fast ports come back.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use portexhaust_common::TcpState;

pub use crate::engine::census::SockRow;

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// sizeof(struct inet_diag_msg): 4 single bytes, inet_diag_sockid (48), 5 u32.
const INET_DIAG_MSG: usize = 72;

fn ip(family: u8, raw: &[u8]) -> IpAddr {
    if u16::from(family) == AF_INET as u16 {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        let mut a = [0u8; 16];
        a.copy_from_slice(&raw[..16]);
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

/// Decode one `inet_diag_msg` (None: too short, or a state this build does not know).
pub fn parse_inet_diag_msg(b: &[u8]) -> Option<SockRow> {
    if b.len() < INET_DIAG_MSG {
        return None;
    }
    let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    // inet_diag_sockid at 4: sport be16 @4, dport be16 @6, src[16] @8, dst[16] @24,
    // if u32 @40, cookie u32[2] @44; then expires @52, rqueue @56, wqueue @60, uid @64,
    // inode @68.
    Some(SockRow {
        family: u16::from(b[0]),
        state: TcpState::from_u8(b[1])?,
        sport: u16::from_be_bytes([b[4], b[5]]),
        dport: u16::from_be_bytes([b[6], b[7]]),
        src: ip(b[0], &b[8..24]),
        dst: ip(b[0], &b[24..40]),
        expires_ms: u32_at(52),
        uid: u32_at(64),
        inode: u64::from(u32_at(68)),
    })
}

/// Outcome of decoding one buffer of netlink replies.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    More,
    Done,
}

/// Decode a buffer of netlink messages, appending socket rows. Pure, for tests and fuzzing.
pub fn parse_replies(mut buf: &[u8], out: &mut Vec<SockRow>) -> std::io::Result<Chunk> {
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDR || len > buf.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("sock_diag: netlink message of bad length {len}"),
            ));
        }
        let payload = &buf[NLMSG_HDR..len];
        match ty {
            NLMSG_DONE => return Ok(Chunk::Done),
            // Keep the errno: it tells a missing tcp_diag module from a permission.
            NLMSG_ERROR => nlmsg_error(payload)?,
            SOCK_DIAG_BY_FAMILY => {
                if let Some(row) = parse_inet_diag_msg(payload) {
                    out.push(row);
                }
            }
            _ => {}
        }
        // Messages are 4-byte aligned (NLMSG_ALIGN).
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or(&[]);
    }
    Ok(Chunk::More)
}

fn dump_family(family: u8, states: StateFlags) -> std::io::Result<Vec<SockRow>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut packet = NetlinkMessage::new(
        hdr,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut req = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut req);
    socket.send(&req, 0)?;

    let mut rows = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        if n == 0 {
            break;
        }
        match parse_replies(&buf[..n], &mut rows) {
            Ok(Chunk::Done) => break,
            Ok(Chunk::More) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(rows)
}

/// The TCP sockets (IPv4 and IPv6) in `states` of the calling thread's namespace.
fn dump(states: StateFlags) -> std::io::Result<Vec<SockRow>> {
    let mut rows = dump_family(AF_INET, states.clone())?;
    match dump_family(AF_INET6, states) {
        Ok(v6) => rows.extend(v6),
        // A kernel without IPv6 answers the AF_INET6 dump with an error: no IPv6 sockets.
        Err(e) => log::debug!("IPv6 sock_diag dump: {e}"),
    }
    Ok(rows)
}

/// Every TCP socket (IPv4 and IPv6, all states but LISTEN) of the calling thread's namespace.
pub fn dump_tcp() -> std::io::Result<Vec<SockRow>> {
    // Everything but LISTEN: listeners hold no ephemeral port.
    dump(StateFlags::all() & !StateFlags::LISTEN)
}

/// The listening TCP sockets of the calling thread's namespace (which [`dump_tcp`] leaves
/// out), for per-state totals of every socket.
pub fn dump_tcp_listeners() -> std::io::Result<Vec<SockRow>> {
    dump(StateFlags::LISTEN)
}

/// An NLMSG_ERROR message's payload: its errno as an error, or Ok for an acknowledgement (0).
pub(super) fn nlmsg_error(payload: &[u8]) -> std::io::Result<()> {
    let code = payload
        .get(..4)
        .map(|e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]))
        .unwrap_or(0);
    if code != 0 {
        return Err(std::io::Error::from_raw_os_error(-code));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(state: TcpState, sport: u16, dport: u16, expires: u32, inode: u32) -> Vec<u8> {
        let mut m = vec![0u8; INET_DIAG_MSG];
        m[0] = AF_INET;
        m[1] = state as u8;
        m[4..6].copy_from_slice(&sport.to_be_bytes());
        m[6..8].copy_from_slice(&dport.to_be_bytes());
        m[8..12].copy_from_slice(&[127, 0, 0, 1]);
        m[24..28].copy_from_slice(&[10, 0, 0, 9]);
        m[52..56].copy_from_slice(&expires.to_ne_bytes());
        m[68..72].copy_from_slice(&inode.to_ne_bytes());
        let mut h = Vec::new();
        h.extend_from_slice(&((NLMSG_HDR + m.len()) as u32).to_ne_bytes());
        h.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        h.extend_from_slice(&[0u8; 10]);
        h.extend_from_slice(&m);
        h
    }

    fn done() -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&20u32.to_ne_bytes());
        h.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        h.extend_from_slice(&[0u8; 14]);
        h
    }

    #[test]
    fn decodes_rows_and_stops_at_done() {
        let mut buf = msg(TcpState::TimeWait, 40001, 5000, 59_000, 0);
        buf.extend(msg(TcpState::Established, 40002, 5000, 0, 777));
        buf.extend(done());
        let mut rows = Vec::new();
        assert_eq!(parse_replies(&buf, &mut rows).ok(), Some(Chunk::Done));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].state, TcpState::TimeWait);
        assert_eq!(rows[0].expires_ms, 59_000);
        assert_eq!(rows[0].sport, 40001);
        assert_eq!(rows[0].dst.to_string(), "10.0.0.9");
        assert_eq!(rows[1].inode, 777);
    }

    #[test]
    fn bad_lengths_are_errors_not_panics() {
        let mut buf = msg(TcpState::Established, 1, 2, 0, 0);
        buf[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert!(parse_replies(&buf, &mut Vec::new()).is_err());
        buf[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse_replies(&buf, &mut Vec::new()).is_err());
        // Arbitrary bytes never panic.
        for n in 0..200u32 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 31 + n) as u8).collect();
            let _ = parse_replies(&junk, &mut Vec::new());
        }
    }
}
