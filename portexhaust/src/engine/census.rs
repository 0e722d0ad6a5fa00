//! Who holds the ports: every socket that uses an ephemeral port, grouped by (namespace,
//! source, destination) and attributed to its holder. Pure: the census (sock_diag), the
//! kernel's owner map and the /proc facts come in as data.
//!
//! A connect()ed socket occupies one local port *per 4-tuple*: exhaustion is per (source ip,
//! destination ip:port). So sockets are grouped by (local ip, remote ip:port), and only those
//! whose local port lies in the ephemeral range count (a server's accepted sockets have the
//! service port as local port and would otherwise show up as thousands of one-socket groups).
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use portexhaust_common::{OWNER_TIME_WAIT, Owner, ProcInfo, TcpState, TupleKey};

use crate::schema::{
    Attribution, ByState, DestRow, Holder, NetSysctls, PortRange, merge_ranges, parse_reserved,
};

/// One TCP socket, as sock_diag lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockRow {
    pub family: u16,
    pub state: TcpState,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// Milliseconds left on the socket's timer (for TIME_WAIT: until it disappears).
    pub expires_ms: u32,
    pub uid: u32,
    /// 0 for sockets no file refers to (TIME_WAIT, orphans).
    pub inode: u64,
}

impl SockRow {
    /// A socket from `local` to `remote` in `state` (tests).
    pub fn fixture(local: &str, remote: &str, state: TcpState) -> Self {
        let local: SocketAddr = local.parse().unwrap_or_else(|_| panic!("{local}"));
        let remote: SocketAddr = remote.parse().unwrap_or_else(|_| panic!("{remote}"));
        Self {
            family: if local.is_ipv4() {
                portexhaust_common::AF_INET
            } else {
                portexhaust_common::AF_INET6
            },
            state,
            src: local.ip(),
            sport: local.port(),
            dst: remote.ip(),
            dport: remote.port(),
            expires_ms: 0,
            uid: 0,
            inode: 0,
        }
    }
}

/// The port sysctls of one namespace as the census accounts with them: parsed once from the
/// [`NetSysctls`] read there, with the kernel's defaults where a value could not be read.
///
/// Kept apart from [`NetSysctls`], the record and `doctor --json` form, which keeps what was
/// read as it was read (optional fields, the reserved list as the kernel prints it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpace {
    pub range: (u16, u16),
    /// `ip_local_reserved_ports` as ranges.
    pub reserved: Vec<(u16, u16)>,
    /// `tcp_tw_reuse` and `tcp_timestamps`: whether a port in TIME_WAIT is reused after 1 s.
    pub tw_reuse: Option<i64>,
    pub timestamps: Option<i64>,
}

impl Default for PortSpace {
    fn default() -> Self {
        // The kernel's defaults (include/net/ip.h, inet_init_net).
        Self {
            range: (32768, 60999),
            reserved: Vec::new(),
            // The kernel's defaults: reuse for loopback only, timestamps on.
            tw_reuse: Some(2),
            timestamps: Some(1),
        }
    }
}

impl From<&NetSysctls> for PortSpace {
    fn from(s: &NetSysctls) -> Self {
        let port = |p: u32| u16::try_from(p).ok();
        Self {
            range: s
                .ip_local_port_range
                .and_then(|[lo, hi]| Some((port(lo)?, port(hi)?)))
                .filter(|(lo, hi)| lo <= hi)
                .unwrap_or(Self::default().range),
            reserved: s
                .ip_local_reserved_ports
                .as_deref()
                .map(parse_reserved)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(a, b)| Some((port(a)?, port(b.min(65535))?)))
                .collect(),
            tw_reuse: s.tcp_tw_reuse,
            timestamps: s.tcp_timestamps,
        }
    }
}

impl PortSpace {
    /// Ports of the range that connect() may use: the range minus the reserved ports in it.
    pub fn usable(&self) -> u64 {
        let (lo, hi) = self.range;
        // Reserved ranges may overlap each other: merged, each reserved port counts once.
        let reserved = merge_ranges(
            self.reserved
                .iter()
                .map(|&(a, b)| (u32::from(a), u32::from(b)))
                .collect(),
        );
        PortRange::new(u32::from(lo), u32::from(hi), &reserved).usable
    }

    pub fn contains(&self, port: u16) -> bool {
        let (lo, hi) = self.range;
        port >= lo && port <= hi && !self.reserved.iter().any(|&(a, b)| port >= a && port <= b)
    }
}

/// Everything known about one namespace at one moment.
#[derive(Clone, Debug)]
pub struct NsCensus {
    pub netns: u64,
    pub ports: PortSpace,
    pub sockets: Vec<SockRow>,
}

/// The process holding a socket's file now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdOwner {
    pub pid: u32,
    pub comm: String,
}

