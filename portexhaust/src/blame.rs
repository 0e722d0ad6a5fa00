//! Who holds the ports: per-destination port accounting, holder attribution, rates, forecasts
//! and latency percentiles. Pure: the census, the kernel's owner map and the /proc facts come
//! in as data, so all of it is unit-tested without root.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
};

use portexhaust_common::{
    CountKey, CountValue, LATENCY_BUCKETS, OWNER_TIME_WAIT, TcpState, TupleKey,
};
use serde::Serialize;

use crate::{
    aggregate::dst_string,
    model::comm_str,
    nsinfo::{FdOwner, NsCensus, NsSysctls},
    sockdiag::{SockRow, TCP_CLOSE, TCP_LISTEN, TCP_TIME_WAIT, state_name},
    sysctl::{PortRange, merge_ranges},
};

/// Ports of the range that connect() may use: `ip_local_port_range` minus the reserved ports
/// that fall inside it.
pub fn effective_range_size(s: &NsSysctls) -> u32 {
    let (lo, hi) = s.ip_local_port_range;
    // Reserved ranges may overlap each other: merged, each reserved port counts once.
    let reserved = merge_ranges(
        s.reserved
            .iter()
            .map(|&(a, b)| (u32::from(a), u32::from(b)))
            .collect(),
    );
    PortRange::new(u32::from(lo), u32::from(hi), &reserved).usable as u32
}

