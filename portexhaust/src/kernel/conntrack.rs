//! The NAT's own view, in the NAT's network namespace: its conntrack table over netlink
//! (NETLINK_NETFILTER, `IPCTNL_MSG_CT_GET` dump), its `insert_failed`/`drop` counters
//! (/proc/net/stat/nf_conntrack) and the port range of its masquerade/snat rule (`nft -j`).
//!
//! The socket is netlink-sys's (the crate the sock_diag census uses); messages and attributes
//! are walked with netlink-packet-core's buffers and parsers, and the conntrack attribute
//! numbers come from include/uapi/linux/netfilter/nfnetlink_conntrack.h. netlink-packet-netfilter
//! 0.4 was considered: its conntrack module types only `CTA_TUPLE_ORIG` and `CTA_PROTOINFO`;
//! the reply tuple (which holds the NAT's address and port, the one thing needed here) and
//! `CTA_STATUS` come back as undecoded attributes, so decoding them by hand was needed anyway.
use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use netlink_packet_core::{
    NLA_HEADER_SIZE, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer,
    NlasIterator, parse_ip, parse_u8, parse_u16_be, parse_u32_be,
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_NETFILTER};

use super::netns;

const NLMSG_HDR: usize = 16;
/// (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET; replies are IPCTNL_MSG_CT_NEW.
const CT_GET: u16 = (1 << 8) | 1;
const CT_NEW: u16 = 1 << 8;
const NFGENMSG: usize = 4;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// One direction of a conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// One conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub proto: u8,
    pub orig: CtTuple,
    pub reply: CtTuple,
    /// `enum ip_conntrack_status` bits.
    pub status: u32,
}

impl CtEntry {
    /// Source-NATed: the reply goes to another address or port than the original came from.
    pub fn snat(&self) -> bool {
        self.reply.dst != self.orig.src
    }
}

/// Netlink attributes of a buffer: (type without the nested/byte-order flags, payload). A
/// malformed attribute ends the list (netlink-packet-core's iterator stops there too).
fn attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
    NlasIterator::new(b)
        .map_while(|a| a.ok())
        .map(|a| {
            let (kind, len) = (a.kind(), usize::from(a.length()));
            // The value with the lifetime of `b` (NlaBuffer::value borrows the buffer struct).
            let v: &[u8] = a.into_inner();
            (kind, v.get(NLA_HEADER_SIZE..len).unwrap_or(&[]))
        })
        .collect()
}

fn attr<'a>(a: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    a.iter().find(|(t, _)| *t == ty).map(|(_, v)| *v)
}

fn tuple(b: &[u8]) -> Option<(u8, CtTuple)> {
    let t = attrs(b);
    let ip = attrs(attr(&t, CTA_TUPLE_IP)?);
    let proto = attrs(attr(&t, CTA_TUPLE_PROTO)?);
    let addr = |ty| attr(&ip, ty).and_then(|a| parse_ip(a).ok());
    let (src, dst) = match (addr(CTA_IP_V4_SRC), addr(CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (s, d),
        _ => (addr(CTA_IP_V6_SRC)?, addr(CTA_IP_V6_DST)?),
    };
    let num = parse_u8(attr(&proto, CTA_PROTO_NUM)?).ok()?;
    let port = |ty| {
        attr(&proto, ty)
            .and_then(|p| parse_u16_be(p).ok())
            .unwrap_or(0)
    };
    Some((
        num,
        CtTuple {
            src: SocketAddr::new(src, port(CTA_PROTO_SRC_PORT)),
            dst: SocketAddr::new(dst, port(CTA_PROTO_DST_PORT)),
        },
    ))
}

/// Decode one `IPCTNL_MSG_CT_NEW` payload (nfgenmsg + attributes).
pub fn parse_entry(payload: &[u8]) -> Option<CtEntry> {
    let a = attrs(payload.get(NFGENMSG..)?);
    let (proto, orig) = tuple(attr(&a, CTA_TUPLE_ORIG)?)?;
    let (_, reply) = tuple(attr(&a, CTA_TUPLE_REPLY)?)?;
    let status = attr(&a, CTA_STATUS)
        .and_then(|s| parse_u32_be(s).ok())
        .unwrap_or(0);
    Some(CtEntry {
        proto,
        orig,
        reply,
        status,
    })
}

/// Decode a buffer of replies; `Ok(true)` once the dump is done.
pub fn parse_replies(mut buf: &[u8], out: &mut Vec<CtEntry>) -> io::Result<bool> {
    while !buf.is_empty() {
        let m = NetlinkBuffer::new_checked(buf).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("conntrack: bad netlink message: {e}"),
            )
        })?;
        let len = m.length() as usize;
        let payload = m.payload();
        match m.message_type() {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => super::sockdiag::nlmsg_error(payload)?,
            CT_NEW => {
                if let Some(e) = parse_entry(payload) {
                    out.push(e);
                }
            }
            _ => {}
        }
        buf = buf.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Ok(false)
}