/// What the kernel remembered about the opener of a connection, with liveness from /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerView {
    pub pid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    pub alive: bool,
    pub flags: u32,
    pub closed_ns: u64,
}

impl OwnerView {
    /// `proc`: what the kernel remembered of the process (`PROCS`), its command and cgroup,
    /// still known after it exited.
    pub fn from_kernel(o: &Owner, proc: Option<&ProcInfo>, comm: String, alive: bool) -> Self {
        Self {
            pid: o.pid,
            cgroup_id: proc.map_or(0, |p| p.cgroup_id),
            comm,
            alive,
            flags: o.flags,
            closed_ns: if o.flags & OWNER_TIME_WAIT != 0 {
                o.at_ns
            } else {
                0
            },
        }
    }
}

/// The owner-map key of a socket row: IPv4 addresses IPv4-mapped, as the kernel side stores
/// them (a v4 socket and a v4-mapped v6 socket share one port space).
pub fn tuple_key(netns: u64, row: &SockRow) -> TupleKey {
    let raw = |ip: IpAddr| -> [u8; 16] {
        match ip {
            IpAddr::V4(a) => portexhaust_common::v4_mapped(a.octets()),
            IpAddr::V6(a) => a.octets(),
        }
    };
    TupleKey {
        netns: netns as u32,
        sport: row.sport,
        dport: row.dport,
        saddr: raw(row.src),
        daddr: raw(row.dst),
    }
}

/// Port usage towards one destination from one source address in one namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct DestUsage {
    pub netns: u64,
    pub src: IpAddr,
    pub dst: SocketAddr,
    pub range_size: u64,
    pub in_use: u64,
    pub by_state: ByState,
    /// TIME_WAIT sockets that expire within the next 10 s.
    pub tw_expiring_10s: u64,
    pub holders: Vec<Holder>,
}

impl DestUsage {
    /// The census facts as a row (no rates, no holders).
    pub fn row(&self) -> DestRow {
        DestRow::new(
            Some(self.netns),
            Some(self.src),
            self.dst,
            Some(self.range_size),
            self.in_use,
            self.by_state.clone(),
        )
    }
}

#[derive(Default)]
struct HolderAcc {
    sockets: u64,
    time_wait: u64,
    alive: bool,
    cgroup_id: u64,
}

/// A closing or TIME_WAIT socket belongs to its active closer, whom the kernel remembered.
fn closing(s: TcpState) -> bool {
    s == TcpState::TimeWait || s.ends_in_time_wait()
}

/// Group every socket that uses an ephemeral port by (namespace, source, destination) and
/// attribute each to its holder: the traced closer for closing sockets, the process holding
/// the file for live ones.
/// What is known of a socket's opener: the kernel's remembered closer and the process
/// holding its file now.
fn lookup<'a>(
    netns: u64,
    row: &SockRow,
    owners: &'a HashMap<TupleKey, OwnerView>,
    fd_owners: &'a HashMap<u64, FdOwner>,
) -> (Option<&'a OwnerView>, Option<&'a FdOwner>) {
    let tk = tuple_key(netns, row);
    // Without BTF offsets the kernel keyed owners with netns 0.
    let owner = owners
        .get(&tk)
        .or_else(|| owners.get(&TupleKey { netns: 0, ..tk }));
    // A live socket is the process holding its file, even if an old TIME_WAIT of the
    // same tuple (reused) is still remembered.
    let fd = fd_owners.get(&row.inode).filter(|_| row.inode != 0);
    (owner, fd)
}

/// The process a socket's port is blamed on, as [`usage`] names it.
pub fn holder_pid(
    netns: u64,
    row: &SockRow,
    owners: &HashMap<TupleKey, OwnerView>,
    fd_owners: &HashMap<u64, FdOwner>,
) -> Option<u32> {
    match lookup(netns, row, owners, fd_owners) {
        (Some(o), _) if closing(row.state) => Some(o.pid),
        (_, Some(f)) => Some(f.pid),
        (Some(o), None) => Some(o.pid),
        (None, None) => None,
    }
}

/// Whether a socket in this state holds a port of the ephemeral range towards a destination.
pub fn uses_range(ports: &PortSpace, row: &SockRow) -> bool {
    !matches!(row.state, TcpState::Listen | TcpState::Close) && ports.contains(row.sport)
}