fn in_range(s: &NsSysctls, port: u16) -> bool {
    let (lo, hi) = s.ip_local_port_range;
    port >= lo && port <= hi && !s.reserved.iter().any(|&(a, b)| port >= a && port <= b)
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
    /// `proc` is what the kernel remembered of the process (`PROCS`): its command and cgroup,
    /// still known after it exited.
    pub fn from_kernel(
        o: &portexhaust_common::Owner,
        proc: Option<&portexhaust_common::ProcInfo>,
        alive: bool,
    ) -> Self {
        Self {
            pid: o.pid,
            cgroup_id: proc.map_or(0, |p| p.cgroup_id),
            comm: proc.map_or_else(String::new, |p| comm_str(&p.comm)),
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

/// How the holder of a socket was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// The kernel saw this process close the connection actively while tracing: it left the
    /// TIME_WAIT socket behind (which no file, and nothing else in the kernel, names).
    Traced,
    /// A live socket: the process holding its file now.
    Fd,
    /// Closed before tracing started (TIME_WAIT) or held by no file (an orphan): unknown.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Holder {
    pub pid: Option<u32>,
    pub comm: String,
    pub alive: bool,
    pub sockets: u64,
    pub time_wait: u64,
    /// sockets / in_use of the destination.
    pub share: f64,
    pub attribution: Attribution,
    /// Container of the holder (filled in by the caller, which can resolve cgroups).
    pub container: Option<crate::container::ContainerInfo>,
    /// cgroup of the traced opener (0 when not traced), to resolve `container` even after
    /// the process exited.
    #[serde(skip)]
    pub cgroup_id: u64,
}

impl Holder {
    /// `comm`, with the container when there is one: `nginx [docker:0123456789ab]`.
    pub fn label(&self) -> String {
        match &self.container {
            Some(c) => format!("{} [{}]", self.comm, c.short()),
            None => self.comm.clone(),
        }
    }
}

/// Port usage towards one destination from one source address in one namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct DestUsage {
    pub netns: u64,
    pub src: IpAddr,
    pub dst: SocketAddr,
    pub range_size: u32,
    pub in_use: u64,
    pub by_state: BTreeMap<&'static str, u64>,
    /// TIME_WAIT sockets that expire within the next 10 s.
    pub tw_expiring_10s: u64,
    pub holders: Vec<Holder>,
}

impl DestUsage {
    /// in_use / range_size (1 for an empty range: nothing can connect).
    pub fn utilisation(&self) -> f64 {
        if self.range_size == 0 {
            1.0
        } else {
            self.in_use as f64 / f64::from(self.range_size)
        }
    }
}

#[derive(Default)]
struct HolderAcc {
    sockets: u64,
    time_wait: u64,
    alive: bool,
    cgroup_id: u64,
}

/// Group every socket that uses an ephemeral port by (namespace, source, destination) and
/// attribute each to its holder: the traced opener first, then the process holding its file.
pub fn usage(
    census: &[NsCensus],
    owners: &HashMap<TupleKey, OwnerView>,
    fd_owners: &HashMap<u64, FdOwner>,
) -> Vec<DestUsage> {
    type Key = (u64, IpAddr, SocketAddr);
    type HKey = (Option<u32>, String, Attribution);
    let mut acc: BTreeMap<Key, (DestUsage, BTreeMap<HKey, HolderAcc>)> = BTreeMap::new();
    for ns in census {
        let range_size = effective_range_size(&ns.sysctls);
        for row in &ns.sockets {
            // Listeners and closed sockets hold no port for a destination; sockets whose
            // local port is outside the range (servers' accepted sockets, explicit binds) do
            // not use the range up.
            if row.state == TCP_LISTEN
                || row.state == TCP_CLOSE
                || !in_range(&ns.sysctls, row.sport)
            {
                continue;
            }
            let key = (ns.netns, row.src, SocketAddr::new(row.dst, row.dport));
            let (u, holders) = acc.entry(key).or_insert_with(|| {
                (
                    DestUsage {
                        netns: ns.netns,
                        src: row.src,
                        dst: SocketAddr::new(row.dst, row.dport),
                        range_size,
                        in_use: 0,
                        by_state: BTreeMap::new(),
                        tw_expiring_10s: 0,
                        holders: Vec::new(),
                    },
                    BTreeMap::new(),
                )
            });
            u.in_use += 1;
            *u.by_state.entry(state_name(row.state)).or_default() += 1;
            let tw = row.state == TCP_TIME_WAIT;
            if tw && row.expires_ms <= 10_000 {
                u.tw_expiring_10s += 1;
            }
            let tk = tuple_key(ns.netns, row);
            // Without BTF offsets the kernel keyed owners with netns 0.
            let owner = owners
                .get(&tk)
                .or_else(|| owners.get(&TupleKey { netns: 0, ..tk }));
            // A closing or TIME_WAIT socket is its active closer's (the kernel remembered it);
            // a live one the process holding its file, even if an old TIME_WAIT of the same
            // tuple (reused) is still remembered.
            let closing = matches!(
                TcpState::from_u8(row.state),
                Some(
                    TcpState::TimeWait
                        | TcpState::FinWait1
                        | TcpState::FinWait2
                        | TcpState::Closing
                )
            );
            let fd = fd_owners.get(&row.inode).filter(|_| row.inode != 0);
            let (hk, alive) = match (owner, fd) {
                (Some(o), _) if closing => {
                    ((Some(o.pid), o.comm.clone(), Attribution::Traced), o.alive)
                }
                (_, Some(f)) => ((Some(f.pid), f.comm.clone(), Attribution::Fd), true),
                (Some(o), None) => ((Some(o.pid), o.comm.clone(), Attribution::Traced), o.alive),
                (None, None) => (
                    (None, "(before start)".to_string(), Attribution::Unknown),
                    false,
                ),
            };
            let h = holders.entry(hk).or_default();
            h.sockets += 1;
            h.alive |= alive;
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
            u.holders
                .sort_by(|a, b| b.sockets.cmp(&a.sockets).then_with(|| a.pid.cmp(&b.pid)));
            u
        })
        .collect()
}

/// Owner-map entries whose TIME_WAIT is over (TCP_TIMEWAIT_LEN = 60 s, fixed in the kernel;
/// a few seconds of margin for the timer wheel), or that never got there.
pub fn expired_owners(
    owners: &[(TupleKey, portexhaust_common::Owner)],
    now_ns: u64,
) -> Vec<TupleKey> {
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

// ---------------------------------------------------------------------------------------------
// Rates and forecast.

/// Least-squares slope of (t, y) samples; None with fewer than two distinct times.
pub fn slope(samples: &[(f64, f64)]) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let n = samples.len() as f64;
    let mt = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let den: f64 = samples.iter().map(|s| (s.0 - mt).powi(2)).sum();
    if den <= f64::EPSILON {
        return None;
    }
    Some(samples.iter().map(|s| (s.0 - mt) * (s.1 - my)).sum::<f64>() / den)
}

/// Seconds until the range is full at the current growth, if it is growing; 0 when full.
pub fn forecast_seconds(range_size: u32, in_use: u64, growth_per_s: Option<f64>) -> Option<f64> {
    if in_use >= u64::from(range_size) {
        return Some(0.0);
    }
    let g = growth_per_s?;
    (g > 1e-9).then(|| (u64::from(range_size) - in_use) as f64 / g)
}

/// One destination's identity across refreshes.
pub type DestId = (u64, IpAddr, SocketAddr);

#[derive(Clone, Copy, Debug)]
struct Sample {
    t: f64,
    in_use: u64,
    connects: Option<u64>,
}

/// Keeps a sliding window of samples per destination.
#[derive(Debug)]
pub struct RateTracker {
    window_s: f64,
    by_dest: HashMap<DestId, VecDeque<Sample>>,
}

/// Rates of one destination over the window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    /// New connections per second (from the kernel's exact connect counter).
    pub new_per_s: Option<f64>,
    /// Growth of ports in use per second (least squares over the window).
    pub growth_per_s: Option<f64>,
}