/// The dump request for one family (`AF_INET` or `AF_INET6`).
fn request(family: u8) -> Vec<u8> {
    let len = (NLMSG_HDR + NFGENMSG) as u32;
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&CT_GET.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    // struct nfgenmsg { nfgen_family, version (NFNETLINK_V0), res_id (be16) }
    m.extend_from_slice(&[family, 0, 0, 0]);
    m
}

/// Every conntrack entry of the calling thread's namespace, IPv4 and IPv6.
pub fn dump_here() -> io::Result<Vec<CtEntry>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&NlAddr::new(0, 0))?;
        socket.send(&request(family), 0)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = socket.recv(&mut &mut buf[..], 0)?;
            if n == 0 || parse_replies(&buf[..n], &mut out)? {
                break;
            }
        }
    }
    Ok(out)
}

/// `insert_failed` and `drop` of /proc/net/stat/nf_conntrack (one hex row per CPU, columns
/// named by the header line), summed over CPUs.
pub fn parse_stat(text: &str) -> Option<(u64, u64)> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (fi, di) = (col("insert_failed")?, col("drop")?);
    let (mut f, mut d) = (0u64, 0u64);
    for l in lines {
        let v: Vec<&str> = l.split_whitespace().collect();
        f += u64::from_str_radix(v.get(fi)?, 16).ok()?;
        d += u64::from_str_radix(v.get(di)?, 16).ok()?;
    }
    Some((f, d))
}

/// The calling thread's namespace's counters: /proc/thread-self/net follows the thread's
/// namespace (/proc/net is the process's, and the reader thread has setns()ed alone).
pub fn stat_here() -> io::Result<(u64, u64)> {
    let t = std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack")?;
    parse_stat(&t).ok_or_else(|| io::Error::other("unexpected /proc/net/stat/nf_conntrack"))
}

/// The port range of the first masquerade/snat statement in `nft -j list ruleset` output:
/// `Some((lo, hi, "nft"))`, or the kernel's default for source ports above 1023 when the rule
/// names no port.
pub fn parse_nft_range(json: &str) -> Option<(u16, u16, &'static str)> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    fn walk(v: &serde_json::Value) -> Option<Option<(u16, u16)>> {
        match v {
            serde_json::Value::Object(m) => {
                for key in ["masquerade", "snat"] {
                    if let Some(stmt) = m.get(key) {
                        let port = stmt.get("port");
                        let range = match port {
                            Some(serde_json::Value::Number(n)) => {
                                n.as_u64().map(|p| (p as u16, p as u16))
                            }
                            Some(p) => p.get("range").and_then(|r| {
                                Some((r.get(0)?.as_u64()? as u16, r.get(1)?.as_u64()? as u16))
                            }),
                            None => None,
                        };
                        return Some(range);
                    }
                }
                m.values().find_map(walk)
            }
            serde_json::Value::Array(a) => a.iter().find_map(walk),
            _ => None,
        }
    }
    match walk(&v)? {
        Some((lo, hi)) => Some((lo, hi, "nft")),
        // nf_nat_l4proto_unique_tuple(): with no range, source ports >= 1024 map into
        // 1024-65535.
        None => Some((1024, 65535, "default")),
    }
}

/// The NAT range of the calling thread's namespace, from `nft -j list ruleset` (None when nft
/// is not installed or the ruleset has no masquerade/snat). The child process inherits the
/// calling thread's network namespace.
pub fn nft_range_here() -> Option<(u16, u16, &'static str)> {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    parse_nft_range(&String::from_utf8_lossy(&out.stdout))
}