pub fn usage(
    census: &[NsCensus],
    owners: &HashMap<TupleKey, OwnerView>,
    fd_owners: &HashMap<u64, FdOwner>,
) -> Vec<DestUsage> {
    type Key = (u64, IpAddr, SocketAddr);
    type HKey = (Option<u32>, String, Attribution);
    let mut acc: BTreeMap<Key, (DestUsage, BTreeMap<HKey, HolderAcc>)> = BTreeMap::new();
    for ns in census {
        let range_size = ns.ports.usable();
        for row in &ns.sockets {
            // Listeners and closed sockets hold no port for a destination; sockets whose
            // local port is outside the range (servers' accepted sockets, explicit binds) do
            // not use the range up.
            if !uses_range(&ns.ports, row) {
                continue;
            }
            let dst = SocketAddr::new(row.dst, row.dport);
            let (u, holders) = acc.entry((ns.netns, row.src, dst)).or_insert_with(|| {
                (
                    DestUsage {
                        netns: ns.netns,
                        src: row.src,
                        dst,
                        range_size,
                        in_use: 0,
                        by_state: ByState::new(),
                        tw_expiring_10s: 0,
                        holders: Vec::new(),
                    },
                    BTreeMap::new(),
                )
            });
            u.in_use += 1;
            *u.by_state.entry(row.state).or_default() += 1;
            let tw = row.state == TcpState::TimeWait;
            if tw && row.expires_ms <= 10_000 {
                u.tw_expiring_10s += 1;
            }
            let (owner, fd) = lookup(ns.netns, row, owners, fd_owners);
            let (hk, alive, cgroup_id) = match (owner, fd) {
                (Some(o), _) if closing(row.state) => (
                    (Some(o.pid), o.comm.clone(), Attribution::Traced),
                    o.alive,
                    o.cgroup_id,
                ),
                (_, Some(f)) => ((Some(f.pid), f.comm.clone(), Attribution::Fd), true, 0),
                (Some(o), None) => (
                    (Some(o.pid), o.comm.clone(), Attribution::Traced),
                    o.alive,
                    o.cgroup_id,
                ),
                (None, None) => (
                    (None, "(before start)".to_string(), Attribution::Unknown),
                    false,
                    0,
                ),
            };
            let h = holders.entry(hk).or_default();
            h.sockets += 1;
            h.alive |= alive;
            if h.cgroup_id == 0 {
                h.cgroup_id = cgroup_id;
            }
            if tw {
                h.time_wait += 1;
            }
        }
    }
    acc.into_values()
        .map(|(mut u, holders)| {
            let in_use = u.in_use.max(1) as f64;
            u.holders = holders
                .into_iter()
                .map(|((pid, comm, attribution), h)| Holder {
                    pid,
                    comm,
                    alive: h.alive,
                    sockets: h.sockets,
                    time_wait: h.time_wait,
                    share: h.sockets as f64 / in_use,
                    attribution,
                    container: None,
                    cgroup_id: h.cgroup_id,
                })
                .collect();
            sort_holders(&mut u.holders);
            u
        })
        .collect()
}

/// Most sockets first, then by pid.
pub fn sort_holders(h: &mut [Holder]) {
    h.sort_by(|a, b| b.sockets.cmp(&a.sockets).then_with(|| a.pid.cmp(&b.pid)));
}

/// Destination rows of censused namespaces (no holders), busiest first.
pub fn destination_rows(census: &[NsCensus]) -> Vec<DestRow> {
    let mut rows: Vec<DestRow> = usage(census, &HashMap::new(), &HashMap::new())
        .iter()
        .map(DestUsage::row)
        .collect();
    rows.sort_by(|a, b| {
        b.in_use
            .cmp(&a.in_use)
            .then_with(|| a.dst.cmp(&b.dst))
            .then_with(|| a.src.cmp(&b.src))
    });
    rows
}

/// The `n` busiest rows worth showing: a destination with a single socket is no exhaustion
/// risk (and on a busy host there are thousands of them).
pub fn busiest(mut rows: Vec<DestRow>, n: usize) -> Vec<DestRow> {
    rows.retain(|r| r.in_use >= 2);
    rows.truncate(n);
    rows
}

/// Owner-map entries whose TIME_WAIT is over (TCP_TIMEWAIT_LEN = 60 s, fixed in the kernel;
/// a few seconds of margin for the timer wheel), or that never got there.
pub fn expired_owners(owners: &[(TupleKey, Owner)], now_ns: u64) -> Vec<TupleKey> {
    owners
        .iter()
        .filter(|(_, o)| {
            let age = now_ns.saturating_sub(o.at_ns);
            if o.flags & OWNER_TIME_WAIT != 0 {
                age > 65_000_000_000
            } else {
                // Closed actively but never seen reaching CLOSE (a FIN_WAIT2 that the peer
                // never answered lasts tcp_fin_timeout, 60 s by default): long gone.
                age > STUCK_CLOSING_NS
            }
        })
        .map(|(k, _)| *k)
        .collect()
}

/// How long an actively closed socket may stay short of CLOSE before its owner is forgotten.
const STUCK_CLOSING_NS: u64 = 15 * 60 * 1_000_000_000;

#[cfg(test)]
mod tests;