impl RateTracker {
    pub fn new(window_s: f64) -> Self {
        Self {
            window_s,
            by_dest: HashMap::new(),
        }
    }

    pub fn observe(&mut self, t: f64, id: DestId, in_use: u64, connects: Option<u64>) -> Rates {
        let q = self.by_dest.entry(id).or_default();
        q.push_back(Sample {
            t,
            in_use,
            connects,
        });
        while q.front().is_some_and(|s| t - s.t > self.window_s) && q.len() > 2 {
            q.pop_front();
        }
        let pts: Vec<(f64, f64)> = q.iter().map(|s| (s.t, s.in_use as f64)).collect();
        let new_per_s = match (q.front(), q.back()) {
            (Some(a), Some(b)) if b.t - a.t > 1e-3 => match (a.connects, b.connects) {
                (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / (b.t - a.t)),
                (None, Some(y)) => Some(y as f64 / (b.t - a.t)),
                _ => Some(0.0),
            },
            // First sight of this destination: the kernel only counted connects made since
            // tracing began (t = 0), so the average over that time is exact.
            (Some(a), _) if a.t > 1e-3 => a.connects.map(|y| y as f64 / a.t),
            _ => None,
        };
        Rates {
            new_per_s,
            growth_per_s: slope(&pts),
        }
    }

    /// Forget destinations not seen since `t - window`.
    pub fn prune(&mut self, t: f64) {
        let w = self.window_s;
        self.by_dest
            .retain(|_, q| q.back().is_some_and(|s| t - s.t <= w));
    }
}

// ---------------------------------------------------------------------------------------------
// Latency.

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    /// Upper bounds of the log2 buckets holding each percentile, in microseconds.
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Percentiles from a log2 histogram (bucket i = [2^i, 2^(i+1)) ns): each is reported as the
/// upper bound of its bucket, the honest precision of such a histogram.
pub fn latency(hist: &[u64; LATENCY_BUCKETS]) -> Option<Latency> {
    let count: u64 = hist.iter().sum();
    if count == 0 {
        return None;
    }
    let pct = |p: f64| -> f64 {
        let rank = ((p * count as f64).ceil() as u64).max(1);
        let mut cum = 0;
        for (i, n) in hist.iter().enumerate() {
            cum += n;
            if cum >= rank {
                return (1u64 << (i + 1).min(63)) as f64 / 1000.0;
            }
        }
        (1u64 << LATENCY_BUCKETS) as f64 / 1000.0
    };
    Some(Latency {
        count,
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
    })
}

// ---------------------------------------------------------------------------------------------
// Blame for failures.

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Failer {
    pub pid: u32,
    pub comm: String,
    pub failures: u64,
    /// Filled in by the caller, which can resolve cgroups.
    pub container: Option<crate::container::ContainerInfo>,
}

/// For one destination that saw failures: who failed, and who holds its ports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlameEntry {
    pub dst: String,
    pub netns: Option<u64>,
    pub range_size: u32,
    pub in_use: u64,
    pub by_state: BTreeMap<&'static str, u64>,
    pub failers: Vec<Failer>,
    pub holders: Vec<Holder>,
}