/// A handle to the namespace `ino`: a process's, or a named one (`ip netns add`, which has no
/// process in it: /run/netns/NAME).
pub fn netns_handle(ino: u64) -> Option<PathBuf> {
    if let Some(p) = netns::namespaces().remove(&ino) {
        return Some(p);
    }
    use std::os::unix::fs::MetadataExt;
    for dir in ["/run/netns", "/var/run/netns"] {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            if std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == ino) {
                return Some(e.path());
            }
        }
    }
    None
}

/// What the NAT's namespace shows now.
#[derive(Clone, Debug, Default)]
pub struct NatView {
    pub entries: Vec<CtEntry>,
    /// (insert_failed, drop) summed over CPUs.
    pub stat: Option<(u64, u64)>,
    pub range: Option<(u16, u16, &'static str)>,
}

/// Read the view of namespace `ino` (None: no handle to it, or it is gone).
pub fn view_of(ino: u64, path: &Path) -> Option<NatView> {
    netns::in_netns(ino, path, || NatView {
        entries: dump_here()
            .map_err(|e| log::debug!("conntrack dump of netns {ino}: {e}"))
            .unwrap_or_default(),
        stat: stat_here().ok(),
        range: nft_range_here(),
    })
    .map_err(|e| log::debug!("entering netns {ino}: {e}"))
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn tuple_nla(ty: u16, s: [u8; 4], sp: u16, d: [u8; 4], dp: u16) -> Vec<u8> {
        let ip = [nla(CTA_IP_V4_SRC, &s), nla(CTA_IP_V4_DST, &d)].concat();
        let proto = [
            nla(CTA_PROTO_NUM, &[6]),
            nla(CTA_PROTO_SRC_PORT, &sp.to_be_bytes()),
            nla(CTA_PROTO_DST_PORT, &dp.to_be_bytes()),
        ]
        .concat();
        nla(
            ty | 0x8000,
            &[
                nla(CTA_TUPLE_IP | 0x8000, &ip),
                nla(CTA_TUPLE_PROTO | 0x8000, &proto),
            ]
            .concat(),
        )
    }

    #[test]
    fn decodes_a_masqueraded_entry_and_stops_at_done() {
        let mut payload = vec![2, 0, 0, 0];
        payload.extend(tuple_nla(
            CTA_TUPLE_ORIG,
            [10, 1, 0, 2],
            51000,
            [10, 2, 0, 2],
            5000,
        ));
        payload.extend(tuple_nla(
            CTA_TUPLE_REPLY,
            [10, 2, 0, 2],
            5000,
            [10, 2, 0, 1],
            40003,
        ));
        payload.extend(nla(CTA_STATUS, &0x1beu32.to_be_bytes()));
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDR + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&CT_NEW.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend(payload);
        let mut done = Vec::new();
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0u8; 14]);
        msg.extend(done);
        let mut out = Vec::new();
        assert!(parse_replies(&msg, &mut out).expect("parses"));
        assert_eq!(out.len(), 1);
        let e = out[0];
        assert_eq!(e.proto, 6);
        assert_eq!(e.orig.src.to_string(), "10.1.0.2:51000");
        assert_eq!(e.reply.dst.to_string(), "10.2.0.1:40003");
        assert_eq!(e.status, 0x1be);
        assert!(e.snat());
        // Junk never panics.
        for n in 0..120u32 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            let _ = parse_replies(&junk, &mut Vec::new());
        }
    }

    #[test]
    fn stat_columns_are_found_by_name_and_summed() {
        let t = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop\n\
                 00000010 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 0000000a 0000000a 00000000\n\
                 00000010 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000001 00000002 00000000\n";
        assert_eq!(parse_stat(t), Some((11, 12)));
        assert_eq!(parse_stat("nothing here\n"), None);
    }

    #[test]
    fn nft_ranges() {
        let j = r#"{"nftables":[{"rule":{"expr":[{"match":{}},{"masquerade":{"port":{"range":[40000,40009]}}}]}}]}"#;
        assert_eq!(parse_nft_range(j), Some((40000, 40009, "nft")));
        let j = r#"{"nftables":[{"rule":{"expr":[{"masquerade":null}]}}]}"#;
        assert_eq!(parse_nft_range(j), Some((1024, 65535, "default")));
        let j = r#"{"nftables":[{"rule":{"expr":[{"snat":{"addr":"10.0.0.1","port":41000}}]}}]}"#;
        assert_eq!(parse_nft_range(j), Some((41000, 41000, "nft")));
        assert_eq!(parse_nft_range(r#"{"nftables":[]}"#), None);
    }
}