/// Join the exact failure counts with the port usage of the failers' namespaces.
pub fn blame(
    counts: &[(CountKey, CountValue)],
    netns_of_pid: &dyn Fn(u32) -> Option<u64>,
    sysctls: &HashMap<u64, NsSysctls>,
    usage: &[DestUsage],
) -> Vec<BlameEntry> {
    let mut by_dst: BTreeMap<(String, Option<u64>), BTreeMap<u32, Failer>> = BTreeMap::new();
    for (k, v) in counts {
        let f = by_dst
            .entry((dst_string(k), netns_of_pid(k.pid)))
            .or_default()
            .entry(k.pid)
            .or_insert_with(|| Failer {
                pid: k.pid,
                comm: comm_str(&v.comm),
                failures: 0,
                container: None,
            });
        f.failures += v.count;
    }
    let mut out: Vec<BlameEntry> = by_dst
        .into_iter()
        .map(|((dst, netns), failers)| {
            let rows: Vec<&DestUsage> = usage
                .iter()
                .filter(|u| u.dst.to_string() == dst && netns.is_none_or(|n| n == u.netns))
                .collect();
            let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
            let mut holders: BTreeMap<(Option<u32>, String, Attribution), Holder> = BTreeMap::new();
            let mut in_use = 0;
            for u in &rows {
                in_use += u.in_use;
                for (s, n) in &u.by_state {
                    *by_state.entry(s).or_default() += n;
                }
                for h in &u.holders {
                    let e = holders
                        .entry((h.pid, h.comm.clone(), h.attribution))
                        .or_insert_with(|| Holder {
                            sockets: 0,
                            time_wait: 0,
                            share: 0.0,
                            ..h.clone()
                        });
                    e.sockets += h.sockets;
                    e.time_wait += h.time_wait;
                    e.alive |= h.alive;
                }
            }
            let mut holders: Vec<Holder> = holders.into_values().collect();
            for h in &mut holders {
                h.share = h.sockets as f64 / in_use.max(1) as f64;
            }
            holders.sort_by(|a, b| b.sockets.cmp(&a.sockets).then_with(|| a.pid.cmp(&b.pid)));
            let mut failers: Vec<Failer> = failers.into_values().collect();
            failers.sort_by(|a, b| b.failures.cmp(&a.failures).then(a.pid.cmp(&b.pid)));
            let range_size = rows
                .first()
                .map(|u| u.range_size)
                .or_else(|| {
                    netns
                        .and_then(|n| sysctls.get(&n))
                        .map(effective_range_size)
                })
                .unwrap_or(0);
            BlameEntry {
                dst,
                netns,
                range_size,
                in_use,
                by_state,
                failers,
                holders,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        let fa: u64 = a.failers.iter().map(|f| f.failures).sum();
        let fb: u64 = b.failers.iter().map(|f| f.failures).sum();
        fb.cmp(&fa).then_with(|| a.dst.cmp(&b.dst))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::comm_bytes;
    use portexhaust_common::{AF_INET, IPPROTO_TCP};

    fn sysctls(lo: u16, hi: u16, reserved: Vec<(u16, u16)>) -> NsSysctls {
        NsSysctls {
            ip_local_port_range: (lo, hi),
            reserved,
        }
    }

    #[test]
    fn range_size_subtracts_reserved_ports_inside_it() {
        assert_eq!(effective_range_size(&sysctls(32768, 60999, vec![])), 28232);
        assert_eq!(effective_range_size(&sysctls(40000, 40009, vec![])), 10);
        assert_eq!(
            effective_range_size(&sysctls(40000, 40009, vec![(40002, 40003), (1, 2)])),
            8
        );
        // Overlapping and out-of-range reservations count once, clipped to the range.
        assert_eq!(
            effective_range_size(&sysctls(40000, 40009, vec![(39990, 40001), (40001, 40002)])),
            7
        );
        assert_eq!(effective_range_size(&sysctls(5, 4, vec![])), 0);
    }

    fn row(state: u8, sport: u16, dport: u16, inode: u64, expires_ms: u32) -> SockRow {
        SockRow {
            family: AF_INET,
            state,
            src: "127.0.0.1".parse().expect("ip"),
            sport,
            dst: "127.0.0.1".parse().expect("ip"),
            dport,
            expires_ms,
            uid: 0,
            inode,
        }
    }

    fn census(rows: Vec<SockRow>) -> Vec<NsCensus> {
        vec![NsCensus {
            netns: 7,
            sysctls: sysctls(40000, 40009, vec![]),
            sockets: rows,
        }]
    }

    #[test]
    fn usage_counts_states_and_attributes_holders() {
        let rows = vec![
            row(TCP_TIME_WAIT, 40000, 5000, 0, 59_000),
            row(TCP_TIME_WAIT, 40001, 5000, 0, 3_000),
            row(1, 40002, 5000, 11, 0),
            row(1, 40003, 5000, 12, 0),
            row(TCP_TIME_WAIT, 40004, 5000, 0, 1_000),
            // the server side of a loopback connection: local port 5000, outside the range
            row(1, 5000, 40002, 13, 0),
            row(TCP_LISTEN, 5000, 0, 14, 0),
        ];
        let c = census(rows.clone());
        let mut owners = HashMap::new();
        for r in &rows[..2] {
            owners.insert(
                tuple_key(7, r),
                OwnerView {
                    pid: 100,
                    cgroup_id: 0,
                    comm: "churner".into(),
                    alive: false,
                    flags: OWNER_TIME_WAIT,
                    closed_ns: 1,
                },
            );
        }
        owners.insert(
            tuple_key(7, &rows[2]),
            OwnerView {
                pid: 200,
                cgroup_id: 0,
                comm: "app".into(),
                alive: true,
                flags: 0,
                closed_ns: 0,
            },
        );
        let mut fds = HashMap::new();
        fds.insert(
            12,
            FdOwner {
                pid: 300,
                comm: "old".into(),
            },
        );
        let u = usage(&c, &owners, &fds);
        assert_eq!(u.len(), 1, "{u:?}");
        let d = &u[0];
        assert_eq!(d.dst.to_string(), "127.0.0.1:5000");
        assert_eq!(d.in_use, 5);
        assert_eq!(d.range_size, 10);
        assert_eq!(d.by_state.get("TIME_WAIT"), Some(&3));
        assert_eq!(d.by_state.get("ESTABLISHED"), Some(&2));
        assert_eq!(d.tw_expiring_10s, 2);
        let churner = &d.holders[0];
        assert_eq!(
            (churner.pid, churner.sockets, churner.time_wait),
            (Some(100), 2, 2)
        );
        assert!(!churner.alive);
        assert_eq!(churner.attribution, Attribution::Traced);
        assert!((churner.share - 0.4).abs() < 1e-9);
        let unknown = d.holders.iter().find(|h| h.pid.is_none()).expect("unknown");
        assert_eq!((unknown.sockets, unknown.time_wait), (1, 1));
        assert_eq!(unknown.attribution, Attribution::Unknown);
        let old = d
            .holders
            .iter()
            .find(|h| h.pid == Some(300))
            .expect("fd owner");
        assert_eq!(old.attribution, Attribution::Fd);
        assert!(old.alive);
    }

    #[test]
    fn slope_and_forecast() {
        assert_eq!(slope(&[(0.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 5.0)]), None);
        let s = slope(&[(0.0, 100.0), (1.0, 110.0), (2.0, 120.0)]).expect("slope");
        assert!((s - 10.0).abs() < 1e-9);
        assert_eq!(forecast_seconds(28232, 28000, Some(10.0)), Some(23.2));
        assert_eq!(forecast_seconds(100, 100, None), Some(0.0));
        assert_eq!(forecast_seconds(100, 50, Some(-1.0)), None);
        assert_eq!(forecast_seconds(100, 50, None), None);
        // The landscape figure: 28,232 ports / 60 s of TIME_WAIT ~ 470 connections per second.
        assert!((28232.0_f64 / 60.0 - 470.5).abs() < 0.1);
    }

    #[test]
    fn rate_tracker_uses_exact_connect_counters_over_the_window() {
        let id: DestId = (
            1,
            "127.0.0.1".parse().expect("ip"),
            "127.0.0.1:80".parse().expect("a"),
        );
        let mut r = RateTracker::new(10.0);
        assert_eq!(r.observe(0.0, id, 0, Some(0)).new_per_s, None);
        let other: DestId = (2, id.1, id.2);
        assert_eq!(r.observe(4.0, other, 8, Some(20)).new_per_s, Some(5.0));
        let x = r.observe(2.0, id, 40, Some(100));
        assert_eq!(x.new_per_s, Some(50.0));
        assert_eq!(x.growth_per_s, Some(20.0));
        // Old samples leave the window.
        let y = r.observe(30.0, id, 40, Some(100));
        let z = r.observe(31.0, id, 40, Some(100));
        assert_eq!(y.new_per_s.map(|v| v < 10.0), Some(true));
        assert_eq!(z.growth_per_s, Some(0.0));
        r.prune(100.0);
        assert!(r.by_dest.is_empty());
    }

    #[test]
    fn latency_percentiles_from_log2_buckets() {
        let mut h = [0u64; LATENCY_BUCKETS];
        assert_eq!(latency(&h), None);
        h[10] = 90; // ~1 us
        h[20] = 10; // ~1 ms
        let l = latency(&h).expect("latency");
        assert_eq!(l.count, 100);
        assert_eq!(l.p50, 2.048);
        assert_eq!(l.p90, 2.048);
        assert_eq!(l.p99, 2097.152);
    }

    #[test]
    fn blame_joins_failers_with_holders() {
        let rows = vec![
            row(TCP_TIME_WAIT, 40000, 5000, 0, 59_000),
            row(TCP_TIME_WAIT, 40001, 5000, 0, 59_000),
        ];
        let c = census(rows.clone());
        let mut owners = HashMap::new();
        for r in &rows {
            owners.insert(
                tuple_key(7, r),
                OwnerView {
                    pid: 100,
                    cgroup_id: 0,
                    comm: "churner".into(),
                    alive: false,
                    flags: OWNER_TIME_WAIT,
                    closed_ns: 1,
                },
            );
        }
        let u = usage(&c, &owners, &HashMap::new());
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let counts = vec![(
            CountKey {
                pid: 200,
                dport: 5000,
                family: AF_INET,
                errno: 99,
                proto: IPPROTO_TCP,
                cause: 1,
                _pad: [0; 4],
                daddr,
            },
            CountValue {
                count: 7,
                first_ns: 0,
                last_ns: 0,
                comm: comm_bytes("failer"),
                unstreamed: 0,
            },
        )];
        let mut sc = HashMap::new();
        sc.insert(7, sysctls(40000, 40009, vec![]));
        let b = blame(&counts, &|_| Some(7), &sc, &u);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].dst, "127.0.0.1:5000");
        assert_eq!(b[0].in_use, 2);
        assert_eq!(b[0].range_size, 10);
        assert_eq!(
            b[0].failers,
            vec![Failer {
                pid: 200,
                comm: "failer".into(),
                failures: 7,
                container: None,
            }]
        );
        assert_eq!(b[0].holders[0].pid, Some(100));
        assert_eq!(b[0].holders[0].time_wait, 2);
        assert!((b[0].holders[0].share - 1.0).abs() < 1e-9);
        // A failer in another namespace does not get this namespace's holders.
        let b = blame(&counts, &|_| Some(8), &sc, &u);
        assert_eq!(b[0].in_use, 0);
        assert!(b[0].holders.is_empty());
    }

    #[test]
    fn expired_owners_are_only_finished_time_waits() {
        let mut o = portexhaust_common::Owner {
            pid: 1,
            flags: OWNER_TIME_WAIT,
            start_ns: 0,
            at_ns: 1_000_000_000,
        };
        let k = tuple_key(1, &row(TCP_TIME_WAIT, 40000, 80, 0, 0));
        assert_eq!(expired_owners(&[(k, o)], 70_000_000_000), vec![k]);
        assert!(expired_owners(&[(k, o)], 30_000_000_000).is_empty());
        // Still closing: kept for up to 15 minutes.
        o.flags = 0;
        assert!(expired_owners(&[(k, o)], 700_000_000_000).is_empty());
        assert_eq!(expired_owners(&[(k, o)], 1_000_000_000_000), vec![k]);
    }
}
